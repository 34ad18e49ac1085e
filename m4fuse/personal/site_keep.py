"""What a site keeps between rounds (no Flower): its kept weights (the strategy's personal
set, :mod:`m4fuse.personal.sets`) and what it fine-tuned, read from and written to its state
folder (:class:`m4fuse.personal.site_store.SiteStateStore`), the AdamW moments it keeps under
``fl.optimizer_state``, and the DP accountant history it has spent.

The ClientApp holds the same things in Flower's ``context.state`` (the first source) and
only translates records; every rule about what is kept is written here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig

from m4fuse.personal.sets import expert_state, is_personal, place_expert, split_state
from m4fuse.personal.sets import strategy as named_strategy
from m4fuse.personal.site_store import SiteState, SiteStateStore, model_fingerprint
from m4fuse.run import settings

#: Separator of ``"<parameter name>|<state key>"``, the flat keys of kept AdamW moments.
OPTIMIZER_KEY_SEP = "|"


def site_fingerprint(cfg: DictConfig, strategy: str) -> str:
    """Fingerprint of the site model's config plus what the strategy keeps (``personal`` or
    ``all``): an expert of another architecture, or a whole ``local`` model read by a
    ``personal`` run of the same name, is refused by :meth:`SiteStateStore.load`."""
    fields = dataclasses.asdict(settings.model_config(cfg, num_experts=1))
    kept = named_strategy(strategy).kept
    # "personal" for the experts-only set: the name site states were written with before
    # the personal sets existed, so their folders stay readable.
    fields["kept"] = {"experts": "personal"}.get(kept, kept)
    return model_fingerprint(fields)


def stored_kept(store: SiteStateStore | None, cfg: DictConfig, model: torch.nn.Module,
                strategy: str, before_round: int) -> dict[str, torch.Tensor] | None:
    """The kept weights of the newest state in the site's folder with round <
    ``before_round`` (a resumed run or a restarted client), or None."""
    kept_set = named_strategy(strategy).kept
    if store is None or kept_set == "none":
        return None
    like = expert_state(model.state_dict(), 0)
    saved = store.load(site_fingerprint(cfg, strategy), before_round, like=like)
    if saved is None:
        return None
    kept = place_expert(saved.expert, 0)
    if kept_set != "experts":
        # The set keeps more than the expert: the rest is in the state's ``shared`` field.
        if not saved.shared:
            raise ValueError(f"{store.path(saved.round)} holds no non-expert weights, "
                             f"strategy {strategy!r} keeps {kept_set!r}")
        kept.update(saved.shared)
    return kept


def save_kept(store: SiteStateStore | None, site: str, cfg: DictConfig,
              kept: Mapping[str, torch.Tensor], strategy: str, server_round: int,
              metrics: Mapping[str, float]) -> None:
    """Write the round's :class:`SiteState` (expert index-free; the weights outside the
    expert, e.g. the norms of ``personal-norm``, the whole model of ``local`` or a
    ``-ft-all`` fine-tuning, in its ``shared`` field; the round's finite metrics). The
    optimiser is not written: AdamW moments kept under ``fl.optimizer_state`` live in
    ``context.state`` only."""
    if store is None or not kept:
        return
    shared, personal = split_state(dict(kept))
    store.save(SiteState(
        site=site, round=server_round, fingerprint=site_fingerprint(cfg, strategy),
        expert=expert_state(personal, 0), optimizer=None,
        metrics={k: float(v) for k, v in metrics.items() if math.isfinite(float(v))},
        shared=shared or None,
    ))


def finetuned_states(model: torch.nn.Module, strategy: str
                     ) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
    """After a kept fine-tuning: ``(kept, saved)``. ``kept`` is what the strategy keeps
    between rounds (None when it keeps nothing); ``saved``, for the site's folder, is both
    what it keeps and what it fine-tuned (for ``fedavg-ft`` the norms and expert, for
    ``-ft-all`` the whole model), so the final model holds what the final test scored."""
    spec = named_strategy(strategy)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    kept = split_state(state, spec.kept)[1] if spec.kept != "none" else None
    saved = {k: v for k, v in state.items()
             if is_personal(k, spec.kept) or is_personal(k, str(spec.finetune))}
    return kept, saved


def optimizer_state_to_start(flat: Mapping[str, torch.Tensor] | None, mode: str
                             ) -> dict[str, dict[str, torch.Tensor]] | None:
    """The AdamW state to start a round from: None under ``fl.optimizer_state=fresh`` (a
    fresh AdamW as always), else the kept ``flat`` state (:func:`optimizer_state_to_keep`)
    by parameter name (``{}`` before the site's first round)."""
    if mode == "fresh":
        return None
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in (flat or {}).items():
        name, entry = key.rsplit(OPTIMIZER_KEY_SEP, 1)
        out.setdefault(name, {})[entry] = value
    return out


def optimizer_state_to_keep(state: Mapping[str, Mapping[str, torch.Tensor]], mode: str,
                            strategy: str) -> dict[str, torch.Tensor]:
    """The round's AdamW state to keep, flat (``"<name>|<key>"``): under ``personal`` only
    the parameters of the strategy's kept set (the shared ones restart next round), under
    ``all`` every parameter's."""
    if mode == "personal":
        state = split_state(dict(state), named_strategy(strategy).kept)[1]
    return {f"{name}{OPTIMIZER_KEY_SEP}{key}": value for name, entry in state.items()
            for key, value in entry.items()}


def _accountant_steps(record: Mapping[str, Any] | None) -> int:
    return -1 if record is None else sum(int(k) for k in record.get("steps", []))


def newest_accountant(*records: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The accountant history with the most steps among ``records`` (the site's memory and
    its folder, normally the same: taking the larger never under-counts what it spent)."""
    candidates: list[Mapping[str, Any] | None] = [None, *records]
    best = max(candidates, key=_accountant_steps)
    return None if best is None else dict(best)


__all__ = ["OPTIMIZER_KEY_SEP", "finetuned_states", "newest_accountant",
           "optimizer_state_to_keep", "optimizer_state_to_start", "save_kept", "site_fingerprint",
           "stored_kept"]
