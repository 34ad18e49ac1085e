"""The strategy's update checks, quorum and robust aggregation on hand-made replies:
a NaN update or an outlier norm is dropped and the round goes on, error replies and silent
sites are named, too few usable sites stop the run, trimmed mean, median and Krum are
selectable (Krum after the same checks, with its own least number of updates)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict

from server.replies import NO_REPLY
from server.robust import QuorumError
from server.strategy import make_strategy

KEYS = ["enc.weight", "dec.bias"]
NAMES = ["CBICA", "TCIA01", "TCIA02", "TMC"]
pytestmark = pytest.mark.usefixtures("flower_task_identity")


def arrays(value: float) -> dict[str, np.ndarray]:
    return {"enc.weight": np.full((2, 3), value, np.float32),
            "dec.bias": np.full((2,), value, np.float32)}


def reply(update: dict[str, np.ndarray], site: int, cases: int = 2, node: int | None = None,
          train: bool = True) -> Message:
    """A reply from site ``site`` as node ``100 + site``."""
    node = 100 + site if node is None else node
    content = RecordDict({"metrics": MetricRecord({"loss": 1.0 + site, "num-examples": cases,
                                                   "site-index": site, "seconds": 1.0})})
    if train:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in update.items()})
    msg = Message(content=content, dst_node_id=node,
                  message_type=MessageType.TRAIN if train else MessageType.EVALUATE)
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def error_reply(site: int, reason: str) -> Message:
    msg = Message(Error(code=0, reason=reason), reply_to=reply({}, site, train=False))
    msg.metadata.__dict__["_src_node_id"] = 100 + site
    return msg


def strategy(**kw):
    """A personal strategy of the 4 named sites that has just sent ``arrays(0)`` to all."""
    s = make_strategy("personal", 4, 1.0, 1, 0.0, KEYS, site_names=NAMES, **kw)
    s.global_arrays = arrays(0.0)
    s.asked = [100, 101, 102, 103]
    return s


def test_reply_helpers_set_the_source_node():
    assert reply(arrays(1.0), 2).metadata.src_node_id == 102
    assert error_reply(1, "boom").metadata.src_node_id == 101


def test_nan_update_dropped_and_round_goes_on():
    s = strategy()
    bad = arrays(1.0)
    bad["enc.weight"][0, 0] = np.nan
    replies = [reply(arrays(1.0), 0), reply(bad, 1), reply(arrays(3.0), 2), reply(arrays(2.0), 3)]
    out, metrics = s.aggregate_train(1, replies)
    # case-weighted (equal cases) mean of 1, 3, 2 without the NaN site
    np.testing.assert_allclose(out["enc.weight"].numpy(), np.full((2, 3), 2.0))
    assert not np.isnan(out["dec.bias"].numpy()).any()
    assert set(s.current.failed) == {"train/TCIA01"}
    assert "not finite" in s.current.failed["train/TCIA01"]
    assert set(s.current.train_by_site) == {0, 2, 3}
    assert metrics["num-examples"] == 6


def test_outlier_norm_dropped():
    s = strategy(norm_bound=3.0)
    replies = [reply(arrays(1.0), 0), reply(arrays(1.1), 1), reply(arrays(0.9), 2),
               reply(arrays(50.0), 3)]
    out, _ = s.aggregate_train(1, replies)
    np.testing.assert_allclose(out["enc.weight"].numpy(), np.full((2, 3), 1.0), rtol=1e-6)
    assert list(s.current.failed) == ["train/TMC"]
    assert "update norm" in s.current.failed["train/TMC"]
    # the same replies with the rule off are all averaged
    s = strategy(norm_bound=math.inf)
    out, _ = s.aggregate_train(1, replies)
    np.testing.assert_allclose(out["enc.weight"].numpy(), np.full((2, 3), 13.25), rtol=1e-6)
    assert not s.current.failed


def test_a_large_site_s_many_steps_are_no_outlier_when_replies_report_steps():
    """The steps each reply reports reach the norm rule: the site of 11 steps and 22 cases is
    averaged in, where without the steps its update is dropped as 11 x the median."""
    def skewed(with_steps: bool) -> list[Message]:
        out = []
        for site, (value, steps, cases) in enumerate([(11.0, 11, 22), (1.0, 1, 2),
                                                      (1.1, 1, 2), (0.9, 1, 2)]):
            msg = reply(arrays(value), site, cases=cases)
            if with_steps:
                next(iter(msg.content.metric_records.values()))["steps"] = float(steps)
            out.append(msg)
        return out

    s = strategy(norm_bound=5.0)
    s.aggregate_train(1, skewed(with_steps=False))
    assert list(s.current.failed) == ["train/CBICA"]
    s = strategy(norm_bound=5.0)
    out, _ = s.aggregate_train(1, skewed(with_steps=True))
    assert not s.current.failed
    # case-weighted mean of all four: (22 * 11 + 2 * (1 + 1.1 + 0.9)) / 28
    np.testing.assert_allclose(out["enc.weight"].numpy(), np.full((2, 3), 248 / 28), rtol=1e-6)


def test_wrong_shape_dtype_and_expert_key_dropped():
    s = strategy()
    wide = arrays(1.0)
    wide["enc.weight"] = np.ones((3, 3), np.float32)
    double = {k: v.astype(np.float64) for k, v in arrays(1.0).items()}
    expert = {**arrays(1.0), "enc.site_experts.0.w": np.ones(2, np.float32)}
    out, _ = s.aggregate_train(1, [reply(wide, 0), reply(double, 1), reply(expert, 2),
                                   reply(arrays(4.0), 3)])
    np.testing.assert_allclose(out["enc.weight"].numpy(), np.full((2, 3), 4.0))
    assert out["enc.weight"].numpy().dtype == np.float32
    failed = s.current.failed
    assert "shape (3, 3)" in failed["train/CBICA"]
    assert "dtype float64" in failed["train/TCIA01"]
    assert "site_experts" in failed["train/TCIA02"]


def test_crash_and_silent_site_tolerated_with_min_sites():
    s = strategy(min_sites=2)
    # node 101 raised, node 103 never answered; the two others are enough
    replies = [reply(arrays(1.0), 0), error_reply(1, "injected crash"), reply(arrays(3.0), 2)]
    out, _ = s.aggregate_train(1, replies)
    np.testing.assert_allclose(out["dec.bias"].numpy(), [2.0, 2.0])
    failed = s.current.failed
    assert set(failed) == {"train/node 101 (one of ['TCIA01', 'TMC'])",
                           "train/node 103 (one of ['TCIA01', 'TMC'])"}
    # once a node's site is known, its later failures are named by site
    s.current.failed.clear()
    s.aggregate_evaluate(1, [reply({}, 0, train=False), reply({}, 1, train=False),
                             reply({}, 2, train=False)])
    assert s.current.failed == {"evaluate/TMC": NO_REPLY}
    s.asked = [100, 101, 102, 103]
    s.current.failed.clear()
    s.aggregate_train(2, [reply(arrays(1.0), 0), error_reply(1, "boom"), reply(arrays(1.0), 3)])
    assert s.current.failed == {"train/TCIA01": "error reply: boom", "train/TCIA02": NO_REPLY}


def test_too_few_sites_stop_with_the_missing_named():
    s = strategy(min_sites=4)
    with pytest.raises(QuorumError, match="only 3 usable") as info:
        s.aggregate_train(1, [reply(arrays(1.0), 0), reply(arrays(1.0), 1),
                              reply(arrays(1.0), 2)])
    # node 103 is the only unknown node and TMC the only site that did not answer
    assert "TMC: " + NO_REPLY in str(info.value)
    s = strategy(min_sites=3)
    bad = arrays(np.nan)
    with pytest.raises(QuorumError, match="min_sites=3") as info:
        s.aggregate_train(1, [reply(arrays(1.0), 0), reply(bad, 1), reply(arrays(1.0), 2)])
    assert "TCIA01: enc.weight" in str(info.value) and "not finite" in str(info.value)
    # evaluation has the same quorum
    s = strategy(min_sites=3)
    with pytest.raises(QuorumError, match="only 2 usable"):
        s.aggregate_evaluate(1, [reply({}, 0, train=False), error_reply(1, "x"),
                                 reply({}, 3, train=False)])


@pytest.mark.parametrize("method, expected", [
    ("mean", (0.0 + 1.0 + 2.0 + 100.0) / 4),
    ("median", 1.5),
    ("trimmed_mean", 1.5),  # trim 0.25 of 4 cuts the 0 and the 100
])
def test_aggregation_selectable(method, expected):
    s = strategy(aggregation=method, trim=0.25, norm_bound=math.inf)
    out, _ = s.aggregate_train(1, [reply(arrays(v), i) for i, v in
                                   enumerate((0.0, 1.0, 2.0, 100.0))])
    np.testing.assert_allclose(out["enc.weight"].numpy(), np.full((2, 3), expected), rtol=1e-6)


def test_krum_after_the_checks_with_its_own_quorum():
    """Flower's Krum (f = 0: n - 2 nearest, needs 3 updates) sees only what passed the
    project's checks; fewer than 3 accepted updates stop the run naming the rule and the
    failed sites, where Flower's Krum would still have picked one."""
    s = strategy(aggregation="krum", krum_malicious=0, norm_bound=math.inf)
    # scores (2 nearest, x 8 coordinates): 1.0 -> .01+.09, 1.1 -> .01+.04, 1.3 -> .04+.09
    out, _ = s.aggregate_train(1, [reply(arrays(v), i) for i, v in
                                   enumerate((1.0, 1.1, 1.3, 50.0))])
    for key, value in arrays(1.1).items():
        np.testing.assert_array_equal(out[key].numpy(), value)
    s = strategy(aggregation="krum", krum_malicious=0, norm_bound=math.inf)
    out, _ = s.aggregate_train(1, [reply(arrays(1.0), 0), reply(arrays(np.nan), 1),
                                   reply(arrays(1.1), 2), reply(arrays(50.0), 3)])
    assert "not finite" in s.current.failed["train/TCIA01"]
    # 1 nearest each: 1.0 and 1.1 tie, either is kept whole, never the NaN or the 50
    got = out["enc.weight"].numpy()
    assert np.array_equal(got, arrays(1.0)["enc.weight"]) or \
        np.array_equal(got, arrays(1.1)["enc.weight"])
    s = strategy(aggregation="krum", krum_malicious=0, norm_bound=math.inf)
    with pytest.raises(QuorumError, match=r"only 2 usable .*at least 3 needed by "
                       r"fl.aggregation=krum with fl.krum_malicious=0") as info:
        s.aggregate_train(1, [reply(arrays(1.0), 0), reply(arrays(np.nan), 1),
                              reply(arrays(1.1), 2), error_reply(3, "boom")])
    assert "TCIA01: enc.weight" in str(info.value) and "TMC: error reply: boom" in str(info.value)


def test_bad_settings_refused():
    with pytest.raises(ValueError, match="fl.aggregation"):
        make_strategy("personal", 2, 1.0, 1, 0.0, KEYS, aggregation="bulyan")
    with pytest.raises(ValueError, match="fl.min_sites"):
        make_strategy("personal", 2, 1.0, 1, 0.0, KEYS, min_sites=3)
    with pytest.raises(ValueError, match="fl.min_sites"):
        make_strategy("personal", 4, 0.5, 1, 0.0, KEYS, min_sites=3)  # only 2 asked per round
    with pytest.raises(ValueError, match="fl.norm_bound"):
        make_strategy("personal", 2, 1.0, 1, 0.0, KEYS, norm_bound=0.0)
    with pytest.raises(ValueError, match="fl.trim"):
        make_strategy("personal", 2, 1.0, 1, 0.0, KEYS, trim=0.5)
    with pytest.raises(ValueError, match="site names"):
        make_strategy("personal", 2, 1.0, 1, 0.0, KEYS, site_names=["a"])


def test_site_index_outside_the_federation_is_the_sites_failure():
    s = strategy()
    out, _ = s.aggregate_train(1, [reply(arrays(1.0), 0), reply(arrays(1.0), 7, node=103)])
    assert any("site-index 7 outside" in why for why in s.current.failed.values())
    np.testing.assert_allclose(out["dec.bias"].numpy(), [1.0, 1.0])


def test_error_reasons_shortened_to_the_clients_message():
    from server.replies import short_reason

    ray = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor"
           ".run()\nclient.faults.InjectedFault: boom\n\nThe above exception ...\n"
           "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException "
           "occurred. Message: injected crash of site 'site0' in round 2'>")
    assert short_reason(ray) == "injected crash of site 'site0' in round 2"
    assert short_reason("plain") == "plain"
    assert short_reason("x" * 400).endswith(" ...") and len(short_reason("x" * 400)) == 304


def test_case_count_that_jumps_or_is_zero_is_dropped():
    """The aggregation weight cannot change within a run: a site that reported 2 training
    cases and then 200 is dropped (named, with the reason), as is a zero count; the
    others are averaged as usual."""
    s = strategy()
    s.aggregate_train(1, [reply(arrays(1.0), i) for i in range(4)])
    assert s.train_counts == {name: 2.0 for name in NAMES}
    s.current.failed.clear()
    replies = [reply(arrays(1.0), 0), reply(arrays(9.0), 1, cases=200),
               reply(arrays(9.0), 2, cases=0), reply(arrays(3.0), 3)]
    out, metrics = s.aggregate_train(2, replies)
    np.testing.assert_allclose(out["enc.weight"].numpy(), np.full((2, 3), 2.0))
    assert set(s.current.failed) == {"train/TCIA01", "train/TCIA02"}
    assert "differs from the 2 this site reported" in s.current.failed["train/TCIA01"]
    assert "num-examples is 0" in s.current.failed["train/TCIA02"]
    assert metrics["num-examples"] == 4


def test_all_zero_case_counts_stop_with_the_quorum_error_naming_sites():
    s = strategy()
    with pytest.raises(QuorumError, match="num-examples is 0"):
        s.aggregate_train(1, [reply(arrays(1.0), i, cases=0) for i in range(4)])


def test_site_without_held_out_cases_is_not_scored_and_left_out_of_the_mean(caplog):
    """A site too small to hold out validation cases answers with 0 cases: it is reported
    'not scored: n cases' (one log line over two rounds, no failure), and the mean is over
    the scored sites only."""
    from m4fuse.run.report import markdown_table, site_rows

    s = strategy()

    def evaluate_replies():
        out = [reply({}, i, cases=2, train=False) for i in range(3)]
        small = reply({}, 3, cases=0, train=False)
        small.content["metrics"]["site-cases"] = 2
        return out + [small]

    with caplog.at_level("INFO"):
        s.aggregate_evaluate(1, evaluate_replies())
        result = s.aggregate_evaluate(2, evaluate_replies())
    assert s.current.not_scored == {3: 2} and not s.current.failed
    assert sorted(s.current.evaluate_by_site) == [0, 1, 2]
    assert result["num-examples"] == 6 and result["loss"] == pytest.approx(2.0)
    rows = site_rows(NAMES, s.current.evaluate_by_site, {}, {"val": s.current.not_scored})
    assert rows[3]["val_num-examples"] == "not scored: 2 cases"
    assert "| site3 | TMC | not scored: 2 cases |" in markdown_table(rows)


def test_model_is_saved_before_the_final_test_round(monkeypatch):
    """run_rounds hands the final arrays to ``before_final_test`` before it sends the test
    round, so a failing test round cannot lose the trained model."""
    from flwr.app import ConfigRecord

    s = strategy()
    events: list[str] = []
    monkeypatch.setattr(s, "wait_for_quorum", lambda *a: None)
    monkeypatch.setattr(s, "configure_train", lambda rnd, arrays, config, grid: [])
    monkeypatch.setattr(s, "aggregate_train", lambda rnd, replies: (None, None))

    def configure_evaluate(rnd, arrays, config, grid):
        events.append("test" if config.get("final-test") else f"validate {rnd}")
        return []

    monkeypatch.setattr(s, "configure_evaluate", configure_evaluate)
    monkeypatch.setattr(s, "aggregate_evaluate", lambda rnd, replies: None)

    class Grid:
        def send_and_receive(self, messages, timeout):
            return []

    start = ArrayRecord({k: Array(v) for k, v in arrays(0.0).items()})
    s.run_rounds(Grid(), start, 1, 2, ConfigRecord({}), ConfigRecord({}), 1.0,
                 lambda rl, a: events.append(f"round end {rl.server_round}"),
                 before_final_test=lambda a: events.append(f"save {sorted(a.keys())}"))
    assert events == ["validate 1", "round end 1", "validate 2", "round end 2",
                      f"save {sorted(KEYS)}", "test"]
