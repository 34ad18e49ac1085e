"""The comparison of a skewed federation (sites of different sizes): training cases and
optimiser steps per site, size groups with paired tests, and the goals of a skewed federation
(docs/skewed-federations.md). Modes with their own overrides (``--modes
name=mode:override[;override...]``) are :func:`simulations.compare.modes.parse_mode`'s.

:mod:`simulations.compare` calls these; with equal sites nothing here changes its report.

* Size groups (:func:`size_groups`): ``small`` (at most ``small_max_cases`` training cases,
  default 5), ``largest`` (the site with the most training cases; the first such in site
  order on a tie) and ``middle`` (the rest); only when the sites differ in size.
* Goals (:data:`DEFAULT_GOALS`, read from ``criteria/skewed.yaml``; thresholds overridable by
  ``--goals FILE``, a JSON or YAML mapping of some of its keys): see :func:`skewed_goals`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from m4fuse.evaluation.stats import pair_cases, paired_test, seed_summary
from simulations.compare.goals import (
    CRITERIA_DIR,
    ValueCheck,
    load_criteria_file,
    number_at_least_zero,
    read_default,
)

#: The goals of a skewed federation and their thresholds (``criteria/skewed.yaml``, its
#: comments say what each key means): see :func:`skewed_goals`.
DEFAULT_GOALS: dict[str, Any] = read_default(CRITERIA_DIR / "skewed.yaml")

#: The size groups, in report order.
GROUPS: tuple[str, ...] = ("small", "middle", "largest")


def _shifted_sites(value: Any) -> str | None:
    if value is not None and not (isinstance(value, list)
                                  and all(isinstance(v, str) for v in value)):
        return f"must be null or a list of site names, got {value!r}"
    return None


_CHECKS: dict[str, ValueCheck] = {
    key: (_shifted_sites if key == "shifted_sites" else number_at_least_zero)
    for key in DEFAULT_GOALS}


def load_goals(path: str | Path | None) -> dict[str, Any]:
    """:data:`DEFAULT_GOALS` with the keys of the JSON or YAML mapping in ``path`` (default
    None: the defaults) replacing theirs.

    Raises:
        ValueError: naming ``--goals``, the file and the unknown key or unreadable content.
    """
    return load_criteria_file(path, DEFAULT_GOALS, "--goals", "goal thresholds", _CHECKS)


def sizes_differ(train_cases: Mapping[str, int]) -> bool:
    """True when the sites' numbers of training cases are not all the same."""
    return len({int(v) for v in train_cases.values()}) > 1


def size_groups(train_cases: Mapping[str, int], small_max: int = 5
                ) -> dict[str, list[str]] | None:
    """``{"small", "middle", "largest": [sites]}`` by training cases (``small``: at most
    ``small_max``, default 5; ``largest``: the one site with the most, the first in order on
    a tie; ``middle``: the others), or None when every site has the same number."""
    if not train_cases or not sizes_differ(train_cases):
        return None
    sites = list(train_cases)
    largest = max(sites, key=lambda s: int(train_cases[s]))  # first of equal maxima
    small = [s for s in sites if int(train_cases[s]) <= small_max and s != largest]
    middle = [s for s in sites if s not in small and s != largest]
    return {"small": small, "middle": middle, "largest": [largest]}


def group_table(rows: Sequence[Mapping[str, Any]], modes: Sequence[str], seeds: Sequence[int],
                groups: Mapping[str, Sequence[str]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{group: {mode: {"mean", "sd", "n_seeds", "per_seed": {seed: v}}}}``: per seed the
    mean test Dice (per case: :func:`m4fuse.evaluation.stats.case_score`) over the cases of the group's
    sites, then mean and sd over seeds (as the per-site table)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for group, sites in groups.items():
        out[group] = {}
        for mode in modes:
            out[group][mode] = seed_summary(rows, mode, seeds, sites)
    return out


def group_tests(rows: Sequence[Mapping[str, Any]], default: str, others: Sequence[str],
                groups: Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
    """Paired Wilcoxon tests (:func:`m4fuse.evaluation.stats.paired_test`) of ``default`` against each
    of ``others`` on the cases of each group's sites, of the seeds both modes ran."""
    out = []
    ran = {m: {r["seed"] for r in rows if r["mode"] == m} for m in [default, *others]}
    for other in others:
        common = ran[default] & ran[other]
        for group, sites in groups.items():
            both = [r for r in rows if r["seed"] in common and r["site"] in sites]
            a, b = pair_cases(both, default, other)
            out.append({"group": group, "a": default, "b": other, "sites": list(sites),
                        "seeds": sorted(common), **paired_test(a, b)})
    return out


def steps_of_history(history: Sequence[Mapping[str, Any]], names: Sequence[str]
                     ) -> dict[str, dict[str, float]]:
    """Optimiser steps of one run by site (:func:`m4fuse.run.report.optimiser_steps`)."""
    from m4fuse.run.report import optimiser_steps

    return optimiser_steps(history, names)


def _mean_over(entry: Mapping[str, Any] | None, seeds: set[str]) -> float | None:
    values = [v for s, v in (entry or {}).get("per_seed", {}).items() if s in seeds]
    return float(np.mean(values)) if values else None


class _GoalData:
    """What the goals of a skewed federation read: the per-site and per-group tables, the
    default mode, the sites and the size groups."""

    def __init__(self, by_site: Mapping[str, Any], by_group: Mapping[str, Any], default: str,
                 sites: Sequence[str], groups: Mapping[str, Sequence[str]]) -> None:
        self.by_site, self.by_group, self.default = by_site, by_group, default
        self.sites = sites
        self.small, self.largest = list(groups.get("small", [])), list(groups.get("largest", []))

    def seeds_of(self, mode: str) -> set[str]:
        """The seeds ``mode`` ran (as the table's keys)."""
        return set(self.by_site.get(mode, {}).get("mean", {}).get("per_seed", {}))

    def common(self, *modes: str) -> set[str]:
        """The seeds every one of ``modes`` ran."""
        return set.intersection(*(self.seeds_of(m) for m in modes))

    def lacks(self, goal: str, *modes: str) -> dict[str, Any] | None:
        """The goal as not measured when one of ``modes`` did not run, else None."""
        if any(m not in self.by_site for m in modes):
            return {"goal": goal, "met": None, "detail": f"needs modes {list(modes)}"}
        return None


def _benchmark_goal(data: _GoalData, gap: float) -> dict[str, Any]:
    goal = f"benchmark: pooled - local >= {gap:.2f} on the small sites {data.small}"
    if not data.small:
        return {"goal": goal, "met": None, "detail": "no small site"}
    missing = data.lacks(goal, "pooled", "local")
    if missing:
        return missing
    common = data.common("pooled", "local")
    p = _mean_over(data.by_group["small"].get("pooled"), common)
    lo = _mean_over(data.by_group["small"].get("local"), common)
    return {"goal": goal, "met": None if p is None or lo is None else p - lo >= gap,
            "detail": "n/a" if p is None or lo is None
            else f"pooled {p:.3f} - local {lo:.3f} = {p - lo:+.3f}"}


def _small_sites_goal(data: _GoalData, gain: float, share: float) -> dict[str, Any]:
    default = data.default
    goal = (f"small sites: {default} >= local + {gain:.2f} and >= {100 * share:.0f} % of "
            "pooled")
    if not data.small:
        return {"goal": goal, "met": None, "detail": "no small site"}
    missing = data.lacks(goal, default, "pooled", "local")
    if missing:
        return missing
    common = data.common(default, "pooled", "local")
    d = _mean_over(data.by_group["small"].get(default), common)
    p = _mean_over(data.by_group["small"].get("pooled"), common)
    lo = _mean_over(data.by_group["small"].get("local"), common)
    if d is None or p is None or lo is None or p <= 0:
        return {"goal": goal, "met": None, "detail": "n/a"}
    return {"goal": goal, "met": d >= lo + gain and d / p >= share,
            "detail": f"{default} {d:.3f}, local {lo:.3f} ({d - lo:+.3f}), "
                      f"pooled {p:.3f} ({100 * d / p:.1f} %)"}


def _largest_site_goal(data: _GoalData, tol: float) -> dict[str, Any] | None:
    default, largest = data.default, data.largest
    goal = f"largest site {largest}: {default} >= its local - {tol:g}"
    if not largest:
        return None
    missing = data.lacks(goal, default, "local")
    if missing:
        return missing
    common = data.common(default, "local")
    d = _mean_over(data.by_site[default].get(largest[0]), common)
    lo = _mean_over(data.by_site["local"].get(largest[0]), common)
    return {"goal": goal, "met": None if d is None or lo is None else d >= lo - tol,
            "detail": "n/a" if d is None or lo is None
            else f"{d:.4f} vs local {lo:.4f} ({d - lo:+.4f})"}


def _every_site_goal(data: _GoalData, site_tol: float) -> dict[str, Any]:
    default = data.default
    goal = f"every site: {default} >= local - {site_tol:g} (mean over seeds)"
    missing = data.lacks(goal, default, "local")
    if missing:
        return missing
    common = data.common(default, "local")
    diffs = {s: (_mean_over(data.by_site[default].get(s), common),
                 _mean_over(data.by_site["local"].get(s), common)) for s in data.sites}
    below = [s for s, (d, lo) in diffs.items()
             if d is None or lo is None or d < lo - site_tol]
    return {"goal": goal, "met": not below,
            "detail": ", ".join(f"{s} {d - lo:+.4f}" for s, (d, lo) in diffs.items()
                                if d is not None and lo is not None)
                      + (f"; below on {below}" if below else "")}


def _fedavg_goal(data: _GoalData, tests: Sequence[Mapping[str, Any]], fedavg: str,
                 shifted: Sequence[str], p_max: float) -> dict[str, Any]:
    default = data.default
    goal = f"{default} > {fedavg} on the shifted sites with p < {p_max:g} (paired)"
    fed = {t["site"]: t for t in tests if t["b"] == fedavg and t["a"] == default}
    if default == fedavg or not fed:
        return {"goal": goal, "met": None, "detail": f"needs modes {default} and {fedavg}"}
    parts, met = [], True
    for s in shifted:
        t = fed.get(s)
        ok = bool(t and t["mean_diff"] is not None and t["mean_diff"] > 0
                  and t["p"] is not None and t["p"] < p_max)
        met &= ok
        parts.append(f"{s} " + ("n/a" if t is None else
                                f"{(t['mean_diff'] or 0):+.3f} p "
                                + ("n/a" if t["p"] is None else f"{t['p']:.3g}")))
    return {"goal": goal, "met": met, "detail": "; ".join(parts)}


def _overall_goal(data: _GoalData, overall: float) -> dict[str, Any]:
    default = data.default
    goal = f"overall: {default} >= {100 * overall:.0f} % of pooled"
    missing = data.lacks(goal, default, "pooled")
    if missing:
        return missing
    common = data.common(default, "pooled")
    d = _mean_over(data.by_site[default].get("mean"), common)
    p = _mean_over(data.by_site["pooled"].get("mean"), common)
    return {"goal": goal,
            "met": None if d is None or p is None or p <= 0 else d / p >= overall,
            "detail": "n/a" if d is None or p is None or p <= 0
            else f"{d:.3f} / {p:.3f} = {100 * d / p:.1f} %"}


def skewed_goals(by_site: Mapping[str, Any], by_group: Mapping[str, Any],
                 tests: Sequence[Mapping[str, Any]], default: str, sites: Sequence[str],
                 groups: Mapping[str, Sequence[str]], goals: Mapping[str, Any],
                 fedavg: str = "fedavg") -> list[dict[str, Any]]:
    """The goals of a skewed federation as ``{"goal", "met" (True/False/None: not
    measured), "detail"}`` with their numbers: ``by_site`` is the comparison's per-site
    table, ``by_group`` :func:`group_table`, ``tests`` the per-site paired tests (of
    ``default`` against ``fedavg``, the mode standing for FedAvg), ``goals`` the thresholds
    (:data:`DEFAULT_GOALS`). Means are over the seeds both compared modes ran."""
    data = _GoalData(by_site, by_group, default, sites, groups)
    out = [_benchmark_goal(data, float(goals["benchmark_gap"])),
           _small_sites_goal(data, float(goals["small_gain"]),
                             float(goals["small_share_of_pooled"])),
           _largest_site_goal(data, float(goals["largest_tolerance"])),
           _every_site_goal(data, float(goals["site_tolerance"])),
           _fedavg_goal(data, tests, fedavg, list(goals["shifted_sites"] or sites),
                        float(goals["fedavg_p"])),
           _overall_goal(data, float(goals["overall_share_of_pooled"]))]
    return [g for g in out if g is not None]


def _fmt(value: float | None, sd: float | None = None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if sd is None else f"{value:.3f} ± {sd:.3f}"


def report_lines(summary: Mapping[str, Any]) -> list[str]:
    """The Markdown of a summary's skew section: training cases and optimiser steps per
    site and mode (whenever known), and, when the sites differ in size, the size groups'
    means and their paired tests (the goals of a skewed federation are the summary's
    ``goals``, reported where the comparison reports its goals)."""
    lines: list[str] = []
    train_cases = summary.get("train_cases") or {}
    steps = summary.get("steps") or {}
    if train_cases:
        lines += ["", "Training cases per site (as trained): "
                  + ", ".join(f"{s} {n}" for s, n in train_cases.items()) + "."]
    if steps:
        sites = list(summary.get("sites", []))
        lines += ["", ("Optimiser steps per round / in total, by mode and site (the \"+FT\" "
                       "fine-tuning's are not counted):"), "",
                  "| mode | " + " | ".join([*sites, "all sites"]) + " |",
                  "|" + "---|" * (len(sites) + 2)]
        for mode, by in steps.items():
            cells = [(f"{by[s]['per_round']:.0f} / {by[s]['total']:.0f}" if s in by else "")
                     for s in [*sites, "all sites"]]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    groups = summary.get("size_groups")
    if not groups:
        return lines
    lines += ["", "Size groups (training cases: small <= "
              f"{summary['goal_thresholds']['small_max_cases']}, the largest site, the rest "
              "middle): " + "; ".join(f"{g} {groups[g]}" for g in GROUPS if groups.get(g)),
              "", "| mode | " + " | ".join(g for g in GROUPS if groups.get(g)) + " |",
              "|" + "---|" * (1 + sum(1 for g in GROUPS if groups.get(g)))]
    table = summary["by_group"]
    for mode in summary["modes"]:
        cells = [_fmt(table[g][mode]["mean"], table[g][mode]["sd"]) for g in GROUPS
                 if groups.get(g)]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    if summary.get("group_tests"):
        lines += ["", ("Paired per-case Wilcoxon tests per size group (two-sided, scipy), "
                       "default (a) against each mode (b):"), "",
                  "| group | a | b | n | mean a | mean b | mean a-b | p |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in summary["group_tests"]:
            p = "n/a" if t["p"] is None else f"{t['p']:.3g}"
            lines.append(f"| {t['group']} | {t['a']} | {t['b']} | {t['n']} | "
                         f"{_fmt(t['mean_a'])} | {_fmt(t['mean_b'])} | "
                         f"{(t['mean_diff'] or 0):+.3f} | {p} |")
    return lines


def skew_summary(rows: Sequence[Mapping[str, Any]], *, default: str, modes: Sequence[str],
                 seeds: Sequence[int], sites: Sequence[str], by_site: Mapping[str, Any],
                 tests: Sequence[Mapping[str, Any]], train_cases: Mapping[str, int] | None,
                 steps: Mapping[str, Any] | None, goals: Mapping[str, Any] | None,
                 fedavg: str = "fedavg") -> dict[str, Any]:
    """The summary keys of the skew section: ``train_cases``, ``steps``,
    ``goal_thresholds`` and, when the sites differ in size, ``size_groups``, ``by_group``,
    ``group_tests`` (the default against every other mode it ran with) and ``goals`` (those
    of :func:`skewed_goals`, in place of the equal-site goals)."""
    goals = dict(goals or DEFAULT_GOALS)
    out: dict[str, Any] = {"train_cases": dict(train_cases or {}), "steps": dict(steps or {}),
                           "goal_thresholds": goals}
    groups = size_groups(train_cases or {}, int(goals["small_max_cases"]))
    if groups is None:
        return out
    groups = {g: [s for s in groups[g] if s in sites] for g in GROUPS}
    groups = {g: v for g, v in groups.items() if v}
    by_group = group_table(rows, modes, seeds, groups)
    others = [m for m in modes if m != default] if default in modes else []
    out.update(size_groups=groups, by_group=by_group,
               group_tests=group_tests(rows, default, others, groups) if others else [],
               goals=skewed_goals(by_site, by_group, tests, default, sites, groups, goals,
                                  fedavg))
    return out
