"""Pooled and local baselines (no Flower), on the same split, loss, optimiser and epochs.

* ``pooled``: one model with one expert per site (expert k = site k, routed by site), trained
  on the union of all sites' training cases.
* ``local``: each site trains its own one-expert model on its own cases only.

Budget: the federated run trains ``fl.local_epochs`` epochs per round for ``fl.rounds`` rounds,
so both baselines train ``fl.rounds`` "rounds" of ``fl.local_epochs`` epochs (with
``fl.local_steps`` = s instead: ``local`` s steps per site and round, as each federated site;
``pooled`` s x the number of sites per round, the federation's steps summed over its sites, so
that pooled and federated spend the same compute), with a fresh
AdamW per round on the same warm-up/cosine curve (as the ClientApp does) and validation of
every site after each round (for the Dice-per-round plot). Test scores are on the original
voxel grid, as in the federated run. The outputs (:func:`m4fuse.run.report.write_run_outputs`) and
the MLflow keys (:mod:`m4fuse.run.tracking`) are those of the federated run. ``m4fuse train --mode
pooled|local`` and ``python -m simulations.pooled|local`` are thin wrappers over
:func:`run_baseline`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import ConcatDataset, DataLoader

from m4fuse.run import provision, report, runtime, settings, workspace
from m4fuse.run.tracking import Tracker, final_test_metrics, round_metrics
from m4fuse.training import site_steps

MODES: tuple[str, ...] = ("pooled", "local")


def pooled_loader(split: dict, names: list[str], cfg: DictConfig, seed: int) -> DataLoader:
    """Union of the sites' training cases, each batch item routed to its site's expert."""
    from m4fuse.data import make_loader

    parts = [
        make_loader(split[name]["train"], index, batch_size=int(cfg.train.batch_size),
                    augment=bool(cfg.train.augment), shuffle=True,
                    num_workers=int(cfg.train.num_workers), seed=seed + index).dataset
        for index, name in enumerate(names)
    ]
    return DataLoader(ConcatDataset(parts), batch_size=int(cfg.train.batch_size), shuffle=True,
                      num_workers=int(cfg.train.num_workers),
                      generator=torch.Generator().manual_seed(seed))


def _expert_of(mode: str, index: int) -> int:
    """The expert of site ``index``: expert k for site k in ``pooled``, 0 in ``local``."""
    return index if mode == "pooled" else 0


def _model_of(mode: str, models: dict[str, torch.nn.Module], site: str) -> torch.nn.Module:
    """``site``'s model: the one pooled model, or the site's own in ``local``."""
    return models["*"] if mode == "pooled" else models[site]


def _train_round(cfg: DictConfig, mode: str, models: dict[str, torch.nn.Module], split: dict,
                 names: list[str], device: torch.device, rnd: int
                 ) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
    """Round ``rnd``'s training: ``fl.local_epochs`` epochs of the pooled model on all sites'
    cases, or of each site's model on its own; ``(train loss, per-site results)``."""
    rounds, epochs, seed = int(cfg.fl.rounds), int(cfg.fl.local_epochs), int(cfg.seed)
    local_steps = cfg.fl.get("local_steps")  # None: epochs
    train_by_site: dict[int, dict[str, float]] = {}
    round_seed = seed * 1000 + rnd
    if mode == "pooled":
        loader = pooled_loader(split, names, cfg, round_seed)
        out = site_steps.run_epochs(
            models["*"], loader, cfg, device, epochs, round_seed, schedule=(rnd - 1, rounds),
            max_steps=None if local_steps is None else int(local_steps) * len(names))
        return {"loss": out["loss"], "steps": out["steps"]}, train_by_site
    for index, site in enumerate(names):
        out = site_steps.train_site(
            models[site], split[site]["train"], 0, cfg, device, epochs,
            seed=seed * 1000 + index * 100 + rnd, schedule=(rnd - 1, rounds),
            max_steps=None if local_steps is None else int(local_steps))
        train_by_site[index] = out
    total = sum(m["num-examples"] for m in train_by_site.values())
    train = {"loss": sum(m["loss"] * m["num-examples"]
                         for m in train_by_site.values()) / total}
    return train, train_by_site


def _run_round(cfg: DictConfig, mode: str, models: dict[str, torch.nn.Module], split: dict,
               names: list[str], device: torch.device, rnd: int) -> dict[str, Any]:
    """Train round ``rnd`` and score every site's validation cases; the history entry."""
    start = time.perf_counter()
    train, train_by_site = _train_round(cfg, mode, models, split, names, device, rnd)
    val_by_site = {  # a site without validation cases is not scored (left out of the mean)
        index: site_steps.validate_site(_model_of(mode, models, site), split[site]["val"],
                                        _expert_of(mode, index), cfg, device)
        for index, site in enumerate(names) if split[site]["val"]
    }
    return {"round": rnd, "train": train,
            "val": site_steps.weighted_mean(list(val_by_site.values())),
            "train_by_site": train_by_site, "val_by_site": val_by_site,
            "bytes_sent": 0, "bytes_received": 0,
            "seconds": time.perf_counter() - start}


def run_baseline(cfg: DictConfig, mode: str, split: dict | None = None) -> report.RunSummary:
    """Train and score the ``pooled`` or ``local`` baseline of ``cfg``; logs one MLflow run.
    ``split`` (default None: :func:`m4fuse.run.provision.load_sites` of ``cfg``) trains and scores
    on given cases instead (e.g. a subset of the training cases, for a learning curve)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    wall = time.perf_counter()
    runtime.apply_threads(cfg)
    split = provision.load_sites(cfg) if split is None else split
    names = provision.site_names(split)
    device = runtime.resolve_device(str(cfg.device))
    rounds, seed = int(cfg.fl.rounds), int(cfg.seed)
    name = str(cfg.run_name) if cfg.run_name else f"{mode}-seed{seed}"
    rdir = workspace.project_root(cfg) / "runs" / name
    rdir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(cfg, name, tags={"kind": "baseline", "strategy": mode})
    # pooled: one model, expert k for site k; local: one model per site, expert 0.
    if mode == "pooled":
        models = {"*": settings.build_model(cfg, num_experts=len(names))}
    else:
        models = {n: settings.build_model(cfg, num_experts=1) for n in names}
    history: list[dict[str, Any]] = []
    try:
        for rnd in range(1, rounds + 1):
            entry = _run_round(cfg, mode, models, split, names, device, rnd)
            history.append(entry)
            tracker.log_metrics(round_metrics(entry), step=rnd)
        test_by_site = {
            index: site_steps.score_site_tests(_model_of(mode, models, site), split[site]["test"],
                                        _expert_of(mode, index), device)[0]
            for index, site in enumerate(names)
        }
    except BaseException:
        tracker.finish("FAILED")
        raise
    unvalidated = {index: sum(len(split[site][k]) for k in ("train", "val", "test"))
                   for index, site in enumerate(names) if not split[site]["val"]}
    rows = report.site_rows(names, history[-1]["val_by_site"], test_by_site,
                            not_scored={"val": unvalidated})
    seconds = time.perf_counter() - wall
    table, outputs = report.write_run_outputs(
        rdir, names, rows, history,
        {"mode": mode, "seconds": seconds, "bytes_sent": 0, "bytes_received": 0},
        title=f"{name} ({mode}): per-site results", plot_title=f"{name}: validation Dice",
        footer=f"{seconds:.1f} s")
    final = final_test_metrics(rows[-1], test_by_site)
    final.update({"total_bytes_sent": 0, "total_bytes_received": 0, "wall_seconds": seconds})
    final.update(report.optimiser_steps_metrics(history, names))
    tracker.log_metrics(final, step=rounds)
    model_path = save_models(cfg, mode, models, names, rdir)
    for path in (*outputs, model_path):
        tracker.log_artifact(path)
    tracker.finish()
    return report.RunSummary(mode, rdir, names, rows, table, history, tracker.run_id,
                             seconds)


def save_models(cfg: DictConfig, mode: str, models: dict[str, torch.nn.Module],
                names: list[str], rdir: Path) -> Path:
    """pooled: ``model.ckpt`` (m4fuse.io.checkpoint: shared + each site's expert by name);
    local: ``models/<site>.ckpt``, one per site. Returns the file or folder."""
    from m4fuse.io.checkpoint import save_checkpoint
    from m4fuse.personal.sets import expert_state, split_state

    if mode == "pooled":
        state = {k: v.detach().cpu() for k, v in models["*"].state_dict().items()}
        shared, personal = split_state(state)
        experts = {site: expert_state(personal, index) for index, site in enumerate(names)}
        path = rdir / "model.ckpt"
        save_checkpoint(path, settings.model_config(cfg, num_experts=1), shared, experts,
                        size=list(cfg.data.size), metadata={"mode": mode})
        return path
    folder = rdir / "models"
    for site in names:
        state = {k: v.detach().cpu() for k, v in models[site].state_dict().items()}
        shared, personal = split_state(state)
        save_checkpoint(folder / f"{site}.ckpt", settings.model_config(cfg, num_experts=1),
                        shared, {site: expert_state(personal, 0)}, size=list(cfg.data.size),
                        metadata={"mode": mode})
    return folder

