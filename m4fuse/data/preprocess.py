"""Reading, checking and preprocessing one BraTS case; mapping a prediction back to its grid.

Pipeline of :func:`preprocess_case` (each step a MONAI transform where MONAI has one):

1. read the four modalities with nibabel (``(X, Y, Z)``), check that each is a readable 3-D
   NIfTI with finite voxels and that all share shape and affine;
1b. reorient to the one canonical orientation :data:`CANONICAL_AXCODES` (``LPS``, the BraTS
   convention) with nibabel's orientation tools (axis permutations and flips only, exact), so
   the network sees the same anatomy on the same axes whatever voxel order a hospital stores;
2. brain mask = voxels non-zero in any modality (BraTS volumes are skull-stripped with a zero
   background); crop to its bounding box (``generate_spatial_bounding_box`` + ``SpatialCrop``);
3. z-score each modality over its brain voxels (``NormalizeIntensity(nonzero=True,
   channel_wise=True)``; the background stays 0);
4. transpose to ``(C, Z, Y, X)`` and resize to the training size (``Resize``, trilinear).

Label maps go through the same crop/resize as region masks (:func:`preprocess_label`).
:func:`restore_to_original` undoes steps 4, 2 and 1b for a prediction, exactly: a case stored
with permuted or flipped axes (and the matching affine) gets the same labels in physical space.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.transforms import NormalizeIntensity, Resize, SpatialCrop
from monai.transforms.utils import generate_spatial_bounding_box

from m4fuse.data.layout import MODALITIES, DataError
from m4fuse.data.regions import labels_to_regions, valid_labels

# Bump when the preprocessing changes: it is part of the cache key.
# 2: reorientation to CANONICAL_AXCODES before cropping (crop box in the canonical grid).
PREPROCESS_VERSION = 2
#: The orientation every volume is brought to before the network (nibabel axis codes of the
#: voxel axes X, Y, Z): BraTS releases are stored LPS, so their arrays are unchanged by it.
CANONICAL_AXCODES: tuple[str, str, str] = ("L", "P", "S")
DEFAULT_SIZE: tuple[int, int, int] = (64, 128, 128)
# Tolerances for "same affine" between the modalities of a case (millimetres / unitless).
AFFINE_ATOL = 1e-3
AFFINE_RTOL = 1e-5


def check_size(size: Sequence[int]) -> tuple[int, int, int]:
    """Validate a training size ``(D, H, W) = (Z, Y, X)``: three positive ints."""
    try:
        out = tuple(int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be three positive ints (D, H, W), got {size!r}") from None
    if len(out) != 3 or min(out) < 1 or any(int(s) != s for s in size):
        raise ValueError(f"size must be three positive ints (D, H, W), got {size!r}")
    return out  # type: ignore[return-value]


def load_volume(path: str | os.PathLike, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one NIfTI volume as ``(array (X, Y, Z) float32, affine (4, 4))``.

    Raises :class:`DataError` naming ``case_id`` and ``path`` if the file is missing, not
    NIfTI, truncated, not 3-D, or holds NaN/Inf voxels. Never writes to the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(case_id, path, "file not found")
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises ImageFileError, EOFError, zlib/gzip errors ...
        raise DataError(case_id, path, f"not a readable NIfTI file ({type(err).__name__}: {err})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(case_id, path, f"not a NIfTI image (nibabel read it as {type(img).__name__})")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # truncated gzip: EOFError / zlib.error / OSError
        raise DataError(case_id, path, "cannot read voxel data, truncated or corrupt "
                        f"({type(err).__name__}: {err})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(case_id, path, f"expected a 3-D volume, got shape {data.shape}")
    data = np.asarray(data, dtype=np.float32)
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise DataError(case_id, path, f"{bad} voxels are NaN or Inf")
    return data, np.asarray(img.affine, dtype=np.float64)


def _check_same_grid(case_id: str, ref_path: Path, ref: tuple[np.ndarray, np.ndarray],
                     path: Path, other: tuple[np.ndarray, np.ndarray]) -> None:
    if other[0].shape != ref[0].shape:
        raise DataError(case_id, path, f"shape {other[0].shape} differs from {ref[0].shape} of {ref_path.name}")
    if not np.allclose(other[1], ref[1], atol=AFFINE_ATOL, rtol=AFFINE_RTOL):
        raise DataError(
            case_id, path,
            f"affine differs from that of {ref_path.name}:\n{np.round(other[1], 4)}\nvs\n{np.round(ref[1], 4)}",
        )


def to_canonical(affine: np.ndarray) -> np.ndarray:
    """The nibabel orientation transform (``(3, 2)`` array: target axis, flip) that brings a
    volume with ``affine`` to :data:`CANONICAL_AXCODES`; identity for an LPS volume.

    Written with nibabel's ``io_orientation``/``ornt_transform`` rather than MONAI's
    ``Orientation`` because the inverse has to be applied to plain arrays on the original grid
    (:func:`restore_to_original`) from what the cache's JSON meta stores.
    """
    return nib.orientations.ornt_transform(
        nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64)),
        nib.orientations.axcodes2ornt(CANONICAL_AXCODES),
    )


def reorient(array: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Apply an orientation ``transform`` to the last three (spatial) axes of ``array``."""
    if array.ndim == 3:
        return np.ascontiguousarray(nib.orientations.apply_orientation(array, transform))
    return np.stack([reorient(a, transform) for a in array])


def _inverse(transform: np.ndarray) -> np.ndarray:
    """The orientation transform undoing ``transform``."""
    out = np.zeros_like(transform)
    for axis, (target, flip) in enumerate(np.asarray(transform)):
        out[int(target)] = (axis, flip)
    return out


def _as_paths(paths: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(paths, Mapping):
        missing = [m for m in MODALITIES if m not in paths]
        if missing:
            raise ValueError(f"modality paths lack {missing}; keys given: {sorted(paths)}")
        return [Path(paths[m]) for m in MODALITIES]
    out = [Path(p) for p in paths]
    if len(out) != len(MODALITIES):
        raise ValueError(f"need {len(MODALITIES)} modality paths (T1, T1ce, T2, FLAIR), got {len(out)}")
    return out


def preprocess_case(
    paths: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike],
    size: Sequence[int] = DEFAULT_SIZE,
    case_id: str | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Preprocess one case from its four modality files (no segmentation needed).

    Args:
        paths: the T1, T1ce, T2, FLAIR files, as a sequence in that order or a mapping with
            keys ``t1, t1ce, t2, flair``.
        size: training size ``(D, H, W) = (Z, Y, X)``; default ``(64, 128, 128)``.
        case_id: name used in error messages; default the T1 file's folder name.

    Returns:
        ``image`` float32 ``(4, D, H, W)`` and ``meta`` (JSON-serialisable): ``case_id``,
        ``source_files``, ``original_shape`` and ``spacing`` in the file's ``(X, Y, Z)``,
        ``affine`` (4×4, the file's), ``orientation`` (the nibabel transform to the canonical
        grid, :func:`to_canonical`), ``canonical_shape``, ``crop_start``/``crop_end`` (voxel
        bounding box in the canonical grid's ``(X, Y, Z)``, end exclusive), ``size``
        ``(D, H, W)``, ``brain_voxels``, ``preprocess_version``.
    """
    size = check_size(size)
    files = _as_paths(paths)
    case_id = case_id or files[0].parent.name
    volumes = [load_volume(p, case_id) for p in files]
    for path, vol in zip(files[1:], volumes[1:]):
        _check_same_grid(case_id, files[0], volumes[0], path, vol)
    transform = to_canonical(volumes[0][1])
    stack = reorient(np.stack([v[0] for v in volumes]), transform)  # (4, X, Y, Z), canonical
    brain = np.any(stack != 0, axis=0, keepdims=True)
    if not brain.any():
        raise DataError(case_id, files[0], "empty brain mask: all four modalities are zero everywhere")
    start, end = generate_spatial_bounding_box(brain)
    cropped = SpatialCrop(roi_start=start, roi_end=end)(torch.from_numpy(stack))
    normed = NormalizeIntensity(nonzero=True, channel_wise=True)(cropped)
    zyx = torch.as_tensor(normed).permute(0, 3, 2, 1).contiguous()
    image = Resize(spatial_size=size, mode="trilinear", align_corners=False)(zyx)
    affine = volumes[0][1]
    meta: dict[str, Any] = {
        "case_id": case_id,
        "source_files": [str(p) for p in files],
        "original_shape": [int(s) for s in volumes[0][0].shape],
        "orientation": [[int(a), int(f)] for a, f in transform],
        "canonical_shape": [int(s) for s in stack.shape[1:]],
        "affine": affine.tolist(),
        "spacing": [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)],
        "crop_start": [int(s) for s in start],
        "crop_end": [int(s) for s in end],
        "size": list(size),
        "brain_voxels": int(brain.sum()),
        "preprocess_version": PREPROCESS_VERSION,
    }
    return np.asarray(torch.as_tensor(image), dtype=np.float32), meta


def preprocess_label(seg_path: str | os.PathLike, meta: Mapping[str, Any], et_label: int) -> np.ndarray:
    """Crop/resize a label map like its case's image: region masks uint8 ``(3, D, H, W)`` (WT, TC, ET).

    Checks that the file matches the grid in ``meta`` and holds only the labels
    ``{0, 1, 2, et_label}``; raises :class:`DataError` naming the case and file otherwise.
    Each region is resized as a float mask (trilinear) and thresholded at 0.5, which keeps small
    structures better than nearest-neighbour resampling of the label map.
    """
    case_id = str(meta["case_id"])
    seg_path = Path(seg_path)
    label, affine = load_volume(seg_path, case_id)
    if list(label.shape) != list(meta["original_shape"]):
        raise DataError(case_id, seg_path,
                        f"shape {label.shape} differs from the images' {tuple(meta['original_shape'])}")
    if not np.allclose(affine, np.asarray(meta["affine"]), atol=AFFINE_ATOL, rtol=AFFINE_RTOL):
        raise DataError(case_id, seg_path, "affine differs from that of the images")
    allowed = valid_labels(et_label)
    values = np.unique(label)
    unknown = [float(v) for v in values if v not in allowed]
    if unknown:
        raise DataError(
            case_id, seg_path,
            f"unknown label values {unknown[:10]} (expected {sorted(allowed)} for ET = {et_label})",
        )
    label = reorient(label, _orientation(meta))
    sl = tuple(slice(s, e) for s, e in zip(meta["crop_start"], meta["crop_end"]))
    regions = labels_to_regions(label[sl].astype(np.uint8), et_label=et_label)  # (3, X, Y, Z)
    zyx = torch.from_numpy(np.ascontiguousarray(regions.transpose(0, 3, 2, 1), dtype=np.float32))
    resized = Resize(spatial_size=tuple(meta["size"]), mode="trilinear", align_corners=False)(zyx)
    return (np.asarray(torch.as_tensor(resized)) >= 0.5).astype(np.uint8)


def _orientation(meta: Mapping[str, Any]) -> np.ndarray:
    """The meta's orientation transform (identity for a meta without one)."""
    if "orientation" not in meta:
        return np.array([[0, 1], [1, 1], [2, 1]], dtype=np.float64)
    return np.asarray(meta["orientation"], dtype=np.float64)


def canonical_spacing(meta: Mapping[str, Any]) -> tuple[float, float, float]:
    """Voxel size in mm along the canonical grid's ``(X, Y, Z)`` (the axes of ``crop_start``/
    ``crop_end``); ``meta["spacing"]`` is along the file's own axes."""
    spacing = [float(v) for v in meta["spacing"]]
    out = [0.0, 0.0, 0.0]
    for axis, (target, _flip) in enumerate(_orientation(meta)):
        out[int(target)] = spacing[axis]
    return out[0], out[1], out[2]


def restore_to_original(volume: np.ndarray | torch.Tensor, record: Any, mode: str = "auto") -> np.ndarray:
    """Map a ``(C, D, H, W)`` volume at the training size back to the original grid ``(C, X, Y, Z)``.

    Undoes the resize (to the crop box's size), transposes ``(Z, Y, X)`` back to ``(X, Y, Z)``,
    pastes into the crop box of a zero volume of the canonical grid and reorients that to the
    file's own voxel order.

    Args:
        volume: prediction (masks or probabilities) at the training size.
        record: a :class:`~m4fuse.data.cache.CaseRecord` or the ``meta`` dict of
            :func:`preprocess_case` (needs ``original_shape``, ``crop_start``, ``crop_end``).
        mode: ``"nearest"`` (masks/labels), ``"linear"`` (probabilities, trilinear) or
            ``"auto"`` (default: nearest for bool/integer input, linear for floats).

    Returns a numpy array of the input's dtype (bool stays bool).
    """
    meta = record if isinstance(record, Mapping) else record.meta
    arr = torch.as_tensor(np.asarray(volume) if not isinstance(volume, torch.Tensor) else volume).detach().cpu()
    if arr.ndim != 4:
        raise ValueError(f"volume must be (C, D, H, W), got shape {tuple(arr.shape)}")
    if mode == "auto":
        mode = "linear" if arr.is_floating_point() else "nearest"
    if mode not in ("nearest", "linear"):
        raise ValueError(f"mode must be 'nearest', 'linear' or 'auto', got {mode!r}")
    out_dtype = arr.dtype
    start = [int(s) for s in meta["crop_start"]]
    end = [int(e) for e in meta["crop_end"]]
    crop_zyx = (end[2] - start[2], end[1] - start[1], end[0] - start[0])
    kwargs = {"mode": "nearest-exact"} if mode == "nearest" else {"mode": "trilinear", "align_corners": False}
    resized = Resize(spatial_size=crop_zyx, **kwargs)(arr.float())
    resized = torch.as_tensor(resized).permute(0, 3, 2, 1)
    transform = _orientation(meta)
    canonical_shape = meta.get("canonical_shape", meta["original_shape"])
    out = torch.zeros((arr.shape[0], *[int(s) for s in canonical_shape]), dtype=torch.float32)
    out[:, start[0]:end[0], start[1]:end[1], start[2]:end[2]] = resized
    out = torch.from_numpy(reorient(out.numpy(), _inverse(transform)))
    if list(out.shape[1:]) != [int(s) for s in meta["original_shape"]]:
        raise ValueError(f"restored shape {tuple(out.shape[1:])} differs from the original "
                         f"{tuple(meta['original_shape'])} of case {meta.get('case_id')}")
    if out_dtype == torch.bool:
        return (out >= 0.5).numpy()
    return out.to(out_dtype).numpy()
