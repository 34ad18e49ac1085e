"""DP-SGD with Opacus on the M4Fuse network (m4fuse/training/dp.py). Tiny widths, 16³ volumes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord
from opacus.optimizers import DPOptimizer
from torch.utils.data import DataLoader, Dataset

from m4fuse.nets.model import M4Fuse, M4FuseConfig, Mamba, SkipScale
from m4fuse.training.dp import (
    PrivacyBudgetExhausted,
    PrivacyConfig,
    SiteModel,
    accountant_from_record,
    epsilon_of,
    make_private_training,
    noise_only_step,
    plan_noise_multiplier,
    poisson_loader,
    prepare_for_opacus,
    resolve_delta,
)

SIZE = 16
WIDTHS = [8, 8, 8, 8, 8, 8]


class Volumes(Dataset):
    """Deterministic random cases in the loader's dict layout (with string case ids)."""

    def __init__(self, n: int, size: int = SIZE) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(1000 + i)
        s = self.size
        return {
            "image": torch.randn(4, s, s, s, generator=g),
            "label": (torch.rand(3, s, s, s, generator=g) > 0.7).float(),
            "site": torch.tensor(0),
            "case": f"case{i}",
        }


def _model(seed: int = 0, dropout: float = 0.0, dtype: torch.dtype = torch.float32,
           groups: int = 4) -> M4Fuse:
    """Tiny M4Fuse; ``groups=1`` (one Mamba call per mixer) where only the accounting matters."""
    torch.manual_seed(seed)
    cfg = M4FuseConfig(widths=WIDTHS, dropout=dropout, mixer_groups=groups)
    return M4Fuse(cfg).to(dtype)


def _batch(n: int, dtype: torch.dtype = torch.float32, size: int = SIZE
           ) -> tuple[torch.Tensor, torch.Tensor]:
    ds = Volumes(n, size)
    x = torch.stack([ds[i]["image"] for i in range(n)]).to(dtype)
    y = torch.stack([ds[i]["label"] for i in range(n)]).to(dtype)
    return x, y


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # per-sample decomposable (mean over the batch of per-sample means), as DP-SGD needs
    return F.binary_cross_entropy_with_logits(logits, target)


def _per_sample_grads(model: M4Fuse, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Reference: one ordinary backward per case."""
    out = []
    for i in range(x.shape[0]):
        model.zero_grad()
        _loss(model(x[i : i + 1], torch.zeros(1, dtype=torch.long)), y[i : i + 1]).backward()
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    return out


def _cfg(**kw) -> PrivacyConfig:
    return PrivacyConfig(enabled=True, **kw)


# --------------------------------------------------------------------------- config


def test_config_checks_and_delta_rule() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        PrivacyConfig(noise_multiplier=1.0, target_epsilon=3.0)
    with pytest.raises(ValueError, match="exactly one"):
        PrivacyConfig(noise_multiplier=None)
    with pytest.raises(ValueError, match="max_grad_norm.*0"):
        PrivacyConfig(max_grad_norm=0)
    with pytest.raises(ValueError, match="'gdp'"):
        PrivacyConfig(accountant="gdp")
    with pytest.raises(KeyError, match="'sigma'"):
        PrivacyConfig.from_mapping({"sigma": 1.0})
    cfg = PrivacyConfig.from_mapping({"enabled": True, "target_epsilon": 4.0})
    assert cfg.noise_multiplier is None and cfg.target_epsilon == 4.0
    assert resolve_delta(PrivacyConfig(), 40) == pytest.approx(1 / 400)
    assert resolve_delta(PrivacyConfig(delta=1e-5), 40) == 1e-5
    with pytest.raises(ValueError, match="n_cases.*0"):
        resolve_delta(PrivacyConfig(), 0)
    with pytest.raises(ValueError, match="enabled = false"):
        make_private_training(_model(), torch.optim.SGD(_model().parameters(), lr=0.1),
                              DataLoader(Volumes(2)), PrivacyConfig())


# --------------------------------------------------------------------------- model


def test_site_model_routes_to_its_expert_only() -> None:
    model = _model()
    site = SiteModel(model, 0)
    x, _ = _batch(2)
    torch.testing.assert_close(site(x), model(x, torch.zeros(2, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"expert indices \[1\]"):
        site(x, torch.tensor([0, 1]))
    two = M4Fuse(M4FuseConfig(widths=WIDTHS, num_experts=2))
    with pytest.raises(ValueError, match="exactly one expert.*got 2"):
        SiteModel(two, 0)


def test_per_sample_gradients_match_one_backward_per_case() -> None:
    """Opacus' per-sample gradients over the whole network (GroupNorm, Mamba with A_log/D,
    depthwise conv1d, skip scale, bridge, expert) equal per-case backward passes."""
    dtype = torch.float64
    model, ref = _model(dtype=dtype), _model(dtype=dtype)
    x, y = _batch(2, dtype)
    expected = _per_sample_grads(ref, x, y)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    private = make_private_training(model, opt, DataLoader(Volumes(2)), _cfg(noise_multiplier=0.0))
    _loss(private.module(x, torch.zeros(2, dtype=torch.long)), y).backward()
    for name, p in model.named_parameters():
        assert p.grad_sample.shape == (2, *p.shape), name
        for i in range(2):
            torch.testing.assert_close(p.grad_sample[i], expected[i][name], rtol=1e-4, atol=1e-9,
                                       msg=lambda m, n=name, i=i: f"{n} sample {i}: {m}")
    private.close()


def test_leaf_grad_samplers_cover_the_raw_parameter_modules() -> None:
    from opacus import GradSampleModule

    from m4fuse.training.dp import leaf_loop_grad_sampler, register_grad_samplers

    covered = register_grad_samplers(_model())
    assert set(covered) == {Mamba, SkipScale}
    assert GradSampleModule.GRAD_SAMPLERS[Mamba] is leaf_loop_grad_sampler
    with pytest.raises(TypeError, match="child modules"):
        leaf_loop_grad_sampler(torch.nn.Sequential(torch.nn.Linear(2, 2)), [torch.zeros(1, 2)],
                               torch.zeros(1, 2))


def test_clipping_and_zero_noise_reproduce_clipped_sgd() -> None:
    """σ = 0: the DP step is SGD on the sum of per-case gradients, each clipped to C, divided
    by the expected batch size; every clipped per-case gradient has norm <= C."""
    clip, lr, n = 1e-3, 0.5, 2
    model, ref = _model(groups=2), _model(groups=2)
    x, y = _batch(n, size=8)
    grads = _per_sample_grads(ref, x, y)
    names = [k for k, _ in ref.named_parameters()]
    norms = [math.sqrt(sum(float(g[k].double().pow(2).sum()) for k in names)) for g in grads]
    assert min(norms) > 10 * clip  # the bound really clips
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    # 4 cases at batch 2: q = 1/2, expected batch 2
    private = make_private_training(model, opt, DataLoader(Volumes(4), batch_size=2),
                                    _cfg(noise_multiplier=0.0, max_grad_norm=clip))
    _loss(private.module(x), y).backward()
    private.optimizer.step()
    # clipped norms from Opacus' own per-sample gradients
    flat = torch.cat([p.grad_sample.reshape(n, -1) for p in model.parameters()], 1)
    factors = (clip / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)
    assert torch.all((flat * factors[:, None]).norm(dim=1) <= clip * (1 + 1e-5))
    for k, p in model.named_parameters():
        summed = sum(grads[i][k] * min(1.0, clip / (norms[i] + 1e-6)) for i in range(n))
        torch.testing.assert_close(p.detach(), start[k] - lr * summed / 2, rtol=1e-3, atol=1e-7,
                                   msg=lambda m, k=k: f"{k}: {m}")
    private.close()


def _noisy_update(seed: int, sigma: float, clip: float = 1e-3) -> torch.Tensor:
    model = _model(groups=1)
    start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    private = make_private_training(
        model, torch.optim.SGD(model.parameters(), lr=1.0), DataLoader(Volumes(4), batch_size=2),
        _cfg(noise_multiplier=sigma, max_grad_norm=clip), seed=seed,
    )
    x, y = _batch(2, size=8)
    _loss(private.module(x), y).backward()
    private.optimizer.step()
    private.close()
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - start


def test_noise_is_added_and_seeded() -> None:
    sigma, clip = 2.0, 1e-3
    clean = _noisy_update(0, 0.0, clip)
    a, b, a2 = _noisy_update(1, sigma, clip), _noisy_update(2, sigma, clip), _noisy_update(1, sigma, clip)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, a2)
    # per coordinate: noise N(0, (σC)^2) on the sum, divided by the expected batch (2)
    noise = a - clean
    assert noise.numel() > 10_000
    assert float(noise.std()) == pytest.approx(sigma * clip / 2, rel=0.05)
    assert abs(float(noise.mean())) < 0.05 * sigma * clip


# --------------------------------------------------------------------------- loader


def test_poisson_loader_samples_with_rate_q_and_builds_empty_batches() -> None:
    ds = Volumes(10, size=2)
    plain = DataLoader(ds, batch_size=5)
    loader = poisson_loader(plain, torch.Generator().manual_seed(0))
    assert len(loader) == 2  # q = 1/2
    sizes = [len(b["case"]) for _ in range(200) for b in loader]
    mean = sum(sizes) / len(sizes)
    assert mean == pytest.approx(5.0, abs=0.3)  # n q
    assert len(set(sizes)) > 4  # variable batch sizes: not the fixed-size loader
    tiny = poisson_loader(DataLoader(Volumes(3, size=2), batch_size=1), torch.Generator().manual_seed(0))
    empties = [b for _ in range(50) for b in tiny if len(b["case"]) == 0]
    assert empties, "with q=1/3 and 3 cases, (2/3)^3 of batches are empty"
    e = empties[0]
    assert e["image"].shape == (0, 4, 2, 2, 2) and e["case"] == [] and e["site"].shape == (0,)


def test_training_loop_uses_poisson_batches() -> None:
    model = _model()
    private = make_private_training(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                    DataLoader(Volumes(6), batch_size=2), _cfg(), seed=3)
    assert private.sample_rate == pytest.approx(1 / 3)
    assert type(private.loader.batch_sampler).__name__ == "UniformWithReplacementSampler"
    private.close()


# --------------------------------------------------------------------------- accounting


def _train_round(model: M4Fuse, cfg: PrivacyConfig, state, total_epochs, seed, n=4, batch=2):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    private = make_private_training(model, opt, DataLoader(Volumes(n, size=8), batch_size=batch),
                                    cfg, total_epochs=total_epochs, accountant_state=state,
                                    seed=seed)
    for b in private.loader:  # one epoch, as the engine's loop does it
        if b["image"].shape[0] == 0:
            noise_only_step(private.optimizer)
            continue
        private.optimizer.zero_grad()
        _loss(private.module(b["image"], b["site"]), b["label"]).backward()
        private.optimizer.step()
    out = private.epsilon(), private.accountant_state(), private.steps()
    private.close()
    return out


def test_epsilon_grows_across_rounds_with_restored_state() -> None:
    cfg = _cfg(noise_multiplier=1.0, max_grad_norm=1.0)
    eps1, state1, steps1 = _train_round(_model(groups=1), cfg, None, None, seed=1)
    assert steps1 == 2 and eps1 > 0
    # the state travels through a Flower ConfigRecord (context.state) between rounds
    record = ConfigRecord(state1)
    eps2, state2, steps2 = _train_round(_model(groups=1), cfg, record, None, seed=2)
    assert steps2 == 4 and eps2 > eps1
    # same as one accountant that took all 4 steps
    delta = resolve_delta(cfg, 4)
    one = {"mechanism": "rdp", "noise_multiplier": [1.0], "sample_rate": [0.5], "steps": [4]}
    assert eps2 == pytest.approx(epsilon_of(one, delta), rel=1e-9)
    assert epsilon_of(state2, delta) == pytest.approx(eps2)
    assert accountant_from_record(state2).history == [(1.0, 0.5, 4)]
    with pytest.raises(ValueError, match="'prv'"):
        _train_round(_model(groups=1), _cfg(accountant="prv"), state2, None, seed=3)


def test_target_epsilon_is_met_at_the_end_of_the_budget() -> None:
    target = 3.0
    cfg = _cfg(noise_multiplier=None, target_epsilon=target)
    eps1, state, _ = _train_round(_model(groups=1), cfg, None, total_epochs=2, seed=1)
    eps2, state, steps = _train_round(_model(groups=1), cfg, state, total_epochs=2, seed=2)
    assert steps == 4
    assert eps1 < eps2 <= target
    assert eps2 >= target - 0.1  # σ is the smallest that fits (Opacus tolerance 0.01)
    with pytest.raises(PrivacyBudgetExhausted, match="4 DP steps.*planned for 4"):
        _train_round(_model(groups=1), cfg, state, total_epochs=2, seed=3)


def test_target_epsilon_resumed_with_more_rounds_plans_on_what_is_left() -> None:
    """A run planned for 1 epoch spends the whole budget in it; resumed with 3 epochs in all,
    σ is planned on the 4 steps left, so the total never exceeds the target and ε only
    grows (planning the 6 steps from scratch would overspend: round 1 used a small σ)."""
    target = 3.0
    cfg = _cfg(noise_multiplier=None, target_epsilon=target)
    eps1, state, steps = _train_round(_model(groups=1), cfg, None, total_epochs=1, seed=1)
    assert steps == 2 and target - 0.1 <= eps1 <= target
    sigma1 = state["noise_multiplier"][0]
    eps2, state, _ = _train_round(_model(groups=1), cfg, state, total_epochs=3, seed=2)
    eps3, state, steps = _train_round(_model(groups=1), cfg, state, total_epochs=3, seed=3)
    assert steps == 6
    assert eps1 <= eps2 <= eps3 <= target
    assert min(state["noise_multiplier"][1:]) > sigma1  # the rest of the budget is small
    scratch = accountant_from_record({"mechanism": "rdp", "noise_multiplier": [sigma1],
                                      "sample_rate": [0.5], "steps": [2]})
    scratch.history.append((plan_noise_multiplier(target, 0.025, 0.5, 6, [], "rdp"), 0.5, 4))
    assert scratch.get_epsilon(delta=0.025) > target  # what the old plan would have spent


def test_plan_noise_multiplier_refuses_a_spent_budget() -> None:
    spent = [(0.5, 0.5, 20)]
    with pytest.raises(PrivacyBudgetExhausted, match="already spent"):
        plan_noise_multiplier(1.0, 1e-5, 0.5, 2, spent, "rdp")
    # with no history it is Opacus' get_noise_multiplier
    from opacus.accountants.utils import get_noise_multiplier
    assert plan_noise_multiplier(2.0, 1e-5, 0.5, 4, [], "rdp") == pytest.approx(
        get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5, sample_rate=0.5, steps=4,
                             accountant="rdp"))


def test_prv_accountant_state_round_trip() -> None:
    """The PRV accountant restores from a record like RDP and gives a smaller ε here."""
    rec = {"mechanism": "prv", "noise_multiplier": [1.0, 1.0], "sample_rate": [0.5, 0.5],
           "steps": [2, 2]}
    eps_prv = epsilon_of(rec, 1e-3)
    eps_rdp = epsilon_of({**rec, "mechanism": "rdp"}, 1e-3)
    assert 0 < eps_prv < eps_rdp
    assert epsilon_of(None, 1e-3) == 0.0
    with pytest.raises(ValueError, match="2 noise_multiplier, 1 sample_rate"):
        accountant_from_record({**rec, "sample_rate": [0.5]})


def test_noise_only_step_on_empty_batch_is_noise_and_accounted() -> None:
    model = _model(groups=1)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    private = make_private_training(model, torch.optim.SGD(model.parameters(), lr=1.0),
                                    DataLoader(Volumes(4), batch_size=2),
                                    _cfg(noise_multiplier=1.0, max_grad_norm=0.1), seed=0)
    noise_only_step(private.optimizer)
    change = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    assert private.steps() == 1
    assert float(change.std()) == pytest.approx(1.0 * 0.1 / 2, rel=0.05)
    assert isinstance(private.optimizer, DPOptimizer)
    with pytest.raises(TypeError, match="SGD"):
        noise_only_step(torch.optim.SGD(model.parameters(), lr=1.0))
    private.close()


def test_private_trainer_runs_the_projects_loop_under_dp() -> None:
    """The project's own training loop (AdamW, schedule, Dice+BCE) in the DP trainer, which
    wraps model, optimiser and loader with Opacus and leaves a plain network after close."""
    from m4fuse.training.dp import PrivateRound, PrivateTrainer
    from m4fuse.training.engine import TrainConfig

    model = _model(dropout=0.2, groups=1)
    tcfg = TrainConfig(amp=False, grad_clip=0.0, local_epochs=1, seed=0)
    dp = PrivateRound(_cfg(noise_multiplier=0.5), seed=0)
    trainer = PrivateTrainer.scheduled(model, tcfg, 4, device="cpu", expert=0, dp=dp)
    # 8 cases at batch 4: q = 1/2, P(empty batch) = 2^-8; the seed below gives none
    batches = trainer.prepare(DataLoader(Volumes(8, size=8), batch_size=4))
    assert isinstance(trainer.step_optimizer, DPOptimizer) and dp.training is not None
    before = [p.detach().clone() for p in model.parameters()]
    out = trainer.train_epochs(batches)
    trainer.close()
    assert math.isfinite(out["loss"]) and dp.training.steps() == 2
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert 0 < dp.training.metrics()["dp-epsilon"] < math.inf
    assert set(trainer.optimizer_state()) == {n for n, _ in model.named_parameters()}
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_validator_rejects_batchnorm() -> None:
    bad = torch.nn.Sequential(torch.nn.Conv3d(4, 4, 1), torch.nn.BatchNorm3d(4))
    with pytest.raises(ValueError, match="BatchNorm"):
        prepare_for_opacus(bad)


# --------------------------------------------------------------------------- SecAgg+


@pytest.fixture
def task_identity():
    """Flower needs a task identity to build Messages outside a run; restore it afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 7
    yield
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = saved


def test_secaggplus_mod_does_not_speak_the_message_api(task_identity) -> None:
    """docs/privacy.md: Flower 1.42's SecAgg+ client mod fails on this app's messages."""
    import numpy as np
    from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import (
        RECORD_KEY_CONFIGS,
        RECORD_KEY_STATE,
        Key,
        Stage,
    )

    def train(msg: Message, ctx: Context) -> Message:  # an @app.train() style reply
        return Message(RecordDict({"arrays": ArrayRecord([np.ones(3, np.float32)]),
                                   "metrics": MetricRecord({"num-examples": 4})}), reply_to=msg)

    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    arrays = ArrayRecord([np.zeros(3, np.float32)])
    # what a flwr.serverapp.strategy sends: "arrays" + "config"
    msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=7, message_type=MessageType.TRAIN)
    with pytest.raises(KeyError, match=RECORD_KEY_CONFIGS):
        secaggplus_mod(msg, ctx, train)
    # the masking stage of the legacy workflow, answered by an @app.train() handler
    ctx.state.config_records[RECORD_KEY_STATE] = ConfigRecord({"current_stage": Stage.SHARE_KEYS})
    stage = ConfigRecord({Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: [],
                          Key.SOURCE_LIST: []})
    msg = Message(RecordDict({"arrays": arrays, RECORD_KEY_CONFIGS: stage}),
                  dst_node_id=7, message_type=MessageType.TRAIN)
    with pytest.raises(KeyError, match="fitres.parameters"):
        secaggplus_mod(msg, ctx, train)
