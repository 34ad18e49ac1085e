"""Pooled vs local vs federated strategies over several seeds, per case, with paired tests.

``python -m simulations.compare --seeds 0,1,2 --modes pooled,local,fedavg,personal
[hydra overrides...]`` runs every mode on every seed with the same composed config (only
``seed``, ``fl.strategy`` and ``run_name`` differ; each seed has its own synthetic set and
split), then scores every run's final per-site models on their site's test cases, case by
case, and writes into ``<root>/runs/<name>/`` (``name``: ``run_name`` or ``compare``):

* ``comparison.json``: ``{"rows": [...], "summary": {...}}``, one row per mode, seed, site
  and test case (``mode, seed, site, case, dice_wt, dice_tc, dice_et, hd95_wt, hd95_tc,
  hd95_et``, then the lesion-wise ``lesion_dice_wt`` .. ``lesion_hd95_et`` and the counts
  ``lesion_found_wt`` .. ``lesion_fp_et``; Dice in [0, 1], HD95 in mm, null where not
  finite); the summary holds mean +- sd over seeds per mode and site (voxel-wise
  ``by_site``, lesion-wise ``by_site_lesion``), the Wilcoxon tests, the goals, wall times, the check against
  each run's own table, the cross-site matrices and the new-site results;
* ``comparison.md`` (the report, headed by the command, date and code version that made it:
  the summary's ``provenance``), ``comparison.png`` (mean +- sd per site and mode),
  ``crosssite.png`` (every site's model on every site's test cases).

``python -m simulations.compare --report runs/X/comparison.json`` prints that report again
from the JSON alone (the pages under ``docs/results/`` are made this way).

Modes: ``pooled`` and ``local`` (the baselines, :mod:`m4fuse.training.baselines`), any
``fl.strategy`` of :data:`m4fuse.run.settings.STRATEGIES` (run as a Flower simulation), and
``<strategy>-dp`` (that strategy with ``privacy=dp``). The *default strategy* is
``fl.strategy`` of the composed config.

Per-case rows: the federated ServerApp only receives each site's mean scores (the sites send
nothing more), so the comparison rebuilds each site's final model from the run's
``model.ckpt`` (the server's final weights plus the site's personal weights, fine-tuned
where the site kept its fine-tuning, put together after the run by
:func:`m4fuse.io.assembly.assemble_run`) and scores
it itself with :func:`m4fuse.training.site_steps.test_site`; baselines are rebuilt from
their ``model.ckpt`` / ``models/<site>.ckpt``. The per-site means are checked against the
run's own ``sites.csv``; a difference is reported, never hidden.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m4fuse.evaluation.crosssite import LESION_CASE_KEYS, SCORE_KEYS, heatmap, matrix, score_cases
from m4fuse.evaluation.crosssite import markdown as matrix_markdown
from m4fuse.evaluation.stats import case_score, pair_cases, paired_test, seed_summary
from m4fuse.run import provision, runtime, settings, workspace
from simulations import skewed

BASELINES: tuple[str, ...] = ("pooled", "local")
DP_SUFFIX = "-dp"
ROW_KEYS: tuple[str, ...] = ("mode", "seed", "site", "case", *SCORE_KEYS)
#: A difference of a site's mean test Dice between the comparison's own scoring and the run's
#: table above this is reported as a mismatch.
CHECK_TOLERANCE = 2e-3


def known_modes() -> list[str]:
    """Every mode the comparison can run: the baselines, each strategy, each strategy
    ``-dp``."""
    strategies = [s for s in settings.STRATEGIES if s not in BASELINES]
    return [*BASELINES, *strategies, *(s + DP_SUFFIX for s in strategies)]


def check_modes(modes: Sequence[str]) -> list[str]:
    """The modes' names, checked (unknown or repeated ones fail naming ``--modes``); an
    entry may be ``name=mode:override[;override...]`` (:func:`simulations.skewed.parse_mode`,
    :func:`mode_specs`)."""
    modes = [m for m in modes if m]
    if not modes:
        raise ValueError("--modes is empty")
    specs = [skewed.parse_mode(m) for m in modes]
    unknown = [m for _, m, _ in specs if m not in known_modes()]
    if unknown:
        raise ValueError(f"--modes: unknown {unknown}; choose from {known_modes()}")
    taken = [n for n, m, extra in specs if extra and n in known_modes()]
    if taken:
        raise ValueError(f"--modes: {taken} name a mode with overrides like a plain mode; "
                         "give it another name")
    names = [n for n, _, _ in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"--modes repeats a mode: {names}")
    return names


def mode_specs(modes: Sequence[str]) -> dict[str, tuple[str, list[str]]]:
    """``{name: (mode, its own overrides)}`` of the ``--modes`` entries (a plain mode: itself,
    none)."""
    return {n: (m, extra) for n, m, extra in (skewed.parse_mode(x) for x in modes if x)}


def mode_overrides(mode: str) -> list[str]:
    """The overrides that make ``mode`` (a strategy, optionally with DP)."""
    if mode in BASELINES:
        return []
    if mode.endswith(DP_SUFFIX):
        return [f"fl.strategy={mode[:-len(DP_SUFFIX)]}", "privacy=dp"]
    return [f"fl.strategy={mode}"]


# --------------------------------------------------------------------------- run and score


def run_mode(mode: str, overrides: Sequence[str], run_name: str) -> dict[str, Any]:
    """Train and test one mode; returns ``{"cfg", "run_dir", "rows", "history", "bytes",
    "site_names"}`` (``rows``: the run's own per-site table)."""
    args = [*overrides, *mode_overrides(mode), f"run_name={run_name}"]
    if mode in BASELINES:
        from m4fuse.training.baselines import run_baseline

        cfg = settings.compose("config", args)
        out = run_baseline(cfg, mode)
        return {"cfg": cfg, "run_dir": out.run_dir, "rows": out.rows, "history": out.history,
                "bytes": 0.0, "site_names": out.site_names}
    from simulations.federated import simulate

    sim = simulate(args)
    return {"cfg": sim["cfg"], "run_dir": sim["run_dir"], "rows": sim["rows"],
            "history": sim["history"], "site_names": sim["site_names"],
            "bytes": float(sim["summary"]["bytes_sent"] + sim["summary"]["bytes_received"])}


def site_models(mode: str, cfg: Any, run_dir: Path, names: Sequence[str]
                ) -> dict[str, tuple[torch.nn.Module, int | None]]:
    """Each site's final model of a finished run: ``{site: (model in eval mode, expert)}``.

    local: ``models/<site>.ckpt``; pooled and every federated strategy: ``model.ckpt`` with
    the site's personal weights (federated: as the site's final test scored them, fine-tuned
    for a "+FT" strategy where the site kept the fine-tuning).
    """
    from m4fuse.io.checkpoint import build_model, load_checkpoint

    if mode == "local":
        return {s: build_model(load_checkpoint(run_dir / "models" / f"{s}.ckpt"), s)
                for s in names}
    ckpt = load_checkpoint(run_dir / "model.ckpt")
    return {s: build_model(ckpt, s) for s in names}


def check_against_run(case_rows: Sequence[Mapping[str, Any]], run_rows: Sequence[Mapping[str, Any]]
                      ) -> dict[str, float]:
    """Per site: |mean Dice of the comparison's own per-case scores - the run's table|; nan
    for a site the run's table has no test score for (e.g. its final evaluation failed)."""
    out = {}
    for row in run_rows:
        site = str(row.get("name", row.get("site")))
        mine = [case_score(r) for r in case_rows if r["site"] == site]
        if not mine:
            continue
        theirs = row.get("test_dice_mean")
        out[site] = (abs(float(np.mean(mine)) - float(theirs))
                     if isinstance(theirs, (int, float)) else float("nan"))
    return out


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(float(value)) else None


# --------------------------------------------------------------------------- summary


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


def goals(table: Mapping[str, Any], tests: Sequence[Mapping[str, Any]], default: str,
          sites: Sequence[str], new_site: Mapping[str, Any] | None,
          fedavg: str = "fedavg") -> list[dict[str, Any]]:
    """The comparison's goals as ``{"goal", "met" (True/False/None: not measured), "detail"}``;
    ``fedavg`` names the mode that stands for FedAvg (default ``fedavg``; a merged report's
    renamed one, e.g. ``fedavg+none``)."""
    out: list[dict[str, Any]] = []

    def seeds_of(mode: str) -> set[str]:
        return set(table.get(mode, {}).get("mean", {}).get("per_seed", {}))

    def site_mean(mode: str, site: str, seeds: set[str]) -> float | None:
        # The mean over ``seeds`` (those both compared modes ran), not over all of the mode's
        # seeds: a merged report may hold one mode on more seeds than the other.
        per_seed = table.get(mode, {}).get(site, {}).get("per_seed", {})
        values = [v for seed, v in per_seed.items() if seed in seeds]
        return float(np.mean(values)) if values else None

    def over(seeds: set[str]) -> str:
        return f" (over the {len(seeds)} seed(s) both ran)" if seeds != seeds_of(default) else ""

    if default in table and "local" in table and default != "local":
        common = seeds_of(default) & seeds_of("local")
        diffs = {s: (site_mean(default, s, common), site_mean("local", s, common))
                 for s in sites}
        below = [s for s, (d, loc) in diffs.items() if d is None or loc is None or d < loc]
        out.append({"goal": f"{default} >= local on every site (mean over seeds)",
                    "met": not below,
                    "detail": ", ".join(f"{s} {d:.4f} vs {loc:.4f}" for s, (d, loc) in diffs.items()
                                        if d is not None and loc is not None)
                              + (f"; below local on {below}" if below else "") + over(common)})
    else:
        out.append({"goal": "default >= local on every site", "met": None,
                    "detail": f"needs modes {default} and local"})
    targets = [s for s in sites[2:4]]
    fed = {t["site"]: t for t in tests if t["b"] == fedavg}
    if fed and default != fedavg and targets:
        parts, met = [], True
        for s in targets:
            t = fed[s]
            ok = t["mean_diff"] is not None and t["mean_diff"] > 0 and t["p"] is not None \
                and t["p"] < 0.05
            met &= ok
            p = "n/a" if t["p"] is None else f"{t['p']:.3g}"
            parts.append(f"{s} diff {(t['mean_diff'] or 0):+.3f}, p {p}")
        out.append({"goal": f"{default} > {fedavg} on {' and '.join(targets)} with p < 0.05 "
                            "(paired, cases of the seeds both ran)", "met": met,
                    "detail": "; ".join(parts)
                              + over(seeds_of(default) & seeds_of(fedavg))})
    else:
        out.append({"goal": "default > fedavg on sites 2 and 3 with p < 0.05", "met": None,
                    "detail": f"needs modes {default} and {fedavg} and >= 3 sites"})
    common = seeds_of(default) & seeds_of("pooled")
    d, p = site_mean(default, "mean", common), site_mean("pooled", "mean", common)
    if d is not None and p is not None and p > 0:
        ratio = d / p
        out.append({"goal": f"{default} mean Dice >= 97 % of pooled (stretch 99 %)",
                    "met": ratio >= 0.97,
                    "detail": f"{d:.3f} / {p:.3f} = {100 * ratio:.1f} %"
                              + (" (stretch met)" if ratio >= 0.99 else "") + over(common)})
    else:
        out.append({"goal": "default mean Dice >= 97 % of pooled", "met": None,
                    "detail": f"needs modes {default} and pooled"})
    if new_site and "5" in new_site.get("by_k", {}):
        k5 = new_site["by_k"]["5"]
        t = k5["test"]
        p_text = "n/a" if t["p"] is None else f"{t['p']:.3g}"
        out.append({"goal": "new site: fine-tuned expert > shared model alone at k = 5",
                    "met": bool(t["mean_diff"] is not None and t["mean_diff"] > 0),
                    "detail": f"{t['mean_a']:.3f} vs {t['mean_b']:.3f}, paired p {p_text}, "
                              f"n {t['n']}"})
    else:
        out.append({"goal": "new site: fine-tuned expert > shared model alone at k = 5",
                    "met": None, "detail": "not run (--new-site-cases without 5)"})
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


# --------------------------------------------------------------------------- provenance

#: The project checkout this module runs from (its git commit is a comparison's code version).
PROJECT_DIR = Path(__file__).resolve().parents[1]
UNKNOWN = "unknown"


def code_version(root: Path = PROJECT_DIR) -> str:
    """The git commit of the checkout at ``root`` (default: this project's), with ``+dirty``
    when its tree holds uncommitted changes or untracked, not ignored files; ``unknown`` when
    ``root`` is no git checkout or git is missing. Asked of the ``git`` command itself (no
    library reads a work tree's state more simply)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    return commit + ("+dirty" if dirty else "")


def invoking_command(argv: Sequence[str] | None = None, root: Path = PROJECT_DIR) -> str:
    """The command line of this process as a user would type it: a module of the project run
    with ``python -m`` (``sys.argv[0]`` is then its file) is named by its module path, e.g.
    ``python -m simulations.compare --seeds 0,1 fl.rounds=60``; ``argv`` defaults to
    ``sys.argv``."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return UNKNOWN
    program = Path(argv[0])
    try:
        module = program.resolve().relative_to(root).with_suffix("")
        head = "python -m " + ".".join(module.parts)
    except ValueError:
        head = shlex.quote(program.name)
    return " ".join([head, *(shlex.quote(a) for a in argv[1:])])


def provenance() -> dict[str, str]:
    """Where a comparison comes from, stored in its summary: the command that made it, the
    date (UTC) and the code version (:func:`code_version`)."""
    return {"command": invoking_command(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "code_version": code_version()}


def provenance_line(summary: Mapping[str, Any]) -> str:
    """The report's provenance line; a summary written before provenance was recorded reads
    ``unknown``."""
    made = summary.get("provenance") or {}
    return (f"Made by `{made.get('command') or UNKNOWN}` on {made.get('date') or UNKNOWN}; "
            f"code version {made.get('code_version') or UNKNOWN}.")


# --------------------------------------------------------------------------- report


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


def lesion_report_lines(lesion: Mapping[str, Any] | None, modes: Sequence[str],
                        sites: Sequence[str]) -> list[str]:
    """The report's lesion-wise tables (Dice, then HD95 in mm), mean ± sd over seeds; no
    lines without lesion-wise scores."""
    if not lesion:
        return []
    lines = ["", "Lesion-wise scores (the BraTS 2023+ ranking, gli parameters: a missed lesion "
             "or a false-positive component counts Dice 0 / HD95 374 mm): per case the mean of "
             "WT, TC, ET; per site and seed the mean over its cases; mean ± sd over seeds.", ""]
    for metric, title, digits in (("dice", "lesion-wise Dice", 3), ("hd95", "lesion-wise HD95 (mm)", 1)):
        lines += [f"| {title} | " + " | ".join([*sites, "all sites"]) + " |",
                  "|" + "---|" * (len(sites) + 2)]
        for mode in modes:
            cells = []
            for s in [*sites, "mean"]:
                cell = lesion[metric][mode][s]
                text = "n/a" if cell["mean"] is None else f"{cell['mean']:.{digits}f}"
                if cell["mean"] is not None and cell["sd"] is not None:
                    text += f" ± {cell['sd']:.{digits}f}"
                cells.append(text)
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines[:-1]


def fmt(value: float | None, sd: float | None = None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if sd is None else f"{value:.3f} ± {sd:.3f}"


def merged_from_lines(summary: Mapping[str, Any]) -> list[str]:
    """For a merged comparison, one bullet per joined file: its suffix and its provenance."""
    sources = summary.get("merged_from") or []
    if not sources:
        return []
    lines = ["Joined from:", ""]
    for source in sources:
        suffix = f" (modes renamed `<mode>{source['suffix']}`)" if source.get("suffix") else ""
        lines.append(f"- `{Path(source['file']).parent.name}`{suffix}: "
                     + provenance_line({"provenance": source.get("provenance")}))
    return [*lines, ""]


def read_comparison(path: Path | str) -> dict[str, Any]:
    """A written ``comparison.json``, or its gzip-compressed copy ``comparison.json.gz`` (a
    committed results source: the per-case rows compress about sevenfold)."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return json.loads(raw)


def report_text(path: Path | str) -> str:
    """The Markdown report of a written ``comparison.json`` (what ``--report`` prints, and what
    :func:`write_report` wrote beside it as ``comparison.md``)."""
    try:
        summary = read_comparison(path)["summary"]
        return "\n".join(report_lines(str(summary["name"]), summary)) + "\n"
    except (OSError, EOFError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a readable comparison.json ({type(err).__name__}: "
                         f"{err}); give the comparison.json a comparison or a --merge "
                         "wrote") from None


def report_lines(name: str, summary: Mapping[str, Any]) -> list[str]:
    """The Markdown report of a summary."""
    modes, sites, seeds = summary["modes"], summary["sites"], summary["seeds"]
    table = summary["by_site"]
    lines = [f"# Comparison {name}", "", provenance_line(summary), "",
             f"Seeds {seeds}; modes {modes}; default strategy `{summary['default_strategy']}`; "
             f"budget {summary['budget']['rounds']} rounds x {summary['budget']['local_epochs']} "
             f"local epochs; overrides `{' '.join(summary['overrides']) or 'none'}`.",
             f"Test cases per site and seed: {summary['test_cases']}. Scores: per case the mean "
             "Dice of WT, TC, ET on the original grid; per site and seed the mean over its "
             "cases; below, mean ± sd over seeds.", "",
             *merged_from_lines(summary),
             "| mode | " + " | ".join([*sites, "all sites"]) + " |",
             "|" + "---|" * (len(sites) + 2)]
    for mode in modes:
        cells = [fmt(table[mode][s]["mean"], table[mode][s]["sd"]) for s in [*sites, "mean"]]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    lines += lesion_report_lines(summary.get("by_site_lesion"), modes, sites)
    lines += ["", "Wall time per mode and seed (training and the run's own test; then the "
              "comparison's scoring):", ""]
    for mode in modes:
        parts = [f"seed {s}: {summary['seconds'][mode][str(s)]['run']:.0f} s + "
                 f"{summary['seconds'][mode][str(s)]['scoring']:.0f} s" for s in seeds
                 if str(s) in summary["seconds"].get(mode, {})]
        lines.append(f"- {mode}: " + ", ".join(parts))
    lines += ["", f"Paired per-case Wilcoxon signed-rank tests (two-sided, scipy) of "
              f"`{summary['default_strategy']}` (a) against each mode (b), cases of the "
              "seeds both ran (all seeds unless listed):", ""]
    if summary["tests"]:
        lines += ["| a | b | site | n | mean a | mean b | mean a-b | median a-b | p |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for t in summary["tests"]:
            p = "n/a" if t["p"] is None else f"{t['p']:.3g}"
            b = t["b"] if t["seeds"] == sorted(seeds) else \
                f"{t['b']} (seeds {', '.join(str(x) for x in t['seeds'])})"
            lines.append(f"| {t['a']} | {b} | {t['site']} | {t['n']} | {fmt(t['mean_a'])} | "
                         f"{fmt(t['mean_b'])} | {(t['mean_diff'] or 0):+.3f} | "
                         f"{(t['median_diff'] or 0):+.3f} | {p} |")
    else:
        lines.append("(none: the default strategy was run without fedavg or local)")
    lines += ["", "Goals:" if not summary.get("size_groups") else
              "Goals of a skewed federation (thresholds: `goal_thresholds` in comparison.json):",
              ""]
    for g in summary["goals"]:
        mark = {True: "[x]", False: "[ ]", None: "[-]"}[g["met"]]
        state = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
        lines.append(f"- {mark} {g['goal']}: {state}; {g['detail']}")
    bad = sorted(f"{m} seed {s}" for m, by in summary["check"].items() for s, d in by.items()
                 if d is not None and d > CHECK_TOLERANCE)
    missing = sorted(f"{m} seed {s}" for m, by in summary["check"].items()
                     for s, d in by.items() if d is None)
    known = [d for by in summary["check"].values() for d in by.values() if d is not None]
    lines += ["", "Check: the comparison's own per-case scores against each run's own table "
              f"(largest per-site difference of mean Dice: {max(known or [0.0]):.4f})"
              + (f"; MISMATCH above {CHECK_TOLERANCE} in {bad}" if bad else "")
              + (f"; the run's own table lacks a site's test score in {missing}"
                 if missing else "")
              + ("; agree" if not bad and not missing else "") + "."]
    if summary["crosssite"]:
        lines += ["", "Cross-site matrix (mean test Dice over the seeds; row: whose model, "
                  "column: whose test cases; `crosssite.png`):"]
        for mode, m in summary["crosssite"].items():
            values = np.array([[np.nan if v is None else v for v in row] for row in m["values"]])
            lines += ["", f"{mode}:", "", matrix_markdown(m["model_sites"], m["sites"], values)]
    if summary.get("new_site"):
        ns = summary["new_site"]
        lines += ["", f"New site {ns['site']} (never trained; {ns['train_cases']} training, "
                  f"{ns['test_cases']} test cases; fine-tuned {ns['epochs']} epochs on k cases, "
                  "shared weights frozen), joined to the default strategy's model "
                  f"(`{Path(ns['models'][0]).name}`"
                  + (": the server's shared weights with the initial values of the layers "
                     "the strategy keeps at each site, which the new site fine-tunes"
                     if Path(ns["models"][0]).name == "federation.ckpt" else "")
                  + "), cases of all seeds:", "",
                  "| k | shared alone | fine-tuned | mean diff | p | n | frozen unchanged |",
                  "|---|---|---|---|---|---|---|"]
        for k, v in ns["by_k"].items():
            t = v["test"]
            p = "n/a" if t["p"] is None else f"{t['p']:.3g}"
            lines.append(f"| {k} | {fmt(t['mean_b'])} | {fmt(t['mean_a'])} | "
                         f"{(t['mean_diff'] or 0):+.3f} | {p} | {t['n']} | "
                         f"{v['frozen_unchanged']} |")
    lines += skewed.report_lines(summary)  # training cases, steps, size groups
    if summary.get("convergence"):
        lines += ["", "Validation mean Dice of the last rounds:", "", *summary["convergence"]]
    return lines


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


def plot(table: Mapping[str, Any], modes: Sequence[str], sites: Sequence[str], path: Path) -> Path:
    """Bars of mean test Dice per site (and all sites) and mode, error bars sd over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [*sites, "mean"]
    width = 0.8 / max(len(modes), 1)
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(columns))
    for i, mode in enumerate(modes):
        means = [table[mode][c]["mean"] if table[mode][c]["mean"] is not None else np.nan
                 for c in columns]
        sds = [table[mode][c]["sd"] if table[mode][c]["sd"] is not None else 0.0
               for c in columns]
        ax.bar(x + i * width, means, width, yerr=sds, capsize=2, label=mode)
    ax.set_xticks(x + 0.4 - width / 2, [*sites, "all sites"])
    ax.set_ylabel("test Dice (mean of WT, TC, ET)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- driver


@dataclass
class _Plan:
    """What :func:`run_compare` runs: the resolved modes, seeds and options."""

    base: Any
    default: str
    name: str
    overrides: list[str]
    modes: list[str]
    seeds: list[int]
    crosssite: list[str]
    new_site_cases: list[int | str]
    new_site_epochs: int
    #: name -> (mode, its own overrides) of ``--modes`` entries with overrides
    specs: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    #: the goal thresholds (:func:`simulations.skewed.load_goals`)
    goals: dict[str, Any] = field(default_factory=lambda: dict(skewed.DEFAULT_GOALS))


@dataclass
class _Collected:
    """What the runs of a comparison gather, mode by mode and seed by seed."""

    modes: list[str]
    crosssite: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    cross_rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seconds: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    check: dict[str, dict[str, float | None]] = field(default_factory=dict)
    histories: dict[str, dict[str, Any]] = field(default_factory=dict)
    new_site_results: list[dict[str, Any]] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)
    test_cases: dict[str, dict[str, int]] = field(default_factory=dict)
    bytes_by_mode: dict[str, list[float]] = field(default_factory=dict)
    #: seed -> {site: training cases as trained}; mode -> {site: optimiser steps}
    train_cases: dict[str, dict[str, int]] = field(default_factory=dict)
    steps: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cross_rows = {m: [] for m in self.crosssite}
        self.seconds = {m: {} for m in self.modes}
        self.check = {m: {} for m in self.modes}
        self.bytes_by_mode = {m: [] for m in self.modes}


def _plan(overrides: Sequence[str], modes: Sequence[str] | None, seeds: Sequence[int] | None,
          crosssite: Sequence[str] | None, new_site_cases: Sequence[int | str],
          new_site_epochs: int, goals_file: str | Path | None = None) -> _Plan:
    """The arguments of :func:`run_compare` resolved and checked (a bad new-site k fails
    here, before any training)."""
    base = settings.compose("config", list(overrides))
    default = str(base.fl.strategy)
    name = str(base.run_name) if base.run_name else "compare"
    overrides = [o for o in overrides
                 if not o.lstrip("+~").startswith(("run_name=", "fl.strategy=", "seed="))]
    if modes is None:
        modes = list(dict.fromkeys(["pooled", "local", "fedavg", default]))
    specs = mode_specs(modes)
    modes = check_modes(modes)
    goals = skewed.load_goals(goals_file)
    seeds = [int(base.seed)] if not seeds else [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds repeats a seed: {seeds}")
    if crosssite is None:
        crosssite = [m for m in dict.fromkeys([default, "local"]) if m in modes]
    bad = [m for m in crosssite if m not in modes]
    if bad:
        raise ValueError(f"--crosssite: {bad} are not among --modes {modes}")
    new_site_cases = list(new_site_cases) if default in modes else []
    if new_site_cases:
        from m4fuse.personal.new_site import check_cases
        from simulations.new_site import new_site_split

        site, records, _ = new_site_split([*overrides, f"seed={seeds[0]}"])
        for k in new_site_cases:  # bad k fail here, before any training
            check_cases(k, len(records["train"]), site)
    return _Plan(base, default, name, list(overrides), list(modes), seeds, list(crosssite),
                 new_site_cases, new_site_epochs,
                 {n: v for n, v in specs.items() if v[1] or v[0] != n}, goals)


def _new_site_result(plan: _Plan, run: Mapping[str, Any], seed: int,
                     seed_overrides: Sequence[str]) -> dict[str, Any] | None:
    """The held-out site joined to the default strategy's model of this run (None when the
    run left no federation checkpoint to join)."""
    from simulations.new_site import evaluate_new_site, federation_checkpoint

    model_file = federation_checkpoint(Path(run["run_dir"]), run["cfg"])
    if model_file is None:
        return None
    return evaluate_new_site(
        seed_overrides, model_file, plan.new_site_cases, plan.new_site_epochs,
        out_dir=Path(run["run_dir"]) / "new_site", label={"seed": seed})


def _run_and_score(plan: _Plan, got: _Collected, mode: str, seed: int) -> None:
    """Run ``mode`` at ``seed``, score its models on every site's test cases (and the
    cross-site matrix, the new site), and add what it gives to ``got``."""
    base_mode, extra = plan.specs.get(mode, (mode, []))  # a named mode with its overrides
    seed_overrides = [*plan.overrides, *extra, f"seed={seed}"]
    start = time.perf_counter()
    run = run_mode(base_mode, seed_overrides, f"{plan.name}-{mode}-seed{seed}")
    trained = time.perf_counter() - start
    cfg, names = run["cfg"], list(run["site_names"])
    got.sites = got.sites or names
    split = provision.load_sites(cfg)
    got.test_cases[str(seed)] = {s: len(split[s]["test"]) for s in names}
    got.train_cases.setdefault(str(seed), {s: len(split[s]["train"]) for s in names})
    got.steps.setdefault(mode, skewed.steps_of_history(run["history"], names))  # first seed
    device = runtime.resolve_device(str(cfg.device))
    runtime.apply_threads(cfg)
    models = site_models(base_mode, cfg, Path(run["run_dir"]), names)
    mode_rows = []
    for site, (model, expert) in models.items():
        for r in score_cases(model, expert, split[site]["test"], device):
            mode_rows.append({"mode": mode, "seed": seed, "site": site, **r})
    got.rows += mode_rows
    diffs = list(check_against_run(mode_rows, run["rows"]).values())
    # nan (a site without the run's own score) wins: the check then reads "missing"
    got.check[mode][str(seed)] = (None if not diffs or any(np.isnan(diffs))
                                  else float(max(diffs)))
    if mode in plan.crosssite:
        for r in score_matrix_rows(models, split, names, device, mode_rows):
            got.cross_rows[mode].append({"seed": seed, **r})
    if mode == plan.default and plan.new_site_cases:
        result = _new_site_result(plan, run, seed, seed_overrides)
        if result is not None:
            got.new_site_results.append(result)
    scoring = time.perf_counter() - start - trained
    got.seconds[mode][str(seed)] = {"run": trained, "scoring": scoring}
    got.bytes_by_mode[mode].append(run["bytes"])
    got.histories[f"{mode} seed {seed}"] = {"history": run["history"]}
    print(f"[compare] {mode} seed {seed}: run {trained:.0f} s, scoring {scoring:.0f} s",
          flush=True)


def run_compare(overrides: Sequence[str] = (), modes: Sequence[str] | None = None,
                seeds: Sequence[int] | None = None, crosssite: Sequence[str] | None = None,
                new_site_cases: Sequence[int | str] = (2, 5, "all"), new_site_epochs: int = 20,
                goals_file: str | Path | None = None) -> Path:
    """Run ``modes`` x ``seeds`` and write the report; returns ``comparison.json``'s path.

    Args:
        overrides: Hydra overrides for every run (``seed``, ``run_name`` and ``fl.strategy``
            are taken from them for the defaults, then replaced per run).
        modes: default ``pooled, local, fedavg`` and the default strategy.
        seeds: default the config's ``seed``.
        crosssite: modes whose cross-site matrix is scored; default the default strategy and
            ``local`` (those of them that run).
        new_site_cases: k for the held-out site (:mod:`simulations.new_site`), joined to the
            default strategy's model of every seed
            (:func:`simulations.new_site.federation_checkpoint`); empty: skipped (also when
            the default strategy is not run or shares nothing).
        new_site_epochs: fine-tuning epochs of the new site (default 20).
        goals_file: JSON/YAML goal thresholds of a skewed federation (default None:
            :data:`simulations.skewed.DEFAULT_GOALS`).
    """
    return run_plan(_plan(overrides, modes, seeds, crosssite, new_site_cases, new_site_epochs,
                          goals_file))


def run_plan(plan: _Plan) -> Path:
    """Run a checked plan (:func:`_plan`) and write the report; returns ``comparison.json``'s
    path."""
    base, name = plan.base, plan.name
    out = workspace.project_root(base) / "runs" / name
    out.mkdir(parents=True, exist_ok=True)
    got = _Collected(plan.modes, plan.crosssite)
    for seed in plan.seeds:
        for mode in plan.modes:
            _run_and_score(plan, got, mode, seed)
    summary = summarise(
        name=name, default=plan.default, modes=plan.modes, seeds=plan.seeds, sites=got.sites,
        overrides=list(plan.overrides), test_cases=got.test_cases,
        budget={"rounds": int(base.fl.rounds), "local_epochs": int(base.fl.local_epochs)},
        rows=got.rows, cross_rows=got.cross_rows, new_site=pool_new_site(got.new_site_results),
        seconds=got.seconds, bytes_by_mode=got.bytes_by_mode, check=got.check,
        convergence=convergence_lines(got.histories),
        train_cases=got.train_cases.get(str(plan.seeds[0]), {}), steps=got.steps,
        goal_thresholds=plan.goals)
    if any(v != summary["train_cases"] for v in got.train_cases.values()):
        summary["train_cases_by_seed"] = got.train_cases  # the seeds' splits differ in size
    for mode in plan.modes:  # the time per mode, all seeds
        total = sum(v["run"] + v["scoring"] for v in got.seconds[mode].values())
        print(f"[compare] {mode}: {total:.0f} s over {len(got.seconds[mode])} seed(s)",
              flush=True)
    json_path, artifacts = write_report(out, summary, got.rows, got.cross_rows,
                                        summary.pop("_new_site_rows"))
    log_tracking(base, name, summary, artifacts)
    return json_path


def summarise(*, name: str, default: str, modes: Sequence[str], seeds: Sequence[int],
              sites: Sequence[str], overrides: Sequence[str], test_cases: Mapping[str, Any],
              budget: Mapping[str, int], rows: Sequence[Mapping[str, Any]],
              cross_rows: Mapping[str, Sequence[Mapping[str, Any]]],
              new_site: Mapping[str, Any] | None, seconds: Mapping[str, Any],
              bytes_by_mode: Mapping[str, Any], check: Mapping[str, Any],
              convergence: Sequence[str], against: Sequence[str] = (),
              fedavg: str = "fedavg", train_cases: Mapping[str, int] | None = None,
              steps: Mapping[str, Any] | None = None,
              goal_thresholds: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The comparison's summary from its per-case rows: the table of mean +- sd over seeds,
    the paired tests of the default strategy (against ``fedavg``, the mode standing for
    FedAvg, local and ``against``), the goals and the cross-site matrices (the new site's
    per-case rows ride along under ``_new_site_rows`` for :func:`write_report`). With
    ``train_cases`` ({site: training cases}, default none), ``steps`` (mode -> site ->
    optimiser steps) and ``goal_thresholds`` (default
    :data:`simulations.skewed.DEFAULT_GOALS`): those, and for sites of different sizes the
    size groups, their tests and the goals of a skewed federation in place of the equal-site
    goals (:func:`simulations.skewed.skew_summary`)."""
    table = site_table(rows, modes, seeds, sites)
    others = [m for m in dict.fromkeys([fedavg, "local", *against])
              if m in modes and m != default]
    tests = paired_tests(rows, default, others, sites) if default in modes else []
    crossdata = {}
    for mode, crows in cross_rows.items():
        ms, ts, values = matrix(crows)
        crossdata[mode] = {"model_sites": ms, "sites": ts,
                           "values": [[_finite(v) for v in row] for row in values]}
    return {
        "name": name, "default_strategy": default, "modes": list(modes), "seeds": list(seeds),
        "sites": list(sites), "overrides": list(overrides), "test_cases": dict(test_cases),
        "budget": dict(budget),
        "score": "per case: mean of dice_wt, dice_tc, dice_et",
        "by_site": table, "tests": tests,
        "by_site_lesion": lesion_tables(rows, modes, seeds, sites),
        "goals": goals(table, tests, default, sites, new_site, fedavg),
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


def write_report(out: Path, summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                 cross_rows: Mapping[str, Sequence[Mapping[str, Any]]],
                 new_site_rows: Sequence[Mapping[str, Any]]) -> tuple[Path, list[Path]]:
    """Write ``comparison.json``, ``comparison.md``, ``comparison.png`` (and ``crosssite.png``
    when there are matrices) into ``out``; returns the JSON's path and every file written."""
    out.mkdir(parents=True, exist_ok=True)
    json_rows = [{k: (_finite(r[k]) if k in SCORE_KEYS else r[k]) for k in ROW_KEYS}
                 | {k: _finite(r[k]) for k in LESION_CASE_KEYS if k in r} for r in rows]
    payload = {"rows": json_rows, "summary": summary,
               "crosssite_rows": [{k: (_finite(v) if k in SCORE_KEYS else v)
                                   for k, v in {"mode": m, **r}.items()}
                                  for m, crows in cross_rows.items() for r in crows],
               "new_site_rows": [{k: (_finite(v) if k in SCORE_KEYS else v)
                                  for k, v in r.items()} for r in new_site_rows]}
    json_path = out / "comparison.json"
    json_path.write_text(json.dumps(payload, indent=1))
    text = "\n".join(report_lines(str(summary["name"]), summary)) + "\n"
    md = out / "comparison.md"
    md.write_text(text)
    png = plot(summary["by_site"], summary["modes"], summary["sites"], out / "comparison.png")
    artifacts = [json_path, md, png]
    crossdata = summary["crosssite"]
    if crossdata:
        artifacts.append(heatmap({f"{m}: site model x test site": (
            d["model_sites"], d["sites"],
            np.array([[np.nan if v is None else v for v in row] for row in d["values"]]))
            for m, d in crossdata.items()}, out / "crosssite.png"))
    print(text, flush=True)
    return json_path, artifacts


def _load_mergeable(paths: Sequence[Path | str]) -> tuple[list[tuple[Path, dict[str, Any]]],
                                                          list[dict[str, Any]]]:
    """The comparisons of ``--merge`` loaded (a ``#SUFFIX`` renames that file's modes) and
    checked to agree (:func:`merge_comparisons`); with their sources for ``merged_from``."""
    if len(paths) < 2:
        raise ValueError(f"--merge needs at least two comparison.json files, got {list(paths)}")
    loaded = []
    sources = []
    for entry in paths:
        path, _, suffix = str(entry).partition("#")
        try:
            payload = read_comparison(path)
        except (OSError, EOFError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read comparison {path}: {err}") from None
        if suffix:
            payload = _rename_modes(payload, suffix)
        loaded.append((Path(path), payload))
        sources.append({"file": path, "suffix": suffix,
                        "overrides": payload["summary"]["overrides"],
                        "provenance": payload["summary"].get("provenance")})
    first_path, first = loaded[0]
    for (path, payload), source in zip(loaded[1:], sources[1:]):
        same = ("budget", "sites") if source["suffix"] else (
            "default_strategy", "budget", "sites", "overrides")
        for key in same:
            if payload["summary"][key] != first["summary"][key]:
                raise ValueError(f"cannot merge {path} with {first_path}: summary.{key} differs "
                                 f"({payload['summary'][key]!r} vs {first['summary'][key]!r})")
    return loaded, sources


def _merged_modes_and_seeds(loaded: Sequence[tuple[Path, Mapping[str, Any]]]
                            ) -> tuple[list[str], set[int]]:
    """The modes (first-seen order) and seeds of the loaded comparisons; a (mode, seed) held by
    two files is refused, naming both."""
    modes: list[str] = []
    seeds: set[int] = set()
    seen: dict[tuple[str, int], Path] = {}
    for path, payload in loaded:
        s = payload["summary"]
        modes += [m for m in s["modes"] if m not in modes]
        for mode in s["modes"]:
            for seed in s["seeds"]:
                if (mode, seed) in seen:
                    raise ValueError(f"{mode} seed {seed} is in both {seen[(mode, seed)]} and "
                                     f"{path}")
                seen[(mode, seed)] = path
        seeds.update(int(x) for x in s["seeds"])
    return modes, seeds


def merge_comparisons(paths: Sequence[Path | str], out: Path, name: str,
                      default: str | None = None, against: Sequence[str] = (),
                      fedavg: str = "fedavg") -> Path:
    """One comparison from several ``comparison.json`` (e.g. seed 0 of one run and seeds 1, 2
    of another): their per-case rows, cross-site rows, new-site rows, wall times and checks
    are joined and the summary (table, tests, goals) is computed again from the joined rows.

    A path may end in ``#SUFFIX`` (e.g. ``runs/m/comparison.json#+fedavgm``): that file's
    modes are renamed ``<mode>SUFFIX`` and its overrides may differ from the first file's
    (each file's overrides are kept in ``summary.merged_from``); the budget and the sites
    must still agree. Without a suffix, files whose default strategy, budget, sites or
    overrides differ are refused, as are two files holding the same (mode, seed). ``default``
    (default: the first file's default strategy) is the mode the report tests against fedavg
    and local, and also against the modes ``against``; ``fedavg`` (default ``fedavg``) is the
    mode that stands for FedAvg there and in the goals (e.g. ``fedavg+none`` when the FedAvg
    runs carry a suffix). A mode that ran on only some seeds is reported with its ``n_seeds``. Returns
    the merged ``comparison.json``'s path."""
    loaded, sources = _load_mergeable(paths)
    modes, seeds = _merged_modes_and_seeds(loaded)
    first = loaded[0][1]
    rows = [r for _, p in loaded for r in p["rows"]]
    for r in rows:
        for k in SCORE_KEYS:
            r[k] = float("nan") if r[k] is None else r[k]
    cross_rows: dict[str, list[dict[str, Any]]] = {}
    for _, p in loaded:
        for r in p.get("crosssite_rows", []):
            r = dict(r)
            cross_rows.setdefault(r.pop("mode"), []).append(
                {k: (float("nan") if k in SCORE_KEYS and v is None else v) for k, v in r.items()})
    new_site_results = [
        {**p["summary"]["new_site"], "model": p["summary"]["new_site"]["models"][0],
         "rows": p.get("new_site_rows", [])}
        for _, p in loaded if p["summary"].get("new_site")]

    def joined(key: str) -> dict[str, Any]:
        out_: dict[str, Any] = {}
        for _, p in loaded:
            for mode, value in p["summary"][key].items():
                if isinstance(value, dict):
                    out_.setdefault(mode, {}).update(value)
                else:
                    out_.setdefault(mode, []).extend(value)
        return out_

    default = default or first["summary"]["default_strategy"]
    if default not in modes:
        raise ValueError(f"--default {default!r} is not among the merged modes {modes}")
    if fedavg != "fedavg" and fedavg not in modes:
        raise ValueError(f"--fedavg {fedavg!r} is not among the merged modes {modes}")
    summary = summarise(
        name=name, default=default, modes=modes,
        seeds=sorted(seeds), sites=first["summary"]["sites"],
        overrides=first["summary"]["overrides"],
        test_cases={k: v for _, p in loaded for k, v in p["summary"]["test_cases"].items()},
        budget=first["summary"]["budget"], rows=rows, cross_rows=cross_rows,
        new_site=merge_new_site(new_site_results), seconds=joined("seconds"),
        bytes_by_mode=joined("bytes"), check=joined("check"),
        convergence=[line for _, p in loaded for line in p["summary"]["convergence"]],
        against=against, fedavg=fedavg,
        train_cases=first["summary"].get("train_cases"),
        steps={m: v for _, p in loaded for m, v in p["summary"].get("steps", {}).items()},
        goal_thresholds=first["summary"].get("goal_thresholds"))
    summary["merged_from"] = sources
    json_path, _ = write_report(out, summary, rows, cross_rows, summary.pop("_new_site_rows"))
    return json_path


def _rename_modes(payload: dict[str, Any], suffix: str) -> dict[str, Any]:
    """``payload`` (a loaded ``comparison.json``) with every mode ``m`` renamed ``m+suffix``:
    in its rows, cross-site rows, and the summary's modes, wall times, bytes and checks."""
    s = dict(payload["summary"])
    renamed = {m: f"{m}{suffix}" for m in s["modes"]}
    s["modes"] = [renamed[m] for m in s["modes"]]
    for key in ("seconds", "bytes", "check"):
        s[key] = {renamed.get(m, m): v for m, v in s[key].items()}
    if "steps" in s:
        s["steps"] = {renamed.get(m, m): v for m, v in s["steps"].items()}
    s["convergence"] = [f"{line} ({suffix})" for line in s["convergence"]]
    return {**payload, "summary": s,
            "rows": [{**r, "mode": renamed.get(r["mode"], r["mode"])} for r in payload["rows"]],
            "crosssite_rows": [{**r, "mode": renamed.get(r["mode"], r["mode"])}
                               for r in payload.get("crosssite_rows", [])]}


def merge_new_site(results: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The new-site results of merged comparisons: per k the per-case test over all their
    rows (:func:`pool_new_site` on results whose ``by_k`` already pools several seeds)."""
    if not results:
        return None
    per_k = [{**r, "by_k": {k: {"seconds": sum(v["seconds"]) if isinstance(v["seconds"], list)
                                else v["seconds"], "frozen_unchanged": v["frozen_unchanged"]}
                            for k, v in r["by_k"].items()}} for r in results]
    pooled = pool_new_site(per_k)
    pooled["models"] = [m for r in results for m in r["models"]]
    return pooled


def score_matrix_rows(models: Mapping[str, tuple[torch.nn.Module, int | None]], split: Mapping,
                      names: Sequence[str], device: torch.device,
                      own_rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The cross-site rows of one run: each site's model on the other sites' test cases (the
    diagonal reuses ``own_rows``, the run's per-case scores at home)."""
    out = [{"model_site": r["site"], **{k: v for k, v in r.items() if k not in ("mode", "seed")}}
           for r in own_rows]
    for model_site, (model, expert) in models.items():
        for site in names:
            if site != model_site:
                out += [{"model_site": model_site, "site": site, **r}
                        for r in score_cases(model, expert, split[site]["test"], device)]
    return out


def log_tracking(cfg: Any, name: str, summary: Mapping[str, Any], artifacts: Sequence[Path]
                 ) -> None:
    """One MLflow run of the comparison: mean test Dice per mode and site, and the files."""
    from m4fuse.run.tracking import Tracker

    tracker = Tracker(cfg, name, tags={"kind": "comparison"})
    metrics = {}
    for mode, by_site in summary["by_site"].items():
        for site, v in by_site.items():
            if v["mean"] is not None:
                metrics[f"{mode}/{site}/test_dice_mean"] = float(v["mean"])
    tracker.log_metrics(metrics, step=0)
    for path in artifacts:
        tracker.log_artifact(path)
    tracker.finish()


def _list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.compare",
        description="Run pooled, local and federated modes on several seeds and compare them "
                    "case by case (mean ± sd over seeds, paired Wilcoxon tests, cross-site "
                    "matrix, a held-out new site). Writes comparison.{md,png,json} and "
                    "crosssite.png into <root>/runs/<run_name or 'compare'>/.",
        epilog="Example: python -m simulations.compare --seeds 0,1,2 --modes "
               "pooled,local,fedavg,personal fl.rounds=10")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated seeds (default: the config's seed)")
    parser.add_argument("--modes", default=None,
                        help="comma-separated modes: pooled, local, any fl.strategy, or "
                             "<strategy>-dp (default: pooled,local,fedavg and the default "
                             "strategy); NAME=MODE:OVERRIDE[;OVERRIDE...] runs MODE with "
                             "those Hydra overrides as NAME, e.g. "
                             "steps4=personal-norm-ft:fl.local_steps=4")
    parser.add_argument("--goals", default=None,
                        help="JSON or YAML file of goal thresholds of a skewed federation "
                             "(keys of simulations.skewed.DEFAULT_GOALS; default: those)")
    parser.add_argument("--crosssite", default=None,
                        help="modes whose cross-site matrix is scored, or 'none' (default: the "
                             "default strategy and local)")
    parser.add_argument("--new-site-cases", default="2,5,all",
                        help="k training cases of the held-out new site joined to the default "
                             "strategy's model, or 'none' (default 2,5,all)")
    parser.add_argument("--new-site-epochs", type=int, default=20,
                        help="fine-tuning epochs of the new site (default 20)")
    parser.add_argument("--merge", default=None,
                        help="comma-separated comparison.json files of the same settings to "
                             "join into one report (no training; e.g. seed 0 of one run and "
                             "seeds 1,2 of another); FILE#SUFFIX renames that file's modes "
                             "<mode>SUFFIX and lets its overrides differ (e.g. "
                             "runs/m/comparison.json#+fedavgm); written to <root>/runs/"
                             "<run_name or 'merged'>/")
    parser.add_argument("--report", default=None, metavar="PATH",
                        help="print the Markdown report of a written comparison.json (e.g. "
                             "runs/X/comparison.json) to stdout and exit: no training, no "
                             "files written; the report starts with the command, date and "
                             "code version that made it")
    parser.add_argument("--default", default=None,
                        help="with --merge: the mode tested against fedavg and local (default: "
                             "the first file's default strategy)")
    parser.add_argument("--against", default="",
                        help="with --merge: comma-separated modes the default is also tested "
                             "against (besides fedavg and local)")
    parser.add_argument("--fedavg", default="fedavg",
                        help="with --merge: the mode that stands for FedAvg in the tests and "
                             "goals (default fedavg; e.g. fedavg+none when its files carry a "
                             "suffix)")
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides for every run, e.g. fl.rounds=10 data.sites=4")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; flags and Hydra overrides may come in any order (``--seeds 0
    fl.rounds=60 --modes fedavg run_name=x``: a plain ``parse_args`` stops the overrides at
    the first flag and refuses the rest)."""
    return build_parser().parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m simulations.compare [--seeds 0,1,2] [--modes a,b] [hydra overrides...]``."""
    from m4fuse.run.config_check import debug_enabled
    from simulations.new_site import parse_cases

    args = parse_args(argv)
    if args.report:
        try:
            sys.stdout.write(report_text(args.report))
        except ValueError as err:
            raise SystemExit(f"--report: {err}") from None
        return 0
    if args.merge:
        base = settings.compose("config", list(args.overrides))
        name = str(base.run_name) if base.run_name else "merged"
        try:
            merge_comparisons(_list(args.merge), workspace.project_root(base) / "runs" / name,
                              name, default=args.default, against=_list(args.against),
                              fedavg=args.fedavg)
        except ValueError as err:
            raise SystemExit(f"--merge: {err}") from None
        return 0
    try:
        seeds = [int(s) for s in _list(args.seeds)] if args.seeds else None
    except ValueError:
        raise SystemExit(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    modes = _list(args.modes) if args.modes else None
    crosssite = None if args.crosssite is None else (
        [] if args.crosssite == "none" else _list(args.crosssite))
    cases = [] if args.new_site_cases in ("", "none") else parse_cases(args.new_site_cases)
    try:  # every setting, the goals file and the new site are checked before any training
        plan = _plan(args.overrides, modes, seeds, crosssite, cases, args.new_site_epochs,
                     args.goals)
    except (ValueError, FileNotFoundError) as err:
        if debug_enabled():
            raise
        raise SystemExit(f"simulations.compare: error: {str(err).strip().splitlines()[0]}"
                         ) from None
    run_plan(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
