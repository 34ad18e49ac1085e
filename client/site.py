"""Which site a SuperNode is, where its data and personal state live (ClientApp helpers).

Simulation: the node's ``partition-id`` indexes the sorted site names of the configured split
(one SuperNode per site). Deployment: the node config may name everything explicitly, so that
deployment needs no code change:

``site`` (site name), ``site-index`` (its index in the federation's sorted site list; default
its position in the local split), ``data-root`` (raw data folder), ``cache-dir`` (prepared
cache), ``partition-csv`` (the hospital's own site partition CSV, ``data.partition_csv``;
absolute path), ``state-dir`` (where the site's expert survives client restarts), ``device``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from m4fuse.run import provision, runtime, settings, workspace

_CONFIGS: dict[tuple, DictConfig] = {}


def site_config(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> DictConfig:
    """The Hydra config of the run (``config-name`` + ``overrides`` of the Flower run config),
    with the node's data paths applied; memoised per process."""
    key = (str(run_config.get("config-name", "config")), str(run_config.get("overrides", "")),
           os.environ.get(settings.OVERRIDES_ENV, ""),
           tuple(sorted((k, str(v)) for k, v in node_config.items())))
    if key not in _CONFIGS:
        cfg = settings.compose_run(run_config)
        OmegaConf.set_struct(cfg, False)
        if "data-root" in node_config:
            cfg.data.source = str(node_config["data-root"])
        if "cache-dir" in node_config:
            cfg.data.cache_dir = str(node_config["cache-dir"])
        if "partition-csv" in node_config:
            cfg.data.partition_csv = str(node_config["partition-csv"])
        settings.check_config(cfg)
        _CONFIGS[key] = cfg
    return _CONFIGS[key]


@dataclass
class Site:
    """One site's view of the run."""

    cfg: DictConfig
    name: str
    index: int
    records: Mapping[str, list]  # "train" | "val" | "test" -> CaseRecords
    device: torch.device
    state_dir: Path | None

    @classmethod
    def resolve(
        cls, run_config: Mapping[str, Any], node_config: Mapping[str, Any], run_dir: str | None
    ) -> Site:
        """Resolve the site from the node config (see module docstring)."""
        cfg = site_config(run_config, node_config)
        split = provision.load_sites(cfg)
        names = provision.site_names(split)
        if "site" in node_config:
            name = str(node_config["site"])
            if name not in split:
                raise KeyError(f"node config site {name!r} is not in the data split {names}")
            index = int(node_config.get("site-index", names.index(name)))
        else:
            if "partition-id" not in node_config:
                raise KeyError(
                    f"node config needs 'site' or 'partition-id', got {sorted(node_config)}"
                )
            pid = int(node_config["partition-id"])
            count = int(node_config.get("num-partitions", len(names)))
            if count != len(names) or not 0 <= pid < len(names):
                raise ValueError(
                    f"simulation needs one SuperNode per site: {len(names)} sites {names}, "
                    f"got partition-id {pid} of num-partitions {count} "
                    f"(run with --federation-config \"num-supernodes={len(names)}\")"
                )
            name, index = names[pid], pid
        runtime.apply_threads(cfg)
        device = runtime.resolve_device(str(node_config.get("device", cfg.device)))
        if "state-dir" in node_config:
            state_dir: Path | None = Path(str(node_config["state-dir"])) / workspace.run_name(cfg)
        elif run_dir:
            # Simulation only: server and clients share this machine's file system.
            state_dir = Path(run_dir) / "clients" / name
        else:
            state_dir = None
        return cls(cfg, name, index, split[name], device, state_dir)
