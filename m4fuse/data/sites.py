"""Sites (hospitals) and the per-site train/val/test split.

Site sources, in the order :func:`load_split` tries them:

1. a partition CSV: the FeTS format ``Partition_ID,Subject_ID`` (either column order) or any
   CSV with a case column and a site column (:func:`m4fuse.data.partition.read_site_csv` finds them by name, or
   takes the columns named by the caller);
2. the site recorded in the cache (from ``partition.csv`` beside the data at prepare time);
3. the institution token of BraTS 2018-2020 ids (``BraTS19_TCIA01_131_1`` -> ``TCIA01``);
4. ``random_sites=N``: a seeded, stratified random partition into ``site0 .. site<N-1>``.

Site index = position of the site's name in the sorted list of sites (docs/interfaces.md).
"""

from __future__ import annotations

import logging
import os
import zlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from m4fuse.data.cache import CaseRecord, load_records
from m4fuse.data.layout import institution_of
from m4fuse.data.partition import read_site_csv

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
# {site_name: {"train"|"val"|"test": [CaseRecord]}}, sites in sorted order.
SiteSplit = dict[str, dict[str, list[CaseRecord]]]



#: Cases per institution of BraTS 2019 (the case-id token), largest first (335 in all).
BRATS19_SITE_SIZES: dict[str, int] = {
    "CBICA": 129, "TCIA10": 35, "TCIA02": 34, "2013": 30, "TCIA01": 22, "TCIA08": 14,
    "TCIA13": 13, "TCIA03": 12, "TCIA09": 11, "TMC": 9, "TCIA04": 8, "TCIA06": 8, "TCIA12": 6,
    "TCIA05": 4}
#: BraTS 2019's institutions of the lower-grade glioma collection.
BRATS19_LOWER_GRADE: tuple[str, ...] = ("TCIA09", "TCIA10", "TCIA12", "TCIA13")
#: Cases per site of FeTS 2022's ``partitioning_1.csv`` (BraTS 2021 by institution; 1251).
FETS22_SITE_SIZES: tuple[int, ...] = (511, 382, 47, 35, 35, 34, 33, 30, 22, 15, 14, 13, 12,
                                      11, 9, 8, 8, 7, 6, 6, 5, 4, 4)


def scale_site_sizes(sizes: Sequence[int], factor: float) -> list[int]:
    """Real site sizes scaled down: ``max(1, floor(n * factor + 0.5))`` each (half rounds up,
    unlike Python's ``round``), so every site keeps a case and the order is kept."""
    if not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    return [max(1, int(np.floor(int(n) * factor + 0.5))) for n in sizes]


def site_names(n: int) -> list[str]:
    """``site0 .. site<n-1>``, zero-padded so that string order equals numeric order."""
    if n < 1:
        raise ValueError(f"number of sites must be >= 1, got {n}")
    width = len(str(n - 1))
    return [f"site{i:0{width}d}" for i in range(n)]


def institution_sites(case_ids: Iterable[str]) -> dict[str, str]:
    """``{case: institution token}``; raises ``ValueError`` for ids without one."""
    out, missing = {}, []
    for case in case_ids:
        inst = institution_of(case)
        if inst is None:
            missing.append(case)
        else:
            out[case] = inst
    if missing:
        raise ValueError(
            f"{len(missing)} case ids carry no institution token (e.g. {missing[0]}): only BraTS "
            "2018/2019-style ids (BraTS19_<INST>_<id>_1) do; BraTS 2020+ names do not. Give a "
            "partition CSV (--partition-csv) or a random split (--random N)."
        )
    return out


def random_sites(case_ids: Iterable[str], n_sites: int, seed: int = 0,
                 strata: Mapping[str, str] | None = None) -> dict[str, str]:
    """Stratified seeded random partition into ``n_sites`` sites named by :func:`site_names`.

    Within each stratum (e.g. grade HGG/LGG, or "has ET"), cases are shuffled and dealt in
    turn, continuing the turn across strata, so sites differ in size by at most one and each
    stratum is spread evenly. Same inputs and seed -> same partition.
    """
    names = site_names(n_sites)
    ids = sorted(set(case_ids))
    if len(ids) < n_sites:
        raise ValueError(f"cannot split {len(ids)} cases into {n_sites} sites")
    strata = strata or {}
    groups: dict[str, list[str]] = defaultdict(list)
    for case in ids:
        groups[str(strata.get(case, ""))].append(case)
    rng = np.random.default_rng(seed)
    out: dict[str, str] = {}
    turn = 0
    for key in sorted(groups):
        members = groups[key]
        for j in rng.permutation(len(members)):
            out[members[j]] = names[turn % n_sites]
            turn += 1
    return out


def split_cases(case_ids: Sequence[str], seed: int = 0, val_fraction: float = 0.15,
                test_fraction: float = 0.15, salt: str = "", *,
                test_cases: int | None = None) -> dict[str, list[str]]:
    """Seeded, disjoint train/val/test split of one site's cases.

    Default (``test_cases`` None): ``round(n * fraction)`` cases go to test and val (at least
    one train case is kept when ``n >= 1``).

    With ``test_cases`` (keyword; an int >= 1): ``min(test_cases, n - 1)`` cases go to test,
    the same number at every site whatever its size, ``test_fraction`` unused; the
    validation cases come out of the site's other ``m`` cases, as at a real hospital:
    ``round(m * val_fraction)``, at most ``m - 1`` (at least one case trains). A small site
    thus chooses between training and validating, and one with too few cases (e.g. ``m <= 3``
    at 0.15) validates on none (:func:`load_split` logs it).

    ``salt`` (the site name) makes sites shuffle independently.
    """
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {frac}")
    if test_cases is None and val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    if test_cases is not None and (isinstance(test_cases, bool) or int(test_cases) != test_cases
                                   or test_cases < 1):
        raise ValueError(f"test_cases must be an integer >= 1, got {test_cases!r}")
    ids = sorted(case_ids)
    n = len(ids)
    rng = np.random.default_rng([seed, zlib.crc32(salt.encode())])
    order = [ids[i] for i in rng.permutation(n)]
    if test_cases is not None:
        n_test = min(int(test_cases), max(n - 1, 0))
        rest = n - n_test
        n_val = min(round(rest * val_fraction), max(rest - 1, 0))
    else:
        n_test = int(round(n * test_fraction))
        n_val = int(round(n * val_fraction))
        while n_test + n_val > max(n - 1, 0):
            if n_val >= n_test and n_val > 0:
                n_val -= 1
            else:
                n_test -= 1
    return {
        "test": sorted(order[:n_test]),
        "val": sorted(order[n_test:n_test + n_val]),
        "train": sorted(order[n_test + n_val:]),
    }


def assign_sites(records: Sequence[CaseRecord], partition_csv: str | os.PathLike | None = None,
                 random_sites_n: int | None = None, seed: int = 0) -> dict[str, str]:
    """``{case: site}`` for cached records from the sources in the module docstring."""
    ids = [r.case_id for r in records]
    if partition_csv is not None:
        return read_site_csv(partition_csv, case_ids=ids)
    if random_sites_n is not None:
        strata = {r.case_id: (r.meta.get("grade") or "") + ("ET" if r.meta.get("has_et") else "noET")
                  for r in records}
        return random_sites(ids, random_sites_n, seed=seed, strata=strata)
    if all(r.site for r in records):
        return {r.case_id: str(r.site) for r in records}
    return institution_sites(ids)


def load_split(cache_dir: str | os.PathLike, partition_csv: str | os.PathLike | None = None,
               seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15, *,
               random_sites: int | None = None, test_cases: int | None = None) -> SiteSplit:
    """Read a prepared cache and split it: ``{site: {"train"|"val"|"test": [CaseRecord]}}``.

    Args:
        cache_dir: folder written by :func:`~m4fuse.data.cache.prepare_dataset`.
        partition_csv: site per case (FeTS or any CSV); cached cases it does not list are left
            out (the CSV defines the federation). Default None: the site recorded in the cache,
            else the institution token of the ids.
        seed: seed of the split (and of ``random_sites``); default 0.
        val_fraction, test_fraction: per-site fractions, default 0.15 each.
        random_sites: N -> ignore other sources, stratified random N sites (keyword only).
        test_cases: the same number of test cases at every site, validation out of the rest
            (keyword only; default None: the fractions; :func:`split_cases`). A site left
            without validation cases is logged.

    Sites come out sorted by name; within a split records are sorted by case id.
    """
    records = load_records(cache_dir)
    if not records:
        raise ValueError(f"cache {cache_dir} holds no prepared case")
    sites = assign_sites(records, partition_csv, random_sites, seed)
    kept = [r.with_site(sites[r.case_id]) for r in records if r.case_id in sites]
    if not kept:
        raise ValueError(f"none of the {len(records)} cached cases in {cache_dir} is listed in {partition_csv}")
    by_site: dict[str, list[CaseRecord]] = defaultdict(list)
    for r in kept:
        by_site[str(r.site)].append(r)
    out: SiteSplit = {}
    for site in sorted(by_site):
        lookup = {r.case_id: r for r in by_site[site]}
        parts = split_cases(list(lookup), seed, val_fraction, test_fraction, salt=site,
                            test_cases=test_cases)
        if not parts["val"]:
            log.info("site %s validates on none of its cases: %d case(s) besides %d test, "
                     "too few for val_fraction=%g (it trains on %d)", site,
                     len(parts["train"]) + len(parts["val"]), len(parts["test"]), val_fraction,
                     len(parts["train"]))
        out[site] = {k: [lookup[c] for c in parts[k]] for k in SPLITS}
    return out
