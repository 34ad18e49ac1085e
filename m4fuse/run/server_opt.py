"""The server optimiser settings ``fl.server_opt`` and its parameters: names and checks.

No Flower import, so :func:`m4fuse.run.settings.check_config` can refuse a bad value when the
config is composed, before any training; :mod:`server.strategy` maps the names to Flower's own
strategy classes (``FedAvgM``, ``FedAdam``, ``FedYogi``, ``FedAdagrad`` of
``flwr.serverapp.strategy``), which take the step on the shared arrays only.

Keys (all under ``fl``; ``null`` = the default of Flower's class):

* ``server_opt``: ``none`` (default: the aggregate is the new model, as before), ``fedavgm``,
  ``fedadam``, ``fedyogi`` or ``fedadagrad``;
* ``server_lr``: the server learning rate, > 0 (FedAvgM ``server_learning_rate``, FedOpt ``eta``);
* ``server_momentum``: FedAvgM's momentum, in [0, 1);
* ``server_beta_1``, ``server_beta_2``: FedAdam/FedYogi moment decay rates, in [0, 1);
* ``server_tau``: FedAdam/FedYogi/FedAdagrad adaptivity (added to the root of the second
  moment), > 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

SERVER_OPTS: tuple[str, ...] = ("none", "fedavgm", "fedadam", "fedyogi", "fedadagrad")

#: ``fl`` key -> (the optimisers that use it, the parameter name of Flower's class).
PARAMETERS: dict[str, tuple[tuple[str, ...], str]] = {
    "server_lr": (("fedavgm",), "server_learning_rate"),
    "server_momentum": (("fedavgm",), "server_momentum"),
    "server_beta_1": (("fedadam", "fedyogi"), "beta_1"),
    "server_beta_2": (("fedadam", "fedyogi"), "beta_2"),
    "server_tau": (("fedadam", "fedyogi", "fedadagrad"), "tau"),
}
#: FedOpt's classes call the server learning rate ``eta``.
ETA_USERS: tuple[str, ...] = ("fedadam", "fedyogi", "fedadagrad")


def _number(fl: Mapping[str, Any], key: str) -> float | None:
    value = fl.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(float(value)):
        raise ValueError(f"fl.{key} must be a finite number or null, got {value!r}")
    return float(value)


def server_opt_settings(fl: Mapping[str, Any]) -> tuple[str, dict[str, float]]:
    """``(fl.server_opt, keyword arguments of its Flower class)`` from the ``fl`` config.

    Every key is checked whatever the optimiser (a bad value is a mistake either way); only
    the keys the chosen optimiser uses and that are not null become arguments. Missing keys
    read as the defaults (``none``, null).

    Raises:
        ValueError: naming the key and the bad value.
    """
    name = str(fl.get("server_opt", "none") or "none")
    if name not in SERVER_OPTS:
        raise ValueError(f"fl.server_opt must be one of {SERVER_OPTS}, got {name!r}")
    values = {key: _number(fl, key) for key in PARAMETERS}
    if values["server_lr"] is not None and not values["server_lr"] > 0:
        raise ValueError(f"fl.server_lr must be > 0 (null: Flower's default of "
                         f"fl.server_opt), got {fl.get('server_lr')!r}")
    for key in ("server_momentum", "server_beta_1", "server_beta_2"):
        if values[key] is not None and not 0.0 <= values[key] < 1.0:
            raise ValueError(f"fl.{key} must be in [0, 1), got {fl.get(key)!r}")
    if values["server_tau"] is not None and not values["server_tau"] > 0:
        raise ValueError(f"fl.server_tau must be > 0, got {fl.get('server_tau')!r}")
    kwargs: dict[str, float] = {}
    for key, (users, parameter) in PARAMETERS.items():
        if values[key] is None:
            continue
        if name in users:
            kwargs[parameter] = values[key]
        elif key == "server_lr" and name in ETA_USERS:
            kwargs["eta"] = values[key]
    return name, kwargs
