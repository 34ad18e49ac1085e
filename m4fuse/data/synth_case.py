"""One synthetic case of :mod:`m4fuse.data.synth`: a procedural brain with a glioma, as the
images of one site's acquisition and the BraTS labels (:func:`make_case`).

Each case is a skull-stripped head on a 1 mm grid (default 96 x 96 x 64 voxels, (X, Y, Z)).

Anatomy varies from case to case: head size (x0.86-1.04, each axis a further +-5 %), position
and a small rotation, the lobulation of the outline, cortical thickness, sulcal width
(atrophy), ventricle size and asymmetry; grey-matter cortex with sulcal CSF, white matter, deep
grey nuclei, lateral and third ventricles with an enhancing choroid plexus, the
interhemispheric fissure, cortical vessels that enhance on T1ce, and (in some cases)
periventricular white-matter hyperintensities that are bright on FLAIR/T2 but no tumour.

The tumour is placed anywhere in the brain (lobar, deep, across the midline), its core made
of one to three overlapping lobes with a noisy outline, sometimes with one or two satellite
foci (multifocal); it displaces the anatomy around it (mass effect). The
oedema (label 2) spreads along white matter (a normalised distance shortened in white matter
and lengthened in grey matter; not into CSF). The tumour core (label 1) mixes necrosis and
non-enhancing tumour in a heterogeneous pattern; the enhancing tumour (label 4) is a rim of
varying thickness covering part of the core, or a solid lesion, or nodules. Enhancement,
oedema brightness and tumour texture vary per case; region borders are soft in the images
(partial volume) but sharp in the labels; some cases carry motion artefacts (a ghost along
the phase-encoding direction, interleaved slices shifted).

Tissue contrasts follow those of gliomas on the four sequences: ET bright on T1ce; oedema
bright on FLAIR and T2; necrosis dark on T1/T1ce and bright on T2; CSF bright on T2 and
suppressed on FLAIR; white matter brighter than grey on T1.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.ndimage import gaussian_filter

# Base intensities (T1, T1ce, T2, FLAIR) of each tissue, before the site's acquisition.
# The tumour core (label 1) mixes "necrosis" and "net" (non-enhancing tumour) case by case.
TISSUES: dict[str, tuple[float, float, float, float]] = {
    "csf": (0.30, 0.30, 1.50, 0.20),
    "gm": (0.65, 0.68, 0.80, 0.85),
    "wm": (0.95, 0.92, 0.55, 0.65),
    "wmh": (0.80, 0.80, 1.00, 1.08),  # white-matter hyperintensity (no tumour)
    "oedema": (0.58, 0.60, 1.22, 1.30),
    "net": (0.50, 0.56, 1.12, 1.18),
    "necrosis": (0.30, 0.32, 1.45, 0.75),
    "et": (0.70, 1.45, 0.95, 1.05),
}
# Radius of the tumour core per size class, in "mm" of a ~34 mm mean brain semi-axis.
_SIZE_CLASSES: dict[str, tuple[float, float]] = {
    "large": (7.0, 11.5), "medium": (4.5, 7.0), "small": (2.5, 4.5)}
SIZE_CLASS_NAMES: tuple[str, ...] = ("large", "medium", "small")


def smooth_noise(shape: Sequence[int], rng: np.random.Generator, cell: float) -> np.ndarray:
    """Zero-mean unit-SD random field, smooth on a scale of ``cell`` voxels.

    White noise on a coarse grid, upsampled trilinearly (torch's interpolate: ~50x faster here
    than scipy's cubic spline zoom, and smooth enough for textures and bias fields).
    """
    coarse = [max(2, int(np.ceil(s / cell)) + 1) for s in shape]
    grid = torch.from_numpy(rng.standard_normal(coarse).astype(np.float32))[None, None]
    field = F.interpolate(grid, size=tuple(int(s) for s in shape), mode="trilinear",
                          align_corners=True)[0, 0].numpy()
    return (field - field.mean()) / (field.std() + 1e-6)


def _ellipsoid(coords: Sequence[np.ndarray], centre: Sequence[float], axes: Sequence[float]) -> np.ndarray:
    return sum(((c - m) / a) ** 2 for c, m, a in zip(coords, centre, axes))  # type: ignore[return-value]


def _tissue_value(name: str, m: int, acq: dict[str, Any]) -> float:
    """Intensity of tissue ``name`` on sequence ``m`` (0 T1, 1 T1ce, 2 T2, 3 FLAIR) at a site."""
    value = TISSUES[name][m]
    if name == "gm" and m in (0, 1):  # GM/WM contrast on T1/T1ce around their mean
        wm = TISSUES["wm"][m]
        mid = (value + wm) / 2
        value = mid + (value - mid) * acq["gm_wm_t1"]
    elif name == "wm" and m in (0, 1):
        gm = TISSUES["gm"][m]
        mid = (value + gm) / 2
        value = mid + (value - mid) * acq["gm_wm_t1"]
    elif name == "et" and m == 1:  # gadolinium: ET above white matter by the site's uptake
        value = 0.9 + (value - 0.9) * acq["enhancement"] * 1.6
    elif name in ("oedema", "net", "wmh") and m == 3:
        value *= acq["flair_oedema"]
    elif name in ("oedema", "net", "wmh") and m == 2:
        value *= acq["t2_oedema"]
    elif name == "csf" and m == 3:
        value = acq["flair_csf"]
    return float(value)


class _Head(NamedTuple):
    """The healthy anatomy of one synthetic case (before the tumour is drawn over it)."""

    coords: tuple[np.ndarray, np.ndarray, np.ndarray]  # voxel offsets from the brain centre, head frame
    axes: np.ndarray  # brain semi-axes (X, Y, Z), voxels
    mm: float  # voxels per "mm" of a ~34 mm mean semi-axis
    brain: np.ndarray  # bool (X, Y, Z)
    tissue: np.ndarray  # uint8 (X, Y, Z): 0 bg, 1 wm, 2 gm, 3 csf
    wmh: np.ndarray  # bool: white-matter hyperintensities (FLAIR/T2 bright, no tumour)
    vessels: np.ndarray  # bool: vessels and choroid plexus (enhance on T1ce, no tumour)


class _Focus(NamedTuple):
    """One tumour focus: centre (head frame, voxels), core radius (voxels), lobes."""

    centre: np.ndarray
    radius: float
    lobes: list[tuple[np.ndarray, float]]  # (centre, radius) of each lobe, voxels


def _head_frame(shape: tuple[int, ...], rng: np.random.Generator
                ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray, float]:
    """Rotated, shifted coordinates of the head (voxels from the brain centre), the brain's
    semi-axes and the voxels per "mm"."""
    offset = rng.uniform(-0.03, 0.03, size=3) * np.asarray(shape)
    grids = np.meshgrid(*[np.arange(s, dtype=np.float32) - (s - 1) / 2 - o
                          for s, o in zip(shape, offset)], indexing="ij", sparse=True)
    yaw, pitch, roll = np.deg2rad(rng.uniform(-1, 1, size=3) * np.array([8.0, 6.0, 4.0]))
    cz, sz, cy, sy, cx, sx = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    rot = (np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
           @ np.array([[1, 0, 0], [0, cy, -sy], [0, sy, cy]])
           @ np.array([[cx, 0, sx], [0, 1, 0], [-sx, 0, cx]])).astype(np.float32)
    coords = tuple(rot[i, 0] * grids[0] + rot[i, 1] * grids[1] + rot[i, 2] * grids[2] for i in range(3))
    scale = rng.uniform(0.86, 1.04)
    axes = np.array([0.36 * shape[0], 0.43 * shape[1], 0.40 * shape[2]]) * scale * rng.uniform(0.95, 1.05, size=3)
    mm = float(np.mean(axes)) / 34.0  # sizes below are for a ~34 mm mean semi-axis; scale them
    return coords, axes, mm  # type: ignore[return-value]


def _plan_foci(rng: np.random.Generator, axes: np.ndarray, mm: float, size_class: str,
               foci: int) -> list[_Focus]:
    """The main focus anywhere in the brain (lobar, deep, across the midline) and ``foci - 1``
    smaller satellites 2.2-4.5 core radii away; each of one to three lobes."""
    lo, hi = _SIZE_CLASSES[size_class]
    radius = max(rng.uniform(lo, hi) * mm, 1.8)  # voxels; at least 1.8 on tiny grids
    for _ in range(1000):
        centre = rng.uniform(-0.7, 0.7, size=3) * axes
        if np.sum((centre / axes) ** 2) < 0.45:
            break
    out = []
    for f in range(foci):
        if f == 0:
            c, r = centre, radius
        else:
            r = max(radius * rng.uniform(0.35, 0.7), 1.5)
            for _ in range(1000):
                direction = rng.standard_normal(3)
                c = centre + direction / np.linalg.norm(direction) * radius * rng.uniform(2.2, 4.5)
                if np.sum((c / axes) ** 2) < 0.6:
                    break
        lobes = [(c, r)]
        for _ in range(int(rng.integers(0, 3))):
            direction = rng.standard_normal(3)
            lobes.append((c + direction / np.linalg.norm(direction) * r * rng.uniform(0.3, 0.8),
                          r * rng.uniform(0.45, 0.85)))
        out.append(_Focus(np.asarray(c), float(r), lobes))
    return out


def _mass_effect(coords: tuple[np.ndarray, ...], foci: Sequence[_Focus], strength: float
                 ) -> tuple[np.ndarray, ...]:
    """Where each voxel's healthy anatomy comes from when the tumour pushes it outwards:
    a radial displacement ``strength * r`` inside a focus' core radius ``r``, decaying as
    ``(r / d)^2`` outside (an expanding sphere)."""
    out = [c.astype(np.float32) for c in np.broadcast_arrays(*coords)]
    for focus in foci:
        delta = [c - m for c, m in zip(out, focus.centre)]
        d = np.sqrt(sum(x * x for x in delta)) + 1e-3
        u = strength * focus.radius * np.where(d < focus.radius, d / focus.radius, (focus.radius / d) ** 2)
        out = [c - u * x / d for c, x in zip(out, delta)]
    return tuple(out)


def _healthy_head(shape: tuple[int, ...], rng: np.random.Generator,
                  frame: tuple[tuple[np.ndarray, ...], np.ndarray, float] | None = None,
                  anat: tuple[np.ndarray, ...] | None = None) -> _Head:
    """Brain outline, grey matter (cortex, deep nuclei), CSF (sulci, fissure, ventricles),
    white-matter hyperintensities and enhancing vessels. ``frame`` from :func:`_head_frame`
    (drawn here when None); ``anat``: the coordinates the internal anatomy is drawn at (the
    mass effect's; default the frame's)."""
    coords, axes, mm = frame if frame is not None else _head_frame(shape, rng)
    q = anat if anat is not None else coords
    # Brain outline (the skull: not displaced) and depth below its surface (1 centre, 0 surface).
    lobulation = rng.uniform(0.03, 0.07)
    r = np.sqrt(_ellipsoid(coords, (0, 0, 0), axes)) * (1 + lobulation * smooth_noise(shape, rng, 12 * mm))
    brain = r < 1.0
    depth_mm = (1.0 - r) * float(np.min(axes))
    fold = smooth_noise(shape, rng, 4 * mm)
    cortex_mm = rng.uniform(2.6, 3.8)
    gm = brain & (depth_mm < (cortex_mm + 1.2 * fold) * mm)
    atrophy = rng.uniform(0.0, 1.0)  # wider sulci, larger ventricles
    csf = brain & (depth_mm < (5 + 2 * atrophy) * mm) & (fold > 1.15 - 0.4 * atrophy)  # sulci
    csf |= brain & (np.abs(q[0]) < (0.8 + 0.8 * atrophy) * mm) & (q[2] > -0.2 * axes[2])  # fissure
    for side in (-1, 1):  # deep grey nuclei
        gm |= _ellipsoid(q, (side * 0.26 * axes[0], -0.05 * axes[1], 0.0),
                         (0.1 * axes[0], 0.18 * axes[1], 0.15 * axes[2])) < 1
    bend = 0.12 * axes[2] * (q[1] / axes[1]) ** 2
    vent_scale = 0.75 + 0.8 * atrophy
    vent = np.zeros(shape, bool)
    plexus = np.zeros(shape, bool)
    near_vent = np.zeros(shape, bool)
    for side in (-1, 1):  # lateral ventricles, bent like a banana in Y
        s = vent_scale * rng.uniform(0.85, 1.15)
        vq = (q[0], q[1], q[2] + bend)
        centre = (side * 0.12 * axes[0], 0.05 * axes[1], 0.12 * axes[2])
        e = _ellipsoid(vq, centre, (0.07 * s * axes[0], 0.36 * axes[1], 0.11 * s * axes[2]))
        vent |= e < 1
        near_vent |= e < 2.2
        plexus |= _ellipsoid(q, (side * 0.12 * axes[0], -0.2 * axes[1], 0.12 * axes[2]),
                             (0.05 * s * axes[0] + 0.5, 0.08 * axes[1], 0.06 * s * axes[2] + 0.5)) < 1
    vent |= _ellipsoid(q, (0, -0.05 * axes[1], -0.05 * axes[2]),
                       ((0.02 * axes[0] + 0.5) * vent_scale, 0.15 * axes[1], 0.1 * axes[2])) < 1
    csf |= vent
    tissue = np.zeros(shape, np.uint8)  # 0 bg, 1 wm, 2 gm, 3 csf
    tissue[brain] = 1
    tissue[gm & brain] = 2
    tissue[csf & brain] = 3
    # White-matter hyperintensities (periventricular caps and patches) in about a third of cases.
    wmh = np.zeros(shape, bool)
    if rng.uniform() < 0.35:
        wmh = (tissue == 1) & near_vent & (smooth_noise(shape, rng, 3 * mm) > rng.uniform(0.6, 1.6))
    # Vessels: where two smooth fields both cross zero (tubes), near the surface and the
    # ventricles, plus the choroid plexus in the ventricles; they enhance on T1ce.
    a, b = smooth_noise(shape, rng, 7 * mm), smooth_noise(shape, rng, 7 * mm)
    width = rng.uniform(0.04, 0.09)
    vessels = brain & (np.abs(a) < width) & (np.abs(b) < width) & ((depth_mm < 7 * mm) | near_vent)
    vessels |= plexus & vent
    return _Head(coords, axes, mm, brain, tissue, wmh, vessels)  # type: ignore[arg-type]


class _Tumour(NamedTuple):
    """Labels and the soft fields the images are drawn with."""

    label: np.ndarray  # uint8 BraTS labels 0/1/2/4
    necrosis: np.ndarray  # float32 in [0, 1]: share of necrosis (vs non-enhancing tumour) in the core


def _tumour(shape: tuple[int, ...], rng: np.random.Generator, head: _Head, acq: dict[str, Any],
            foci: Sequence[_Focus], with_et: bool) -> _Tumour:
    """BraTS labels: oedema 2 spreading along white matter around a core 1 (necrosis and
    non-enhancing tumour) with, ``with_et``, enhancing tumour 4 (rim, solid or nodular)."""
    coords = head.coords
    irregular = rng.uniform(0.12, 0.3)
    tc_n = np.full(shape, np.inf, np.float32)  # normalised distance to the core (1 = its edge)
    wt_d = np.full(shape, np.inf, np.float32)  # distance to a core edge, in units of the focus' oedema reach
    extent = rng.uniform(1.2, 1.8) * acq["oedema_extent"]
    for focus in foci:
        lobe_n = np.full(shape, np.inf, np.float32)
        for centre, radius in focus.lobes:
            d = np.sqrt(sum((c - m) ** 2 for c, m in zip(coords, centre)))
            lobe_n = np.minimum(lobe_n, d / radius)
        noise = np.clip(smooth_noise(shape, rng, max(focus.radius / 2, 2.0)), -2, 2)
        n = lobe_n * (1 + irregular * noise)
        tc_n = np.minimum(tc_n, n)
        reach = focus.radius * (extent - 1)  # oedema beyond the core edge, voxels
        wt_d = np.minimum(wt_d, np.maximum(n - 1, 0) * focus.radius / max(reach, 1.0))
    # Oedema follows white matter: its reach is longer where the neighbourhood is white
    # matter, shorter in grey matter, and it does not enter CSF.
    wm_share = gaussian_filter((head.tissue == 1).astype(np.float32), 1.5 * head.mm)
    wt_noise = 1 + 0.25 * np.clip(smooth_noise(shape, rng, max(3.0 * head.mm, 2.0)), -1.5, 1.5)
    wt_n = wt_d * wt_noise / (0.45 + 0.75 * wm_share)
    tc = head.brain & (tc_n < 1.0)
    if not tc.any():  # tiny grids: at least the voxel nearest the main focus' centre
        tc[np.unravel_index(int(np.argmin(np.where(head.brain, tc_n, np.inf))), shape)] = True
    wt = (head.brain & (wt_n < 1.0) & (head.tissue != 3)) | tc
    lab, _ = ndimage.label(wt, structure=np.ones((3, 3, 3)))
    keep = np.unique(lab[tc])
    wt = np.isin(lab, keep[keep > 0]) | tc
    label = np.zeros(shape, np.uint8)
    label[wt] = 2
    label[tc] = 1
    necrosis = np.zeros(shape, np.float32)
    if with_et:
        _draw_enhancing(label, tc, tc_n, rng, head, foci)
        # the rest of the core: necrosis in the centre, non-enhancing tumour towards the edge
        necrosis = np.clip(rng.uniform(0.6, 1.6) * (1 - tc_n) + 0.3 * smooth_noise(shape, rng, 2.0 * head.mm),
                           0, 1).astype(np.float32)
    else:  # lower-grade-like: mostly non-enhancing tumour, little necrosis
        necrosis = np.clip(rng.uniform(0.0, 0.4) * (1 - tc_n) + 0.2 * smooth_noise(shape, rng, 2.0 * head.mm),
                           0, 1).astype(np.float32)
    return _Tumour(label, necrosis)


def _draw_enhancing(label: np.ndarray, tc: np.ndarray, tc_n: np.ndarray, rng: np.random.Generator,
                    head: _Head, foci: Sequence[_Focus]) -> None:
    """Mark the enhancing tumour (label 4) in ``label``, within the core ``tc``: solid (the
    whole core, with a few non-enhancing patches), or a rim of varying thickness over part of
    the core (``tc_n``: normalised distance to the core edge), sometimes with nodules."""
    shape = label.shape
    style = rng.uniform()
    if style < 0.15:  # solid: the whole core enhances, with a few non-enhancing patches
        ang = smooth_noise(shape, rng, 2.5 * head.mm)
        label[tc & (ang > -0.8)] = 4
    else:  # a rim of varying thickness over part of the core, sometimes with nodules
        thickness = rng.uniform(0.15, 0.5) * (1 + 0.5 * smooth_noise(shape, rng, 3 * head.mm))
        rim = tc & (tc_n > 1.0 - np.clip(thickness, 0.08, 0.9))
        frac = rng.uniform(0.4, 1.0)
        ang = smooth_noise(shape, rng, max(foci[0].radius / 1.5, 2.0))
        thr = np.quantile(ang[rim], 1 - frac) if rim.any() else np.inf
        label[rim & (ang >= thr)] = 4
        if rng.uniform() < 0.35:  # enhancing nodules inside the core
            core_idx = np.argwhere(tc)
            for _ in range(int(rng.integers(1, 3))):
                centre = core_idx[int(rng.integers(len(core_idx)))]
                r = max(foci[0].radius * rng.uniform(0.2, 0.4), 1.2)
                ball = sum((np.arange(s, dtype=np.float32).reshape(
                    [-1 if i == k else 1 for i in range(3)]) - centre[k]) ** 2
                           for k, s in enumerate(shape)) < r * r
                label[ball & tc] = 4


def _intensities(shape: tuple[int, ...], rng: np.random.Generator, head: _Head,
                 tumour: _Tumour, acq: dict[str, Any]) -> np.ndarray:
    """Float32 (4, X, Y, Z): each tissue's value per modality with fine texture, then the
    tumour's regions blended in with soft borders (partial volume; labels stay sharp), their
    contrast and texture varying per case."""
    label = tumour.label
    images = np.zeros((4,) + shape, np.float32)
    fine = 0.03 * smooth_noise(shape, rng, 2.0)
    het = rng.uniform(0.05, 0.14) * smooth_noise(shape, rng, rng.uniform(2.0, 4.0))
    enhancement = rng.uniform(0.6, 1.2)  # dose and timing of the contrast agent
    oedema_gain = rng.uniform(0.88, 1.12)
    vessel_gain = rng.uniform(0.5, 1.0)
    # soft region masks: the image's border of each region is blurred, the label's is not
    edge = rng.uniform(0.6, 1.5)
    s_wt = gaussian_filter((label > 0).astype(np.float32), edge)
    s_tc = gaussian_filter(((label == 1) | (label == 4)).astype(np.float32), 0.7 * edge)
    s_et = gaussian_filter((label == 4).astype(np.float32), 0.5)
    nec = tumour.necrosis
    tissue = head.tissue
    for m in range(4):
        img = images[m]
        for code, name in ((1, "wm"), (2, "gm"), (3, "csf")):
            mask = tissue == code
            img[mask] = _tissue_value(name, m, acq) * (1 + fine[mask])
        if head.wmh.any():
            img[head.wmh] = _tissue_value("wmh", m, acq) * (1 + fine[head.wmh])
        if m == 1:  # enhancing vessels and choroid plexus
            img[head.vessels] = (0.9 + (_tissue_value("et", 1, acq) - 0.9) * vessel_gain) * (1 + fine[head.vessels])
        oedema = _tissue_value("oedema", m, acq) * (oedema_gain if m >= 2 else 1.0)
        core = (1 - nec) * _tissue_value("net", m, acq) + nec * _tissue_value("necrosis", m, acq)
        et = _tissue_value("et", m, acq)
        if m == 1:
            et = 0.9 + (et - 0.9) * enhancement
        img[:] = img * (1 - s_wt) + oedema * (1 + het) * s_wt
        img[:] = img * (1 - s_tc) + core * (1 + het) * s_tc
        img[:] = img * (1 - s_et) + et * (1 + het) * s_et
    return images


def _acquire(images: np.ndarray, rng: np.random.Generator, head: _Head,
             acq: dict[str, Any]) -> None:
    """The site's acquisition, in place: blur (thicker along Z at some sites), motion (in the
    site's share of cases: a ghost along Y and interleaved slices shifted), gamma, bias, noise,
    scale/offset; skull-stripped."""
    shape = head.brain.shape
    sigma = [0.3 + acq["blur"]] * 2 + [0.3 + acq["blur"] + acq["blur_z_extra"]]
    bias = np.exp(acq["bias"] * smooth_noise(shape, rng, 40 * head.mm))
    moved = rng.uniform() < acq.get("motion", 0.0)
    ghost, shift = rng.uniform(0.04, 0.12), rng.uniform(0.4, 1.2)
    for m in range(4):
        img = gaussian_filter(images[m], sigma)
        if moved:
            img = img + ghost * np.roll(img, shape[1] // 2, axis=1)
            odd = img[:, :, 1::2]
            img[:, :, 1::2] = ((1 - shift % 1) * np.roll(odd, int(shift), axis=1)
                               + (shift % 1) * np.roll(odd, int(shift) + 1, axis=1))
        gamma = acq["gamma"][m] * rng.uniform(0.97, 1.03)
        img = np.clip(img, 0, None) ** gamma * bias
        n1, n2 = rng.standard_normal((2,) + shape).astype(np.float32) * acq["noise"]
        img = np.sqrt((img + n1) ** 2 + n2 ** 2)  # Rician magnitude noise
        img = img * acq["scale"] * rng.uniform(0.95, 1.05) + acq["offset"]
        images[m] = np.where(head.brain, np.clip(img, 1, 32000), 0)


def make_case(shape: Sequence[int], rng: np.random.Generator, acq: dict[str, Any],
              size_class: str = "medium", with_et: bool = True, return_tissue: bool = False,
              *, foci: int = 1
              ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic case: images float32 (4, X, Y, Z) after acquisition, labels uint8 (X, Y, Z).

    Args:
        shape: grid ``(X, Y, Z)``.
        rng: the case's random generator (draws in a fixed order: head frame, tumour foci,
            anatomy, tumour, images, acquisition).
        acq: the site's acquisition (:func:`site_acquisition`).
        size_class: ``"large"``, ``"medium"`` (default) or ``"small"`` core radius.
        with_et: an enhancing tumour (default True); False: lower-grade-like, no label 4.
        return_tissue: also return the healthy-tissue map uint8 (X, Y, Z): 0 background, 1
            white matter, 2 grey matter, 3 CSF (before the tumour is drawn over it); default False.
        foci: number of tumour foci (default 1; 2-3: multifocal).
    """
    if size_class not in _SIZE_CLASSES:
        raise ValueError(f"size_class must be one of {sorted(_SIZE_CLASSES)}, got {size_class!r}")
    if foci < 1:
        raise ValueError(f"foci must be >= 1, got {foci}")
    shape = tuple(int(s) for s in shape)
    with _one_torch_thread():
        return _make_case(shape, rng, acq, size_class, with_et, return_tissue, foci)


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """torch on one intra-op thread meanwhile: the small upsamplings of :func:`smooth_noise`
    took ~18 ms each with 2 threads on a busy 2-core machine, 3 ms with one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _make_case(shape: tuple[int, ...], rng: np.random.Generator, acq: dict[str, Any],
               size_class: str, with_et: bool, return_tissue: bool, foci: int
               ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`make_case` after its checks."""
    frame = _head_frame(shape, rng)
    focus_list = _plan_foci(rng, frame[1], frame[2], size_class, foci)
    anat = _mass_effect(frame[0], focus_list, rng.uniform(0.0, 0.5))
    head = _healthy_head(shape, rng, frame, anat)
    tumour = _tumour(shape, rng, head, acq, focus_list, with_et)
    images = _intensities(shape, rng, head, tumour, acq)
    _acquire(images, rng, head, acq)
    label = tumour.label
    label[~head.brain] = 0
    if return_tissue:
        return images, label, head.tissue
    return images, label
