"""A hospital joining the federation later: a fresh expert fine-tuned on its own cases.

The federation's model (a :mod:`m4fuse.io.checkpoint` file) is loaded, ``model.add_expert()``
appends a fresh expert to every expert unit (its output projection is zero, so it starts as
the shared model), and only that expert (plus the non-expert part of the federation's
personal set, e.g. the norm layers of a FedBN-style strategy; :mod:`m4fuse.personal.sets`) is trained
on ``k`` of the site's training cases with every other weight frozen. The shared model alone
(``expert=None``) and the fine-tuned model are scored on the site's test cases.

Where the federation kept non-expert layers at the sites (``personal-norm`` ...), it holds no
shared value for them (the checkpoint's ``shared`` copy is the untrained initial one): the new
site starts them, for its "shared model alone" baseline and for its fine-tuning, from the
mean of the sites' own layers (``site_layers``), weighted by each site's training cases
(``metadata["site_cases"]``) or equally when the checkpoint does not record them
(:func:`start_layers`). Its expert starts fresh, or with ``expert_init="mean"`` as the same
mean of the sites' experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from m4fuse.evaluation.crosssite import score_cases
from m4fuse.io.checkpoint import Checkpoint, build_model, save_checkpoint
from m4fuse.nets.model import M4Fuse
from m4fuse.personal.sets import (
    PARTIAL_SETS,
    STRATEGIES,
    expert_index,
    expert_state,
    is_personal,
    place_expert,
    split_state,
)
from m4fuse.run import runtime
from m4fuse.training import site_steps

#: ``--expert-init``: how the new site's expert starts.
EXPERT_INITS: tuple[str, ...] = ("fresh", "mean")


@dataclass
class JoinResult:
    """What :func:`join_site` returns.

    Attributes:
        site: the new site's name.
        cases: training cases used (k).
        trained: names of the trained parameters.
        shared_rows / tuned_rows: per-case test scores of the shared model alone and of the
            model with the fine-tuned expert.
        frozen_unchanged: every frozen weight is bitwise what the checkpoint held.
        checkpoint: the written checkpoint (None when no ``out`` was given).
        train: ``{"loss", "num-examples"}`` of the fine-tuning.
        start: how the new site's layers and expert started (:func:`start_layers`' note and
            the expert init), also in the written checkpoint's metadata.
    """

    site: str
    cases: int
    trained: list[str]
    shared_rows: list[dict[str, Any]]
    tuned_rows: list[dict[str, Any]]
    frozen_unchanged: bool
    checkpoint: Path | None = None
    train: dict[str, float] = field(default_factory=dict)
    start: dict[str, str] = field(default_factory=dict)


def personal_set_of(checkpoint: Checkpoint) -> str:
    """The personal set the new site fine-tunes besides its expert: the kept set of the
    checkpoint's strategy (``metadata["strategy"]``, :data:`m4fuse.personal.sets.STRATEGIES`) when
    it is a partial set (:data:`m4fuse.personal.sets.PARTIAL_SETS`: ``experts``, ``norms`` ...);
    ``experts`` otherwise (FedAvg, pooled, unknown)."""
    strategy = STRATEGIES.get(str(checkpoint.metadata.get("strategy")))
    kept = strategy.kept if strategy is not None else "experts"
    return kept if kept in PARTIAL_SETS else "experts"


def site_weights(checkpoint: Checkpoint, sites: Sequence[str]) -> tuple[dict[str, float], str]:
    """``({site: weight}, "case-weighted" | "equal weights")``: each site's training cases
    from ``metadata["site_cases"]`` when it records a positive count for every one of
    ``sites``, else 1 each (checkpoints written before the counts were recorded)."""
    cases = checkpoint.metadata.get("site_cases") or {}
    try:
        counts = {s: float(cases[s]) for s in sites}
    except (KeyError, TypeError, ValueError):
        counts = {}
    if counts and all(c > 0 for c in counts.values()):
        return counts, "case-weighted"
    return {s: 1.0 for s in sites}, "equal weights"


def _mean(parts: Sequence[tuple[torch.Tensor, float]]) -> torch.Tensor:
    total = sum(w for _, w in parts)
    mean = sum(t.double() * (w / total) for t, w in parts)
    return mean.to(parts[0][0].dtype)  # type: ignore[union-attr]


def start_layers(checkpoint: Checkpoint) -> tuple[dict[str, torch.Tensor], str]:
    """The new site's start for the non-expert layers the federation kept at its sites:
    ``({shared weight name: mean over the sites holding it in site_layers}, note)``, weighted
    by :func:`site_weights`. Empty (note ``"shared"``) for a checkpoint without
    ``site_layers`` (version 1, or a strategy that keeps only experts)."""
    layers = checkpoint.site_layers
    if not layers:
        return {}, "shared"
    weights, how = site_weights(checkpoint, sorted(layers))
    keys = sorted(set().union(*(set(v) for v in layers.values())))
    out = {k: _mean([(layers[s][k], weights[s]) for s in sorted(layers) if k in layers[s]])
           for k in keys}
    return out, f"mean of {len(layers)} sites' layers ({how})"


def mean_expert(checkpoint: Checkpoint) -> tuple[dict[str, torch.Tensor], str]:
    """The sites' experts averaged (index-free keys, :func:`site_weights`), with a note."""
    if not checkpoint.experts:
        raise ValueError(f"--expert-init mean: {checkpoint.path or 'the checkpoint'} holds no "
                         "site experts to average")
    sites = sorted(checkpoint.experts)
    weights, how = site_weights(checkpoint, sites)
    keys = checkpoint.experts[sites[0]]
    return ({k: _mean([(checkpoint.experts[s][k], weights[s]) for s in sites]) for k in keys},
            f"mean of {len(sites)} sites' experts ({how})")


def check_cases(cases: int | str | None, available: int, site: str) -> int:
    """``cases`` as a number in ``1..available`` (``None``/``"all"``: all); a clear error
    naming ``--cases`` and the value otherwise (before any training)."""
    if cases is None or str(cases) == "all":
        if available < 1:
            raise ValueError(f"site {site!r} has no training cases")
        return available
    try:
        k = int(cases)
    except (TypeError, ValueError):
        raise ValueError(f"--cases must be a number or 'all', got {cases!r}") from None
    if not 1 <= k <= available:
        raise ValueError(f"--cases must be in 1..{available} (site {site!r} has {available} "
                         f"training cases), got {k}")
    return k


def choose_cases(records: Sequence[Any], k: int, seed: int) -> list[Any]:
    """``k`` of ``records``: the first ``k`` of one seeded permutation, so the cases for a
    smaller ``k`` are among those of a larger one."""
    order = np.random.default_rng(seed).permutation(len(records))
    return [records[i] for i in order[:k]]


def _check_join(checkpoint: Checkpoint, train_records: Sequence[Any],
                test_records: Sequence[Any], site: str, cases: int | str | None, epochs: int,
                expert_init: str) -> int:
    """Check :func:`join_site`'s arguments; the number of training cases to use."""
    if site in checkpoint.sites:
        raise ValueError(f"--site {site!r} already has an expert in {checkpoint.path}; "
                         f"choose a new name")
    k = check_cases(cases, len(train_records), site)
    if not test_records:
        raise ValueError(f"site {site!r} has no test cases to score")
    if int(epochs) < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    if expert_init not in EXPERT_INITS:
        raise ValueError(f"--expert-init must be one of {list(EXPERT_INITS)}, got {expert_init!r}")
    return k


def _start_model(checkpoint: Checkpoint, personal: str, expert_init: str
                 ) -> tuple[M4Fuse, int, dict[str, str]]:
    """The federation's model with a new expert, its kept non-expert layers from the sites'
    mean and, for ``expert_init="mean"``, the new expert from the sites' experts:
    ``(model, new expert's index, {"layers": how the layers start, "expert": ...})``."""
    model, _ = build_model(checkpoint, site=None)
    new = model.add_expert()
    start, layers_note = start_layers(checkpoint) if personal != "experts" else ({}, "shared")
    expert_note = "fresh"
    if expert_init == "mean":
        expert, expert_note = mean_expert(checkpoint)
        start.update(place_expert(expert, new))
    if start:
        model.load_state_dict(start, strict=False)
    return model, new, {"layers": layers_note, "expert": expert_note}


def _write_joined(out: Path, checkpoint: Checkpoint, model: M4Fuse, site: str, new: int,
                  k: int, trained: Sequence[str], metadata: dict[str, Any]) -> Path:
    """Write the federation's checkpoint with ``site`` joined: its expert ``new`` and its
    trained non-expert weights (norms ...) as its ``site_layers``; ``metadata`` added."""
    state = {n: v.detach().cpu() for n, v in model.state_dict().items()}
    _, experts_all = split_state(state)
    experts = {**checkpoint.experts, site: expert_state(experts_all, new)}
    # Trained non-expert weights (norms ...) are the new site's own: the shared weights
    # and the other sites' personal weights stay as the federation left them.
    own = {n: state[n] for n in trained if expert_index(n) is None}
    site_layers = {**checkpoint.site_layers, **({site: own} if own else {})}
    return save_checkpoint(
        out, model.config, checkpoint.shared, experts, size=checkpoint.size,
        metadata={**checkpoint.metadata, **metadata,
                  **({"site_cases": {**checkpoint.metadata["site_cases"], site: k}}
                     if checkpoint.metadata.get("site_cases") else {}),
                  "joined_from": str(checkpoint.path)},
        site_layers=site_layers)


def join_site(checkpoint: Checkpoint, train_records: Sequence[Any], test_records: Sequence[Any],
              site: str, cfg: DictConfig, cases: int | str | None = None, epochs: int = 20,
              seed: int = 0, device: torch.device | None = None, out: Path | None = None,
              expert_init: str = "fresh") -> JoinResult:
    """Fine-tune a fresh expert for ``site`` and score it against the shared model alone.

    Args:
        checkpoint: the federation's model (:func:`m4fuse.io.checkpoint.load_checkpoint`).
        train_records / test_records: the site's cases (``m4fuse.data.CaseRecord``).
        site: the new site's name; must not already have an expert in ``checkpoint``.
        cfg: composed config (training settings ``train.*``).
        cases: training cases to use, ``1..len(train_records)``, or None/``"all"`` (default).
        epochs: fine-tuning epochs over the chosen cases (default 20; one warm-up/cosine lr
            curve over them).
        seed: seed of the case choice, loader and augmentation (default 0).
        device: default ``cfg.device`` resolved.
        out: checkpoint to write: the federation's shared weights, every site's expert and
            site layers, plus the new site's expert and (when the personal set holds more
            than experts, e.g. norms) its trained non-expert weights as its ``site_layers``
            (checkpoint version 2); default None: none written.
        expert_init: ``fresh`` (default: ``add_expert()``'s, contributing nothing at first)
            or ``mean`` (the sites' experts averaged, :func:`mean_expert`).

    When the federation's personal set holds more than experts, the kept non-expert layers
    start from the sites' mean (:func:`start_layers`), for the "shared model alone" scores
    and for the fine-tuning; a checkpoint without ``site_layers`` keeps its shared copy.
    """
    k = _check_join(checkpoint, train_records, test_records, site, cases, epochs, expert_init)
    device = device or runtime.resolve_device(str(cfg.device))
    personal = personal_set_of(checkpoint)
    model, new, notes = _start_model(checkpoint, personal, expert_init)
    before = {n: v.detach().clone() for n, v in model.state_dict().items()}

    def trainable(name: str) -> bool:
        index = expert_index(name)
        return index == new or (index is None and personal != "experts"
                                 and is_personal(name, personal))

    trained = []
    for name, param in model.named_parameters():
        param.requires_grad_(trainable(name))
        if param.requires_grad:
            trained.append(name)
    shared_rows = score_cases(model, None, test_records, device)
    chosen = choose_cases(list(train_records), k, seed)
    model.train()
    train = site_steps.train_site(model, chosen, new, cfg, device, int(epochs), seed)
    model.eval()
    tuned_rows = score_cases(model, new, test_records, device)
    after = model.state_dict()
    frozen_unchanged = all(torch.equal(before[n].cpu(), after[n].detach().cpu())
                           for n in before if not trainable(n))
    written = None
    if out is not None:
        metadata = {"joined_site": site, "join_cases": k, "join_epochs": int(epochs),
                    "join_trained": personal, "join_layers_start": notes["layers"],
                    "join_expert_init": notes["expert"]}
        written = _write_joined(out, checkpoint, model, site, new, k, trained, metadata)
    return JoinResult(site, k, trained, shared_rows, tuned_rows, frozen_unchanged, written,
                      {k2: float(v) for k2, v in train.items()}, notes)
