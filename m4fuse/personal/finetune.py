"""Fine-tuning of what a site keeps (no Flower): its personal set trained on its own cases,
every other weight frozen, and the learning-rate scale of the personal weights.

The "+FT" of a strategy (``fedavg-ft``, ``personal-ft`` ...) runs :func:`finetune_best_epoch`
once after the last round, before the final test, in the ClientApp and offline
(:mod:`simulations.finetune_runs`) alike; ``fl.personal_lr_scale`` scales the personal
weights' lr in fine-tuning and, through :func:`personal_lr_scale`, in every round.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from m4fuse.personal.sets import split_state
from m4fuse.personal.sets import strategy as named_strategy
from m4fuse.training.site_steps import site_loader, site_trainer, validate_site
from m4fuse.training.trainer import LocalTrainer

log = logging.getLogger(__name__)


@contextmanager
def personal_only(model: torch.nn.Module, personal: str) -> Iterator[set[str]]:
    """Only the parameters of the personal set ``personal`` trainable inside the block (their
    names are yielded); every parameter's ``requires_grad`` is restored after."""
    names = set(split_state(dict(model.named_parameters()), personal)[1])
    if not names:
        raise ValueError(f"personal set {personal!r} selects no parameter of the model")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
        yield names
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(before[n])


def _finetune_trainer(model: torch.nn.Module, records: Sequence[Any], expert_index: int,
                      cfg: DictConfig, device: torch.device, names: set[str], epochs: int,
                      seed: int) -> tuple[LocalTrainer, Any, int]:
    """The trainer of a fine-tuning of the parameters ``names`` (already the only trainable
    ones): a fresh AdamW at ``train.lr`` x ``fl.personal_lr_scale`` on its own curve."""
    scale = float(cfg.fl.get("personal_lr_scale", 1.0))
    model.train()
    return site_trainer(model, site_loader(records, expert_index, cfg, seed), cfg, device,
                        epochs, seed, lr_scale={n: scale for n in names} if scale != 1.0 else None)


def finetune_site(
    model: torch.nn.Module,
    records: Sequence[Any],
    expert_index: int,
    cfg: DictConfig,
    device: torch.device,
    personal: str,
    epochs: int,
    seed: int,
) -> dict[str, float]:
    """Fine-tune only the personal set ``personal`` (:data:`m4fuse.personal.sets.PERSONAL_SETS`) of
    ``model`` on ``records`` for ``epochs`` epochs, every other weight frozen: a fresh AdamW
    at ``train.lr`` x ``fl.personal_lr_scale`` (default 1) on its own warm-up/cosine curve.
    The freezing is undone afterwards. Returns ``{"loss", "num-examples", "steps"}``."""
    if epochs < 1:
        raise ValueError(f"fine-tuning epochs must be >= 1, got {epochs}")
    with personal_only(model, personal) as names:
        trainer, batches, steps = _finetune_trainer(model, records, expert_index, cfg, device,
                                                    names, epochs, seed)
        out = trainer.train_epochs(batches)
    return {"loss": float(out["loss"]), "num-examples": float(len(records)),
            "steps": float(steps)}


def finetune_seed(seed: int, site_index: int) -> int:
    """The seed of a site's "+FT" fine-tuning after the last round (``seed`` is the run's
    ``seed``, ``site_index`` the site's 0-based index): the one the ClientApp uses, so an
    offline fine-tuning (:mod:`simulations.finetune_runs`) draws the same batches."""
    return int(seed) * 1000 + int(site_index) * 100 + 99


def _val_dice(model: torch.nn.Module, records: Sequence[Any], expert_index: int,
              cfg: DictConfig, device: torch.device) -> float:
    model.eval()
    return float(validate_site(model, records, expert_index, cfg, device)["dice_mean"])


def _val_dice_between_epochs(model: torch.nn.Module, records: Sequence[Any], expert_index: int,
                             cfg: DictConfig, device: torch.device) -> float:
    """:func:`_val_dice` leaving the training as without it: the random number generators
    restored, the model back in train mode."""
    rng = (random.getstate(), np.random.get_state())
    with torch.random.fork_rng(devices=[]):
        dice = _val_dice(model, records, expert_index, cfg, device)
    random.setstate(rng[0])
    np.random.set_state(rng[1])
    model.train()
    return dice


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
    ``epochs`` epochs, every other weight frozen (as :func:`finetune_site`), keeping the best
    epoch (the "+FT" of a strategy, run once after the last round, before the final test).

    ``val_records`` decide: their mean Dice is measured before fine-tuning (epoch 0) and
    after each epoch, and the weights of the best epoch are kept in ``model`` (ties go to
    fewer epochs; test cases are never looked at). The validations leave the training as
    without them, so the last epoch's weights are those of a plain ``epochs`` run. Returns
    ``finetune-steps``, ``-epochs`` (run), ``-epochs-kept``, ``-loss``, ``-kept`` (1 when an
    epoch > 0 was kept) and the validation mean Dice before and of the kept weights
    (``finetune-val-before``/``-after``). A site with no validation cases keeps its weights
    (epoch 0, no step; the validation Dice entries are nan) and the log says so."""
    if not val_records:
        log.info("no fine-tuning: the site has no validation cases to choose an epoch by "
                 "(%d training cases); its federated weights are kept", len(train_records))
        return {"finetune-steps": 0.0, "finetune-epochs": 0.0, "finetune-epochs-kept": 0.0,
                "finetune-loss": 0.0, "finetune-kept": 0.0,
                "finetune-val-before": float("nan"), "finetune-val-after": float("nan")}
    if epochs < 1:
        raise ValueError(f"fine-tuning epochs must be >= 1, got {epochs}")
    before = _val_dice(model, val_records, expert_index, cfg, device)
    best_dice, best_epoch = before, 0
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with personal_only(model, personal) as names:
        trainer, batches, steps = _finetune_trainer(model, train_records, expert_index, cfg,
                                                    device, names, epochs, seed)
        for epoch in trainer.passes(batches):
            dice = _val_dice_between_epochs(model, val_records, expert_index, cfg, device)
            if dice > best_dice:
                best_dice, best_epoch = dice, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        loss = float(trainer.summary()["loss"])
    if best_epoch != epochs:
        model.load_state_dict(best_state)
    return {"finetune-steps": float(steps), "finetune-epochs": float(epochs),
            "finetune-epochs-kept": float(best_epoch), "finetune-loss": loss,
            "finetune-kept": float(best_epoch > 0),
            "finetune-val-before": before, "finetune-val-after": float(best_dice)}


def personal_lr_scale(model: torch.nn.Module, cfg: DictConfig) -> dict[str, float] | None:
    """``{parameter name: fl.personal_lr_scale}`` for the parameters of the strategy's kept
    set, or None when the scale is 1 (default) or the strategy keeps nothing/everything."""
    scale = float(cfg.fl.get("personal_lr_scale", 1.0))
    kept = named_strategy(str(cfg.fl.strategy)).kept
    if scale == 1.0 or kept in ("none", "all"):
        return None
    names = split_state(dict(model.named_parameters()), kept)[1]
    return {n: scale for n in names}


__all__ = ["finetune_best_epoch", "finetune_seed", "finetune_site", "personal_lr_scale",
           "personal_only"]
