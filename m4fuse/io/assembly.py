"""A finished federated run's final model and site files, put together from its run folder.

The ServerApp only writes what the server holds (``<run dir>/shared.ckpt``,
:func:`m4fuse.io.checkpoint.save_server_model`); it never reads a site's folder. This module is
what the simulation driver (:func:`simulations.federated.simulate`) and ``m4fuse model
assemble`` run afterwards, on the machine that holds the sites' state folders (in simulation
``<run dir>/clients/<site>``):

- ``model.ckpt``: the shared weights plus each site's own weights (expert, kept norms, what
  its fine-tuning kept), :func:`m4fuse.io.checkpoint.add_site_states`;
- ``overlays/<site>-overlay-test-<case>.png`` and ``experts/<site>.pt`` (each site's newest
  kept state), copied out of the sites' folders.

A hospital of a real deployment runs the same command with ``--site NAME=FOLDER`` on the
server's ``shared.ckpt`` and its own state folder, and gets its own model file.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from m4fuse.io.checkpoint import (
    CHECKPOINT_NAME,
    SERVER_MODEL_NAME,
    add_site_states,
    load_checkpoint,
)
from m4fuse.personal.site_store import newest_kept

log = logging.getLogger(__name__)

#: Where a simulated site keeps its state inside the run folder (``clients/<site>``).
CLIENTS_DIR = "clients"


@dataclass
class Assembled:
    """What :func:`assemble_run` wrote.

    Attributes:
        model: ``model.ckpt``, or None when the run has no shared model (``local``).
        artifacts: ``(file, MLflow artifact folder)`` for every file written, the model first.
    """

    model: Path | None
    artifacts: list[tuple[Path, str | None]] = field(default_factory=list)


def site_folders(run_dir: Path, sites: list[str] | None = None) -> dict[str, Path | None]:
    """``{site: <run dir>/clients/<site>}`` for ``sites`` (default: the run folder's
    ``clients/`` sub-folders); None where that folder does not exist on this machine."""
    clients = run_dir / CLIENTS_DIR
    if sites is None:
        sites = sorted(p.name for p in clients.iterdir() if p.is_dir()) if clients.is_dir() else []
    return {site: (clients / site if (clients / site).is_dir() else None) for site in sites}


def run_sites(run_dir: Path) -> list[str] | None:
    """The run's site names as its ``summary.json`` records them (None when it does not)."""
    import json

    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    names = json.loads(path.read_text()).get("site_names")
    return list(names) if names is not None else None


def collect_site_files(run_dir: Path) -> list[tuple[Path, str | None]]:
    """Copy the simulated sites' test overlays and newest kept states out of
    ``<run dir>/clients/<site>`` (the run's sites, :func:`run_sites`; every sub-folder for a
    run that does not record them) into ``overlays/`` and ``experts/``; returns them with
    their MLflow artifact folder."""
    written: list[tuple[Path, str | None]] = []
    for site, folder in site_folders(run_dir, run_sites(run_dir)).items():
        if folder is None:
            continue
        for picture in sorted(folder.glob("overlay-test-*.png")):
            target = run_dir / "overlays" / f"{site}-{picture.name}"
            target.parent.mkdir(exist_ok=True)
            shutil.copyfile(picture, target)
            written.append((target, "overlays"))
        kept = newest_kept(folder)
        if kept is not None:
            target = run_dir / "experts" / f"{site}.pt"
            target.parent.mkdir(exist_ok=True)
            torch.save(kept, target)
            written.append((target, "experts"))
    return written


def assemble_run(run_dir: str | os.PathLike,
                 folders: Mapping[str, str | os.PathLike | None] | None = None,
                 out: str | os.PathLike | None = None) -> Assembled:
    """Make a finished federated run's ``model.ckpt`` and copy its sites' files.

    Args:
        run_dir: the run folder (``runs/<run name>``) holding the ServerApp's ``shared.ckpt``.
        folders: ``{site: state folder}``; default: every site the server's model names, at
            ``<run dir>/clients/<site>`` where that exists (simulation).
        out: the model file to write; default ``<run dir>/model.ckpt``.

    Raises:
        FileNotFoundError: ``run_dir`` is not a folder, or holds neither ``shared.ckpt`` nor
            a ``summary.json`` of a ``local`` run (the message names the folder).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder at {run_dir}")
    server_model = run_dir / SERVER_MODEL_NAME
    artifacts: list[tuple[Path, str | None]] = []
    model: Path | None = None
    if server_model.is_file():
        if folders is None:
            sites = list(load_checkpoint(server_model).metadata.get("sites") or [])
            folders = site_folders(run_dir, sites)
        model = add_site_states(server_model, folders, out or run_dir / CHECKPOINT_NAME)
        artifacts.append((model, "model"))
    elif not (run_dir / "summary.json").is_file():
        raise FileNotFoundError(
            f"{run_dir} holds no {SERVER_MODEL_NAME} (the server's part of the final model) and "
            "no summary.json: not the folder of a finished federated run")
    else:
        log.info("%s has no %s (a local run keeps each site's model in its own folder)",
                 run_dir, SERVER_MODEL_NAME)
    artifacts += collect_site_files(run_dir)
    return Assembled(model, artifacts)
