"""Checks on client updates before Flower combines the shared arrays.

Pure functions over ``dict[str, np.ndarray]`` updates keyed by site name; no Flower import, so
the ServerApp's strategy calls them on the arrays it already holds (``ArrayRecord.to_numpy_ndarrays``
in key order, or ``{k: v.numpy() for k, v in record.items()}``).

Order of use in one round (:func:`screen_updates` does 1 and 2):

1. :func:`check_update` per site: same keys, shapes and dtypes as the shared model, all values
   finite. A failing update is dropped with its reason.
2. :func:`norm_outliers` over the updates that passed 1: the update norm of a site is
   ``||w_site - w_global||_2`` over all shared arrays together; a site is dropped when its norm is
   larger than ``bound`` times the median norm of the round (median over the sites that passed 1);
   when every reply reports its optimiser steps, norms per step are compared instead, so a
   large site's many steps are not mistaken for an attack.
   With two sites the median is their mean, so a bound >= 2 can never drop either; the rule needs
   three or more sites to mean something.
3. :func:`check_quorum`: fewer than ``min_sites`` accepted updates stops the run with a message
   that names every failed site and why.
4. the accepted updates are combined by Flower (:mod:`server.strategy`: FedAvg's case-weighted
   mean, FedTrimmedAvg, FedMedian, Krum or MultiKrum for :data:`AGGREGATIONS`; the Krum rules
   first need enough accepted updates, :func:`check_quorum` with ``rule``). The checks stay
   here, written by hand: Flower's strategies combine whatever arrays a reply carries (they
   check only that every reply has the same keys), so a NaN, a wrong shape, a key the server
   must never see (a site's expert) or a huge update would enter the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from m4fuse.run.aggregation import AGGREGATIONS as _AGGREGATIONS

Arrays = Mapping[str, np.ndarray]
"""One model's shared arrays, by state-dict key."""

#: The values of ``fl.aggregation`` (checked in :mod:`m4fuse.run.aggregation`; the Flower
#: strategies are in :mod:`server.strategy`).
AGGREGATIONS: tuple[str, ...] = _AGGREGATIONS


class QuorumError(RuntimeError):
    """Fewer sites than ``min_sites`` gave a usable update in a round."""


def reference_spec(arrays: Arrays) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{key: (shape, dtype)}`` of the server's shared arrays, the reference for :func:`check_update`."""
    return {k: (tuple(np.shape(v)), np.asarray(v).dtype) for k, v in arrays.items()}


def check_update(
    update: Arrays, reference: Mapping[str, tuple[tuple[int, ...], np.dtype]]
) -> str | None:
    """Why ``update`` cannot be aggregated, or None when it can.

    Args:
        update: the arrays one site sent back.
        reference: ``{key: (shape, dtype)}`` of the shared model (see :func:`reference_spec`).

    Returns:
        None when the keys equal the reference keys and every array has the reference shape and
        dtype and only finite values; otherwise a one-line reason naming the first bad key(s).
    """
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
        if extra:
            parts.append(f"unexpected keys {extra[:5]}" + (" ..." if len(extra) > 5 else ""))
        return "; ".join(parts)
    for key, (shape, dtype) in reference.items():
        value = update[key]
        if not isinstance(value, np.ndarray):
            return f"{key}: not a numpy array but {type(value).__name__}"
        if tuple(value.shape) != tuple(shape):
            return f"{key}: shape {tuple(value.shape)}, expected {tuple(shape)}"
        if value.dtype != np.dtype(dtype):
            return f"{key}: dtype {value.dtype}, expected {np.dtype(dtype)}"
        if value.dtype.kind in "fc":
            bad = int(value.size - np.count_nonzero(np.isfinite(value)))
            if bad:
                return f"{key}: {bad} of {value.size} values are not finite"
    return None


def update_norm(update: Arrays, global_arrays: Arrays) -> float:
    """``||update - global||_2`` over all arrays of ``global_arrays`` together, in float64."""
    total = 0.0
    for key, ref in global_arrays.items():
        diff = np.asarray(update[key], dtype=np.float64) - np.asarray(ref, dtype=np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def norm_outliers(
    updates: Mapping[str, Arrays], global_arrays: Arrays, bound: float,
    steps: Mapping[str, float] | None = None,
) -> dict[str, str]:
    """Sites whose update norm exceeds ``bound`` × the round's median update norm.

    Args:
        updates: ``{site: arrays}``, already passed :func:`check_update`.
        global_arrays: the shared arrays the round started from.
        bound: multiple of the median norm above which an update is dropped (> 0); ``math.inf``
            turns the rule off.
        steps: ``{site: optimiser steps}`` the sites took this round (default none). Given
            for every site, each norm is divided by its site's steps before the median is
            taken: at a skewed federation a site of 22 cases takes 11 steps where one of 2
            cases takes 1, and its honest update is then about 11 x the median's, which the
            raw rule would drop as an outlier (it did, in late rounds of case-weighted FedAvg
            on the BraTS-shaped profile). With equal steps the decisions are the raw rule's.

    Returns:
        ``{site: reason}`` for the dropped sites (empty when none). The median is taken over all
        given sites (outliers included), so with a zero median every non-zero update is dropped.
    """
    if not bound > 0:
        raise ValueError(f"norm bound must be > 0, got {bound!r}")
    if not updates or math.isinf(bound):
        return {}
    norms = {site: update_norm(arrays, global_arrays) for site, arrays in updates.items()}
    per_step = bool(steps) and all(steps.get(site, 0) > 0 for site in norms)
    if per_step:
        norms = {site: norm / float(steps[site]) for site, norm in norms.items()}
    what = "update norm per step" if per_step else "update norm"
    median = float(np.median(list(norms.values())))
    limit = bound * median
    return {
        site: f"{what} {norm:.4g} > {bound:g} x round median {median:.4g}"
        for site, norm in norms.items()
        if norm > limit
    }


def screen_updates(
    updates: Mapping[str, Arrays], global_arrays: Arrays, norm_bound: float = math.inf,
    steps: Mapping[str, float] | None = None,
) -> tuple[dict[str, Arrays], dict[str, str]]:
    """Run :func:`check_update` then :func:`norm_outliers` (per optimiser step when ``steps``
    gives every site's); return ``(accepted, rejected)``.

    ``rejected`` maps each dropped site to its reason. Default ``norm_bound=inf``: only the
    structural and finiteness checks run.
    """
    reference = reference_spec(global_arrays)
    rejected: dict[str, str] = {}
    passed: dict[str, Arrays] = {}
    for site, arrays in updates.items():
        reason = check_update(arrays, reference)
        if reason is None:
            passed[site] = arrays
        else:
            rejected[site] = reason
    rejected.update(norm_outliers(passed, global_arrays, norm_bound, steps))
    accepted = {site: a for site, a in passed.items() if site not in rejected}
    return accepted, rejected


def check_quorum(
    accepted: Sequence[str], failed: Mapping[str, str], min_sites: int, server_round: int,
    rule: str | None = None,
) -> None:
    """Raise :class:`QuorumError` when fewer than ``min_sites`` updates were accepted.

    Args:
        accepted: sites whose update will be aggregated.
        failed: ``{site: reason}`` for every site that was asked and gave nothing usable
            (exception, timeout, no reply, rejected update).
        min_sites: least number of accepted updates for the round to count (>= 1).
        server_round: round number, for the message.
        rule: what needs ``min_sites`` updates, for the message (default: ``fl.min_sites``),
            e.g. Krum's least number of updates.
    """
    if min_sites < 1:
        raise ValueError(f"min_sites must be >= 1, got {min_sites!r}")
    if len(accepted) < min_sites:
        detail = "; ".join(f"{site}: {why}" for site, why in sorted(failed.items())) or "none"
        raise QuorumError(
            f"round {server_round}: only {len(accepted)} usable update(s) "
            f"({sorted(accepted)}), at least "
            + (f"{min_sites} needed by {rule}" if rule else f"min_sites={min_sites} needed")
            + f". Failed sites: {detail}"
        )
