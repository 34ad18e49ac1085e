"""Cross-site matrix: every site's model scored on every site's test cases.

A "site model" is what one site would run: the shared weights with that site's expert (a
personalised federated model), or the site's own model (local training). Scoring site ``k``'s
model on site ``j``'s test cases shows how much of a model is specific to its scanner: the
diagonal is the model at home, the off-diagonal cells the model elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m4fuse.evaluation.metrics import LESION_COUNT_KEYS, LESION_SCORE_KEYS
from m4fuse.evaluation.stats import case_score
from m4fuse.training import site_steps

SCORE_KEYS: tuple[str, ...] = ("dice_wt", "dice_tc", "dice_et", "hd95_wt", "hd95_tc", "hd95_et")
#: The lesion-wise scores and counts (BraTS 2023+ rule) a per-case row carries after SCORE_KEYS.
LESION_CASE_KEYS: tuple[str, ...] = LESION_SCORE_KEYS + LESION_COUNT_KEYS


def score_cases(model: torch.nn.Module, expert: int | None, records: Sequence[Any],
                device: torch.device) -> list[dict[str, Any]]:
    """Per-case test scores of ``model`` routed to ``expert`` (None: shared path alone) on
    ``records``, on the original voxel grid (:func:`m4fuse.training.site_steps.score_site_tests`):
    ``[{"case", "dice_wt", ..., "hd95_et", "lesion_dice_wt", ..., "lesion_fp_et"}]``
    (:data:`SCORE_KEYS`, then :data:`LESION_CASE_KEYS`)."""
    model.eval()
    _, rows = site_steps.score_site_tests(model, records, expert, device)
    return [{"case": str(r["case"]), **{k: float(r[k]) for k in SCORE_KEYS + LESION_CASE_KEYS}}
            for r in rows]


def score_matrix(models: Mapping[str, tuple[torch.nn.Module, int | None]],
                 tests: Mapping[str, Sequence[Any]], device: torch.device,
                 home_rows: Sequence[Mapping[str, Any]] | None = None
                 ) -> list[dict[str, Any]]:
    """Every model on every site's test cases.

    Args:
        models: ``{site name: (model, expert index or None)}``, the site's own model.
        tests: ``{site name: test records}``.
        device: where to run.
        home_rows: per-case rows of the models at home, each with its ``site``, ``case`` and
            scores (e.g. a comparison's own rows): when given, they are the diagonal (first,
            in their order) and each model is scored on the other sites' cases only.

    Returns one row per model site, test site and case: ``{"model_site", "site", "case",
    "dice_wt", ..., "hd95_et", "lesion_dice_wt", ..., "lesion_fp_et"}``.
    """
    out = [] if home_rows is None else [
        {"model_site": r["site"], "site": r["site"], "case": r["case"],
         **{k: r[k] for k in SCORE_KEYS + LESION_CASE_KEYS}} for r in home_rows]
    for model_site, (model, expert) in models.items():
        for site, records in tests.items():
            if home_rows is not None and site == model_site:
                continue
            for row in score_cases(model, expert, records, device):
                out.append({"model_site": model_site, "site": site, **row})
    return out


def matrix(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str], np.ndarray]:
    """``(model sites, test sites, M)``: ``M[k, j]`` = mean over the cases (and seeds) of
    site ``j`` of the per-case mean Dice (:func:`m4fuse.evaluation.stats.case_score`) of site ``k``'s
    model; nan where nothing was scored."""
    model_sites = sorted({str(r["model_site"]) for r in rows})
    sites = sorted({str(r["site"]) for r in rows})
    out = np.full((len(model_sites), len(sites)), np.nan)
    for i, k in enumerate(model_sites):
        for j, s in enumerate(sites):
            scores = [case_score(r) for r in rows if r["model_site"] == k and r["site"] == s]
            if scores:
                out[i, j] = float(np.mean(scores))
    return model_sites, sites, out


def markdown(model_sites: Sequence[str], sites: Sequence[str], values: np.ndarray) -> str:
    """The matrix as a Markdown table (rows: whose model; columns: whose test cases)."""
    lines = ["| model \\ test cases | " + " | ".join(sites) + " |",
             "|" + "---|" * (len(sites) + 1)]
    for i, k in enumerate(model_sites):
        lines.append(f"| {k} | " + " | ".join(f"{v:.3f}" for v in values[i]) + " |")
    return "\n".join(lines)


def heatmap(matrices: Mapping[str, tuple[list[str], list[str], np.ndarray]], path: Path) -> Path:
    """One heat map per entry of ``matrices`` (``{title: matrix(...)}``), side by side, with
    the value in each cell; written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not matrices:
        raise ValueError("no matrix to plot")
    fig, axes = plt.subplots(1, len(matrices), figsize=(5.2 * len(matrices), 4.0), squeeze=False)
    for ax, (title, (rows, cols, values)) in zip(axes[0], matrices.items()):
        image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("test cases of")
        ax.set_ylabel("model of")
        ax.set_title(title, fontsize=10)
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                if np.isfinite(values[i, j]):
                    ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if values[i, j] < 0.6 else "black")
    fig.tight_layout()
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="test Dice (mean of WT, TC, ET)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
