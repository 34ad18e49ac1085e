"""Pictures a clinician would look at: axial slices of a case with the reference and the
prediction outlined per region.

:func:`overlay_png` draws FLAIR and T1ce (rows) at a few axial slices through the tumour
(columns), with each region's outline in its colour (WT green, TC yellow, ET red): the
reference as a solid line, the prediction dashed. Written with matplotlib (``Agg``, no
display needed). The federated run writes one per site for a test case
(``ClientApp`` final test: into the site's state folder, which stays at the hospital; the
simulation's server logs them to MLflow), and ``m4fuse segment --png FILE`` one for the
segmented case.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Region names, in the order of the region masks (WT, TC, ET), and their outline colours.
REGION_COLOURS: tuple[tuple[str, str], ...] = (("WT", "#2ca02c"), ("TC", "#ffd700"),
                                               ("ET", "#d62728"))
#: The modalities drawn (rows), by their canonical names.
SHOWN_MODALITIES: tuple[str, ...] = ("flair", "t1ce")


def tumour_slices(regions: np.ndarray | None, depth: int, count: int = 3) -> list[int]:
    """Up to ``count`` axial (last-axis) slice indices, sorted: spread over the tumour's
    axial extent, one of them the slice with the largest whole-tumour area; spread over the
    middle of the volume (``depth`` slices) when ``regions`` (``(3, X, Y, Z)`` masks,
    default None) holds no tumour."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if regions is None or not regions[0].any():
        return sorted({int(round(z)) for z in np.linspace(depth * 0.3, depth * 0.7, count)})
    area = regions[0].reshape(-1, regions.shape[-1]).sum(axis=0)
    zs = np.flatnonzero(area)
    picks = [int(round(z)) for z in np.quantile(zs, np.linspace(0.2, 0.8, count))]
    largest = int(np.argmax(area))
    picks[int(np.argmin([abs(z - largest) for z in picks]))] = largest
    return sorted(set(picks))


def overlay_png(
    images: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    prediction: np.ndarray | None = None,
    reference: np.ndarray | None = None,
    title: str = "",
    slices: Sequence[int] | None = None,
) -> Path:
    """Write a PNG of axial slices with region outlines; returns its path.

    Args:
        images: modality name -> volume ``(X, Y, Z)`` on the original grid; the rows are those
            of :data:`SHOWN_MODALITIES` found here (at least one is needed).
        path: the ``.png`` file to write (its folder is created).
        prediction: region masks ``(3, X, Y, Z)`` (WT, TC, ET), dashed outlines; default None.
        reference: the same for the reference segmentation, solid outlines; default None.
        title: figure title (e.g. site and case id); default none.
        slices: axial slice indices; default :func:`tumour_slices` of the reference (else of
            the prediction).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [m for m in SHOWN_MODALITIES if m in images]
    if not rows:
        raise ValueError(f"overlay_png needs one of {SHOWN_MODALITIES}, got {sorted(images)}")
    shape = np.asarray(images[rows[0]]).shape
    for name, masks in (("prediction", prediction), ("reference", reference)):
        if masks is not None and tuple(masks.shape) != (3, *shape):
            raise ValueError(f"{name} masks have shape {tuple(masks.shape)}, images {shape}")
    if slices is None:
        slices = tumour_slices(reference if reference is not None else prediction, shape[-1])
    fig, axes = plt.subplots(len(rows), len(slices), squeeze=False,
                             figsize=(2.6 * len(slices), 3.1 * len(rows)))
    for r, modality in enumerate(rows):
        volume = np.asarray(images[modality], dtype=np.float32)
        low, high = np.percentile(volume[volume != 0], (1, 99)) if (volume != 0).any() else (0, 1)
        for c, z in enumerate(slices):
            _draw_panel(axes[r][c], volume[:, :, z], (low, high), z, reference, prediction)
            axes[r][c].set_title(f"{modality.upper()} z={z}", fontsize=8)
    handles = _legend_handles()
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95 if title else 1))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _draw_panel(ax: Any, plane: np.ndarray, window: tuple[float, float], z: int,
                reference: np.ndarray | None, prediction: np.ndarray | None) -> None:
    """One axial slice ``plane`` (grey levels in ``window``) with the outlines of each region
    at slice ``z``: the reference solid, the prediction dashed."""
    # Radiological display: the array's X runs across, Y down (transpose of [x, y]).
    ax.imshow(plane.T, cmap="gray", vmin=window[0], vmax=window[1], origin="lower")
    for masks, style in ((reference, "solid"), (prediction, "dashed")):
        if masks is None:
            continue
        for (_name, colour), mask in zip(REGION_COLOURS, masks):
            outline = np.asarray(mask[:, :, z], dtype=float).T
            if outline.any() and not outline.all():
                ax.contour(outline, levels=[0.5], colors=[colour], linewidths=1.0,
                           linestyles=style, origin="lower")
    ax.set_axis_off()


def _legend_handles() -> list[Any]:
    """The legend's entries: each region's colour, then the solid and dashed line styles."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colour, label=name) for name, colour in REGION_COLOURS]
    handles += [Line2D([], [], color="black", linestyle="solid", label="reference"),
                Line2D([], [], color="black", linestyle="dashed", label="prediction")]
    return handles
