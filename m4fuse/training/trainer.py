"""The local trainer (no Flower): one object holding a site's model, optimiser, schedule,
loss and AMP settings for one local training call, used alike by the Flower client, the
pooled and local-only baselines and the fine-tuning (docs/design.md §3).

:class:`LocalTrainer` passes over a loader (``passes``, one yield per epoch, so that a caller
can validate between epochs) or trains all epochs at once (``train_epochs``). DP-SGD is its
subclass :class:`m4fuse.training.dp.PrivateTrainer`, which wraps model, optimiser and loader
with Opacus (``prepare``) and takes a noise-only step on an empty Poisson batch
(``empty_batch``). The optimiser state a site keeps between rounds (``fl.optimizer_state``)
is read and written by name here (:meth:`LocalTrainer.optimizer_state`).

- FedProx: ``prox_mu / 2 · Σ ||w − w_ref||²`` over the parameters named in ``prox_reference``.
- The expert of a batch: ``"site"`` takes each sample's ``site`` index from the batch, an int
  fixes one expert, ``None`` runs the shared path only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from m4fuse.inference.predict import autocast, expert_tensor, output_mode, unwrap
from m4fuse.run.runtime import seed_everything
from m4fuse.training.engine import (
    Expert,
    TrainConfig,
    check_batch,
    load_optimizer_state_by_name,
    make_loss,
    make_optimizer,
    optimizer_state_by_name,
    prepare_device,
)


class LocalTrainer:
    """Local training of one model with one optimiser and schedule.

    Args:
        model: network with ``forward(x, expert)``; moved to ``device``, left in train mode.
        optimizer: from :func:`m4fuse.training.engine.make_optimizer` (its state is what
            :meth:`optimizer_state` reads).
        scheduler: stepped once per optimiser step; ``None`` keeps the lr fixed.
        cfg: loss weights, AMP, clipping, seed, epochs (``cfg.local_epochs`` passes).
        device: ``"auto"``, ``"cpu"``, ``"cuda:N"`` or a torch.device.
        expert: ``"site"`` (default, the batch's ``site`` indices), an int, or ``None``.
        prox_mu: FedProx coefficient μ (default 0: no proximal term).
        prox_reference: ``{parameter name: tensor}`` of the shared weights at round start; the
            term covers exactly these keys (names as in the unwrapped model's
            ``named_parameters``). Required when ``prox_mu > 0``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None, cfg: TrainConfig,
                 device: torch.device | str = "auto", expert: Expert = "site",
                 prox_mu: float = 0.0,
                 prox_reference: Mapping[str, torch.Tensor] | None = None) -> None:
        if not isinstance(prox_mu, (int, float)) or not math.isfinite(prox_mu) or prox_mu < 0:
            raise ValueError(f"prox_mu must be a finite number >= 0, got {prox_mu!r}")
        self.model, self.optimizer, self.scheduler, self.cfg = model, optimizer, scheduler, cfg
        # what the loop runs forward and steps (a subclass may wrap them, e.g. Opacus)
        self.forward_model: nn.Module = model
        self.step_optimizer: torch.optim.Optimizer = optimizer
        self.device, self.expert = device, expert
        self.prox_mu, self.prox_reference = prox_mu, prox_reference
        self._loss, self._cases, self._empty = 0.0, 0, 0

    @classmethod
    def scheduled(cls, model: nn.Module, cfg: TrainConfig, total_steps: int, start_step: int = 0,
                  lr_scale: Mapping[str, float] | None = None,
                  optimizer_state: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                  **kwargs: Any) -> LocalTrainer:
        """A trainer with AdamW and the warm-up/cosine schedule of
        :func:`m4fuse.training.engine.make_optimizer` (``total_steps``, ``start_step``,
        ``lr_scale``), the kept ``optimizer_state`` (by parameter name, default None: fresh)
        loaded into it; ``kwargs`` go to the constructor."""
        optimizer, scheduler = make_optimizer(model, cfg, total_steps, start_step=start_step,
                                              lr_scale=lr_scale)
        if optimizer_state:
            load_optimizer_state_by_name(optimizer, model, optimizer_state)
        return cls(model, optimizer, scheduler, cfg, **kwargs)

    def prepare(self, loader: Any) -> Any:
        """The loader to pass over (here ``loader`` itself; DP-SGD wraps it)."""
        return loader

    def empty_batch(self) -> None:
        """A batch of 0 cases: refused here (only DP-SGD's Poisson sampling draws them)."""
        raise ValueError("the loader gave an empty batch (0 cases); only DP-SGD's Poisson "
                         "sampling may, and its trainer takes a noise-only step for it")

    def close(self) -> None:
        """Undo what :meth:`prepare` attached to the model (nothing here)."""

    def optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """The optimiser's per-parameter state by parameter name
        (:func:`m4fuse.training.engine.optimizer_state_by_name`)."""
        return optimizer_state_by_name(self.optimizer, self.model)

    def passes(self, loader: Iterable[Mapping[str, Any]]) -> Iterator[int]:
        """Train ``cfg.local_epochs`` passes over ``loader``, yielding the passes done (1, 2
        ...) after each (a caller validating there must leave the model in train mode).

        Seeds torch/numpy/random with ``cfg.seed`` first. A batch of 0 cases goes to
        :meth:`empty_batch` and the scheduler still steps. :meth:`summary` gives the result.
        """
        model = self.forward_model
        device = prepare_device(model, self.device, self.cfg)
        if self.cfg.seed is not None:
            seed_everything(self.cfg.seed)
        prox = _proximal_pairs(model, self.prox_reference, device) if self.prox_mu > 0 else []
        loss_fn = make_loss(output_mode(model), self.cfg)
        use_scaler = self.cfg.amp and device.type == "cuda" and self.cfg.amp_dtype == "float16"
        scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        model.train()
        self._loss, self._cases, self._empty = 0.0, 0, 0
        for epoch in range(self.cfg.local_epochs):
            for batch in loader:
                check_batch(batch)
                if batch["image"].shape[0] == 0:
                    self.empty_batch()
                    self._empty += 1
                else:
                    loss, b = _train_step(model, batch, self.step_optimizer, loss_fn, scaler,
                                          self.cfg, device, self.expert, self.prox_mu, prox)
                    self._loss += loss * b
                    self._cases += b
                if self.scheduler is not None:
                    self.scheduler.step()
            yield epoch + 1

    def summary(self) -> dict[str, float | int]:
        """``{"loss": mean segmentation loss per case over all passes (without the proximal
        term; NaN when every batch was empty), "num-examples": cases seen per pass}``."""
        if self._cases == 0:
            if self._empty:
                return {"loss": float("nan"), "num-examples": 0}
            raise ValueError("the loader gave no batches: nothing to train on")
        return {"loss": self._loss / self._cases,
                "num-examples": self._cases // self.cfg.local_epochs}

    def train_epochs(self, loader: Iterable[Mapping[str, Any]]) -> dict[str, float | int]:
        """All ``cfg.local_epochs`` passes of :meth:`passes`; returns :meth:`summary`."""
        for _ in self.passes(loader):
            pass
        return self.summary()


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
) -> dict[str, float | int]:
    """``cfg.local_epochs`` passes over ``loader`` with a :class:`LocalTrainer` of these
    arguments (see there); loader batches ``{"image" (B,4,D,H,W), "label" (B,3,D,H,W)
    WT/TC/ET, "site" (B,)}`` (``m4fuse.data.make_loader``)."""
    trainer = LocalTrainer(model, optimizer, scheduler, cfg, device, expert, prox_mu,
                           prox_reference)
    return trainer.train_epochs(loader)


def _named_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters by their name in the unwrapped network (so Opacus' ``_module.`` prefix does
    not change the keys the proximal reference uses)."""
    return dict(unwrap(model).named_parameters())



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


__all__ = ["LocalTrainer", "train_epochs"]
