"""A run's outputs on disk: per-site results tables, CSV files, Dice-per-round plots.

:func:`write_run_outputs` writes the files of one run; the federated run (``server.runner``)
and the pooled/local baselines (:mod:`m4fuse.training.baselines`) both call it, and the comparison
(``simulations.compare``) reads what it wrote.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m4fuse.run.runtime import numerics_platform, platform_text
from m4fuse.training.site_steps import weighted_mean

TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (header, source, key) with source "val" or "test"
    ("val Dice ET", "val", "dice_et"),
    ("val Dice TC", "val", "dice_tc"),
    ("val Dice WT", "val", "dice_wt"),
    ("val HD95", "val", "hd95_mean"),
    ("test Dice ET", "test", "dice_et"),
    ("test Dice TC", "test", "dice_tc"),
    ("test Dice WT", "test", "dice_wt"),
    ("test HD95 ET", "test", "hd95_et"),
    ("test HD95 TC", "test", "hd95_tc"),
    ("test HD95 WT", "test", "hd95_wt"),
    # lesion-wise, BraTS 2023+ rule (m4fuse.evaluation.lesion): missed lesions / false positives count
    ("test lesion Dice ET", "test", "lesion_dice_et"),
    ("test lesion Dice TC", "test", "lesion_dice_tc"),
    ("test lesion Dice WT", "test", "lesion_dice_wt"),
    ("test lesion HD95 ET", "test", "lesion_hd95_et"),
    ("test lesion HD95 TC", "test", "lesion_hd95_tc"),
    ("test lesion HD95 WT", "test", "lesion_hd95_wt"),
)



@dataclass
class RunSummary:
    """What a finished run returns, federated or baseline (tests and the comparison read it).

    Attributes:
        mode: ``fl.strategy`` of a federated run, or ``pooled`` / ``local``.
        run_dir: its output folder. site_names: the sites, in site-index order.
        rows: the per-site table's rows (the last one the case-weighted mean); table: as text.
        history: the per-round (per-epoch-block for the baselines) entries.
        mlflow_run_id: its MLflow run, or None with tracking off.
        seconds: wall time of this session.
        first_round: the round this session started at (> 1 for a resumed run); default 1.
        bytes_sent, bytes_received: over the wire (0 for the baselines).
    """

    mode: str
    run_dir: Path
    site_names: list[str]
    rows: list[dict[str, Any]]
    table: str
    history: list[dict[str, Any]]
    mlflow_run_id: str | None
    seconds: float
    first_round: int = 1
    bytes_sent: int = 0
    bytes_received: int = 0

def site_rows(
    site_names: Sequence[str],
    val: Mapping[int, Mapping[str, float]],
    test: Mapping[int, Mapping[str, float]],
    not_scored: Mapping[str, Mapping[int, int]] | None = None,
    privacy: Mapping[int, Mapping[str, float]] | None = None,
) -> list[dict[str, Any]]:
    """One row per site (by index), then the case-weighted ``mean`` row (weights: the
    number of validation resp. test cases). ``not_scored`` (default none) maps ``"val"`` /
    ``"test"`` to ``{site index: its number of cases}`` for sites too small to hold out
    cases: their ``n val`` / ``n test`` cell says ``not scored: <n> cases``. ``privacy``
    (default none; :func:`privacy_spent`) adds each site's ``dp_epsilon`` and ``dp_delta``."""
    rows: list[dict[str, Any]] = []
    for index, name in enumerate(site_names):
        row: dict[str, Any] = {"site": f"site{index}", "name": name}
        for prefix, source in (("val", val), ("test", test)):
            for key, value in source.get(index, {}).items():
                row[f"{prefix}_{key}"] = float(value)
            cases = (not_scored or {}).get(prefix, {}).get(index)
            if cases is not None and index not in source:
                row[f"{prefix}_num-examples"] = f"not scored: {cases} cases"
        row.update((privacy or {}).get(index, {}))
        rows.append(row)
    mean: dict[str, Any] = {"site": "mean", "name": "weighted by cases"}
    for prefix, source in (("val", val), ("test", test)):
        if source:
            for key, value in weighted_mean(list(source.values())).items():
                mean[f"{prefix}_{key}"] = float(value)
    rows.append(mean)
    return rows


def privacy_spent(history: Sequence[Mapping[str, Any]]) -> dict[int, dict[str, float]]:
    """``{site index: {"dp_epsilon", "dp_delta"}}``: the ε (and δ) each site reported in the
    last round it trained (its accountant covers every earlier round); empty without DP."""
    spent: dict[int, dict[str, float]] = {}
    for entry in history:
        for index, metrics in entry.get("train_by_site", {}).items():
            if "dp-epsilon" in metrics:
                spent[int(index)] = {"dp_epsilon": float(metrics["dp-epsilon"]),
                                     "dp_delta": float(metrics["dp-delta"])}
    return spent


def markdown_table(rows: Sequence[Mapping[str, Any]],
                   columns: Sequence[tuple[str, str]] | None = None) -> str:
    """Rows -> a Markdown table; ``columns`` = (header, row key); Dice 3 and HD95 1 decimal."""
    if columns is None:
        columns = [("site", "site"), ("name", "name"), ("n val", "val_num-examples"),
                   ("n test", "test_num-examples")]
        columns += [(header, f"{source}_{key}") for header, source, key in TABLE_COLUMNS]
        if any("dp_epsilon" in row for row in rows):  # DP-SGD: what each site spent
            columns += [("ε spent", "dp_epsilon"), ("δ", "dp_delta")]
    lines = ["| " + " | ".join(h for h, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = []
        for _, key in columns:
            value = row.get(key, "")
            if isinstance(value, float):
                if key == "dp_delta":
                    cells.append(f"{value:.2g}")
                elif "num-examples" in key or key.endswith("bytes"):
                    cells.append(f"{value:.0f}")
                elif "hd95" in key or key.endswith("seconds"):
                    cells.append(f"{value:.1f}")
                else:
                    cells.append(f"{value:.3f}")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Rows -> CSV (union of keys as columns, in first-seen order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_dice_per_round(
    history: Mapping[int, Mapping[int, Mapping[str, float]]],
    site_names: Sequence[str],
    path: Path,
    title: str,
    key: str = "dice_mean",
) -> Path:
    """``history[round][site_index][key]`` -> PNG of ``key`` per round, one line per site."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = sorted(history)
    for index, name in enumerate(site_names):
        xs = [r for r in rounds if index in history[r]]
        ax.plot(xs, [history[r][index][key] for r in xs], marker="o",
                label=f"site{index} ({name})")
    ax.set_xlabel("round")
    ax.set_ylabel(f"validation {key}")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


#: The files of a run that :func:`write_run_outputs` writes and a tracker logs as artifacts.
RUN_OUTPUT_FILES: tuple[str, ...] = ("sites.csv", "results.md", "dice_per_round.png",
                                     "history.json")


def optimiser_steps(history: Sequence[Mapping[str, Any]], site_names: Sequence[str]
                    ) -> dict[str, dict[str, float]]:
    """Optimiser steps of one run by site: ``{site: {"per_round", "total", "rounds"}}``
    (``per_round``: the mean over the rounds that report them) from the history's
    ``train_by_site`` (a site's ``steps``), or ``{"all sites": ...}`` for the pooled model
    (the history's ``train.steps``). Empty when the history has no step counts (an older
    run). The "+FT" fine-tuning's steps are not in it (``finetune-steps``)."""
    by_site: dict[str, list[float]] = {}
    for entry in history:
        for index, metrics in entry.get("train_by_site", {}).items():
            if "steps" in metrics and 0 <= int(index) < len(site_names):
                by_site.setdefault(site_names[int(index)], []).append(float(metrics["steps"]))
        if "steps" in entry.get("train", {}):
            by_site.setdefault("all sites", []).append(float(entry["train"]["steps"]))
    order = {name: k for k, name in enumerate(site_names)}  # sites in index order, pooled last
    return {site: {"per_round": sum(v) / len(v), "total": float(sum(v)), "rounds": len(v)}
            for site, v in sorted(by_site.items(), key=lambda kv: order.get(kv[0], len(order)))}


def optimiser_steps_metrics(history: Sequence[Mapping[str, Any]], site_names: Sequence[str]
                            ) -> dict[str, float]:
    """MLflow metrics of the run's optimiser steps in total (:func:`optimiser_steps`):
    ``site<k>/train_steps_total`` per site, ``train_steps_total`` for the pooled model."""
    index = {name: k for k, name in enumerate(site_names)}
    return {(f"site{index[s]}/train_steps_total" if s in index else "train_steps_total"):
            v["total"] for s, v in optimiser_steps(history, site_names).items()}


def write_run_outputs(
    rdir: Path,
    site_names: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    history: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    title: str,
    plot_title: str,
    footer: str = "",
) -> tuple[str, list[Path]]:
    """Print the per-site table (``title``, the table, ``footer``) and write ``rdir``'s
    ``sites.csv``, ``results.md``, ``history.json``, ``summary.json`` and ``dice_per_round.png``
    (validation ``dice_mean`` per round of ``history``). Returns ``(the Markdown table, the
    paths of`` :data:`RUN_OUTPUT_FILES` ``)``. Each site's optimiser steps
    (:func:`optimiser_steps`), when the history has them, go under the table and into the
    summary as ``train_steps``. The platform the numbers were computed on
    (:func:`~m4fuse.run.runtime.numerics_platform`) is printed last, written under the table
    of ``results.md`` and stored in the summary as ``platform``."""
    table = markdown_table(rows)
    steps = optimiser_steps(history, site_names)
    steps_line = ""
    if steps:
        steps_line = "\n\nOptimiser steps per round / in total: " + ", ".join(
            f"{s} {v['per_round']:.0f} / {v['total']:.0f}" for s, v in steps.items())
        summary = {**summary, "train_steps": steps}
    # the platform decides the last bits of every float, so a table names the one it came from
    found = numerics_platform()
    summary = {**summary, "platform": found}
    platform_line = f"Computed on: {platform_text(found)}"
    tail = f"{footer}\n{platform_line}" if footer else platform_line
    print(f"\n{title}\n\n{table}{steps_line}\n\n{tail}\n", flush=True)
    write_csv(rows, rdir / "sites.csv")
    (rdir / "results.md").write_text(f"# {title}\n\n{table}{steps_line}\n\n{platform_line}\n")
    (rdir / "history.json").write_text(json.dumps(list(history), indent=1))
    (rdir / "summary.json").write_text(json.dumps(dict(summary)))
    plot_dice_per_round(
        {e["round"]: {int(i): m for i, m in e["val_by_site"].items()} for e in history},
        site_names, rdir / "dice_per_round.png", title=plot_title)
    return table, [rdir / name for name in RUN_OUTPUT_FILES]
