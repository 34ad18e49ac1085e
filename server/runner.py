"""The federated run behind the ServerApp: data once, strategy, rounds, checkpoints, MLflow,
and the per-site results table.

What the server holds: the shared arrays (``personal``/``fedprox``), the whole one-expert
model (``fedavg``) or nothing (``local``). Experts never cross the wire. The server's part of
the final model (``shared.ckpt``, :func:`m4fuse.io.checkpoint.save_server_model`) is written
before the final test, so a failed test still leaves it. The server never reads a site's
folder: the final model with each site's own weights (``model.ckpt``) is put together
afterwards by the simulation driver or ``m4fuse model assemble`` (:mod:`m4fuse.io.assembly`).
Nothing here imports ``client/``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.supercore import log
from omegaconf import DictConfig

from m4fuse.io.checkpoint import CHECKPOINT_NAME, SERVER_MODEL_NAME, save_server_model
from m4fuse.personal.sets import split_state
from m4fuse.personal.sets import strategy as named_strategy
from m4fuse.run import provision, report, settings, workspace
from m4fuse.run.aggregation import KRUM_RULES, aggregation_settings
from m4fuse.run.server_opt import server_opt_settings
from m4fuse.run.tracking import Tracker, final_test_metrics, round_metrics, tracking_uri
from server import round_checkpoint as server_ckpt
from server.replies import RoundLog
from server.strategy import make_strategy

CHECKPOINT_FILE = "server_checkpoint.pt"
FAILURE_FILE = "failure.txt"

#: Settings a resumed run may change (prefixes of flattened config keys): the length of the
#: run, how long to wait, how many sites must answer and the injected test faults.
RESUME_FREE: tuple[str, ...] = ("fl.resume", "fl.rounds", "fl.faults", "fl.min_sites",
                                "fl.round_timeout", "fl.wait_for_sites")


def initial_state(cfg: DictConfig) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(what the server holds, the whole initial model)`` for ``fl.strategy``."""
    model = settings.build_model(cfg, num_experts=1)
    full = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # The server holds what the strategy shares: never a weight of its personal set.
    shared, _ = split_state(full, named_strategy(str(cfg.fl.strategy)).kept)
    return shared, full


def resume_hash(cfg: DictConfig) -> str:
    """The config hash a resumed run must match (all settings but :data:`RESUME_FREE`).

    Under ``fl.server_opt: none`` the server optimiser's keys (``fl.server_*``) change
    nothing and are left out, and so are Krum's (``fl.krum_*``) under an aggregation other
    than ``krum``/``multikrum``, so a run checkpointed before those keys existed resumes.
    Likewise ``train.amp_cpu`` when false (the default, float32 on the CPU as before it
    existed)."""
    from omegaconf import OmegaConf

    flat = settings.flatten(OmegaConf.to_container(cfg, resolve=True))
    free = [k for k in flat if any(k == p or k.startswith(p + ".") for p in RESUME_FREE)]
    if server_opt_settings(cfg.fl)[0] == "none":
        free += [k for k in flat if k.startswith("fl.server_")]
    if aggregation_settings(cfg.fl)[0] not in KRUM_RULES:
        free += [k for k in flat if k.startswith("fl.krum_")]
    if not flat.get("train.amp_cpu", False):
        free.append("train.amp_cpu")
    return settings.config_hash(cfg, ignore=free)


def federation_sites(cfg: DictConfig) -> list[str]:
    """The federation's site names, sorted (position = site index): ``fl.site_names`` when
    set (a coordinator that holds no data), else the data split's (simulation; prepares the
    data once, before round 1)."""
    given = cfg.fl.get("site_names")
    if given:
        names = [str(n) for n in given]
        if len(set(names)) != len(names):
            raise ValueError(f"fl.site_names has duplicates: {names}")
        return sorted(names)
    names = provision.site_names(provision.load_sites(cfg))
    small = provision.small_sites(cfg)
    if small:
        log(INFO, "data.min_cases_per_site=%d: left out %d site(s) before training: %s",
            provision.min_cases_per_site(cfg), len(small),
            ", ".join(f"{s} ({n} case{'s' if n != 1 else ''})" for s, n in small.items()))
    return names


def _round_entry(rl: RoundLog) -> dict[str, Any]:
    """A RoundLog as plain values (stored in the checkpoint; torch ``weights_only`` safe)."""
    return {
        "round": rl.server_round,
        "train": {k: float(v) for k, v in (rl.train or {}).items()},
        "val": {k: float(v) for k, v in (rl.evaluate or {}).items()},
        "train_by_site": {int(i): dict(m) for i, m in rl.train_by_site.items()},
        "val_by_site": {int(i): dict(m) for i, m in rl.evaluate_by_site.items()},
        "failed": {str(k): str(v) for k, v in rl.failed.items()},
        "not_scored": {int(i): int(n) for i, n in rl.not_scored.items()},
        "bytes_sent": int(rl.bytes_sent),
        "bytes_received": int(rl.bytes_received),
        "seconds": float(rl.seconds),
    }


def save_server_part(cfg: DictConfig, rdir: Path, arrays: ArrayRecord, names: list[str]
                     ) -> Path | None:
    """Write ``<run dir>/shared.ckpt`` from the server's ``arrays`` (the initial model where the
    server holds nothing: the personal layers a site without a state starts from); None for
    ``local`` (:func:`m4fuse.io.checkpoint.save_server_model`)."""
    held = {k: torch.from_numpy(v.numpy().copy()) for k, v in arrays.items()}
    _, initial = initial_state(cfg)
    return save_server_model(rdir / SERVER_MODEL_NAME, settings.model_config(cfg, num_experts=1),
                             str(cfg.fl.strategy), held, initial, names,
                             size=list(cfg.data.size))


#: Seconds a simulation's SuperNode count must stay unchanged before it is taken as final
#: (Flower registers them all at once, just after the ServerApp started).
SIMULATION_SETTLE_S = 1.0


class SitesMismatch(ValueError):
    """The federation has another number of SuperNodes than the data split has sites."""


def _mismatch(connected: int, count: int, after: str) -> SitesMismatch:
    return SitesMismatch(
        f"{connected} SuperNode(s) connected {after}, the data split has {count} sites (one "
        f"SuperNode per site): in simulation run flwr run . --federation-config "
        f"\"num-supernodes={count}\" (or m4fuse simulate, which counts them)")


def wait_for_sites(grid: Grid, count: int, timeout: float) -> None:
    """Wait until ``count`` SuperNodes are connected; a clear error instead of Flower's
    endless wait when the federation has fewer nodes than the split has sites. In a
    simulation (Flower's ``InMemoryGrid``: every SuperNode is registered at once) the error
    comes as soon as the count has settled (:data:`SIMULATION_SETTLE_S`), more SuperNodes
    than sites included; a deployment waits up to ``timeout`` seconds for hospitals to
    connect."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    simulation = isinstance(grid, InMemoryGrid)
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected != last:
            last, since = connected, time.monotonic()
        if simulation and connected and time.monotonic() - since >= SIMULATION_SETTLE_S:
            if connected != count:
                raise _mismatch(connected, count, "in this simulation")
            return
        if not simulation and connected >= count:
            return
        if time.monotonic() > deadline:
            raise _mismatch(connected, count, f"after {timeout:.0f} s")
        time.sleep(0.5)


def prepare_run(grid: Grid, cfg: DictConfig) -> list[str]:
    """Everything a run checks before it trains: the federation's sites (the data prepared
    once), the run's folders (:mod:`m4fuse.data.guard`) and one SuperNode per site; returns
    the site names. A mistake here is the user's (:class:`server.failure.RunRefused`)."""
    from m4fuse.data import guard

    names = federation_sites(cfg)
    check_privacy_plan(cfg, names)
    guard.check_run_name(workspace.run_name(cfg))
    guard.check_project_root(workspace.project_root(cfg), cfg.data.get("source")
                             if cfg.data.get("kind") == "brats" else None)
    wait_for_sites(grid, len(names), float(cfg.fl.wait_for_sites))
    return names


def check_privacy_plan(cfg: DictConfig, names: list[str]) -> None:
    """Under ``privacy.enabled``, plan every site's DP-SGD before round 1
    (:func:`m4fuse.training.dp_plan.plan_site`): a target ε the planned steps cannot meet, or an
    expected batch above a site's cases, stops the run here in one line instead of at the
    sites. Skipped on a coordinator that holds no data (``fl.site_names``): the sites then
    check at their first round."""
    group = cfg.get("privacy")
    if group is None or not bool(group.get("enabled", False)) or cfg.fl.get("site_names"):
        return
    from omegaconf import OmegaConf

    from m4fuse.training.dp_plan import PrivacyConfig, plan_site

    privacy = PrivacyConfig.from_mapping(OmegaConf.to_container(group, resolve=True))
    split = provision.load_sites(cfg)
    local_steps = cfg.fl.get("local_steps")
    for name in names:
        plan_site(privacy, len(split[name]["train"]), batch_size=int(cfg.train.batch_size),
                  rounds=int(cfg.fl.rounds), local_epochs=int(cfg.fl.local_epochs),
                  local_steps=None if local_steps is None else int(local_steps), site=name)


@dataclass
class _Start:
    """Where a run starts: fresh, or from the last round checkpoint of a resumed run."""

    arrays: ArrayRecord
    first_round: int
    history: list[dict[str, Any]]
    mlflow_run_id: str | None
    run_identity: str


def _start(cfg: DictConfig, rdir: Path, ckpt_path: Path, chash: str,
           held: dict[str, torch.Tensor]) -> _Start:
    """Resume from ``ckpt_path`` under ``fl.resume`` when it exists, else start afresh
    (forgetting an earlier run of the same name)."""
    arrays = ArrayRecord({k: v for k, v in held.items()}) if held else ArrayRecord()
    run_identity = uuid.uuid4().hex  # binds the sites' state to this run (client._bind_run)
    for stale in (rdir / SERVER_MODEL_NAME, rdir / CHECKPOINT_NAME):  # a finished run's files
        stale.unlink(missing_ok=True)
    if bool(cfg.fl.resume) and ckpt_path.is_file():
        saved = server_ckpt.load(ckpt_path)
        server_ckpt.check_resumable(saved, str(cfg.fl.strategy), chash, ckpt_path)
        if set(saved.arrays) != set(held):
            raise KeyError(f"{ckpt_path} holds other arrays than this model's")
        start = _Start(saved.to_record(), saved.server_round + 1, saved.history,
                       saved.mlflow_run_id, saved.run_identity or run_identity)
        log(INFO, "Resuming %s from %s at round %d", workspace.run_name(cfg), ckpt_path,
            start.first_round)
        return start
    # A fresh run: forget an earlier run of the same name's checkpoint. The sites discard
    # their own state of that run when they see this run's new identity
    # (m4fuse.personal.site_store.SiteStateStore.bind_run); the server touches no site's folder.
    ckpt_path.unlink(missing_ok=True)
    return _Start(arrays, 1, [], None, run_identity)


def _strategy(cfg: DictConfig, names: list[str], held: dict[str, torch.Tensor]):
    """The server strategy of ``fl.*`` for the sites ``names`` and the arrays ``held``."""
    server_opt, server_opt_args = server_opt_settings(cfg.fl)
    aggregation, aggregation_args = aggregation_settings(cfg.fl)
    return make_strategy(
        str(cfg.fl.strategy),
        num_sites=len(names),
        fraction_train=float(cfg.fl.fraction_train),
        min_train_sites=int(cfg.fl.min_train_sites),
        proximal_mu=float(cfg.fl.proximal_mu),
        expected_keys=held.keys(),
        site_names=names,
        min_sites=int(cfg.fl.min_sites),
        norm_bound=float(cfg.fl.norm_bound),
        aggregation=aggregation,
        trim=aggregation_args["trim"],
        server_opt=server_opt,
        server_opt_args=server_opt_args,
        krum_malicious=aggregation_args["krum_malicious"],
        krum_select=aggregation_args["krum_select"],
        aggregation_weight=aggregation_args["aggregation_weight"],
    )


def _restore_train_counts(strategy: Any, names: list[str],
                          history: list[dict[str, Any]]) -> None:
    """A resumed run: the case counts the sites reported before."""
    for entry in history:
        for index, metrics in entry["train_by_site"].items():
            if "num-examples" in metrics and 0 <= int(index) < len(names):
                strategy.train_counts.setdefault(names[int(index)],
                                                 float(metrics["num-examples"]))


def _record_test_failures(rdir: Path, tracker: Tracker, final: Any) -> dict[str, str]:
    """The sites without test scores (left out of the mean), written to the failure file
    and MLflow; recorded beside the rounds, not in them (the history's entries are what the
    round checkpoints hold and a resumed run continues, and the test round is not a round)."""
    test_failed = {k.split("/", 1)[-1]: v for k, v in final.failed.items()}
    if test_failed:
        # The run finished, but these sites have no test scores (left out of the mean).
        (rdir / FAILURE_FILE).write_text("".join(
            f"final test round: {site}: {why}\n" for site, why in sorted(test_failed.items())))
        tracker.log_dict(test_failed, "failed/test.json")
        tracker.set_tag("test_failed_sites", ", ".join(sorted(test_failed))[:5000])
    return test_failed


def _finish(cfg: DictConfig, rdir: Path, names: list[str], start: _Start, tracker: Tracker,
            arrays: ArrayRecord, final: Any, wall: float) -> report.RunSummary:
    """After the final test: the per-site table, run outputs, final metrics and the server's
    part of the final model, all logged to MLflow."""
    strategy_name, history = str(cfg.fl.strategy), start.history
    val_by_site = {int(i): m for i, m in history[-1]["val_by_site"].items()} if history else {}
    test_by_site = dict(final.evaluate_by_site)
    test_failed = _record_test_failures(rdir, tracker, final)
    not_scored = {"val": {int(i): int(n) for i, n in history[-1].get("not_scored", {}).items()}
                  if history else {}, "test": dict(final.not_scored)}
    rows = report.site_rows(names, val_by_site, test_by_site, not_scored,
                            privacy=report.privacy_spent(history))
    sent = sum(e["bytes_sent"] for e in history) + final.bytes_sent
    received = sum(e["bytes_received"] for e in history)
    seconds = time.perf_counter() - wall
    failed_note = "".join(f"test not scored for {site}: {why}\n"
                          for site, why in sorted(test_failed.items()))
    table, outputs = report.write_run_outputs(
        rdir, names, rows, history,
        {"mode": strategy_name, "seconds": seconds, "bytes_sent": sent,
         "bytes_received": received, "first_round": start.first_round,
         "mlflow_run_id": tracker.run_id, "test_failed": test_failed,
         # where `m4fuse model assemble` logs model.ckpt and the overlays to this MLflow run
         "mlflow_tracking_uri": tracking_uri(cfg) if tracker.run_id else None,
         "run_identity": start.run_identity, "site_names": list(names)},
        title=f"{workspace.run_name(cfg)} ({strategy_name}): per-site results",
        plot_title=f"{workspace.run_name(cfg)}: validation Dice",
        footer=f"{failed_note}bytes sent {sent}, received {received}, "
               f"{seconds:.1f} s (this session)")
    # case-weighted means of the mean row: test_* (val_* is the last round's)
    final_metrics = final_test_metrics(rows[-1], test_by_site)
    for stage, by_site in not_scored.items():
        for index, cases in by_site.items():
            final_metrics[f"site{index}/{stage}_not_scored_cases"] = float(cases)
    final_metrics.update({"total_bytes_sent": sent, "total_bytes_received": received,
                          "wall_seconds": seconds, "test_failed_sites": len(test_failed)})
    final_metrics.update(report.optimiser_steps_metrics(history, names))
    tracker.log_metrics(final_metrics, step=int(cfg.fl.rounds))
    for path in outputs:
        tracker.log_artifact(path)
    if (rdir / SERVER_MODEL_NAME).is_file():
        tracker.log_artifact(rdir / SERVER_MODEL_NAME, "model")
    tracker.finish()
    return report.RunSummary(strategy_name, rdir, names, rows, table, history, tracker.run_id,
                             seconds, start.first_round, sent, received)


def _round_configs(cfg: DictConfig, rdir: Path, run_identity: str
                   ) -> tuple[ConfigRecord, ConfigRecord]:
    """``(train config, evaluate config)`` the server sends every round: the run folder and
    identity, and for training ``local-epochs`` (and ``local-steps`` under ``fl.local_steps``)."""
    common = {"run-dir": str(rdir), "run-identity": run_identity}
    train_config = ConfigRecord({**common, "local-epochs": int(cfg.fl.local_epochs)})
    if cfg.fl.get("local_steps") is not None:  # a fixed number of optimiser steps per round
        train_config["local-steps"] = int(cfg.fl.local_steps)
    return train_config, ConfigRecord(common)


def _round_recorder(cfg: DictConfig, ckpt_path: Path, chash: str, tracker: Tracker,
                    start: _Start) -> Callable[[RoundLog, ArrayRecord], None]:
    """What the server does after each round: the round's entry appended to
    ``start.history``, the round checkpoint, MLflow metrics (and failures), a log line."""
    strategy_name, history = str(cfg.fl.strategy), start.history

    def on_round_end(rl: RoundLog, new_arrays: ArrayRecord) -> None:
        entry = _round_entry(rl)
        history.append(entry)
        server_ckpt.save(ckpt_path, server_ckpt.ServerCheckpoint(
            rl.server_round, strategy_name, chash, server_ckpt.record_to_numpy(new_arrays),
            tracker.run_id, history, start.run_identity))
        tracker.log_metrics(round_metrics(entry), step=rl.server_round)
        if rl.failed:
            tracker.log_dict(entry["failed"], f"failed/round-{rl.server_round:03d}.json")
        log(INFO, "round %d: val dice_mean %.3f, %.1f s, %d B sent, %d B received",
            rl.server_round, entry["val"].get("dice_mean", float("nan")), rl.seconds,
            rl.bytes_sent, rl.bytes_received)

    return on_round_end


def _final_model_writer(cfg: DictConfig, rdir: Path, names: list[str]
                        ) -> Callable[[ArrayRecord], None]:
    """What the server does before the final test: write its part of the final model."""

    def before_final_test(final_arrays: ArrayRecord) -> None:
        path = save_server_part(cfg, rdir, final_arrays, names)
        if path is not None:
            log(INFO, "the server's part of the final model: %s (`m4fuse model assemble %s` "
                "adds each site's own weights from its state folder)", path, rdir)

    return before_final_test


def _record_failure(cfg: DictConfig, rdir: Path, tracker: Tracker, exc: BaseException) -> None:
    """A run that stopped: its one line in the failure file, the log and MLflow."""
    message = f"{type(exc).__name__}: {exc}"
    (rdir / FAILURE_FILE).write_text(message + "\n")
    log(ERROR, "federated run %s stopped: %s", workspace.run_name(cfg), message)
    tracker.set_tag("failure", message[:5000])
    tracker.finish("FAILED")


def run_federated(grid: Grid, cfg: DictConfig, names: list[str] | None = None
                  ) -> report.RunSummary:
    """Run the configured federated experiment on ``grid`` (simulation or deployment);
    ``names`` are the sites :func:`prepare_run` returned (default: it runs here)."""
    wall = time.perf_counter()
    strategy_name = str(cfg.fl.strategy)
    if names is None:
        names = prepare_run(grid, cfg)
    rdir = workspace.run_dir(cfg)
    rdir.mkdir(parents=True, exist_ok=True)
    ckpt_path = rdir / CHECKPOINT_FILE
    chash = resume_hash(cfg)
    held, _ = initial_state(cfg)
    start = _start(cfg, rdir, ckpt_path, chash, held)
    (rdir / FAILURE_FILE).unlink(missing_ok=True)
    tracker = Tracker(cfg, workspace.run_name(cfg), start.mlflow_run_id,
                      tags={"kind": "federated", "strategy": strategy_name,
                            "run_identity": start.run_identity})
    strategy = _strategy(cfg, names, held)
    log(INFO, "run %s: identity %s", workspace.run_name(cfg), start.run_identity)
    _restore_train_counts(strategy, names, start.history)
    train_config, evaluate_config = _round_configs(cfg, rdir, start.run_identity)
    try:
        arrays, final = strategy.run_rounds(
            grid, start.arrays, start.first_round, int(cfg.fl.rounds), train_config,
            evaluate_config, float(cfg.fl.round_timeout),
            _round_recorder(cfg, ckpt_path, chash, tracker, start),
            float(cfg.fl.wait_for_sites), before_final_test=_final_model_writer(cfg, rdir, names),
        )
    except BaseException as exc:
        _record_failure(cfg, rdir, tracker, exc)
        raise
    summary = _finish(cfg, rdir, names, start, tracker, arrays, final, wall)
    if strategy_name != "local":  # the server never reads a site's folder: the last step
        log(INFO, "run %s finished; the final model with each site's own weights (model.ckpt) "
            "and the overlays are made by the next step, which also logs them to MLflow: "
            "m4fuse model assemble %s", workspace.run_name(cfg), rdir)
    return summary
