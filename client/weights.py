"""Message <-> model state translation for the ClientApp (no training here).

Which weights cross the wire is decided by the strategy and by :func:`m4fuse.personal.sets.split_state`
(the one owner of the shared/personal split):

* ``personal`` / ``fedprox`` / ``personal-ft``: the shared arrays travel; the site's expert
  stays on the site.
* ``personal-norm`` (``-ft``) / ``personal-stem``: as ``personal``, and the site's
  normalisation affine weights (and first convolution) stay on the site too.
* ``fedavg`` / ``fedavg-ft`` / ``fedavg-ft-all``: the whole model (one expert that everyone
  averages).
* ``local``: nothing (an empty ArrayRecord, so replies keep Flower's one-ArrayRecord shape).

The tables below are derived from :data:`m4fuse.personal.sets.STRATEGIES`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord

from m4fuse.personal.sets import STRATEGIES, split_state

#: strategy -> what the outgoing ArrayRecord carries ("shared" | "all" | "none").
SENT: dict[str, str] = {name: s.sent for name, s in STRATEGIES.items()}
#: strategy -> the personal set the site keeps between rounds (m4fuse.personal.sets.PERSONAL_SETS:
#: "experts" | "norms" | "stem" | "head" | "decoder" | "all" | "none").
KEPT: dict[str, str] = {name: s.kept for name, s in STRATEGIES.items()}


def _check_strategy(strategy: str) -> None:
    if strategy not in SENT:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {sorted(SENT)}")


def outgoing_state(model: torch.nn.Module, strategy: str) -> dict[str, torch.Tensor]:
    """The tensors the site sends after training under ``strategy``."""
    _check_strategy(strategy)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    shared, _ = split_state(state, KEPT[strategy])
    return shared


def kept_state(model: torch.nn.Module, strategy: str) -> dict[str, torch.Tensor]:
    """The tensors the site keeps for itself between rounds under ``strategy``."""
    _check_strategy(strategy)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    _, personal = split_state(state, KEPT[strategy])
    return personal


def load_round_state(
    model: torch.nn.Module,
    strategy: str,
    incoming: Mapping[str, torch.Tensor],
    kept: Mapping[str, torch.Tensor] | None,
) -> None:
    """Put the server's arrays and the site's kept arrays into ``model``.

    Strategies that share part of the model (``personal``, ``personal-norm`` ...):
    ``incoming`` must be exactly the shared keys (loaded with ``strict=False``; the keys left
    missing must be exactly the strategy's personal set), then the kept personal weights (if
    the site has them yet; otherwise their fresh initialisation stays). ``fedavg``: the whole
    state, strict. ``local``: ``incoming`` must be empty; the kept whole model if any.
    """
    _check_strategy(strategy)
    names = set(model.state_dict())
    personal_names = set(split_state(dict.fromkeys(names), KEPT[strategy])[1])
    mode = SENT[strategy]
    if mode == "shared":
        result = model.load_state_dict(dict(incoming), strict=False)
        if result.unexpected_keys:
            raise KeyError(f"server sent keys the model lacks: {sorted(result.unexpected_keys)[:5]}")
        if set(result.missing_keys) != personal_names:
            wrong = sorted(set(result.missing_keys) ^ personal_names)
            raise KeyError(f"server arrays are not exactly the shared weights; differ at {wrong[:5]}")
        if kept:
            if set(kept) != personal_names:
                raise KeyError(f"kept personal keys do not match the model: {sorted(set(kept) ^ personal_names)[:5]}")
            model.load_state_dict(dict(kept), strict=False)
    elif mode == "all":
        model.load_state_dict(dict(incoming), strict=True)
    else:
        if incoming:
            raise KeyError(f"strategy 'local' exchanges no weights, got {sorted(incoming)[:5]}")
        if kept:
            model.load_state_dict(dict(kept), strict=True)


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A state dict -> ArrayRecord (empty mapping -> empty record)."""
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()}) if state else ArrayRecord()


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord -> state dict of CPU tensors (empty record -> {})."""
    return dict(record.to_torch_state_dict()) if len(record) else {}
