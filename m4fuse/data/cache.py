"""The prepared cache: one folder per case with memory-mappable ``.npy`` arrays and a JSON index.

Layout of ``cache_dir``::

    index.json                 {"format": 1, "preprocess_version", "size", "root", "cases": {id: meta}}
    cases/<case_id>/image.npy  float32 (4, D, H, W), z-scored (float32, not float16: converting
                               float16 to float32 on the CPU made a sample read ~25x slower
                               in `m4fuse bench data`, for half the disk)
    cases/<case_id>/label.npy  uint8 (3, D, H, W) region masks WT, TC, ET
    cases/<case_id>/meta.json  the case's metadata (as in the index)

A case is reused when its fingerprint (source paths, sizes and mtimes, the training size and
:data:`PREPROCESS_VERSION`) matches the cached one, and rebuilt otherwise. Every write goes to a
temporary name first and is renamed into place, so an interrupted prepare leaves no half case.
Source files are only ever opened for reading.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from m4fuse.data.guard import check_cache_folder
from m4fuse.data.layout import CaseFiles, DataError, discover_cases, institution_of
from m4fuse.data.partition import read_site_csv
from m4fuse.data.preprocess import (
    DEFAULT_SIZE,
    PREPROCESS_VERSION,
    check_size,
    preprocess_case,
    preprocess_label,
)
from m4fuse.io.atomic import write_folder_atomic, write_text_atomic

INDEX_NAME = "index.json"
CACHE_FORMAT = 1
IMAGE_DTYPE = np.float32
PARTITION_NAME = "partition.csv"


@dataclass(frozen=True)
class CaseRecord:
    """One prepared case: where its arrays are and how to map a prediction back.

    ``meta`` holds ``original_shape``/``spacing`` in the file's ``(X, Y, Z)``, ``affine``,
    ``orientation``/``canonical_shape`` (the file's grid -> the canonical LPS grid),
    ``crop_start``/``crop_end`` in the canonical ``(X, Y, Z)``, ``size`` ``(D, H, W)``,
    ``source_files`` (T1, T1ce, T2, FLAIR) and ``seg_file``.
    """

    case_id: str
    site: str | None
    image_path: Path
    label_path: Path | None
    et_label: int
    meta: dict[str, Any] = field(repr=False)

    @property
    def original_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["original_shape"])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(self.meta["spacing"])  # type: ignore[return-value]

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.meta["affine"], dtype=np.float64)

    @property
    def crop_box(self) -> tuple[tuple[int, int], ...]:
        """``((x0, x1), (y0, y1), (z0, z1))`` voxel box of the crop in the canonical grid, end
        exclusive."""
        return tuple(zip(self.meta["crop_start"], self.meta["crop_end"]))  # type: ignore[return-value]

    @property
    def source_files(self) -> list[str]:
        return list(self.meta["source_files"])

    @property
    def seg_file(self) -> str | None:
        return self.meta.get("seg_file")

    def image(self) -> np.ndarray:
        """The cached image, memory-mapped read-only: float32 ``(4, D, H, W)``."""
        return np.load(self.image_path, mmap_mode="r")

    def label(self) -> np.ndarray:
        """The cached region masks, memory-mapped read-only: uint8 ``(3, D, H, W)``."""
        if self.label_path is None:
            raise ValueError(f"case {self.case_id} has no label in the cache")
        return np.load(self.label_path, mmap_mode="r")

    def with_site(self, site: str) -> "CaseRecord":
        return CaseRecord(self.case_id, site, self.image_path, self.label_path, self.et_label, self.meta)


@dataclass
class PrepareReport:
    """What :func:`prepare_dataset` did: case ids prepared anew, reused, and skipped (with reason)."""

    cache_dir: Path
    prepared: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.skipped

    def summary(self) -> str:
        lines = [f"cache {self.cache_dir}: {len(self.prepared)} prepared, {len(self.reused)} reused, "
                 f"{len(self.skipped)} skipped"]
        lines += [f"  skipped {case}: {reason}" for case, reason in self.skipped]
        return "\n".join(lines)


class PrepareError(RuntimeError):
    """Raised by ``prepare_dataset(strict=True)`` when any case was skipped; holds the report."""

    def __init__(self, report: PrepareReport) -> None:
        self.report = report
        super().__init__(report.summary())


def _stat(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def fingerprint(case: CaseFiles, size: Sequence[int]) -> str:
    """Hash of the case's source files (path, size, mtime), the training size and the version."""
    files = [case.images[m] for m in sorted(case.images)] + ([case.seg] if case.seg else [])
    payload = {
        "files": [_stat(p) for p in files],
        "size": list(size),
        "version": PREPROCESS_VERSION,
        "et_label": case.et_label,
    }
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _prepare_one(case: CaseFiles, size: tuple[int, int, int], cache_dir: Path, key: str,
                 site: str | None) -> dict[str, Any]:
    """Preprocess one case and write its folder atomically; returns its meta. Runs in workers."""
    paths = case.image_paths()  # raises DataError for missing modalities
    if case.seg is None:
        sep = "-" if case.layout == "2023" else "_"
        raise DataError(case.case_id, case.directory / f"{case.case_id}{sep}seg.nii.gz",
                        "no segmentation file (needed to prepare for training)")
    image, meta = preprocess_case(paths, size, case_id=case.case_id)
    label = preprocess_label(case.seg, meta, case.et_label)
    meta.update(
        seg_file=str(case.seg), et_label=case.et_label, layout=case.layout, grade=case.grade,
        institution=institution_of(case.case_id), site=site, fingerprint=key,
        has_et=bool(label[2].any()), tumour_voxels=int(label[0].sum()),
    )

    def fill(folder: Path) -> None:
        np.save(folder / "image.npy", image.astype(IMAGE_DTYPE))
        np.save(folder / "label.npy", label)
        (folder / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))

    write_folder_atomic(cache_dir / "cases" / case.case_id, fill)
    return meta


def _read_sites_csv_if_any(path: Path | None, case_ids: Sequence[str]) -> dict[str, str]:
    if path is None or not path.is_file():
        return {}
    return read_site_csv(path, case_ids=case_ids)


def prepare_dataset(
    root: str | os.PathLike,
    cache_dir: str | os.PathLike,
    size: Sequence[int] = DEFAULT_SIZE,
    workers: int = 2,
    strict: bool = False,
    *,
    partition_csv: str | os.PathLike | None = None,
    progress: bool = True,
) -> PrepareReport:
    """Prepare every BraTS case below ``root`` into ``cache_dir`` (see the module docstring).

    Args:
        root: a BraTS folder in any supported layout (:mod:`m4fuse.data.layout`).
        cache_dir: output folder (created); never inside a source case folder.
        size: training size ``(D, H, W)``; default ``(64, 128, 128)``.
        workers: worker threads (default 2); 0 or 1 runs in the calling thread.
        strict: if True, raise :class:`PrepareError` (after preparing the good cases) when any
            case was skipped; default False (skipped cases are only reported).
        partition_csv: sites to record per case; default ``<root>/partition.csv`` if present
            (the synthetic set writes one); :func:`~m4fuse.data.sites.load_split` can override.
        progress: show a progress bar (default True).

    Returns a :class:`PrepareReport`. Cases that vanished from ``root`` are dropped from the cache.
    """
    size = check_size(size)
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0, got {workers!r}")
    root = Path(root)
    cache_dir = Path(cache_dir)
    check_cache_folder(cache_dir, root, "the cache folder")  # never into the source's folder
    cases = discover_cases(root)
    if not cases:
        raise FileNotFoundError(f"no BraTS cases (files named <case>_t1.nii[.gz] etc.) found below {root}")
    csv_path = Path(partition_csv) if partition_csv is not None else root / PARTITION_NAME
    if partition_csv is not None and not csv_path.is_file():
        raise FileNotFoundError(f"partition CSV not found: {csv_path}")
    sites = _read_sites_csv_if_any(csv_path, [c.case_id for c in cases])
    cache_dir.mkdir(parents=True, exist_ok=True)
    index_path = cache_dir / INDEX_NAME
    report = PrepareReport(cache_dir=cache_dir)
    index, todo = _reusable_cases(cases, size, cache_dir, _read_old_index(index_path), sites, report)
    _prepare_into(index, report, todo, size, cache_dir, sites, workers, progress)
    _drop_stale_cases(cache_dir / "cases", index)
    report.prepared.sort()
    report.skipped.sort()
    _write_index(index_path, size, root, index)
    if strict and report.skipped:
        raise PrepareError(report)
    return report


def _prepare_into(
    index: dict[str, Any], report: PrepareReport, todo: Sequence[tuple[CaseFiles, str]],
    size: tuple[int, int, int], cache_dir: Path, sites: dict[str, str], workers: int, progress: bool,
) -> None:
    """Prepare the cases of ``todo`` (:func:`_prepare_all`), adding each prepared case's meta
    to ``index`` and to ``report.prepared``, a case with bad data to ``report.skipped``; any
    other error is raised."""
    bar = tqdm(total=len(todo), desc="prepare", unit="case", disable=not progress or not todo)
    for case, meta, err in _prepare_all(todo, size, cache_dir, sites, workers):
        if err is None:
            index[case.case_id] = meta
            report.prepared.append(case.case_id)
        elif isinstance(err, DataError):
            report.skipped.append((case.case_id, str(err)))
        else:
            raise err
        bar.update()
    bar.close()


def _write_index(index_path: Path, size: tuple[int, int, int], root: Path, index: dict[str, Any]) -> None:
    """Write the cache's ``index.json`` (its format, the preprocessing version, the size, the
    source folder and every case's meta), atomically."""
    write_text_atomic(index_path, json.dumps({
        "format": CACHE_FORMAT,
        "preprocess_version": PREPROCESS_VERSION,
        "size": list(size),
        "root": str(root.resolve()),
        "cases": {k: index[k] for k in sorted(index)},
    }, indent=1, sort_keys=True))


def _read_old_index(index_path: Path) -> dict[str, Any]:
    """The ``cases`` of an existing index (``{}`` when there is none or it is unreadable)."""
    if not index_path.is_file():
        return {}
    try:
        return json.loads(index_path.read_text()).get("cases", {})
    except (json.JSONDecodeError, AttributeError):
        return {}


def _reusable_cases(
    cases: Sequence[CaseFiles], size: tuple[int, int, int], cache_dir: Path,
    old: dict[str, Any], sites: dict[str, str], report: PrepareReport,
) -> tuple[dict[str, Any], list[tuple[CaseFiles, str]]]:
    """``(index of the cases whose cached arrays are still valid, [(case, fingerprint)] to
    prepare)``; a case whose source files cannot be read is recorded as skipped."""
    index: dict[str, Any] = {}
    todo: list[tuple[CaseFiles, str]] = []
    for case in cases:
        try:
            key = fingerprint(case, size) if not (case.missing or case.problems) else ""
        except OSError as err:
            report.skipped.append((case.case_id, f"cannot stat source files: {err}"))
            continue
        prev = old.get(case.case_id)
        case_dir = cache_dir / "cases" / case.case_id
        if key and prev and prev.get("fingerprint") == key and (case_dir / "image.npy").is_file() \
                and (case_dir / "label.npy").is_file():
            prev["site"] = sites.get(case.case_id, prev.get("site"))
            index[case.case_id] = prev
            report.reused.append(case.case_id)
        else:
            todo.append((case, key))
    return index, todo


def _prepare_all(
    todo: Sequence[tuple[CaseFiles, str]], size: tuple[int, int, int], cache_dir: Path,
    sites: dict[str, str], workers: int,
) -> Iterator[tuple[CaseFiles, dict[str, Any] | None, BaseException | None]]:
    """Prepare each case of ``todo``; yields ``(case, meta or None, error or None)`` as they
    finish (any order with workers)."""
    if workers <= 1 or len(todo) <= 1:
        for case, key in todo:
            try:
                yield case, _prepare_one(case, size, cache_dir, key, sites.get(case.case_id)), None
            except DataError as err:
                yield case, None, err
        return
    # Threads, not processes: gzip inflation, numpy and torch release the GIL for the heavy
    # parts, and a spawned process would pay the torch/MONAI import (~10-20 s) per worker.
    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_prepare_one, case, size, cache_dir, key, sites.get(case.case_id)): case
                   for case, key in todo}
        for fut in cf.as_completed(futures):
            err = fut.exception()
            yield futures[fut], None if err else fut.result(), err


def _drop_stale_cases(cases_dir: Path, index: dict[str, Any]) -> None:
    """Remove cached case folders that are gone from the source or were skipped now."""
    if cases_dir.is_dir():
        for entry in cases_dir.iterdir():
            if entry.name not in index:
                shutil.rmtree(entry, ignore_errors=True)


def read_index(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """The cache's ``index.json``; raises ``FileNotFoundError``/``ValueError`` naming the file."""
    path = Path(cache_dir) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no prepared cache at {cache_dir} (missing {path}); run `m4fuse data prepare`")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"corrupt cache index {path}: {err}") from None
    if index.get("format") != CACHE_FORMAT or index.get("preprocess_version") != PREPROCESS_VERSION:
        raise ValueError(f"cache {path} was written by another version (format {index.get('format')}, "
                         f"preprocess {index.get('preprocess_version')}); run `m4fuse data prepare` again")
    return index


def load_records(cache_dir: str | os.PathLike) -> list[CaseRecord]:
    """All cached cases as :class:`CaseRecord` (site from the index, possibly ``None``)."""
    cache_dir = Path(cache_dir)
    index = read_index(cache_dir)
    out = []
    for case_id, meta in index["cases"].items():
        case_dir = cache_dir / "cases" / case_id
        out.append(CaseRecord(case_id=case_id, site=meta.get("site") or meta.get("institution"),
                              image_path=case_dir / "image.npy", label_path=case_dir / "label.npy",
                              et_label=int(meta["et_label"]), meta=meta))
    return out
