"""Local training settings, losses and optimiser (no Flower), shared by the local trainer
(:mod:`m4fuse.training.trainer`) and the scoring (:mod:`m4fuse.training.scoring`), so that
every strategy trains with the same loss, optimiser and schedule (docs/design.md §3).

- Loss: Dice + binary cross-entropy on the sigmoid region channels (``output="regions"``), or
  MONAI ``DiceCELoss`` with softmax over the 4 classes (``output="labels"``, target class map
  built from the region masks).
- Optimiser: AdamW; schedule: linear warm-up then cosine decay per optimiser step (MONAI
  ``WarmupCosineSchedule``), resumable at any step so that federated rounds continue one schedule.
- AMP (bfloat16 by default) and ``cudnn.benchmark`` on CUDA; plain float32 on CPU, deterministic
  for a seed.

The expert used for a batch (:data:`Expert`) is chosen by the caller: ``"site"`` takes each
sample's ``site`` index from the batch (a pooled model with one expert per site, or a site's
own model whose loader gives index 0), an int fixes one expert, ``None`` the shared path only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from monai.losses import DiceCELoss, DiceLoss
from monai.optimizers import WarmupCosineSchedule
from torch import nn

from m4fuse.data.regions import regions_to_labels
from m4fuse.evaluation.metrics import (
    REGION_METRIC_KEYS,
)
from m4fuse.inference.predict import (
    AMP_DTYPES,
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


def prepare_device(model: nn.Module, device: torch.device | str, cfg: TrainConfig | None
                   ) -> torch.device:
    """Resolve ``device``, move ``model`` there; on CUDA set ``cudnn.benchmark`` from ``cfg``."""
    device = resolve_device(device)
    model.to(device)
    if device.type == "cuda" and cfg is not None:
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    return device


def check_batch(batch: Any) -> None:
    """Refuse a batch that is not a dict with ``image`` and ``label``."""
    if not isinstance(batch, Mapping) or "image" not in batch or "label" not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"a batch must be a dict with 'image', 'label' and 'site', got {keys}")


__all__ = [
    "REGION_METRIC_KEYS", "LabelDiceCELoss", "RegionDiceBCELoss", "TrainConfig", "check_batch",
    "load_optimizer_state_by_name", "make_loss", "make_optimizer", "optimizer_state_by_name",
    "prepare_device", "seed_everything",
]
