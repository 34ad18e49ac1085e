"""Data provisioning: generate (synthetic) and prepare the configured data set once, and
split it into sites.

Safe to call from many processes at once (a file lock around the preparation); the split is
loaded once per process (a Ray actor serves many messages). Knows nothing of Flower.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock
from omegaconf import DictConfig

from m4fuse.run.rules import check_data_settings
from m4fuse.run.workspace import project_root

# Split records are loaded once per process (a Ray actor serves many messages).
_SPLITS: dict[tuple, Any] = {}


def data_paths(cfg: DictConfig) -> tuple[Path, Path]:
    """``(source, cache_dir)`` absolute folders of the configured data set."""
    d = cfg.data
    check_data_settings(cfg)  # the layout, before any folder is named
    root = project_root(cfg)
    size = "x".join(str(int(s)) for s in d.size)
    if d.kind == "synthetic":
        shape = "x".join(str(int(s)) for s in d.shape)
        name = f"synthetic-s{int(d.sites)}-c{int(d.cases_per_site)}-{shape}-seed{int(cfg.seed)}"
        if d.get("site_sizes") is not None:  # sized sites: the total and a hash of the layout
            layout = json.dumps(_site_layout(cfg), sort_keys=True).encode()
            name = (f"synthetic-s{int(d.sites)}-n{sum(synthetic_site_cases(cfg))}-"
                    f"{hashlib.sha256(layout).hexdigest()[:8]}-{shape}-seed{int(cfg.seed)}")
        salt = int(d.get("seed_salt", 0) or 0)
        if salt:  # another draw of cases (the public reference set)
            name += f"-salt{salt}"
        source = Path(str(d.source)) if d.source else root / "data" / name
    else:
        if d.source in (None, "???"):
            raise ValueError("data.source must name the BraTS folder (absolute path)")
        source = Path(str(d.source))
    cache = Path(str(d.cache_dir)) if d.cache_dir else root / "cache" / f"{source.name}-{size}"
    return source, cache


def generator_version() -> str:
    """Version of the synthetic generator, recorded in the data folder's marker.

    ``m4fuse.data.SYNTH_VERSION`` (``"v2"``); without that constant, the first 12 hex digits
    of the SHA-256 of the generator's source files (``m4fuse.data.synth.GENERATOR_FILES``). A changed version
    makes :func:`ensure_data` generate the set again instead of reusing the old generator's
    files.
    """
    from m4fuse import data as mdata
    from m4fuse.data import synth

    version = getattr(mdata, "SYNTH_VERSION", None)
    if version is not None:
        return f"v{version}"
    return hashlib.sha256(b"".join(p.read_bytes() for p in synth.GENERATOR_FILES)).hexdigest()[:12]


def data_markers(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(source marker, cache marker)``: what :func:`ensure_data` writes into the
    ``.complete`` files of the data folders once they are ready, and compares on later calls.

    Source (synthetic only; ``{}`` for BraTS): generator version, sites, cases per site,
    shape, seed; with ``data.site_sizes`` also the site layout (cases per site as generated,
    names, lower-grade sites). Cache: the source marker, ``PREPROCESS_VERSION`` and the training size, so a
    new generator or preprocessing version re-prepares the cache too.
    """
    from m4fuse.data import PREPROCESS_VERSION

    d = cfg.data
    source: dict[str, Any] = {}
    if d.kind == "synthetic":
        source = {"generator": generator_version(), "sites": int(d.sites),
                  "cases_per_site": int(d.cases_per_site),
                  "shape": [int(s) for s in d.shape], "seed": int(cfg.seed)}
        if d.get("site_sizes") is not None:
            source["layout"] = _site_layout(cfg)
        if int(d.get("seed_salt", 0) or 0):
            source["seed_salt"] = int(d.seed_salt)
    cache = {"source": source, "preprocess_version": int(PREPROCESS_VERSION),
             "size": [int(s) for s in d.size]}
    return source, cache


def _marker_matches(path: Path, expected: Mapping[str, Any]) -> bool:
    """Whether the JSON marker file ``path`` exists and records ``expected`` (an old plain
    ``ok`` marker never matches)."""
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()) == json.loads(json.dumps(expected))
    except json.JSONDecodeError:
        return False


def ensure_data(cfg: DictConfig) -> Path:
    """Generate (synthetic) and prepare the data set once; returns the prepared cache folder.

    Safe to call from many processes at once (file lock); later calls only check the
    ``.complete`` markers (:func:`data_markers`). A marker of another generator or
    preprocessing version (or an old marker without versions) makes it generate and prepare
    again: the synthesiser overwrites the cases, ``prepare_dataset`` redoes the changed ones.
    """
    from m4fuse import data as mdata

    source, cache = data_paths(cfg)
    d = cfg.data
    source_marker, cache_marker = data_markers(cfg)
    check_data_folders(cfg, source, cache)  # before the lock file: nothing written yet
    # filelock.FileLock (an exclusive OS lock, parent folders created): concurrent clients
    # prepare the data only once.
    with FileLock(cache.parent / f".{cache.name}.lock"):
        if d.kind == "synthetic" and not _marker_matches(source / ".complete", source_marker):
            (source / ".complete").unlink(missing_ok=True)
            (cache / ".complete").unlink(missing_ok=True)
            mdata.synthesize(
                source,
                sites=int(d.sites),
                cases_per_site=int(d.cases_per_site),
                seed=int(cfg.seed),
                shape=tuple(int(s) for s in d.shape),
                **_synth_layout_kwargs(cfg),
            )
            (source / ".complete").write_text(json.dumps(source_marker) + "\n")
        if not source.is_dir():
            raise FileNotFoundError(f"data.source does not exist: {source}")
        if not _marker_matches(cache / ".complete", cache_marker):
            (cache / ".complete").unlink(missing_ok=True)
            mdata.prepare_dataset(
                source, cache, size=tuple(int(s) for s in d.size), workers=int(d.workers)
            )
            (cache / ".complete").write_text(json.dumps(cache_marker) + "\n")
    return cache


def check_data_folders(cfg: DictConfig, source: Path, cache: Path) -> None:
    """Refuse, before anything is written (:mod:`m4fuse.data.guard`), data folders that are
    not the project's own: a synthetic ``source`` that is neither empty nor an earlier
    synthetic set (a BraTS folder without ``data=brats``), a ``cache`` inside the source or
    holding anything but an earlier cache, a project ``root`` holding BraTS cases or lying
    inside a BraTS source, a ``run_name`` that is not one folder name."""
    from m4fuse.data import guard

    if cfg.data.kind == "synthetic":
        guard.check_synth_folder(source, "data.source" if cfg.data.source else "the synthetic "
                                 "data folder")
    elif not source.is_dir():
        raise FileNotFoundError(f"data.source={source}: no such folder (name the BraTS folder "
                                "that holds the case folders)")
    from m4fuse.run.workspace import run_name

    guard.check_project_root(project_root(cfg), source if cfg.data.kind == "brats" else None)
    guard.check_run_name(run_name(cfg))
    guard.check_cache_folder(cache, source, "data.cache_dir" if cfg.data.cache_dir else
                             "the cache folder")


def partition_csv(cfg: DictConfig) -> Path | None:
    """The partition CSV: configured, or the one the synthesiser wrote."""
    if cfg.data.partition_csv:
        return Path(str(cfg.data.partition_csv))
    if cfg.data.kind == "synthetic":
        return data_paths(cfg)[0] / "partition.csv"
    return None


def load_sites(cfg: DictConfig) -> Any:
    """The :class:`SiteSplit` of the configured data (prepared on first use; memoised),
    without the sites that have fewer cases than ``data.min_cases_per_site``
    (:func:`small_sites` names them)."""
    split = _full_split(cfg)
    minimum = min_cases_per_site(cfg)
    kept = {site: parts for site, parts in split.items() if _site_cases(parts) >= minimum}
    if not kept:
        raise ValueError(f"data.min_cases_per_site={minimum} leaves no site: the largest has "
                         f"{max(_site_cases(p) for p in split.values())} cases")
    return kept


def _full_split(cfg: DictConfig) -> Any:
    cache = ensure_data(cfg)
    csv = partition_csv(cfg)
    test_cases = fixed_test_cases(cfg)
    key = (str(cache), str(csv), int(cfg.seed), float(cfg.data.val_fraction),
           float(cfg.data.test_fraction), test_cases)
    if key not in _SPLITS:
        _SPLITS[key] = split_prepared(cfg, cache, csv)
    return _SPLITS[key]


def fixed_test_cases(cfg: DictConfig) -> int | None:
    """``data.test_cases_per_site``: the same number of test cases at every site (validation
    out of the rest, :func:`m4fuse.data.split_cases`); None (the default) splits by
    ``data.val_fraction`` / ``data.test_fraction``."""
    value = cfg.data.get("test_cases_per_site")
    return None if value is None else int(value)


def synthetic_site_cases(cfg: DictConfig) -> list[int]:
    """Cases the synthesiser writes per site: ``data.site_sizes[k]`` plus
    ``data.test_cases_per_site`` (0 when null) for sized sites, else ``data.cases_per_site``
    at each of the ``data.sites``."""
    d = cfg.data
    if d.get("site_sizes") is None:
        return [int(d.cases_per_site)] * int(d.sites)
    extra = fixed_test_cases(cfg) or 0
    return [int(n) + extra for n in d.site_sizes]


def _site_layout(cfg: DictConfig) -> dict[str, Any]:
    """What a sized synthetic set is made of besides sites/shape/seed (its marker and name)."""
    d = cfg.data
    return {"site_cases": synthetic_site_cases(cfg),
            "site_names": None if d.get("site_names") is None else [str(n) for n in d.site_names],
            "lower_grade_sites": sorted(str(n) for n in (d.get("lower_grade_sites") or []))}


def _synth_layout_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The keyword arguments of :func:`m4fuse.data.synthesize` for the configured layout."""
    d = cfg.data
    kwargs: dict[str, Any] = {}
    if d.get("site_sizes") is not None:
        kwargs["site_cases"] = synthetic_site_cases(cfg)
    if d.get("site_names") is not None:
        kwargs["names"] = [str(n) for n in d.site_names]
    if d.get("lower_grade_sites"):
        kwargs["lower_grade"] = [str(n) for n in d.lower_grade_sites]
    if int(d.get("seed_salt", 0) or 0):
        kwargs["salt"] = int(d.seed_salt)
    return kwargs


def split_settings(cfg: DictConfig) -> dict[str, Any]:
    """The settings of the one train/val/test split rule (:func:`m4fuse.data.split_cases`,
    per site, salted by the site's name): ``seed``, ``data.val_fraction``,
    ``data.test_fraction``, ``data.test_cases_per_site``. Every command that splits a site's
    cases takes them from here."""
    return {"seed": int(cfg.seed), "val_fraction": float(cfg.data.val_fraction),
            "test_fraction": float(cfg.data.test_fraction),
            "test_cases": fixed_test_cases(cfg)}


def split_rule(cfg: DictConfig) -> str:
    """One line saying which split rule and settings a command uses."""
    s = split_settings(cfg)
    return (f"split: m4fuse.data.split_cases per site, data={cfg.data.kind} settings "
            f"seed={s['seed']} data.val_fraction={s['val_fraction']} "
            f"data.test_fraction={s['test_fraction']} "
            f"data.test_cases_per_site={s['test_cases']} (the split of every run and command)")


def split_prepared(cfg: DictConfig, cache: Path, partition_csv: Path | str | None) -> Any:
    """The :class:`m4fuse.data.SiteSplit` of the prepared ``cache`` (sites from
    ``partition_csv``, else those the cache records, else the institution tokens) by the one
    split rule (:func:`split_settings`): what runs, ``m4fuse site join`` and the new-site
    simulation use."""
    from m4fuse.data import load_split

    return load_split(cache, partition_csv=partition_csv, **split_settings(cfg))


def split_site(cfg: DictConfig, site: str, case_ids: Sequence[str]) -> dict[str, list[str]]:
    """One site's case ids split by the one rule (:func:`split_settings`), as
    :func:`split_prepared` splits it: ``{"train"|"val"|"test": [case id]}``."""
    from m4fuse.data import split_cases

    return split_cases(list(case_ids), salt=site, **split_settings(cfg))


def _site_cases(parts: Mapping[str, Sequence[Any]]) -> int:
    return sum(len(v) for v in parts.values())


def min_cases_per_site(cfg: DictConfig) -> int:
    """``data.min_cases_per_site`` (default 1: every site with a case takes part)."""
    return int(cfg.data.get("min_cases_per_site", 1) or 1)


def small_sites(cfg: DictConfig) -> dict[str, int]:
    """Sites of the data that :func:`load_sites` leaves out (fewer cases than
    ``data.min_cases_per_site``): ``{name: number of cases}``; the server says so before
    training."""
    split = _full_split(cfg)
    minimum = min_cases_per_site(cfg)
    return {site: _site_cases(p) for site, p in sorted(split.items())
            if _site_cases(p) < minimum}


def site_names(split: Mapping[str, Any]) -> list[str]:
    """Sites sorted by name: the position is the site index (docs/interfaces.md)."""
    return sorted(split)
