"""Fault injection by config (client/faults.py)."""

from __future__ import annotations

import numpy as np
import pytest

from client.faults import (
    FaultAction,
    FaultConfig,
    InjectedFault,
    SiteFault,
    inject_fault,
    poison_with_nan,
)
from server.robust import check_update, reference_spec

CFG = FaultConfig.from_mapping(
    {
        "A": {"crash_round": 2},
        "B": {"nan_round": 1},
        "C": {"delay_s": 2.5, "delay_round": 3},
        "D": {"delay_s": 0.5},
    }
)


def test_no_fault_for_other_sites_and_empty_config() -> None:
    calls: list[float] = []
    assert inject_fault(CFG, "Z", 2, sleep=calls.append) == FaultAction()
    assert inject_fault(FaultConfig.from_mapping(None), "A", 2, sleep=calls.append) == FaultAction()
    assert calls == []


def test_crash_only_in_its_round() -> None:
    assert inject_fault(CFG, "A", 1) == FaultAction()
    with pytest.raises(InjectedFault, match="site 'A' in round 2"):
        inject_fault(CFG, "A", 2)
    assert inject_fault(CFG, "A", 3) == FaultAction()


def test_nan_only_in_its_round() -> None:
    assert inject_fault(CFG, "B", 1).send_nan is True
    assert inject_fault(CFG, "B", 2).send_nan is False


def test_delay_round_and_every_round() -> None:
    calls: list[float] = []
    assert inject_fault(CFG, "C", 2, sleep=calls.append).slept_s == 0.0
    assert inject_fault(CFG, "C", 3, sleep=calls.append).slept_s == 2.5
    inject_fault(CFG, "D", 1, sleep=calls.append)
    inject_fault(CFG, "D", 7, sleep=calls.append)
    assert calls == [2.5, 0.5, 0.5]


def test_real_sleep_is_used_by_default() -> None:
    import time

    cfg = FaultConfig.from_mapping({"S": {"delay_s": 0.2}})
    t0 = time.perf_counter()
    inject_fault(cfg, "S", 1)
    assert time.perf_counter() - t0 >= 0.19


def test_config_errors_name_the_bad_value() -> None:
    with pytest.raises(KeyError, match="'crash'.*site 'A'"):
        FaultConfig.from_mapping({"A": {"crash": 2}})
    with pytest.raises(ValueError, match="crash_round.*0"):
        SiteFault(crash_round=0)
    with pytest.raises(ValueError, match="delay_s.*-1"):
        SiteFault(delay_s=-1)
    with pytest.raises(TypeError, match="site 'A'"):
        FaultConfig.from_mapping({"A": 3})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="server_round"):
        inject_fault(CFG, "A", 0)


def test_poisoned_update_is_rejected_by_the_server_check() -> None:
    arrays = {"w": np.ones((2, 2), np.float32), "n": np.array([3], np.int64)}
    bad = poison_with_nan(arrays)
    assert np.isnan(bad["w"]).all() and bad["w"].dtype == np.float32
    np.testing.assert_array_equal(bad["n"], [3])
    assert np.isfinite(arrays["w"]).all()  # input untouched
    assert check_update(arrays, reference_spec(arrays)) is None
    assert "not finite" in str(check_update(bad, reference_spec(arrays)))
    with pytest.raises(ValueError, match="no floating"):
        poison_with_nan({"n": np.array([1])})
