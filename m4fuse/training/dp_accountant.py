"""DP-SGD's accounting: an Opacus accountant's history as a record that fits Flower's
``ConfigRecord`` (and back), the ε it spends, and the σ planned on what is left of a budget."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from m4fuse.training.dp_plan import MAX_PLANNED_SIGMA


class PrivacyBudgetExhausted(RuntimeError):
    """The site's accountant already used the steps its target ε was planned for."""


def accountant_to_record(accountant: Any) -> dict[str, Any]:
    """An Opacus accountant's history as a flat dict that fits a Flower ``ConfigRecord``:
    ``{"mechanism": str, "noise_multiplier": [float], "sample_rate": [float], "steps": [int]}``."""
    history = list(accountant.history)
    return {
        "mechanism": accountant.mechanism(),
        "noise_multiplier": [float(h[0]) for h in history],
        "sample_rate": [float(h[1]) for h in history],
        "steps": [int(h[2]) for h in history],
    }


def accountant_from_record(record: Mapping[str, Any]) -> Any:
    """Rebuild an Opacus accountant from :func:`accountant_to_record` output (or a
    ``ConfigRecord`` holding it); errors name the missing key or the mismatched lengths."""
    for key in ("mechanism", "noise_multiplier", "sample_rate", "steps"):
        if key not in record:
            raise KeyError(f"accountant record lacks {key!r}; has {sorted(record)}")
    sigmas, rates, steps = (list(record[k]) for k in ("noise_multiplier", "sample_rate", "steps"))
    if not len(sigmas) == len(rates) == len(steps):
        raise ValueError(
            f"accountant record lists differ in length: {len(sigmas)} noise_multiplier, "
            f"{len(rates)} sample_rate, {len(steps)} steps"
        )
    accountant = create_accountant(mechanism=str(record["mechanism"]))
    accountant.history = [(float(s), float(q), int(k)) for s, q, k in zip(sigmas, rates, steps)]
    return accountant


def epsilon_of(record: Mapping[str, Any] | None, delta: float) -> float:
    """ε spent by the history in ``record`` at ``delta`` (0.0 for no record or no steps)."""
    if record is None:
        return 0.0
    accountant = accountant_from_record(record)
    if not accountant.history:
        return 0.0
    return float(accountant.get_epsilon(delta=delta))


def history_steps(accountant: Any) -> int:
    """DP steps in an Opacus accountant's history (all rounds)."""
    return sum(int(h[2]) for h in accountant.history)


def plan_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float,
                          remaining_steps: int, history: Sequence[tuple[float, float, int]],
                          mechanism: str, tolerance: float = 0.01) -> float:
    """The smallest σ (to ``tolerance`` in ε, default 0.01) such that the steps already
    spent (``history``, as in an Opacus accountant) plus ``remaining_steps`` steps at σ and
    ``sample_rate`` stay within ``target_epsilon`` at ``delta``.

    With no history this is Opacus ``get_noise_multiplier`` (called as is). With one, e.g.
    a ``target_epsilon`` run resumed with more rounds, Opacus has no function that plans on
    what is left of a budget, hence the same bisection here over the composed history.

    Raises:
        PrivacyBudgetExhausted: the history alone already spends ``target_epsilon``, or no
            σ up to :data:`MAX_PLANNED_SIGMA` keeps the total within it.
    """
    if remaining_steps < 1:
        raise ValueError(f"remaining_steps must be >= 1, got {remaining_steps}")
    if not history:
        return float(get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
            steps=remaining_steps, accountant=mechanism, epsilon_tolerance=tolerance))
    accountant = create_accountant(mechanism=mechanism)

    def epsilon_with(sigma: float) -> float:
        accountant.history = list(history) + [(sigma, sample_rate, remaining_steps)]
        return float(accountant.get_epsilon(delta=delta))

    accountant.history = list(history)
    spent = float(accountant.get_epsilon(delta=delta))
    if spent >= target_epsilon:
        raise PrivacyBudgetExhausted(
            f"the site has already spent ε={spent:.3f} of its budget ε={target_epsilon} "
            f"(δ={delta:.3g}); no further DP steps are possible")
    low, high = 0.0, 10.0
    eps_high = epsilon_with(high)
    while eps_high > target_epsilon:
        high *= 2
        if high > MAX_PLANNED_SIGMA:
            raise PrivacyBudgetExhausted(
                f"ε={spent:.3f} spent of the budget ε={target_epsilon}: {remaining_steps} more "
                f"steps exceed it even at σ={MAX_PLANNED_SIGMA}")
        eps_high = epsilon_with(high)
    while target_epsilon - eps_high > tolerance:
        mid = (low + high) / 2
        eps = epsilon_with(mid)
        if eps < target_epsilon:
            high, eps_high = mid, eps
        else:
            low = mid
    return high


__all__ = ["PrivacyBudgetExhausted", "accountant_from_record", "accountant_to_record",
           "epsilon_of", "history_steps", "plan_noise_multiplier"]
