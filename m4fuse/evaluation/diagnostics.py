"""Diagnostics of personalisation: how much the site experts contribute.

* :func:`expert_output_ratios` / :func:`expert_output_stats`: per expert unit,
  ``||expert output|| / ||shared mixer output||`` and their cosine over a set of cases
  (forward hooks on the unit's ``shared`` and ``site_experts[k]`` mixers; sums over every
  voxel and case);
* :func:`with_and_without_expert`: a site's test scores with its expert and with the expert
  switched off (``expert=None``: only the shared mixers run);
* :func:`loss_curve`: the per-round training loss of a run's ``history.json``.

No Flower here (``m4fuse/`` stays usable without it); ``simulations/diagnose.py`` reads a
finished run and calls these.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def expert_output_ratios(model: torch.nn.Module, records: Sequence[Any], expert_index: int,
                         device: torch.device | str = "cpu") -> dict[str, float]:
    """``{expert unit name: ||expert k output|| / ||shared mixer output||}`` on ``records``
    routed to expert ``expert_index`` (eval mode, no augmentation, batch 1).

    A ratio near 0 means the expert adds next to nothing to the unit's output.
    """
    return {name: v["ratio"] for name, v in expert_output_stats(
        model, records, expert_index, device).items()}


def expert_output_stats(model: torch.nn.Module, records: Sequence[Any], expert_index: int,
                        device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
    """Per expert unit ``{"ratio": ||expert|| / ||shared||, "cosine": cos(expert, shared)}``
    over all voxels of ``records`` (see :func:`expert_output_ratios`). A cosine near 1 means
    the expert only rescales the shared output, which the GroupNorm after the unit undoes."""
    from m4fuse.data import make_loader
    from m4fuse.nets.model import ExpertUnit

    units = {name: m for name, m in model.named_modules() if isinstance(m, ExpertUnit)}
    if not units:
        raise ValueError("the model has no expert unit")
    sums: dict[str, list[float]] = {name: [0.0, 0.0, 0.0] for name in units}  # ss, ee, se
    outputs: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str, slot: int):
        def record(_module, _inputs, output):
            out = output.detach().float()
            sums[name][slot] += float(out.pow(2).sum())
            if slot == 0:
                outputs[name] = out
            else:  # the expert runs after the shared mixer (ExpertUnit.forward)
                sums[name][2] += float((out * outputs.pop(name)).sum())
        return record

    for name, unit in units.items():
        handles.append(unit.shared.register_forward_hook(hook(name, 0)))
        handles.append(unit.site_experts[expert_index].register_forward_hook(hook(name, 1)))
    loader = make_loader(list(records), expert_index, batch_size=1, augment=False,
                         shuffle=False, num_workers=0)
    model.to(device).eval()
    try:
        with torch.no_grad():
            for batch in loader:
                image = batch["image"].to(device)
                expert = torch.full((image.shape[0],), expert_index, dtype=torch.long,
                                    device=device)
                model(image, expert)
    finally:
        for h in handles:
            h.remove()
    return {name: {"ratio": math.sqrt(e / ss) if ss > 0 else math.nan,
                   "cosine": se / math.sqrt(ss * e) if ss > 0 and e > 0 else math.nan}
            for name, (ss, e, se) in sums.items()}


def with_and_without_expert(model: torch.nn.Module, records: Sequence[Any], expert_index: int,
                            device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean test Dice (original grid) of ``records`` with expert ``expert_index`` and with
    no expert (``expert=None``): ``{"dice_with", "dice_without", "dice_delta"}``."""
    from m4fuse.training.site_steps import score_site_tests

    model.eval()
    with_expert, _ = score_site_tests(model, records, expert_index, torch.device(device))
    without, _ = score_site_tests(model, records, None, torch.device(device))  # type: ignore[arg-type]
    return {"dice_with": with_expert["dice_mean"], "dice_without": without["dice_mean"],
            "dice_delta": with_expert["dice_mean"] - without["dice_mean"]}


def loss_curve(history_json: str | Path) -> list[float]:
    """The case-weighted mean training loss per round (federated) or per block of epochs
    (pooled/local) from a run's ``history.json`` (a list of ``{"round", "train": {"loss"}}``)."""
    history = json.loads(Path(history_json).read_text())
    return [float(entry["train"]["loss"]) for entry in history if entry.get("train")]
