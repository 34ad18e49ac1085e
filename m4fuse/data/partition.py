"""Site partition CSV files: ``{case: site}`` read from and written to disk.

The FeTS format ``Partition_ID,Subject_ID`` (either column order) or any CSV with a case
column and a site column. Kept apart from :mod:`m4fuse.data.sites` (splits) and
:mod:`m4fuse.data.cache` (which records each case's site at prepare time) so that neither
has to import the other.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from m4fuse.io.atomic import replace_atomic

_CASE_COLUMNS = ("subject_id", "subject", "case_id", "case", "id", "brats_id", "brats21id", "patient")
_SITE_COLUMNS = ("partition_id", "partition", "site", "site_id", "institution", "center", "centre", "hospital")


def read_site_csv(path: str | os.PathLike, case_ids: Iterable[str] | None = None,
                  case_column: str | None = None, site_column: str | None = None) -> dict[str, str]:
    """Read ``{case_id: site}`` from a partition CSV.

    Columns: the ones named by ``case_column``/``site_column`` if given; else FeTS
    ``Subject_ID``/``Partition_ID`` (any order, case-insensitive); else well-known names
    (subject/case/id …, site/partition/institution/center …); else, for a two-column file,
    the column whose values overlap ``case_ids`` most is the case column.
    Raises ``ValueError`` naming the file, and the header or row, when it cannot.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"partition CSV not found: {path}")
    with open(path, newline="") as fh:
        rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    if len(rows) < 2:
        raise ValueError(f"{path}: partition CSV needs a header and at least one row")
    header = [h.strip() for h in rows[0]]
    lower = [h.lower() for h in header]

    def find(name: str | None, candidates: Sequence[str], what: str) -> int | None:
        if name is not None:
            if name.lower() not in lower:
                raise ValueError(f"{path}: no column {name!r} for the {what}; header is {header}")
            return lower.index(name.lower())
        for cand in candidates:
            if cand in lower:
                return lower.index(cand)
        return None

    ci = find(case_column, _CASE_COLUMNS, "case id")
    si = find(site_column, _SITE_COLUMNS, "site")
    if (ci is None or si is None) and len(header) == 2:
        if ci is not None or si is not None:
            ci = ci if ci is not None else 1 - si  # type: ignore[operator]
            si = 1 - ci
        elif case_ids is not None:
            known = set(case_ids)
            hits = [sum(r[j].strip() in known for r in rows[1:] if len(r) > j) for j in (0, 1)]
            ci = int(np.argmax(hits))
            si = 1 - ci
    if ci is None or si is None or ci == si:
        raise ValueError(f"{path}: cannot tell the case and site columns apart in header {header}; "
                         "use Subject_ID,Partition_ID or name the columns")
    out: dict[str, str] = {}
    for lineno, row in enumerate(rows[1:], start=2):
        if len(row) <= max(ci, si):
            raise ValueError(f"{path}:{lineno}: row {row} has too few columns for header {header}")
        case, site = row[ci].strip(), row[si].strip()
        if not case or not site:
            raise ValueError(f"{path}:{lineno}: empty case or site in row {row}")
        if case in out and out[case] != site:
            raise ValueError(f"{path}:{lineno}: case {case} listed in sites {out[case]!r} and {site!r}")
        out[case] = site
    return out


def write_partition_csv(path: str | os.PathLike, sites: Mapping[str, str]) -> None:
    """Write ``{case: site}`` as a FeTS partition CSV (``Partition_ID,Subject_ID``), atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["Partition_ID", "Subject_ID"])
            for case, site in sorted(sites.items(), key=lambda kv: (kv[1], kv[0])):
                w.writerow([site, case])

    replace_atomic(Path(path), write)
