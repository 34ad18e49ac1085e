"""The local train / evaluate loop (no Flower): used alike by the Flower client, the pooled and
the local-only baselines, so that every strategy trains with the same loss, optimiser and
schedule (docs/design.md §3).

- Loss: Dice + binary cross-entropy on the sigmoid region channels (``output="regions"``), or
  MONAI ``DiceCELoss`` with softmax over the 4 classes (``output="labels"``, target class map
  built from the region masks).
- Optimiser: AdamW; schedule: linear warm-up then cosine decay per optimiser step (MONAI
  ``WarmupCosineSchedule``), resumable at any step so that federated rounds continue one schedule.
- AMP (bfloat16 by default) and ``cudnn.benchmark`` on CUDA; plain float32 on CPU, deterministic
  for a seed.
- FedProx: ``prox_mu / 2 · Σ ||w − w_ref||²`` over the parameters named in ``prox_reference``.

The expert used for a batch is chosen by the caller: ``expert="site"`` takes each sample's
``site`` index from the batch (a pooled model with one expert per site, or a site's own model
whose loader gives index 0), an int fixes one expert, ``None`` runs the shared path only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.losses import DiceCELoss, DiceLoss
from monai.optimizers import WarmupCosineSchedule
from torch import nn

from m4fuse.data.regions import labels_to_regions, regions_to_labels
from m4fuse.evaluation.metrics import (
    REGION_METRIC_KEYS,
    lesion_region_scores,
    mean_scores,
    region_scores,
)
from m4fuse.inference.predict import (
    AMP_DTYPES,
    autocast,
    eval_mode,
    expert_tensor,
    logits_to_probs,
    output_mode,
    predict_probs,
    probs_to_regions,
    unwrap,
)
from m4fuse.run.runtime import resolve_device, seed_everything

Expert = str | int | None


@dataclass
class TrainConfig:
    """Local training settings (the ``train`` group of the Hydra configs maps onto it).

    Attributes:
        lr: peak AdamW learning rate, default 1e-3 (the networks are small, 0.3-2.7 M
            parameters, and federated rounds are short).
        weight_decay: AdamW decoupled weight decay, default 1e-5.
        betas: AdamW betas, default (0.9, 0.999).
        batch_size: cases per batch, default 1 (a 64×128×128 case per step; used by callers that
            build loaders).
        local_epochs: passes over the local data per :func:`train_epochs` call, default 1.
        warmup_steps: optimiser steps of linear warm-up from 0, default 0 (none).
        min_lr: floor of the cosine decay, default 0.0.
        amp: mixed precision on CUDA, default True (ignored on CPU unless ``amp_cpu``).
        amp_dtype: ``"bfloat16"`` (default, no loss scaling needed) or ``"float16"`` (with a
            ``GradScaler``).
        amp_cpu: opt-in mixed precision on the CPU, default False: with ``amp`` also true, the
            forward runs under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (training, and
            evaluation/inference where the caller passes it), the loss in float32, parameters
            and gradients stay float32. CPU autocast is bfloat16 only, so ``amp_cpu`` with
            ``amp_dtype="float16"`` is refused (on any host, so that a config shared by CPU and
            GPU sites fails early). Off by default: CPU float32 stays the default
            (deterministic): the project's measured comparisons ran in float32 on the
            CPU. A non-finite gradient or global gradient norm under CPU autocast raises
            ``FloatingPointError`` before the optimiser step, instead of writing NaN into the
            weights or letting an infinite norm clip every gradient to zero.
        grad_clip: max global gradient norm, default 12.0; ``None`` or 0 disables clipping
            (leave it off under Opacus, which clips per sample itself).
        cudnn_benchmark: ``torch.backends.cudnn.benchmark`` on CUDA, default True (fixed input
            size, so the autotuned kernels are reused).
        seed: seed of torch/numpy/random at the start of each :func:`train_epochs` call, default
            0; ``None`` leaves the global RNG alone. Use ``seed + round`` across rounds.
        lambda_dice: weight of the Dice term, default 1.0.
        lambda_ce: weight of the (binary) cross-entropy term, default 1.0.
    """

    lr: float = 1e-3
    weight_decay: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = 1
    local_epochs: int = 1
    warmup_steps: int = 0
    min_lr: float = 0.0
    amp: bool = True
    amp_dtype: str = "bfloat16"
    amp_cpu: bool = False
    grad_clip: float | None = 12.0
    cudnn_benchmark: bool = True
    seed: int | None = 0
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0

    def __post_init__(self) -> None:
        def positive(name: str, value: Any, allow_zero: bool = False) -> None:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < 0 or (value == 0 and not allow_zero):
                raise ValueError(f"TrainConfig.{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")

        positive("lr", self.lr)
        positive("weight_decay", self.weight_decay, allow_zero=True)
        positive("min_lr", self.min_lr, allow_zero=True)
        positive("lambda_dice", self.lambda_dice, allow_zero=True)
        positive("lambda_ce", self.lambda_ce, allow_zero=True)
        for name in ("batch_size", "local_epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if self.grad_clip is not None:
            positive("grad_clip", self.grad_clip, allow_zero=True)
        if self.amp_dtype not in AMP_DTYPES:
            raise ValueError(f"TrainConfig.amp_dtype must be one of {sorted(AMP_DTYPES)}, got {self.amp_dtype!r}")
        if not isinstance(self.amp_cpu, bool):
            raise ValueError(f"TrainConfig.amp_cpu must be a bool, got {self.amp_cpu!r}")
        if self.amp and self.amp_cpu and self.amp_dtype != "bfloat16":
            raise ValueError("TrainConfig.amp_cpu (CPU autocast) runs in bfloat16 only, got "
                             f"amp_dtype={self.amp_dtype!r}: set train.amp_dtype=bfloat16 or "
                             "train.amp_cpu=false")
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"TrainConfig.seed must be an int or None, got {self.seed!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping (e.g. a Hydra ``train`` group); unknown keys are an error."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; known: {sorted(known)}")
        return cls(**dict(data))


class RegionDiceBCELoss(nn.Module):
    """Dice (MONAI ``DiceLoss``, sigmoid) + binary cross-entropy on overlapping region channels.

    Written here because MONAI's ``DiceCELoss`` applies BCE only to single-channel inputs; for
    several channels it uses a softmax cross-entropy, which is wrong for the nested (overlapping)
    WT/TC/ET masks. Both terms average over batch and channels.
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0) -> None:
        super().__init__()
        self.dice = DiceLoss(sigmoid=True)
        self.bce = nn.BCEWithLogitsLoss()
        self.lambda_dice = lambda_dice
        self.lambda_ce = lambda_ce

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(logits.dtype)
        return self.lambda_dice * self.dice(logits, target) + self.lambda_ce * self.bce(logits, target)


class LabelDiceCELoss(nn.Module):
    """MONAI ``DiceCELoss`` (softmax, one-hot target) on the 4-class output; the target class
    map (0 background, 1 NCR, 2 ED, 3 ET) is built from the WT/TC/ET region masks."""

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0) -> None:
        super().__init__()
        self.loss = DiceCELoss(
            softmax=True, to_onehot_y=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        classes = regions_to_labels(target.transpose(0, 1) > 0.5, et_label=3)  # (B, ...)
        return self.loss(logits, classes.unsqueeze(1).long())


def make_loss(mode: str, cfg: TrainConfig | None = None) -> nn.Module:
    """The loss for an output mode: ``"regions"`` -> :class:`RegionDiceBCELoss`, ``"labels"``
    -> :class:`LabelDiceCELoss`; term weights from ``cfg`` (default 1 and 1)."""
    cfg = cfg or TrainConfig()
    if mode == "regions":
        return RegionDiceBCELoss(cfg.lambda_dice, cfg.lambda_ce)
    if mode == "labels":
        return LabelDiceCELoss(cfg.lambda_dice, cfg.lambda_ce)
    raise ValueError(f"output mode must be 'regions' or 'labels', got {mode!r}")


def make_optimizer(
    model: nn.Module, cfg: TrainConfig, total_steps: int, start_step: int = 0,
    lr_scale: Mapping[str, float] | None = None,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the trainable parameters and a warm-up + cosine schedule stepped per batch.

    Args:
        model: the network (its ``requires_grad`` parameters are optimised).
        cfg: lr, weight decay, betas, warm-up steps, min lr.
        total_steps: optimiser steps of the whole schedule (e.g. rounds × epochs × batches).
        start_step: steps already done (a later federated round continues the same curve);
            default 0.
        lr_scale: parameter name -> lr multiplier (own AdamW param group per multiplier, same
            schedule shape); default None: one lr for all.

    Returns ``(optimizer, scheduler)``.
    """
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    if not isinstance(start_step, int) or not 0 <= start_step <= total_steps:
        raise ValueError(f"start_step must be an int in [0, total_steps={total_steps}], got {start_step!r}")
    if cfg.warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps={cfg.warmup_steps} must be < total_steps={total_steps}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    scales = dict(lr_scale or {})
    unknown = sorted(set(scales) - {n for n, _ in model.named_parameters()})
    if unknown:
        raise KeyError(f"lr_scale names parameters the model lacks: {unknown[:5]}")
    by_scale: dict[float, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            by_scale.setdefault(float(scales.get(name, 1.0)), []).append(p)
    groups = [{"params": ps, "lr": cfg.lr * k} for k, ps in by_scale.items()]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]  # lets the scheduler start at start_step
    scheduler = WarmupCosineSchedule(
        optimizer, warmup_steps=cfg.warmup_steps, t_total=total_steps, end_lr=cfg.min_lr,
        last_epoch=start_step - 1,
    )  # LambdaLR's constructor steps once: the optimiser's lr is now that of ``start_step``
    return optimizer, scheduler


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, model: nn.Module
                            ) -> dict[str, dict[str, torch.Tensor]]:
    """The per-parameter state of ``optimizer`` (AdamW: ``step``, ``exp_avg``,
    ``exp_avg_sq``) keyed by parameter name in the unwrapped ``model``, as CPU copies.

    Names, not positions: the param groups (and their order) may differ between two
    optimisers over the same model (e.g. with ``lr_scale``), the names do not. Parameters
    without state (never stepped) are left out; hyper-parameters (lr ...) are not state.
    """
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for param, state in optimizer.state.items():
        name = names.get(id(param))
        if name is None or not state:
            continue
        out[name] = {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor)
                         else torch.tensor(float(v))) for k, v in state.items()}
    return out


def load_optimizer_state_by_name(optimizer: torch.optim.Optimizer, model: nn.Module,
                                 state: Mapping[str, Mapping[str, torch.Tensor]]) -> int:
    """Put a :func:`optimizer_state_by_name` mapping into ``optimizer`` (built by
    :func:`make_optimizer`); returns the number of parameters given a state.

    Entries of parameters the optimiser does not train (frozen here) are skipped; the
    optimiser's other parameters keep a fresh state. The lr and schedule are untouched. A
    name the model lacks, or a moment of another shape than its parameter, is an error.
    """
    params = dict(unwrap(model).named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise KeyError(f"optimiser state names parameters the model lacks: {unknown[:5]}")
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    loaded = 0
    for name, entry in state.items():
        param = params[name]
        if id(param) not in trained:
            continue
        restored: dict[str, torch.Tensor] = {}
        for key, value in entry.items():
            if key == "step":  # AdamW keeps its step count as a CPU float tensor
                restored[key] = torch.as_tensor(value, dtype=torch.float32).detach().clone()
                continue
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"optimiser state {name}.{key} has shape {tuple(value.shape)}, "
                                 f"the parameter {tuple(param.shape)}")
            restored[key] = value.detach().to(device=param.device, dtype=param.dtype).clone()
        optimizer.state[param] = restored
        loaded += 1
    return loaded


def _prepare(model: nn.Module, device: torch.device | str, cfg: TrainConfig | None) -> torch.device:
    device = resolve_device(device)
    model.to(device)
    if device.type == "cuda" and cfg is not None:
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    return device


def _named_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters by their name in the unwrapped network (so Opacus' ``_module.`` prefix does
    not change the keys the proximal reference uses)."""
    return dict(unwrap(model).named_parameters())


def _check_batch(batch: Any) -> None:
    if not isinstance(batch, Mapping) or "image" not in batch or "label" not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"a batch must be a dict with 'image', 'label' and 'site', got {keys}")


def _proximal_pairs(model: nn.Module, prox_reference: Mapping[str, torch.Tensor] | None,
                    device: torch.device) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """``(parameter, reference on its device and dtype)`` for each key of ``prox_reference``
    (FedProx's shared weights at round start), checked against the model's parameters."""
    if not prox_reference:
        raise ValueError("prox_mu > 0 needs prox_reference (the shared weights at round start)")
    params = _named_params(model)
    prox: list[tuple[nn.Parameter, torch.Tensor]] = []
    for key, ref in prox_reference.items():
        if key not in params:
            raise KeyError(f"prox_reference key {key!r} is not a parameter of the model")
        if tuple(ref.shape) != tuple(params[key].shape):
            raise ValueError(
                f"prox_reference[{key!r}] has shape {tuple(ref.shape)}, "
                f"parameter has {tuple(params[key].shape)}"
            )
        prox.append((params[key], ref.detach().to(device=device, dtype=params[key].dtype)))
    return prox


def _empty_step(optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler | None,
                on_empty_batch: Callable[[torch.optim.Optimizer], None] | None) -> None:
    """A batch of 0 cases: ``on_empty_batch(optimizer)`` instead of a step (DP-SGD's Poisson
    sampling draws them), then the scheduler's step; without a handler it raises."""
    if on_empty_batch is None:
        raise ValueError("the loader gave an empty batch (0 cases) and no "
                         "on_empty_batch handler was given")
    on_empty_batch(optimizer)
    if scheduler is not None:
        scheduler.step()


def _train_step(model: nn.Module, batch: Mapping[str, Any], optimizer: torch.optim.Optimizer,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                scaler: torch.amp.GradScaler, cfg: TrainConfig, device: torch.device,
                expert: Expert, prox_mu: float,
                prox: list[tuple[nn.Parameter, torch.Tensor]]) -> tuple[float, int]:
    """One optimiser step on a non-empty ``batch`` (forward under AMP, loss in float32, the
    proximal term, backward, clipping, step); ``(segmentation loss, cases in the batch)``.

    Under CPU autocast (``cfg.amp_cpu``) a non-finite gradient or gradient norm raises
    ``FloatingPointError`` before the step (see :class:`TrainConfig`)."""
    x = batch["image"].to(device, non_blocking=True).float()
    y = batch["label"].to(device, non_blocking=True)
    b = x.shape[0]
    routes = expert_tensor(expert, b, device, batch.get("site"))
    optimizer.zero_grad(set_to_none=True)
    cpu_bf16 = cfg.amp and cfg.amp_cpu and device.type == "cpu"
    with autocast(device, cfg.amp, cfg.amp_dtype, cpu=cfg.amp_cpu):
        logits = model(x, routes)
    loss = loss_fn(logits.float(), y)  # outside autocast: the loss is float32
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"non-finite loss {loss.item()} on cases {list(batch.get('case', []))}"
        )
    objective = loss
    if prox:
        objective = loss + 0.5 * prox_mu * sum((p - r).pow(2).sum() for p, r in prox)
    scaler.scale(objective).backward()
    norm = None
    if cfg.grad_clip:
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    # With clipping, the global norm decides: a NaN/inf gradient makes it non-finite, and so
    # do finite but huge ones, which the clipping would scale to zero (a silent no-op step).
    if cpu_bf16 and not (bool(torch.isfinite(norm)) if norm is not None
                         else _finite_gradients(model)):
        raise FloatingPointError(
            f"non-finite gradient or gradient norm under CPU bfloat16 autocast "
            f"(train.amp_cpu) on cases {list(batch.get('case', []))}; train.amp_cpu=false "
            f"trains in float32"
        )
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach()), b


def _finite_gradients(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p.grad).all()) for p in model.parameters()
               if p.grad is not None)


def train_epochs(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    cfg: TrainConfig,
    device: torch.device | str = "auto",
    prox_mu: float = 0.0,
    prox_reference: Mapping[str, torch.Tensor] | None = None,
    expert: Expert = "site",
    on_empty_batch: Callable[[torch.optim.Optimizer], None] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
) -> dict[str, float | int]:
    """Train ``cfg.local_epochs`` passes over ``loader``.

    Args:
        model: network with ``forward(x, expert)``; moved to ``device``, left in train mode.
        loader: batches ``{"image" (B,4,D,H,W), "label" (B,3,D,H,W) WT/TC/ET, "site" (B,)}``
            (``m4fuse.data.make_loader``).
        optimizer: from :func:`make_optimizer` (or an Opacus ``DPOptimizer`` wrapping it).
        scheduler: stepped once per optimiser step; ``None`` keeps the lr fixed.
        cfg: loss weights, AMP, clipping, seed, epochs.
        device: ``"auto"``, ``"cpu"``, ``"cuda:N"`` or a torch.device.
        prox_mu: FedProx coefficient μ (default 0: no proximal term).
        prox_reference: ``{parameter name: tensor}`` of the shared weights at round start; the
            term covers exactly these keys (names as in the unwrapped model's
            ``named_parameters``). Required when ``prox_mu > 0``.
        expert: ``"site"`` (default, the batch's ``site`` indices), an int, or ``None``.
        on_empty_batch: called with ``optimizer`` instead of forward/backward/step for a batch
            of 0 cases (DP-SGD's Poisson sampling draws them; Opacus' step must still happen,
            e.g. ``m4fuse.training.dp.noise_only_step``); the scheduler still steps. Default None:
            an empty batch raises ``ValueError``.
        on_epoch_end: called with the number of passes done (1, 2 ...) after each pass
            (e.g. a validation that keeps the best epoch); it must leave the model in train
            mode. Default None.

    Returns:
        ``{"loss": mean segmentation loss per case over all epochs (without the proximal term;
        NaN when every batch was empty), "num-examples": cases seen per epoch}``.
    """
    if not isinstance(prox_mu, (int, float)) or not math.isfinite(prox_mu) or prox_mu < 0:
        raise ValueError(f"prox_mu must be a finite number >= 0, got {prox_mu!r}")
    device = _prepare(model, device, cfg)
    if cfg.seed is not None:
        seed_everything(cfg.seed)
    prox = _proximal_pairs(model, prox_reference, device) if prox_mu > 0 else []
    loss_fn = make_loss(output_mode(model), cfg)
    use_scaler = cfg.amp and device.type == "cuda" and cfg.amp_dtype == "float16"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    model.train()
    total_loss, total_cases, empty_steps = 0.0, 0, 0
    for epoch in range(cfg.local_epochs):
        for batch in loader:
            _check_batch(batch)
            if batch["image"].shape[0] == 0:
                _empty_step(optimizer, scheduler, on_empty_batch)
                empty_steps += 1
                continue
            loss, b = _train_step(model, batch, optimizer, loss_fn, scaler, cfg, device, expert,
                                  prox_mu, prox)
            if scheduler is not None:
                scheduler.step()
            total_loss += loss * b
            total_cases += b
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1)
    if total_cases == 0:
        if empty_steps:
            return {"loss": float("nan"), "num-examples": 0}
        raise ValueError("the loader gave no batches: nothing to train on")
    return {"loss": total_loss / total_cases, "num-examples": total_cases // cfg.local_epochs}


def _as_spacing(spacing: Sequence[float] | float) -> tuple[float, float, float]:
    if isinstance(spacing, (int, float)):
        return (float(spacing),) * 3
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3:
        raise ValueError(f"spacing must be one number or three (D, H, W), got {spacing!r}")
    return sp  # type: ignore[return-value]


def evaluate(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    device: torch.device | str = "auto",
    expert: Expert = "site",
    spacing: Sequence[float] | float | Mapping[str, Sequence[float]] = 1.0,
    amp: bool = True,
    amp_dtype: str = "bfloat16",
    loss_cfg: TrainConfig | None = None,
    amp_cpu: bool = False,
) -> dict[str, float | int]:
    """Loss, Dice and HD95 per region at the training resolution, mean over cases.

    Args:
        model: network; evaluated in eval mode under ``torch.inference_mode`` (its previous
            train/eval mode is restored after).
        loader: batches as for :func:`train_epochs`.
        device: ``"auto"``, ``"cpu"``, ``"cuda:N"`` or a torch.device.
        expert: ``"site"`` (default), an int, or ``None`` (shared path only).
        spacing: voxel size (D, H, W) in mm of the resized grid used for HD95: one number or
            triple for every case (default 1.0, i.e. HD95 in voxels unless the grid is 1 mm),
            or ``{case id: (D, H, W)}`` for each case's own grid (batches carry ``"case"``;
            :func:`m4fuse.training.site_steps.training_grid_spacing` gives it for a cached case).
        amp: autocast on CUDA, default True, in ``amp_dtype`` (default bfloat16); callers
            pass the run's ``train.amp``/``train.amp_dtype``/``train.amp_cpu`` so evaluation
            matches training.
        loss_cfg: loss term weights (default those of ``TrainConfig()``).
        amp_cpu: with ``amp``, bfloat16 autocast on the CPU too, default False (float32;
            :func:`m4fuse.inference.predict.autocast`). The loss and metrics use float32 logits.

    Returns:
        ``{"loss", "dice_wt", "dice_tc", "dice_et", "hd95_wt", "hd95_tc", "hd95_et",
        "dice_mean", "hd95_mean", "num-examples"}``.
    """
    device = _prepare(model, device, None)
    per_case = isinstance(spacing, Mapping)
    sp = None if per_case else _as_spacing(spacing)  # type: ignore[arg-type]
    mode = output_mode(model)
    loss_fn = make_loss(mode, loss_cfg)
    rows: list[dict[str, float]] = []
    total_loss = 0.0
    with eval_mode(model), torch.inference_mode():
        for batch in loader:
            _check_batch(batch)
            x = batch["image"].to(device).float()
            y = batch["label"].to(device)
            routes = expert_tensor(expert, x.shape[0], device, batch.get("site"))
            with autocast(device, amp, amp_dtype, cpu=amp_cpu):
                logits = model(x, routes)
            logits = logits.float()
            total_loss += float(loss_fn(logits, y)) * x.shape[0]
            probs = logits_to_probs(logits, mode).cpu()
            truth = y.cpu() > 0.5
            for i in range(x.shape[0]):
                if per_case:
                    case = batch.get("case")
                    case_id = None if case is None else str(case[i])
                    if case_id not in spacing:  # type: ignore[operator]
                        raise KeyError(f"no spacing for case {case_id!r} (batch key 'case'); "
                                       f"spacing has {len(spacing)} cases")
                    case_sp = _as_spacing(spacing[case_id])  # type: ignore[index]
                else:
                    case_sp = sp  # type: ignore[assignment]
                rows.append(region_scores(probs_to_regions(probs[i], mode), truth[i], case_sp))
    if not rows:
        raise ValueError("the loader gave no batches: nothing to evaluate")
    out: dict[str, float | int] = {"loss": total_loss / len(rows)}
    out.update(mean_scores(rows))
    out["num-examples"] = len(rows)
    return out


def _expert_for(expert: Expert | Mapping[str, int], site: str | None) -> int | None:
    if isinstance(expert, Mapping):
        if site not in expert:
            raise KeyError(f"no expert index for site {site!r}; known sites: {sorted(expert)}")
        return int(expert[site])
    if isinstance(expert, str):
        raise ValueError(
            f"test_original_grid takes an expert index, None or {{site: index}}, got {expert!r}"
        )
    return expert


def test_original_grid(
    model: nn.Module,
    records: Sequence[Any],
    device: torch.device | str = "auto",
    expert_index: int | None | Mapping[str, int] = None,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.5,
    amp: bool = True,
    amp_dtype: str = "bfloat16",
    amp_cpu: bool = False,
) -> list[dict[str, Any]]:
    """Score test cases on their original voxel grid, at their original spacing (docs/design.md §5).

    For each record (``m4fuse.data.CaseRecord``): predict on the cached volume (sliding window
    when it is larger than ``roi_size``, else one forward), map the probabilities back with
    ``m4fuse.data.restore_to_original`` (linear), threshold / argmax there, and compare with the
    case's segmentation file read by nibabel.

    Args:
        model: network.
        records: cases with a segmentation (``seg_file``).
        device: ``"auto"``, ``"cpu"``, ``"cuda:N"`` or a torch.device.
        expert_index: an expert index for every case, ``None`` (shared path only), or
            ``{site name: index}`` for a model with one expert per site.
        roi_size: sliding-window size (D, H, W); default None = the cached volume whole.
        overlap: sliding-window overlap, default 0.5.
        amp: autocast on CUDA, default True (``amp_dtype`` default bfloat16); on the CPU
            too, in bfloat16, with ``amp_cpu`` (default False: float32).

    Returns:
        One row per case: ``{"case", "site", "dice_wt", "dice_tc", "dice_et", "hd95_wt",
        "hd95_tc", "hd95_et", "dice_mean", "hd95_mean"}`` and the lesion-wise scores and
        counts of the BraTS 2023+ rule, ``gli`` parameters (:data:`m4fuse.evaluation.metrics.LESION_KEYS`:
        ``lesion_dice_wt``, ..., ``lesion_fp_et``).
    """
    from m4fuse.data import restore_to_original  # data imports heavy MONAI transforms

    device = _prepare(model, device, None)
    mode = output_mode(model)
    rows: list[dict[str, Any]] = []
    for record in records:
        seg_file = getattr(record, "seg_file", None)
        if not seg_file:
            raise ValueError(f"case {record.case_id} has no segmentation file to score against")
        probs = predict_probs(
            model, np.array(record.image(), dtype=np.float32), device,
            _expert_for(expert_index, record.site), roi_size, overlap, amp=amp, amp_dtype=amp_dtype,
            amp_cpu=amp_cpu,
        )
        pred = probs_to_regions(restore_to_original(probs.numpy(), record, mode="linear"), mode)
        truth_img = nib.load(seg_file)
        truth = np.asarray(truth_img.dataobj)
        if truth.shape != pred.shape[1:]:
            raise ValueError(
                f"case {record.case_id}: segmentation {seg_file} has shape {truth.shape}, "
                f"restored prediction {tuple(pred.shape[1:])}"
            )
        truth_regions = labels_to_regions(np.rint(truth).astype(np.int16), record.et_label)
        scores = region_scores(pred.numpy(), truth_regions, record.spacing)
        scores.update(lesion_region_scores(pred.numpy(), truth_regions, record.spacing))
        rows.append({"case": record.case_id, "site": record.site, **scores})
    return rows


__all__ = [
    "REGION_METRIC_KEYS", "LabelDiceCELoss", "RegionDiceBCELoss", "TrainConfig", "evaluate",
    "make_loss", "make_optimizer", "seed_everything", "test_original_grid", "train_epochs",
]
