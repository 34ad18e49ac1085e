"""The Flower ClientApp: one hospital (site) of the federation.

Only translation lives here: the message's arrays and config become a model state and a call
into :mod:`m4fuse.training.site_steps` (the same training steps the pooled and local baselines use),
and the result becomes a reply with one ArrayRecord (what the strategy shares, see
:mod:`client.weights`) and one MetricRecord with the same keys from every site.

Per train message, in order:

1. faults (:mod:`client.faults`, config ``fl.faults``; default none) are not the handler's:
   :func:`client.faults.fault_mod`, a Flower client mod of :data:`app`, delays or crashes
   the site before the handler runs, or turns its reply's arrays into NaN after it;
2. the model: the server's arrays plus what the site kept (below);
3. training, with DP-SGD when ``privacy.enabled`` (:mod:`m4fuse.training.dp`): its
   ``PrivateTrainer`` wraps the model, optimiser and loader with Opacus inside
   :func:`m4fuse.training.site_steps.train_site`; the accountant's
   history survives rounds and restarts, and every reply carries ``dp-epsilon``,
   ``dp-delta``, ``dp-noise-multiplier`` and ``dp-steps`` (same keys from every site);
4. the reply: the shared arrays and metrics.

The site's personal weights (its expert; the whole model under ``local``) live in
``context.state["kept"]`` between rounds (the first source, in simulation and in a running
SuperNode) and in the site's state folder (``state-dir`` of the node config; in simulation
``<run dir>/clients/<site>``) as :class:`m4fuse.personal.site_store.SiteState` files, the fallback
for a restarted client or a resumed run. The DP accountant likewise lives in
``context.state["dp-accountant"]`` and in the folder's ``dp-accountant.json``. Under
``fl.optimizer_state`` personal/all the AdamW moments (of the kept set / of every parameter)
live in ``context.state["optimizer-state"]`` only (a restarted client starts them fresh). A
new run identity clears all of it. None of it ever enters a reply. What is kept, and how,
is decided in :mod:`m4fuse.personal.site_keep`; this module moves it in and out of
``context.state``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from logging import WARNING
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore import log
from omegaconf import DictConfig, OmegaConf

from client.faults import fault_mod
from client.site import Site
from client.weights import from_record, kept_state, load_round_state, outgoing_state, to_record
from m4fuse.evaluation.metrics import LESION_REPORTED_KEYS, REPORTED_METRIC_KEYS
from m4fuse.personal import finetune as personal_finetune
from m4fuse.personal import site_keep
from m4fuse.personal.finetune import personal_lr_scale
from m4fuse.personal.sets import strategy as state_strategy
from m4fuse.personal.site_store import SiteStateStore
from m4fuse.run import settings
from m4fuse.run.logs import configure_logging
from m4fuse.run.rules import dp_rules
from m4fuse.training import site_steps
from m4fuse.training.dp import PrivacyConfig, PrivateRound, plan_round

configure_logging()  # after m4fuse.training.dp imported Opacus (see m4fuse.run.logs)
#: The ClientApp's mods, outermost first: fault injection around the handlers.
MODS = [fault_mod]
app = ClientApp(mods=MODS)

KEPT_RECORD = "kept"
ACCOUNTANT_RECORD = "dp-accountant"
#: AdamW moments kept between rounds (``fl.optimizer_state`` personal/all), one array per
#: ``"<parameter name>|<state key>"``; only in ``context.state``, never sent nor written.
OPTIMIZER_RECORD = "optimizer-state"


# --------------------------------------------------------------------------- kept state
# The site's memory between rounds (context.state) <-> m4fuse.personal.site_keep, which
# decides what is kept.


def _store(site: Site) -> SiteStateStore | None:
    return None if site.state_dir is None else SiteStateStore(site.state_dir, site.name)


def _kept(context: Context, site: Site, model: torch.nn.Module, strategy: str,
          before_round: int) -> dict[str, torch.Tensor] | None:
    """The site's kept weights: from ``context.state``, else the newest state in its folder
    with round < ``before_round`` (a resumed run or a restarted client)."""
    if KEPT_RECORD in context.state.array_records:
        return from_record(context.state.array_records[KEPT_RECORD])
    return site_keep.stored_kept(_store(site), site.cfg, model, strategy, before_round)


def _keep(context: Context, site: Site, model: torch.nn.Module, server_round: int,
          metrics: Mapping[str, float], optimizer_state: Mapping[str, Any] | None) -> None:
    """After training: the kept weights into ``context.state`` and the site's folder, the
    AdamW moments (``fl.optimizer_state``) into ``context.state`` only."""
    strategy = str(site.cfg.fl.strategy)
    if optimizer_state is not None:
        mode = str(site.cfg.fl.get("optimizer_state", "fresh"))
        context.state.array_records[OPTIMIZER_RECORD] = to_record(
            site_keep.optimizer_state_to_keep(optimizer_state, mode, strategy))
    kept = kept_state(model, strategy)
    if kept:
        context.state.array_records[KEPT_RECORD] = to_record(kept)
        site_keep.save_kept(_store(site), site.name, site.cfg, kept, strategy, server_round,
                            metrics)


def _save_finetuned(context: Context, site: Site, model: torch.nn.Module, server_round: int,
                    metrics: Mapping[str, float]) -> None:
    """After a kept fine-tuning (final test): the site's personal state becomes the
    fine-tuned one (:func:`m4fuse.personal.site_keep.finetuned_states`), in ``context.state``
    and in its folder as the state of ``server_round`` (the last round's file is
    overwritten), so the final model (``m4fuse.io.checkpoint.add_site_states``) holds what
    the final test scored; a resumed run reads only the kept set from it."""
    strategy = str(site.cfg.fl.strategy)
    kept, saved = site_keep.finetuned_states(model, strategy)
    if kept is not None:
        context.state.array_records[KEPT_RECORD] = to_record(kept)
    site_keep.save_kept(_store(site), site.name, site.cfg, saved, strategy, server_round,
                        metrics)


def _build(site: Site, msg: Message, context: Context, strategy: str
           ) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The site's model for this message: server arrays plus its kept weights."""
    config = msg.content.config_records["config"]
    # Same seed on every site: all sites start from the same initial weights as the server.
    model = settings.build_model(site.cfg, num_experts=1)
    incoming = from_record(msg.content.array_records["arrays"])
    server_round = int(config["server-round"])
    # Train round r starts from what the site kept before r; evaluation of round r scores
    # what it kept after training in r.
    bound = server_round if msg.metadata.message_type == MessageType.TRAIN else server_round + 1
    load_round_state(model, strategy, incoming, _kept(context, site, model, strategy, bound))
    return model, incoming


def _site(msg: Message, context: Context) -> Site:
    config = msg.content.config_records["config"]
    run_dir = str(config["run-dir"]) if "run-dir" in config else None
    site = Site.resolve(context.run_config, context.node_config, run_dir)
    if RUN_IDENTITY in config:
        _bind_run(site, str(config[RUN_IDENTITY]), context)
    return site


RUN_IDENTITY = "run-identity"
#: The per-site picture of a test case (in the site's state folder; never sent).
OVERLAY_PREFIX = "overlay-test-"


def _write_overlay(site: Site, model: torch.nn.Module, records: list) -> None:
    """Axial slices of the site's first test case with reference and prediction outlined,
    written into its state folder (it stays at the site; in simulation the server logs it
    to MLflow). A failure to draw is logged, never fails the test round."""
    if site.state_dir is None or not records:
        return
    case = sorted(records, key=lambda r: r.case_id)[0]
    path = site.state_dir / f"{OVERLAY_PREFIX}{case.case_id}.png"
    try:
        site_steps.overlay_case(model, case, 0, site.device, path,
                                title=f"{site.name}: {case.case_id}", cfg=site.cfg)
    except Exception as exc:  # a picture is a by-product; the scores are already computed
        log(WARNING, "site %s: no overlay picture for %s: %s", site.name, case.case_id, exc)


def _bind_run(site: Site, identity: str, context: Context) -> None:
    """Tie the site's state (``context.state`` and its state folder) to the server's run
    identity: state of another run (an earlier run of the same name) is dropped, with one
    log line, so that its expert is never loaded and its DP spending never counted here.
    A resumed run keeps its identity (the server stores it in its checkpoint)."""
    known = context.state.config_records.get(RUN_IDENTITY)
    if known is not None and str(known.get("id", "")) != identity:
        context.state.array_records.pop(KEPT_RECORD, None)
        context.state.array_records.pop(OPTIMIZER_RECORD, None)
        context.state.config_records.pop(ACCOUNTANT_RECORD, None)
    context.state.config_records[RUN_IDENTITY] = ConfigRecord({"id": identity})
    store = _store(site)
    if store is not None:
        discarded = store.bind_run(identity)
        if discarded:
            log(WARNING, "site %s: %s", site.name, discarded)


def _kept_optimizer_state(context: Context, cfg: DictConfig
                          ) -> dict[str, dict[str, torch.Tensor]] | None:
    """The AdamW state to start a round from (None: fresh, ``fl.optimizer_state=fresh``)."""
    record = context.state.array_records.get(OPTIMIZER_RECORD)
    return site_keep.optimizer_state_to_start(
        None if record is None else from_record(record),
        str(cfg.fl.get("optimizer_state", "fresh")))


# --------------------------------------------------------------------------- privacy


def privacy_config(cfg: DictConfig) -> PrivacyConfig:
    """The run's :class:`PrivacyConfig` (the ``privacy`` group; DP off when absent)."""
    group = cfg.get("privacy")
    return PrivacyConfig.from_mapping(
        None if group is None else OmegaConf.to_container(group, resolve=True))


def check_dp_training(cfg: DictConfig, strategy: str) -> DictConfig:
    """Refuse settings DP-SGD cannot run with (:func:`m4fuse.run.rules.dp_rules`); returns
    ``cfg`` with ``train.grad_clip`` off (Opacus clips per case) and ``privacy.lr``, when
    set, in place of ``train.lr``.
    """
    dp_rules(cfg, strategy)
    cfg = copy.deepcopy(cfg)
    OmegaConf.set_struct(cfg, False)
    cfg.train.grad_clip = None
    dp_lr = privacy_config(cfg).lr
    if dp_lr is not None:
        cfg.train.lr = float(dp_lr)
    return cfg


def _restored_accountant(context: Context, site: Site) -> dict[str, Any] | None:
    """The accountant history with the most steps of ``context.state`` and the state folder."""
    record = context.state.config_records.get(ACCOUNTANT_RECORD)
    store = _store(site)
    return site_keep.newest_accountant(None if record is None else dict(record),
                                       None if store is None else store.load_accountant())


def _keep_accountant(context: Context, site: Site, dp: PrivateRound | None) -> None:
    """Steps taken are spent even if the round fails later: the accountant's history into
    ``context.state`` and the site's folder."""
    if dp is None or dp.training is None:
        return
    state = dp.training.accountant_state()
    context.state.config_records[ACCOUNTANT_RECORD] = ConfigRecord(state)
    store = _store(site)
    if store is not None:
        store.save_accountant(state)


def _train_options(msg: Message, context: Context, site: Site, cfg: DictConfig,
                   model: torch.nn.Module, incoming: Mapping[str, torch.Tensor]
                   ) -> dict[str, Any]:
    """The message's config and the site's memory as the keyword arguments of
    :func:`m4fuse.training.site_steps.train_site` (epochs, seed, FedProx, schedule, kept
    optimiser state, DP-SGD round)."""
    config = msg.content.config_records["config"]
    server_round = int(config["server-round"])
    strategy = str(cfg.fl.strategy)
    mu = float(config.get("proximal-mu", 0.0)) if strategy == "fedprox" else 0.0
    epochs = int(config.get("local-epochs", cfg.fl.local_epochs))
    # fl.local_steps: a fixed number of optimiser steps per round instead of epochs
    local_steps = config.get("local-steps", cfg.fl.get("local_steps"))
    max_steps = None if local_steps is None else int(local_steps)
    seed = int(cfg.seed) * 1000 + site.index * 100 + server_round
    privacy = privacy_config(cfg)
    dp = None
    if privacy.enabled:  # σ, q and the steps over the whole run; a target out of reach fails
        dp = plan_round(privacy, len(site.records["train"]), int(cfg.train.batch_size),
                        int(cfg.fl.rounds), epochs, max_steps, seed,
                        _restored_accountant(context, site), site.name)
        max_steps = dp.max_steps
    return {
        "epochs": epochs, "seed": seed, "prox_mu": mu,
        "prox_reference": {k: v.to(site.device) for k, v in incoming.items()} if mu > 0 else None,
        "schedule": (server_round - 1, max(server_round, int(cfg.fl.rounds))),
        "private": dp, "lr_scale": personal_lr_scale(model, cfg),
        "optimizer_state": _kept_optimizer_state(context, cfg), "max_steps": max_steps,
    }


# --------------------------------------------------------------------------- handlers


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this site's model on its training cases for ``local-epochs`` epochs."""
    start = time.perf_counter()
    server_round = int(msg.content.config_records["config"]["server-round"])
    site = _site(msg, context)
    strategy = str(site.cfg.fl.strategy)
    privacy = privacy_config(site.cfg)
    cfg = check_dp_training(site.cfg, strategy) if privacy.enabled else site.cfg
    model, incoming = _build(site, msg, context, strategy)
    options = _train_options(msg, context, site, cfg, model, incoming)
    try:
        result = site_steps.train_site(model, site.records["train"], 0, cfg, site.device,
                                       **options)
    finally:
        _keep_accountant(context, site, options["private"])
    values: dict[str, float | int] = {
        "loss": result["loss"],
        "num-examples": len(site.records["train"]),
        "site-index": site.index,
        "steps": float(result["steps"]),  # optimiser steps this round (FedNova, the tables)
    }
    if options["private"] is not None:
        values.update(options["private"].training.metrics())
    _keep(context, site, model, server_round, values, result.get("optimizer_state"))
    outgoing = outgoing_state(model, strategy)
    values["seconds"] = time.perf_counter() - start
    content = RecordDict({"arrays": to_record(outgoing), "metrics": MetricRecord(values)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score this site's personalised model: validation cases each round; with the config
    flag ``final-test`` its test cases on the original voxel grid."""
    start = time.perf_counter()
    config = msg.content.config_records["config"]
    site = _site(msg, context)
    final_test = bool(config.get("final-test", False))
    records = site.records["test" if final_test else "val"]
    keys = REPORTED_METRIC_KEYS + (LESION_REPORTED_KEYS if final_test else ())
    site_cases = sum(len(site.records[k]) for k in ("train", "val", "test"))
    if not records:
        return _not_scored(msg, keys, site_cases, site.index, start)
    model, _ = _build(site, msg, context, str(site.cfg.fl.strategy))
    tuned = _finetune_before_test(context, site, model, int(config["server-round"])) \
        if final_test else {}
    model.eval()
    if final_test:
        scores, _ = site_steps.score_site_tests(model, records, 0, site.device, site.cfg)
        _write_overlay(site, model, records)
    else:
        scores = site_steps.validate_site(model, records, 0, site.cfg, site.device)
    values = {k: float(scores[k]) for k in keys}
    values["num-examples"] = int(scores["num-examples"])
    values["site-cases"] = site_cases
    values["site-index"] = site.index
    values.update(tuned)
    values["seconds"] = time.perf_counter() - start
    return Message(content=RecordDict({"metrics": MetricRecord(values)}), reply_to=msg)


def _not_scored(msg: Message, keys: tuple[str, ...], site_cases: int, site_index: int,
                start: float) -> Message:
    """The reply of a site too small to hold out cases for this stage: not scored (the
    server leaves num-examples 0 out of the mean and reports "not scored: <site-cases>
    cases"); the same keys as every reply (the final test's carry the lesion-wise scores)."""
    values: dict[str, float | int] = {k: 0.0 for k in keys}
    values.update({"num-examples": 0, "site-cases": site_cases, "site-index": site_index,
                   "seconds": time.perf_counter() - start})
    return Message(content=RecordDict({"metrics": MetricRecord(values)}), reply_to=msg)


def _finetune_before_test(context: Context, site: Site, model: torch.nn.Module,
                          server_round: int) -> dict[str, float]:
    """The "+FT" of the strategy before the final test (none: ``{}``); a kept fine-tuning
    becomes the site's personal state (:func:`_save_finetuned`). Its metrics for the reply."""
    strategy = state_strategy(str(site.cfg.fl.strategy))
    if not strategy.finetune or int(site.cfg.fl.finetune_epochs) <= 0:
        return {}
    tuned = finetune(model, site, strategy.finetune)
    if tuned["finetune-kept"]:
        # num-examples (training cases): the final model weighs sites by it
        _save_finetuned(context, site, model, server_round,
                        {**tuned, "num-examples": len(site.records["train"])})
    return tuned


def finetune(model: torch.nn.Module, site: Site, personal: str) -> dict[str, float]:
    """Fine-tune the personal set ``personal`` of ``model`` on the site's training cases for
    up to ``fl.finetune_epochs`` epochs, every other weight frozen, keeping the epoch its
    validation cases score best (:func:`m4fuse.personal.finetune.finetune_best_epoch`, seeded
    with :func:`m4fuse.personal.finetune.finetune_seed`). Returns its metrics for the reply."""
    return personal_finetune.finetune_best_epoch(
        model, site.records["train"], site.records["val"], 0, site.cfg, site.device,
        personal=personal, epochs=int(site.cfg.fl.finetune_epochs),
        seed=personal_finetune.finetune_seed(int(site.cfg.seed), site.index))


__all__ = ["app", "train", "evaluate", "privacy_config", "check_dp_training"]
