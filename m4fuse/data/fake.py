"""Tiny BraTS-like cases in any layout, for tests (here and in other packages' tests).

Unlike :mod:`m4fuse.data.synth` these have no anatomy: an ellipsoidal "brain" of random
intensities with a nested tumour (oedema, core, ET), written in the file naming of a chosen
BraTS layout, so that discovery, checks and the cache can be tested in milliseconds.

One writer, :func:`write_fake_case`, with two recipes for the volumes: :func:`fake_volumes`
(1 mm voxels, the default) and :func:`spaced_volumes` (anisotropic voxels and an origin off
zero, a tumour that is round in millimetres: for tests of the way back to a case's own grid);
:func:`write_spaced_case` writes the latter.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

FAKE_SHAPE: tuple[int, int, int] = (24, 24, 16)
_NAMES = {"2019": ("t1", "t1ce", "t2", "flair"), "2021": ("t1", "t1ce", "t2", "flair"),
          "2023": ("t1n", "t1c", "t2w", "t2f")}


def fake_volumes(shape: tuple[int, int, int] = FAKE_SHAPE, seed: int = 0,
                 et_label: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """``(images float32 (4, X, Y, Z), label uint8 (X, Y, Z))``: brain ellipsoid, nested tumour."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    brain = (grid ** 2).sum(0) < 0.8
    centre = rng.uniform(-0.2, 0.2, size=3)
    d = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
    label = np.zeros(shape, np.uint8)
    label[brain & (d < 0.45)] = 2
    label[brain & (d < 0.3)] = et_label
    label[brain & (d < 0.18)] = 1
    images = np.zeros((4,) + shape, np.float32)
    for m in range(4):
        images[m][brain] = rng.uniform(100, 200) + 50 * (label[brain] == et_label) * (m == 1) \
            + rng.normal(0, 5, size=int(brain.sum()))
    return images, label


def spaced_volumes(shape: tuple[int, int, int] = (22, 26, 18),
                   spacing: tuple[float, float, float] = (1.0, 1.2, 2.0), et_label: int = 4,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images float64 (4, X, Y, Z), label uint8 (X, Y, Z), affine)`` of a case with voxels of
    ``spacing`` mm and the origin ``(10, -20, 5)``: an ellipsoidal brain, a tumour round in mm
    (oedema within 7 mm of its centre, core within 4.5 mm, ET the core's outer 1.5 mm)."""
    rng = np.random.default_rng(seed)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = (10.0, -20.0, 5.0)
    grid = np.indices(shape).astype(np.float64)
    centre = np.array(shape, dtype=np.float64)[:, None, None, None] / 2
    r = np.sqrt((((grid - centre) / (np.array(shape)[:, None, None, None] * 0.4)) ** 2).sum(0))
    brain = r < 1.0
    tumour_c = centre + np.array([3, -2, 1])[:, None, None, None]
    t = np.sqrt((((grid - tumour_c) * np.array(spacing)[:, None, None, None]) ** 2).sum(0))
    label = np.zeros(shape, np.uint8)
    label[(t < 7.0) & brain] = 2
    label[(t < 4.5) & brain] = 1
    label[(t < 4.5) & (t > 3.0) & brain] = et_label
    base = rng.uniform(50, 100, size=4)
    images = np.zeros((4,) + tuple(shape), np.float64)
    for k in range(4):
        img = base[k] * brain + 40.0 * (label > 0) * (k + 1) + rng.normal(0, 2, shape) * brain
        img[~brain] = 0
        images[k] = img
    return images, label, affine


def write_spaced_case(root: str | os.PathLike, case_id: str = "BraTS2021_00007",
                      shape: tuple[int, int, int] = (22, 26, 18),
                      spacing: tuple[float, float, float] = (1.0, 1.2, 2.0), et_label: int = 4,
                      seed: int = 0, layout: str = "2021") -> tuple[Path, np.ndarray, np.ndarray]:
    """Write a case of :func:`spaced_volumes` with :func:`write_fake_case` (``.nii.gz``);
    returns ``(its folder, its label, its affine)``."""
    images, label, affine = spaced_volumes(shape, spacing, et_label, seed)
    write_fake_case(root, case_id, layout, volumes=(images, label), affine=affine)
    return Path(root) / case_id, label, affine


def write_fake_case(root: str | os.PathLike, case_id: str, layout: str = "2021", ext: str = ".nii.gz",
                    shape: tuple[int, int, int] = FAKE_SHAPE, seed: int = 0, with_seg: bool = True,
                    grade: str | None = None, affine: np.ndarray | None = None, *,
                    volumes: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Path]:
    """Write one fake case under ``root`` (in ``root/<grade>/`` if ``grade``); returns
    ``{modality name or "seg": path}`` in the layout's names (2023: t1n/t1c/t2w/t2f, ET = 3).

    ``volumes``: ``(images (4, X, Y, Z), label)`` to write (keyword; default None:
    :func:`fake_volumes` of ``shape`` and ``seed``); images are stored as int16."""
    if layout not in _NAMES:
        raise ValueError(f"layout must be one of {sorted(_NAMES)}, got {layout!r}")
    if ext not in (".nii", ".nii.gz"):
        raise ValueError(f"ext must be .nii or .nii.gz, got {ext!r}")
    sep = "-" if layout == "2023" else "_"
    folder = Path(root) / (grade or "") / case_id
    folder.mkdir(parents=True, exist_ok=True)
    if volumes is None:
        volumes = fake_volumes(shape, seed, et_label=3 if layout == "2023" else 4)
    images, label = volumes
    aff = np.diag([-1.0, -1.0, 1.0, 1.0]) if affine is None else affine
    out: dict[str, Path] = {}
    for name, img in zip(_NAMES[layout], images):
        out[name] = folder / f"{case_id}{sep}{name}{ext}"
        nib.save(nib.Nifti1Image(img.astype(np.int16), aff), out[name])
    if with_seg:
        out["seg"] = folder / f"{case_id}{sep}seg{ext}"
        nib.save(nib.Nifti1Image(label, aff), out["seg"])
    return out
