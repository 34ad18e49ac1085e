"""The one place that decides which weights are shared and which are personal.

A parameter or buffer is *personal* when it belongs to a site expert of an expert unit
(its name contains ``.site_experts.<k>.``); everything else (encoder, shared mixers, bridge,
decoder, head) is *shared*. Federated code, checkpoints and tests all ask these functions
instead of matching names themselves.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeVar

V = TypeVar("V")

_EXPERT = re.compile(r"(^|\.)site_experts\.(\d+)\.")


def is_personal(key: str) -> bool:
    """True when ``key`` names a weight of a site expert."""
    return _EXPERT.search(key) is not None


def expert_index(key: str) -> int | None:
    """The expert index a personal key belongs to, or None for a shared key."""
    m = _EXPERT.search(key)
    return int(m.group(2)) if m else None


def split_state(state: Mapping[str, V]) -> tuple[dict[str, V], dict[str, V]]:
    """Split a state dict into ``(shared, personal)``; disjoint, together they are ``state``."""
    shared: dict[str, V] = {}
    personal: dict[str, V] = {}
    for key, value in state.items():
        (personal if is_personal(key) else shared)[key] = value
    return shared, personal


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
