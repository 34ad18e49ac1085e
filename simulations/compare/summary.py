"""The comparison's summary from its per-case rows: the table of mean +- sd over seeds per
mode and site (voxel-wise and lesion-wise), the paired tests, the goals, the cross-site
matrices and the new site's results pooled over seeds."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from m4fuse.evaluation.crosssite import LESION_CASE_KEYS, matrix
from m4fuse.evaluation.stats import case_score, pair_cases, paired_test, seed_summary
from simulations.compare import skewed
from simulations.compare.goals import goals
from simulations.compare.provenance import provenance


def finite_or_none(value: float) -> float | None:
    """``value`` as a float, or None when it is not finite (JSON has no nan)."""
    return float(value) if math.isfinite(float(value)) else None


def site_table(rows: Sequence[Mapping[str, Any]], modes: Sequence[str], seeds: Sequence[int],
               sites: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{mode: {site or "mean": {"mean", "sd", "n_seeds", "per_seed": {seed: v}}}}``: per
    seed the mean over the site's test cases of the per-case mean Dice (``"mean"``: over all
    sites' cases), then mean and sd over seeds."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for mode in modes:
        out[mode] = {}
        for site in [*sites, "mean"]:
            out[mode][site] = seed_summary(rows, mode, seeds, None if site == "mean" else [site])
    return out


def paired_tests(rows: Sequence[Mapping[str, Any]], default: str, others: Sequence[str],
                 sites: Sequence[str]) -> list[dict[str, Any]]:
    """Wilcoxon of ``default`` against each of ``others`` per site and over all sites, on the
    cases of the seeds both modes ran (a merged report may hold a mode on fewer seeds; those
    seeds are in each result's ``"seeds"``). Within a seed the cases must agree
    (:func:`m4fuse.evaluation.stats.pair_cases`)."""
    out = []
    ran = {mode: {r["seed"] for r in rows if r["mode"] == mode} for mode in [default, *others]}
    for other in others:
        common = ran[default] & ran[other]
        both = [r for r in rows if r["seed"] in common]
        for site in [*sites, None]:
            a, b = pair_cases(both, default, other, site)
            out.append({"a": default, "b": other, "site": site or "all",
                        "seeds": sorted(common), **paired_test(a, b)})
    return out


def pool_new_site(results: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The new-site results of all seeds as one: per k the per-case test over all seeds."""
    if not results:
        return None
    rows = [r for res in results for r in res["rows"]]
    by_k = {}
    for k in results[0]["by_k"]:
        pairs: dict[tuple, dict[str, float]] = {}
        for r in rows:
            if str(r["k"]) == k:
                pairs.setdefault((r.get("seed"), r["case"]), {})[r["model"]] = case_score(r)
        tuned = [v["fine-tuned"] for v in pairs.values()]
        shared = [v["shared"] for v in pairs.values()]
        by_k[k] = {"test": paired_test(tuned, shared),
                   "seconds": [res["by_k"][k]["seconds"] for res in results],
                   "frozen_unchanged": all(res["by_k"][k]["frozen_unchanged"] for res in results)}
    return {"site": results[0]["site"], "models": [res["model"] for res in results],
            "train_cases": results[0]["train_cases"],
            "test_cases": results[0]["test_cases"], "epochs": results[0]["epochs"],
            "by_k": by_k, "rows": rows}

def lesion_tables(rows: Sequence[Mapping[str, Any]], modes: Sequence[str], seeds: Sequence[int],
                  sites: Sequence[str]) -> dict[str, Any] | None:
    """The lesion-wise twins of :func:`site_table` (BraTS 2023+ rule, :mod:`m4fuse.evaluation.lesion`):
    ``{"dice": table, "hd95": table}`` with, per case, the mean over WT, TC, ET of the
    lesion-wise Dice resp. HD95 (mm); None when a row has no lesion-wise scores (a
    comparison written before they existed)."""
    if not rows or not all(k in r for r in rows for k in LESION_CASE_KEYS):
        return None
    out: dict[str, Any] = {}
    for metric in ("dice", "hd95"):
        keys = [f"lesion_{metric}_{g}" for g in ("wt", "tc", "et")]
        out[metric] = {}
        for mode in modes:
            out[metric][mode] = {}
            for site in [*sites, "mean"]:
                out[metric][mode][site] = seed_summary(
                    rows, mode, seeds, None if site == "mean" else [site],
                    score=lambda r, keys=keys: float(np.mean([r[k] for k in keys])))
    return out


def convergence_lines(results: dict[str, dict[str, Any]], last: int = 4) -> list[str]:
    """Markdown bullets: each mode's validation mean Dice (case-weighted over sites) of its
    ``last`` rounds, so a reader sees whether the budget was enough (a curve still rising at
    the last round means the run was stopped before convergence). Modes without a history
    are left out."""
    lines = []
    for mode, result in results.items():
        curve = [(int(e["round"]), float(e["val"]["dice_mean"])) for e in result["history"]
                 if "dice_mean" in e.get("val", {})]
        if len(curve) >= 2:
            tail = ", ".join(f"r{r} {d:.3f}" for r, d in curve[-last:])
            lines.append(f"- {mode}: {tail} (last-round change {curve[-1][1] - curve[-2][1]:+.3f})")
    return lines


def summarise(*, name: str, default: str, modes: Sequence[str], seeds: Sequence[int],
              sites: Sequence[str], overrides: Sequence[str], test_cases: Mapping[str, Any],
              budget: Mapping[str, int], rows: Sequence[Mapping[str, Any]],
              cross_rows: Mapping[str, Sequence[Mapping[str, Any]]],
              new_site: Mapping[str, Any] | None, seconds: Mapping[str, Any],
              bytes_by_mode: Mapping[str, Any], check: Mapping[str, Any],
              convergence: Sequence[str], against: Sequence[str] = (),
              fedavg: str = "fedavg", train_cases: Mapping[str, int] | None = None,
              steps: Mapping[str, Any] | None = None,
              goal_thresholds: Mapping[str, Any] | None = None,
              criteria: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The comparison's summary from its per-case rows: the table of mean +- sd over seeds,
    the paired tests of the default strategy (against ``fedavg``, the mode standing for
    FedAvg, local and ``against``), the goals and the cross-site matrices (the new site's
    per-case rows ride along under ``_new_site_rows`` for
    :func:`simulations.compare.report.write_report`); ``criteria``: the equal-site goals'
    thresholds (default :data:`simulations.compare.goals.DEFAULT_CRITERIA`). With
    ``train_cases`` ({site: training cases}, default none), ``steps`` (mode -> site ->
    optimiser steps) and ``goal_thresholds`` (default
    :data:`simulations.compare.skewed.DEFAULT_GOALS`): those, and for sites of different sizes
    the size groups, their tests and the goals of a skewed federation in place of the
    equal-site goals (:func:`simulations.compare.skewed.skew_summary`)."""
    table = site_table(rows, modes, seeds, sites)
    others = [m for m in dict.fromkeys([fedavg, "local", *against])
              if m in modes and m != default]
    tests = paired_tests(rows, default, others, sites) if default in modes else []
    crossdata = {}
    for mode, crows in cross_rows.items():
        ms, ts, values = matrix(crows)
        crossdata[mode] = {"model_sites": ms, "sites": ts,
                           "values": [[finite_or_none(v) for v in row] for row in values]}
    return {
        "name": name, "default_strategy": default, "modes": list(modes), "seeds": list(seeds),
        "sites": list(sites), "overrides": list(overrides), "test_cases": dict(test_cases),
        "budget": dict(budget),
        "score": "per case: mean of dice_wt, dice_tc, dice_et",
        "by_site": table, "tests": tests,
        "by_site_lesion": lesion_tables(rows, modes, seeds, sites),
        "goals": goals(table, tests, default, sites, new_site, fedavg, criteria),
        "seconds": dict(seconds), "bytes": dict(bytes_by_mode), "check": dict(check),
        "crosssite": crossdata,
        "new_site": None if new_site is None else {k: v for k, v in new_site.items()
                                                   if k != "rows"},
        "convergence": list(convergence),
        "provenance": provenance(),
        "_new_site_rows": [] if new_site is None else list(new_site["rows"]),
        **skewed.skew_summary(rows, default=default, modes=modes, seeds=seeds, sites=sites,
                              by_site=table, tests=tests, train_cases=train_cases,
                              steps=steps, goals=goal_thresholds, fedavg=fedavg),
    }
