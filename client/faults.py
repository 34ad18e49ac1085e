"""Fault injection for the ClientApp, driven by config (robustness tests).

A :class:`FaultConfig` maps a site name to a :class:`SiteFault`. :func:`fault_mod`, a Flower
client mod around the ClientApp's handlers (``ClientApp(mods=[fault_mod])`` in
:mod:`client.app`), calls :func:`inject_fault` before a train message reaches the train
handler, with the site and the server round (Flower's ``server-round``, which starts at 1):

* ``crash_round``: the mod raises :class:`InjectedFault` in that round (the reply is an
  error message; the server must go on while ``min-sites`` sites answered);
* ``nan_round``: training runs, but the returned :class:`FaultAction` has ``send_nan=True`` and
  the mod passes the reply's shared arrays through :func:`poison_with_nan` (the server's
  update check must drop it);
* ``delay_s`` (with ``delay_round``, None = every round): sleeps that many seconds before
  training, to exceed the server's round timeout.

Everything defaults to "no fault", so an empty config changes nothing. The handlers and the
training code know nothing of faults.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from omegaconf import OmegaConf


class InjectedFault(RuntimeError):
    """Raised by :func:`inject_fault` for a configured crash."""


@dataclass(frozen=True)
class SiteFault:
    """The faults of one site.

    Attributes:
        crash_round: round in which the client raises (None: never; default).
        nan_round: round in which the reply carries NaN (None: never; default).
        delay_s: seconds to sleep before training (default 0.0: no delay).
        delay_round: round in which to sleep (None: every round; default).
    """

    crash_round: int | None = None
    nan_round: int | None = None
    delay_s: float = 0.0
    delay_round: int | None = None

    def __post_init__(self) -> None:
        for name in ("crash_round", "nan_round", "delay_round"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise ValueError(f"{name} must be None or a round number >= 1, got {value!r}")
        if not isinstance(self.delay_s, (int, float)) or isinstance(self.delay_s, bool) \
                or not self.delay_s >= 0:
            raise ValueError(f"delay_s must be a number >= 0, got {self.delay_s!r}")


@dataclass(frozen=True)
class FaultConfig:
    """Faults by site name (default: none)."""

    sites: Mapping[str, SiteFault] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Mapping[str, Any]] | None) -> FaultConfig:
        """Build from plain config, e.g. ``{"CBICA": {"crash_round": 2}, "TCIA01": {"nan_round": 1}}``.

        Unknown fault keys raise ``KeyError`` naming the site and the key. ``None`` or ``{}``
        gives no faults. Works on OmegaConf ``DictConfig`` too (it is a Mapping).
        """
        if mapping is None:
            return cls()
        allowed = {f.name for f in fields(SiteFault)}
        sites: dict[str, SiteFault] = {}
        for site, spec in mapping.items():
            if not isinstance(spec, Mapping):
                raise TypeError(f"faults for site {site!r} must be a mapping, got {spec!r}")
            unknown = sorted(set(spec) - allowed)
            if unknown:
                raise KeyError(
                    f"unknown fault key(s) {unknown} for site {site!r}; allowed: {sorted(allowed)}"
                )
            sites[str(site)] = SiteFault(**dict(spec))
        return cls(sites)


@dataclass(frozen=True)
class FaultAction:
    """What the handler must still do after :func:`inject_fault` returned.

    Attributes:
        send_nan: replace the reply's shared arrays with :func:`poison_with_nan` of them.
        slept_s: seconds slept (for logs and tests).
    """

    send_nan: bool = False
    slept_s: float = 0.0


def inject_fault(
    config: FaultConfig,
    site: str,
    server_round: int,
    sleep: Callable[[float], None] = time.sleep,
) -> FaultAction:
    """Apply ``site``'s configured faults for ``server_round``; call at the start of train.

    Order: delay first (a slow site may also crash or send NaN), then crash, then NaN.

    Args:
        config: the run's fault config.
        site: this client's site name.
        server_round: the round being trained (>= 1).
        sleep: the sleep function (default ``time.sleep``; tests pass a recorder).

    Returns:
        A :class:`FaultAction`; the default action (no NaN, no sleep) when the site has no fault.

    Raises:
        InjectedFault: when ``server_round`` is the site's ``crash_round``.
    """
    if server_round < 1:
        raise ValueError(f"server_round must be >= 1, got {server_round!r}")
    fault = config.sites.get(site)
    if fault is None:
        return FaultAction()
    slept = 0.0
    if fault.delay_s > 0 and fault.delay_round in (None, server_round):
        sleep(float(fault.delay_s))
        slept = float(fault.delay_s)
    if fault.crash_round == server_round:
        raise InjectedFault(f"injected crash of site {site!r} in round {server_round}")
    return FaultAction(send_nan=fault.nan_round == server_round, slept_s=slept)


def poison_with_nan(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Copy of ``arrays`` whose floating arrays are all NaN (other dtypes unchanged)."""
    out: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        value = np.asarray(value)
        out[key] = np.full_like(value, np.nan) if value.dtype.kind in "fc" else value.copy()
    if not any(np.asarray(v).dtype.kind in "fc" for v in out.values()):
        raise ValueError("no floating array to poison with NaN")
    return out


def fault_mod(msg: Message, context: Context,
              call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower client mod: this site's configured faults (``fl.faults``) around a train message.

    Evaluate messages, and sites without faults, pass through unchanged. Otherwise the delay
    and crash of :func:`inject_fault` happen before the handler runs; for a NaN fault the
    handler's reply (not an error reply) gets its one ArrayRecord replaced by
    :func:`poison_with_nan` of it.
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    # Imported here: client.site loads the experiment code (torch), which the fault rules
    # above do not need. Its config and split are memoised per process.
    from client.site import Site

    site = Site.resolve(context.run_config, context.node_config, None)
    faults = site.cfg.fl.get("faults")
    if not faults:
        return call_next(msg, context)
    config = FaultConfig.from_mapping(OmegaConf.to_container(faults, resolve=True))
    server_round = int(msg.content.config_records["config"]["server-round"])
    action = inject_fault(config, site.name, server_round)
    reply = call_next(msg, context)
    if action.send_nan and not reply.has_error():
        name, record = next(iter(reply.content.array_records.items()))
        poisoned = poison_with_nan({k: v.numpy() for k, v in record.items()})
        reply.content[name] = ArrayRecord({k: Array(np.ascontiguousarray(v))
                                           for k, v in poisoned.items()})
    return reply
