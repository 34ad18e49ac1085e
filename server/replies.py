"""What a round's replies carry and what a round produced: the reply checks that need no
strategy (:func:`reply_metrics`), their bookkeeping keys, sizes and error texts, and the
round's log (:class:`RoundLog`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

#: Reply metric keys that identify or time a reply, not averaged into aggregates.
BOOKKEEPING: tuple[str, ...] = ("site-index", "seconds", "site-cases", "steps")

#: Reason recorded for a site that was sent a message and did not answer in time.
NO_REPLY = "no reply within fl.round_timeout (crashed, timed out or left)"

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


def short_reason(reason: str, limit: int = 300) -> str:
    """The gist of a client error: Flower's simulation wraps the ClientApp's exception in a
    Ray traceback whose last line ends ``Message: <the exception's text>``; keep that text."""
    lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
    text = lines[-1] if lines else str(reason)
    if "Message: " in text:
        text = text.split("Message: ", 1)[1].rstrip("'>").strip()
    return text if len(text) <= limit else text[:limit] + " ..."


class ReplyError(ValueError):
    """A reply that cannot be used (its reason is recorded, the round goes on)."""


def reply_metrics(msg: Message) -> MetricRecord:
    """The one MetricRecord of a reply, with numeric ``num-examples`` and ``site-index``."""
    records = list(msg.content.metric_records.values())
    if len(records) != 1:
        raise ReplyError(f"expected one MetricRecord, got {len(records)}")
    metrics = records[0]
    for key in ("num-examples", "site-index"):
        value = metrics.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(float(value)):
            raise ReplyError(f"metric {key!r} missing or not a finite number: {value!r}")
    if float(metrics["num-examples"]) < 0:
        raise ReplyError(f"num-examples must be >= 0, got {metrics['num-examples']!r}")
    return metrics


def reply_steps(good: Mapping[str, Message]) -> dict[str, float]:
    """``{site: optimiser steps}`` of the (already checked) replies that report ``steps``."""
    steps = {}
    for site, msg in good.items():
        metrics = next(iter(msg.content.metric_records.values()))
        if "steps" in metrics:
            steps[site] = float(metrics["steps"])
    return steps


@dataclass
class RoundLog:
    """What one round produced (for checkpoints, MLflow and the results table); ``failed``
    maps ``"train/<site>"`` / ``"evaluate/<site>"`` to why that site's reply was not used."""

    server_round: int
    train: MetricRecord | None = None
    evaluate: MetricRecord | None = None
    train_by_site: dict[int, dict[str, float]] = field(default_factory=dict)
    evaluate_by_site: dict[int, dict[str, float]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    #: Sites that answered an evaluation with 0 cases (none held out for them): site index
    #: -> the site's number of cases (reply key ``site-cases``); not in the mean.
    not_scored: dict[int, int] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
