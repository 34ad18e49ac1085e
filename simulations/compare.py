"""Pooled vs local vs FedAvg vs personal experts, on the same split, seed and budget.

``python -m simulations.compare [hydra overrides]`` (e.g. ``fl.rounds=6 seed=1``) runs the
four modes with the same composed config (only ``fl.strategy`` and ``run_name`` differ), then
writes ``<root>/runs/<name>/comparison.md`` (per site and case-weighted mean: test Dice
ET/TC/WT, mean Dice, HD95, bytes communicated, wall time) and ``comparison.png``, and logs
both to one MLflow run. Each mode also has its own MLflow run and run folder
(``<name>-<mode>``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from m4fuse import experiment
from server import report
from server.tracking import Tracker
from simulations.baselines import run_baseline
from simulations.federated import simulate

MODES: tuple[str, ...] = ("pooled", "local", "fedavg", "personal", "personal-dp")
# Federated modes: the strategy and extra overrides each runs with. `personal-dp` is `personal`
# with DP-SGD on every client (configs/privacy/dp.yaml), so the utility cost of DP shows.
FEDERATED: dict[str, list[str]] = {
    "fedavg": ["fl.strategy=fedavg"],
    "personal": ["fl.strategy=personal"],
    "personal-dp": ["fl.strategy=personal", "privacy=dp"],
}

COLUMNS: list[tuple[str, str]] = [
    ("mode", "mode"), ("site", "site"), ("Dice ET", "test_dice_et"), ("Dice TC", "test_dice_tc"),
    ("Dice WT", "test_dice_wt"), ("Dice mean", "test_dice_mean"), ("HD95 mean", "test_hd95_mean"),
    ("bytes", "bytes"), ("wall s", "seconds"), ("n test", "test_num-examples"),
]


def run_mode(mode: str, overrides: list[str], name: str) -> dict[str, Any]:
    """One mode; returns ``{"rows", "bytes", "seconds", "history", "site_names"}``."""
    args = [*overrides, f"run_name={name}-{mode}"]
    start = time.perf_counter()
    if mode in ("pooled", "local"):
        cfg = experiment.compose("config", args)
        out = run_baseline(cfg, mode)
        result = {"rows": out.rows, "bytes": 0.0, "history": out.history,
                  "site_names": out.site_names}
    else:
        sim = simulate([*args, *FEDERATED[mode]])
        result = {"rows": sim["rows"], "history": sim["history"], "site_names": sim["site_names"],
                  "bytes": float(sim["summary"]["bytes_sent"] + sim["summary"]["bytes_received"])}
    result["seconds"] = time.perf_counter() - start
    return result


def comparison_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per mode: one row per site and the mean row, with bytes and wall time on the mean."""
    rows = []
    for mode, result in results.items():
        for row in result["rows"]:
            out = {"mode": mode, "site": row["site"]}
            out.update({k: row[k] for _, k in COLUMNS if k in row})
            if row["site"] == "mean":
                out["bytes"] = float(result["bytes"])
                out["seconds"] = float(result["seconds"])
            rows.append(out)
    return rows


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


def site_matrix(results: dict[str, dict[str, Any]], key: str = "test_dice_mean") -> str:
    """Markdown: one row per mode, one column per site (+ mean) of ``key``."""
    sites = [r["site"] for r in next(iter(results.values()))["rows"]]
    lines = ["| mode | " + " | ".join(sites) + " |", "|" + "---|" * (len(sites) + 1)]
    for mode, result in results.items():
        values = {r["site"]: r.get(key, float("nan")) for r in result["rows"]}
        lines.append(f"| {mode} | " + " | ".join(f"{float(values[s]):.3f}" for s in sites) + " |")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], path: Path) -> Path:
    """Bar chart of test mean Dice per site and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sites = [r["site"] for r in next(iter(results.values()))["rows"]]
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (mode, result) in enumerate(results.items()):
        values = {r["site"]: float(r.get("test_dice_mean", np.nan)) for r in result["rows"]}
        ax.bar(np.arange(len(sites)) + i * width, [values[s] for s in sites], width, label=mode)
    ax.set_xticks(np.arange(len(sites)) + 0.4 - width / 2, sites)
    ax.set_ylabel("test Dice (mean of ET, TC, WT)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_compare(overrides: Sequence[str] = (), modes: Sequence[str] = MODES) -> Path:
    """Run ``modes`` with ``overrides``; returns the path of the Markdown report."""
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"unknown modes {unknown}; choose from {MODES}")
    overrides = [o for o in overrides if not o.startswith(("run_name=", "fl.strategy="))]
    cfg = experiment.compose("config", overrides)
    name = str(cfg.run_name) if cfg.run_name else f"compare-seed{int(cfg.seed)}"
    results = {mode: run_mode(mode, list(overrides), name) for mode in modes}
    out = experiment.project_root(cfg) / "runs" / name
    table = report.markdown_table(comparison_rows(results), COLUMNS)
    matrix = site_matrix(results)
    lines = [f"# Comparison {name}", "",
             f"Same split, seed {int(cfg.seed)} and budget ({int(cfg.fl.rounds)} rounds x "
             f"{int(cfg.fl.local_epochs)} local epochs); test cases scored on the original grid.",
             "", table, "", "Test mean Dice per site:", "", matrix, ""]
    convergence = convergence_lines(results)
    if convergence:
        lines += ["Validation mean Dice of the last rounds:", "", *convergence, ""]
    means = {m: next(r for r in res["rows"] if r["site"] == "mean") for m, res in results.items()}
    if "pooled" in means and "personal" in means:
        ratio = means["personal"]["test_dice_mean"] / max(means["pooled"]["test_dice_mean"], 1e-9)
        lines.append(f"personal / pooled mean Dice: {100 * ratio:.1f} %")
    if "fedavg" in results and "personal" in results:
        better = [r["site"] for r, f in zip(results["personal"]["rows"], results["fedavg"]["rows"])
                  if r["site"] != "mean" and r["test_dice_mean"] > f["test_dice_mean"]]
        lines.append(f"sites where personal beats fedavg (test mean Dice): {better or 'none'}")
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    md = out / "comparison.md"
    md.write_text(text)
    png = plot(results, out / "comparison.png")
    print(text, flush=True)
    tracker = Tracker(cfg, name, tags={"kind": "comparison"})
    metrics: dict[str, float] = {}
    for mode, mean in means.items():
        for key in ("test_dice_et", "test_dice_tc", "test_dice_wt", "test_dice_mean",
                    "test_hd95_mean"):
            metrics[f"{mode}/{key}"] = float(mean[key])
        metrics[f"{mode}/bytes"] = float(results[mode]["bytes"])
        metrics[f"{mode}/wall_seconds"] = float(results[mode]["seconds"])
    tracker.log_metrics(metrics, step=0)
    tracker.log_artifact(md)
    tracker.log_artifact(png)
    tracker.finish()
    return md


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m simulations.compare [--modes a,b] [hydra overrides...]`` (default: all modes)."""
    args = list(sys.argv[1:] if argv is None else argv)
    modes: Sequence[str] = MODES
    if args and args[0] == "--modes":
        if len(args) < 2:
            raise SystemExit(f"--modes needs a comma-separated list of {MODES}")
        modes = [m for m in args[1].split(",") if m]
        args = args[2:]
    run_compare(args, modes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
