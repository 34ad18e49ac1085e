"""The ClientApp's train handler with DP-SGD, injected faults and the on-disk site state
(client/app.py), and the engine's empty-batch hook DP relies on. Tiny widths, 16³ volumes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flower_fixtures import TINY_FL, client_train_round
from flwr.app import ArrayRecord, Message, RecordDict

from m4fuse.personal.sets import is_personal, split_state
from m4fuse.run import settings
from m4fuse.training import site_steps

pytestmark = pytest.mark.usefixtures("flower_task_identity")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("m4fuse-client"))


def _use(monkeypatch, root: str, *extra: str):
    """Point the ClientApp at the tiny config (+ ``extra``); returns the config and the
    server's initial shared arrays."""
    from server.runner import initial_state

    args = [f"root={root}", *TINY_FL, *extra]
    monkeypatch.setenv(settings.OVERRIDES_ENV, " ".join(args))
    cfg = settings.compose("config", args)
    held, _ = initial_state(cfg)
    return cfg, ArrayRecord({k: v for k, v in held.items()})


def _metrics(reply: Message) -> dict:
    (record,) = reply.content.metric_records.values()
    return dict(record)


def _arrays(reply: Message) -> dict[str, np.ndarray]:
    (record,) = reply.content.array_records.values()
    return {k: v.numpy() for k, v in record.items()}


# --------------------------------------------------------------------------- engine


def test_trainer_empty_batch_steps_scheduler_and_skips_forward() -> None:
    from m4fuse.nets.model import M4Fuse, M4FuseConfig
    from m4fuse.training.engine import TrainConfig, make_optimizer
    from m4fuse.training.trainer import LocalTrainer, train_epochs

    torch.manual_seed(0)
    model = M4Fuse(M4FuseConfig(widths=[4, 8, 8, 8, 8, 8], dropout=0.0))
    s = 16
    full = {"image": torch.randn(1, 4, s, s, s), "label": torch.zeros(1, 3, s, s, s),
            "site": torch.zeros(1, dtype=torch.long), "case": ["a"]}
    empty = {"image": torch.zeros(0, 4, s, s, s), "label": torch.zeros(0, 3, s, s, s),
             "site": torch.zeros(0, dtype=torch.long), "case": []}
    tcfg = TrainConfig(amp=False, grad_clip=None, seed=0)
    opt, sched = make_optimizer(model, tcfg, total_steps=4)
    calls = []

    class EmptyStepping(LocalTrainer):  # what a noise-only DP step does: an (empty) step
        def empty_batch(self) -> None:
            calls.append(self.step_optimizer)
            self.step_optimizer.step()

    out = EmptyStepping(model, opt, sched, tcfg, "cpu").train_epochs([empty, full, empty])
    assert calls == [opt, opt]
    assert sched.last_epoch == 3  # stepped for the two empty batches and the full one
    assert out["num-examples"] == 1 and math.isfinite(out["loss"])
    # only empty batches: no loss to report, but the steps were taken
    out = EmptyStepping(model, opt, None, tcfg, "cpu").train_epochs([empty])
    assert math.isnan(out["loss"]) and out["num-examples"] == 0 and len(calls) == 3
    with pytest.raises(ValueError, match="empty batch"):
        train_epochs(model, [empty], opt, None, tcfg, "cpu")


# --------------------------------------------------------------------------- DP


def test_dp_round_reports_epsilon_that_grows_with_state_in_context(monkeypatch, root, tmp_path):
    from client.app import ACCOUNTANT_RECORD
    from m4fuse.personal.site_store import ACCOUNTANT_FILE

    _, start = _use(monkeypatch, root, "privacy.enabled=true", "run_name=dp")
    state = RecordDict()
    first = client_train_round(0, start, state, 1, str(tmp_path))
    m1 = _metrics(first)
    assert {"dp-epsilon", "dp-delta", "dp-noise-multiplier", "dp-steps"} <= set(m1)
    assert 0 < m1["dp-epsilon"] < math.inf and m1["dp-noise-multiplier"] == 1.0
    assert ACCOUNTANT_RECORD in state.config_records
    assert not any(is_personal(k) for k in _arrays(first))
    second = client_train_round(0, first.content.array_records["arrays"], state, 2,
                                str(tmp_path))
    m2 = _metrics(second)
    assert m2["dp-steps"] == 2 * m1["dp-steps"]  # one epoch of len(loader) steps per round
    assert m2["dp-epsilon"] > m1["dp-epsilon"]
    assert set(m2) == set(m1)
    on_disk = json.loads((tmp_path / "clients" / "site0" / ACCOUNTANT_FILE).read_text())
    assert sum(on_disk["accountant"]["steps"]) == m2["dp-steps"]
    # every site emits the same keys (Flower refuses replies with different metric keys)
    other = client_train_round(1, start, RecordDict(), 1, str(tmp_path))
    assert set(_metrics(other)) == set(m1)


def _opacus_rdp_epsilon(n_train: int, batch_size: int, rounds: int, sigma: float = 1.0
                        ) -> tuple[float, int, float]:
    """(ε, steps, δ) of ``rounds`` rounds of one epoch each, from a fresh
    ``opacus.accountants.RDPAccountant`` stepped once per DP-SGD step: ceil(n / batch) Poisson
    steps per epoch at rate 1 / that many, δ = 1 / (10 n) (the configs' default)."""
    from opacus.accountants import RDPAccountant

    per_round = math.ceil(n_train / batch_size)
    accountant = RDPAccountant()
    for _ in range(rounds * per_round):
        accountant.step(noise_multiplier=sigma, sample_rate=1.0 / per_round)
    delta = 1.0 / (10 * n_train)
    return accountant.get_epsilon(delta=delta), rounds * per_round, delta


def test_dp_epsilon_matches_opacus_and_a_restarted_client_continues_it(
        monkeypatch, root, tmp_path):
    """Each site's reported ε against Opacus's RDP accountant fed the same σ, rate, steps and
    δ; a client restarted after round 1 (fresh context.state, the same state folder) reports in
    round 2 the ε of an uninterrupted client, not a reset one."""
    import shutil

    from m4fuse.run import provision

    cfg, start = _use(monkeypatch, root, "privacy.enabled=true", "run_name=dp-oracle")
    split = provision.load_sites(cfg)
    n_train = [len(split[name]["train"]) for name in provision.site_names(split)]
    batch = int(cfg.train.batch_size)
    uninterrupted, first = tmp_path / "uninterrupted", tmp_path / "restarted"
    states = [RecordDict(), RecordDict()]
    round1 = [_metrics(client_train_round(p, start, states[p], 1, str(uninterrupted)))
              for p in (0, 1)]
    for p in (0, 1):
        eps, steps, delta = _opacus_rdp_epsilon(n_train[p], batch, rounds=1)
        assert round1[p]["dp-steps"] == steps and round1[p]["dp-delta"] == pytest.approx(delta)
        assert round1[p]["dp-noise-multiplier"] == 1.0
        assert round1[p]["dp-epsilon"] == pytest.approx(eps, rel=1e-9), p
    shutil.copytree(uninterrupted, first)  # the folder a restarted process finds
    kept_on = _metrics(client_train_round(0, start, states[0], 2, str(uninterrupted)))
    restarted = _metrics(client_train_round(0, start, RecordDict(), 2, str(first)))
    eps2, steps2, _ = _opacus_rdp_epsilon(n_train[0], batch, rounds=2)
    assert kept_on["dp-steps"] == restarted["dp-steps"] == steps2
    assert kept_on["dp-epsilon"] == pytest.approx(eps2, rel=1e-9)
    assert restarted["dp-epsilon"] == pytest.approx(kept_on["dp-epsilon"], rel=1e-12)
    assert restarted["dp-epsilon"] > round1[0]["dp-epsilon"]


def test_dp_recipe_round_takes_the_planned_steps_at_the_expected_batch_rate(
        monkeypatch, root, tmp_path):
    """privacy=dp through the ClientApp: fl.local_steps=2 DP steps per round at rate
    expected_batch / n, ε of them by Opacus's RDP accountant, and the σ planned so that the
    whole run (rounds x 2 steps) stays within the target."""
    from opacus.accountants import RDPAccountant

    from client.app import check_dp_training
    from m4fuse.run import provision

    cfg, start = _use(monkeypatch, root, "privacy=dp", "fl.strategy=personal",
                      "privacy.expected_batch=2", "privacy.lr=0.001", "fl.rounds=3",
                      "run_name=dp-recipe")
    assert check_dp_training(cfg, "personal").train.lr == 0.001
    split = provision.load_sites(cfg)
    n = len(split[provision.site_names(split)[0]]["train"])
    m = _metrics(client_train_round(0, start, RecordDict(), 1, str(tmp_path)))
    sigma, q, delta = m["dp-noise-multiplier"], 2 / n, 1 / (10 * n)
    assert m["dp-steps"] == 2 and m["dp-delta"] == pytest.approx(delta)

    def rdp(steps: int) -> float:
        accountant = RDPAccountant()
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
        return accountant.get_epsilon(delta=delta)

    assert m["dp-epsilon"] == pytest.approx(rdp(2), rel=1e-9)
    assert 10.0 - 0.05 <= rdp(3 * 2) <= 10.0  # the run's 6 steps spend the target


def test_an_unreachable_dp_target_stops_the_run_before_round_one(monkeypatch, root):
    from m4fuse.training.dp import PrivacyPlanError
    from server.runner import check_privacy_plan, federation_sites

    cfg, _ = _use(monkeypatch, root, "privacy=dp", "fl.strategy=personal",
                  "privacy.expected_batch=2", "privacy.target_epsilon=0.05")
    with pytest.raises(PrivacyPlanError, match=r"^privacy.target_epsilon=0.05 cannot be met at "
                                               r"site site0 .* at most \d+ steps"):
        check_privacy_plan(cfg, federation_sites(cfg))
    fine, _ = _use(monkeypatch, root, "privacy=dp", "fl.strategy=personal",
                   "privacy.expected_batch=2")
    check_privacy_plan(fine, federation_sites(fine))


def test_dp_refuses_fedprox_float16_and_cpu_autocast(monkeypatch, root, tmp_path):
    from client.app import check_dp_training

    cfg, _ = _use(monkeypatch, root)
    with pytest.raises(ValueError, match="fedprox"):
        check_dp_training(cfg, "fedprox")
    half = settings.compose("config", [f"root={root}", *TINY_FL, "train.amp_dtype=float16"])
    with pytest.raises(ValueError, match="float16"):
        check_dp_training(half, "personal")
    cpu_bf16 = settings.compose("config", [f"root={root}", *TINY_FL, "train.amp_cpu=true"])
    with pytest.raises(ValueError, match="train.amp_cpu=true is not supported"):
        check_dp_training(cpu_bf16, "personal")
    assert check_dp_training(cfg, "personal").train.grad_clip is None
    assert cfg.train.grad_clip == 12.0  # the shared config is left alone


# --------------------------------------------------------------------------- disk state


def test_restarted_client_continues_with_its_expert_from_disk(monkeypatch, root, tmp_path):
    import client.app as client_app

    _, start = _use(monkeypatch, root, "run_name=restart")
    state = RecordDict()
    first = client_train_round(1, start, state, 1, str(tmp_path))
    kept = state.array_records["kept"].to_torch_state_dict()
    folder = tmp_path / "clients" / "site1"
    assert [p.name for p in folder.glob("site-state-r*.pt")] == ["site-state-r1.pt"]
    fresh = settings.build_model(settings.compose("config", [f"root={root}", *TINY_FL]), 1)
    assert any(not torch.equal(kept[k], fresh.state_dict()[k]) for k in kept)

    seen: dict[str, torch.Tensor] = {}
    original = site_steps.train_site

    def spy(model, *args, **kwargs):
        seen.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return original(model, *args, **kwargs)

    monkeypatch.setattr(client_app.site_steps, "train_site", spy)
    # a new process: nothing in context.state, the same state folder
    restarted = RecordDict()
    client_train_round(1, first.content.array_records["arrays"], restarted, 2, str(tmp_path))
    assert set(kept) == {k for k in seen if is_personal(k)}
    assert all(torch.equal(seen[k], kept[k]) for k in kept)
    assert sorted(p.name for p in folder.glob("site-state-r*.pt")) == [
        "site-state-r1.pt", "site-state-r2.pt"]
    metrics = json.loads((folder / "last-metrics.json").read_text())
    assert metrics["round"] == 2 and metrics["metrics"]["num-examples"] > 0


def test_state_of_another_model_is_refused(monkeypatch, root, tmp_path):
    from m4fuse.personal.site_store import StateStoreError

    _, start = _use(monkeypatch, root, "run_name=fp")
    client_train_round(0, start, RecordDict(), 1, str(tmp_path))
    _, other = _use(monkeypatch, root, "run_name=fp", "model.d_state=8")
    with pytest.raises(StateStoreError, match="fingerprint"):
        client_train_round(0, other, RecordDict(), 2, str(tmp_path))


# --------------------------------------------------------------------------- faults


def test_nan_fault_poisons_the_reply_and_crash_fault_raises_in_its_round(
        monkeypatch, root, tmp_path):
    from client.faults import InjectedFault

    _, start = _use(monkeypatch, root, "run_name=faults",
                    "+fl.faults={site0:{nan_round:1,crash_round:2}}")
    state = RecordDict()
    poisoned = _arrays(client_train_round(0, start, state, 1, str(tmp_path)))
    floats = [a for a in poisoned.values() if a.dtype.kind == "f"]
    assert floats and all(np.isnan(a).all() for a in floats)
    healthy = _arrays(client_train_round(1, start, RecordDict(), 1, str(tmp_path)))
    assert all(np.isfinite(a).all() for a in healthy.values() if a.dtype.kind == "f")
    shared_keys = set(split_state(healthy)[0])
    assert set(poisoned) == shared_keys  # the same keys, only the values are poisoned
    with pytest.raises(InjectedFault, match="round 2"):
        client_train_round(0, start, state, 2, str(tmp_path))
    # site1 has no fault: round 2 trains
    site1_round2 = client_train_round(1, start, RecordDict(), 2, str(tmp_path))
    assert _metrics(site1_round2)["num-examples"] > 0


def test_a_new_run_identity_never_loads_the_old_runs_expert(monkeypatch, root, tmp_path):
    """The same run name, another run identity (a new run): the site drops what it kept in
    context.state and in its folder and trains from the server's weights alone; the same
    identity (a resumed run) continues with its expert."""
    import client.app as client_app
    from m4fuse.personal.site_store import SiteStateStore

    _, start = _use(monkeypatch, root, "run_name=identity")
    seen: dict[str, torch.Tensor] = {}
    original = site_steps.train_site

    def spy(model, *args, **kwargs):
        seen.clear()
        seen.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return original(model, *args, **kwargs)

    monkeypatch.setattr(client_app.site_steps, "train_site", spy)

    def train_round(identity: str, rnd: int, state: RecordDict) -> None:
        assert not client_train_round(0, start, state, rnd, str(tmp_path),
                                      identity=identity).has_error()

    state = RecordDict()
    train_round("run-a", 1, state)
    kept = state.array_records["kept"].to_torch_state_dict()
    fresh = settings.build_model(settings.compose("config", [f"root={root}", *TINY_FL]), 1)
    train_round("run-a", 2, state)  # same run: starts from its expert
    assert all(torch.equal(seen[k], kept[k]) for k in kept)
    train_round("run-b", 3, state)  # a new run of the same name: the initial expert
    assert all(torch.equal(seen[k], fresh.state_dict()[k]) for k in kept)
    store = SiteStateStore(tmp_path / "clients" / "site0", "site0")
    assert store.run_identity() == "run-b" and store.rounds() == [3]
    train_round("run-c", 4, RecordDict())  # a restarted client of another run: folder too
    assert all(torch.equal(seen[k], fresh.state_dict()[k]) for k in kept)
    assert store.run_identity() == "run-c" and store.rounds() == [4]


@pytest.mark.parametrize("val_after, kept", [(0.9, True), (0.1, False)])
def test_kept_finetuning_becomes_the_sites_final_state(monkeypatch, root, tmp_path,
                                                       val_after, kept):
    """personal-norm-ft: after the final test's fine-tuning is kept, the last round's state
    file and context.state hold the fine-tuned norms and expert (what the test scored); an
    undone fine-tuning leaves both as they were."""
    from flwr.app import ConfigRecord, Context, MessageType

    import client.app as client_app
    from m4fuse.personal.site_store import newest_kept

    _, start = _use(monkeypatch, root, "run_name=ftsave", "fl.strategy=personal-norm-ft",
                    "fl.finetune_epochs=1")
    state = RecordDict()
    shared = start  # the server's arrays (without the site's norms and expert)
    assert not client_train_round(0, shared, state, 1, str(tmp_path)).has_error()
    folder = tmp_path / "clients" / "site0"
    before = newest_kept(folder)
    assert before is not None and before["round"] == 1
    scores = iter([0.5, val_after])  # validation mean Dice before / after fine-tuning
    monkeypatch.setattr(client_app.personal_finetune, "validate_site",
                        lambda *a, **k: {"dice_mean": next(scores)})
    content = RecordDict({"arrays": shared, "config": ConfigRecord(
        {"server-round": 1, "run-dir": str(tmp_path), "final-test": True})})
    msg = Message(content=content, dst_node_id=1, message_type=MessageType.EVALUATE)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2},
                      state=state, run_config={})
    reply = client_app.evaluate(msg, context)
    assert not reply.has_error() and _metrics(reply)["finetune-kept"] == float(kept)
    # the final test's reply carries the lesion-wise scores beside the voxel-wise ones
    assert 0.0 <= _metrics(reply)["lesion_dice_mean"] <= 1.0 and "lesion_hd95_et" in _metrics(reply)
    after = newest_kept(folder)
    assert after["round"] == 1 and set(after["state"]) == set(before["state"])
    in_context = state.array_records["kept"].to_torch_state_dict()
    assert all(torch.equal(in_context[k], after["state"][k]) for k in after["state"])
    changed = {k for k in before["state"] if not torch.equal(before["state"][k], after["state"][k])}
    if kept:
        assert changed and after["metrics"]["finetune-kept"] == 1.0
        assert any(".norm" in k for k in changed)
    else:
        assert not changed and "finetune-kept" not in after["metrics"]
