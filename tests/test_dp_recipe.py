"""The DP-SGD recipe (σ planned from a target ε over every step, expected Poisson batch,
refusals in one line), the ε column of the per-site table, and the public pre-trained start
(``fl.init_checkpoint``)."""

from __future__ import annotations

import json

import nibabel as nib
import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader, Dataset

from m4fuse.io.checkpoint import save_checkpoint
from m4fuse.nets.model import M4Fuse, M4FuseConfig
from m4fuse.personal.sets import expert_state, is_personal, split_state
from m4fuse.run import report, settings
from m4fuse.run.config_check import ConfigError
from m4fuse.training.dp import (
    PrivacyBudgetExhausted,
    PrivacyConfig,
    PrivacyPlanError,
    make_private_training,
    plan_site,
)
from tests.engine_fixtures import TINY_OVERRIDES


def _rdp_epsilon(sigma: float, rate: float, steps: int, delta: float) -> float:
    """ε of ``steps`` Poisson steps at ``sigma`` and ``rate`` from a fresh Opacus RDP
    accountant stepped once per step (the independent oracle)."""
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=rate)
    return accountant.get_epsilon(delta=delta)


# --------------------------------------------------------------------------- planning


def test_sigma_planned_from_target_epsilon_meets_it_by_the_rdp_accountant() -> None:
    cfg = PrivacyConfig(enabled=True, noise_multiplier=None, target_epsilon=3.0, expected_batch=16)
    plan = plan_site(cfg, 100, batch_size=2, rounds=10, local_epochs=1, local_steps=3)
    # hand-worked: q = 16 / 100, 10 rounds x 3 steps, δ = 1 / (10 x 100)
    assert plan.sample_rate == pytest.approx(0.16)
    assert (plan.steps_per_round, plan.total_steps) == (3, 30)
    assert plan.delta == pytest.approx(1e-3)
    eps = _rdp_epsilon(plan.noise_multiplier, 0.16, 30, 1e-3)
    assert 3.0 - 0.05 <= eps <= 3.0
    # the smallest σ that fits: 3 % less noise overspends
    assert _rdp_epsilon(plan.noise_multiplier * 0.97, 0.16, 30, 1e-3) > 3.0


def test_steps_per_round_without_local_steps_are_epochs_of_one_over_q() -> None:
    cfg = PrivacyConfig(enabled=True, noise_multiplier=None, target_epsilon=10.0, expected_batch=20)
    plan = plan_site(cfg, 100, batch_size=2, rounds=4, local_epochs=2)
    assert (plan.steps_per_round, plan.total_steps) == (10, 40)  # 2 epochs x 100 / 20
    plain = plan_site(PrivacyConfig(enabled=True), 11, batch_size=2, rounds=3, local_epochs=1)
    # a plain privacy.enabled=true: fixed σ 1.0, ceil(11 / 2) = 6 steps at q = 1 / 6
    assert plain.noise_multiplier == 1.0 and plain.sample_rate == pytest.approx(1 / 6)
    assert plain.total_steps == 18


def test_an_unreachable_target_fails_in_one_line_with_the_sigma_and_steps_that_fit() -> None:
    cfg = PrivacyConfig(enabled=True, noise_multiplier=None, target_epsilon=0.5, expected_batch=8)
    with pytest.raises(PrivacyPlanError) as caught:
        plan_site(cfg, 11, batch_size=2, rounds=60, local_epochs=1, local_steps=2, site="s0")
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith("privacy.target_epsilon=0.5 cannot be met at site s0")
    assert "privacy.max_noise_multiplier=10" in text
    fits = int(text.split("at most ")[1].split(" steps")[0])
    # independent: at σ = 10, q = 8 / 11, δ = 1 / 110, `fits` steps stay within 0.5, one more not
    q, delta = 8 / 11, 1 / 110
    assert fits < 120
    if fits:
        assert _rdp_epsilon(10.0, q, fits, delta) <= 0.5
    assert _rdp_epsilon(10.0, q, fits + 1, delta) > 0.5
    needed = float(text.split("it needs σ=")[1].split(",")[0])
    assert needed > 10 and _rdp_epsilon(needed, q, 120, delta) <= 0.5 + 0.01


def test_an_expected_batch_above_the_cases_is_refused_naming_the_key() -> None:
    cfg = PrivacyConfig(enabled=True, noise_multiplier=None, target_epsilon=10.0, expected_batch=16)
    with pytest.raises(PrivacyPlanError, match=r"privacy.expected_batch=16 exceeds the 11 "
                                               r"training cases of site s1.*<= 11"):
        plan_site(cfg, 11, batch_size=2, rounds=2, local_epochs=1, site="s1")


# --------------------------------------------------------------------------- DP-SGD engine


class _Volumes(Dataset):
    def __init__(self, n: int, size: int = 8) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(500 + i)
        s = self.size
        return {"image": torch.randn(4, s, s, s, generator=g),
                "label": (torch.rand(3, s, s, s, generator=g) > 0.7).float(),
                "site": torch.tensor(0), "case": f"case{i}"}


def _tiny_model(seed: int = 0) -> M4Fuse:
    torch.manual_seed(seed)
    return M4Fuse(M4FuseConfig(widths=[8] * 6, dropout=0.0, mixer_groups=1))


def _steps(private, count: int) -> None:
    done = 0
    while done < count:
        for batch in private.loader:
            private.optimizer.zero_grad()
            if batch["image"].shape[0] == 0:
                from m4fuse.training.dp import noise_only_step
                noise_only_step(private.optimizer)
            else:
                logits = private.module(batch["image"], batch["site"])
                F.binary_cross_entropy_with_logits(logits, batch["label"]).backward()
                private.optimizer.step()
            done += 1
            if done == count:
                return


def test_expected_batch_is_accounted_at_its_rate_and_personal_layers_train_under_dp() -> None:
    """A given rate q = 3 / 6 is what the accountant records (not 1 / len(loader)); the noisy
    average divides by n·q; the norms and the expert are among the DP optimiser's parameters
    and move (trained under the same DP-SGD, inside the accounting)."""
    model = _tiny_model()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    cfg = PrivacyConfig(enabled=True, noise_multiplier=0.5, expected_batch=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    private = make_private_training(model, opt, DataLoader(_Volumes(6), batch_size=2), cfg,
                                    seed=3, sample_rate=0.5)
    dp_params = {id(p) for p in private.optimizer.params}
    personal = [n for n, _ in model.named_parameters() if is_personal(n, "norms")]
    assert personal and any(".site_experts." in n for n in personal)
    assert all(id(p) in dp_params for n, p in model.named_parameters() if n in personal)
    assert private.optimizer.expected_batch_size == pytest.approx(3.0)
    _steps(private, 3)
    assert private.accountant_state()["sample_rate"] == [0.5]
    assert private.steps() == 3
    delta = 1 / 60
    assert private.epsilon() == pytest.approx(_rdp_epsilon(0.5, 0.5, 3, delta), rel=1e-9)
    private.close()
    moved = [n for n in personal
             if not torch.equal(dict(model.named_parameters())[n].detach(), before[n])]
    assert set(moved) == set(personal)


def test_a_site_past_its_planned_steps_refuses_in_one_line() -> None:
    cfg = PrivacyConfig(enabled=True, noise_multiplier=None, target_epsilon=5.0)
    state = {"mechanism": "rdp", "noise_multiplier": [2.0], "sample_rate": [0.5], "steps": [4]}
    opt_model = _tiny_model()
    with pytest.raises(PrivacyBudgetExhausted) as caught:
        make_private_training(opt_model, torch.optim.SGD(opt_model.parameters(), lr=0.1),
                              DataLoader(_Volumes(4), batch_size=2), cfg,
                              accountant_state=state, total_steps=4)
    text = str(caught.value)
    assert "\n" not in text and "refuses to train this round" in text
    assert "privacy.target_epsilon=5" in text and "4 DP steps" in text
    eps = _rdp_epsilon(2.0, 0.5, 4, 1 / 40)
    assert f"ε={eps:.2f}" in text


def test_privacy_dp_is_the_recipe_and_privacy_enabled_keeps_the_fixed_sigma() -> None:
    recipe = settings.compose("config", ["privacy=dp"])
    assert recipe.privacy.target_epsilon == 10.0 and recipe.privacy.noise_multiplier is None
    assert recipe.privacy.expected_batch == 8 and recipe.fl.local_steps == 2
    assert recipe.privacy.lr == 0.001  # tuned for the noise, below train.lr
    assert recipe.privacy.lr < recipe.train.lr
    assert recipe.fl.strategy == "personal-norm"  # no fine-tuning outside DP-SGD
    # the command line still wins over the recipe
    mine = settings.compose("config", ["privacy=dp", "fl.strategy=personal", "fl.local_steps=1"])
    assert (mine.fl.strategy, mine.fl.local_steps) == ("personal", 1)
    plain = settings.compose("config", ["privacy.enabled=true", "fl.strategy=personal-norm"])
    from client.app import privacy_config

    assert privacy_config(plain) == PrivacyConfig(enabled=True)
    assert privacy_config(plain).noise_multiplier == 1.0


# --------------------------------------------------------------------------- table


def test_the_per_site_table_gets_the_epsilon_each_site_spent() -> None:
    history = [
        {"train_by_site": {0: {"dp-epsilon": 1.5, "dp-delta": 0.01},
                           1: {"dp-epsilon": 1.2, "dp-delta": 0.005}}},
        {"train_by_site": {0: {"dp-epsilon": 2.25, "dp-delta": 0.01}}},  # site 1 refused
    ]
    spent = report.privacy_spent(history)
    assert spent == {0: {"dp_epsilon": 2.25, "dp_delta": 0.01},
                     1: {"dp_epsilon": 1.2, "dp_delta": 0.005}}
    val = {0: {"dice_mean": 0.5, "num-examples": 2}, 1: {"dice_mean": 0.4, "num-examples": 2}}
    rows = report.site_rows(["a", "b"], val, {}, privacy=spent)
    table = report.markdown_table(rows)
    header = table.splitlines()[0]
    assert "ε spent" in header and "| δ |" in header
    first = table.splitlines()[2]
    assert "| 2.250 | 0.01 |" in first
    without = report.markdown_table(report.site_rows(["a", "b"], val, {}))
    assert "ε spent" not in without


# --------------------------------------------------------------------------- pre-trained start


def _write_checkpoint(cfg, path, seed: int, sites=("public",)) -> dict[str, torch.Tensor]:
    model = settings.build_model(cfg, num_experts=1, seed=seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shared, personal = split_state(state)
    save_checkpoint(path, settings.model_config(cfg, num_experts=1), shared,
                    {s: expert_state(personal, 0) for s in sites}, size=list(cfg.data.size))
    return state


def test_the_federation_and_the_baselines_start_from_the_checkpoint(tmp_path) -> None:
    from server.runner import initial_state

    base = settings.compose("config", [*TINY_OVERRIDES, "fl.strategy=personal-norm"])
    path = tmp_path / "public" / "model.ckpt"
    saved = _write_checkpoint(base, path, seed=123)
    cfg = settings.compose("config", [*TINY_OVERRIDES, "fl.strategy=personal-norm",
                                      f"fl.init_checkpoint={path}"])
    held, full = initial_state(cfg)
    # the server's round-1 arrays are the checkpoint's shared weights (norms stay at sites)
    assert held and all(torch.equal(held[k], saved[k]) for k in held)
    # a site's model in round 1: the checkpoint's norms and expert too
    assert set(full) == set(saved) and all(torch.equal(full[k], saved[k]) for k in full)
    fresh = settings.compose("config", [*TINY_OVERRIDES, "fl.strategy=personal-norm"])
    assert not all(torch.equal(v, saved[k])
                   for k, v in settings.build_model(fresh, 1).state_dict().items())
    # the pooled baseline's model: every expert slot from the reference expert
    pooled = settings.build_model(cfg, num_experts=2).state_dict()
    for index in (0, 1):
        expert = expert_state(pooled, index)
        assert expert and all(torch.equal(v, expert_state(saved, 0)[k]) for k, v in expert.items())


def test_the_reference_expert_is_the_first_site_of_a_multi_site_checkpoint(tmp_path) -> None:
    base = settings.compose("config", list(TINY_OVERRIDES))
    path = tmp_path / "pooled.ckpt"
    model = settings.build_model(base, num_experts=2, seed=7)
    state = model.state_dict()
    shared, personal = split_state(state)
    save_checkpoint(path, settings.model_config(base, num_experts=1), shared,
                    {"site1": expert_state(personal, 1), "site0": expert_state(personal, 0)})
    cfg = settings.compose("config", [*TINY_OVERRIDES, f"fl.init_checkpoint={path}"])
    built = settings.build_model(cfg, num_experts=1).state_dict()
    assert all(torch.equal(v, expert_state(state, 0)[k])
               for k, v in expert_state(built, 0).items())


@pytest.mark.parametrize("problem", ["missing", "widths", "not-a-checkpoint", "relative"])
def test_a_bad_init_checkpoint_fails_in_one_line_naming_the_key(tmp_path, problem) -> None:
    if problem == "missing":
        value, words = str(tmp_path / "nope.ckpt"), ["no checkpoint file or run folder"]
    elif problem == "widths":
        wide = settings.compose("config", [*TINY_OVERRIDES, "model.widths=[8,8,8,8,8,8]"])
        _write_checkpoint(wide, tmp_path / "wide.ckpt", seed=1)
        value, words = str(tmp_path / "wide.ckpt"), ["another network", "widths"]
    elif problem == "not-a-checkpoint":
        (tmp_path / "junk.ckpt").write_bytes(b"not torch")
        value, words = str(tmp_path / "junk.ckpt"), ["not a readable M4Fuse checkpoint"]
    else:
        value, words = "runs/public/model.ckpt", ["not an absolute path"]
    with pytest.raises(ConfigError) as caught:
        settings.compose("config", [*TINY_OVERRIDES, f"fl.init_checkpoint={value}"])
    text = str(caught.value)
    assert "\n" not in text and text.startswith(f"fl.init_checkpoint={value}")
    for word in words:
        assert word in text


def test_the_public_reference_set_draws_cases_no_site_has(tmp_path) -> None:
    from m4fuse.data import synthesize

    fed = synthesize(tmp_path / "fed", sites=1, cases_per_site=1, seed=0, shape=(16, 16, 16),
                     progress=False)
    pub = synthesize(tmp_path / "pub", sites=1, cases_per_site=1, seed=0, shape=(16, 16, 16),
                     progress=False, names=["public"], salt=1)
    (case,) = fed
    assert pub == {case: "public"}  # the same case id, another draw
    a = nib.load(tmp_path / "fed" / case / f"{case}_t1.nii.gz").get_fdata()
    b = nib.load(tmp_path / "pub" / case / f"{case}_t1.nii.gz").get_fdata()
    assert not (a == b).all()
    # the same reference scanner (site 0's acquisition)
    acq_fed = json.loads((tmp_path / "fed" / "acquisition.json").read_text())["sites"]
    acq_pub = json.loads((tmp_path / "pub" / "acquisition.json").read_text())["sites"]
    assert acq_fed["site0"] == acq_pub["public"]
    cfg = settings.compose("config", ["data=public_reference"])
    assert (cfg.data.sites, list(cfg.data.site_names), cfg.data.seed_salt) == (1, ["public"], 1)
    assert int(cfg.data.cases_per_site) >= 100


def test_the_public_pretraining_stage_feeds_a_federation(tmp_path) -> None:
    """Stage 1, a pooled run on data=public_reference (tiny), writes model.ckpt with one
    expert, "public"; stage 2, a federation with fl.init_checkpoint on that run folder, starts
    from exactly those weights."""
    from m4fuse.io.checkpoint import load_checkpoint
    from m4fuse.training.baselines import run_baseline
    from server.runner import initial_state

    common = [f"root={tmp_path}", *TINY_OVERRIDES, "fl.rounds=1", "tracking.enabled=false"]
    public = settings.compose("config", [*common, "data=public_reference",
                                         "data.sites=1", "data.cases_per_site=6",
                                         "run_name=public"])
    summary = run_baseline(public, "pooled")
    saved = load_checkpoint(summary.run_dir)
    assert saved.sites == ["public"]
    fed = settings.compose("config", [*common, "fl.strategy=personal",
                                      f"fl.init_checkpoint={summary.run_dir}"])
    held, full = initial_state(fed)
    assert all(torch.equal(held[k], saved.shared[k]) for k in held)
    assert all(torch.equal(v, saved.experts["public"][k])
               for k, v in expert_state(full, 0).items())


def test_bad_privacy_values_are_refused_when_the_config_is_composed():
    # before any data or training: the privacy group is read into PrivacyConfig at compose
    from m4fuse.run import settings

    with pytest.raises(ValueError, match=r"^privacy\.target_epsilon .*-1"):
        settings.compose("config", ["privacy=dp", "privacy.target_epsilon=-1"])
    with pytest.raises(ValueError, match=r"^privacy\.max_noise_multiplier .*0"):
        settings.compose("config", ["privacy=dp", "privacy.max_noise_multiplier=0"])
    assert settings.compose("config", ["privacy=dp"]).privacy.target_epsilon == 10.0
