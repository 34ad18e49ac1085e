"""Server strategies: Flower's FedAvg / FedProx, weighted by training cases, plus what a
federated BraTS study needs around them.

Aggregation itself is Flower's (``FedAvg.aggregate_train`` -> ``aggregate_arrayrecords``,
weighted by each reply's ``num-examples`` = number of training cases). What is added here:

* a guard that every train reply carries exactly the keys the server holds (under
  ``personal``/``fedprox`` the shared keys only: an expert key is refused, never averaged);
* per-site bookkeeping (train loss, validation and test scores by ``site-index``) and bytes
  sent/received per round (serialised array bytes);
* a round loop that can start at any round (resume) and a final test round sent through
  ``configure_evaluate`` with the ConfigRecord flag ``final-test``. Flower's
  ``Strategy.start`` always starts at round 1, hence :meth:`SiteStrategyMixin.run_rounds`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore import log

from m4fuse.state import is_personal

#: Reply metric keys that identify or time a reply, not averaged into aggregates.
BOOKKEEPING: tuple[str, ...] = ("site-index", "seconds")


def record_bytes(record: ArrayRecord) -> int:
    """Serialised size of an ArrayRecord's arrays (what goes over the wire, headers included)."""
    return sum(len(array.data) for array in record.values())


def aggregate_without_bookkeeping(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Flower's case-weighted metric average, without the :data:`BOOKKEEPING` keys."""
    out = aggregate_metricrecords(records, weight_key)
    for key in BOOKKEEPING:
        out.pop(key, None)
    out[weight_key] = sum(
        float(next(iter(r.metric_records.values()))[weight_key]) for r in records
    )
    return out


@dataclass
class RoundLog:
    """What one round produced (for checkpoints, MLflow and the results table)."""

    server_round: int
    train: MetricRecord | None = None
    evaluate: MetricRecord | None = None
    train_by_site: dict[int, dict[str, float]] = field(default_factory=dict)
    evaluate_by_site: dict[int, dict[str, float]] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0


class SiteStrategyMixin:
    """Per-site bookkeeping, the shared-keys guard and a resumable round loop.

    Mixed into Flower's :class:`FedAvg` / :class:`FedProx`; ``expected_keys`` are the keys of
    the arrays the server holds (every train reply must carry exactly these).
    """

    expected_keys: frozenset[str]
    personal_strategy: bool
    current: RoundLog

    def setup(self, expected_keys: Iterable[str], personal_strategy: bool) -> None:
        """Remember which keys replies must carry (call after ``__init__``)."""
        self.expected_keys = frozenset(expected_keys)
        self.personal_strategy = personal_strategy
        if personal_strategy:
            experts = sorted(k for k in self.expected_keys if is_personal(k))
            if experts:
                raise ValueError(f"the server must not hold expert weights, got {experts[:3]}")
        self.current = RoundLog(0)

    # -- Flower hooks --------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.current.bytes_sent += record_bytes(arrays) * len(messages)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.current.bytes_sent += record_bytes(arrays) * len(messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        good = [m for m in replies if not m.has_error()]
        if not good:
            reasons = [m.error.reason for m in replies if m.has_error()]
            raise RuntimeError(f"round {server_round}: no site returned a result: {reasons}")
        for msg in good:
            for record in msg.content.array_records.values():
                keys = set(record.keys())
                if keys != self.expected_keys:
                    extra = sorted(keys - self.expected_keys)
                    lost = sorted(self.expected_keys - keys)
                    raise ValueError(
                        f"round {server_round}: node {msg.metadata.src_node_id} sent keys that "
                        f"differ from the server's: extra {extra[:5]}, missing {lost[:5]}"
                    )
                self.current.bytes_received += record_bytes(record)
            metrics = next(iter(msg.content.metric_records.values()))
            self.current.train_by_site[int(metrics["site-index"])] = {
                k: float(v) for k, v in metrics.items()
            }
        arrays, metrics = super().aggregate_train(server_round, good)
        self.current.train = metrics
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        replies = list(replies)
        good = [m for m in replies if not m.has_error()]
        if not good:
            reasons = [m.error.reason for m in replies if m.has_error()]
            raise RuntimeError(f"round {server_round}: no site returned scores: {reasons}")
        for msg in good:
            metrics = next(iter(msg.content.metric_records.values()))
            self.current.evaluate_by_site[int(metrics["site-index"])] = {
                k: float(v) for k, v in metrics.items()
            }
        result = super().aggregate_evaluate(server_round, good)
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
    ) -> tuple[ArrayRecord, RoundLog]:
        """Rounds ``first_round..num_rounds`` (train, aggregate, validate every site), then
        the final test round; ``on_round_end`` sees each round's log and the new arrays."""
        for server_round in range(first_round, num_rounds + 1):
            log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
            self.current = RoundLog(server_round)
            start = time.perf_counter()
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
        final = dict(evaluate_config)
        final["final-test"] = True
        self.current = RoundLog(num_rounds)
        start = time.perf_counter()
        replies = grid.send_and_receive(
            self.configure_evaluate(num_rounds, arrays, ConfigRecord(final), grid),
            timeout=timeout,
        )
        self.aggregate_evaluate(num_rounds, replies)
        self.current.seconds = time.perf_counter() - start
        return arrays, self.current


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
) -> SiteStrategyMixin:
    """The strategy of ``fl.strategy``; every round evaluates every site (fraction 1.0)."""
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    if not 1 <= min_train_sites <= num_sites:
        raise ValueError(f"fl.min_train_sites must be in [1, {num_sites}], got {min_train_sites}")
    kwargs = dict(
        fraction_train=fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=min_train_sites,
        min_evaluate_nodes=num_sites,
        min_available_nodes=num_sites,
        weighted_by_key="num-examples",
        train_metrics_aggr_fn=aggregate_without_bookkeeping,
        evaluate_metrics_aggr_fn=aggregate_without_bookkeeping,
    )
    if name == "fedprox":
        strategy: SiteStrategyMixin = SiteFedProx(proximal_mu=proximal_mu, **kwargs)
    elif name in ("personal", "fedavg", "local"):
        strategy = SiteFedAvg(**kwargs)
    else:
        raise ValueError(f"unknown strategy {name!r}")
    strategy.setup(expected_keys, personal_strategy=name in ("personal", "fedprox"))
    return strategy
