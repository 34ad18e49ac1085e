"""Update checks (server/robust.py) and the Flower rules that combine what passed them
(server/strategy.py: FedAvg, FedTrimmedAvg, FedMedian), against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

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


def aggregate(updates: dict, weights: dict, method: str = "mean", trim: float = 0.2
              ) -> dict[str, np.ndarray]:
    """What the server makes of ``updates`` (already checked) with case counts ``weights``:
    the strategy's Flower combiner for ``fl.aggregation=method``, ``fl.trim=trim``."""
    first = next(iter(updates.values()))
    s = make_strategy("fedavg", len(updates), 1.0, 1, 0.0, first.keys(),
                      aggregation=method, trim=trim)
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
