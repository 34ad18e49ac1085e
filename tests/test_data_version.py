"""The data-ready markers of m4fuse.run.provision.ensure_data record the generator and
preprocessing versions, so data of an older generator is generated again, not reused."""

from __future__ import annotations

import json

import pytest

from m4fuse.run import provision, settings

TINY = ["data.sites=2", "data.cases_per_site=2", "data.shape=[16,16,16]",
        "data.size=[16,16,16]", "data.workers=0", "tracking.enabled=false"]


@pytest.fixture()
def counted(monkeypatch):
    """Counts calls of the synthesiser and of prepare_dataset (still running them)."""
    from m4fuse import data as mdata

    calls = {"synthesize": 0, "prepare": 0}
    real_synth, real_prepare = mdata.synthesize, mdata.prepare_dataset

    def synth(*args, **kwargs):
        calls["synthesize"] += 1
        return real_synth(*args, progress=False, **kwargs)

    def prepare(*args, **kwargs):
        calls["prepare"] += 1
        return real_prepare(*args, progress=False, **kwargs)

    monkeypatch.setattr(mdata, "synthesize", synth)
    monkeypatch.setattr(mdata, "prepare_dataset", prepare)
    return calls


def test_markers_record_versions_and_reuse_data(tmp_path, counted):
    cfg = settings.compose("config", [f"root={tmp_path}", *TINY])
    cache = provision.ensure_data(cfg)
    source, _ = provision.data_paths(cfg)
    marker = json.loads((source / ".complete").read_text())
    assert marker["generator"] == provision.generator_version()
    assert len(marker["generator"]) >= 2 and marker["cases_per_site"] == 2
    cache_marker = json.loads((cache / ".complete").read_text())
    assert cache_marker["source"] == marker and cache_marker["size"] == [16, 16, 16]
    provision.ensure_data(cfg)
    assert counted == {"synthesize": 1, "prepare": 1}  # second call reuses both folders


def test_new_generator_version_regenerates(tmp_path, counted, monkeypatch):
    cfg = settings.compose("config", [f"root={tmp_path}", *TINY])
    provision.ensure_data(cfg)
    monkeypatch.setattr(provision, "generator_version", lambda: "another")
    cache = provision.ensure_data(cfg)
    assert counted == {"synthesize": 2, "prepare": 2}
    assert json.loads((cache / ".complete").read_text())["source"]["generator"] == "another"


def test_old_plain_marker_is_not_trusted(tmp_path, counted):
    cfg = settings.compose("config", [f"root={tmp_path}", *TINY])
    source, cache = provision.data_paths(cfg)
    source.mkdir(parents=True)
    (source / ".complete").write_text("ok\n")  # what the unversioned code wrote
    provision.ensure_data(cfg)
    assert counted == {"synthesize": 1, "prepare": 1}
    assert (source / "partition.csv").is_file()
