"""Flower's server optimisers (``fl.server_opt``) through the project's strategy, on a
toy shared state: expected arrays from the update formulas written out here, the update checks
in front of them, and no personal key anywhere near them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg, FedAvgM, FedMedian, FedTrimmedAvg, Krum

from m4fuse.run import settings
from m4fuse.run.server_opt import server_opt_settings
from server.strategy import make_strategy

pytestmark = pytest.mark.usefixtures("flower_task_identity")

SHARED = ["enc.weight", "dec.bias"]
EXPERT = "site_experts.0.conv.weight"
NAMES = ["A", "B", "C"]


class Grid:
    """The three sites' nodes 100, 101, 102 (what configure_train asks of a grid)."""

    def get_node_ids(self):
        return [100, 101, 102]


def state(enc: float, bias: float) -> dict[str, np.ndarray]:
    return {"enc.weight": np.array([[enc, 2 * enc], [-enc, 0.5]], np.float32),
            "dec.bias": np.array([bias, -bias], np.float32)}


def reply(update: dict[str, np.ndarray], site: int, cases: int) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in update.items()}),
        "metrics": MetricRecord({"loss": 1.0, "num-examples": cases, "site-index": site}),
    })
    msg = Message(content=content, dst_node_id=100 + site, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_src_node_id"] = 100 + site
    return msg


def strategy(fl: dict, **kw):
    name, args = server_opt_settings(fl)
    return make_strategy("personal", 3, 1.0, 1, 0.0, SHARED, site_names=NAMES,
                         server_opt=name, server_opt_args=args, **kw)


def round_trip(s, server_round: int, start: dict[str, np.ndarray],
               updates: list[dict[str, np.ndarray]], cases: list[int]) -> dict[str, np.ndarray]:
    """Send ``start`` to the three sites, let site i answer ``updates[i]`` with ``cases[i]``."""
    record = ArrayRecord({k: Array(v) for k, v in start.items()})
    s.configure_train(server_round, record, ConfigRecord({}), Grid())
    out, _ = s.aggregate_train(server_round, [reply(u, i, c) for i, (u, c) in
                                              enumerate(zip(updates, cases))])
    assert out is not None and list(out.keys()) == list(start)
    assert all(out[k].numpy().dtype == np.float32 for k in start)
    return {k: out[k].numpy() for k in start}


def weighted_mean(updates, cases):
    total = sum(cases)
    return {k: sum(c / total * u[k].astype(np.float64) for u, c in zip(updates, cases))
            for k in SHARED}


ROUND1 = [state(1.0, 0.5), state(3.0, -0.5), state(2.0, 1.5)]
ROUND2 = [state(0.0, 1.0), state(4.0, 2.0), state(1.0, 0.0)]
CASES = [1, 2, 3]


def test_none_is_flowers_fedavg_and_unchanged():
    s = strategy({"server_opt": "none", "server_lr": 0.5, "server_momentum": 0.9})
    assert type(s.combiner) is FedAvg
    w0 = state(0.0, 0.0)
    w1 = round_trip(s, 1, w0, ROUND1, CASES)
    for k, v in weighted_mean(ROUND1, CASES).items():
        np.testing.assert_allclose(w1[k], v, rtol=1e-6)


def test_fedavgm_momentum_applied_twice():
    lr, beta = 0.5, 0.9
    s = strategy({"server_opt": "fedavgm", "server_lr": lr, "server_momentum": beta})
    assert isinstance(s.combiner, FedAvgM)
    w0 = state(0.0, 0.0)
    w1 = round_trip(s, 1, w0, ROUND1, CASES)
    mean1 = weighted_mean(ROUND1, CASES)
    pg1 = {k: w0[k] - mean1[k] for k in SHARED}         # pseudo-gradient
    m1 = pg1                                             # first momentum = pseudo-gradient
    want1 = {k: w0[k] - lr * m1[k] for k in SHARED}
    for k in SHARED:
        np.testing.assert_allclose(w1[k], want1[k], rtol=1e-5, atol=1e-6)
    w2 = round_trip(s, 2, w1, ROUND2, CASES)
    mean2 = weighted_mean(ROUND2, CASES)
    m2 = {k: beta * m1[k] + (w1[k] - mean2[k]) for k in SHARED}
    for k in SHARED:
        np.testing.assert_allclose(w2[k], w1[k] - lr * m2[k], rtol=1e-5, atol=1e-6)
    # not the plain mean: the momentum carried round 1 into round 2
    assert not np.allclose(w2["enc.weight"], mean2["enc.weight"])


def test_fedadam_two_rounds():
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    s = strategy({"server_opt": "fedadam", "server_lr": eta, "server_beta_1": b1,
                  "server_beta_2": b2, "server_tau": tau})
    w0 = state(0.0, 0.0)
    m = {k: 0.0 for k in SHARED}
    v = {k: 0.0 for k in SHARED}
    w = w0
    for rnd, updates in ((1, ROUND1), (2, ROUND2)):
        got = round_trip(s, rnd, w, updates, CASES)
        mean = weighted_mean(updates, CASES)
        delta = {k: mean[k] - w[k] for k in SHARED}
        m = {k: b1 * m[k] + (1 - b1) * delta[k] for k in SHARED}
        v = {k: b2 * v[k] + (1 - b2) * delta[k] ** 2 for k in SHARED}
        # Flower's bias correction counts from server_round + 1
        eta_r = eta * math.sqrt(1 - b2 ** (rnd + 1)) / (1 - b1 ** (rnd + 1))
        want = {k: w[k] + eta_r * m[k] / (np.sqrt(v[k]) + tau) for k in SHARED}
        for k in SHARED:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
        w = got


def test_fedyogi_and_fedadagrad_one_round():
    w0 = state(0.0, 0.0)
    mean = weighted_mean(ROUND1, CASES)
    delta = {k: mean[k] - w0[k] for k in SHARED}
    # FedYogi: v_1 = 0 - (1 - b2) d^2 sign(0 - d^2) = (1 - b2) d^2; m_1 = (1 - b1) d
    s = strategy({"server_opt": "fedyogi", "server_lr": 0.01, "server_beta_1": 0.9,
                  "server_beta_2": 0.99, "server_tau": 1e-3})
    got = round_trip(s, 1, w0, ROUND1, CASES)
    for k in SHARED:
        want = w0[k] + 0.01 * 0.1 * delta[k] / (np.sqrt(0.01 * delta[k] ** 2) + 1e-3)
        np.testing.assert_allclose(got[k], want, rtol=1e-5, atol=1e-6)
    # FedAdagrad: m_1 = d (beta_1 = 0), v_1 = d^2
    s = strategy({"server_opt": "fedadagrad", "server_lr": 0.1, "server_tau": 1e-3})
    got = round_trip(s, 1, w0, ROUND1, CASES)
    for k in SHARED:
        want = w0[k] + 0.1 * delta[k] / (np.abs(delta[k]) + 1e-3)
        np.testing.assert_allclose(got[k], want, rtol=1e-5, atol=1e-6)


def test_server_opt_composes_with_the_checks_and_robust_rules():
    """A NaN reply is dropped before Flower sees it; FedAvgM then steps towards Flower's
    median (or trimmed mean) of the two accepted updates."""
    lr, beta = 0.5, 0.9
    bad = state(np.nan, 0.0)
    for aggregation, rule in (("median", FedMedian), ("trimmed_mean", FedTrimmedAvg)):
        s = strategy({"server_opt": "fedavgm", "server_lr": lr, "server_momentum": beta},
                     aggregation=aggregation, trim=0.2, norm_bound=math.inf)
        assert isinstance(s.combiner, FedAvgM) and isinstance(s.combiner, rule)
        w0 = state(0.0, 0.0)
        w1 = round_trip(s, 1, w0, [ROUND1[0], bad, ROUND1[2]], CASES)
        assert "not finite" in s.current.failed["train/B"]
        # two values per coordinate: median = trimmed mean (int(0.2*2) = 0 cut) = their mean
        middle = {k: (ROUND1[0][k] + ROUND1[2][k]) / 2 for k in SHARED}
        for k in SHARED:
            np.testing.assert_allclose(w1[k], w0[k] - lr * (w0[k] - middle[k]), rtol=1e-6)


def test_server_opt_over_krum_steps_towards_the_kept_update():
    """FedAvgM's ``super().aggregate_train`` is Flower's Krum's: the server step goes from
    the round's arrays towards the one update Krum kept (f = 0, 3 sites: 1 nearest; A and B
    are each other's nearest and tie, C is far), never towards C or a mean."""
    lr, beta = 0.5, 0.9
    s = strategy({"server_opt": "fedavgm", "server_lr": lr, "server_momentum": beta},
                 aggregation="krum", krum_malicious=0, norm_bound=math.inf)
    assert isinstance(s.combiner, FedAvgM) and isinstance(s.combiner, Krum)
    assert s.combiner.num_malicious_nodes == 0
    w0 = state(0.0, 0.0)
    updates = [state(1.0, 0.5), state(1.2, 0.5), state(40.0, -9.0)]
    w1 = round_trip(s, 1, w0, updates, CASES)
    steps = [{k: w0[k] - lr * (w0[k] - u[k]) for k in SHARED} for u in updates]
    close = [all(np.allclose(w1[k], step[k], rtol=1e-6) for k in SHARED) for step in steps]
    assert close[0] != close[1] and not close[2]


def test_personal_keys_never_reach_the_server_optimiser():
    with pytest.raises(ValueError, match="expert"):
        make_strategy("personal", 3, 1.0, 1, 0.0, [*SHARED, EXPERT], server_opt="fedadam")
    s = strategy({"server_opt": "fedadam", "server_lr": 0.1})
    leaky = {**ROUND1[1], EXPERT: np.ones((2, 2), np.float32)}
    round_trip(s, 1, state(0.0, 0.0), [ROUND1[0], leaky, ROUND1[2]], CASES)
    assert "unexpected keys" in s.current.failed["train/B"]
    assert set(s.combiner.current_arrays) == set(SHARED)
    assert set(s.combiner.m_t) == set(s.combiner.v_t) == set(SHARED)


@pytest.mark.parametrize("fl, match", [
    ({"server_opt": "adam"}, "fl.server_opt .*'adam'"),
    ({"server_opt": "fedavgm", "server_lr": 0}, "fl.server_lr must be > 0.*0"),
    ({"server_opt": "fedadam", "server_lr": -0.1}, "fl.server_lr .*-0.1"),
    ({"server_momentum": 1.0}, "fl.server_momentum .*1.0"),
    ({"server_beta_2": -0.5}, "fl.server_beta_2"),
    ({"server_tau": 0.0}, "fl.server_tau"),
    ({"server_lr": "fast"}, "fl.server_lr .*'fast'"),
])
def test_bad_settings_name_key_and_value(fl, match):
    with pytest.raises(ValueError, match=match):
        server_opt_settings(fl)


def test_settings_map_to_flowers_parameters():
    assert server_opt_settings({}) == ("none", {})
    assert server_opt_settings({"server_opt": "fedavgm", "server_lr": 0.5,
                                "server_momentum": 0.9, "server_tau": 0.1}) == (
        "fedavgm", {"server_learning_rate": 0.5, "server_momentum": 0.9})
    assert server_opt_settings({"server_opt": "fedadagrad", "server_lr": 0.2,
                                "server_beta_1": 0.5, "server_tau": 0.1}) == (
        "fedadagrad", {"eta": 0.2, "tau": 0.1})


def test_config_refuses_bad_server_opt_before_training():
    cfg = settings.compose("config", [])
    assert cfg.fl.server_opt == "fedavgm" and server_opt_settings(cfg.fl)[0] == "fedavgm"
    # the key, the bad value and the choices, in one message
    with pytest.raises(ValueError, match=r"fl.server_opt.*'sgd'.*fedavgm, fedadam"):
        settings.compose("config", ["fl.server_opt=sgd"])
    with pytest.raises(ValueError, match="fl.server_lr .*-1"):
        settings.compose("config", ["fl.server_opt=fedavgm", "fl.server_lr=-1"])
