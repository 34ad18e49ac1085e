"""The privacy-utility curve: test Dice against the ε each site spent, from comparisons that ran
DP and non-DP modes side by side.

``python -m simulations.privacy_curve --collect runs/A/comparison.json[,runs/B/...]
[--runs DIR] [--reference MODE[,MODE]] [--out JSON]`` reads each comparison's per-case rows
(test mean Dice per mode and seed) and, for every mode and seed, the run's own JSON
(``<runs>/<comparison name>-<mode>-seed<seed>/history.json`` and ``summary.json``, written by
the run itself): the ε, δ, σ and DP-SGD steps each site reported in its last training round
(Opacus's accountant over every step the site took), its optimiser steps and the run's wall
time. ``--runs`` defaults to the folder holding each comparison's folder (where
``simulations.compare`` puts its runs). A file of ``--collect`` may also be an earlier
``privacy_curve.json``: its points and sources are kept as they are, so new runs join a
committed curve. Writes one JSON (default ``<first comparison's folder>/privacy_curve.json``)
with the command, date and code version.

``python -m simulations.privacy_curve --report JSON [--png PNG]`` prints the Markdown table
(per mode: ε spent, σ, steps, test mean Dice mean ± sd over seeds, its share of each
reference mode's, wall time) and writes the plot of Dice against ε spent (default: beside
the JSON, ``.png``). The results pages under ``docs/results/`` are made this way.

Nothing here trains; the curve's runs are made by ``simulations.compare``
(``docs/privacy.md``, "Measuring the curve").
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from m4fuse.evaluation.stats import case_score, mean_sd
from simulations.compare.provenance import code_version
from simulations.compare.report import read_comparison
from simulations.curve_plot import dice_axes, page_plot_link, save_dice_plot

#: the per-site keys a DP run reports each round (``m4fuse.training.dp``)
DP_KEYS: dict[str, str] = {"epsilon": "dp-epsilon", "delta": "dp-delta",
                           "sigma": "dp-noise-multiplier", "dp_steps": "dp-steps"}


def site_dp_values(history: Sequence[Mapping[str, Any]], names: Sequence[str]
                   ) -> dict[str, dict[str, float]]:
    """``{site: {epsilon, delta, sigma, dp_steps}}`` from the last round each site trained in
    (ε is cumulative: the accountant over the site's whole history); empty for a run without
    DP."""
    out: dict[str, dict[str, float]] = {}
    for record in history:
        for index, metrics in (record.get("train_by_site") or {}).items():
            if DP_KEYS["epsilon"] in metrics:
                site = names[int(index)]
                out[site] = {key: float(metrics[src]) for key, src in DP_KEYS.items()
                             if src in metrics}
    return out


def _val_dice(record: Mapping[str, Any]) -> float | None:
    """A round's validation mean Dice over the sites (None where the round has none)."""
    value = (record.get("val") or {}).get("dice_mean")
    return None if value is None else float(value)


def _run_json(run_dir: Path, name: str) -> Any:
    path = run_dir / name
    if not path.is_file():
        raise ValueError(f"{path}: no such file; --runs must name the folder holding the "
                         "comparison's run folders (<name>-<mode>-seed<seed>)")
    return json.loads(path.read_text())


def collect_points(comparison: Path, payload: Mapping[str, Any], runs: Path | None = None
                   ) -> list[dict[str, Any]]:
    """One point per mode and seed of the comparison ``payload`` read from ``comparison``
    (see the module docstring)."""
    summary = payload["summary"]
    runs = runs or comparison.parent.parent
    points = []
    for mode in summary["modes"]:
        for seed in summary["seeds"]:
            rows = [r for r in payload["rows"] if r["mode"] == mode and int(r["seed"]) == int(seed)]
            if not rows:
                raise ValueError(f"{comparison}: no rows of mode {mode!r}, seed {seed}")
            run_dir = runs / f"{summary['name']}-{mode}-seed{seed}"
            run_summary = _run_json(run_dir, "summary.json")
            names = list(run_summary["site_names"])
            by_site = {s: float(np.mean([case_score(r) for r in rows if r["site"] == s]))
                       for s in sorted({r["site"] for r in rows})}
            history = _run_json(run_dir, "history.json")
            points.append({
                "mode": mode, "seed": int(seed), "source": str(comparison),
                "test_dice_mean": float(np.mean([case_score(r) for r in rows])),
                "test_cases": len(rows), "by_site": by_site,
                "dp": site_dp_values(history, names),
                "val_rounds": [_val_dice(r) for r in (history[0], history[-1])] if history
                else [None, None],
                "steps": {s: v.get("total") for s, v in (run_summary.get("train_steps") or {}).items()},
                "seconds": float(run_summary["seconds"]),
            })
    return points


def read_source(path: Path, runs: Path | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The points and sources of one ``--collect`` file: a comparison (its points read from
    its rows and runs, :func:`collect_points`) or an earlier curve's JSON (its points and
    sources as they are, so a curve grows by new runs without the old runs' folders)."""
    if path.suffix == ".json":
        earlier = json.loads(path.read_text())
        if "points" in earlier:
            return list(earlier["points"]), list(earlier["sources"])
    payload = read_comparison(path)
    return (collect_points(path, payload, runs),
            [{"path": str(path), "provenance": payload["summary"].get("provenance")}])


def collect(comparisons: Sequence[Path], runs: Path | None, references: Sequence[str],
            argv: Sequence[str] = ()) -> dict[str, Any]:
    """The curve's JSON: every comparison's (or earlier curve's) points, their provenance and
    this command's."""
    points: list[dict[str, Any]] = []
    sources: list[dict[str, Any]] = []
    seen: dict[tuple[str, int], Path] = {}
    for path in comparisons:
        new_points, new_sources = read_source(path, runs)
        for p in new_points:
            key = (p["mode"], int(p["seed"]))
            if key in seen:
                raise ValueError(f"--collect: mode {key[0]!r}, seed {key[1]} comes from both "
                                 f"{seen[key]} and {path}; collect each run once")
            seen[key] = path
        points += new_points
        sources += [s for s in new_sources if s not in sources]
    modes = list(dict.fromkeys(p["mode"] for p in points))
    missing = [r for r in references if r not in modes]
    if missing:
        raise ValueError(f"--reference {','.join(missing)}: not a mode of the comparisons "
                         f"(modes: {', '.join(modes)})")
    return {
        "command": "python -m simulations.privacy_curve " + " ".join(shlex.quote(a) for a in argv),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "code_version": code_version(),
        "references": list(references), "modes": modes, "sources": sources, "points": points,
    }


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def curve_table(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per mode: seeds, test mean Dice (mean, sd over seeds), the largest ε any site spent in
    any seed, σ and DP steps (max over sites and seeds), optimiser steps per site (median) and
    the median wall time of a run."""
    rows = []
    for mode in payload["modes"]:
        pts = [p for p in payload["points"] if p["mode"] == mode]
        dp = [v for p in pts for v in p["dp"].values()]
        steps = [s for p in pts for s in p["steps"].values() if s is not None]
        rows.append({
            "mode": mode, "seeds": len(pts),
            "dice": mean_sd([p["test_dice_mean"] for p in pts])[:2],
            "epsilon": max((v["epsilon"] for v in dp), default=None),
            "sigma": max((v.get("sigma", 0.0) for v in dp), default=None),
            "dp_steps": max((v.get("dp_steps", 0.0) for v in dp), default=None),
            "steps": float(np.median(steps)) if steps else None,
            "val_first": _mean_or_none([p["val_rounds"][0] for p in pts]),
            "val_last": _mean_or_none([p["val_rounds"][1] for p in pts]),
            "seconds": float(np.median([p["seconds"] for p in pts])),
        })
    return rows


def _mean_sd_cell(value: tuple[float, float]) -> str:
    """``mean ± sd``; the mean alone for one seed (sd nan)."""
    mean, sd = value
    return f"{mean:.3f}" if math.isnan(sd) else f"{mean:.3f} ± {sd:.3f}"


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def report_markdown(payload: Mapping[str, Any], image: str | None = None) -> str:
    """The results page of a curve JSON: the table, the share of each reference mode's Dice
    and where the numbers come from; ``image`` (default none): the plot's link."""
    rows = curve_table(payload)
    refs = {r["mode"]: r["dice"][0] for r in rows if r["mode"] in payload["references"]}
    header = ("| mode | seeds | ε spent (largest site) | σ | DP steps per site | steps per site "
              "| val Dice round 1 → last | test mean Dice | "
              + " | ".join(f"% of {m}" for m in refs) + " | wall time per run (s, median) |")
    lines = ["# Privacy-utility curve", "",
             *([f"![test mean Dice against ε spent]({image})", ""] if image else []),
             header, "|" + "---|" * (8 + len(refs)) + "---:|"]
    for r in rows:
        shares = " | ".join(f"{100 * r['dice'][0] / v:.1f} %" if v else "-" for v in refs.values())
        lines.append(
            f"| {r['mode']} | {r['seeds']} | {_cell(r['epsilon'], '.2f')} | {_cell(r['sigma'], '.3f')} "
            f"| {_cell(r['dp_steps'], '.0f')} | {_cell(r['steps'], '.0f')} "
            f"| {_cell(r['val_first'], '.3f')} → {_cell(r['val_last'], '.3f')} "
            f"| {_mean_sd_cell(r['dice'])} | {shares} | {r['seconds']:.0f} |")
    lines += [
        "",
        "Test mean Dice: the mean over every site's test cases of mean(Dice WT, TC, ET), mean ± "
        "sd over seeds. ε spent: the largest ε any site reported in its last training round "
        "(Opacus's RDP accountant over every DP-SGD step the site took), in any seed; \"-\" for "
        "a mode without DP. Steps per site: optimiser steps over the whole run, fine-tuning "
        "excluded (median over sites and seeds). Val Dice round 1 → last: the validation "
        "mean Dice of the federated model after the first and the last round (mean over "
        "seeds): how far training moved it from its start.",
        "",
        f"Collected by `{payload['command']}` on {payload['date']}; code version "
        f"{payload['code_version']}. From:",
        "",
        *(f"- `{s['path']}`: made by `{(s['provenance'] or {}).get('command', 'unknown')}` on "
          f"{(s['provenance'] or {}).get('date', 'unknown')}; code version "
          f"{(s['provenance'] or {}).get('code_version', 'unknown')}" for s in payload["sources"]),
    ]
    return "\n".join(lines)


def plot_curve(payload: Mapping[str, Any], path: Path) -> Path:
    """Test mean Dice (mean ± sd over seeds) against the ε spent, log x; the modes without DP
    as horizontal lines."""
    rows = curve_table(payload)
    fig, ax = dice_axes()
    private = [r for r in rows if r["epsilon"] is not None]
    if private:
        ax.errorbar([r["epsilon"] for r in private], [r["dice"][0] for r in private],
                    yerr=[r["dice"][1] for r in private], fmt="o", capsize=3, label="DP-SGD")
        for r in private:
            ax.annotate(r["mode"], (r["epsilon"], r["dice"][0]), textcoords="offset points",
                        xytext=(4, -12), fontsize=8)
        ax.set_xscale("log")
    for r, style in zip((r for r in rows if r["epsilon"] is None), ("--", ":", "-.", "-")):
        ax.axhline(r["dice"][0], linestyle=style, color="grey", label=f"{r['mode']} (no DP)")
    return save_dice_plot(fig, ax, path, "ε spent per site (δ = 1/(10 n))", "test mean Dice",
                          "Privacy-utility curve", legend_size=8)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.privacy_curve",
        description="Test Dice against the ε spent, from comparisons of DP and non-DP modes.")
    parser.add_argument("--collect", default=None, metavar="FILES",
                        help="comma-separated comparison.json[.gz] files to collect, or an "
                             "earlier privacy_curve.json whose points are kept as they are")
    parser.add_argument("--runs", type=Path, default=None,
                        help="with --collect: the folder holding the run folders (default: the "
                             "one holding each comparison's folder)")
    parser.add_argument("--reference", default="",
                        help="with --collect: comma-separated modes without DP the table "
                             "compares every mode with (e.g. personal-norm-ft,pt)")
    parser.add_argument("--out", type=Path, default=None, help="with --collect: the JSON to write")
    parser.add_argument("--report", type=Path, default=None, metavar="JSON",
                        help="print the Markdown table of a collected JSON and plot it")
    parser.add_argument("--png", type=Path, default=None,
                        help="with --report: the plot (default: beside the JSON)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if (args.collect is None) == (args.report is None):
            raise ValueError("give exactly one of --collect FILES and --report JSON")
        if args.report is not None:
            if not args.report.is_file():
                raise ValueError(f"--report {args.report}: no such file")
            payload = json.loads(args.report.read_text())
            print(report_markdown(payload, page_plot_link(args.report)))
            png = plot_curve(payload, args.png or args.report.with_suffix(".png"))
            print(f"plot: {png}", file=sys.stderr)
            return 0
        comparisons = [Path(p) for p in args.collect.split(",") if p.strip()]
        for c in comparisons:
            if not c.is_file():
                raise ValueError(f"--collect {c}: no such file")
        refs = [r for r in args.reference.split(",") if r.strip()]
        payload = collect(comparisons, args.runs, refs, argv)
        out = args.out or comparisons[0].parent / "privacy_curve.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=1) + "\n")
    except (ValueError, KeyError, SystemExit) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
