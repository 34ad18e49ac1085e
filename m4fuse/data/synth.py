"""Synthetic multi-site BraTS data: procedural brains with gliomas as varied as real ones, and
per-site acquisition and case mix.

Each case is drawn by :func:`~m4fuse.data.synth_case.make_case` (:mod:`m4fuse.data.synth_case`:
anatomy, tumour, contrasts, and the site's acquisition applied to it): a skull-stripped head
on a 1 mm grid (default 96 x 96 x 64 voxels, (X, Y, Z)).

Each site has its own acquisition (:func:`site_acquisition`, table there): intensity scale and
offset, and shifts that survive the per-modality z-scoring of preprocessing: a nonlinear
response (gamma) per sequence, its own tissue contrasts (grey/white on T1, compressed or
inverted; gadolinium enhancement of ET; oedema on FLAIR/T2; CSF suppression on FLAIR), a
multiplicative bias field, Rician noise (SNR), blur (anisotropic at thick-slice sites), the
oedema extent around the core and the share of cases with motion. Site 0 is the reference
scanner; the others are progressively more different. Each site also has its own case mix
(:class:`CaseMix`: high- or lower-grade, tumour sizes, cases without ET, multifocal cases).
The parameters of every site are written to ``acquisition.json`` and each case's plan to
``cases.json``.

Files: ``<out>/BraTS2021_<id>/BraTS2021_<id>_{t1,t1ce,t2,flair,seg}.nii.gz`` (int16 images,
uint8 labels with ET = 4, LPS-like affine with 1 mm spacing) and ``<out>/partition.csv``
(FeTS ``Partition_ID,Subject_ID``, sites ``site0 ..`` or the names given).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from m4fuse.data import synth_case
from m4fuse.data.guard import claim_for_synthesizer
from m4fuse.data.partition import write_partition_csv
from m4fuse.data.sites import site_names as default_site_names
from m4fuse.data.synth_case import SIZE_CLASS_NAMES, make_case
from m4fuse.io.atomic import replace_atomic

#: Version of the generator, recorded in the data folder's marker
#: (:func:`m4fuse.run.provision.generator_version`): a set written by another version is generated
#: again. 1: one ellipsoidal tumour per case (until the varied gliomas below); 2: this generator.
SYNTH_VERSION: int = 2
#: The generator's source files (this module and :mod:`m4fuse.data.synth_case`): a hash of
#: their bytes versions the generator where :data:`SYNTH_VERSION` is missing.
GENERATOR_FILES: tuple[Path, ...] = (Path(__file__), Path(synth_case.__file__))

# Default grid (X, Y, Z) in voxels of 1 mm, and the training size (D, H, W) = (Z, Y, X) that
# suits it: the brain's bounding box (~70 x 84 x 52 voxels) shrinks by ~0.8.
SYNTH_SHAPE: tuple[int, int, int] = (96, 96, 64)
SYNTH_SIZE: tuple[int, int, int] = (48, 64, 64)


@dataclass(frozen=True)
class CaseMix:
    """The case mix of a site: what share of its cases are of which kind.

    Attributes:
        grade: ``"HGG"`` (high-grade, the default) or ``"LGG"`` (lower-grade collection).
        size_weights: shares of large, medium and small tumours.
        no_et_fraction: share of cases without enhancing tumour.
        multifocal_fraction: share of cases with one or two satellite foci.
    """

    grade: str
    size_weights: tuple[float, float, float]
    no_et_fraction: float
    multifocal_fraction: float


#: High-grade sites: sizes from large to small, one case in six without ET.
HGG_MIX = CaseMix("HGG", (0.4, 0.35, 0.25), 1 / 6, 0.2)
#: Lower-grade sites (BraTS 2019's TCIA09/10/12/13): smaller tumours, most without ET.
LGG_MIX = CaseMix("LGG", (0.1, 0.3, 0.6), 0.6, 0.05)


class CasePlan(NamedTuple):
    """What one case is drawn as: tumour size class, with ET or not, number of foci."""

    size_class: str
    with_et: bool
    foci: int


def _quota(n: int, weights: Sequence[float]) -> list[int]:
    """``n`` split by ``weights`` with the largest-remainder rule (sums to ``n``)."""
    w = np.asarray(weights, float) / float(np.sum(weights))
    raw = w * n
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


def plan_cases(n: int, mix: CaseMix, rng: np.random.Generator) -> list[CasePlan]:
    """The plans of a site's ``n`` cases: exact shares of ``mix`` (largest remainder),
    shuffled by ``rng``. Cases without ET and multifocal cases are counted with
    ``round(n * fraction)``; each is spread over the size classes independently."""
    sizes = [name for name, k in zip(SIZE_CLASS_NAMES, _quota(n, mix.size_weights)) for _ in range(k)]
    no_et = set(rng.permutation(n)[: round(n * mix.no_et_fraction)].tolist())
    multi = set(rng.permutation(n)[: round(n * mix.multifocal_fraction)].tolist())
    order = rng.permutation(n)
    return [CasePlan(sizes[order[j]], j not in no_et, 1 + (j in multi) * int(rng.integers(1, 3)))
            for j in range(n)]


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
    "motion": (0.05, 0.1, 0.15, 0.25),
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
    motion            0.05   0.1    0.15   0.25   share of cases with motion artefacts
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


def _affine(shape: Sequence[int]) -> np.ndarray:
    """An LPS-like BraTS affine: 1 mm voxels, X and Y flipped, origin near the brain centre."""
    aff = np.diag([-1.0, -1.0, 1.0, 1.0])
    aff[:3, 3] = [shape[0] / 2 - 0.5, shape[1] / 2 + 10.5, -shape[2] / 2 + 8.0]
    return aff


def synthesize(out_dir: str | os.PathLike, sites: int = 4, cases_per_site: int = 12, seed: int = 0,
               shape: Sequence[int] = SYNTH_SHAPE, progress: bool = True, *,
               site_cases: Sequence[int] | None = None, names: Sequence[str] | None = None,
               lower_grade: Sequence[str] = (), salt: int = 0) -> dict[str, str]:
    """Write the synthetic BraTS2021-layout set and its ``partition.csv``; returns ``{case: site}``.

    Args:
        out_dir: output folder (created; existing cases of the same ids are overwritten).
        sites: number of sites (default 4).
        cases_per_site: cases per site (default 12) when ``site_cases`` is None.
        seed: seed of everything (default 0): same arguments -> same files.
        shape: grid ``(X, Y, Z)`` in 1 mm voxels (default ``(96, 96, 64)``; ``(240, 240, 155)``
            is the BraTS grid).
        progress: show a progress bar (default True).
        site_cases: number of cases of each site (keyword; default None: ``cases_per_site``
            at every site); its length must be ``sites``.
        names: site names (keyword; default None: ``site0 ..``), in the order of the
            acquisitions (the first is the reference scanner).
        lower_grade: names of the sites with the lower-grade case mix :data:`LGG_MIX`
            (keyword; default none); the others have :data:`HGG_MIX`.
        salt: seed salt (keyword; default 0: the seeds below). A salt s > 0 appends s to
            every case's and plan's seed (``[seed, k, j, s]``): cases no federation of salt 0
            draws, e.g. the public reference set (``data=public_reference``); the site
            acquisitions stay those of ``(k, seed)``.

    Case ``j`` of site ``k`` is drawn from the seed ``[seed, k, j]``; case ids run on over the
    sites in order (``BraTS2021_00000 ..``). ``acquisition.json`` records each site's
    acquisition and case mix, ``cases.json`` each case's site and plan.
    """
    counts = [int(cases_per_site)] * int(sites) if site_cases is None else [int(n) for n in site_cases]
    site_list = _checked_sites(sites, counts, names, lower_grade)
    claim_for_synthesizer(out_dir)  # refuses a folder that is not empty nor its own set
    shape = _checked_shape(shape)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    partition: dict[str, str] = {}
    acquisitions = {name: site_acquisition(k, seed) for k, name in enumerate(site_list)}
    mixes = {name: (LGG_MIX if name in lower_grade else HGG_MIX) for name in site_list}
    plans_by_case: dict[str, dict[str, Any]] = {}
    case_mix: dict[str, dict[str, Any]] = {}
    affine = _affine(shape)
    bar = tqdm(total=sum(counts), desc="synth", unit="case", disable=not progress)
    first = 0
    extra = [int(salt)] if salt else []  # salt 0: the seeds of every earlier set
    for k, name in enumerate(site_list):
        plans = plan_cases(counts[k], mixes[name], np.random.default_rng([seed, 104729, k, *extra]))
        case_mix[name] = _mix_summary(mixes[name], plans)
        for j, plan in enumerate(plans):
            case_id = f"BraTS2021_{first + j:05d}"
            rng = np.random.default_rng([seed, k, j, *extra])
            _write_case(out / case_id, case_id, rng, acquisitions[name], plan, shape, affine)
            partition[case_id] = name
            plans_by_case[case_id] = {"site": name, **plan._asdict()}
            bar.update()
        first += counts[k]
    bar.close()
    write_partition_csv(out / "partition.csv", partition)
    _write_records(out, {"seed": seed, "shape": list(shape), "generator": SYNTH_VERSION,
                         "sites": acquisitions, "case_mix": case_mix}, plans_by_case)
    return partition


def _checked_sites(sites: int, counts: Sequence[int], names: Sequence[str] | None,
                   lower_grade: Sequence[str]) -> list[str]:
    """The site names of :func:`synthesize` (``names``, default ``site0 ..``), after checking
    the number of sites and cases, the names and the lower-grade sites."""
    if sites < 1 or min(counts) < 1:
        raise ValueError(f"sites and cases per site must be >= 1, got {sites}, {counts}")
    if len(counts) != sites:
        raise ValueError(f"site_cases has {len(counts)} entries for {sites} sites")
    site_list = list(names) if names is not None else default_site_names(sites)
    if len(site_list) != sites or len(set(site_list)) != sites:
        raise ValueError(f"names must be {sites} distinct site names, got {site_list}")
    unknown = sorted(set(lower_grade) - set(site_list))
    if unknown:
        raise ValueError(f"lower_grade names sites that do not exist: {unknown} (sites: {site_list})")
    return site_list


def _checked_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` as a tuple of ints, after checking it is three ints >= 16."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be three ints >= 16 (X, Y, Z), got {shape}")
    return shape


def _mix_summary(mix: CaseMix, plans: Sequence[CasePlan]) -> dict[str, Any]:
    """A site's case mix and what its plans drew (cases per size class, without ET,
    multifocal), as recorded in ``acquisition.json``."""
    return {**asdict(mix), "cases": len(plans),
            **{s: sum(p.size_class == s for p in plans) for s in SIZE_CLASS_NAMES},
            "without_et": sum(not p.with_et for p in plans),
            "multifocal": sum(p.foci > 1 for p in plans)}


def _write_records(out: Path, acquisition: dict[str, Any], plans_by_case: dict[str, Any]) -> None:
    """Write the set's ``acquisition.json`` (seed, shape, generator, each site's acquisition
    and case mix) and ``cases.json`` (each case's site and plan)."""
    (out / "acquisition.json").write_text(json.dumps(acquisition, indent=1))
    (out / "cases.json").write_text(json.dumps(plans_by_case, indent=1))


def _write_case(case_dir: Path, case_id: str, rng: np.random.Generator, acq: dict[str, Any],
                plan: CasePlan, shape: tuple[int, ...], affine: np.ndarray) -> None:
    """Draw one case of ``plan`` (:func:`make_case`) and write its four images (rounded to
    int16) and its labels as NIfTI files."""
    images, label = make_case(shape, rng, acq, plan.size_class, plan.with_et, foci=plan.foci)
    case_dir.mkdir(exist_ok=True)
    for mod, img in zip(("t1", "t1ce", "t2", "flair"), images):
        _save(np.round(img).astype(np.int16), affine, case_dir / f"{case_id}_{mod}.nii.gz")
    _save(label, affine, case_dir / f"{case_id}_seg.nii.gz")


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write ``data`` as a NIfTI file with ``affine`` (1 mm units, qform = sform), atomically."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    replace_atomic(path, lambda tmp: nib.save(img, tmp))
