"""m4fuse/personal/site_store.py: a site's expert, optimiser state and metrics survive on its disk."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch

from m4fuse.nets.model import M4Fuse, M4FuseConfig
from m4fuse.personal.sets import expert_state, place_expert, split_state
from m4fuse.personal.site_store import (
    SiteState,
    SiteStateStore,
    StateStoreError,
    model_fingerprint,
)

WIDTHS = (4, 4, 8, 8, 8, 8)


@pytest.fixture(scope="module")
def trained() -> tuple[M4FuseConfig, M4Fuse, torch.optim.Optimizer]:
    torch.manual_seed(0)
    config = M4FuseConfig(widths=WIDTHS, num_experts=1)
    model = M4Fuse(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(1, 4, 16, 16, 16)
    loss = model(x, torch.zeros(1, dtype=torch.long)).square().mean()
    loss.backward()
    opt.step()
    return config, model, opt


def _state(config, model, opt, rnd: int = 1, site: str = "CBICA") -> SiteState:
    return SiteState(
        site=site,
        round=rnd,
        fingerprint=model_fingerprint(config),
        expert=expert_state(model.state_dict(), 0),
        optimizer=opt.state_dict(),
        metrics={"loss": 0.25 * rnd, "dice_mean": 0.5},
    )


def test_round_trip_restores_expert_into_a_fresh_model(trained, tmp_path: Path) -> None:
    config, model, opt = trained
    store = SiteStateStore(tmp_path / "state", "CBICA")
    assert store.load(model_fingerprint(config)) is None  # nothing yet
    store.save(_state(config, model, opt))
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700

    # a "restarted SuperNode": new store object, new model with other random weights
    torch.manual_seed(123)
    fresh = M4Fuse(config)
    fresh_expert = expert_state(fresh.state_dict(), 0)
    loaded = SiteStateStore(tmp_path / "state", "CBICA").load(
        model_fingerprint(config), like=fresh_expert
    )
    assert loaded is not None and loaded.round == 1 and loaded.metrics["loss"] == 0.25
    before = expert_state(model.state_dict(), 0)
    assert not all(torch.equal(before[k], fresh_expert[k]) for k in before)
    fresh.load_state_dict(place_expert(loaded.expert, 0), strict=False)
    after = expert_state(fresh.state_dict(), 0)
    assert all(torch.equal(before[k], after[k]) for k in before)

    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    opt2.load_state_dict(loaded.optimizer)
    step_before = next(iter(opt.state_dict()["state"].values()))["step"]
    assert next(iter(opt2.state_dict()["state"].values()))["step"] == step_before
    summary = json.loads((tmp_path / "state" / "last-metrics.json").read_text())
    assert summary == {"site": "CBICA", "round": 1, "metrics": {"loss": 0.25, "dice_mean": 0.5}}


def test_local_strategy_keeps_its_shared_copy(trained, tmp_path: Path) -> None:
    config, model, opt = trained
    shared, _ = split_state(model.state_dict())
    store = SiteStateStore(tmp_path, "CBICA")
    store.save(SiteState("CBICA", 2, model_fingerprint(config),
                         expert_state(model.state_dict(), 0), shared=shared))
    loaded = store.load(model_fingerprint(config))
    assert loaded.optimizer is None and set(loaded.shared) == set(shared)
    assert all(torch.equal(loaded.shared[k], shared[k]) for k in shared)
    with pytest.raises(ValueError, match="expert weight"):
        store.save(SiteState("CBICA", 3, model_fingerprint(config), loaded.expert,
                             shared=dict(model.state_dict())))


def test_keeps_newest_rounds_and_before_round(trained, tmp_path: Path) -> None:
    config, model, opt = trained
    store = SiteStateStore(tmp_path, "CBICA", keep=2)
    for rnd in (1, 2, 3):
        store.save(_state(config, model, opt, rnd))
    assert store.rounds() == [2, 3]
    fp = model_fingerprint(config)
    assert store.load(fp).round == 3
    assert store.load(fp, before_round=3).round == 2
    assert store.load(fp, before_round=2) is None
    assert not list(tmp_path.glob("*.tmp"))  # no temporary files left behind


def test_fingerprint_refuses_another_architecture(trained, tmp_path: Path) -> None:
    config, model, opt = trained
    store = SiteStateStore(tmp_path, "CBICA")
    store.save(_state(config, model, opt))
    # experts are index-free: the number of experts does not change the fingerprint
    assert model_fingerprint(M4FuseConfig(widths=WIDTHS, num_experts=3)) == model_fingerprint(config)
    other = model_fingerprint(M4FuseConfig(widths=(4, 4, 8, 8, 8, 16)))
    assert other != model_fingerprint(config)
    with pytest.raises(StateStoreError, match=r"site-state-r1\.pt.*another model"):
        store.load(other)


def test_corrupt_file_names_the_file(trained, tmp_path: Path) -> None:
    config, model, opt = trained
    store = SiteStateStore(tmp_path, "CBICA")
    path = store.save(_state(config, model, opt))
    path.write_bytes(path.read_bytes()[:200])  # truncated, as by a full disk
    with pytest.raises(StateStoreError, match=f"corrupt site state file {path}"):
        store.load(model_fingerprint(config))
    path.write_text("not a checkpoint")
    with pytest.raises(StateStoreError, match="corrupt site state file"):
        store.load(model_fingerprint(config))


def test_refuses_other_site_and_bad_shapes(trained, tmp_path: Path) -> None:
    config, model, opt = trained
    SiteStateStore(tmp_path, "CBICA").save(_state(config, model, opt))
    fp = model_fingerprint(config)
    with pytest.raises(StateStoreError, match="belongs to site 'CBICA', not 'TCIA01'"):
        SiteStateStore(tmp_path, "TCIA01").load(fp)
    like = expert_state(model.state_dict(), 0)
    key = next(iter(like))
    bad = dict(like, **{key: torch.zeros(99)})
    with pytest.raises(StateStoreError, match="shape"):
        SiteStateStore(tmp_path, "CBICA").load(fp, like=bad)
    fewer = dict(list(like.items())[1:])
    with pytest.raises(StateStoreError, match="keys differ"):
        SiteStateStore(tmp_path, "CBICA").load(fp, like=fewer)


def test_save_checks_arguments(trained, tmp_path: Path) -> None:
    config, model, opt = trained
    store = SiteStateStore(tmp_path, "CBICA")
    good = _state(config, model, opt)
    with pytest.raises(ValueError, match="not index-free"):
        store.save(SiteState("CBICA", 1, good.fingerprint, {"enc.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match="'loss'"):
        store.save(SiteState("CBICA", 1, good.fingerprint, good.expert, metrics={"loss": float("nan")}))
    with pytest.raises(ValueError, match="'TCIA01'"):
        store.save(_state(config, model, opt, site="TCIA01"))
    with pytest.raises(ValueError, match="round"):
        store.save(SiteState("CBICA", -1, good.fingerprint, good.expert))
    assert store.rounds() == []


def test_state_of_another_run_is_discarded_when_the_run_identity_changes(
        trained, tmp_path: Path) -> None:
    """A new run with an old run's name must not inherit its expert or its DP spending: the
    folder is bound to the server's run identity and started clean on a mismatch; the same
    identity (a resumed run) keeps everything."""
    config, model, opt = trained
    store = SiteStateStore(tmp_path / "state", "CBICA")
    assert store.bind_run("run-a") is None  # empty folder: just bound
    store.save(_state(config, model, opt, rnd=3))
    store.save_accountant({"mechanism": "rdp", "noise_multiplier": [1.0], "sample_rate": [0.5],
                           "steps": [4]})
    assert store.bind_run("run-a") is None  # resumed: kept
    assert store.rounds() == [3] and store.load_accountant() is not None
    message = store.bind_run("run-b")
    assert message is not None and "run-a" in message and "run-b" in message
    assert store.rounds() == [] and store.load_accountant() is None
    assert store.load(model_fingerprint(config)) is None
    assert SiteStateStore(tmp_path / "state", "CBICA").run_identity() == "run-b"


def test_state_without_identity_counts_as_another_run(trained, tmp_path: Path) -> None:
    config, model, opt = trained
    store = SiteStateStore(tmp_path / "state", "CBICA")
    store.save(_state(config, model, opt, rnd=1))  # written before identities existed
    assert "(no identity)" in store.bind_run("run-c")
    assert store.rounds() == []
