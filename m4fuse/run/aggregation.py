"""The aggregation settings ``fl.aggregation`` and its parameters: names and checks.

No Flower import, so :func:`m4fuse.run.settings.check_config` can refuse a bad value when the
config is composed, before any training; :mod:`server.strategy` maps the names to Flower's own
strategy classes (``FedAvg``, ``FedTrimmedAvg``, ``FedMedian``, ``Krum``, ``MultiKrum`` of
``flwr.serverapp.strategy``), which combine the shared arrays that passed the project's update
checks (:mod:`server.robust`).

Keys (all under ``fl``):

* ``aggregation``: ``mean`` (default), ``trimmed_mean``, ``median``, ``krum`` or ``multikrum``;
* ``trim``: the fraction ``trimmed_mean`` cuts at each end, in [0, 0.5);
* ``krum_malicious``: the f of Krum / Multi-Krum (Flower's ``num_malicious_nodes``), the
  number of sites whose updates may be arbitrary, an integer >= 0;
* ``krum_select``: the m of Multi-Krum (Flower's ``num_nodes_to_select``), how many of the
  best-scored updates are averaged (case-weighted), an integer >= 1; ``krum`` always selects 1;
* ``aggregation_weight``: each site's weight in the weighted rules (``mean``, ``fednova``,
  ``multikrum``): ``cases`` (its training cases, default), ``uniform`` (1 per site) or
  ``sqrt`` (the square root of its training cases); :func:`site_weight`;
* ``local_steps``: ``null`` (default: ``local_epochs`` epochs per round) or an integer >= 1,
  the optimiser steps every site takes per round whatever its size (:func:`skew_settings`).

``fednova`` is FedNova-style normalised averaging (Wang et al. 2020, "Tackling the Objective
Inconsistency Problem in Heterogeneous Federated Optimization"): each site's update is divided
by its number of local optimiser steps tau_i, the normalised updates are averaged with the
weights p_i above, and the average is multiplied by the effective step count
tau_eff = sum_i p_i tau_i (:func:`fednova_rescale`).

Krum scores each of the n updates by the sum of its squared distances to its n - f - 2 nearest
others and keeps the lowest score; its guarantee needs n >= 2f + 3 updates, and Multi-Krum's
m best of them n >= m + f too (:func:`krum_needed`). Flower's Krum does not check this: with
fewer updates it scores by max(1, n - f - 2) neighbours and still returns one update, without
the guarantee. So the project refuses it: at config time when the sites asked per round are
too few, and in a round where fewer updates passed the checks (the run stops there with
:class:`server.robust.QuorumError`, like ``fl.min_sites``; it can be resumed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

#: The values of ``fl.aggregation`` (the Flower strategies are in :mod:`server.strategy`).
AGGREGATIONS: tuple[str, ...] = ("mean", "trimmed_mean", "median", "krum", "multikrum",
                                 "fednova")
#: The aggregations that select updates with Krum's score (``fl.krum_*`` apply).
KRUM_RULES: tuple[str, ...] = ("krum", "multikrum")


def sites_asked(num_sites: int, fraction_train: float, min_train_sites: int) -> int:
    """How many sites are asked to train per round (Flower's sampling: at least
    ``min_train_sites``, else ``int(num_sites * fraction_train)``)."""
    return max(int(num_sites * fraction_train), int(min_train_sites))


def krum_needed(malicious: int, select: int = 1) -> int:
    """Least number of accepted updates for Krum with f = ``malicious`` (n >= 2f + 3) that
    selects ``select`` of them (also n >= m + f)."""
    return max(2 * int(malicious) + 3, int(select) + int(malicious))


def _integer(fl: Mapping[str, Any], key: str, default: int, least: int) -> int:
    value = fl.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"fl.{key} must be an integer >= {least}, got {value!r}")
    return int(value)


def aggregation_settings(fl: Mapping[str, Any], num_sites: int | None = None
                         ) -> tuple[str, dict[str, Any]]:
    """``(fl.aggregation, {"trim", "krum_malicious", "krum_select"})`` from the ``fl`` config.

    Every key is checked whatever the aggregation (a bad value is a mistake either way).
    Missing keys read as the defaults (``mean``, 0.2, 1, 1). With ``num_sites`` (the
    federation's size, when known) a Krum rule also needs the sites asked per round
    (:func:`sites_asked` of ``fl.fraction_train``, ``fl.min_train_sites``) to be at least
    :func:`krum_needed`.

    Raises:
        ValueError: naming the key and the bad value.
    """
    name = str(fl.get("aggregation", "mean"))
    if name not in AGGREGATIONS:
        raise ValueError(f"fl.aggregation must be one of {AGGREGATIONS}, got {name!r}")
    trim = fl.get("trim", 0.2)
    if isinstance(trim, bool) or not isinstance(trim, (int, float)) \
            or not 0.0 <= float(trim) < 0.5:
        raise ValueError(f"fl.trim must be in [0, 0.5), got {trim!r}")
    malicious = _integer(fl, "krum_malicious", 1, 0)
    select = _integer(fl, "krum_select", 1, 1)
    if name in KRUM_RULES and num_sites is not None:
        check_krum_sites(name, malicious, select,
                         sites_asked(num_sites, float(fl.get("fraction_train", 1.0)),
                                     int(fl.get("min_train_sites", 1))))
    return name, {"trim": float(trim), "krum_malicious": malicious, "krum_select": select,
                  **skew_settings(fl)}


def krum_rule(name: str, malicious: int, select: int = 1) -> str:
    """The Krum setting and its least number of updates in words, for messages."""
    if name == "krum":
        return f"fl.aggregation=krum with fl.krum_malicious={malicious} (2 x krum_malicious + 3)"
    return (f"fl.aggregation={name} with fl.krum_malicious={malicious}, fl.krum_select={select}"
            " (2 x krum_malicious + 3, and krum_select + krum_malicious)")


def check_krum_sites(name: str, malicious: int, select: int, asked: int) -> None:
    """Refuse a Krum rule that can never have enough updates: ``asked`` sites per round fewer
    than :func:`krum_needed`. Raises ValueError naming ``fl.krum_malicious`` (and
    ``fl.krum_select`` for ``multikrum``) and their values."""
    select = 1 if name == "krum" else select
    needed = krum_needed(malicious, select)
    if asked < needed:
        raise ValueError(
            f"{krum_rule(name, malicious, select)} needs at least {needed} updates per round, "
            f"but only {asked} site(s) are asked to train per round (fl.fraction_train, "
            f"fl.min_train_sites); lower fl.krum_malicious"
            f"{'' if name == 'krum' else ' or fl.krum_select'} or use more sites")


#: The values of ``fl.aggregation_weight`` (:func:`site_weight`).
AGGREGATION_WEIGHTS: tuple[str, ...] = ("cases", "uniform", "sqrt")


def skew_settings(fl: Mapping[str, Any]) -> dict[str, Any]:
    """``{"aggregation_weight", "local_steps"}`` of the ``fl`` config, checked; missing keys
    read as the defaults (``cases``, None: epochs).

    Raises:
        ValueError: naming the key and the bad value.
    """
    weight = str(fl.get("aggregation_weight", "cases"))
    if weight not in AGGREGATION_WEIGHTS:
        raise ValueError(f"fl.aggregation_weight must be one of {AGGREGATION_WEIGHTS}, "
                         f"got {weight!r}")
    steps = fl.get("local_steps", None)
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                              or steps < 1):
        raise ValueError(f"fl.local_steps must be null (fl.local_epochs epochs per round) or "
                         f"an integer >= 1, got {steps!r}")
    return {"aggregation_weight": weight, "local_steps": None if steps is None else int(steps)}


def site_weight(cases: float, rule: str = "cases") -> float:
    """A site's weight in the average (``fl.aggregation_weight`` ``rule``, default ``cases``)
    from its number of training ``cases``: the cases, 1, or their square root."""
    if rule == "cases":
        return float(cases)
    if rule == "uniform":
        return 1.0
    if rule == "sqrt":
        return math.sqrt(float(cases))
    raise ValueError(f"fl.aggregation_weight must be one of {AGGREGATION_WEIGHTS}, got {rule!r}")


def fednova_rescale(updates: Mapping[str, Mapping[str, np.ndarray]],
                    reference: Mapping[str, np.ndarray], weights: Mapping[str, float],
                    steps: Mapping[str, float]) -> dict[str, dict[str, np.ndarray]]:
    """Each site's arrays moved so that their ``weights``-weighted mean is FedNova's model.

    Site i's update ``x_i - x`` (``x`` = ``reference``, the round's arrays) is scaled by
    ``tau_eff / tau_i`` (``tau_i`` = ``steps[i]``, ``tau_eff`` = sum_i p_i tau_i with p_i the
    normalised weights): the weighted mean of ``x + tau_eff / tau_i (x_i - x)`` is
    ``x + tau_eff * sum_i p_i (x_i - x) / tau_i``, FedNova's update, so Flower's own weighted
    FedAvg (and a server optimiser after it) can combine the result. Flower has no FedNova,
    hence this hand-written rescaling. Integer arrays (counters) are left as they are.

    Raises:
        ValueError: a site without a step count >= 1.
    """
    total = sum(float(weights[s]) for s in updates)
    if total <= 0:
        raise ValueError(f"FedNova: the site weights sum to {total}")
    for site in updates:
        tau = steps.get(site)
        if tau is None or not math.isfinite(float(tau)) or float(tau) < 1:
            raise ValueError(f"FedNova needs each site's optimiser steps (reply metric "
                             f"'steps' >= 1); {site} reported {tau!r}")
    tau_eff = sum(float(weights[s]) / total * float(steps[s]) for s in updates)
    out: dict[str, dict[str, np.ndarray]] = {}
    for site, arrays in updates.items():
        scale = tau_eff / float(steps[site])
        out[site] = {}
        for key, value in arrays.items():
            value = np.asarray(value)
            if value.dtype.kind != "f":
                out[site][key] = value
                continue
            ref = np.asarray(reference[key])
            out[site][key] = (ref + scale * (value - ref)).astype(value.dtype, copy=False)
    return out
