"""The combiner: the Flower strategy that combines a round's accepted shared arrays.

The site strategies of :mod:`server.strategy` check every reply first; what passed goes to
this second Flower strategy's ``aggregate_train``: the rule of ``fl.aggregation``
(:data:`AGGREGATORS`), with the server optimiser of ``fl.server_opt`` (:data:`OPTIMISERS`)
stepping from the round's arrays towards the aggregate.
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)

from m4fuse.run.server_opt import SERVER_OPTS
from server import robust

#: ``fl.aggregation`` -> the Flower strategy whose ``aggregate_train`` combines the accepted
#: shared arrays. Flower's FedTrimmedAvg cuts ``int(beta * n)`` values at each end of every
#: coordinate and averages the rest unweighted, as ``scipy.stats.trim_mean`` (the rule of
#: ``fl.trim`` before), and FedMedian takes the coordinate-wise unweighted median. Krum scores
#: each update by the summed squared L2 distances (all shared arrays flattened together,
#: unweighted) to its n - f - 2 nearest others and keeps the lowest-scored update whole;
#: MultiKrum keeps the m lowest and averages them weighted by ``num-examples``.
AGGREGATORS: dict[str, type[FedAvg]] = {
    "mean": FedAvg,
    "trimmed_mean": FedTrimmedAvg,
    "median": FedMedian,
    "krum": Krum,
    "multikrum": MultiKrum,
    # FedNova: Flower's weighted FedAvg over updates rescaled by m4fuse.run.aggregation.fednova_rescale
    "fednova": FedAvg,
}
#: ``fl.server_opt`` -> the Flower strategy that steps from the round's arrays towards the
#: aggregate (None: the aggregate is the new model).
OPTIMISERS: dict[str, type[FedAvg] | None] = {
    "none": None,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
}
assert tuple(OPTIMISERS) == SERVER_OPTS and tuple(AGGREGATORS) == robust.AGGREGATIONS


def make_combiner(aggregation: str = "mean", trim: float = 0.2, server_opt: str = "none",
                  server_opt_args: Mapping[str, float] | None = None,
                  weight_key: str = "num-examples", krum_malicious: int = 1,
                  krum_select: int = 1) -> FedAvg:
    """The Flower strategy that combines a round's accepted replies (its ``aggregate_train``).

    ``aggregation`` picks :data:`AGGREGATORS` (``trim`` is FedTrimmedAvg's ``beta``,
    ``krum_malicious`` Krum's and MultiKrum's ``num_malicious_nodes``, ``krum_select``
    MultiKrum's ``num_nodes_to_select``), ``server_opt`` :data:`OPTIMISERS` with
    ``server_opt_args`` (keyword arguments of that class,
    :func:`m4fuse.run.server_opt.server_opt_settings`; default none: Flower's defaults).
    A server optimiser over a robust rule is the two Flower classes in one: FedAvgM and the
    FedOpt family call ``super().aggregate_train`` for the aggregate, which the class order
    (optimiser first) makes FedTrimmedAvg's, FedMedian's, Krum's or MultiKrum's: of FedAvg's
    methods these four replace only ``aggregate_train`` (and ``__init__``, ``summary``), and
    their ``__init__`` takes the keywords the optimisers pass on; their own parameters are
    set after it.

    The combiner sends no messages (``fraction_train`` 0): the owning strategy calls its
    ``configure_train`` each round only so that FedAvgM/FedOpt record the arrays the round
    starts from, the point their step starts from.
    """
    if aggregation not in AGGREGATORS:
        raise ValueError(f"fl.aggregation must be one of {robust.AGGREGATIONS}, "
                         f"got {aggregation!r}")
    if server_opt not in OPTIMISERS:
        raise ValueError(f"fl.server_opt must be one of {SERVER_OPTS}, got {server_opt!r}")
    rule, optimiser = AGGREGATORS[aggregation], OPTIMISERS[server_opt]
    if optimiser is None:
        cls = rule
    elif rule is FedAvg:
        cls = optimiser
    else:
        cls = type(f"{optimiser.__name__}Over{rule.__name__}", (optimiser, rule), {})
    kwargs = dict(server_opt_args or {}) if optimiser is not None else {}
    combiner = cls(weighted_by_key=weight_key, **kwargs)
    # set after __init__: FedAvgM/FedOpt do not pass these on
    if isinstance(combiner, FedTrimmedAvg):
        combiner.beta = float(trim)
    if isinstance(combiner, MultiKrum):  # Krum is a MultiKrum that selects 1
        combiner.num_malicious_nodes = int(krum_malicious)
        if not isinstance(combiner, Krum):
            combiner.num_nodes_to_select = int(krum_select)
    combiner.fraction_train = 0.0
    return combiner
