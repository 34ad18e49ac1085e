"""Server strategies: Flower's FedAvg / FedProx, weighted by training cases, plus what a
federated BraTS study needs around them.

Messages (sampling, configs, ``proximal-mu``) are Flower's FedAvg/FedProx. The combination of
the accepted shared arrays is Flower's too, but not the outer strategy's own
``aggregate_train``: Flower checks no update before combining it, while a federated study must
survive a broken site, and FedMedian/FedTrimmedAvg/FedAvgM/FedAdam are separate classes that
cannot be combined with FedProx's messages. So each strategy holds a second Flower strategy,
the *combiner* (:func:`make_combiner`), that only ever sees the accepted replies. Per round:

* every train reply is checked (:func:`server.robust.screen_updates`, hand-written because
  Flower has no such check): exactly the keys the server holds (under ``personal``/``fedprox``
  the shared keys only: an expert key is refused, never averaged), their shapes and dtypes,
  finite values, and an update norm at most ``norm_bound`` x the round's median; a failing
  reply, an error reply (the ClientApp raised) and a site that did not answer within the round
  timeout are dropped, logged and kept in :attr:`RoundLog.failed` (site name -> reason);
* fewer than ``min_sites`` usable train (or evaluate) replies stop the run with
  :class:`server.robust.QuorumError`, whose message names every failed site and why;
* the accepted updates (the shared arrays and the case count, nothing else) go to the
  combiner's ``aggregate_train``: ``aggregation`` ``mean`` is Flower's ``FedAvg`` (weighted by
  ``num-examples`` = training cases), ``trimmed_mean`` Flower's ``FedTrimmedAvg`` (``beta`` =
  ``trim``), ``median`` Flower's ``FedMedian``, ``krum`` / ``multikrum`` Flower's ``Krum`` /
  ``MultiKrum`` (f = ``krum_malicious``, m = ``krum_select``; a round with fewer accepted
  updates than :func:`m4fuse.run.aggregation.krum_needed` stops the run with
  :class:`server.robust.QuorumError`); with ``server_opt`` (default ``none``) Flower's
  ``FedAvgM``/``FedAdam``/``FedYogi``/``FedAdagrad`` then take a server step from the arrays
  sent this round towards that aggregate (:mod:`m4fuse.run.server_opt`). The result is cast back
  to the dtypes of the server's arrays (Flower keeps the arithmetic's dtype);
* per-site bookkeeping (train loss, validation and test scores by ``site-index``) and bytes
  sent/received per round (serialised array bytes);
* a round loop that can start at any round (resume) and a final test round sent through
  ``configure_evaluate`` with the ConfigRecord flag ``final-test``. Flower's
  ``Strategy.start`` always starts at round 1, hence :meth:`SiteStrategyMixin.run_rounds`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx, FedTrimmedAvg
from flwr.supercore import log

from m4fuse.personal.sets import is_personal
from m4fuse.personal.sets import strategy as named_strategy
from m4fuse.run.aggregation import KRUM_RULES, fednova_rescale, krum_needed, krum_rule, site_weight
from m4fuse.run.rules import server_rules
from server import robust
from server.combiner import make_combiner
from server.replies import (
    NO_REPLY,
    ReplyError,
    RoundLog,
    aggregate_without_bookkeeping,
    record_bytes,
    reply_metrics,
    reply_steps,
    short_reason,
)


class SiteStrategyMixin:
    """Update checks, quorum, Flower's combination of the accepted shared arrays (the
    :attr:`combiner`), per-site bookkeeping and a resumable round loop, mixed into Flower's
    :class:`FedAvg` / :class:`FedProx`.

    ``expected_keys`` are the keys of the arrays the server holds (every train reply must
    carry exactly these); ``site_names`` (sorted, position = ``site-index``) name the sites in
    logs and errors.
    """

    expected_keys: frozenset[str]
    personal_strategy: bool
    site_names: list[str]
    min_sites: int
    norm_bound: float
    aggregation: str
    trim: float
    krum_malicious: int
    krum_select: int
    combiner: FedAvg
    current: RoundLog

    def setup(self, expected_keys: Iterable[str], personal_strategy: bool,
              site_names: Sequence[str] = (), min_sites: int = 1,
              norm_bound: float = math.inf, aggregation: str = "mean",
              trim: float = 0.2, server_opt: str = "none",
              server_opt_args: Mapping[str, float] | None = None,
              krum_malicious: int = 1, krum_select: int = 1,
              aggregation_weight: str = "cases") -> None:
        """Remember the checks' settings and build the combiner (call after ``__init__``);
        defaults: no names, one usable site per round, no norm rule, case-weighted mean,
        trim 0.2, no server optimiser, Krum's f 1 and m 1, weights by training cases
        (``aggregation_weight``: :func:`m4fuse.run.aggregation.site_weight`); the settings
        are :func:`make_strategy`'s, checked there."""
        self.expected_keys = frozenset(expected_keys)
        self.personal_strategy = personal_strategy
        if personal_strategy:
            experts = sorted(k for k in self.expected_keys if is_personal(k))
            if experts:
                raise ValueError(f"the server must not hold expert weights, got {experts[:3]}")
        self.aggregation_weight = aggregation_weight
        self.site_names = list(site_names)
        self.min_sites = int(min_sites)
        self.norm_bound = float(norm_bound)
        self.aggregation = aggregation
        self.trim = float(trim)
        self.krum_malicious = int(krum_malicious)
        self.krum_select = 1 if aggregation == "krum" else int(krum_select)
        self.combiner = make_combiner(aggregation, trim, server_opt, server_opt_args,
                                      self.weighted_by_key, krum_malicious, krum_select)
        detail = ""
        if isinstance(self.combiner, FedTrimmedAvg):
            detail = f" (beta {self.trim:g})"
        elif aggregation in KRUM_RULES:
            detail = (f" (f {self.krum_malicious}, selects {self.krum_select}, needs "
                      f"{krum_needed(self.krum_malicious, self.krum_select)} updates per round)")
        log(INFO, "aggregation: Flower %s%s", type(self.combiner).__name__, detail)
        self.node_sites: dict[int, str] = {}
        self.global_arrays: dict[str, np.ndarray] | None = None
        self.asked: list[int] = []
        #: Training cases each site reported in its first accepted train reply of the run
        #: (seeded from the history on resume): later replies must report the same.
        self.train_counts: dict[str, float] = {}
        self.not_scored_logged: set[str] = set()
        self.current = RoundLog(0)

    # -- naming ----------------------------------------------------------------------------

    def site_name(self, index: int) -> str:
        """The name of site ``index`` (``site<index>`` when no names were given)."""
        if self.site_names:
            if not 0 <= index < len(self.site_names):
                raise ReplyError(f"site-index {index} outside the federation's "
                                 f"{len(self.site_names)} sites {self.site_names}")
            return self.site_names[index]
        return f"site{index}"

    def _label_missing(self, nodes: Sequence[int], answered: set[str]) -> dict[int, str]:
        """Names for nodes that gave nothing usable: the site seen on that node before, else
        by elimination (the one site of the federation that neither answered nor is known to
        sit on another asked node), else ``node <id> (one of [...])``."""
        labels: dict[int, str] = {}
        unknown = [n for n in nodes if n not in self.node_sites]
        for n in nodes:
            if n in self.node_sites:
                labels[n] = self.node_sites[n]
        taken = answered | {self.node_sites[n] for n in self.asked if n in self.node_sites}
        candidates = [s for s in self.site_names if s not in taken]
        if len(unknown) == 1 and len(candidates) == 1 and len(self.asked) == len(self.site_names):
            labels[unknown[0]] = candidates[0]
        else:
            for n in unknown:
                labels[n] = f"node {n}" + (f" (one of {candidates})" if candidates else "")
        return labels

    def _note_failures(self, stage: str, server_round: int, failed: dict[str, str]) -> None:
        for site, reason in sorted(failed.items()):
            log(WARNING, "round %d %s: dropped %s: %s", server_round, stage, site, reason)
            self.current.failed[f"{stage}/{site}"] = reason

    # -- Flower hooks --------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.current.bytes_sent += record_bytes(arrays) * len(messages)
        self.global_arrays = {k: np.array(v.numpy(), copy=True) for k, v in arrays.items()}
        # The combiner sends nothing; FedAvgM/FedOpt remember where the round starts from.
        self.combiner.configure_train(server_round, arrays, ConfigRecord(), grid)
        self.asked = [m.metadata.dst_node_id for m in messages]
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.current.bytes_sent += record_bytes(arrays) * len(messages)
        self.asked = [m.metadata.dst_node_id for m in messages]
        return messages

    def _collect(self, replies: Iterable[Message], train: bool
                 ) -> tuple[dict[str, Message], dict[str, dict[str, np.ndarray]],
                            dict[str, str]]:
        """Parse replies: ``(usable by site, arrays by site (train), failed by site)``."""
        good: dict[str, Message] = {}
        arrays: dict[str, dict[str, np.ndarray]] = {}
        failed_nodes: dict[int, str] = {}
        seen: set[int] = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            seen.add(node)
            if msg.has_error():
                failed_nodes[node] = f"error reply: {short_reason(msg.error.reason)}"
                continue
            try:
                metrics = reply_metrics(msg)
                site = self.site_name(int(metrics["site-index"]))
                if site in good:
                    raise ReplyError(f"a second reply for site {site!r}")
                if train:
                    records = list(msg.content.array_records.values())
                    if len(records) != 1:
                        raise ReplyError(f"expected one ArrayRecord, got {len(records)}")
                    self.current.bytes_received += record_bytes(records[0])
                    arrays[site] = {k: v.numpy() for k, v in records[0].items()}
            except Exception as exc:  # a malformed reply is that site's failure, not the run's
                failed_nodes[node] = f"unusable reply: {exc}"
                continue
            self.node_sites[node] = site
            good[site] = msg
        missing = [n for n in self.asked if n not in seen]
        for node in missing:
            failed_nodes[node] = NO_REPLY
        labels = self._label_missing(list(failed_nodes), set(good))
        failed = {labels[n]: why for n, why in failed_nodes.items()}
        return good, arrays, failed

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        good, updates, failed = self._collect(list(replies), train=True)
        reported_steps = reply_steps(good)
        reference = self.global_arrays
        if reference is None:
            # aggregate_train called without configure_train (unit use): the expected keys,
            # with shapes and dtypes of the first reply that has them; no norm rule.
            first = next((u for u in updates.values() if set(u) == self.expected_keys), None)
            reference = first if first is not None else {k: np.zeros(0) for k in
                                                         self.expected_keys}
            accepted, rejected = robust.screen_updates(updates, reference, math.inf)
        else:
            if set(reference) != self.expected_keys:
                raise ValueError("the arrays sent this round differ from the server's keys")
            accepted, rejected = robust.screen_updates(updates, reference, self.norm_bound,
                                                       reported_steps)
        failed.update(rejected)
        for site, reason in self._check_counts(accepted, good).items():
            accepted.pop(site)
            failed[site] = reason
        self._note_failures("train", server_round, failed)
        robust.check_quorum(sorted(accepted), failed, self.min_sites, server_round)
        if self.aggregation in KRUM_RULES:
            # Flower's Krum would still pick an update from fewer, by max(1, n - f - 2)
            # neighbours, without Krum's guarantee: stop instead (resumable).
            robust.check_quorum(
                sorted(accepted), failed, krum_needed(self.krum_malicious, self.krum_select),
                server_round, krum_rule(self.aggregation, self.krum_malicious, self.krum_select))
        weights, steps = {}, {s: n for s, n in reported_steps.items() if s in accepted}
        for site in accepted:
            metrics = next(iter(good[site].content.metric_records.values()))
            # fl.aggregation_weight: cases (Flower's num-examples), uniform or sqrt; Flower's
            # combiner averages by this value under its weighted_by_key
            weights[site] = site_weight(float(metrics["num-examples"]), self.aggregation_weight)
            self.current.train_by_site[int(metrics["site-index"])] = {
                k: float(v) for k, v in metrics.items()
            }
        arrays = self.combine(server_round, accepted, weights, reference, steps)
        metrics = self.train_metrics_aggr_fn([good[s].content for s in sorted(accepted)],
                                             self.weighted_by_key)
        self.current.train = metrics
        log(INFO, "round %d train: aggregated %d site(s) %s by Flower %s", server_round,
            len(accepted), sorted(accepted), type(self.combiner).__name__)
        return arrays, metrics

    def combine(self, server_round: int, accepted: Mapping[str, Mapping[str, np.ndarray]],
                weights: Mapping[str, float], reference: Mapping[str, np.ndarray],
                steps: Mapping[str, float] | None = None) -> ArrayRecord:
        """The new shared arrays: the combiner's ``aggregate_train`` over one message per
        accepted site holding its shared arrays (in the order of ``reference``, the server's
        arrays: FedAvgM pairs arrays by position) and its weight (``weights``: the case count
        or another ``fl.aggregation_weight``), nothing else; under ``fednova`` each site's
        update is first rescaled by its optimiser ``steps`` (default none; needed then,
        :func:`m4fuse.run.aggregation.fednova_rescale`); cast back
        to ``reference``'s dtypes (integers rounded), since Flower keeps the arithmetic's
        dtype (a float32 mean stays float32, an int64 one becomes float64, FedAdam's bias
        correction makes float64)."""
        if self.aggregation == "fednova":
            accepted = fednova_rescale(accepted, reference, weights, steps or {})
        replies = [
            Message(content=RecordDict({
                "arrays": ArrayRecord({k: Array(np.ascontiguousarray(accepted[site][k]))
                                       for k in reference}),
                "metrics": MetricRecord({self.weighted_by_key: float(weights[site])}),
            }), dst_node_id=0, message_type=MessageType.TRAIN)
            for site in sorted(accepted)
        ]
        combined, _ = self.combiner.aggregate_train(server_round, replies)
        if combined is None or set(combined.keys()) != set(reference):
            raise RuntimeError(f"Flower's {type(self.combiner).__name__} returned no arrays "
                               "or other keys than the server's")
        out = {}
        for key in reference:
            value, dtype = combined[key].numpy(), np.asarray(reference[key]).dtype
            if dtype.kind in "iub" and value.dtype.kind not in "iub":
                value = np.rint(value)
            out[key] = Array(np.ascontiguousarray(value.astype(dtype, copy=False)))
        return ArrayRecord(out)

    def _check_counts(self, accepted: Iterable[str], good: dict[str, Message]
                      ) -> dict[str, str]:
        """Reasons to drop train replies by their case count (the aggregation weight): zero,
        or another count than the site reported earlier in the run (a site's training set
        does not change within a run; a jump would shift the average towards it). The first
        count of each site is remembered in :attr:`train_counts`."""
        reasons: dict[str, str] = {}
        for site in list(accepted):
            metrics = next(iter(good[site].content.metric_records.values()))
            count = float(metrics["num-examples"])
            known = self.train_counts.get(site)
            if count <= 0:
                reasons[site] = f"num-examples is {count:g}: a site with no training cases " \
                                "has no weight in the average"
            elif known is not None and count != known:
                reasons[site] = (f"num-examples {count:g} differs from the {known:g} this "
                                 "site reported earlier in the run")
            else:
                self.train_counts[site] = count
        return reasons

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        good, _, failed = self._collect(list(replies), train=False)
        self._note_failures("evaluate", server_round, failed)
        robust.check_quorum(sorted(good), failed, self.min_sites, server_round)
        scored = []
        for site in sorted(good):
            metrics = next(iter(good[site].content.metric_records.values()))
            index = int(metrics["site-index"])
            if float(metrics["num-examples"]) == 0:
                cases = int(metrics.get("site-cases", 0))
                self.current.not_scored[index] = cases
                if site not in self.not_scored_logged:  # once per site, not every round
                    self.not_scored_logged.add(site)
                    log(INFO, "%s not scored in round %d: none of its %d case(s) is held out "
                        "for this evaluation (it still trains when it has training cases)",
                        site, server_round, cases)
                continue
            self.current.evaluate_by_site[index] = {k: float(v) for k, v in metrics.items()}
            scored.append(site)
        result = (self.evaluate_metrics_aggr_fn([good[s].content for s in scored],
                                                self.weighted_by_key) if scored else None)
        self.current.evaluate = result
        return result

    # -- the round loop --------------------------------------------------------------------

    def run_rounds(
        self,
        grid: Grid,
        arrays: ArrayRecord,
        first_round: int,
        num_rounds: int,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
        timeout: float,
        on_round_end: Callable[[RoundLog, ArrayRecord], None],
        node_wait: float = 120.0,
        before_final_test: Callable[[ArrayRecord], None] | None = None,
    ) -> tuple[ArrayRecord, RoundLog]:
        """Rounds ``first_round..num_rounds`` (train, aggregate, validate every site), then
        the final test round; ``on_round_end`` sees each round's log and the new arrays,
        ``before_final_test`` (default None) the final arrays before the test round (the
        runner writes the model file there, so a failing test round cannot lose it).
        Before each round at least ``min_sites`` SuperNodes must be connected (waits up to
        ``node_wait`` seconds, default 120, then :class:`server.robust.QuorumError`)."""
        for server_round in range(first_round, num_rounds + 1):
            log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
            self.current = RoundLog(server_round)
            start = time.perf_counter()
            self.wait_for_quorum(grid, server_round, node_wait)
            replies = grid.send_and_receive(
                self.configure_train(server_round, arrays, ConfigRecord(dict(train_config)),
                                     grid),
                timeout=timeout,
            )
            new_arrays, _ = self.aggregate_train(server_round, replies)
            if new_arrays is not None:
                arrays = new_arrays
            replies = grid.send_and_receive(
                self.configure_evaluate(server_round, arrays,
                                        ConfigRecord(dict(evaluate_config)), grid),
                timeout=timeout,
            )
            self.aggregate_evaluate(server_round, replies)
            self.current.seconds = time.perf_counter() - start
            on_round_end(self.current, arrays)
        if before_final_test is not None:
            before_final_test(arrays)
        final = dict(evaluate_config)
        final["final-test"] = True
        self.current = RoundLog(num_rounds)
        start = time.perf_counter()
        self.wait_for_quorum(grid, num_rounds, node_wait)
        replies = grid.send_and_receive(
            self.configure_evaluate(num_rounds, arrays, ConfigRecord(final), grid),
            timeout=timeout,
        )
        self.aggregate_evaluate(num_rounds, replies)
        self.current.seconds = time.perf_counter() - start
        return arrays, self.current


    def wait_for_quorum(self, grid: Grid, server_round: int, wait: float) -> None:
        """Wait up to ``wait`` seconds for ``min_sites`` connected SuperNodes, else raise
        :class:`server.robust.QuorumError` naming the sites seen before and now gone
        (Flower's node sampling would otherwise wait for ever)."""
        deadline = time.monotonic() + wait
        while len(nodes := set(grid.get_node_ids())) < self.min_sites:
            if time.monotonic() > deadline:
                gone = sorted(s for n, s in self.node_sites.items() if n not in nodes)
                raise robust.QuorumError(
                    f"round {server_round}: {len(nodes)} SuperNode(s) connected after "
                    f"{wait:.0f} s, at least min_sites={self.min_sites} needed; "
                    f"disconnected sites: {gone or 'unknown'}")
            time.sleep(1.0)


class SiteFedAvg(SiteStrategyMixin, FedAvg):
    """Flower FedAvg (case-weighted) with :class:`SiteStrategyMixin`."""


class SiteFedProx(SiteStrategyMixin, FedProx):
    """Flower FedProx (sends ``proximal-mu``) with :class:`SiteStrategyMixin`."""


def make_strategy(
    name: str,
    num_sites: int,
    fraction_train: float,
    min_train_sites: int,
    proximal_mu: float,
    expected_keys: Iterable[str],
    site_names: Sequence[str] = (),
    min_sites: int = 1,
    norm_bound: float = math.inf,
    aggregation: str = "mean",
    trim: float = 0.2,
    server_opt: str = "none",
    server_opt_args: Mapping[str, float] | None = None,
    krum_malicious: int = 1,
    krum_select: int = 1,
    aggregation_weight: str = "cases",
) -> SiteStrategyMixin:
    """The strategy of ``fl.strategy``; every round evaluates every connected site.

    ``site_names`` (default none: ``site<k>``) name the sites in logs; ``min_sites`` (default
    1), ``norm_bound`` (default inf: off), ``aggregation`` (default ``mean``) and ``trim``
    (default 0.2) are the update checks of :mod:`server.robust` and the Flower rule that
    combines what passed them (:data:`server.combiner.AGGREGATORS`), with Krum's f ``krum_malicious`` and
    MultiKrum's m ``krum_select`` (default 1 and 1; the sites asked per round must be at
    least :func:`m4fuse.run.aggregation.krum_needed`); ``aggregation_weight`` (default
    ``cases``) each site's weight in the average (:func:`m4fuse.run.aggregation.site_weight`);
    ``server_opt`` (default ``none``) and ``server_opt_args`` the Flower server optimiser
    (:data:`server.combiner.OPTIMISERS`) stepping on the shared arrays. The settings are checked by
    :func:`m4fuse.run.rules.server_rules` for these ``num_sites``.
    """
    server_rules({"fraction_train": fraction_train, "min_train_sites": min_train_sites,
                  "min_sites": min_sites, "norm_bound": norm_bound, "aggregation": aggregation,
                  "trim": trim, "krum_malicious": krum_malicious, "krum_select": krum_select,
                  "aggregation_weight": aggregation_weight}, num_sites, site_names)
    kwargs = dict(
        fraction_train=fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=min_train_sites,
        # Flower waits for these many connected nodes before sampling; with more than
        # min_sites a site that left would block the run for ever.
        min_evaluate_nodes=min_sites,
        min_available_nodes=max(min_sites, min_train_sites),
        weighted_by_key="num-examples",
        train_metrics_aggr_fn=aggregate_without_bookkeeping,
        evaluate_metrics_aggr_fn=aggregate_without_bookkeeping,
    )
    chosen = named_strategy(name)  # unknown names fail here
    if chosen.server == "fedprox":
        strategy: SiteStrategyMixin = SiteFedProx(proximal_mu=proximal_mu, **kwargs)
    else:
        strategy = SiteFedAvg(**kwargs)
    strategy.setup(expected_keys, personal_strategy=chosen.kept not in ("none", "all"),
                   site_names=site_names, min_sites=min_sites, norm_bound=norm_bound,
                   aggregation=aggregation, trim=trim, server_opt=server_opt,
                   server_opt_args=server_opt_args, krum_malicious=krum_malicious,
                   krum_select=krum_select, aggregation_weight=aggregation_weight)
    return strategy
