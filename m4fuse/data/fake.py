"""Tiny BraTS-like cases in any layout, for tests (here and in other packages' tests).

Unlike :mod:`m4fuse.data.synth` these have no anatomy: an ellipsoidal "brain" of random
intensities with a nested tumour (oedema, core, ET), written in the file naming of a chosen
BraTS layout, so that discovery, checks and the cache can be tested in milliseconds.
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


def write_fake_case(root: str | os.PathLike, case_id: str, layout: str = "2021", ext: str = ".nii.gz",
                    shape: tuple[int, int, int] = FAKE_SHAPE, seed: int = 0, with_seg: bool = True,
                    grade: str | None = None, affine: np.ndarray | None = None) -> dict[str, Path]:
    """Write one fake case under ``root`` (in ``root/<grade>/`` if ``grade``); returns
    ``{modality name or "seg": path}`` in the layout's names (2023: t1n/t1c/t2w/t2f, ET = 3)."""
    if layout not in _NAMES:
        raise ValueError(f"layout must be one of {sorted(_NAMES)}, got {layout!r}")
    if ext not in (".nii", ".nii.gz"):
        raise ValueError(f"ext must be .nii or .nii.gz, got {ext!r}")
    sep = "-" if layout == "2023" else "_"
    folder = Path(root) / (grade or "") / case_id
    folder.mkdir(parents=True, exist_ok=True)
    images, label = fake_volumes(shape, seed, et_label=3 if layout == "2023" else 4)
    aff = np.diag([-1.0, -1.0, 1.0, 1.0]) if affine is None else affine
    out: dict[str, Path] = {}
    for name, img in zip(_NAMES[layout], images):
        out[name] = folder / f"{case_id}{sep}{name}{ext}"
        nib.save(nib.Nifti1Image(img.astype(np.int16), aff), out[name])
    if with_seg:
        out["seg"] = folder / f"{case_id}{sep}seg{ext}"
        nib.save(nib.Nifti1Image(label, aff), out["seg"])
    return out
