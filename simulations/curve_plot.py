"""The one figure layout of the curves' plots (:mod:`simulations.learning_curve`,
:mod:`simulations.privacy_curve`): a 5.5 x 4 in axes, Dice from 0 to 1, saved at 120 dpi."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def dice_axes() -> tuple[Any, Any]:
    """``(figure, axes)`` of a new curve plot, drawn off-screen (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(5.5, 4))


def save_dice_plot(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str,
                   legend_size: float | None = None) -> Path:
    """Label ``ax`` (y from 0 to 1, a light grid, the legend), write ``fig`` to ``path``
    (its folder made) and close it; returns ``path``."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def page_plot_link(curve_json: Path) -> str:
    """The plot's link from a results page that sits beside its JSON's folder
    (``docs/results/<name>.md`` for ``docs/results/<name>/<curve>.json``): ``<name>/<curve>.png``,
    where ``--report`` writes the plot by default."""
    return f"{curve_json.parent.name}/{curve_json.with_suffix('.png').name}"
