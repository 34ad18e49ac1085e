"""DP-SGD's loader: the site's cases drawn by Poisson sampling (Opacus'
``UniformWithReplacementSampler``), with a collate that also builds empty batches and
handles lists of strings (the ``case`` ids), which Opacus' own ``DPDataLoader`` refuses."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader


class EmptySafeCollate:
    """Collate that also builds empty Poisson batches: tensors with a 0-long first axis,
    empty lists (e.g. ``case`` ids), dicts recursively. The structure comes from the wrapped
    collate applied to ``dataset[0]`` (read once, at the first empty batch)."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any], dataset: Any) -> None:
        self.collate_fn = collate_fn
        self.dataset = dataset
        self._template: Any = None

    def __call__(self, batch: list[Any]) -> Any:
        if batch:
            return self.collate_fn(batch)
        if self._template is None:
            self._template = self.collate_fn([self.dataset[0]])
        return _empty_like(self._template)


def _empty_like(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.new_empty((0, *value.shape[1:]))
    if isinstance(value, Mapping):
        return {k: _empty_like(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)() if isinstance(value, list) else tuple()
    raise TypeError(f"cannot build an empty batch entry from {type(value).__name__}")


def poisson_loader(loader: DataLoader, generator: torch.Generator | None = None,
                   sample_rate: float | None = None) -> DataLoader:
    """The same dataset and collate, batches drawn by Poisson sampling.

    ``sample_rate`` None (default): ``q = 1 / len(loader)`` (the expected batch is the
    original batch size) and ``len(loader)`` batches per epoch, as Opacus' ``DPDataLoader``
    does. A given rate q: ``max(1, round(1 / q))`` batches per epoch. Empty batches are
    possible (probability ``(1 - q)^n`` per step).
    """
    steps = len(loader)
    if steps < 1:
        raise ValueError("the loader has no batches (no training cases)")
    if sample_rate is None:
        sample_rate = 1.0 / steps
    else:
        steps = max(1, round(1.0 / sample_rate))
    dataset = loader.dataset
    sampler = UniformWithReplacementSampler(
        num_samples=len(dataset), sample_rate=float(sample_rate), generator=generator,
        steps=steps
    )
    extra: dict[str, Any] = {}
    if loader.num_workers > 0:
        extra = {"prefetch_factor": loader.prefetch_factor,
                 "persistent_workers": loader.persistent_workers}
    collate = loader.collate_fn
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=EmptySafeCollate(collate, dataset),
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        **extra,
    )


__all__ = ["EmptySafeCollate", "poisson_loader"]
