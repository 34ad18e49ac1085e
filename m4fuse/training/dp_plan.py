"""Planning DP-SGD for a site, without a model: the privacy settings, δ, the sampling rate,
the steps, and σ from a target ε (Opacus's accountants), or a one-line refusal.

The ClientApp trains with it (:mod:`m4fuse.training.dp`, which re-exports these names) and the
server checks every site's plan before round 1 (``server.runner.check_privacy_plan``), so
this lives in the task package, which both may import.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")


class PrivacyPlanError(ValueError):
    """A target ε (or sampling rate) that the planned steps cannot meet; one line naming the
    setting and what would meet it."""


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD settings of one run (Hydra group ``privacy``).

    Attributes:
        enabled: train with DP-SGD (default False: ordinary training, nothing else applies).
        noise_multiplier: σ, noise std as a multiple of ``max_grad_norm`` (default 1.0). Set it
            to None and give ``target_epsilon`` instead to let Opacus choose σ.
        target_epsilon: ε the site may spend over the whole run (default None). σ is then the
            smallest value (tolerance 0.01 in ε) that keeps ε at or below it after every
            Poisson-sampled step the site will take (:func:`plan_site`: ``rounds ×
            fl.local_steps`` steps, or ``rounds × local_epochs`` epochs), planned each round on
            what is left (:func:`plan_noise_multiplier`: the restored history plus the remaining
            steps); training past the planned steps raises :class:`PrivacyBudgetExhausted`.
        max_grad_norm: per-case gradient clipping bound C (default 1.0).
        delta: δ (default None: ``1 / (10 · n)`` with n the site's number of training cases,
            see :func:`resolve_delta`; an explicit value must be in (0, 1)).
        accountant: ``"rdp"`` (default; Rényi DP, Mironov et al.) or ``"prv"`` (privacy random
            variables, Gopi et al.: tighter, slower).
        secure_rng: cryptographically secure noise and sampling (Opacus ``secure_mode``; needs
            the ``torchcsprng`` package, seeds are then refused). Default False: torch's PRNG,
            fine for experiments, not for a deployment that claims the guarantee.
        expected_batch: expected Poisson batch (default None: ``train.batch_size``, sampling
            rate ``1 / ceil(n / batch_size)`` as before). An integer: sampling rate
            ``expected_batch / n`` for a site of n training cases (at most n), and
            ``round(n / expected_batch)`` steps per local epoch.
        lr: learning rate of DP-SGD training (default None: ``train.lr``); the noise calls
            for its own.
        max_noise_multiplier: the largest σ a target ε may plan (default 10.0); a target that
            needs more fails before training (:func:`plan_site`).
    """

    enabled: bool = False
    noise_multiplier: float | None = 1.0
    target_epsilon: float | None = None
    max_grad_norm: float = 1.0
    delta: float | None = None
    accountant: str = "rdp"
    secure_rng: bool = False
    expected_batch: int | None = None
    lr: float | None = None
    max_noise_multiplier: float = 10.0

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "give exactly one of noise_multiplier and target_epsilon, got "
                f"noise_multiplier={self.noise_multiplier!r}, target_epsilon={self.target_epsilon!r}"
            )
        if self.noise_multiplier is not None and not (
            isinstance(self.noise_multiplier, (int, float)) and self.noise_multiplier >= 0
            and math.isfinite(self.noise_multiplier)
        ):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier!r}")
        if self.target_epsilon is not None and not (
            isinstance(self.target_epsilon, (int, float)) and 0 < self.target_epsilon < math.inf
        ):
            raise ValueError(f"target_epsilon must be a finite number > 0, got {self.target_epsilon!r}")
        if not (isinstance(self.max_grad_norm, (int, float)) and 0 < self.max_grad_norm < math.inf):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {self.max_grad_norm!r}")
        if self.delta is not None and not (isinstance(self.delta, (int, float)) and 0 < self.delta < 1):
            raise ValueError(f"delta must be None or in (0, 1), got {self.delta!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.expected_batch is not None and (
            isinstance(self.expected_batch, bool) or not isinstance(self.expected_batch, int)
            or self.expected_batch < 1
        ):
            raise ValueError(f"privacy.expected_batch must be null or an integer >= 1, got "
                             f"{self.expected_batch!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf):
            raise ValueError(f"privacy.lr must be null or a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.max_noise_multiplier, (int, float))
                and 0 < self.max_noise_multiplier < math.inf):
            raise ValueError(f"privacy.max_noise_multiplier must be a finite number > 0, got "
                             f"{self.max_noise_multiplier!r}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> PrivacyConfig:
        """From the Hydra ``privacy`` group (a DictConfig is a Mapping); unknown keys raise
        ``KeyError`` naming them. ``None`` gives the defaults (DP off)."""
        if mapping is None:
            return cls()
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(mapping) - allowed)
        if unknown:
            raise KeyError(f"unknown privacy setting(s) {unknown}; allowed: {sorted(allowed)}")
        values = dict(mapping)
        if "target_epsilon" in values and values["target_epsilon"] is not None \
                and "noise_multiplier" not in values:
            values["noise_multiplier"] = None  # a target ε replaces the default σ
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for MLflow params)."""
        return asdict(self)


def resolve_delta(config: PrivacyConfig, n_cases: int) -> float:
    """δ of a site: ``config.delta`` if given, else ``1 / (10 · n_cases)``.

    The rule keeps δ an order of magnitude below 1/n, the level at which a mechanism could
    publish one whole case with probability δ and still meet the definition. BraTS sites hold
    tens to hundreds of cases, so δ is 1e-3..1e-4: weaker than the 1e-5 of large-data papers,
    which is why the value used is logged next to ε.
    """
    if not isinstance(n_cases, int) or isinstance(n_cases, bool) or n_cases < 1:
        raise ValueError(f"n_cases must be an int >= 1, got {n_cases!r}")
    return float(config.delta) if config.delta is not None else 1.0 / (10 * n_cases)


#: Largest σ tried when planning on what is left of a budget (Opacus' MAX_SIGMA too).
MAX_PLANNED_SIGMA = 2000.0


# --------------------------------------------------------------------------- planning


def sample_rate_of(config: PrivacyConfig, n_cases: int, batch_size: int, site: str = "") -> float:
    """Poisson sampling rate q of a site with ``n_cases`` training cases.

    ``privacy.expected_batch`` null: ``1 / ceil(n / batch_size)`` (one epoch of
    ``ceil(n / batch_size)`` batches, as before the key existed). An integer b: ``b / n``;
    b above n is refused (a rate above 1 is not a sampling rate), naming the key.
    """
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    if config.expected_batch is None:
        return 1.0 / math.ceil(n_cases / int(batch_size))
    if config.expected_batch > n_cases:
        where = f" of site {site}" if site else ""
        raise PrivacyPlanError(
            f"privacy.expected_batch={config.expected_batch} exceeds the {n_cases} training "
            f"cases{where}: the sampling rate would be {config.expected_batch / n_cases:.2f} > 1; "
            f"set privacy.expected_batch <= {n_cases}")
    return config.expected_batch / n_cases


def steps_per_round(config: PrivacyConfig, n_cases: int, batch_size: int, local_epochs: int,
                    local_steps: int | None) -> int:
    """DP-SGD steps a site takes per round: ``fl.local_steps`` when set, else
    ``local_epochs`` epochs of ``round(1 / q)`` steps (``ceil(n / batch_size)`` with
    ``expected_batch`` null)."""
    if local_steps is not None:
        return int(local_steps)
    if config.expected_batch is None:
        return int(local_epochs) * math.ceil(n_cases / int(batch_size))
    return int(local_epochs) * max(1, round(n_cases / config.expected_batch))


def _epsilon_after(sigma: float, sample_rate: float, steps: int, delta: float,
                   mechanism: str) -> float:
    accountant = create_accountant(mechanism=mechanism)
    accountant.history = [(float(sigma), float(sample_rate), int(steps))]
    return float(accountant.get_epsilon(delta=delta))


def largest_steps(target_epsilon: float, delta: float, sample_rate: float, sigma: float,
                  mechanism: str, upper: int) -> int:
    """The largest number of steps k <= ``upper`` at ``sigma`` and ``sample_rate`` whose ε
    stays within ``target_epsilon`` (0 when not even one does); bisection on k, ε growing
    with k."""
    if _epsilon_after(sigma, sample_rate, 1, delta, mechanism) > target_epsilon:
        return 0
    low, high = 1, int(upper)
    if _epsilon_after(sigma, sample_rate, high, delta, mechanism) <= target_epsilon:
        return high
    while high - low > 1:
        mid = (low + high) // 2
        if _epsilon_after(sigma, sample_rate, mid, delta, mechanism) <= target_epsilon:
            low = mid
        else:
            high = mid
    return low


@dataclass(frozen=True)
class DPPlan:
    """A site's DP-SGD plan for the whole run (:func:`plan_site`).

    Attributes:
        noise_multiplier: σ (the given one, or planned from ``target_epsilon``).
        sample_rate: Poisson rate q.
        delta: δ.
        steps_per_round: DP-SGD steps per round.
        total_steps: steps over the run (rounds × steps per round); the accountant's horizon.
    """

    noise_multiplier: float
    sample_rate: float
    delta: float
    steps_per_round: int
    total_steps: int


def plan_site(config: PrivacyConfig, n_cases: int, *, batch_size: int, rounds: int,
              local_epochs: int, local_steps: int | None = None, site: str = "") -> DPPlan:
    """Plan one site's DP-SGD over every step it will take in the run.

    With ``target_epsilon``, σ is Opacus ``get_noise_multiplier`` for q, δ and ``rounds ×
    steps_per_round`` steps (no step outside DP-SGD: the strategies that fine-tune after the
    last round are refused under DP). A target that needs σ above
    ``max_noise_multiplier`` raises :class:`PrivacyPlanError` naming
    ``privacy.target_epsilon``, the σ it would need and the largest number of steps that
    meets it at ``max_noise_multiplier``.
    """
    delta = resolve_delta(config, n_cases)
    q = sample_rate_of(config, n_cases, batch_size, site)
    per_round = steps_per_round(config, n_cases, batch_size, local_epochs, local_steps)
    total = int(rounds) * per_round
    if config.target_epsilon is None:
        return DPPlan(float(config.noise_multiplier), q, delta, per_round, total)
    target = float(config.target_epsilon)
    try:
        sigma: float | None = float(get_noise_multiplier(
            target_epsilon=target, target_delta=delta, sample_rate=q, steps=total,
            accountant=config.accountant, epsilon_tolerance=0.01))
    except ValueError:  # Opacus: "The privacy budget is too low." (σ above its MAX_SIGMA)
        sigma = None
    bound = float(config.max_noise_multiplier)
    if sigma is None or sigma > bound:
        fits = largest_steps(target, delta, q, bound, config.accountant, total)
        where = f" at site {site}" if site else ""
        needs = f"σ={sigma:.2f}" if sigma is not None else f"σ > {MAX_PLANNED_SIGMA:.0f}"
        raise PrivacyPlanError(
            f"privacy.target_epsilon={target:g} cannot be met{where} ({n_cases} training "
            f"cases, δ={delta:.2g}, sampling rate {q:.3g}, {total} steps = {rounds} rounds x "
            f"{per_round}): it needs {needs}, above privacy.max_noise_multiplier={bound:g}; at "
            f"σ={bound:g} at most {fits} steps meet it (fewer fl.rounds or fl.local_steps), or "
            "raise privacy.target_epsilon or lower privacy.expected_batch")
    return DPPlan(sigma, q, delta, per_round, total)
