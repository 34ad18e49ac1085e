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


class _Site:
    """What :func:`fault_mod` reads of a resolved site: its name and the run config."""

    def __init__(self, name: str, faults: dict) -> None:
        from omegaconf import OmegaConf

        self.name = name
        self.cfg = OmegaConf.create({"fl": {"faults": faults}})


def _train_message(server_round: int, message_type: str = "train"):
    from flwr.app import ConfigRecord, Message, RecordDict

    content = RecordDict({"config": ConfigRecord({"server-round": server_round})})
    return Message(content=content, dst_node_id=1, message_type=message_type)


@pytest.fixture
def mod_site(monkeypatch, flower_task_identity):
    """fault_mod on site ``B`` of ``{"A": crash in round 2, "B": NaN in round 1}``."""
    from client.site import Site

    site = _Site("B", {"A": {"crash_round": 2}, "B": {"nan_round": 1}})
    monkeypatch.setattr(Site, "resolve", classmethod(lambda cls, *a: site))
    return site


def _handler(calls: list):
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    def handler(msg, context):
        calls.append(msg.metadata.message_type)
        arrays = {"w": np.ones((2, 2), np.float32), "n": np.array([3], np.int64)}
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                              "metrics": MetricRecord({"num-examples": 1})})
        return Message(content=content, reply_to=msg)

    return handler


def test_fault_mod_poisons_only_the_configured_train_reply(mod_site) -> None:
    from flwr.app import Context, RecordDict

    from client.faults import fault_mod

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    calls: list = []
    reply = fault_mod(_train_message(1), context, _handler(calls))
    assert np.isnan(reply.content["arrays"]["w"].numpy()).all()
    assert reply.content["arrays"]["n"].numpy().tolist() == [3]  # integers unchanged
    assert reply.content["metrics"]["num-examples"] == 1
    for message in (_train_message(2), _train_message(1, "evaluate")):
        reply = fault_mod(message, context, _handler(calls))
        assert np.isfinite(reply.content["arrays"]["w"].numpy()).all()
    assert calls == ["train", "train", "evaluate"]


def test_fault_mod_crashes_before_the_handler(mod_site) -> None:
    from flwr.app import Context, RecordDict

    from client.faults import fault_mod

    mod_site.name = "A"
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    calls: list = []
    with pytest.raises(InjectedFault, match="site 'A' in round 2"):
        fault_mod(_train_message(2), context, _handler(calls))
    assert calls == []
    fault_mod(_train_message(1), context, _handler(calls))
    assert calls == ["train"]


def test_project_client_app_has_the_fault_mod() -> None:
    from client import app as project
    from client.faults import fault_mod

    assert project.MODS == [fault_mod]
