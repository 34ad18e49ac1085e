"""The coordinator's side of the runner without a simulation: site names without data, and the
settings a resumed run may change."""

from __future__ import annotations

import pytest

from m4fuse.run import provision, settings
from server.runner import federation_sites, resume_hash


def _cfg(tmp_path, *extra: str):
    return settings.compose("config", [f"root={tmp_path}", *extra])


def test_site_names_from_config_need_no_data(monkeypatch, tmp_path):
    def no_data(cfg):
        raise AssertionError("the coordinator must not load the data split")

    monkeypatch.setattr(provision, "load_sites", no_data)
    cfg = _cfg(tmp_path, "data=brats", "data.source=/nonexistent/brats",
               "fl.site_names=[TMC,CBICA,TCIA01]")
    assert federation_sites(cfg) == ["CBICA", "TCIA01", "TMC"]  # sorted: index = position
    with pytest.raises(ValueError, match=r"duplicates: \['A', 'A'\]"):
        federation_sites(_cfg(tmp_path, "fl.site_names=[A,A]"))


def test_site_names_from_the_split_in_simulation(monkeypatch, tmp_path):
    monkeypatch.setattr(provision, "load_sites", lambda cfg: {"site1": {}, "site0": {}})
    assert federation_sites(_cfg(tmp_path)) == ["site0", "site1"]


def test_resume_may_change_rounds_faults_and_quorum_not_the_rule(tmp_path):
    base = resume_hash(_cfg(tmp_path))
    same = _cfg(tmp_path, "fl.rounds=7", "fl.resume=true", "fl.min_sites=2",
                "+fl.faults={site0:{crash_round:2}}", "fl.round_timeout=5")
    assert resume_hash(same) == base
    for change in ("fl.aggregation=median", "fl.norm_bound=2.0", "fl.local_epochs=2"):
        assert resume_hash(_cfg(tmp_path, change)) != base, change


def test_resume_hash_and_the_server_optimiser(tmp_path):
    from omegaconf import OmegaConf

    cfg = _cfg(tmp_path, "fl.server_opt=none")
    base = resume_hash(cfg)
    # a run checkpointed before the fl.server_* keys existed (server_opt none) still resumes;
    # its config as plain values (a composed one follows the schema, whose keys stay)
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, enum_to_str=True))
    for key in ("server_opt", "server_lr", "server_momentum", "server_beta_1",
                "server_beta_2", "server_tau"):
        cfg.fl.pop(key)
    assert resume_hash(cfg) == base
    assert resume_hash(_cfg(tmp_path, "fl.server_opt=none", "fl.server_lr=0.5")) == base
    assert resume_hash(_cfg(tmp_path)) != base  # the default is fedavgm
    adam = resume_hash(_cfg(tmp_path, "fl.server_opt=fedadam"))
    assert adam != base
    assert resume_hash(_cfg(tmp_path, "fl.server_opt=fedadam", "fl.server_lr=0.5")) != adam


def test_resume_hash_and_krum(tmp_path):
    """Krum's keys change the rule only under krum/multikrum: a run checkpointed before they
    existed still resumes under the other aggregations."""
    from omegaconf import OmegaConf

    cfg = _cfg(tmp_path)
    base = resume_hash(cfg)
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, enum_to_str=True))  # as plain values
    for key in ("krum_malicious", "krum_select"):
        cfg.fl.pop(key)
    assert resume_hash(cfg) == base
    assert resume_hash(_cfg(tmp_path, "fl.krum_malicious=3")) == base
    krum = resume_hash(_cfg(tmp_path, "fl.aggregation=krum", "fl.krum_malicious=0"))
    assert krum != base
    assert resume_hash(_cfg(tmp_path, "fl.aggregation=krum", "fl.krum_malicious=1",
                            "data.sites=5")) != resume_hash(
        _cfg(tmp_path, "fl.aggregation=krum", "fl.krum_malicious=0", "data.sites=5"))


def test_resume_hash_and_cpu_autocast(tmp_path):
    """``train.amp_cpu`` false (the default) is what ran before the key existed: a run
    checkpointed then still resumes; switching it on changes the hash."""
    from omegaconf import OmegaConf

    cfg = _cfg(tmp_path)
    base = resume_hash(cfg)
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))  # a plain config: the schema's keys pop
    cfg.train.pop("amp_cpu")
    assert resume_hash(cfg) == base
    assert resume_hash(_cfg(tmp_path, "train.amp_cpu=true")) != base


#: One room per concern: what a package may not import. ``m4fuse/`` (the task
#: package, no Flower roles) takes nothing from the federation's roles or its drivers; the server
#: never reaches into a client (what both need, e.g. the site-state format, lives in m4fuse/).
FORBIDDEN_IMPORTS: dict[str, tuple[str, ...]] = {
    "server": ("client",),
    "m4fuse": ("client", "server", "simulations"),
}


@pytest.mark.parametrize("package", sorted(FORBIDDEN_IMPORTS))
def test_package_imports_nothing_from_the_rooms_it_must_not_reach(package):
    """Every import in ``<package>/**/*.py``, at any depth (also inside functions), is checked."""
    import ast
    import importlib
    from pathlib import Path

    root = Path(importlib.import_module(package).__file__).parent
    files = sorted(root.rglob("*.py"))
    assert len(files) > 3
    forbidden = FORBIDDEN_IMPORTS[package]
    bad = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            bad += [f"{path.relative_to(root)}:{node.lineno} {n}" for n in names
                    if any(n == f or n.startswith(f + ".") for f in forbidden)]
    assert not bad, bad
