"""The per-site steps shared by every training mode: train, fine-tune, validate, test, overlay.

The Flower ClientApp, the pooled baseline and the local baseline all call the functions here,
so that they train with the same loss, optimiser, epochs and data split (docs/design.md §3).
This module knows nothing of Flower (docs/design.md §1: ``m4fuse/`` stays usable without it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from m4fuse.evaluation.metrics import LESION_REPORTED_KEYS, REPORTED_METRIC_KEYS
from m4fuse.run.settings import amp_settings, train_config

#: ``wrap(model, optimizer, loader) -> (model, optimizer, loader)`` of :func:`train_site`.
Wrap = Callable[[torch.nn.Module, torch.optim.Optimizer, Any],
                tuple[torch.nn.Module, torch.optim.Optimizer, Any]]


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
    prox_mu: float = 0.0,
    prox_reference: Mapping[str, torch.Tensor] | None = None,
    schedule: tuple[int, int] | None = None,
    wrap: Wrap | None = None,
    on_empty_batch: Callable[[torch.optim.Optimizer], None] | None = None,
    lr_scale: Mapping[str, float] | None = None,
    optimizer_state: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Train ``model`` for ``epochs`` on ``records`` routed to ``expert_index``, or, with
    ``max_steps`` (default None: epochs), for exactly that many optimiser steps
    (``fl.local_steps``: :class:`FixedSteps` passes over the cases as often as needed).

    A fresh AdamW per call (FedAvg-style local training) whose warm-up/cosine learning rate
    continues one curve over the whole run: ``schedule = (round index, number of rounds)``
    places this call on it (default ``(0, 1)``: the curve spans this call alone). Returns
    ``{"loss", "num-examples"}`` with ``num-examples`` = number of training cases.

    ``wrap`` (default None: plain training) is called as ``model, optimizer, loader =
    wrap(model, optimizer, loader)`` after the optimiser and its schedule are built and right
    before the training loop (the ClientApp's DP-SGD wraps them with Opacus there; the caller
    keeps what it needs, e.g. extra metrics, in its own closure). ``on_empty_batch`` (default
    None) goes to :func:`m4fuse.training.engine.train_epochs` (a 0-case Poisson batch). ``lr_scale``
    (default None: one lr) multiplies the lr of the named parameters (e.g. the personal ones).

    ``optimizer_state`` (default None: a fresh AdamW, the result has no such key): AdamW
    state by parameter name (:func:`m4fuse.training.engine.optimizer_state_by_name`, e.g. ``{}`` in a
    site's first round) loaded into the new optimiser before training (parameters it does not
    name start fresh; the lr curve is unchanged); the result then carries the state after
    training as ``"optimizer_state"`` (``fl.optimizer_state``). ``on_epoch_end`` (default
    None) goes to :func:`m4fuse.training.engine.train_epochs`.
    """
    from m4fuse.data import make_loader

    loader = make_loader(
        list(records), expert_index, batch_size=int(cfg.train.batch_size),
        augment=bool(cfg.train.augment), shuffle=True,
        num_workers=int(cfg.train.num_workers), seed=seed,
    )
    return run_epochs(model, loader, cfg, device, epochs, seed, prox_mu, prox_reference,
                      schedule, len(records), wrap=wrap, on_empty_batch=on_empty_batch,
                      lr_scale=lr_scale, optimizer_state=optimizer_state,
                      on_epoch_end=on_epoch_end, max_steps=max_steps)


def run_epochs(
    model: torch.nn.Module,
    loader: Any,
    cfg: DictConfig,
    device: torch.device,
    epochs: int,
    seed: int,
    prox_mu: float = 0.0,
    prox_reference: Mapping[str, torch.Tensor] | None = None,
    schedule: tuple[int, int] | None = None,
    num_cases: int | None = None,
    wrap: Wrap | None = None,
    on_empty_batch: Callable[[torch.optim.Optimizer], None] | None = None,
    lr_scale: Mapping[str, float] | None = None,
    optimizer_state: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """``epochs`` passes of :func:`m4fuse.training.engine.train_epochs` with the configured optimiser
    (see :func:`train_site` for ``schedule``, ``wrap``, ``on_empty_batch``,
    ``optimizer_state`` and ``on_epoch_end``), or exactly ``max_steps`` optimiser steps
    (default None: epochs; then ``epochs`` is ignored and ``on_epoch_end`` runs once, after
    the last step). The result's ``steps`` are the optimiser steps taken."""
    from m4fuse.training.engine import (
        load_optimizer_state_by_name,
        make_optimizer,
        optimizer_state_by_name,
        train_epochs,
    )

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
    optimizer, scheduler = make_optimizer(model, tcfg, steps * count, start_step=steps * index,
                                          lr_scale=lr_scale)
    net, adamw = model, optimizer  # before any wrap: the names and state optimizer_state uses
    if optimizer_state:
        load_optimizer_state_by_name(adamw, net, optimizer_state)
    if prox_reference is not None:
        params = dict(model.named_parameters())
        prox_reference = {k: v for k, v in prox_reference.items() if k in params}
    if wrap is not None:
        model, optimizer, loader = wrap(model, optimizer, loader)
    if max_steps is not None:
        loader = FixedSteps(loader, int(max_steps))
    out = train_epochs(
        model, loader, optimizer, scheduler, tcfg, device,
        prox_mu=prox_mu, prox_reference=prox_reference, on_empty_batch=on_empty_batch,
        on_epoch_end=on_epoch_end,
    )
    result: dict[str, Any] = {"loss": float(out["loss"]),
                              "num-examples": float(out["num-examples"]), "steps": float(steps)}
    if num_cases is not None:
        result["num-examples"] = float(num_cases)
    if optimizer_state is not None:
        result["optimizer_state"] = optimizer_state_by_name(adamw, net)
    return result


def finetune_site(
    model: torch.nn.Module,
    records: Sequence[Any],
    expert_index: int,
    cfg: DictConfig,
    device: torch.device,
    personal: str,
    epochs: int,
    seed: int,
    on_epoch_end: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Fine-tune only the personal set ``personal`` (:data:`m4fuse.personal.sets.PERSONAL_SETS`) of
    ``model`` on ``records`` for ``epochs`` epochs, every other weight frozen: a fresh AdamW
    at ``train.lr`` x ``fl.personal_lr_scale`` (default 1) on its own warm-up/cosine curve.
    The freezing is undone afterwards. Returns ``{"loss", "num-examples", "steps"}``.
    ``on_epoch_end(epochs done)`` (default None) runs after each epoch (the ClientApp
    validates there and keeps the best epoch)."""
    from m4fuse.personal.sets import split_state

    if epochs < 1:
        raise ValueError(f"fine-tuning epochs must be >= 1, got {epochs}")
    names = set(split_state(dict(model.named_parameters()), personal)[1])
    if not names:
        raise ValueError(f"personal set {personal!r} selects no parameter of the model")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    scale = float(cfg.fl.get("personal_lr_scale", 1.0))
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
        model.train()
        return train_site(model, records, expert_index, cfg, device, epochs, seed,
                          lr_scale={n: scale for n in names} if scale != 1.0 else None,
                          on_epoch_end=on_epoch_end)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(before[n])


def finetune_seed(seed: int, site_index: int) -> int:
    """The seed of a site's "+FT" fine-tuning after the last round (``seed`` is the run's
    ``seed``, ``site_index`` the site's 0-based index): the one the ClientApp uses, so an
    offline fine-tuning (:mod:`simulations.finetune_runs`) draws the same batches."""
    return int(seed) * 1000 + int(site_index) * 100 + 99


def finetune_best_epoch(
    model: torch.nn.Module,
    train_records: Sequence[Any],
    val_records: Sequence[Any],
    expert_index: int,
    cfg: DictConfig,
    device: torch.device,
    personal: str,
    epochs: int,
    seed: int,
) -> dict[str, float]:
    """Fine-tune the personal set ``personal`` of ``model`` on ``train_records`` for up to
    ``epochs`` epochs, every other weight frozen (:func:`finetune_site`), keeping the best
    epoch (the "+FT" of a strategy, run once after the last round, before the final test).

    ``val_records`` decide: their mean Dice is measured before fine-tuning (epoch 0) and
    after each epoch, and the weights of the best epoch are kept in ``model`` (ties go to
    fewer epochs, so epoch 0, no fine-tuning, wins unless an epoch is strictly better; test
    cases are never looked at). The validation runs between epochs leave the training exactly
    as without them (the random number generators are restored), so the last epoch's weights
    are those of a plain ``epochs`` run. Returns ``finetune-steps``, ``finetune-epochs``
    (run), ``finetune-epochs-kept``, ``finetune-loss``, ``finetune-kept`` (1 when an epoch
    > 0 was kept, else 0) and the validation mean Dice before fine-tuning and of the kept
    weights (``finetune-val-before``/``-after``).

    A site with no validation cases (a small site of a sized federation) has nothing to
    choose an epoch by: it keeps its weights as they are (epoch 0, no step taken; the
    validation Dice entries are nan) and the log says so."""
    import logging
    import random

    if not val_records:
        logging.getLogger(__name__).info(
            "no fine-tuning: the site has no validation cases to choose an epoch by "
            "(%d training cases); its federated weights are kept", len(train_records))
        return {"finetune-steps": 0.0, "finetune-epochs": 0.0, "finetune-epochs-kept": 0.0,
                "finetune-loss": 0.0, "finetune-kept": 0.0,
                "finetune-val-before": float("nan"), "finetune-val-after": float("nan")}

    def val_dice() -> float:
        model.eval()
        return float(validate_site(model, val_records, expert_index, cfg, device)["dice_mean"])

    before = val_dice()
    best: dict[str, Any] = {
        "dice": before, "epoch": 0,
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}

    def after_epoch(epoch: int) -> None:
        rng = (random.getstate(), np.random.get_state())
        with torch.random.fork_rng(devices=[]):
            dice = val_dice()
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        model.train()
        if dice > best["dice"]:
            best.update(dice=dice, epoch=epoch,
                        state={k: v.detach().clone() for k, v in model.state_dict().items()})

    result = finetune_site(model, train_records, expert_index, cfg, device,
                           personal=personal, epochs=epochs, seed=seed,
                           on_epoch_end=after_epoch)
    if best["epoch"] != epochs:
        model.load_state_dict(best["state"])
    return {"finetune-steps": float(result["steps"]), "finetune-epochs": float(epochs),
            "finetune-epochs-kept": float(best["epoch"]),
            "finetune-loss": float(result["loss"]), "finetune-kept": float(best["epoch"] > 0),
            "finetune-val-before": before, "finetune-val-after": float(best["dice"])}


def personal_lr_scale(model: torch.nn.Module, cfg: DictConfig) -> dict[str, float] | None:
    """``{parameter name: fl.personal_lr_scale}`` for the parameters of the strategy's kept
    set, or None when the scale is 1 (default) or the strategy keeps nothing/everything."""
    from m4fuse.personal.sets import split_state
    from m4fuse.personal.sets import strategy as named_strategy

    scale = float(cfg.fl.get("personal_lr_scale", 1.0))
    kept = named_strategy(str(cfg.fl.strategy)).kept
    if scale == 1.0 or kept in ("none", "all"):
        return None
    names = split_state(dict(model.named_parameters()), kept)[1]
    return {n: scale for n in names}


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
    from m4fuse.training.engine import evaluate

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
        raise KeyError(f"engine.evaluate returned no {sorted(missing)}; got {sorted(metrics)}")
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


def test_site(
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
    from m4fuse.training.engine import test_original_grid

    if not records:
        raise ValueError("no test cases for this site")
    model.to(device)
    amp = {} if cfg is None else amp_settings(cfg)
    rows = list(test_original_grid(model, list(records), device, expert_index, **amp))
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
