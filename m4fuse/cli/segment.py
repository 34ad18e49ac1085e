"""``m4fuse segment`` (one case -> a label map on its own grid) and ``m4fuse evaluate``
(label maps vs references -> Dice / HD95 per region, docs/design.md §5).

The work is done by importable functions (:func:`segment_case`, :func:`evaluate_paths`); the
parsers only translate arguments. torch / MONAI are imported inside them so ``m4fuse --help``
stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from functools import wraps
from pathlib import Path
from typing import Any

import numpy as np

NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
JSON_KEYS: tuple[str, ...] = ("case", "dice_et", "dice_tc", "dice_wt", "hd95_et", "hd95_tc", "hd95_wt")
# Lesion-wise keys of `evaluate --json` (m4fuse.evaluation.lesion): scores, then counts (whole numbers).
LESION_JSON_KEYS: tuple[str, ...] = (
    "lesion_dice_et", "lesion_dice_tc", "lesion_dice_wt",
    "lesion_hd95_et", "lesion_hd95_tc", "lesion_hd95_wt",
    "lesion_found_et", "lesion_found_tc", "lesion_found_wt",
    "lesion_missed_et", "lesion_missed_tc", "lesion_missed_wt",
    "lesion_fp_et", "lesion_fp_tc", "lesion_fp_wt",
)
# Suffixes stripped from file names to get a case id (".../BraTS2021_00000_seg.nii.gz").
_CASE_SUFFIX = re.compile(r"[_-](seg|pred|prediction|label|labels)$", re.IGNORECASE)


def _nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def case_id_of(path: Path) -> str:
    """Case id of a label-map file: its name without ``.nii[.gz]`` and a ``_seg``-like suffix."""
    return _CASE_SUFFIX.sub("", _nifti_stem(path))


# ------------------------------------------------------------------------------------ segment


def _user_errors(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Print bad-input errors (bad file, checkpoint, case, argument) as one line, exit code 2."""

    @wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (ValueError, FileNotFoundError, KeyError) as err:
            print(f"m4fuse {args.command}: error: {err}", file=sys.stderr)
            return 2

    return wrapper


def _write_nifti_atomic(labels: np.ndarray, reference: Any, out: Path) -> None:
    import nibabel as nib

    from m4fuse.io.atomic import replace_atomic

    header = reference.header.copy()
    img = nib.Nifti1Image(labels.astype(np.uint8), reference.affine, header)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1.0, 0.0)
    img.set_qform(reference.get_qform(), code=int(reference.header["qform_code"]))
    img.set_sform(reference.get_sform(), code=int(reference.header["sform_code"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_atomic(out, lambda tmp: nib.save(img, tmp))  # the temporary name keeps the suffix


#: What ``m4fuse segment`` reads, in its messages.
CASE_WANTED = ("a case folder holding the four modalities (<case>_t1, _t1ce, _t2, _flair "
               ".nii.gz, or the 2023 names t1n, t1c, t2w, t2f)")


def _one_case(case_dir: str | os.PathLike) -> Any:
    """The one BraTS case (``m4fuse.data.CaseFiles``) whose files ``case_dir`` holds."""
    from m4fuse.data import discover_cases

    if not Path(case_dir).is_dir():
        what = "a file" if Path(case_dir).exists() else "not found"
        raise FileNotFoundError(f"CASE_DIR {case_dir}: {what}; m4fuse segment wants "
                                f"{CASE_WANTED}")
    cases = discover_cases(case_dir)
    if len(cases) != 1:
        found = ", ".join(c.case_id for c in cases) or "none"
        raise ValueError(f"{case_dir}: expected the files of exactly one BraTS case, found "
                         f"{found}; m4fuse segment wants {CASE_WANTED}")
    return cases[0]


def check_site(checkpoint: Any, site: str | None) -> None:
    """Refuse a ``--site`` the checkpoint has no personal weights for, listing its sites (a
    misspelt name must not fall back to the shared model quietly)."""
    if site is None:
        return
    known = sorted(set(checkpoint.sites) | set(checkpoint.site_layers))
    if site not in known:
        raise ValueError(f"--site {site!r}: {checkpoint.path or 'the model'} has no weights of "
                         f"this site (its sites: {', '.join(known) or 'none'}); name one of "
                         "them, or leave --site out for the shared model alone")


def _training_size(checkpoint: Any, size: Sequence[int] | None) -> tuple[int, ...]:
    """The checkpoint's training size (D, H, W), else ``size``; they must agree when both
    are given."""
    train_size = checkpoint.size or (tuple(int(s) for s in size) if size else None)
    if size is not None and checkpoint.size is not None and tuple(size) != checkpoint.size:
        raise ValueError(f"--size {tuple(size)} differs from the checkpoint's training size {checkpoint.size}")
    if train_size is None:
        raise ValueError(f"{checkpoint.path} does not record the training size; pass --size D H W")
    return train_size


def _case_png(case: Any, prediction: np.ndarray, png: str | os.PathLike) -> str:
    """Write the PNG of ``case``'s axial slices (FLAIR, T1ce) with the predicted regions
    outlined, and its own segmentation when it has one; the picture's path."""
    import nibabel as nib

    from m4fuse.data.regions import labels_to_regions
    from m4fuse.inference.overlay import overlay_png

    images = {name: np.asarray(nib.load(case.images[name]).dataobj, dtype=np.float32)
              for name in ("flair", "t1ce")}
    reference = None
    if case.seg is not None:
        seg = np.rint(np.asarray(nib.load(case.seg).dataobj)).astype(np.int16)
        reference = np.asarray(labels_to_regions(seg, case.et_label))
    return str(overlay_png(images, png, prediction=prediction, reference=reference,
                           title=case.case_id))


def _check_outside_case(case_folder: Path, out: Path, png: str | os.PathLike | None) -> None:
    """Refuse an output (``--out``, ``--png``) inside the case's folder."""
    from m4fuse.data.guard import check_outside

    check_outside(out, [("the case folder", case_folder)], "--out")
    if png is not None:
        check_outside(png, [("the case folder", case_folder)], "--png")


def _predict_regions(paths: Sequence[Path], case_id: str, model: str | os.PathLike, site: str | None,
                     device: str, size: Sequence[int] | None, overlap: float, amp: bool) -> tuple[Any, int | None]:
    """``(regions (C, X, Y, Z) on the case's own grid, the expert used or None)``: the case's
    images preprocessed, segmented by the checkpoint's model (sliding window) and restored to
    the input's grid (arguments as in :func:`segment_case`)."""
    from m4fuse.data import preprocess_case, restore_to_original
    from m4fuse.inference.predict import output_mode, predict_probs, probs_to_regions
    from m4fuse.io.checkpoint import build_model, load_checkpoint

    checkpoint = load_checkpoint(model)
    check_site(checkpoint, site)
    train_size = _training_size(checkpoint, size)
    net, expert = build_model(checkpoint, site)
    image, meta = preprocess_case(paths, size=train_size, case_id=case_id)
    probs = predict_probs(net, image, device, expert, roi_size=train_size, overlap=overlap, amp=amp)
    regions = probs_to_regions(restore_to_original(probs.numpy(), meta, mode="linear"), output_mode(net))
    return regions, expert


def segment_case(
    case_dir: str | os.PathLike,
    model: str | os.PathLike,
    out: str | os.PathLike,
    site: str | None = None,
    device: str = "auto",
    et_label: int | None = None,
    overlap: float = 0.5,
    size: Sequence[int] | None = None,
    amp: bool = True,
    png: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Segment one BraTS-style case and write the label map on the input's grid.

    Args:
        case_dir: folder holding one case's four modalities (any BraTS naming; a seg file there
            is ignored).
        model: checkpoint file, or run folder holding ``model.ckpt``.
        out: output ``.nii.gz`` / ``.nii`` file (written atomically).
        site: site whose expert to use; a site without one (or None) uses the shared model.
        device: ``"auto"`` (default), ``"cpu"`` or ``"cuda:N"``.
        et_label: ET label of the output, 4 or 3; default that of the input's naming
            (2023+ names -> 3, else 4).
        overlap: sliding-window overlap, default 0.5.
        size: training size (D, H, W) when the checkpoint does not record one; default None.
        amp: autocast on CUDA, default True.
        png: also write a PNG of axial slices (FLAIR, T1ce) with the prediction outlined per
            region, and the case's own segmentation when its folder has one
            (:func:`m4fuse.inference.overlay.overlay_png`); default None (no picture).

    Returns a summary dict: case, out, expert (None = shared only), et_label, shape, voxel
    counts, and ``png`` (the picture's path, or None).
    """
    import nibabel as nib

    from m4fuse.data.regions import ET_LABELS, regions_to_labels

    out = Path(out)
    if not out.name.endswith(NIFTI_SUFFIXES):
        raise ValueError(f"--out must end with .nii.gz or .nii, got {out}")
    if et_label is not None and et_label not in ET_LABELS:
        raise ValueError(f"et_label must be one of {ET_LABELS}, got {et_label!r}")
    case = _one_case(case_dir)
    _check_outside_case(case.directory, out, png)  # inputs stay as they are
    paths = case.image_paths()
    regions, expert = _predict_regions(paths, case.case_id, model, site, device, size, overlap, amp)
    et = et_label if et_label is not None else case.et_label
    labels = np.asarray(regions_to_labels(regions.numpy(), et_label=et))
    _write_nifti_atomic(labels, nib.load(paths[0]), out)
    picture = None if png is None else _case_png(case, np.asarray(regions.numpy()), png)
    return {
        "case": case.case_id,
        "out": str(out),
        "expert": expert,
        "et_label": et,
        "shape": list(labels.shape),
        "voxels": {str(v): int((labels == v).sum()) for v in (1, 2, et)},
        "png": picture,
    }


@_user_errors
def _run_segment(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    summary = segment_case(
        args.case_dir, args.model, args.out, site=args.site, device=args.device,
        et_label=args.et_label, overlap=args.overlap, size=args.size, amp=not args.no_amp,
        png=args.png,
    )
    who = "shared model alone" if summary["expert"] is None else f"expert of site {args.site!r}"
    print(f"{summary['case']}: wrote {summary['out']} ({who}; ET label {summary['et_label']}; "
          f"voxels {summary['voxels']})")
    if summary["png"]:
        print(f"{summary['case']}: picture {summary['png']}")
    return 0


# ----------------------------------------------------------------------------------- evaluate


def _label_files(folder: Path, what: str) -> dict[str, Path]:
    """Case id -> label-map file below ``folder``: BraTS cases' seg files if there are any,
    else every NIfTI file (named ``<case>[_seg].nii[.gz]``)."""
    from m4fuse.data import discover_cases

    segs = {c.case_id: c.seg for c in discover_cases(folder) if c.seg is not None}
    if segs:
        return segs
    files: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name.endswith(NIFTI_SUFFIXES) and not path.name.startswith("."):
            cid = case_id_of(path)
            if cid in files:
                raise ValueError(f"{what} folder {folder}: case {cid} appears twice ({files[cid]}, {path})")
            files[cid] = path
    if not files:
        raise FileNotFoundError(f"{what} folder {folder} holds no .nii/.nii.gz label maps")
    return files


def pair_files(pred: str | os.PathLike, truth: str | os.PathLike) -> list[tuple[str, Path, Path]]:
    """``(case, prediction file, reference file)`` for two files or two folders.

    Folders are matched by case id (file name without ``.nii[.gz]`` and ``_seg``-like suffix;
    a reference folder laid out as a BraTS data set uses its cases' seg files). A case present
    on only one side is an error naming it.
    """
    pred, truth = Path(pred), Path(truth)
    for path, what in ((pred, "prediction"), (truth, "reference")):
        if not path.exists():
            raise FileNotFoundError(f"{what} path not found: {path}")
    if pred.is_file() and truth.is_file():
        return [(case_id_of(truth), pred, truth)]
    if pred.is_dir() and truth.is_dir():
        p_files, t_files = _label_files(pred, "prediction"), _label_files(truth, "reference")
        no_pred = sorted(set(t_files) - set(p_files))
        no_truth = sorted(set(p_files) - set(t_files))
        if no_pred or no_truth:
            raise ValueError(
                f"cases do not match: no prediction for {no_pred[:10]}, no reference for {no_truth[:10]}"
            )
        return [(c, p_files[c], t_files[c]) for c in sorted(t_files)]
    raise ValueError(f"PRED and TRUTH must both be files or both folders: {pred}, {truth}")


def score_files(
    pred: Path,
    truth: Path,
    et_label: int | None = None,
    hd95: str = "max_directed",
    lesion_preset: str = "gli",
    lesion_dilation: int | None = None,
    lesion_threshold_mm3: float | None = None,
) -> dict[str, float]:
    """Voxel-wise Dice / HD95 and the lesion-wise scores and counts (BraTS 2023+ rule,
    :mod:`m4fuse.evaluation.lesion`) of one label-map pair on the reference's grid and spacing (mm).

    ``lesion_preset`` (default ``"gli"``), ``lesion_dilation`` and ``lesion_threshold_mm3``
    (default None: the preset's) choose the lesion-wise parameters."""
    import nibabel as nib

    from m4fuse.evaluation.metrics import label_scores, lesion_label_scores, lesion_parameters

    lesion_parameters(lesion_preset, lesion_dilation, lesion_threshold_mm3)  # bad values first

    images = {}
    for path, what in ((pred, "prediction"), (truth, "reference")):
        try:
            images[what] = nib.load(path)
            data = np.asarray(images[what].dataobj)
        except Exception as err:
            raise ValueError(f"{what} {path}: not a readable NIfTI file: {err}") from err
        if data.ndim != 3:
            raise ValueError(f"{what} {path}: a label map must be 3-D, got shape {data.shape}")
        if np.issubdtype(data.dtype, np.floating) and not np.array_equal(data, np.rint(data)):
            raise ValueError(f"{what} {path}: label values must be integers")
        images[what + "_data"] = np.rint(data).astype(np.int16)
    p, t = images["prediction_data"], images["reference_data"]
    if p.shape != t.shape:
        raise ValueError(f"{pred} has shape {p.shape}, reference {truth} has {t.shape}")
    spacing = tuple(float(z) for z in images["reference"].header.get_zooms()[:3])
    p_spacing = tuple(float(z) for z in images["prediction"].header.get_zooms()[:3])
    if not np.allclose(p_spacing, spacing, atol=1e-3):
        raise ValueError(f"{pred} has voxel spacing {tuple(round(z, 4) for z in p_spacing)} mm, "
                         f"reference {truth} has {tuple(round(z, 4) for z in spacing)} mm: "
                         "resample the prediction onto the reference grid")
    if not np.allclose(images["prediction"].affine, images["reference"].affine, atol=1e-3):
        raise ValueError(f"{pred} and {truth} have different affines (not on the same grid)")
    try:
        scores = label_scores(p, t, spacing, et_label=et_label, hd95=hd95)
        scores.update(lesion_label_scores(p, t, spacing, et_label=et_label, preset=lesion_preset,
                                          dilation=lesion_dilation,
                                          threshold_mm3=lesion_threshold_mm3))
    except ValueError as err:
        raise ValueError(f"{pred} vs {truth}: {err}") from err
    return scores


def evaluate_paths(
    pred: str | os.PathLike,
    truth: str | os.PathLike,
    et_label: int | None = None,
    hd95: str = "max_directed",
    lesion_preset: str = "gli",
    lesion_dilation: int | None = None,
    lesion_threshold_mm3: float | None = None,
) -> list[dict[str, Any]]:
    """Per-case scores (``case`` + the metric keys + the lesion-wise keys) of label maps
    against references.

    ``et_label``: ET label of both maps (4 or 3); default None infers it from each map.
    ``hd95``: voxel-wise HD95, ``"max_directed"`` (default) or ``"pooled"`` (see
    :mod:`m4fuse.evaluation.metrics`). ``lesion_preset`` (default ``"gli"``), ``lesion_dilation``,
    ``lesion_threshold_mm3`` (default None: the preset's): see :func:`score_files`.
    """
    return [{"case": case, **score_files(p, t, et_label, hd95, lesion_preset, lesion_dilation,
                                         lesion_threshold_mm3)}
            for case, p, t in pair_files(pred, truth)]


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    """One case of ``evaluate --json``: the voxel-wise keys, then the lesion-wise scores and
    counts (counts as integers)."""
    out = {k: row[k] for k in JSON_KEYS}
    for k in LESION_JSON_KEYS:
        out[k] = int(row[k]) if k.startswith(("lesion_found", "lesion_missed", "lesion_fp")) else row[k]
    return out


@_user_errors
def _run_evaluate(args: argparse.Namespace) -> int:
    from m4fuse.evaluation.metrics import lesion_parameters, mean_scores

    dilation, threshold = lesion_parameters(args.lesion_preset, args.lesion_dilation,
                                            args.lesion_threshold)
    rows = evaluate_paths(args.pred, args.truth, et_label=args.et_label, hd95=args.hd95,
                          lesion_preset=args.lesion_preset, lesion_dilation=args.lesion_dilation,
                          lesion_threshold_mm3=args.lesion_threshold)
    if args.json:
        print(json.dumps([_json_row(r) for r in rows], indent=2))
        return 0
    # voxel-wise columns, then lesion-wise ("l" prefix), then lesions found/missed/false pos.
    keys = JSON_KEYS[1:] + LESION_JSON_KEYS[:6]
    headers = [k.replace("lesion_", "l") for k in keys]
    regions = ("et", "tc", "wt")
    width = max(len("mean"), *(len(r["case"]) for r in rows))

    def counts(r: dict[str, Any], region: str) -> str:
        return "/".join(f"{r[f'lesion_{c}_{region}']:.0f}" for c in ("found", "missed", "fp"))

    print(f"{'case':<{width}}  " + "  ".join(f"{h:>9}" for h in headers) + "  "
          + "  ".join(f"{'n_' + g + ' f/m/fp':>13}" for g in regions))
    for r in rows:
        print(f"{r['case']:<{width}}  " + "  ".join(f"{r[k]:9.4f}" for k in keys) + "  "
              + "  ".join(f"{counts(r, g):>13}" for g in regions))
    mean = mean_scores(rows)
    mean.update({k: float(np.mean([r[k] for r in rows])) for k in LESION_JSON_KEYS[:6]})
    total = {k: float(sum(r[k] for r in rows)) for k in LESION_JSON_KEYS[6:]}
    print(f"{'mean':<{width}}  " + "  ".join(f"{mean[k]:9.4f}" for k in keys) + "  "
          + "  ".join(f"{counts(total, g):>13}" for g in regions) + " (sum)")
    print(f"{len(rows)} case(s); HD95 in mm ({args.hd95}); Dice 1 / HD95 0 when both empty, "
          "Dice 0 / HD95 373.13 when one is")
    print(f"lesion-wise (l*, BraTS 2023+ rule, preset {args.lesion_preset}: dilation {dilation}, "
          f"lesions <= {threshold:g} mm^3 left out): missed lesions and false positives count "
          "Dice 0 / HD95 374; f/m/fp = lesions found / missed / false-positive components")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    seg = sub.add_parser(
        "segment", help="segment one BraTS case with a trained model",
        description="Read a case's four modalities, preprocess as in training, predict, map back "
                    "to the input grid and write a label map (0/1/2/ET) with the input's affine.",
    )
    seg.add_argument("case_dir", help="folder with the case's t1/t1ce/t2/flair (or t1n/t1c/t2w/t2f) files")
    seg.add_argument("--model", required=True, metavar="RUN_OR_CHECKPOINT",
                     help="checkpoint file, or a run folder holding model.ckpt")
    seg.add_argument("--out", required=True, help="output .nii.gz file")
    seg.add_argument("--site", default=None,
                     help="use this site's own weights (one of the model's sites; a name it "
                          "does not have is an error); default: the shared model alone")
    seg.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    seg.add_argument("--et-label", type=int, choices=(3, 4), default=None,
                     help="ET label of the output (default: the input's convention)")
    seg.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
    seg.add_argument("--size", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                     help="training size, only for checkpoints that do not record it")
    seg.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    seg.add_argument("--png", default=None, metavar="FILE",
                     help="also write a PNG of axial slices with the prediction (and the "
                          "case's own segmentation, if present) outlined per region")
    seg.set_defaults(func=_run_segment)

    ev = sub.add_parser(
        "evaluate", help="Dice and HD95 (mm), voxel- and lesion-wise, of label maps against references",
        description="PRED and TRUTH are two label-map files or two folders (matched by case id).",
    )
    ev.add_argument("pred", help="predicted label map file or folder")
    ev.add_argument("truth", help="reference label map file or folder (a BraTS folder works)")
    ev.add_argument("--json", action="store_true", help="print a JSON list of per-case objects")
    ev.add_argument("--et-label", type=int, choices=(3, 4), default=None,
                    help="ET label of both maps (default: inferred from each map)")
    ev.add_argument("--hd95", choices=("max_directed", "pooled"), default="max_directed",
                    help="HD95 definition (default max_directed, as MONAI; pooled as medpy)")
    ev.add_argument("--lesion-preset", choices=("gli", "ssa", "men", "ped", "met"), default="gli",
                    help="lesion-wise parameters of a BraTS challenge (default gli: dilation 3, "
                         "lesions <= 50 mm^3 left out; men 1/50, met 1/2, ssa and ped 3/50)")
    ev.add_argument("--lesion-dilation", type=int, default=None, metavar="VOXELS",
                    help="override the preset's dilation (voxels, >= 0)")
    ev.add_argument("--lesion-threshold", type=float, default=None, metavar="MM3",
                    help="override the preset's lesion volume threshold (mm^3, >= 0)")
    ev.set_defaults(func=_run_evaluate)
