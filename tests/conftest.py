"""Fixtures shared by the test modules (pytest finds them here; helpers that are imported
live in engine_fixtures.py and flower_fixtures.py)."""

from __future__ import annotations

import pytest


@pytest.fixture
def flower_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages built outside a Flower process need the task identity Flower sets there:
    run 1, node 0, task 0 (restored after the test)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
