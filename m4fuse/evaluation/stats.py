"""Statistics of the comparison: mean +- sd over seeds and paired per-case tests.

The test is scipy's Wilcoxon signed-rank test (``scipy.stats.wilcoxon``); this module only
pairs the cases of two modes by ``(seed, site, case)`` and packs the result into plain values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

#: Per-case score the comparison tests and averages: mean Dice of WT, TC and ET.
CASE_SCORE_KEYS: tuple[str, ...] = ("dice_wt", "dice_tc", "dice_et")


def case_score(row: Mapping[str, Any], keys: Sequence[str] = CASE_SCORE_KEYS) -> float:
    """Mean of ``row[k]`` over ``keys`` (default: Dice WT, TC, ET)."""
    return float(np.mean([float(row[k]) for k in keys]))


def mean_sd(values: Iterable[float]) -> tuple[float, float, int]:
    """``(mean, sample sd (ddof 1; nan for fewer than 2 values), n)``."""
    data = np.asarray([float(v) for v in values], dtype=float)
    if data.size == 0:
        return float("nan"), float("nan"), 0
    sd = float(np.std(data, ddof=1)) if data.size > 1 else float("nan")
    return float(np.mean(data)), sd, int(data.size)


def seed_summary(rows: Sequence[Mapping[str, Any]], mode: str, seeds: Iterable[Any],
                 sites: Iterable[str] | None = None,
                 score: Callable[[Mapping[str, Any]], float] = case_score) -> dict[str, Any]:
    """One cell of a comparison table: per seed the mean ``score`` over the cases of ``mode``
    (at ``sites``; None: every site), then mean and sd over the seeds that have cases:
    ``{"mean", "sd", "n_seeds", "per_seed": {seed: mean}}`` (None where not finite)."""
    keep = None if sites is None else set(sites)
    per_seed = {}
    for seed in seeds:
        scores = [score(r) for r in rows if r["mode"] == mode and r["seed"] == seed
                  and (keep is None or r["site"] in keep)]
        if scores:
            per_seed[str(seed)] = float(np.mean(scores))
    mean, sd, n = mean_sd(per_seed.values())
    return {"mean": _f(mean), "sd": _f(sd), "n_seeds": n, "per_seed": per_seed}


def pair_cases(rows: Sequence[Mapping[str, Any]], mode_a: str, mode_b: str,
               site: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-case scores (:func:`case_score`) of ``mode_a`` and ``mode_b`` on the same cases,
    matched by ``(seed, site, case)``; ``site`` (default None: all sites) restricts them.

    Raises:
        ValueError: a case that one mode scored and the other did not (the runs did not use
            the same split).
    """
    def keyed(mode: str) -> dict[tuple, float]:
        return {(r["seed"], r["site"], r["case"]): case_score(r) for r in rows
                if r["mode"] == mode and (site is None or r["site"] == site)}

    a, b = keyed(mode_a), keyed(mode_b)
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))[:3]
        raise ValueError(f"modes {mode_a!r} and {mode_b!r} were scored on different cases, "
                         f"e.g. {only}")
    keys = sorted(a)
    return np.array([a[k] for k in keys]), np.array([b[k] for k in keys])


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Wilcoxon signed-rank test (two-sided, ``scipy.stats.wilcoxon``) of paired scores.

    Returns ``{"n", "mean_a", "mean_b", "mean_diff", "median_diff", "statistic", "p"}``
    (``diff = a - b``); ``p`` is 1.0 when every difference is zero (scipy refuses that case)
    and nan for fewer than 2 pairs.
    """
    from scipy.stats import wilcoxon

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired scores differ in length: {x.shape} vs {y.shape}")
    diff = x - y
    out: dict[str, Any] = {"n": int(x.size), "mean_a": _f(np.mean(x)) if x.size else None,
                           "mean_b": _f(np.mean(y)) if y.size else None,
                           "mean_diff": _f(np.mean(diff)) if x.size else None,
                           "median_diff": _f(np.median(diff)) if x.size else None,
                           "statistic": None, "p": None}
    if x.size < 2:
        return out
    if np.all(diff == 0):
        out["p"] = 1.0
        return out
    result = wilcoxon(x, y, alternative="two-sided")
    out["statistic"], out["p"] = _f(result.statistic), _f(result.pvalue)
    return out


def _f(value: Any) -> float | None:
    """A float, or None for nan/inf (JSON has neither)."""
    value = float(value)
    return value if math.isfinite(value) else None
