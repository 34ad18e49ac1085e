"""The comparison of a skewed federation (sites of different sizes): modes with their own
overrides, training cases and optimiser steps per site, size groups with paired tests, and the
goals of a skewed federation (docs/skewed-federations.md).

:mod:`simulations.compare` calls these; with equal sites nothing here changes its report.

* Modes with overrides: ``name=mode:override[;override...]`` in ``--modes``, e.g.
  ``steps4=personal-norm-ft:fl.local_steps=4`` or ``local4=local:fl.local_steps=4``
  (:func:`parse_mode`): the run of ``mode`` with those Hydra overrides added, reported as
  ``name``.
* Size groups (:func:`size_groups`): ``small`` (at most ``small_max_cases`` training cases,
  default 5), ``largest`` (the site with the most training cases; the first such in site
  order on a tie) and ``middle`` (the rest); only when the sites differ in size.
* Goals (:data:`DEFAULT_GOALS`, thresholds overridable by ``--goals FILE``, a JSON or YAML
  mapping of some of its keys): see :func:`skewed_goals`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from m4fuse.evaluation.stats import pair_cases, paired_test, seed_summary

#: The goals of a skewed federation and their thresholds (mean test Dice, over seeds):
#: ``small_max_cases``: a site with at most this many training cases is "small";
#: ``benchmark_gap``: pooled - local on the small sites at least this (the task needs data);
#: ``small_gain``: the default >= local + this on the small sites;
#: ``small_share_of_pooled``: and >= this fraction of pooled on them;
#: ``largest_tolerance``: the largest site: the default >= its local - this;
#: ``site_tolerance``: every site: the default >= its local - this;
#: ``fedavg_p``: the default > fedavg on each shifted site, paired Wilcoxon p below this;
#: ``shifted_sites``: the sites of that goal (null: every site, each has its own scanner);
#: ``overall_share_of_pooled``: the default's mean over all cases >= this fraction of pooled.
DEFAULT_GOALS: dict[str, Any] = {
    "small_max_cases": 5,
    "benchmark_gap": 0.10,
    "small_gain": 0.10,
    "small_share_of_pooled": 0.97,
    "largest_tolerance": 0.005,
    "site_tolerance": 0.01,
    "fedavg_p": 0.05,
    "shifted_sites": None,
    "overall_share_of_pooled": 0.99,
}

#: The size groups, in report order.
GROUPS: tuple[str, ...] = ("small", "middle", "largest")

_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


def parse_mode(text: str) -> tuple[str, str, list[str]]:
    """``(name, mode, overrides)`` of a ``--modes`` entry: ``name=mode:o1;o2`` or a plain
    ``mode`` (name = mode, no overrides).

    Raises:
        ValueError: naming ``--modes`` and the entry (no ``:`` after ``name=mode``, a bad
            name, an empty override).
    """
    text = text.strip()
    if "=" not in text.split(":", 1)[0]:
        if ":" in text:
            raise ValueError(f"--modes: {text!r} has overrides but no name; write "
                             f"name=mode:override[;override...], e.g. "
                             "steps4=personal-norm-ft:fl.local_steps=4")
        return text, text, []
    name, rest = text.split("=", 1)
    if ":" not in rest:
        raise ValueError(f"--modes: {text!r} needs name=mode:override[;override...], e.g. "
                         "steps4=personal-norm-ft:fl.local_steps=4")
    mode, overrides_text = rest.split(":", 1)
    overrides = [o.strip() for o in overrides_text.split(";")]
    if not _NAME.match(name):
        raise ValueError(f"--modes: the name {name!r} of {text!r} must be letters, digits and "
                         "_ . + - only")
    if not mode or not all(overrides) or not all("=" in o for o in overrides):
        raise ValueError(f"--modes: {text!r}: every override must be key=value, "
                         "separated by ';'")
    return name, mode, overrides


def load_goals(path: str | Path | None) -> dict[str, Any]:
    """:data:`DEFAULT_GOALS` with the keys of the JSON or YAML mapping in ``path`` (default
    None: the defaults) replacing theirs.

    Raises:
        ValueError: naming ``--goals``, the file and the unknown key or unreadable content.
    """
    goals = dict(DEFAULT_GOALS)
    if path is None:
        return goals
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ValueError(f"--goals {path}: cannot read it ({err.strerror}); give a JSON or "
                         "YAML file of goal thresholds") from None
    try:
        import yaml

        given = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except Exception as err:  # noqa: BLE001 - any parse error is the file's
        raise ValueError(f"--goals {path}: not valid {path.suffix.lstrip('.') or 'JSON'} "
                         f"({str(err).splitlines()[0]})") from None
    if not isinstance(given, dict):
        raise ValueError(  # noqa: TRY004 - a bad file is a bad value, like the othersf"--goals {path}: expected a mapping of {sorted(DEFAULT_GOALS)}, "
                         f"got {type(given).__name__}")
    unknown = sorted(set(given) - set(DEFAULT_GOALS))
    if unknown:
        raise ValueError(f"--goals {path}: unknown key(s) {unknown}; known: "
                         f"{sorted(DEFAULT_GOALS)}")
    for key, value in given.items():
        if key == "shifted_sites":
            if value is not None and not (isinstance(value, list)
                                          and all(isinstance(v, str) for v in value)):
                raise ValueError(f"--goals {path}: shifted_sites must be null or a list of "
                                 f"site names, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"--goals {path}: {key} must be a number >= 0, got {value!r}")
    goals.update(given)
    return goals


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


def skewed_goals(by_site: Mapping[str, Any], by_group: Mapping[str, Any],
                 tests: Sequence[Mapping[str, Any]], default: str, sites: Sequence[str],
                 groups: Mapping[str, Sequence[str]], goals: Mapping[str, Any],
                 fedavg: str = "fedavg") -> list[dict[str, Any]]:
    """The goals of a skewed federation as ``{"goal", "met" (True/False/None: not
    measured), "detail"}`` with their numbers: ``by_site`` is the comparison's per-site
    table, ``by_group`` :func:`group_table`, ``tests`` the per-site paired tests (of
    ``default`` against ``fedavg``, the mode standing for FedAvg), ``goals`` the thresholds
    (:data:`DEFAULT_GOALS`). Means are over the seeds both compared modes ran."""
    out: list[dict[str, Any]] = []

    def seeds_of(mode: str) -> set[str]:
        return set(by_site.get(mode, {}).get("mean", {}).get("per_seed", {}))

    def needs(goal: str, *modes: str) -> bool:
        missing = [m for m in modes if m not in by_site]
        if missing:
            out.append({"goal": goal, "met": None, "detail": f"needs modes {list(modes)}"})
        return not missing

    small, largest = list(groups.get("small", [])), list(groups.get("largest", []))
    gap, gain = float(goals["benchmark_gap"]), float(goals["small_gain"])
    share, tol = float(goals["small_share_of_pooled"]), float(goals["largest_tolerance"])
    goal = f"benchmark: pooled - local >= {gap:.2f} on the small sites {small}"
    if not small:
        out.append({"goal": goal, "met": None, "detail": "no small site"})
    elif needs(goal, "pooled", "local"):
        common = seeds_of("pooled") & seeds_of("local")
        p = _mean_over(by_group["small"].get("pooled"), common)
        lo = _mean_over(by_group["small"].get("local"), common)
        out.append({"goal": goal, "met": None if p is None or lo is None else p - lo >= gap,
                    "detail": "n/a" if p is None or lo is None
                    else f"pooled {p:.3f} - local {lo:.3f} = {p - lo:+.3f}"})
    goal = (f"small sites: {default} >= local + {gain:.2f} and >= {100 * share:.0f} % of "
            "pooled")
    if not small:
        out.append({"goal": goal, "met": None, "detail": "no small site"})
    elif needs(goal, default, "pooled", "local"):
        common = seeds_of(default) & seeds_of("pooled") & seeds_of("local")
        d = _mean_over(by_group["small"].get(default), common)
        p = _mean_over(by_group["small"].get("pooled"), common)
        lo = _mean_over(by_group["small"].get("local"), common)
        if d is None or p is None or lo is None or p <= 0:
            out.append({"goal": goal, "met": None, "detail": "n/a"})
        else:
            out.append({"goal": goal, "met": d >= lo + gain and d / p >= share,
                        "detail": f"{default} {d:.3f}, local {lo:.3f} ({d - lo:+.3f}), "
                                  f"pooled {p:.3f} ({100 * d / p:.1f} %)"})
    goal = f"largest site {largest}: {default} >= its local - {tol:g}"
    if largest and needs(goal, default, "local"):
        common = seeds_of(default) & seeds_of("local")
        d = _mean_over(by_site[default].get(largest[0]), common)
        lo = _mean_over(by_site["local"].get(largest[0]), common)
        out.append({"goal": goal, "met": None if d is None or lo is None else d >= lo - tol,
                    "detail": "n/a" if d is None or lo is None
                    else f"{d:.4f} vs local {lo:.4f} ({d - lo:+.4f})"})
    site_tol = float(goals["site_tolerance"])
    goal = f"every site: {default} >= local - {site_tol:g} (mean over seeds)"
    if needs(goal, default, "local"):
        common = seeds_of(default) & seeds_of("local")
        diffs = {s: (_mean_over(by_site[default].get(s), common),
                     _mean_over(by_site["local"].get(s), common)) for s in sites}
        below = [s for s, (d, lo) in diffs.items()
                 if d is None or lo is None or d < lo - site_tol]
        out.append({"goal": goal, "met": not below,
                    "detail": ", ".join(f"{s} {d - lo:+.4f}" for s, (d, lo) in diffs.items()
                                        if d is not None and lo is not None)
                              + (f"; below on {below}" if below else "")})
    shifted = list(goals["shifted_sites"] or sites)
    p_max = float(goals["fedavg_p"])
    goal = f"{default} > {fedavg} on the shifted sites with p < {p_max:g} (paired)"
    fed = {t["site"]: t for t in tests if t["b"] == fedavg and t["a"] == default}
    if default == fedavg or not fed:
        out.append({"goal": goal, "met": None, "detail": f"needs modes {default} and {fedavg}"})
    else:
        parts, met = [], True
        for s in shifted:
            t = fed.get(s)
            ok = bool(t and t["mean_diff"] is not None and t["mean_diff"] > 0
                      and t["p"] is not None and t["p"] < p_max)
            met &= ok
            parts.append(f"{s} " + ("n/a" if t is None else
                                    f"{(t['mean_diff'] or 0):+.3f} p "
                                    + ("n/a" if t["p"] is None else f"{t['p']:.3g}")))
        out.append({"goal": goal, "met": met, "detail": "; ".join(parts)})
    overall = float(goals["overall_share_of_pooled"])
    goal = f"overall: {default} >= {100 * overall:.0f} % of pooled"
    if needs(goal, default, "pooled"):
        common = seeds_of(default) & seeds_of("pooled")
        d = _mean_over(by_site[default].get("mean"), common)
        p = _mean_over(by_site["pooled"].get("mean"), common)
        out.append({"goal": goal,
                    "met": None if d is None or p is None or p <= 0 else d / p >= overall,
                    "detail": "n/a" if d is None or p is None or p <= 0
                    else f"{d:.3f} / {p:.3f} = {100 * d / p:.1f} %"})
    return out


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
