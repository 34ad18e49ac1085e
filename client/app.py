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
3. training, with DP-SGD when ``privacy.enabled`` (:mod:`m4fuse.training.dp`): Opacus wraps the
   model, optimiser and loader inside :func:`m4fuse.training.site_steps.train_site`; the accountant's
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
new run identity clears all of it. None of it ever enters a reply.
"""

from __future__ import annotations

import copy
import dataclasses
import math
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
from client.weights import (
    KEPT,
    from_record,
    kept_state,
    load_round_state,
    outgoing_state,
    to_record,
)
from m4fuse.evaluation.metrics import LESION_REPORTED_KEYS, REPORTED_METRIC_KEYS
from m4fuse.personal.sets import expert_state, is_personal, place_expert, split_state
from m4fuse.personal.sets import strategy as state_strategy
from m4fuse.personal.site_store import SiteState, SiteStateStore, model_fingerprint
from m4fuse.run import settings
from m4fuse.run.logs import configure_logging
from m4fuse.run.rules import dp_rules
from m4fuse.training import site_steps
from m4fuse.training.dp import (
    PrivacyConfig,
    PrivateTraining,
    make_private_training,
    noise_only_step,
    plan_site,
)

configure_logging()  # after m4fuse.training.dp imported Opacus (see m4fuse.run.logs)
#: The ClientApp's mods, outermost first: fault injection around the handlers.
MODS = [fault_mod]
app = ClientApp(mods=MODS)

KEPT_RECORD = "kept"
ACCOUNTANT_RECORD = "dp-accountant"
#: AdamW moments kept between rounds (``fl.optimizer_state`` personal/all), one array per
#: ``"<parameter name>|<state key>"``; only in ``context.state``, never sent nor written.
OPTIMIZER_RECORD = "optimizer-state"
_SEP = "|"


# --------------------------------------------------------------------------- kept state


def _fingerprint(cfg: DictConfig, strategy: str) -> str:
    """Fingerprint of the site model's config plus what the strategy keeps (``personal`` or
    ``all``): an expert of another architecture, or a whole ``local`` model read by a
    ``personal`` run of the same name, is refused by :meth:`SiteStateStore.load`."""
    fields = dataclasses.asdict(settings.model_config(cfg, num_experts=1))
    # "personal" for the experts-only set: the name site states were written with before
    # the personal sets existed, so their folders stay readable.
    fields["kept"] = {"experts": "personal"}.get(KEPT[strategy], KEPT[strategy])
    return model_fingerprint(fields)


def _store(site: Site) -> SiteStateStore | None:
    return None if site.state_dir is None else SiteStateStore(site.state_dir, site.name)


def _kept(context: Context, site: Site, model: torch.nn.Module, strategy: str,
          before_round: int) -> dict[str, torch.Tensor] | None:
    """The site's kept weights: from ``context.state``, else the newest state in its folder
    with round < ``before_round`` (a resumed run or a restarted client)."""
    if KEPT_RECORD in context.state.array_records:
        return from_record(context.state.array_records[KEPT_RECORD])
    store = _store(site)
    if store is None or KEPT[strategy] == "none":
        return None
    like = expert_state(model.state_dict(), 0)
    saved = store.load(_fingerprint(site.cfg, strategy), before_round, like=like)
    if saved is None:
        return None
    kept = place_expert(saved.expert, 0)
    if KEPT[strategy] != "experts":
        # The set keeps more than the expert: the rest is in the state's ``shared`` field.
        if not saved.shared:
            raise ValueError(f"{store.path(saved.round)} holds no non-expert weights, "
                             f"strategy {strategy!r} keeps {KEPT[strategy]!r}")
        kept.update(saved.shared)
    return kept


def _save_kept(site: Site, kept: Mapping[str, torch.Tensor], strategy: str, server_round: int,
               metrics: Mapping[str, float]) -> None:
    """Write the round's :class:`SiteState` (expert index-free; the weights outside the
    expert, e.g. the norms of ``personal-norm``, the whole model of ``local`` or a
    ``-ft-all`` fine-tuning, in its ``shared`` field; the round's finite metrics). The
    optimiser is not written: AdamW moments kept under ``fl.optimizer_state`` live in
    ``context.state`` only."""
    store = _store(site)
    if store is None or not kept:
        return
    shared, personal = split_state(dict(kept))
    store.save(SiteState(
        site=site.name, round=server_round, fingerprint=_fingerprint(site.cfg, strategy),
        expert=expert_state(personal, 0), optimizer=None,
        metrics={k: float(v) for k, v in metrics.items() if math.isfinite(float(v))},
        shared=shared or None,
    ))


def _save_finetuned(context: Context, site: Site, model: torch.nn.Module, strategy: str,
                    server_round: int, metrics: Mapping[str, float]) -> None:
    """After a kept fine-tuning (final test): the site's personal state becomes the
    fine-tuned one, in ``context.state`` (what the strategy keeps, nothing more) and in its
    folder as the state of ``server_round`` (the last round's file is overwritten): there
    both what it keeps and what it fine-tuned (for ``fedavg-ft`` the norms and expert, for
    ``-ft-all`` the whole model), so the final model (``m4fuse.io.checkpoint.add_site_states``)
    holds what the final test scored; a resumed run reads only the kept set from it."""
    spec = state_strategy(strategy)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if spec.kept != "none":
        context.state.array_records[KEPT_RECORD] = to_record(split_state(state, spec.kept)[1])
    saved = {k: v for k, v in state.items()
             if is_personal(k, spec.kept) or is_personal(k, str(spec.finetune))}
    _save_kept(site, saved, strategy, server_round, metrics)


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


def _kept_optimizer_state(context: Context, mode: str
                          ) -> dict[str, dict[str, torch.Tensor]] | None:
    """The AdamW state to start a round from: None under ``fl.optimizer_state=fresh``
    (``experiment.train_site`` then builds a fresh AdamW as always), else what the site kept
    after its previous round (``{}`` before its first)."""
    if mode == "fresh":
        return None
    out: dict[str, dict[str, torch.Tensor]] = {}
    if OPTIMIZER_RECORD in context.state.array_records:
        for key, value in from_record(context.state.array_records[OPTIMIZER_RECORD]).items():
            name, entry = key.rsplit(_SEP, 1)
            out.setdefault(name, {})[entry] = value
    return out


def _keep_optimizer_state(context: Context, mode: str, strategy: str,
                          state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Store the round's AdamW state in ``context.state``: under ``personal`` only the
    parameters of the strategy's kept set (the shared ones restart next round), under
    ``all`` every parameter's."""
    if mode == "personal":
        state = split_state(dict(state), KEPT[strategy])[1]
    flat = {f"{name}{_SEP}{key}": value for name, entry in state.items()
            for key, value in entry.items()}
    context.state.array_records[OPTIMIZER_RECORD] = to_record(flat)


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


def _steps(record: Mapping[str, Any] | None) -> int:
    return -1 if record is None else sum(int(k) for k in record.get("steps", []))


def _restored_accountant(context: Context, store: SiteStateStore | None
                         ) -> dict[str, Any] | None:
    """The accountant history with the most steps of ``context.state`` and the state folder
    (normally the same; taking the larger never under-counts what the site spent)."""
    candidates: list[dict[str, Any] | None] = [None]
    if ACCOUNTANT_RECORD in context.state.config_records:
        candidates.append(dict(context.state.config_records[ACCOUNTANT_RECORD]))
    if store is not None:
        candidates.append(store.load_accountant())
    return max(candidates, key=_steps)


# --------------------------------------------------------------------------- handlers


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this site's model on its training cases for ``local-epochs`` epochs."""
    start = time.perf_counter()
    config = msg.content.config_records["config"]
    server_round = int(config["server-round"])
    site = _site(msg, context)
    strategy = str(site.cfg.fl.strategy)
    privacy = privacy_config(site.cfg)
    cfg = check_dp_training(site.cfg, strategy) if privacy.enabled else site.cfg
    model, incoming = _build(site, msg, context, strategy)
    mu = float(config.get("proximal-mu", 0.0)) if strategy == "fedprox" else 0.0
    reference = {k: v.to(site.device) for k, v in incoming.items()} if mu > 0 else None
    epochs = int(config.get("local-epochs", cfg.fl.local_epochs))
    # fl.local_steps: a fixed number of optimiser steps per round instead of epochs
    local_steps = config.get("local-steps", cfg.fl.get("local_steps"))
    max_steps = None if local_steps is None else int(local_steps)
    plan = None
    if privacy.enabled:  # σ, q and the steps over the whole run; a target out of reach fails
        plan = plan_site(privacy, len(site.records["train"]),
                         batch_size=int(cfg.train.batch_size), rounds=int(cfg.fl.rounds),
                         local_epochs=epochs, local_steps=max_steps, site=site.name)
        if max_steps is not None or privacy.expected_batch is not None:
            max_steps = plan.steps_per_round
    seed = int(cfg.seed) * 1000 + site.index * 100 + server_round
    store = _store(site)
    private: list[PrivateTraining] = []
    optimizer_mode = str(cfg.fl.get("optimizer_state", "fresh"))

    def wrap(net: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: Any):
        restored = _restored_accountant(context, store)
        wrapped = make_private_training(
            net, optimizer, loader, privacy,
            total_epochs=int(cfg.fl.rounds) * epochs, accountant_state=restored,
            seed=None if privacy.secure_rng else seed,
            total_steps=None if plan is None else plan.total_steps,
            sample_rate=(plan.sample_rate if plan is not None
                         and privacy.expected_batch is not None else None),
        )
        private.append(wrapped)
        return wrapped.module, wrapped.optimizer, wrapped.loader

    try:
        result = site_steps.train_site(
            model,
            site.records["train"],
            expert_index=0,
            cfg=cfg,
            device=site.device,
            epochs=epochs,
            seed=seed,
            prox_mu=mu,
            prox_reference=reference,
            schedule=(server_round - 1, max(server_round, int(cfg.fl.rounds))),
            wrap=wrap if privacy.enabled else None,
            on_empty_batch=noise_only_step if privacy.enabled else None,
            lr_scale=site_steps.personal_lr_scale(model, cfg),
            optimizer_state=_kept_optimizer_state(context, optimizer_mode),
            max_steps=max_steps,
        )
    finally:
        # Steps taken are spent even if the round fails later: persist the accountant first.
        for p in private:
            p.close()
            state = p.accountant_state()
            context.state.config_records[ACCOUNTANT_RECORD] = ConfigRecord(state)
            if store is not None:
                store.save_accountant(state)
    values: dict[str, float | int] = {
        "loss": result["loss"],
        "num-examples": len(site.records["train"]),
        "site-index": site.index,
        "steps": float(result["steps"]),  # optimiser steps this round (FedNova, the tables)
    }
    if privacy.enabled:
        values.update(private[0].metrics())
    if "optimizer_state" in result:
        _keep_optimizer_state(context, optimizer_mode, strategy, result["optimizer_state"])
    kept = kept_state(model, strategy)
    if kept:
        context.state.array_records[KEPT_RECORD] = to_record(kept)
        _save_kept(site, kept, strategy, server_round, values)
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
    site_cases = sum(len(site.records[k]) for k in ("train", "val", "test"))
    if not records:
        # A site too small to hold out cases for this stage: not scored (the server leaves
        # num-examples 0 out of the mean and reports "not scored: <site-cases> cases").
        # the final test's replies carry the lesion-wise scores too (every reply: same keys)
        keys = REPORTED_METRIC_KEYS + (LESION_REPORTED_KEYS if final_test else ())
        values: dict[str, float | int] = {k: 0.0 for k in keys}
        values.update({"num-examples": 0, "site-cases": site_cases, "site-index": site.index,
                       "seconds": time.perf_counter() - start})
        return Message(content=RecordDict({"metrics": MetricRecord(values)}), reply_to=msg)
    model, _ = _build(site, msg, context, str(site.cfg.fl.strategy))
    strategy = state_strategy(str(site.cfg.fl.strategy))
    tuned: dict[str, float] = {}
    if final_test and strategy.finetune and int(site.cfg.fl.finetune_epochs) > 0:
        tuned = finetune(model, site, strategy.finetune)
        if tuned["finetune-kept"]:
            # num-examples (training cases): the final model weighs sites by it
            _save_finetuned(context, site, model, str(site.cfg.fl.strategy),
                            int(config["server-round"]),
                            {**tuned, "num-examples": len(site.records["train"])})
    model.eval()
    if final_test:
        scores, _ = site_steps.test_site(model, records, 0, site.device, site.cfg)
        _write_overlay(site, model, records)
    else:
        scores = site_steps.validate_site(model, records, 0, site.cfg, site.device)
    values = {k: float(scores[k])
              for k in REPORTED_METRIC_KEYS + (LESION_REPORTED_KEYS if final_test else ())}
    values["num-examples"] = int(scores["num-examples"])
    values["site-cases"] = site_cases
    values["site-index"] = site.index
    values.update(tuned)
    values["seconds"] = time.perf_counter() - start
    content = RecordDict({"metrics": MetricRecord(values)})
    return Message(content=content, reply_to=msg)


def finetune(model: torch.nn.Module, site: Site, personal: str) -> dict[str, float]:
    """Fine-tune the personal set ``personal`` of ``model`` on the site's training cases for
    up to ``fl.finetune_epochs`` epochs, every other weight frozen, keeping the epoch its
    validation cases score best (:func:`m4fuse.training.site_steps.finetune_best_epoch`, seeded with
    :func:`m4fuse.training.site_steps.finetune_seed`). Returns its metrics for the reply."""
    return site_steps.finetune_best_epoch(
        model, site.records["train"], site.records["val"], 0, site.cfg, site.device,
        personal=personal, epochs=int(site.cfg.fl.finetune_epochs),
        seed=site_steps.finetune_seed(int(site.cfg.seed), site.index))


__all__ = ["app", "train", "evaluate", "privacy_config", "check_dp_training"]
