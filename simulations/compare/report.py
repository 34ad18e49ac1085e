"""The comparison's report: ``comparison.md`` (Markdown, also printed again from a written
``comparison.json`` by ``--report``), ``comparison.png`` (mean +- sd per site and mode),
``crosssite.png`` and ``comparison.json`` itself."""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from m4fuse.evaluation.crosssite import LESION_CASE_KEYS, SCORE_KEYS, heatmap
from m4fuse.evaluation.crosssite import markdown as matrix_markdown
from simulations.compare import skewed
from simulations.compare.provenance import provenance_line
from simulations.compare.summary import finite_or_none

ROW_KEYS: tuple[str, ...] = ("mode", "seed", "site", "case", *SCORE_KEYS)
#: A difference of a site's mean test Dice between the comparison's own scoring and the run's
#: table above this is reported as a mismatch.
CHECK_TOLERANCE = 2e-3


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


def _table_lines(name: str, summary: Mapping[str, Any]) -> list[str]:
    """The report's head (title, provenance, settings, joined files) and its table of mean
    ± sd over seeds per mode and site."""
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
    return lines


def _seconds_lines(summary: Mapping[str, Any]) -> list[str]:
    """The wall time per mode and seed."""
    lines = ["", "Wall time per mode and seed (training and the run's own test; then the "
             "comparison's scoring):", ""]
    for mode in summary["modes"]:
        parts = [f"seed {s}: {summary['seconds'][mode][str(s)]['run']:.0f} s + "
                 f"{summary['seconds'][mode][str(s)]['scoring']:.0f} s" for s in summary["seeds"]
                 if str(s) in summary["seconds"].get(mode, {})]
        lines.append(f"- {mode}: " + ", ".join(parts))
    return lines


def _tests_lines(summary: Mapping[str, Any]) -> list[str]:
    """The paired per-case Wilcoxon tests of the default strategy."""
    lines = ["", f"Paired per-case Wilcoxon signed-rank tests (two-sided, scipy) of "
             f"`{summary['default_strategy']}` (a) against each mode (b), cases of the "
             "seeds both ran (all seeds unless listed):", ""]
    if not summary["tests"]:
        return [*lines, "(none: the default strategy was run without fedavg or local)"]
    lines += ["| a | b | site | n | mean a | mean b | mean a-b | median a-b | p |",
              "|---|---|---|---|---|---|---|---|---|"]
    for t in summary["tests"]:
        p = "n/a" if t["p"] is None else f"{t['p']:.3g}"
        b = t["b"] if t["seeds"] == sorted(summary["seeds"]) else \
            f"{t['b']} (seeds {', '.join(str(x) for x in t['seeds'])})"
        lines.append(f"| {t['a']} | {b} | {t['site']} | {t['n']} | {fmt(t['mean_a'])} | "
                     f"{fmt(t['mean_b'])} | {(t['mean_diff'] or 0):+.3f} | "
                     f"{(t['median_diff'] or 0):+.3f} | {p} |")
    return lines


def _goal_lines(summary: Mapping[str, Any]) -> list[str]:
    """The goals, each met / NOT met / not measured with its numbers."""
    lines = ["", "Goals:" if not summary.get("size_groups") else
             "Goals of a skewed federation (thresholds: `goal_thresholds` in comparison.json):",
             ""]
    for g in summary["goals"]:
        mark = {True: "[x]", False: "[ ]", None: "[-]"}[g["met"]]
        state = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
        lines.append(f"- {mark} {g['goal']}: {state}; {g['detail']}")
    return lines


def _check_lines(summary: Mapping[str, Any]) -> list[str]:
    """The check of the comparison's own scores against each run's own table."""
    bad = sorted(f"{m} seed {s}" for m, by in summary["check"].items() for s, d in by.items()
                 if d is not None and d > CHECK_TOLERANCE)
    missing = sorted(f"{m} seed {s}" for m, by in summary["check"].items()
                     for s, d in by.items() if d is None)
    known = [d for by in summary["check"].values() for d in by.values() if d is not None]
    return ["", "Check: the comparison's own per-case scores against each run's own table "
            f"(largest per-site difference of mean Dice: {max(known or [0.0]):.4f})"
            + (f"; MISMATCH above {CHECK_TOLERANCE} in {bad}" if bad else "")
            + (f"; the run's own table lacks a site's test score in {missing}"
               if missing else "")
            + ("; agree" if not bad and not missing else "") + "."]


def _crosssite_lines(summary: Mapping[str, Any]) -> list[str]:
    """The cross-site matrices (none: no lines)."""
    if not summary["crosssite"]:
        return []
    lines = ["", "Cross-site matrix (mean test Dice over the seeds; row: whose model, "
             "column: whose test cases; `crosssite.png`):"]
    for mode, m in summary["crosssite"].items():
        values = np.array([[np.nan if v is None else v for v in row] for row in m["values"]])
        lines += ["", f"{mode}:", "", matrix_markdown(m["model_sites"], m["sites"], values)]
    return lines


def _new_site_lines(summary: Mapping[str, Any]) -> list[str]:
    """The held-out new site's table (not run: no lines)."""
    if not summary.get("new_site"):
        return []
    ns = summary["new_site"]
    lines = ["", f"New site {ns['site']} (never trained; {ns['train_cases']} training, "
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
    return lines


def report_lines(name: str, summary: Mapping[str, Any]) -> list[str]:
    """The Markdown report of a summary."""
    lines = [*_table_lines(name, summary),
             *lesion_report_lines(summary.get("by_site_lesion"), summary["modes"],
                                  summary["sites"]),
             *_seconds_lines(summary), *_tests_lines(summary), *_goal_lines(summary),
             *_check_lines(summary), *_crosssite_lines(summary), *_new_site_lines(summary),
             *skewed.report_lines(summary)]  # training cases, steps, size groups
    if summary.get("convergence"):
        lines += ["", "Validation mean Dice of the last rounds:", "", *summary["convergence"]]
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


def write_report(out: Path, summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                 cross_rows: Mapping[str, Sequence[Mapping[str, Any]]],
                 new_site_rows: Sequence[Mapping[str, Any]]) -> tuple[Path, list[Path]]:
    """Write ``comparison.json``, ``comparison.md``, ``comparison.png`` (and ``crosssite.png``
    when there are matrices) into ``out``; returns the JSON's path and every file written."""
    out.mkdir(parents=True, exist_ok=True)
    json_rows = [{k: (finite_or_none(r[k]) if k in SCORE_KEYS else r[k]) for k in ROW_KEYS}
                 | {k: finite_or_none(r[k]) for k in LESION_CASE_KEYS if k in r} for r in rows]
    payload = {"rows": json_rows, "summary": summary,
               "crosssite_rows": [{k: (finite_or_none(v) if k in SCORE_KEYS else v)
                                   for k, v in {"mode": m, **r}.items()}
                                  for m, crows in cross_rows.items() for r in crows],
               "new_site_rows": [{k: (finite_or_none(v) if k in SCORE_KEYS else v)
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

