"""Synthetic multi-site BraTS data: procedural brains with gliomas and per-site acquisition shift.

Each case is a skull-stripped head on a 1 mm grid (default 96 x 96 x 64 voxels, (X, Y, Z)):
an irregular brain outline, a folded grey-matter cortex with sulcal CSF, white matter, deep grey
nuclei, lateral and third ventricles and the interhemispheric fissure. A tumour is placed
off-midline: a whole-tumour region of irregular outline (oedema, label 2, spreading less into
grey matter) around a tumour core (label 1, necrotic/non-enhancing) whose rim enhances (label
4; in most cases only part of the rim), with sizes from large to small (a few hundred voxels of
ET) and about one case in six without any enhancement (low-grade-like).

Tissue contrasts follow those of gliomas on the four sequences: ET bright on T1ce; oedema
bright on FLAIR and T2; necrosis dark on T1/T1ce and bright on T2; CSF bright on T2 and
suppressed on FLAIR; white matter brighter than grey on T1.

Each site has its own acquisition (:func:`site_acquisition`, table there): intensity scale and
offset, and shifts that survive the per-modality z-scoring of preprocessing: a nonlinear
response (gamma) per sequence, its own tissue contrasts (grey/white on T1, compressed or
inverted; gadolinium enhancement of ET; oedema on FLAIR/T2; CSF suppression on FLAIR), a
multiplicative bias field, Rician noise (SNR), blur (anisotropic at thick-slice sites) and the
oedema extent around the core. Site 0 is the reference scanner; the others are progressively
more different. The parameters of every site are written to ``acquisition.json``.

Files: ``<out>/BraTS2021_<id>/BraTS2021_<id>_{t1,t1ce,t2,flair,seg}.nii.gz`` (int16 images,
uint8 labels with ET = 4, LPS-like affine with 1 mm spacing) and ``<out>/partition.csv``
(FeTS ``Partition_ID,Subject_ID``, sites ``site0 ..``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.ndimage import gaussian_filter
from tqdm.auto import tqdm

from m4fuse.data.partition import write_partition_csv
from m4fuse.data.sites import site_names

# Default grid (X, Y, Z) in voxels of 1 mm, and the training size (D, H, W) = (Z, Y, X) that
# suits it: the brain's bounding box (~70 x 84 x 52 voxels) shrinks by ~0.8.
SYNTH_SHAPE: tuple[int, int, int] = (96, 96, 64)
SYNTH_SIZE: tuple[int, int, int] = (48, 64, 64)

# Base intensities (T1, T1ce, T2, FLAIR) of each tissue, before the site's acquisition.
TISSUES: dict[str, tuple[float, float, float, float]] = {
    "csf": (0.30, 0.30, 1.50, 0.20),
    "gm": (0.65, 0.68, 0.80, 0.85),
    "wm": (0.95, 0.92, 0.55, 0.65),
    "oedema": (0.58, 0.60, 1.22, 1.30),
    "core": (0.38, 0.40, 1.30, 0.80),
    "et": (0.70, 1.45, 0.95, 1.05),
}
_SIZE_CLASSES = {"large": (8.0, 11.0), "medium": (6.0, 8.0), "small": (4.2, 5.2)}


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


# Per-site acquisition of sites 0-3 (see :func:`site_acquisition`): site 0 is the reference
# scanner, the next ones progressively further from it. Sites >= 4 draw each parameter between
# site 0's and site 3's value.
SITE_TABLE: dict[str, tuple[float, float, float, float]] = {
    "gm_wm_t1": (1.0, 0.7, 0.45, -0.6),
    "enhancement": (1.0, 0.7, 0.6, 0.42),
    "flair_oedema": (1.0, 0.92, 0.84, 0.76),
    "flair_csf": (0.2, 0.3, 0.45, 0.6),
    "t2_oedema": (1.0, 0.95, 0.9, 0.82),
    "gamma_spread": (0.0, 0.2, 0.3, 0.45),
    "bias": (0.04, 0.1, 0.15, 0.2),
    "noise": (0.01, 0.04, 0.055, 0.085),
    "blur": (0.0, 0.2, 0.25, 0.4),
    "blur_z_extra": (0.0, 0.0, 1.0, 0.5),
    "oedema_extent": (1.0, 1.0, 0.85, 1.2),
}


def site_acquisition(site: int, seed: int) -> dict[str, Any]:
    """The acquisition parameters of one site, deterministic in ``(site, seed)``.

    Sites 0-3 take the values of :data:`SITE_TABLE` (each jittered by a factor drawn in
    [0.92, 1.08] from the seed; site 0's are exact), ordered from the reference scanner to the
    most different one; site ``k >= 4`` draws each parameter at a fraction U(0.3, 1) of the way
    from site 0's value to site 3's. Scale and offset (arbitrary scanner units, removed by the
    z-scoring of preprocessing) are drawn for every site.

    ================  =====  =====  =====  =====  ==================================================
    parameter         site0  site1  site2  site3  meaning
    ================  =====  =====  =====  =====  ==================================================
    gm_wm_t1          1.0    0.7    0.45   -0.6   GM/WM contrast of pure tissue on T1 and T1ce
                                                  (x reference; < 0: inverted; partial voluming
                                                  with CSF and blur darken the thin cortex)
    enhancement       1.0    0.7    0.6    0.42   gadolinium uptake of ET on T1ce (x reference;
                                                  ET stays brighter than white matter)
    flair_oedema      1.0    0.92   0.84   0.76   oedema brightness on FLAIR (x reference)
    flair_csf         0.2    0.3    0.45   0.6    CSF on FLAIR (incomplete suppression)
    t2_oedema         1.0    0.95   0.9    0.82   oedema brightness on T2 (x reference)
    gamma_spread      0.0    0.2    0.3    0.45   per-sequence gamma drawn in exp(+-spread)
                                                  (nonlinear intensity response)
    bias              0.04   0.1    0.15   0.2    SD of the log bias field (smooth, ~40 mm)
    noise             0.01   0.04   0.055  0.085  Rician noise SD (tissue intensities ~0.3-1.5)
    blur              0.0    0.2    0.25   0.4    extra Gaussian blur in-plane (voxels; base 0.3)
    blur_z_extra      0.0    0.0    1.0    0.5    extra blur along Z (thick slices, ~3 mm)
    oedema_extent     1.0    1.0    0.85   1.2    whole-tumour radius / core radius (x reference)
    ================  =====  =====  =====  =====  ==================================================
    """
    if site < 0:
        raise ValueError(f"site must be >= 0, got {site}")
    rng = np.random.default_rng([seed, 7919, site])
    acq: dict[str, Any] = {"scale": float(rng.uniform(300, 1500)), "offset": float(rng.uniform(0, 150))}
    for key, values in SITE_TABLE.items():
        if site < len(values):
            value = values[site] * (1.0 if site == 0 else float(rng.uniform(0.92, 1.08)))
        else:
            value = values[0] + float(rng.uniform(0.3, 1.0)) * (values[-1] - values[0])
        acq[key] = float(value)
    acq["gamma"] = [float(np.exp(g)) for g in rng.uniform(-1, 1, size=4) * acq["gamma_spread"]]
    return acq


def _ellipsoid(coords: tuple[np.ndarray, ...], centre: Sequence[float], axes: Sequence[float]) -> np.ndarray:
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
    elif name == "oedema" and m == 3:
        value *= acq["flair_oedema"]
    elif name == "oedema" and m == 2:
        value *= acq["t2_oedema"]
    elif name == "csf" and m == 3:
        value = acq["flair_csf"]
    return float(value)


class _Head(NamedTuple):
    """The healthy anatomy of one synthetic case (before the tumour is drawn over it)."""

    coords: tuple[np.ndarray, np.ndarray, np.ndarray]  # voxel offsets from the centre
    axes: np.ndarray  # brain semi-axes (X, Y, Z), voxels
    mm: float  # voxels per "mm" of a ~34 mm mean semi-axis
    brain: np.ndarray  # bool (X, Y, Z)
    tissue: np.ndarray  # uint8 (X, Y, Z): 0 bg, 1 wm, 2 gm, 3 csf


def _healthy_head(shape: tuple[int, ...], rng: np.random.Generator) -> _Head:
    """Brain outline, grey matter (cortex, deep nuclei) and CSF (sulci, fissure, ventricles)."""
    x, y, z = np.ogrid[tuple(slice(0, s) for s in shape)]
    coords = tuple((c - (s - 1) / 2).astype(np.float32) for c, s in zip((x, y, z), shape))
    jitter = rng.uniform(0.94, 1.06, size=3)
    axes = np.array([0.36 * shape[0], 0.43 * shape[1], 0.40 * shape[2]]) * jitter
    mm = float(np.mean(axes)) / 34.0  # sizes below are for a ~34 mm mean semi-axis; scale them
    # Brain outline and depth below its surface (1 at the centre, 0 at the surface).
    r = np.sqrt(_ellipsoid(coords, (0, 0, 0), axes)) * (1 + 0.05 * smooth_noise(shape, rng, 12 * mm))
    brain = r < 1.0
    depth_mm = (1.0 - r) * float(np.min(axes))
    fold = smooth_noise(shape, rng, 4 * mm)
    gm = brain & (depth_mm < (3.2 + 1.2 * fold) * mm)
    csf = brain & (depth_mm < 6 * mm) & (fold > 1.0)  # sulci
    csf |= brain & (np.abs(coords[0]) < 0.9 * mm) & (coords[2] > -0.2 * axes[2])  # fissure
    for side in (-1, 1):  # deep grey nuclei
        gm |= _ellipsoid(coords, (side * 0.26 * axes[0], -0.05 * axes[1], 0.0),
                         (0.1 * axes[0], 0.18 * axes[1], 0.15 * axes[2])) < 1
    bend = 0.12 * axes[2] * (coords[1] / axes[1]) ** 2
    for side in (-1, 1):  # lateral ventricles, bent like a banana in Y
        vent = _ellipsoid((coords[0], coords[1], coords[2] + bend),
                          (side * 0.12 * axes[0], 0.05 * axes[1], 0.12 * axes[2]),
                          (0.07 * axes[0], 0.36 * axes[1], 0.11 * axes[2])) < 1
        csf |= vent
    csf |= _ellipsoid(coords, (0, -0.05 * axes[1], -0.05 * axes[2]),
                      (0.02 * axes[0] + 0.5, 0.15 * axes[1], 0.1 * axes[2])) < 1
    tissue = np.zeros(shape, np.uint8)  # 0 bg, 1 wm, 2 gm, 3 csf
    tissue[brain] = 1
    tissue[gm & brain] = 2
    tissue[csf & brain] = 3
    return _Head(coords, axes, mm, brain, tissue)


def _tumour(shape: tuple[int, ...], rng: np.random.Generator, head: _Head, acq: dict[str, Any],
            size_class: str, with_et: bool) -> np.ndarray:
    """BraTS labels uint8 (X, Y, Z): oedema 2 around a necrotic/non-enhancing core 1 with,
    ``with_et``, an enhancing rim 4 on part of it."""
    coords, axes, mm = head.coords, head.axes, head.mm
    lo, hi = _SIZE_CLASSES[size_class]
    tc_r = max(rng.uniform(lo, hi) * mm, 3.0)  # voxels; at least 3 on tiny grids
    wt_r = tc_r * rng.uniform(1.4, 1.9) * acq["oedema_extent"]
    for _ in range(1000):
        centre = rng.uniform(-0.55, 0.55, size=3) * axes
        if abs(centre[0]) > 0.2 * axes[0] and np.sum((centre / axes) ** 2) < 0.45:
            break
    dist = np.sqrt(sum((c - m) ** 2 for c, m in zip(coords, centre)))
    wt_n = dist / wt_r * (1 + 0.25 * np.clip(smooth_noise(shape, rng, max(wt_r / 2, 2.0)), -1.5, 1.5))
    wt = _largest_component(head.brain & (wt_n < 1.0 - 0.25 * (head.tissue == 2)))
    tc_n = dist / tc_r * (1 + 0.12 * np.clip(smooth_noise(shape, rng, max(tc_r / 2, 2.0)), -2, 2))
    tc = _largest_component(wt & (tc_n < 1.0))
    label = np.zeros(shape, np.uint8)
    label[wt] = 2
    label[tc] = 1
    if with_et:
        rim_mm = max(rng.uniform(1.6, 2.8) * mm, 1.5)
        rim = tc & (tc_n > 1.0 - rim_mm / tc_r)
        frac = rng.uniform(0.55, 1.0)
        ang = smooth_noise(shape, rng, max(tc_r / 1.5, 2.0))
        thr = np.quantile(ang[rim], 1 - frac) if rim.any() else np.inf
        label[rim & (ang >= thr)] = 4
    return label


def _intensities(shape: tuple[int, ...], rng: np.random.Generator, tissue: np.ndarray,
                 label: np.ndarray, acq: dict[str, Any]) -> np.ndarray:
    """Float32 (4, X, Y, Z): each tissue's and tumour region's value per modality, with
    texture (fine in healthy tissue, coarser in the tumour)."""
    images = np.zeros((4,) + shape, np.float32)
    fine = 0.03 * smooth_noise(shape, rng, 2.0)
    het = 0.08 * smooth_noise(shape, rng, 3.0)
    regions = [(tissue == 1, "wm", fine), (tissue == 2, "gm", fine), (tissue == 3, "csf", fine),
               (label == 2, "oedema", het), (label == 1, "core", het), (label == 4, "et", het)]
    for m in range(4):
        img = images[m]
        for mask, name, tex in regions:
            value = _tissue_value(name, m, acq)
            img[mask] = value * (1 + tex[mask])
    return images


def _acquire(images: np.ndarray, rng: np.random.Generator, head: _Head,
             acq: dict[str, Any]) -> None:
    """The site's acquisition, in place: partial voluming, blur (thicker along Z at some
    sites), gamma, bias, noise, scale/offset; skull-stripped."""
    shape = head.brain.shape
    sigma = [0.3 + acq["blur"]] * 2 + [0.3 + acq["blur"] + acq["blur_z_extra"]]
    bias = np.exp(acq["bias"] * smooth_noise(shape, rng, 40 * head.mm))
    for m in range(4):
        img = gaussian_filter(images[m], sigma)
        gamma = acq["gamma"][m] * rng.uniform(0.97, 1.03)
        img = np.clip(img, 0, None) ** gamma * bias
        n1, n2 = rng.standard_normal((2,) + shape).astype(np.float32) * acq["noise"]
        img = np.sqrt((img + n1) ** 2 + n2 ** 2)  # Rician magnitude noise
        img = img * acq["scale"] * rng.uniform(0.95, 1.05) + acq["offset"]
        images[m] = np.where(head.brain, np.clip(img, 1, 32000), 0)


def make_case(shape: Sequence[int], rng: np.random.Generator, acq: dict[str, Any],
              size_class: str, with_et: bool, return_tissue: bool = False
              ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic case: images float32 (4, X, Y, Z) after acquisition, labels uint8 (X, Y, Z).

    With ``return_tissue`` (default False) also the healthy-tissue map uint8 (X, Y, Z): 0
    background, 1 white matter, 2 grey matter, 3 CSF (before the tumour is drawn over it).
    The draws from ``rng`` come in a fixed order: anatomy, tumour, texture, acquisition.
    """
    if size_class not in _SIZE_CLASSES:
        raise ValueError(f"size_class must be one of {sorted(_SIZE_CLASSES)}, got {size_class!r}")
    shape = tuple(int(s) for s in shape)
    head = _healthy_head(shape, rng)
    label = _tumour(shape, rng, head, acq, size_class, with_et)
    images = _intensities(shape, rng, head.tissue, label, acq)
    _acquire(images, rng, head, acq)
    label[~head.brain] = 0
    if return_tissue:
        return images, label, head.tissue
    return images, label


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (the mask itself if empty)."""
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())[1:]
    return lab == (int(np.argmax(sizes)) + 1)


def _affine(shape: Sequence[int]) -> np.ndarray:
    """An LPS-like BraTS affine: 1 mm voxels, X and Y flipped, origin near the brain centre."""
    aff = np.diag([-1.0, -1.0, 1.0, 1.0])
    aff[:3, 3] = [shape[0] / 2 - 0.5, shape[1] / 2 + 10.5, -shape[2] / 2 + 8.0]
    return aff


def synthesize(out_dir: str | os.PathLike, sites: int = 4, cases_per_site: int = 12, seed: int = 0,
               shape: Sequence[int] = SYNTH_SHAPE, progress: bool = True) -> dict[str, str]:
    """Write the synthetic BraTS2021-layout set and its ``partition.csv``; returns ``{case: site}``.

    Args:
        out_dir: output folder (created; existing cases of the same ids are overwritten).
        sites: number of sites (default 4), named ``site0 ..``.
        cases_per_site: cases per site (default 12); per site about one in six has no ET and
            the sizes cycle large, medium, small.
        seed: seed of everything (default 0): same arguments -> same files.
        shape: grid ``(X, Y, Z)`` in 1 mm voxels (default ``(96, 96, 64)``; ``(240, 240, 155)``
            is the BraTS grid).
        progress: show a progress bar (default True).
    """
    if sites < 1 or cases_per_site < 1:
        raise ValueError(f"sites and cases_per_site must be >= 1, got {sites}, {cases_per_site}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be three ints >= 16 (X, Y, Z), got {shape}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = site_names(sites)
    partition: dict[str, str] = {}
    acquisitions = {name: site_acquisition(k, seed) for k, name in enumerate(names)}
    affine = _affine(shape)
    bar = tqdm(total=sites * cases_per_site, desc="synth", unit="case", disable=not progress)
    for k, name in enumerate(names):
        plan_rng = np.random.default_rng([seed, 104729, k])
        n = cases_per_site
        classes = [("large", "medium", "small")[j % 3] for j in range(n)]
        no_et = set(range(5, n, 6)) or ({n - 1} if n >= 4 else set())
        with_et = [j not in no_et for j in range(n)]
        order = plan_rng.permutation(n)
        for j in range(n):
            idx = k * cases_per_site + j
            case_id = f"BraTS2021_{idx:05d}"
            rng = np.random.default_rng([seed, k, j])
            images, label = make_case(shape, rng, acquisitions[name], classes[order[j]], with_et[order[j]])
            case_dir = out / case_id
            case_dir.mkdir(exist_ok=True)
            for mod, img in zip(("t1", "t1ce", "t2", "flair"), images):
                _save(np.round(img).astype(np.int16), affine, case_dir / f"{case_id}_{mod}.nii.gz")
            _save(label, affine, case_dir / f"{case_id}_seg.nii.gz")
            partition[case_id] = name
            bar.update()
    bar.close()
    write_partition_csv(out / "partition.csv", partition)
    (out / "acquisition.json").write_text(json.dumps(
        {"seed": seed, "shape": list(shape), "sites": acquisitions}, indent=1))
    return partition


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    tmp = path.with_name(f".tmp-{path.name}")
    nib.save(img, tmp)
    os.replace(tmp, path)
