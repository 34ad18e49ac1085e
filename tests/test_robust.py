"""Update checks (server/robust.py) and the Flower rules that combine what passed them
(server/strategy.py: FedAvg, FedTrimmedAvg, FedMedian, Krum, MultiKrum), against hand
computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAdam, FedAvgM, Krum, MultiKrum

from m4fuse.run import settings
from m4fuse.run.aggregation import aggregation_settings, krum_needed
from server.combiner import make_combiner
from server.robust import (
    QuorumError,
    check_quorum,
    check_update,
    norm_outliers,
    reference_spec,
    screen_updates,
    update_norm,
)
from server.strategy import make_strategy

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _model(value: float = 0.0) -> dict[str, np.ndarray]:
    return {
        "enc.weight": np.full((2, 3), value, dtype=np.float32),
        "enc.bias": np.full((2,), value, dtype=np.float32),
    }


REF = reference_spec(_model())


def aggregate(updates: dict, weights: dict, method: str = "mean", trim: float = 0.2,
              **krum) -> dict[str, np.ndarray]:
    """What the server makes of ``updates`` (already checked) with case counts ``weights``:
    the strategy's Flower combiner for ``fl.aggregation=method``, ``fl.trim=trim`` (and
    ``krum_malicious``, ``krum_select``)."""
    first = next(iter(updates.values()))
    s = make_strategy("fedavg", len(updates), 1.0, 1, 0.0, first.keys(),
                      aggregation=method, trim=trim, **krum)
    return {k: v.numpy() for k, v in s.combine(1, updates, weights, first).items()}


def test_check_update_accepts_matching_update() -> None:
    assert check_update(_model(1.5), REF) is None


def test_check_update_missing_and_extra_keys() -> None:
    upd = _model()
    del upd["enc.bias"]
    reason = check_update(upd, REF)
    assert reason is not None and "missing keys ['enc.bias']" in reason
    upd = _model()
    upd["enc.site_experts.0.w"] = np.zeros(1, dtype=np.float32)
    reason = check_update(upd, REF)
    assert reason is not None and "unexpected keys ['enc.site_experts.0.w']" in reason


def test_check_update_shape() -> None:
    upd = _model()
    upd["enc.weight"] = np.zeros((3, 2), dtype=np.float32)
    assert check_update(upd, REF) == "enc.weight: shape (3, 2), expected (2, 3)"


def test_check_update_dtype() -> None:
    upd = _model()
    upd["enc.bias"] = upd["enc.bias"].astype(np.float64)
    assert check_update(upd, REF) == "enc.bias: dtype float64, expected float32"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_update_non_finite(bad: float) -> None:
    upd = _model()
    upd["enc.weight"][1, 2] = bad
    assert check_update(upd, REF) == "enc.weight: 1 of 6 values are not finite"


def test_check_update_non_array() -> None:
    upd: dict = _model()
    upd["enc.bias"] = [0.0, 0.0]
    assert check_update(upd, REF) == "enc.bias: not a numpy array but list"


def test_update_norm_by_hand() -> None:
    # diff is 1 in each of the 8 entries -> sqrt(8)
    assert update_norm(_model(1.0), _model(0.0)) == pytest.approx(math.sqrt(8))


def test_norm_outliers_drops_only_the_big_update() -> None:
    g = _model(0.0)
    updates = {"a": _model(1.0), "b": _model(1.2), "c": _model(0.9), "d": _model(10.0)}
    # norms: sqrt(8)*[1, 1.2, 0.9, 10], median = sqrt(8)*1.1; bound 3 -> limit sqrt(8)*3.3
    dropped = norm_outliers(updates, g, bound=3.0)
    assert set(dropped) == {"d"}
    assert "> 3 x round median" in dropped["d"]
    # with a bound above 10/1.1 nobody is dropped
    assert norm_outliers(updates, g, bound=9.5) == {}
    assert norm_outliers(updates, g, bound=math.inf) == {}
    with pytest.raises(ValueError, match="-1"):
        norm_outliers(updates, g, bound=-1)


def test_norm_outliers_compare_norms_per_step_when_every_site_gives_its_steps() -> None:
    """A skewed round: the large site's 11 honest steps make an update 11 x the others'; per
    step it is like them and stays, while an attacker's big update in one step still goes."""
    g = _model(0.0)
    updates = {"large": _model(11.0), "s1": _model(1.0), "s2": _model(1.1), "s3": _model(0.9)}
    steps = {"large": 11.0, "s1": 1.0, "s2": 1.0, "s3": 1.0}
    assert set(norm_outliers(updates, g, bound=5.0)) == {"large"}  # the raw rule drops it
    assert norm_outliers(updates, g, bound=5.0, steps=steps) == {}
    attacked = {**updates, "s3": _model(20.0)}
    dropped = norm_outliers(attacked, g, bound=5.0, steps=steps)
    assert set(dropped) == {"s3"} and "update norm per step" in dropped["s3"]
    # equal steps: the raw rule's decisions; a site without steps: the raw rule
    assert set(norm_outliers(attacked, g, 5.0, dict.fromkeys(attacked, 3.0))) == \
        set(norm_outliers(attacked, g, 5.0))
    assert set(norm_outliers(updates, g, 5.0, {"large": 11.0, "s1": 1.0})) == {"large"}
    accepted, rejected = screen_updates(updates, g, norm_bound=5.0, steps=steps)
    assert set(accepted) == set(updates) and rejected == {}


def test_screen_updates_combines_both_rules() -> None:
    g = _model(0.0)
    nan = _model(1.0)
    nan["enc.bias"][0] = np.nan
    updates = {"a": _model(1.0), "b": _model(1.1), "c": _model(0.9), "d": _model(50.0), "e": nan}
    accepted, rejected = screen_updates(updates, g, norm_bound=3.0)
    assert sorted(accepted) == ["a", "b", "c"]
    assert sorted(rejected) == ["d", "e"]
    assert "not finite" in rejected["e"] and "update norm" in rejected["d"]


def test_quorum() -> None:
    check_quorum(["a", "b"], {"c": "timeout"}, min_sites=2, server_round=3)
    with pytest.raises(QuorumError, match=r"round 3: only 1 usable.*c: timeout; d: crashed"):
        check_quorum(["a"], {"d": "crashed", "c": "timeout"}, min_sites=2, server_round=3)


def test_weighted_mean_by_cases() -> None:
    # (10*1 + 30*3) / 40 = 2.5
    agg = aggregate({"a": _model(1.0), "b": _model(3.0)}, {"a": 10, "b": 30}, method="mean")
    assert agg["enc.weight"].dtype == np.float32
    np.testing.assert_allclose(agg["enc.weight"], 2.5)
    np.testing.assert_allclose(agg["enc.bias"], 2.5)


def test_trimmed_mean_cuts_extremes_per_coordinate() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 100.0]
    ups = {f"s{i}": _model(v) for i, v in enumerate(values)}
    # per coordinate the extremes differ: site s0 has the largest value in one entry
    ups["s0"]["enc.bias"][1] = 1000.0
    w = {s: 1 for s in ups}
    agg = aggregate(ups, w, method="trimmed_mean", trim=0.2)
    # floor(0.2*5)=1 cut each end: mean(2,3,4)=3
    np.testing.assert_allclose(agg["enc.weight"], 3.0)
    # entry bias[1]: values 1000,2,3,4,100 -> cut 2 and 1000 -> mean(3,4,100)
    np.testing.assert_allclose(agg["enc.bias"], [3.0, (3 + 4 + 100) / 3])
    mean = aggregate(ups, w, method="mean")
    assert not np.allclose(mean["enc.weight"], 3.0)


def test_trim_zero_is_unweighted_mean() -> None:
    ups = {"a": _model(1.0), "b": _model(4.0)}
    agg = aggregate(ups, {"a": 1, "b": 100}, method="trimmed_mean", trim=0.0)
    np.testing.assert_allclose(agg["enc.weight"], 2.5)


def test_median_coordinate_wise() -> None:
    ups = {"a": _model(1.0), "b": _model(2.0), "c": _model(1e6)}
    ups["a"]["enc.bias"][0] = 7.0
    agg = aggregate(ups, {"a": 1, "b": 1, "c": 1}, method="median")
    np.testing.assert_allclose(agg["enc.weight"], 2.0)
    np.testing.assert_allclose(agg["enc.bias"], [7.0, 2.0])
    # even count: mean of the two middle values
    agg4 = aggregate({**ups, "d": _model(3.0)}, dict.fromkeys("abcd", 1), method="median")
    np.testing.assert_allclose(agg4["enc.weight"], 2.5)


def test_aggregate_arguments_checked() -> None:
    ups = {"a": _model(1.0)}
    with pytest.raises(ValueError, match="fl.aggregation.*'mode'"):
        aggregate(ups, {"a": 1}, method="mode")
    with pytest.raises(ValueError, match="fl.trim.*0.5"):
        aggregate(ups, {"a": 1}, method="trimmed_mean", trim=0.5)
    with pytest.raises(KeyError, match="'a'"):
        aggregate(ups, {}, method="mean")


def test_integer_arrays_stay_integer() -> None:
    ups = {"a": {"n": np.array([1, 2], dtype=np.int64)}, "b": {"n": np.array([2, 5], dtype=np.int64)}}
    agg = aggregate(ups, {"a": 1, "b": 1}, method="mean")
    assert agg["n"].dtype == np.int64
    np.testing.assert_array_equal(agg["n"], [2, 4])  # rint(1.5)=2, rint(3.5)=4


def krum_scores(updates: dict, malicious: int) -> dict[str, float]:
    """Krum's score by hand: per site, the sum of its n - f - 2 smallest squared L2 distances
    (all arrays flattened together, in float64) to the other sites' updates."""
    flat = {site: np.concatenate([np.asarray(v, np.float64).ravel() for v in u.values()])
            for site, u in updates.items()}
    scores = {}
    for site, x in flat.items():
        dist = sorted(float(np.sum((x - y) ** 2)) for other, y in flat.items() if other != site)
        scores[site] = sum(dist[:len(flat) - malicious - 2])
    return scores


def _honest_and_wild(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Four honest updates around 1 (each coordinate its own noise) and one wild one."""
    rng = np.random.default_rng(seed)
    ups = {f"s{i}": {k: (1.0 + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
                     for k, v in _model().items()} for i in range(4)}
    ups["wild"] = _model(1e3)
    return ups


def test_krum_takes_one_honest_update_whole():
    """Flower's Krum (f = 1, n = 5 = 2f + 3) keeps the update with the lowest score, whole:
    the result is one honest site's arrays bit for bit, not a mix, and nowhere near the
    outlier, although the outlier claims nearly all the cases (the choice is unweighted)."""
    ups = _honest_and_wild()
    weights = {"s0": 10, "s1": 20, "s2": 30, "s3": 40, "wild": 10_000}
    agg = aggregate(ups, weights, method="krum", krum_malicious=1)
    scores = krum_scores(ups, malicious=1)
    best = min(scores, key=scores.get)
    assert best != "wild" and scores["wild"] > 1e5 * scores[best]
    for key in agg:
        assert agg[key].dtype == np.float32
        np.testing.assert_array_equal(agg[key], ups[best][key])
        assert np.abs(agg[key] - 1e3).min() > 900
    # the case-weighted mean is dragged to the outlier
    assert aggregate(ups, weights, method="mean")["enc.weight"].min() > 900


def test_multikrum_averages_the_best_scored_by_cases():
    """Flower's MultiKrum keeps the krum_select lowest scores and averages them weighted by
    cases (FedAvg over the selection)."""
    ups = _honest_and_wild(seed=1)
    weights = {"s0": 1, "s1": 2, "s2": 3, "s3": 4, "wild": 1000}
    agg = aggregate(ups, weights, method="multikrum", krum_malicious=1, krum_select=3)
    scores = krum_scores(ups, malicious=1)
    chosen = sorted(scores, key=scores.get)[:3]
    assert "wild" not in chosen
    total = sum(weights[s] for s in chosen)
    for key in agg:
        expected = sum(weights[s] * ups[s][key].astype(np.float64) for s in chosen) / total
        np.testing.assert_allclose(agg[key], expected, rtol=1e-6)


def test_krum_combiners_and_server_optimisers():
    """Krum/MultiKrum under a server optimiser are the two Flower classes in one (optimiser
    first), with f and m set whatever the optimiser passes to ``__init__``."""
    krum = make_combiner("krum", krum_malicious=2, krum_select=4)
    assert type(krum) is Krum and krum.num_malicious_nodes == 2 and krum.num_nodes_to_select == 1
    over = make_combiner("krum", server_opt="fedavgm", krum_malicious=2)
    assert isinstance(over, FedAvgM) and isinstance(over, Krum)
    assert type(over).__mro__.index(FedAvgM) < type(over).__mro__.index(Krum)
    assert over.num_malicious_nodes == 2 and over.num_nodes_to_select == 1
    multi = make_combiner("multikrum", server_opt="fedadam", krum_malicious=0, krum_select=3)
    assert isinstance(multi, FedAdam) and isinstance(multi, MultiKrum)
    assert multi.num_malicious_nodes == 0 and multi.num_nodes_to_select == 3


def test_krum_needs_enough_sites():
    assert krum_needed(0) == 3 and krum_needed(1) == 5 and krum_needed(1, select=5) == 6
    keys = _model().keys()
    make_strategy("fedavg", 5, 1.0, 1, 0.0, keys, aggregation="krum", krum_malicious=1)
    with pytest.raises(ValueError, match=r"fl.krum_malicious=1 .*at least 5 .*only 4 site"):
        make_strategy("fedavg", 4, 1.0, 1, 0.0, keys, aggregation="krum", krum_malicious=1)
    with pytest.raises(ValueError, match=r"fl.krum_select=4 .*at least 5 .*only 4 site"):
        make_strategy("fedavg", 4, 1.0, 1, 0.0, keys, aggregation="multikrum",
                      krum_malicious=1, krum_select=4)
    with pytest.raises(ValueError, match="only 2 site"):  # 5 sites, 2 asked per round
        make_strategy("fedavg", 5, 0.5, 1, 0.0, keys, aggregation="krum", krum_malicious=0)
    # not read by the other rules
    make_strategy("fedavg", 2, 1.0, 1, 0.0, keys, aggregation="median", krum_malicious=3)


@pytest.mark.parametrize("fl, match", [
    ({"aggregation": "krum", "krum_malicious": -1}, r"fl.krum_malicious .*>= 0, got -1"),
    ({"aggregation": "krum", "krum_malicious": 1.5}, r"fl.krum_malicious .*got 1.5"),
    ({"aggregation": "multikrum", "krum_select": 0}, r"fl.krum_select .*>= 1, got 0"),
    ({"aggregation": "mean", "krum_select": True}, r"fl.krum_select .*got True"),
    ({"aggregation": "bulyan"}, r"fl.aggregation .*'bulyan'"),
    ({"trim": 0.5}, r"fl.trim .*0.5"),
])
def test_bad_aggregation_settings_name_key_and_value(fl, match):
    with pytest.raises(ValueError, match=match):
        aggregation_settings(fl)


@pytest.mark.parametrize("overrides, match", [
    # the default data: 4 synthetic sites, all asked every round; f = 1 needs 5
    (["fl.aggregation=krum"], r"fl.krum_malicious=1 .*at least 5 .*only 4 site"),
    (["fl.aggregation=krum", "fl.krum_malicious=-1"], r"fl.krum_malicious .*got -1"),
    (["fl.aggregation=multikrum", "fl.krum_malicious=0", "fl.krum_select=2",
      "fl.fraction_train=0.5"], r"fl.krum_select=2 .*at least 3 .*only 2 site"),
    (["fl.aggregation=krum", "fl.krum_malicious=0", "fl.site_names=[A,B]"], "only 2 site"),
])
def test_bad_krum_settings_fail_when_the_config_is_checked(overrides, match):
    with pytest.raises(ValueError, match=match):
        settings.compose("config", overrides)
    settings.compose("config", ["fl.aggregation=krum", "fl.krum_malicious=0"])
