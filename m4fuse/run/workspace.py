"""Where a run's files go: the project root, the run's name and its folder."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

#: The Hydra config folder: beside the packages, in a checkout and in an installed Flower app
#: (the FAB ships ``*.yaml``), so the same path works for ``flwr run .`` and for pytest.
CONFIG_DIR: Path = Path(__file__).resolve().parents[2] / "configs"


def project_root(cfg: DictConfig) -> Path:
    """The folder for runs, data and the MLflow store (``root`` in the config).

    ``root`` when set; else ``$M4FUSE_HOME``; else the checkout the code runs from (a folder
    with ``.git`` above :data:`CONFIG_DIR`); else ``~/.cache/m4fuse`` (an installed Flower app
    is a copy without ``.git``, so it never writes into ``$FLWR_HOME/apps``).
    """
    if cfg.root is not None:
        return Path(str(cfg.root))
    env = os.environ.get("M4FUSE_HOME")
    if env:
        if not Path(env).is_absolute():
            raise ValueError(f"M4FUSE_HOME must be an absolute path, got {env!r}")
        return Path(env)
    checkout = CONFIG_DIR.parent
    if (checkout / ".git").exists():
        return checkout
    return Path.home() / ".cache" / "m4fuse"


def run_name(cfg: DictConfig) -> str:
    """``run_name`` or ``<strategy>-seed<seed>``."""
    return str(cfg.run_name) if cfg.run_name else f"{cfg.fl.strategy}-seed{int(cfg.seed)}"


def run_dir(cfg: DictConfig) -> Path:
    """``<root>/runs/<run name>``: checkpoints, tables, plots of one experiment."""
    return project_root(cfg) / "runs" / run_name(cfg)
