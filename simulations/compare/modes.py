"""The comparison's modes: their names, the overrides that make each, and ``--modes`` entries
with their own overrides (``name=mode:override[;override...]``, e.g.
``steps4=personal-norm-ft:fl.local_steps=4``: the run of ``mode`` with those Hydra overrides
added, reported as ``name``)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from m4fuse.run import settings

BASELINES: tuple[str, ...] = ("pooled", "local")
DP_SUFFIX = "-dp"

_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


def known_modes() -> list[str]:
    """Every mode the comparison can run: the baselines, each strategy, each strategy
    ``-dp``."""
    strategies = [s for s in settings.STRATEGIES if s not in BASELINES]
    return [*BASELINES, *strategies, *(s + DP_SUFFIX for s in strategies)]


def parse_mode(text: str) -> tuple[str, str, list[str]]:
    """``(name, mode, overrides)`` of a ``--modes`` entry: ``name=mode:o1;o2`` or a plain
    ``mode`` (name = mode, no overrides).

    Raises:
        ValueError: naming ``--modes`` and the entry (no ``:`` after ``name=mode``, a bad
            name, an empty override).
    """
    text = text.strip()
    if "=" not in text.split(":", 1)[0]:
        if ":" in text:
            raise ValueError(f"--modes: {text!r} has overrides but no name; write "
                             f"name=mode:override[;override...], e.g. "
                             "steps4=personal-norm-ft:fl.local_steps=4")
        return text, text, []
    name, rest = text.split("=", 1)
    if ":" not in rest:
        raise ValueError(f"--modes: {text!r} needs name=mode:override[;override...], e.g. "
                         "steps4=personal-norm-ft:fl.local_steps=4")
    mode, overrides_text = rest.split(":", 1)
    overrides = [o.strip() for o in overrides_text.split(";")]
    if not _NAME.match(name):
        raise ValueError(f"--modes: the name {name!r} of {text!r} must be letters, digits and "
                         "_ . + - only")
    if not mode or not all(overrides) or not all("=" in o for o in overrides):
        raise ValueError(f"--modes: {text!r}: every override must be key=value, "
                         "separated by ';'")
    return name, mode, overrides


def check_modes(modes: Sequence[str]) -> list[str]:
    """The modes' names, checked (unknown or repeated ones fail naming ``--modes``); an
    entry may be ``name=mode:override[;override...]`` (:func:`parse_mode`, :func:`mode_specs`)."""
    modes = [m for m in modes if m]
    if not modes:
        raise ValueError("--modes is empty")
    specs = [parse_mode(m) for m in modes]
    unknown = [m for _, m, _ in specs if m not in known_modes()]
    if unknown:
        raise ValueError(f"--modes: unknown {unknown}; choose from {known_modes()}")
    taken = [n for n, m, extra in specs if extra and n in known_modes()]
    if taken:
        raise ValueError(f"--modes: {taken} name a mode with overrides like a plain mode; "
                         "give it another name")
    names = [n for n, _, _ in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"--modes repeats a mode: {names}")
    return names


def mode_specs(modes: Sequence[str]) -> dict[str, tuple[str, list[str]]]:
    """``{name: (mode, its own overrides)}`` of the ``--modes`` entries (a plain mode: itself,
    none)."""
    return {n: (m, extra) for n, m, extra in (parse_mode(x) for x in modes if x)}


def mode_overrides(mode: str) -> list[str]:
    """The overrides that make ``mode`` (a strategy, optionally with DP)."""
    if mode in BASELINES:
        return []
    if mode.endswith(DP_SUFFIX):
        return [f"fl.strategy={mode[:-len(DP_SUFFIX)]}", "privacy=dp"]
    return [f"fl.strategy={mode}"]
