"""What a user mistypes is refused before anything is written, in one line naming the key,
the value and the fix (docs/bad-input.md): every writer leaves a folder holding a real-layout
BraTS case byte-identical (checksums of every file, and no new entry), and bad settings
fail at compose time in every config group."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from m4fuse.cli.main import main
from m4fuse.data import guard
from m4fuse.data.fake import write_spaced_case
from m4fuse.run import provision, settings
from m4fuse.run.config_check import ConfigError


def tree_digest(folder: Path) -> dict[str, str]:
    """Every entry below ``folder`` -> the SHA-256 of its bytes ("dir" for folders)."""
    return {str(p.relative_to(folder)): ("dir" if p.is_dir() else
                                         hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def brats(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A BraTS 2021-layout folder with one tiny case named as the synthesiser names its
    first case, and its digest."""
    root = tmp_path / "BraTS2021"
    write_spaced_case(root, case_id="BraTS2021_00000", shape=(16, 16, 16))
    return root, tree_digest(root)


def test_a_synthetic_run_on_a_brats_folder_is_refused_and_writes_nothing(brats, tmp_path,
                                                                        capsys):
    """The deployment mistake: data=brats left out, data.source names the hospital's folder."""
    root, before = brats
    cfg = settings.compose("config", [f"data.source={root}", f"root={tmp_path / 'home'}",
                                      "data.sites=1", "data.cases_per_site=2"])
    with pytest.raises(guard.FolderRefused) as caught:
        provision.ensure_data(cfg)
    text = str(caught.value)
    assert "\n" not in text and str(root) in text and "data.source" in text
    assert "this looks like BraTS data: add data=brats" in text and "BraTS2021_00000" in text
    assert tree_digest(root) == before
    # the same through the simulation and baseline drivers: one line, exit status 2
    from simulations import baselines, federated

    assert federated.main([f"data.source={root}", f"root={tmp_path / 'home'}"]) == 2
    assert baselines.main("pooled", ["fl.rouns=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("simulations.federated: error: data.source") and len(err) == 2
    assert err[1].startswith("simulations.pooled: error: fl.rouns=2")
    assert tree_digest(root) == before


def test_the_synthesiser_writes_only_into_an_empty_folder_or_its_own_set(brats, tmp_path, capsys):
    root, before = brats
    assert main(["data", "synth", "--out", str(root), "--sites", "1", "--cases-per-site", "1",
                 "--shape", "16", "16", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("m4fuse data synth: error:") and "looks like BraTS data" in err
    assert len(err.splitlines()) == 1 and tree_digest(root) == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "readme.txt").write_text("mine")
    with pytest.raises(guard.FolderRefused, match=r"holds 1 entry \(readme.txt\)"):
        guard.claim_for_synthesizer(other)
    assert [p.name for p in other.iterdir()] == ["readme.txt"]
    # an empty folder, then the same folder again (its own set): both written
    own = tmp_path / "synthetic"
    for _ in range(2):
        assert main(["data", "synth", "--out", str(own), "--sites", "1", "--cases-per-site",
                     "1", "--shape", "16", "16", "16"]) == 0
    assert (own / guard.SYNTH_MARKER).is_file() and (own / "BraTS2021_00000").is_dir()


def test_prepare_never_writes_into_or_below_its_source_nor_into_a_brats_folder(brats, tmp_path,
                                                                              capsys):
    root, before = brats
    other = tmp_path / "BraTS2020"
    write_spaced_case(other, case_id="BraTS20_Training_001", shape=(16, 16, 16))
    other_before = tree_digest(other)
    assert main(["data", "prepare", str(root), "--cache", str(root / "cache"),
                 "--size", "16", "16", "16"]) == 2
    assert "inside the BraTS source" in capsys.readouterr().err
    assert main(["data", "prepare", str(root), "--cache", str(other), "--size", "16", "16",
                 "16"]) == 2
    assert "looks like BraTS data" in capsys.readouterr().err
    assert tree_digest(root) == before and tree_digest(other) == other_before
    # a BraTS run whose project root is the BraTS folder itself, or a run name leaving runs/
    for overrides, message in (([f"root={root}"], "inside data.source"),
                               ([f"root={tmp_path}", "run_name=../x"], "not a folder name")):
        cfg = settings.compose("config", ["data=brats", f"data.source={root}", *overrides])
        with pytest.raises(guard.FolderRefused, match=message):
            provision.ensure_data(cfg)
    assert tree_digest(root) == before


def test_segment_and_sites_never_write_into_their_input(brats, tmp_path, capsys):
    """``m4fuse segment --out`` into the case folder (e.g. over its own _seg file) and
    ``m4fuse data sites --out`` into the BraTS folder are refused before any work."""
    root, before = brats
    case = root / "BraTS2021_00000"
    assert main(["segment", str(case), "--model", str(tmp_path / "missing.ckpt"), "--out",
                 str(case / "BraTS2021_00000_seg.nii.gz")]) == 2
    assert "inside the case folder" in capsys.readouterr().err
    assert main(["data", "sites", str(root), "--out", str(root / "partition.csv")]) == 2
    assert "inside ROOT" in capsys.readouterr().err
    assert tree_digest(root) == before
    # a file where a case folder is wanted: says what the command wants
    assert main(["segment", str(case / "BraTS2021_00000_t1.nii.gz"), "--model",
                 str(tmp_path / "m.ckpt"), "--out", str(tmp_path / "o.nii.gz")]) == 2
    assert "a case folder holding the four modalities" in capsys.readouterr().err


def test_certificates_and_site_state_write_only_their_own_files(brats):
    """Pointed at a BraTS folder by mistake, ``m4fuse certs`` and a site's state store add
    their own files only; every case file stays as it was."""
    import torch

    from m4fuse.personal.site_store import SiteState, SiteStateStore

    root, before = brats
    assert main(["certs", "--out", str(root), "--host", "localhost", "--supernodes", "1"]) == 0
    store = SiteStateStore(root, "site0")
    store.bind_run("run-a")
    store.save(SiteState(site="site0", round=1, fingerprint="x",
                         expert={"site_experts.*.w": torch.zeros(2)}))
    store.bind_run("run-b")  # a new run discards the old run's state files, only those
    after = tree_digest(root)
    assert {k: v for k, v in after.items() if k in before} == before


@pytest.mark.parametrize("override, words", [
    ("fl.rouns=2", ["fl.rouns=2", "did you mean fl.rounds?"]),
    ("+fl.rouns=2", ["+fl.rouns=2", "no config has the key fl.rouns", "fl.rounds"]),
    ("+seed2=1", ["+seed2=1", "no config has the key seed2"]),
    ("fl.rounds=abc", ["fl.rounds=abc", "takes an integer", "default is 60"]),
    ("fl.rounds=2.5", ["fl.rounds=2.5", "takes an integer"]),
    ("data.size=[32,32,a]", ["data.size", "takes an integer", "'a'"]),
    ("tracking.enabled=maybe", ["tracking.enabled=maybe", "true or false"]),
    ("fl.strategy=fedx", ["fl.strategy", "'fedx'", "personal-norm-ft"]),
    ("data=bratz", ["data=bratz", "brats, brats19_shaped, fets22_shaped, public_reference, synthetic"]),
    ("fl.rounds=[1", ["fl.rounds=[1", "not a valid Hydra override"]),
])
def test_a_bad_setting_is_one_line_naming_key_value_and_fix(override, words):
    with pytest.raises(ConfigError) as caught:
        settings.compose("config", [override])
    text = str(caught.value)
    assert "\n" not in text
    for word in words:
        assert word in text


def test_open_maps_and_the_train_schema_still_take_plus_keys():
    cfg = settings.compose("config", ["+fl.faults.site1.nan_round=1", "+train.betas=[0.9,0.99]",
                                      "privacy=dp", "fl.strategy=personal",
                                      "privacy.noise_multiplier=null"])
    assert cfg.fl.faults.site1.nan_round == 1 and cfg.privacy.noise_multiplier is None
    with pytest.raises(ConfigError, match=r"\+data.sites=3: no config has the key data.sites"):
        settings.compose("config", ["data=brats", "data.source=/x", "+data.sites=3"])


def test_the_cli_prints_one_line_and_debug_keeps_the_traceback(monkeypatch, capsys):
    assert main(["train", "fl.rouns=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("m4fuse train: error: fl.rouns=2:") and len(err.splitlines()) == 1
    monkeypatch.setenv("M4FUSE_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(["train", "fl.rouns=2"])


class _Nodes:
    """A grid that only answers which nodes are connected."""

    def __init__(self, count: int) -> None:
        self.count = count

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.count + 1))


def test_sites_and_supernodes_must_match_before_any_waiting_in_a_simulation():
    """A simulation (Flower's InMemoryGrid registers every SuperNode at once) is refused as
    soon as the count settles, fewer or more SuperNodes than sites; a deployment waits up
    to fl.wait_for_sites for hospitals to connect."""
    import time

    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from server.runner import SIMULATION_SETTLE_S, SitesMismatch, wait_for_sites

    class Simulated(_Nodes, InMemoryGrid):
        pass

    for nodes in (2, 5):
        started = time.monotonic()
        with pytest.raises(SitesMismatch, match=rf"{nodes} SuperNode\(s\) connected in this "
                                                r"simulation.*has 4 sites.*num-supernodes=4"):
            wait_for_sites(Simulated(nodes), 4, timeout=120)
        assert time.monotonic() - started < SIMULATION_SETTLE_S + 5  # not the 120 s
    wait_for_sites(Simulated(4), 4, timeout=120)
    started = time.monotonic()
    with pytest.raises(SitesMismatch, match=r"after 1 s"):
        wait_for_sites(_Nodes(2), 4, timeout=1)  # a deployment: waits the timeout
    assert time.monotonic() - started >= 1


def test_the_serverapp_log_of_a_refused_run_ends_with_the_one_line(monkeypatch):
    """Flower logs a ServerApp's exception with its traceback, then an exit message; for a
    refused run the traceback becomes the one line and the exit message ends with it
    (M4FUSE_DEBUG=1 keeps the traceback). The records are made as Flower 1.42 makes them
    (flwr.superlink.runtime.run_serverapp and flwr.supercore.exit.flwr_exit)."""
    import io
    import logging
    from logging import ERROR

    from flwr.supercore import log

    from server import failure

    failure.install()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger(failure.FLOWER_LOGGER).addHandler(handler)
    try:
        for debug in ("", "1"):
            monkeypatch.setenv("M4FUSE_DEBUG", debug)
            for one_line in logging.getLogger(failure.FLOWER_LOGGER).filters:
                one_line.line = None
            try:
                try:
                    raise ValueError("fl.rouns=2: no config has the key fl.rouns")
                except ValueError as err:
                    raise failure.RunRefused(str(err)) from err
            except failure.RunRefused as refused:
                log(ERROR, "%s raised an exception", "ServerApp", exc_info=refused)
            log(ERROR, "Exit Code: 201\nAn unhandled exception occurred in the ServerApp.")
            text = stream.getvalue()
            stream.seek(0)
            stream.truncate()
            lines = [line for line in text.splitlines() if line.strip()]
            if debug:
                assert "Traceback" in text
            else:
                assert "Traceback" not in text
                assert lines[-1] == "m4fuse: error: fl.rouns=2: no config has the key fl.rouns"
                assert lines[0] == lines[-1] and "Exit Code: 201" in text
    finally:
        logging.getLogger(failure.FLOWER_LOGGER).removeHandler(handler)


def test_simulate_counts_the_sites_and_builds_the_flwr_command(tmp_path, capsys):
    """``m4fuse simulate``: one SuperNode per site of the split, and the overrides reach the
    ServerApp unchanged (read back by Flower's own run-config parser, then ours)."""
    from flwr.common.config import parse_config_args

    from m4fuse.cli.simulate import count_sites, flwr_command

    overrides = [f"root={tmp_path}", "data.sites=3", "data.cases_per_site=2",
                 "data.shape=[16,16,16]", "data.size=[16,16,16]", "run_name=my run"]
    assert count_sites(overrides) == ["site0", "site1", "site2"]
    command = flwr_command(overrides, 3, "/app", "hospitals")
    assert command[1:] == ["run", "/app", "hospitals", "--stream", "--federation-config",
                           "num-supernodes=3", "--run-config", command[-1]]
    passed = parse_config_args([command[-1]])
    assert list(passed) == ["overrides"]
    assert settings.parse_overrides(passed["overrides"]) == overrides
    assert main(["simulate", "--dry-run", *overrides]) == 0
    out = capsys.readouterr().out
    assert "3 site(s), one SuperNode each: site0, site1, site2" in out
    assert "split: m4fuse.data.split_cases per site" in out and "num-supernodes=3" in out
    with pytest.raises(ConfigError, match="single quote"):
        flwr_command(["run_name=it's"], 3)
    # one split rule: `m4fuse data sites` on the raw folder shows the runs' own split
    cfg = settings.compose("config", overrides)
    raw = provision.data_paths(cfg)[0]
    split = provision.load_sites(cfg)
    for extra in ([], ["data.test_fraction=0.0"]):
        assert main(["data", "sites", str(raw), "--partition-csv", str(raw / "partition.csv"),
                     *overrides, *extra]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith("split: m4fuse.data.split_cases per site, data=synthetic")
        shown = {line.split()[0]: [int(n) for n in line.split()[2:5]]
                 for line in lines if line.startswith("site") and line.split()[1].isdigit()}
        expected = {site: [len(parts[k]) for k in ("train", "val", "test")]
                    for site, parts in (split if not extra else provision.load_sites(
                        settings.compose("config", overrides + extra))).items()}
        assert shown == expected and len(shown) == 3


def test_the_apps_own_overrides_set_the_main_job_its_supernodes_and_simulate(tmp_path,
                                                                              capsys):
    """Plain ``flwr run .`` trains the app's own run config (pyproject.toml): setup.sh counts its
    sites for the SuperNodes, ``m4fuse simulate`` without overrides runs the same, and an app
    whose run config cannot be read or names a folder's data fails in one line."""
    checkout = settings.CONFIG_DIR.parent
    assert settings.app_overrides(checkout) == ["data=brats19_shaped"]
    assert settings.app_sites(checkout) == 14
    app = tmp_path / "app"
    app.mkdir()
    with pytest.raises(ValueError, match=r"app/pyproject.toml: cannot read"):
        settings.app_overrides(app)
    (app / "pyproject.toml").write_text("[tool.flwr.app.config]\nconfig-name = \"config\"\n")
    assert settings.app_overrides(app) == [] and settings.app_sites(app) == 4
    (app / "pyproject.toml").write_text(
        "[tool.flwr.app.config]\noverrides = \"data=brats data.source=/nowhere\"\n")
    with pytest.raises(ValueError, match="set M4FUSE_SITES"):
        settings.app_sites(app)
    own = [f"root={tmp_path}", "data.sites=3", "data.cases_per_site=2", "data.shape=[16,16,16]",
           "data.size=[16,16,16]"]
    (app / "pyproject.toml").write_text(
        f"[tool.flwr.app.config]\noverrides = \"{' '.join(own)}\"\n")
    assert settings.app_sites(app) == 3
    assert main(["simulate", "--dry-run", "--app", str(app)]) == 0
    out = capsys.readouterr().out
    assert "3 site(s), one SuperNode each" in out and "num-supernodes=3" in out
    assert "data.sites=3" in out.splitlines()[-1]


def test_assemble_logs_its_files_to_the_mlflow_run_the_run_folder_records(tmp_path):
    """After ``flwr run .`` the ServerApp's MLflow run gets model.ckpt and the overlays from
    ``m4fuse model assemble`` (:func:`m4fuse.run.tracking.log_to_recorded_run`)."""
    import json

    from mlflow.tracking import MlflowClient

    from m4fuse.run.tracking import Tracker, log_to_recorded_run, tracking_uri

    cfg = settings.compose("config", [f"root={tmp_path}"])
    tracker = Tracker(cfg, "assembled")
    run_dir = tmp_path / "runs" / "assembled"
    (run_dir / "overlays").mkdir(parents=True)
    (run_dir / "model.ckpt").write_bytes(b"model")
    (run_dir / "overlays" / "site0.png").write_bytes(b"png")
    files = [(run_dir / "model.ckpt", "model"), (run_dir / "overlays" / "site0.png", "overlays")]
    (run_dir / "summary.json").write_text(json.dumps({"mlflow_run_id": tracker.run_id}))
    assert "not its store" in log_to_recorded_run(run_dir, files)
    (run_dir / "summary.json").write_text(json.dumps(
        {"mlflow_run_id": tracker.run_id, "mlflow_tracking_uri": tracking_uri(cfg)}))
    assert log_to_recorded_run(run_dir, files).startswith("MLflow: logged 2 file(s)")
    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    logged = {a.path for folder in ("model", "overlays")
              for a in client.list_artifacts(tracker.run_id, folder)}
    assert logged == {"model/model.ckpt", "overlays/site0.png"}
