"""The per-site steps shared by every training mode: train, validate, test, overlay
(fine-tuning, what a site keeps, is :mod:`m4fuse.personal.finetune`).

The Flower ClientApp, the pooled baseline and the local baseline all call the functions here,
so that they train with the same loss, optimiser, epochs and data split (docs/design.md §3).
This module knows nothing of Flower (docs/design.md §1: ``m4fuse/`` stays usable without it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import DictConfig

from m4fuse.evaluation.metrics import LESION_REPORTED_KEYS, REPORTED_METRIC_KEYS
from m4fuse.run.settings import amp_settings, train_config
from m4fuse.training.trainer import LocalTrainer

if TYPE_CHECKING:
    from m4fuse.training.dp import PrivateRound

class FixedSteps:
    """Exactly ``steps`` batches of ``loader``, passing over it again (reshuffled and
    re-augmented: a new ``iter(loader)``) as often as needed, for ``fl.local_steps``.

    Hand-written because ``itertools.cycle`` would replay the first pass's batches (the same
    order and augmentation) and torch has no step-count loader. ``len()`` is ``steps``.
    """

    def __init__(self, loader: Any, steps: int) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"fl.local_steps must be an integer >= 1, got {steps!r}")
        self.loader, self.steps = loader, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        done = 0
        while done < self.steps:
            passed = 0
            for batch in self.loader:
                yield batch
                done += 1
                passed += 1
                if done == self.steps:
                    return
            if passed == 0:
                raise ValueError("no training batches: the site has no training cases")


def train_site(
    model: torch.nn.Module,
    records: Sequence[Any],
    expert_index: int,
    cfg: DictConfig,
    device: torch.device,
    epochs: int,
    seed: int,
    **options: Any,
) -> dict[str, Any]:
    """Train ``model`` for ``epochs`` on ``records`` routed to ``expert_index`` (a shuffled,
    augmented loader seeded by ``seed``): :func:`run_epochs` on it, with its keyword
    ``options`` (``prox_mu``, ``prox_reference``, ``schedule``, ``lr_scale``,
    ``optimizer_state``, ``max_steps``, ``private``). Returns ``{"loss", "num-examples",
    "steps"}`` with ``num-examples`` = number of training cases (and ``optimizer_state`` when
    one was given)."""
    return run_epochs(model, site_loader(records, expert_index, cfg, seed), cfg, device,
                      epochs, seed, num_cases=len(records), **options)


def site_loader(records: Sequence[Any], expert_index: int, cfg: DictConfig, seed: int) -> Any:
    """The shuffled (and, with ``train.augment``, augmented) training loader of a site."""
    from m4fuse.data import make_loader

    return make_loader(
        list(records), expert_index, batch_size=int(cfg.train.batch_size),
        augment=bool(cfg.train.augment), shuffle=True,
        num_workers=int(cfg.train.num_workers), seed=seed,
    )


def site_trainer(
    model: torch.nn.Module,
    loader: Any,
    cfg: DictConfig,
    device: torch.device,
    epochs: int,
    seed: int,
    prox_mu: float = 0.0,
    prox_reference: Mapping[str, torch.Tensor] | None = None,
    schedule: tuple[int, int] | None = None,
    lr_scale: Mapping[str, float] | None = None,
    optimizer_state: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    max_steps: int | None = None,
    private: PrivateRound | None = None,
) -> tuple[LocalTrainer, Any, int]:
    """The local trainer of one call and what it passes over: ``(trainer, batches, steps)``.

    A fresh AdamW per call (FedAvg-style local training) whose warm-up/cosine learning rate
    continues one curve over the whole run: ``schedule = (round index, number of rounds)``
    places this call on it (default ``(0, 1)``: the curve spans this call alone). ``epochs``
    passes over ``loader``, or with ``max_steps`` (default None) exactly that many optimiser
    steps (``fl.local_steps``: :class:`FixedSteps`). ``lr_scale`` (default None: one lr)
    multiplies the lr of the named parameters (e.g. the personal ones). ``optimizer_state``
    (default None: fresh): AdamW state by parameter name loaded before training (parameters
    it does not name start fresh; the lr curve is unchanged). ``private`` (default None):
    DP-SGD (:class:`m4fuse.training.dp.PrivateTrainer`), which wraps model, optimiser and
    loader with Opacus after the optimiser is built.
    """
    if len(loader) == 0:
        raise ValueError("no training batches: the site has no training cases")
    index, count = schedule or (0, 1)
    if not 0 <= index < count:
        raise ValueError(f"schedule must be (index, count) with 0 <= index < count, got {schedule}")
    if max_steps is not None:
        tcfg = train_config(cfg, 1, seed)
        steps = int(max_steps)
    else:
        tcfg = train_config(cfg, epochs, seed)
        steps = epochs * len(loader)
    model.to(device)
    if prox_reference is not None:
        params = dict(model.named_parameters())
        prox_reference = {k: v for k, v in prox_reference.items() if k in params}
    options: dict[str, Any] = {"device": device, "prox_mu": prox_mu,
                               "prox_reference": prox_reference}
    kind: type[LocalTrainer] = LocalTrainer
    if private is not None:
        from m4fuse.training.dp import PrivateTrainer

        kind, options["dp"] = PrivateTrainer, private
    trainer = kind.scheduled(model, tcfg, steps * count, start_step=steps * index,
                             lr_scale=lr_scale, optimizer_state=optimizer_state, **options)
    batches = trainer.prepare(loader)
    if max_steps is not None:
        batches = FixedSteps(batches, int(max_steps))
    return trainer, batches, steps


def run_epochs(
    model: torch.nn.Module,
    loader: Any,
    cfg: DictConfig,
    device: torch.device,
    epochs: int,
    seed: int,
    num_cases: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Train with the :func:`site_trainer` of these arguments (its keyword ``options``):
    ``{"loss", "num-examples", "steps"}`` (``num-examples``: ``num_cases`` when given, else
    cases per pass; ``steps``: optimiser steps taken), plus the AdamW state after training
    as ``"optimizer_state"`` when an ``optimizer_state`` was given (``fl.optimizer_state``)."""
    trainer, batches, steps = site_trainer(model, loader, cfg, device, epochs, seed, **options)
    try:
        out = trainer.train_epochs(batches)
    finally:
        trainer.close()
    result: dict[str, Any] = {"loss": float(out["loss"]),
                              "num-examples": float(out["num-examples"]), "steps": float(steps)}
    if num_cases is not None:
        result["num-examples"] = float(num_cases)
    if options.get("optimizer_state") is not None:
        result["optimizer_state"] = trainer.optimizer_state()
    return result


def validate_site(
    model: torch.nn.Module,
    records: Sequence[Any],
    expert_index: int,
    cfg: DictConfig,
    device: torch.device,
) -> dict[str, float]:
    """Dice and HD95 (mm) per region at training resolution on ``records`` (+
    ``num-examples``).

    HD95 is measured on the resized training grid with each case's own voxel size in mm
    (:func:`training_grid_spacing`), so it is in the same unit as the test HD95 on the
    original grid (and :data:`m4fuse.evaluation.metrics.EMPTY_HD95_MM` is a penalty in mm). Mixed
    precision follows ``train.amp``/``train.amp_dtype``/``train.amp_cpu``, as in training.
    """
    from m4fuse.data import make_loader
    from m4fuse.training.scoring import evaluate

    if not records:
        raise ValueError("no validation cases for this site")
    loader = make_loader(list(records), expert_index, batch_size=1, augment=False,
                         shuffle=False, num_workers=int(cfg.train.num_workers))
    model.to(device)
    metrics = evaluate(model, loader, device,
                       spacing={r.case_id: training_grid_spacing(r) for r in records},
                       **amp_settings(cfg))
    out = {k: float(v) for k, v in metrics.items() if k in REPORTED_METRIC_KEYS}
    missing = set(REPORTED_METRIC_KEYS) - set(out)
    if missing:
        raise KeyError(f"evaluate returned no {sorted(missing)}; got {sorted(metrics)}")
    out["num-examples"] = float(len(records))
    return out


def training_grid_spacing(record: Any) -> tuple[float, float, float]:
    """Voxel size in mm, ``(D, H, W)``, of a cached case's resized training grid.

    The cache holds the brain's crop box (``crop_start``/``crop_end``, voxels in the canonical
    grid's ``(X, Y, Z)``) of a volume with that grid's voxel size
    (:func:`m4fuse.data.preprocess.canonical_spacing`, mm), resized to ``size`` ``(D, H, W)``
    with D along Z: a grid voxel spans ``spacing * crop extent / size`` mm on each axis.
    """
    from m4fuse.data.preprocess import canonical_spacing

    meta = record.meta
    extent = [int(e) - int(s) for s, e in zip(meta["crop_start"], meta["crop_end"])]
    size = [int(v) for v in meta["size"]]
    if len(extent) != 3 or len(meta["spacing"]) != 3 or len(size) != 3 or min(size) < 1:
        raise ValueError(f"case {record.case_id}: cache meta needs 3-axis crop_start/crop_end, "
                         f"spacing and size, got {extent}, {list(meta['spacing'])}, {size}")
    spacing = canonical_spacing(meta)
    return tuple(spacing[2 - axis] * extent[2 - axis] / size[axis] for axis in range(3))  # type: ignore[return-value]


def score_site_tests(
    model: torch.nn.Module,
    records: Sequence[Any],
    expert_index: int,
    device: torch.device,
    cfg: DictConfig | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Scores on the original voxel grid: ``(mean over cases, per-case rows)``; the means
    include the lesion-wise scores (:data:`m4fuse.evaluation.metrics.LESION_REPORTED_KEYS`), the rows
    also the lesion counts.

    ``cfg`` (default None: autocast on CUDA in bfloat16, float32 on the CPU) gives
    ``train.amp``/``train.amp_dtype``/``train.amp_cpu``, so that the test forward runs in the
    precision of training."""
    from m4fuse.training.scoring import score_on_original_grid

    if not records:
        raise ValueError("no test cases for this site")
    model.to(device)
    amp = {} if cfg is None else amp_settings(cfg)
    rows = list(score_on_original_grid(model, list(records), device, expert_index, **amp))
    means = {k: float(np.mean([float(r[k]) for r in rows]))
             for k in REPORTED_METRIC_KEYS + LESION_REPORTED_KEYS if k in rows[0]}
    if "dice_mean" not in means:
        means["dice_mean"] = float(np.mean([means[k] for k in ("dice_wt", "dice_tc", "dice_et")]))
    if "hd95_mean" not in means:
        means["hd95_mean"] = float(np.mean([means[k] for k in ("hd95_wt", "hd95_tc", "hd95_et")]))
    means["num-examples"] = float(len(rows))
    return means, rows


def overlay_case(
    model: torch.nn.Module,
    record: Any,
    expert_index: int | None,
    device: torch.device,
    path: Path,
    title: str = "",
    cfg: DictConfig | None = None,
) -> Path:
    """PNG of axial slices of one cached case on its original grid (FLAIR and T1ce), with the
    reference (its segmentation file, when it has one) and the model's prediction outlined per
    region (:func:`m4fuse.inference.overlay.overlay_png`); ``cfg`` (default None) gives ``train.amp``
    (and ``amp_dtype``, ``amp_cpu``)."""
    import nibabel as nib

    from m4fuse.data import restore_to_original
    from m4fuse.data.regions import labels_to_regions
    from m4fuse.inference.overlay import overlay_png
    from m4fuse.inference.predict import output_mode, predict_probs, probs_to_regions

    amp = {} if cfg is None else amp_settings(cfg)
    model.to(device)
    probs = predict_probs(model, np.array(record.image(), dtype=np.float32), device,
                          expert_index, **amp)
    mode = output_mode(model)
    prediction = np.asarray(probs_to_regions(restore_to_original(probs.numpy(), record,
                                                                 mode="linear"), mode))
    # source_files are T1, T1ce, T2, FLAIR (m4fuse.data.CaseRecord)
    images = {name: np.asarray(nib.load(f).dataobj, dtype=np.float32)
              for name, f in zip(("t1", "t1ce", "t2", "flair"), record.source_files)
              if name in ("t1ce", "flair")}
    reference = None
    if record.seg_file:
        label = np.rint(np.asarray(nib.load(record.seg_file).dataobj)).astype(np.int16)
        reference = np.asarray(labels_to_regions(label, record.et_label))
    return overlay_png(images, path, prediction=prediction, reference=reference, title=title)


def weighted_mean(rows: Sequence[Mapping[str, float]], weight: str = "num-examples") -> dict:
    """Case-weighted mean of the metric keys (voxel- and lesion-wise) of per-site rows."""
    total = sum(float(r[weight]) for r in rows)
    if total <= 0:
        raise ValueError(f"weights {weight!r} sum to {total}")
    keys = [k for k in REPORTED_METRIC_KEYS + LESION_REPORTED_KEYS if all(k in r for r in rows)]
    out = {k: sum(float(r[k]) * float(r[weight]) for r in rows) / total for k in keys}
    out[weight] = total
    return out
