"""Fixtures shared by the test modules (pytest finds them here; helpers that are imported
live in engine_fixtures.py and flower_fixtures.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def flower_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages built outside a Flower process need the task identity Flower sets there:
    run 1, node 0, task 0 (restored after the test)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Run a module's tests with one torch thread, then restore the count: on tiny tensors,
    thread start-up costs more than it saves (and the CPUs are shared)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
