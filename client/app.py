"""The Flower ClientApp: one hospital (site) of the federation.

Only translation lives here: the message's arrays and config become a model state and a call
into :mod:`m4fuse.experiment` (the same training steps the pooled and local baselines use),
and the result becomes a reply with one ArrayRecord (what the strategy shares, see
:mod:`client.weights`) and one MetricRecord with the same keys from every site.

The site's personal weights (its expert; the whole model under ``local``) live in
``context.state["kept"]`` between rounds and are also written to the site's state folder
(``state-dir`` of the node config; in simulation ``<run dir>/clients/<site>``) so that a
restarted client or a resumed run keeps them. They never enter a reply.
"""

from __future__ import annotations

import time

import torch
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site import Site
from client.weights import (
    from_record,
    kept_state,
    load_round_state,
    newest_kept,
    outgoing_state,
    save_atomic,
    to_record,
)
from m4fuse import experiment

app = ClientApp()

KEPT_RECORD = "kept"
#: Files kept per site: the newest two rounds (a stop between a client's save and the
#: server's checkpoint must not lose the round the server resumes from).
KEEP_FILES = 2


def _kept(context: Context, site: Site, strategy: str, before_round: int
          ) -> dict[str, torch.Tensor] | None:
    """The site's kept weights: from ``context.state``, else from its state folder (the
    newest ``kept-r<k>.pt`` with k < ``before_round``: a resumed run or restarted client)."""
    if KEPT_RECORD in context.state.array_records:
        return from_record(context.state.array_records[KEPT_RECORD])
    if site.state_dir is None:
        return None
    saved = newest_kept(site.state_dir, before_round)
    if saved is None:
        return None
    if saved.get("strategy") != strategy:
        raise ValueError(
            f"{site.state_dir} holds state of strategy {saved.get('strategy')!r}, this run "
            f"uses {strategy!r}; use another run_name or state-dir"
        )
    return dict(saved["state"])


def _save_kept(site: Site, state: dict[str, torch.Tensor], server_round: int,
               strategy: str) -> None:
    """Write ``kept-r<round>.pt`` atomically and drop all but the newest :data:`KEEP_FILES`."""
    assert site.state_dir is not None
    save_atomic({"state": state, "round": server_round, "strategy": strategy,
                 "site": site.name}, site.state_dir / f"kept-r{server_round}.pt")
    files = sorted(site.state_dir.glob("kept-r*.pt"),
                   key=lambda p: int(p.stem.split("-r", 1)[1]))
    for old in files[:-KEEP_FILES]:
        old.unlink(missing_ok=True)


def _prepare(msg: Message, context: Context) -> tuple[Site, torch.nn.Module, str, dict]:
    """Resolve the site and build its model for this round's arrays and kept weights."""
    config = msg.content.config_records["config"]
    run_dir = str(config["run-dir"]) if "run-dir" in config else None
    site = Site.resolve(context.run_config, context.node_config, run_dir)
    strategy = str(site.cfg.fl.strategy)
    # Same seed on every site: all sites start from the same initial weights as the server.
    model = experiment.build_model(site.cfg, num_experts=1)
    incoming = from_record(msg.content.array_records["arrays"])
    server_round = int(config["server-round"])
    # Train round r starts from what the site kept before r; evaluation of round r scores
    # what it kept after training in r.
    bound = server_round if msg.metadata.message_type == MessageType.TRAIN else server_round + 1
    load_round_state(model, strategy, incoming, _kept(context, site, strategy, bound))
    return site, model, strategy, incoming


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this site's model on its training cases for ``local-epochs`` epochs."""
    start = time.perf_counter()
    config = msg.content.config_records["config"]
    site, model, strategy, incoming = _prepare(msg, context)
    server_round = int(config["server-round"])
    mu = float(config.get("proximal-mu", 0.0)) if strategy == "fedprox" else 0.0
    reference = {k: v.to(site.device) for k, v in incoming.items()} if mu > 0 else None
    result = experiment.train_site(
        model,
        site.records["train"],
        expert_index=0,
        cfg=site.cfg,
        device=site.device,
        epochs=int(config.get("local-epochs", site.cfg.fl.local_epochs)),
        seed=int(site.cfg.seed) * 1000 + site.index * 100 + server_round,
        prox_mu=mu,
        prox_reference=reference,
        schedule=(server_round - 1, max(server_round, int(site.cfg.fl.rounds))),
    )
    kept = kept_state(model, strategy)
    if kept:
        context.state.array_records[KEPT_RECORD] = to_record(kept)
        if site.state_dir is not None:
            _save_kept(site, kept, server_round, strategy)
    metrics = MetricRecord(
        {
            "loss": result["loss"],
            "num-examples": len(site.records["train"]),
            "site-index": site.index,
            "seconds": time.perf_counter() - start,
        }
    )
    content = RecordDict({"arrays": to_record(outgoing_state(model, strategy)), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score this site's personalised model: validation cases each round; with the config
    flag ``final-test`` its test cases on the original voxel grid."""
    start = time.perf_counter()
    config = msg.content.config_records["config"]
    site, model, _, _ = _prepare(msg, context)
    model.eval()
    if bool(config.get("final-test", False)):
        scores, _ = experiment.test_site(model, site.records["test"], 0, site.device)
    else:
        scores = experiment.validate_site(
            model, site.records["val"], 0, site.cfg, site.device
        )
    values: dict[str, float | int] = {k: float(scores[k]) for k in experiment.METRIC_KEYS}
    values["num-examples"] = int(scores["num-examples"])
    values["site-index"] = site.index
    values["seconds"] = time.perf_counter() - start
    content = RecordDict({"metrics": MetricRecord(values)})
    return Message(content=content, reply_to=msg)


__all__ = ["app", "train", "evaluate"]
