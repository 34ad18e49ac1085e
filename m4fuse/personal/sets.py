"""The one place that decides which weights are shared and which are personal.

Which weights stay at a site is named by a *personal set* (:data:`PERSONAL_SETS`):

* ``experts`` (default; the paper's scheme): the weights of the site experts of the expert
  units (names containing ``.site_experts.<k>.``);
* ``norms``: the experts plus every normalisation layer's affine weight and bias (the
  GroupNorms of encoder and decoder, the LayerNorms in front of the mixers), FedBN-style;
* ``stem``: ``norms`` plus the first encoder convolution (``encoder.conv1``), the layer that
  sees the raw intensities first;
* ``head``: ``norms`` plus the 1x1x1 output convolution (``decoder.head``: a per-site scale
  and offset of each region's logit, FedPer-style);
* ``decoder``: ``norms`` plus the whole decoder (FedRep/FedPer-style: a shared encoder and
  bridge, each site its own decoder);
* ``none``: nothing (FedAvg of the whole model, one expert everyone averages);
* ``all``: everything (local training).

Each federated strategy (:data:`STRATEGIES`) names the set it keeps at the site across
rounds, the set it fine-tunes on the site's training cases after the last round (shared
weights frozen), and the Flower aggregation on the server. Federated code, checkpoints and
tests all ask these functions instead of matching names themselves.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

V = TypeVar("V")

_EXPERT = re.compile(r"(^|\.)site_experts\.(\d+)\.")
# Affine weights of GroupNorm/LayerNorm layers: the model names them norm, norm1 ... norm5
# (m4fuse.nets.model); matched by name because a state dict carries no module types.
_NORM = re.compile(r"(^|\.)norm\d*\.(weight|bias)$")
_STEM = re.compile(r"^encoder\.conv1\.")
_HEAD = re.compile(r"^decoder\.head\.")
_DECODER = re.compile(r"^decoder\.")

#: partial personal set -> (layer group, pattern) pairs it keeps; a weight is in the set when
#: one pattern matches it. ``none`` and ``all`` are not listed (nothing, everything).
_LAYERS: dict[str, tuple[tuple[str, re.Pattern[str]], ...]] = {
    "experts": (("site expert", _EXPERT),),
    "norms": (("site expert", _EXPERT), ("norm layer", _NORM)),
    "stem": (("site expert", _EXPERT), ("norm layer", _NORM), ("encoder.conv1", _STEM)),
    "head": (("site expert", _EXPERT), ("norm layer", _NORM), ("decoder.head", _HEAD)),
    "decoder": (("site expert", _EXPERT), ("norm layer", _NORM), ("decoder", _DECODER)),
}
#: The personal sets that keep part of the model (all but ``none`` and ``all``).
PARTIAL_SETS: tuple[str, ...] = tuple(_LAYERS)

#: personal set -> description (see the module docstring).
PERSONAL_SETS: dict[str, str] = {
    "none": "nothing (every weight is averaged)",
    "experts": "the site experts of the expert units",
    "norms": "experts + GroupNorm/LayerNorm affine weights",
    "stem": "experts + norm affine weights + the first encoder convolution",
    "head": "experts + norm affine weights + the output convolution",
    "decoder": "experts + norm affine weights + the whole decoder",
    "all": "every weight (no exchange)",
}


def _check_set(personal: str) -> None:
    if personal not in PERSONAL_SETS:
        raise ValueError(f"unknown personal set {personal!r}; expected one of {sorted(PERSONAL_SETS)}")


def is_personal(key: str, personal: str = "experts") -> bool:
    """True when ``key`` belongs to the personal set ``personal`` (default ``experts``:
    a weight of a site expert)."""
    _check_set(personal)
    if personal in ("none", "all"):
        return personal == "all"
    return any(pattern.search(key) is not None for _, pattern in _LAYERS[personal])


def is_expert(key: str) -> bool:
    """True when ``key`` names a weight of a site expert."""
    return _EXPERT.search(key) is not None


@dataclass(frozen=True)
class Strategy:
    """What a federated strategy keeps, fine-tunes and how the server aggregates.

    Args:
        kept: personal set kept at the site across rounds (never sent).
        finetune: personal set fine-tuned on the site's own training cases after the last
            round (shared weights frozen; ``all``: nothing frozen), for
            ``fl.finetune_epochs`` epochs, before the final test; None: no fine-tuning.
        server: ``fedavg`` or ``fedprox`` (Flower's ``flwr.serverapp.strategy`` classes).
    """

    kept: str
    finetune: str | None = None
    server: str = "fedavg"

    @property
    def sent(self) -> str:
        """What the reply carries: ``all`` (nothing kept), ``none`` (everything kept) or
        ``shared`` (everything outside the kept set)."""
        return {"none": "all", "all": "none"}.get(self.kept, "shared")


#: ``fl.strategy`` -> :class:`Strategy`. ``personal`` is the paper's scheme (experts only).
STRATEGIES: dict[str, Strategy] = {
    "personal": Strategy("experts"),
    "fedavg": Strategy("none"),
    "fedprox": Strategy("experts", server="fedprox"),
    "local": Strategy("all"),
    # FedBN-style: normalisation affine weights stay at the site too.
    "personal-norm": Strategy("norms"),
    "personal-stem": Strategy("stem"),
    # "+FT": after the last round each site fine-tunes its personal part, shared frozen.
    "personal-ft": Strategy("experts", finetune="experts"),
    "personal-norm-ft": Strategy("norms", finetune="norms"),
    "personal-stem-ft": Strategy("stem", finetune="stem"),
    # FedPer/FedRep-style: the output convolution, or the whole decoder, stays at the site.
    "personal-head-ft": Strategy("head", finetune="head"),
    "personal-decoder-ft": Strategy("decoder", finetune="decoder"),
    "fedavg-ft": Strategy("none", finetune="norms"),
    # The FedAvg+FT baseline of personalised FL: the federated model is the initialisation
    # and each site fine-tunes the WHOLE model on its own cases after the last round.
    "fedavg-ft-all": Strategy("none", finetune="all"),
    "personal-ft-all": Strategy("experts", finetune="all"),
}


def strategy(name: str) -> Strategy:
    """The :class:`Strategy` called ``name`` (``fl.strategy``); unknown names fail with the
    list of known ones."""
    if name not in STRATEGIES:
        raise ValueError(f"fl.strategy must be one of {sorted(STRATEGIES)}, got {name!r}")
    return STRATEGIES[name]


#: ``fl.optimizer_state`` -> which AdamW moments a site keeps from one round to the next
#: (in the ClientApp's ``context.state``; never sent). The lr schedule is one warm-up/cosine
#: curve over the run whichever is chosen.
OPTIMIZER_STATES: dict[str, str] = {
    "fresh": "none: a fresh AdamW every round (default)",
    "personal": "the moments of the strategy's kept set; the shared ones restart",
    "all": "the moments of every trained parameter (local adaptive state)",
}


def check_optimizer_state(value: object, private: bool = False) -> str:
    """``fl.optimizer_state`` checked: one of :data:`OPTIMIZER_STATES`, and ``fresh`` under
    DP-SGD (``private``: ``privacy.enabled``; Opacus' optimiser is not given kept moments).
    Returns the value; a bad one fails naming the key and the value."""
    name = str(value)
    if name not in OPTIMIZER_STATES:
        raise ValueError(f"fl.optimizer_state must be one of {sorted(OPTIMIZER_STATES)}, "
                         f"got {value!r}")
    if private and name != "fresh":
        raise ValueError(f"fl.optimizer_state={name} with privacy.enabled is not supported: "
                         "the DP-SGD optimiser starts fresh every round (use "
                         "fl.optimizer_state=fresh or privacy.enabled=false)")
    return name


def check_personal_set(names: Iterable[str], personal: str, key: str = "fl.strategy") -> None:
    """Fail when the personal set ``personal`` selects none of the model's weights ``names``
    beyond the experts (a set naming layers the model does not have), naming ``key``."""
    _check_set(personal)
    names = list(names)
    if personal in ("none", "all"):
        return
    if not any(is_personal(n, personal) for n in names):
        raise ValueError(f"{key}: personal set {personal!r} selects no weight of the model")
    for group, pattern in _LAYERS[personal][1:]:  # the experts: checked where they are built
        if not any(pattern.search(n) for n in names):
            raise ValueError(f"{key}: personal set {personal!r} found no {group} in the model")


def expert_index(key: str) -> int | None:
    """The expert index a personal key belongs to, or None for a shared key."""
    m = _EXPERT.search(key)
    return int(m.group(2)) if m else None


def split_state(state: Mapping[str, V], personal: str = "experts"
                ) -> tuple[dict[str, V], dict[str, V]]:
    """Split a state dict into ``(shared, personal)`` by the personal set ``personal``
    (default ``experts``); disjoint, together they are ``state``."""
    _check_set(personal)
    shared: dict[str, V] = {}
    mine: dict[str, V] = {}
    for key, value in state.items():
        (mine if is_personal(key, personal) else shared)[key] = value
    return shared, mine


def expert_state(state: Mapping[str, V], index: int) -> dict[str, V]:
    """The weights of expert ``index``, keyed with the index replaced by ``*``.

    Index-free keys let an expert move between models where it sits at different indices
    (expert k of a pooled model <-> expert 0 of a site's own model).
    """
    out: dict[str, V] = {}
    for key, value in state.items():
        if expert_index(key) == index:
            out[_EXPERT.sub(lambda m: f"{m.group(1)}site_experts.*.", key, count=1)] = value
    return out


def place_expert(expert: Mapping[str, V], index: int) -> dict[str, V]:
    """Inverse of :func:`expert_state`: put index-free expert weights at ``index``."""
    out: dict[str, V] = {}
    for key, value in expert.items():
        if ".site_experts.*." not in f".{key}" and not key.startswith("site_experts.*."):
            raise KeyError(f"not an index-free expert key: {key!r}")
        out[key.replace("site_experts.*.", f"site_experts.{index}.", 1)] = value
    return out
