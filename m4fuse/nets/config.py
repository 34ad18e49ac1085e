"""The hyper-parameters of the M4Fuse network (:mod:`m4fuse.nets.model`): widths and presets,
output mode, experts, state-space and normalisation settings, checked when created."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Widths of the base preset (paper: "Base", 1.11M parameters with one expert).
BASE_WIDTHS: tuple[int, ...] = (32, 64, 96, 128, 192, 256)
#: Presets as a multiple of :data:`BASE_WIDTHS`: Tiny, Small, Base, Large.
PRESET_SCALES: dict[str, float] = {"T": 0.5, "S": 0.75, "B": 1.0, "L": 1.5}
#: Output modes and the number of output channels each needs.
OUTPUT_CHANNELS: dict[str, int] = {"regions": 3, "labels": 4}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class M4FuseConfig:
    """Hyper-parameters of :class:`M4Fuse`; checked when created.

    Attributes:
        widths: channel widths ``(c0..c5)`` of the six stages; default the base preset
            ``(32, 64, 96, 128, 192, 256)``. Every width must divide by ``mixer_groups`` and by
            ``norm_groups``.
        in_channels: input modalities, default 4 (T1, T1ce, T2, FLAIR).
        out_channels: output channels, default 3; must be 3 for ``output="regions"`` and 4
            for ``output="labels"``.
        output: ``"regions"`` (default: sigmoid channels WT, TC, ET) or ``"labels"``
            (4-class softmax as in the paper). The network returns logits either way.
        num_experts: site experts per expert unit, default 1 (>= 1).
        d_state: SSM state size of each Mamba, default 16.
        d_conv: kernel of Mamba's causal depthwise convolution, default 4.
        expand: Mamba's inner expansion factor, default 2.
        mixer_groups: channel groups of a grouped state-space mixer, default 4 (the groups
            share one Mamba of width ``C / mixer_groups``).
        dropout: Dropout3d probability, default 0.2.
        norm_groups: GroupNorm groups, default 4.
    """

    widths: tuple[int, ...] = BASE_WIDTHS
    in_channels: int = 4
    out_channels: int = 3
    output: str = "regions"
    num_experts: int = 1
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    mixer_groups: int = 4
    dropout: float = 0.2
    norm_groups: int = 4

    def __post_init__(self) -> None:
        widths = self.widths
        if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
            raise ValueError(f"widths must be a sequence of 6 ints, got {widths!r}")
        widths = tuple(widths)
        object.__setattr__(self, "widths", widths)  # lists (JSON, YAML) become tuples
        if len(widths) != 6 or not all(_is_int(w) and w > 0 for w in widths):
            raise ValueError(f"widths must be 6 positive ints, got {list(widths)!r}")
        for name in ("in_channels", "num_experts", "d_state", "d_conv", "expand",
                     "mixer_groups", "norm_groups"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("mixer_groups", "norm_groups"):
            groups = getattr(self, name)
            bad = [w for w in widths if w % groups]
            if bad:
                raise ValueError(
                    f"every width must be divisible by {name}={groups}; "
                    f"{bad} in widths {list(widths)} are not"
                )
        if self.output not in OUTPUT_CHANNELS:
            raise ValueError(
                f"output must be one of {sorted(OUTPUT_CHANNELS)}, got {self.output!r}"
            )
        if not _is_int(self.out_channels) or self.out_channels != OUTPUT_CHANNELS[self.output]:
            raise ValueError(
                f"output={self.output!r} needs out_channels={OUTPUT_CHANNELS[self.output]}, "
                f"got out_channels={self.out_channels!r}"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not (
            0.0 <= self.dropout < 1.0
        ):
            raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> M4FuseConfig:
        """Config of preset ``name`` (T, S, B or L; widths = B x 1/2, 3/4, 1, 3/2).

        ``overrides`` replace fields (not ``widths``). Giving ``output="labels"`` without
        ``out_channels`` sets ``out_channels=4``.
        """
        key = name.upper() if isinstance(name, str) else name
        if key not in PRESET_SCALES:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESET_SCALES)}")
        fields = {f.name for f in dataclasses.fields(cls)} - {"widths"}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown} for preset {name!r}")
        if "output" in overrides and "out_channels" not in overrides:
            overrides["out_channels"] = OUTPUT_CHANNELS.get(overrides["output"], -1)
        widths = tuple(round(w * PRESET_SCALES[key]) for w in BASE_WIDTHS)
        return cls(widths=widths, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (widths as a list); :meth:`from_dict` reads it back."""
        out = dataclasses.asdict(self)
        out["widths"] = list(self.widths)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> M4FuseConfig:
        """Inverse of :meth:`to_dict`; missing fields take their defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown M4FuseConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(data))
