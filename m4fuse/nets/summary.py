"""A summary of an M4Fuse network: its parameter counts per part (``m4fuse model summary``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from m4fuse.personal.sets import is_personal

if TYPE_CHECKING:
    from m4fuse.nets.model import M4Fuse

#: The parts of the network the parameters are counted by.
PARTS: tuple[str, ...] = ("encoder", "experts", "bridge", "decoder")


def parameter_table(model: M4Fuse) -> dict[str, int]:
    """Parameter counts: encoder (shared, incl. the shared mixers of the expert units),
    experts (all site experts), bridge, decoder (incl. the head), total."""
    table = dict.fromkeys(PARTS, 0)
    for name, p in model.named_parameters():
        part = "experts" if is_personal(name) else name.split(".", 1)[0]
        if part not in table:
            raise ValueError(f"parameter {name!r} belongs to no part of {PARTS}")
        table[part] += p.numel()
    table["total"] = sum(table[k] for k in PARTS)
    return table
