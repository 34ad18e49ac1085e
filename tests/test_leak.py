"""What leaves a site over a whole simulated run (docs/design.md §3: shared arrays and scalar metrics
only; never voxels, never experts, never a path).

A Flower client mod sits around the project's own train and evaluate handlers and writes a
description of every reply (record types, array keys/shapes/dtypes, every metric and config
value with its type) to a folder; the test reads them back after a 2-site, 2-round run and
checks each with :func:`reply_problems`, which is also run on replies that do leak, so the
test fails if a client sent an expert, a path or a volume.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flower_fixtures import TINY_FL, project_client_app_with, simulate_recorded
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from m4fuse.personal.sets import is_personal, split_state
from m4fuse.run import settings

RECORD_ENV = "M4FUSE_TEST_REPLY_DIR"
TINY = [*TINY_FL, "tracking.enabled=false", "fl.local_epochs=1"]
pytestmark = pytest.mark.usefixtures("flower_task_identity")


def describe(content: RecordDict) -> dict[str, Any]:
    """Everything a reply carries, as JSON-able values (array contents as shapes only)."""
    out: dict[str, Any] = {"records": {}}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            out["records"][name] = {"type": "arrays", "items": {
                k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in record.items()}}
        elif isinstance(record, MetricRecord):
            out["records"][name] = {"type": "metrics", "items": {
                k: {"type": type(v).__name__, "value": v} for k, v in record.items()}}
        elif isinstance(record, ConfigRecord):
            out["records"][name] = {"type": "config", "items": {
                k: {"type": type(v).__name__, "value": repr(v)} for k, v in record.items()}}
        else:
            out["records"][name] = {"type": type(record).__name__, "items": {}}
    return out


def record_replies(msg: Message, context: Context,
                   call_next: Callable[[Message, Context], Message]) -> Message:
    """Client mod: pass the message on, write a description of the reply to ``$RECORD_ENV``."""
    reply = call_next(msg, context)
    folder = Path(os.environ[RECORD_ENV])
    config = msg.content.config_records["config"]
    entry = {"type": msg.metadata.message_type, "node": context.node_id,
             "round": int(config["server-round"]),
             "config": {k: repr(v) for k, v in config.items()},
             "error": reply.error.reason if reply.has_error() else None,
             **(describe(reply.content) if reply.has_content() else {"records": {}})}
    (folder / f"{uuid.uuid4().hex}.json").write_text(json.dumps(entry))
    return reply


# The project's train/evaluate handlers behind :func:`record_replies`.
app = project_client_app_with(record_replies)


def reply_problems(entry: Mapping[str, Any], shared: Mapping[str, tuple[int, ...]],
                   volume: Sequence[int]) -> list[str]:
    """Why a described reply leaks (empty: it carries only shared arrays and numbers).

    ``shared``: key -> shape of the shared state; ``volume``: the training size (D, H, W).
    """
    problems = []
    kinds = [r["type"] for r in entry["records"].values()]
    expected = ["arrays", "metrics"] if entry["type"] == MessageType.TRAIN else ["metrics"]
    if sorted(kinds) != expected:
        problems.append(f"records {kinds}, expected {expected}")
    for name, record in entry["records"].items():
        items = record["items"]
        if record["type"] == "arrays":
            if set(items) != set(shared):
                problems.append(f"{name}: keys differ from the shared keys: extra "
                                f"{sorted(set(items) - set(shared))[:3]}, missing "
                                f"{sorted(set(shared) - set(items))[:3]}")
            for key, spec in items.items():
                if is_personal(key):
                    problems.append(f"{name}: expert key {key}")
                if key in shared and tuple(spec["shape"]) != tuple(shared[key]):
                    problems.append(f"{name}: {key} shape {spec['shape']} != {shared[key]}")
                if len(spec["shape"]) >= 3 and tuple(spec["shape"][-3:]) == tuple(volume):
                    problems.append(f"{name}: {key} is shaped like a volume {spec['shape']}")
        elif record["type"] == "metrics":
            for key, spec in items.items():
                if spec["type"] not in ("int", "float"):
                    problems.append(f"{name}: metric {key} is a {spec['type']}, not a number")
        else:
            problems.append(f"{name}: a {record['type']} record ({sorted(items)[:3]})")
    return problems


def shared_shapes(cfg) -> dict[str, tuple[int, ...]]:
    full = settings.build_model(cfg, num_experts=1).state_dict()
    shared, personal = split_state(full)
    assert personal, "the model must have an expert for this test to mean anything"
    return {k: tuple(v.shape) for k, v in shared.items()}


def test_problems_found_in_leaking_replies(tmp_path):
    cfg = settings.compose("config", [f"root={tmp_path}", *TINY])
    shared = shared_shapes(cfg)
    full = settings.build_model(cfg, num_experts=1).state_dict()
    good = {k: v.numpy() for k, v in full.items() if k in shared}
    expert_key = next(k for k in full if is_personal(k))
    metrics = MetricRecord({"loss": 0.5, "num-examples": 3, "site-index": 0})

    def entry(arrays: dict[str, np.ndarray], extra: dict | None = None) -> dict:
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                              "metrics": metrics, **(extra or {})})
        return {"type": MessageType.TRAIN, **describe(content)}

    volume = (16, 16, 16)
    assert reply_problems(entry(good), shared, volume) == []
    leaks = {
        "expert": entry({**good, expert_key: full[expert_key].numpy()}),
        "path": entry(good, {"info": ConfigRecord({"case": "/data/BraTS2021_00000/t1.nii.gz"})}),
        "volume": entry({**good, "image": np.zeros((1, 4, 16, 16, 16), np.float32)}),
        "missing": entry({k: v for k, v in good.items() if k != next(iter(good))}),
    }
    for what, leak in leaks.items():
        assert reply_problems(leak, shared, volume), f"a reply with a {what} passed the check"
    assert any("expert key" in p for p in reply_problems(leaks["expert"], shared, volume))
    assert any("shaped like a volume" in p
               for p in reply_problems(leaks["volume"], shared, volume))
    # an evaluate reply with arrays is a leak too
    evaluate = {"type": MessageType.EVALUATE, **describe(RecordDict(
        {"arrays": ArrayRecord({k: Array(v) for k, v in good.items()}), "metrics": metrics}))}
    assert reply_problems(evaluate, shared, volume)


@pytest.mark.slow
def test_whole_run_sends_only_shared_arrays_and_numbers(monkeypatch, tmp_path):
    args = [f"root={tmp_path / 'root'}", *TINY, "fl.rounds=2", "run_name=leak"]
    cfg, _, entries = simulate_recorded(app, args, RECORD_ENV, tmp_path / "replies", monkeypatch)
    seen = sorted((e["type"], e["round"]) for e in entries)
    # 2 sites x (2 train + 2 validation + 1 final test) replies
    assert seen == sorted([("train", r) for r in (1, 2)] * 2 + [("evaluate", r) for r in
                                                                  (1, 2, 2)] * 2), seen
    assert len({e["node"] for e in entries}) == 2
    shared = shared_shapes(cfg)
    for e in entries:
        assert e["error"] is None, e["error"]
        problems = reply_problems(e, shared, tuple(cfg.data.size))
        assert not problems, (e["type"], e["round"], problems)


def _arrays_of(entries: list[dict], kind: str) -> list[set[str]]:
    return [set(e["records"]["arrays"]["items"]) for e in entries
            if e["type"] == kind and "arrays" in e["records"]]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "local"])
def test_every_strategy_runs_through_the_apps(monkeypatch, tmp_path, strategy):
    """fedavg, fedprox and local through the real ServerApp and ClientApp (2 sites, 1 round):
    the run finishes with both sites scored, and the wire carries what the strategy says:
    fedavg the whole one-expert model, fedprox the shared keys (and the server sends
    proximal-mu), local no arrays at all; numbers only in metrics, every config record
    carries the run identity."""
    args = [f"root={tmp_path / 'root'}", *TINY, "fl.rounds=1", f"run_name={strategy}",
            f"fl.strategy={strategy}"]
    cfg, rdir, entries = simulate_recorded(app, args, RECORD_ENV, tmp_path / "replies",
                                           monkeypatch)
    assert not (rdir / "failure.txt").exists()
    assert sorted((e["type"], e["round"]) for e in entries) == sorted(
        [("train", 1)] * 2 + [("evaluate", 1)] * 4)
    assert all(e["error"] is None for e in entries), [e["error"] for e in entries]
    full = settings.build_model(cfg, num_experts=1).state_dict()
    shared, _ = split_state(full)
    expected = {"fedavg": set(full), "fedprox": set(shared), "local": set()}[strategy]
    sent = _arrays_of(entries, MessageType.TRAIN)
    assert len(sent) == 2 and all(keys == expected for keys in sent), strategy
    assert not _arrays_of(entries, MessageType.EVALUATE)
    for e in entries:
        for record in e["records"].values():
            if record["type"] == "metrics":
                assert all(v["type"] in ("int", "float") for v in record["items"].values())
        assert "run-identity" in e["config"]
        assert ("proximal-mu" in e["config"]) == (strategy == "fedprox" and e["type"] == "train")
    rows = (rdir / "sites.csv").read_text().splitlines()
    assert len(rows) == 4 and all("test_dice_wt" in rows[0] for _ in rows)
    history = json.loads((rdir / "history.json").read_text())
    assert sorted(map(int, history[-1]["val_by_site"])) == [0, 1]
