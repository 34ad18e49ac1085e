"""Training options for a skewed federation: a fixed number of local optimiser steps
(``fl.local_steps``), the aggregation weight (``fl.aggregation_weight``) and FedNova-style
normalised averaging (``fl.aggregation=fednova``), against hand computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from m4fuse.run import settings
from m4fuse.run.aggregation import fednova_rescale, site_weight, skew_settings
from m4fuse.training import site_steps
from server.strategy import make_strategy
from tests.engine_fixtures import TinyNet, toy_batches

pytestmark = pytest.mark.usefixtures("flower_task_identity")


class CountingLoader:
    """A list of batches that counts how often it is iterated (each pass = a new shuffle)."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches, self.passes = batches, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


@pytest.mark.parametrize("cases, batches", [(1, 1), (5, 3)])
def test_fixed_steps_take_exactly_n_optimiser_steps(cases: int, batches: int) -> None:
    cfg = settings.compose("config", ["train.batch_size=2", "train.warmup_steps=0"])
    model = TinyNet(experts=1)
    loader = CountingLoader(toy_batches(cases, 2, size=8, sites=(0,)))
    assert len(loader) == batches
    taken = []

    trainer, steps_of, steps = site_steps.site_trainer(
        model, loader, cfg, torch.device("cpu"), epochs=1, seed=0, max_steps=7)
    step = trainer.step_optimizer.step

    def counted(*args, **kwargs):
        taken.append(1)
        return step(*args, **kwargs)

    trainer.step_optimizer.step = counted
    out = {**trainer.train_epochs(steps_of), "steps": float(steps)}
    assert len(taken) == 7 and out["steps"] == 7.0
    assert loader.passes == math.ceil(7 / batches)  # passes over the cases again as needed
    assert len(model.seen) == 7  # one forward per step


def test_epochs_unchanged_without_local_steps() -> None:
    cfg = settings.compose("config", ["train.batch_size=2", "train.warmup_steps=0"])
    loader = CountingLoader(toy_batches(5, 2, size=8, sites=(0,)))
    out = site_steps.run_epochs(TinyNet(experts=1), loader, cfg, torch.device("cpu"),
                                epochs=2, seed=0, num_cases=5)
    assert out["steps"] == 6.0 and loader.passes == 2


def test_fixed_steps_refuse_bad_counts() -> None:
    with pytest.raises(ValueError, match="fl.local_steps"):
        site_steps.FixedSteps([1], 0)


def _sites() -> tuple[dict, dict]:
    rng = np.random.default_rng(3)
    ref = {"w": rng.standard_normal((2, 3)).astype(np.float32),
           "count": np.array([4], dtype=np.int64)}
    updates = {f"s{i}": {"w": (ref["w"] + rng.standard_normal((2, 3))).astype(np.float32),
                         "count": np.array([4 + i], dtype=np.int64)} for i in range(3)}
    return ref, updates


def _combine(updates: dict, weights: dict, ref: dict, steps: dict | None = None,
             aggregation: str = "mean", weight: str = "cases") -> dict:
    s = make_strategy("fedavg", len(updates), 1.0, 1, 0.0, ref.keys(),
                      aggregation=aggregation, aggregation_weight=weight)
    w = {k: site_weight(v, weight) for k, v in weights.items()}
    return {k: v.numpy() for k, v in s.combine(1, updates, w, ref, steps).items()}


@pytest.mark.parametrize("weight, expected", [
    ("cases", [1.0, 4.0, 16.0]), ("uniform", [1.0, 1.0, 1.0]), ("sqrt", [1.0, 2.0, 4.0])])
def test_aggregation_weights_against_numpy(weight: str, expected: list[float]) -> None:
    ref, updates = _sites()
    cases = {"s0": 1, "s1": 4, "s2": 16}
    out = _combine(updates, cases, ref, weight=weight)
    stack = np.stack([updates[s]["w"].astype(np.float64) for s in ("s0", "s1", "s2")])
    by_hand = np.average(stack, axis=0, weights=expected)
    np.testing.assert_allclose(out["w"], by_hand, rtol=1e-5, atol=1e-6)


def test_fednova_against_a_hand_worked_example() -> None:
    # two sites, one coordinate, model x = 1: site a (3 cases) moved to 3 in 2 steps,
    # site b (1 case) to 9 in 8 steps. p = (3/4, 1/4); tau_eff = 3/4*2 + 1/4*8 = 3.5;
    # normalised updates 2/2 = 1 and 8/8 = 1; FedNova: 1 + 3.5 * (3/4*1 + 1/4*1) = 4.5
    # (case-weighted FedAvg: 1 + 3/4*2 + 1/4*8 = 4.5 too; with b at 5 (4 in 8 steps): FedNova
    # 1 + 3.5*(3/4*1 + 1/4*0.5) = 4.0625, FedAvg 1 + 1.5 + 1 = 3.5)
    ref = {"w": np.array([1.0], dtype=np.float32)}
    updates = {"a": {"w": np.array([3.0], dtype=np.float32)},
               "b": {"w": np.array([5.0], dtype=np.float32)}}
    steps = {"a": 2.0, "b": 8.0}
    nova = _combine(updates, {"a": 3, "b": 1}, ref, steps, aggregation="fednova")
    assert nova["w"][0] == pytest.approx(4.0625)
    plain = _combine(updates, {"a": 3, "b": 1}, ref, steps)
    assert plain["w"][0] == pytest.approx(3.5)
    # equal steps at every site: FedNova is FedAvg
    same = _combine(updates, {"a": 3, "b": 1}, ref, {"a": 4.0, "b": 4.0}, aggregation="fednova")
    assert same["w"][0] == pytest.approx(3.5)


def test_fednova_leaves_integer_arrays_and_needs_steps() -> None:
    ref, updates = _sites()
    out = fednova_rescale(updates, ref, {s: 1.0 for s in updates}, {s: 2.0 for s in updates})
    assert all(np.array_equal(out[s]["count"], updates[s]["count"]) for s in updates)
    with pytest.raises(ValueError, match="'steps'"):
        fednova_rescale(updates, ref, {s: 1.0 for s in updates}, {"s0": 2.0})


@pytest.mark.parametrize("fl, match", [
    ({"local_steps": 0}, r"fl.local_steps .* got 0"),
    ({"local_steps": 2.5}, r"fl.local_steps .* got 2.5"),
    ({"local_steps": True}, r"fl.local_steps .* got True"),
    ({"aggregation_weight": "median"}, r"fl.aggregation_weight .* got 'median'"),
])
def test_bad_skew_settings_name_key_and_value(fl: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        skew_settings(fl)


@pytest.mark.parametrize("override, match", [
    ("fl.local_steps=-1", "fl.local_steps"), ("fl.aggregation_weight=equal",
                                              "fl.aggregation_weight"),
    ("fl.aggregation=nova", "fl.aggregation")])
def test_bad_skew_settings_fail_when_the_config_is_checked(override: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        settings.compose("config", [override])


def test_defaults_weigh_sites_by_the_square_root_of_their_cases() -> None:
    cfg = settings.compose("config", [])
    assert skew_settings(cfg.fl) == {"aggregation_weight": "sqrt", "local_steps": None}
    assert str(cfg.fl.aggregation) == "mean"


@pytest.mark.parametrize("sites, cases", [(4, 11), (4, 101), (3, 7), (14, 5)])
def test_sites_of_equal_size_aggregate_to_the_same_bits_under_every_weight(sites: int,
                                                                          cases: int) -> None:
    """On equal sites the square-root default changes nothing: the earlier equal-site
    results (case weights) are what the default computes now, to the bit."""
    rng = np.random.default_rng(sites * cases)
    ref = {"w": rng.standard_normal((3, 4)).astype(np.float32)}
    updates = {f"s{i}": {"w": (ref["w"] + rng.standard_normal((3, 4))).astype(np.float32)}
               for i in range(sites)}
    equal = {s: cases for s in updates}
    by_cases = _combine(updates, equal, ref, weight="cases")["w"]
    for weight in ("sqrt", "uniform"):
        np.testing.assert_array_equal(_combine(updates, equal, ref, weight=weight)["w"],
                                      by_cases)


def test_baselines_get_the_fixed_step_budget(tmp_path) -> None:
    """local: fl.local_steps per site and round; pooled: that many x the number of sites."""
    from flower_fixtures import TINY_FL

    from m4fuse.training.baselines import run_baseline
    from simulations.compare.skewed import steps_of_history

    args = [f"root={tmp_path}", *TINY_FL, "fl.rounds=2", "fl.local_steps=3",
            "tracking.enabled=false"]
    local = run_baseline(settings.compose("config", [*args, "run_name=l"]), "local")
    assert steps_of_history(local.history, local.site_names) == {
        s: {"per_round": 3.0, "total": 6.0, "rounds": 2} for s in local.site_names}
    pooled = run_baseline(settings.compose("config", [*args, "run_name=p"]), "pooled")
    assert steps_of_history(pooled.history, pooled.site_names) == {
        "all sites": {"per_round": 6.0, "total": 12.0, "rounds": 2}}
    from m4fuse.run.report import optimiser_steps_metrics

    assert optimiser_steps_metrics(local.history, local.site_names) == {
        f"site{k}/train_steps_total": 6.0 for k in range(len(local.site_names))}
    assert optimiser_steps_metrics(pooled.history, pooled.site_names) == {
        "train_steps_total": 12.0}


def test_federation_with_fixed_steps_and_fednova_reports_each_sites_steps(
        monkeypatch, tmp_path) -> None:
    """One tiny Flower simulation: every site takes exactly fl.local_steps steps per round
    whatever its number of training cases (more steps than one pass over them), the steps go
    from the ClientApp through Flower into the history, and FedNova with sqrt weights
    combines the round."""
    from flower_fixtures import TINY_FL, simulate_two_sites

    from m4fuse.run import workspace

    args = [f"root={tmp_path}", *TINY_FL, "fl.rounds=2", "fl.local_steps=5",
            "fl.aggregation=fednova", "fl.aggregation_weight=sqrt", "tracking.enabled=false",
            "run_name=skew"]
    monkeypatch.setenv(settings.OVERRIDES_ENV, " ".join(args))
    simulate_two_sites()
    cfg = settings.compose("config", args)
    history = json.loads((workspace.run_dir(cfg) / "history.json").read_text())
    assert [e["round"] for e in history] == [1, 2]
    for entry in history:
        assert {int(i): m["steps"] for i, m in entry["train_by_site"].items()} == {0: 5.0,
                                                                                  1: 5.0}


def test_steps_are_listed_in_site_order_whatever_order_the_replies_came_in() -> None:
    """The line under the run table lists sites by index (replies arrive in any order)."""
    from m4fuse.run.report import optimiser_steps

    history = [{"train_by_site": {"2": {"steps": 3}, "0": {"steps": 1}, "1": {"steps": 2}}},
               {"train_by_site": {"1": {"steps": 2}, "2": {"steps": 5}, "0": {"steps": 1}}}]
    steps = optimiser_steps(history, ["a", "b", "c"])
    assert list(steps) == ["a", "b", "c"]
    assert steps["c"] == {"per_round": 4.0, "total": 8.0, "rounds": 2}
