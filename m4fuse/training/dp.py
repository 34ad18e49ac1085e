"""Differential privacy on the client: DP-SGD with Opacus 1.6.

One site trains its own model (one expert, index 0) under DP-SGD: every optimiser step clips
each case's gradient to ``max_grad_norm`` (flat clipping over all trainable parameters), adds
Gaussian noise of std ``noise_multiplier * max_grad_norm`` to the sum, and samples its batch
by Poisson sampling (each case independently with rate ``q = 1 / batches_per_epoch``). The
guarantee is per site, at the level of one case (add/remove one patient of that site's
training set), for everything the site sends out: its shared weights *and* its metrics are
functions of the DP-trained model (the loss metric is the only other number computed from
training data; it is not privatised, see docs/privacy.md).

Use (one round): :class:`PrivateTrainer`, the local trainer that owns the Opacus engine:

    dp = PrivateRound(cfg_privacy, total_epochs=rounds * local_epochs,
                      accountant_state=saved_or_None, seed=round_seed)
    trainer = PrivateTrainer.scheduled(model, train_cfg, total_steps, dp=dp)
    try:
        trainer.train_epochs(trainer.prepare(loader))   # Opacus wraps model, optimiser, loader
    finally:
        trainer.close()                     # hooks off; ``model`` is a plain network again
    state = dp.training.accountant_state()  # store in context.state (ConfigRecord-ready)
    eps = dp.training.epsilon()             # report as a metric

What had to be adapted for Opacus:

* The network itself is Opacus-ready (``m4fuse/nets/model.py``): GroupNorm, and the Mamba of each
  mixer is a leaf module that folds the channel groups into its batch internally, so every
  module Opacus hooks sees the true batch ``B`` as its first axis. Opacus has no grad sampler
  for the leaf modules with raw parameters (:class:`~m4fuse.nets.model.Mamba`,
  :class:`~m4fuse.nets.model.SkipScale`). :func:`register_grad_samplers` registers
  :func:`leaf_loop_grad_sampler` for them through Opacus' documented extension point,
  ``register_grad_sampler``: per sample, it reruns the leaf's own forward on that sample's
  inputs and takes ``torch.autograd.grad`` of ``<output, backprop>``. It works with any scan
  implementation, including ``mamba_ssm``'s fused CUDA kernel, which Opacus' functorch
  fallback cannot transform, and it keeps the scan's memory-bounded backward (the functorch
  path of ``m4fuse.nets.scan`` stores every chunk's intermediates). Measured on the tiny CPU model
  (widths 8..64, 16³, batch 2, one thread), a DP step took 515 ms with this sampler and 460 ms
  with the functorch fallback, against 142 ms without DP.
* The expert index: :class:`SiteModel` closes over the site's fixed expert index so that no
  batch is ever split between experts (an expert applied to a subset of the batch would get
  per-sample gradients for that subset only, which Opacus cannot clip).
* The loader: Opacus' ``DPDataLoader`` builds empty Poisson batches by copying the structure of
  the first batch and refuses strings (the ``case`` ids); :func:`poisson_loader` uses Opacus'
  ``UniformWithReplacementSampler`` with a collate that also handles lists of strings.

Everything else is Opacus as documented: ``PrivacyEngine.make_private`` (GradSampleModule,
DPOptimizer, accountant hook), ``get_noise_multiplier`` for a target ε, the RDP/PRV
accountants and their ``history``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from opacus import GradSampleModule, PrivacyEngine
from opacus.grad_sample.utils import register_grad_sampler
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader

from m4fuse.nets.model import M4Fuse
from m4fuse.training.dp_accountant import PrivacyBudgetExhausted as PrivacyBudgetExhausted
from m4fuse.training.dp_accountant import accountant_from_record as accountant_from_record
from m4fuse.training.dp_accountant import accountant_to_record as accountant_to_record
from m4fuse.training.dp_accountant import epsilon_of as epsilon_of
from m4fuse.training.dp_accountant import history_steps
from m4fuse.training.dp_accountant import plan_noise_multiplier as plan_noise_multiplier
from m4fuse.training.dp_loader import EmptySafeCollate as EmptySafeCollate
from m4fuse.training.dp_loader import poisson_loader as poisson_loader
from m4fuse.training.dp_plan import ACCOUNTANTS as ACCOUNTANTS
from m4fuse.training.dp_plan import MAX_PLANNED_SIGMA as MAX_PLANNED_SIGMA
from m4fuse.training.dp_plan import DPPlan as DPPlan
from m4fuse.training.dp_plan import PrivacyConfig as PrivacyConfig
from m4fuse.training.dp_plan import PrivacyPlanError as PrivacyPlanError
from m4fuse.training.dp_plan import largest_steps as largest_steps
from m4fuse.training.dp_plan import plan_site as plan_site
from m4fuse.training.dp_plan import resolve_delta as resolve_delta
from m4fuse.training.dp_plan import sample_rate_of as sample_rate_of
from m4fuse.training.dp_plan import steps_per_round as steps_per_round
from m4fuse.training.trainer import LocalTrainer

# --------------------------------------------------------------------------- model


def prepare_for_opacus(model: nn.Module) -> nn.Module:
    """Check ``model`` against Opacus' ``ModuleValidator`` (which rejects BatchNorm, for
    instance) and register grad samplers for its leaf modules with raw parameters
    (:func:`register_grad_samplers`); returns ``model`` unchanged."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"model is not compatible with Opacus: {errors}")
    register_grad_samplers(model)
    return model


class SiteModel(nn.Module):
    """The site's network routed to one fixed expert: ``forward(x, expert=None)``.

    The inner network is kept as ``module`` (so ``m4fuse.inference.predict.unwrap`` finds it and
    parameter names stay the network's). ``expert`` may be given, as the training loop does,
    but must then be ``expert_index`` for every sample.
    """

    def __init__(self, model: M4Fuse, expert_index: int = 0) -> None:
        super().__init__()
        if not isinstance(model, M4Fuse):
            raise TypeError(f"model must be an M4Fuse, got {type(model).__name__}")
        if not isinstance(expert_index, int) or not 0 <= expert_index < model.num_experts:
            raise ValueError(
                f"expert_index must be in 0..{model.num_experts - 1}, got {expert_index!r}"
            )
        if model.num_experts != 1:
            raise ValueError(
                f"DP training needs a site model with exactly one expert (the site's own), got "
                f"{model.num_experts}: the other experts would get no per-sample gradient"
            )
        self.module = model
        self.expert_index = expert_index

    def forward(self, x: torch.Tensor, expert: torch.Tensor | None = None) -> torch.Tensor:
        if expert is not None and bool((torch.as_tensor(expert) != self.expert_index).any()):
            raise ValueError(
                f"this site model routes every sample to expert {self.expert_index}, "
                "got expert indices "
                f"{sorted(set(torch.as_tensor(expert).tolist()) - {self.expert_index})}"
            )
        routes = torch.full((x.shape[0],), self.expert_index, dtype=torch.long, device=x.device)
        return self.module(x, routes)


def leaf_loop_grad_sampler(
    layer: nn.Module, activations: Sequence[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a leaf module's own parameters, one sample at a time.

    For sample i: ``y_i = layer.forward(*[a[i:i+1] for a in activations])`` (the unbound
    forward, so no hook fires), then ``torch.autograd.grad(y_i, params, backprops[i:i+1])``.
    ``backprops`` already carries Opacus' loss-reduction scaling. Written by hand because
    Opacus' functorch fallback passes only the first input and cannot transform custom
    autograd Functions (the selective scan); a loop over the batch (1-4 volumes in 3D
    segmentation) costs one extra forward/backward of the leaf per sample.
    """
    if any(True for _ in layer.children()):
        raise TypeError(f"{type(layer).__name__} has child modules; this sampler is for leaves only")
    params = [p for p in layer.parameters(recurse=False) if p.requires_grad]
    n = backprops.shape[0]
    per_sample: list[list[torch.Tensor]] = [[] for _ in params]
    with torch.enable_grad():
        for i in range(n):
            inputs = [a[i : i + 1] for a in activations]
            out = type(layer).forward(layer, *inputs)
            grads = torch.autograd.grad(
                out, params, grad_outputs=backprops[i : i + 1].to(out.dtype), allow_unused=True
            )
            for j, (p, g) in enumerate(zip(params, grads)):
                per_sample[j].append(torch.zeros_like(p) if g is None else g.to(p.dtype))
    return {
        p: torch.stack(gs) if gs else p.new_zeros((0, *p.shape))
        for p, gs in zip(params, per_sample)
    }


def register_grad_samplers(model: nn.Module) -> list[type[nn.Module]]:
    """Register :func:`leaf_loop_grad_sampler` with Opacus for every leaf module type of
    ``model`` that holds trainable parameters and has no Opacus grad sampler (idempotent).

    Returns the types it covers (for the network: ``Mamba`` and ``SkipScale``). A non-leaf
    module with its own parameters is left to Opacus' functorch fallback.
    """
    covered: list[type[nn.Module]] = []
    for module in model.modules():
        kind = type(module)
        own = any(p.requires_grad for p in module.parameters(recurse=False))
        if not own or any(True for _ in module.children()) or kind in covered:
            continue
        sampler = GradSampleModule.GRAD_SAMPLERS.get(kind)
        if sampler is None:
            register_grad_sampler(kind)(leaf_loop_grad_sampler)
            sampler = leaf_loop_grad_sampler
        if sampler is leaf_loop_grad_sampler:
            covered.append(kind)
    return covered


# --------------------------------------------------------------------------- engine


@dataclass
class PrivateTraining:
    """What :func:`make_private_training` returns.

    Attributes:
        module: Opacus ``GradSampleModule`` around a :class:`SiteModel`; train with it
            (``forward(x, expert)`` like the network). Its parameters are the network's.
        optimizer: the ``DPOptimizer`` (clip, noise, account on every ``step()``).
        loader: the Poisson-sampled loader.
        engine: the ``PrivacyEngine`` (its accountant holds the restored history).
        model: the network itself (read and write weights here).
        noise_multiplier: σ used.
        delta: δ used.
        sample_rate: Poisson rate q.
        planned_steps: steps the target ε was planned for (None with a fixed σ).
    """

    module: GradSampleModule
    optimizer: DPOptimizer
    loader: DataLoader
    engine: PrivacyEngine
    model: M4Fuse
    noise_multiplier: float
    delta: float
    sample_rate: float
    planned_steps: int | None = None

    def epsilon(self) -> float:
        """ε spent so far by this site (all rounds whose history was restored, plus this one)."""
        if len(self.engine.accountant) == 0:
            return 0.0
        return float(self.engine.accountant.get_epsilon(delta=self.delta))

    def steps(self) -> int:
        """DP steps taken so far (all rounds)."""
        return history_steps(self.engine.accountant)

    def accountant_state(self) -> dict[str, Any]:
        """The accountant's history for ``context.state`` (see :func:`accountant_to_record`)."""
        return accountant_to_record(self.engine.accountant)

    def metrics(self) -> dict[str, float]:
        """Scalars to send with the reply / log to MLflow: ``dp-epsilon``, ``dp-delta``,
        ``dp-noise-multiplier``, ``dp-steps``."""
        return {
            "dp-epsilon": self.epsilon(),
            "dp-delta": self.delta,
            "dp-noise-multiplier": self.noise_multiplier,
            "dp-steps": float(self.steps()),
        }

    def close(self) -> M4Fuse:
        """Remove Opacus' hooks and per-sample buffers; returns the network."""
        self.module.remove_hooks()
        for p in self.model.parameters():
            for attr in ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)
        return self.model


def _privacy_engine(config: PrivacyConfig,
                    accountant_state: Mapping[str, Any] | None) -> PrivacyEngine:
    """Opacus' engine with ``config.accountant``, holding the restored history of earlier
    rounds (which must come from the same accountant)."""
    with warnings.catch_warnings():
        # Opacus warns that secure RNG is off; PrivacyConfig documents it (secure_rng).
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=config.accountant, secure_mode=config.secure_rng)
    if accountant_state is not None:
        restored = accountant_from_record(accountant_state)
        if restored.mechanism() != config.accountant:
            raise ValueError(
                f"saved accountant is {restored.mechanism()!r}, the config asks for "
                f"{config.accountant!r}; ε of one run must come from one accountant"
            )
        engine.accountant.history = restored.history
    return engine


def _generators(config: PrivacyConfig, engine: PrivacyEngine, model: M4Fuse, seed: int | None
                ) -> tuple[torch.Generator | None, torch.Generator | None]:
    """``(sampling generator, noise generator)``: the engine's secure RNG for sampling under
    ``secure_rng``, generators seeded by ``seed`` and ``seed + 1`` otherwise, or None (fresh
    randomness)."""
    if config.secure_rng:
        return engine.secure_rng, None
    if seed is None:
        return None, None
    generator = torch.Generator().manual_seed(int(seed))
    device = next(model.parameters()).device
    return generator, torch.Generator(device=device).manual_seed(int(seed) + 1)


def _noise_multiplier(config: PrivacyConfig, engine: PrivacyEngine, delta: float,
                      sample_rate: float, total_epochs: int | None, steps_per_epoch: int,
                      total_steps: int | None = None) -> tuple[float, int | None]:
    """``(σ, planned steps)``: ``noise_multiplier`` as given (no plan), or with
    ``target_epsilon`` the σ planned on what is left of the budget after the restored history
    (:func:`plan_noise_multiplier`) for ``total_steps`` steps (default None:
    ``total_epochs × steps_per_epoch``)."""
    if config.target_epsilon is None:
        return float(config.noise_multiplier), None
    if total_steps is not None:
        planned, horizon = int(total_steps), f"{int(total_steps)} steps"
    elif not isinstance(total_epochs, int) or total_epochs < 1:
        raise ValueError(f"target_epsilon needs total_epochs >= 1 (rounds × local epochs), "
                         f"got {total_epochs!r}")
    else:
        planned, horizon = total_epochs * steps_per_epoch, f"{total_epochs} epochs"
    done = history_steps(engine.accountant)
    if done >= planned:
        spent = float(engine.accountant.get_epsilon(delta=delta)) if done else 0.0
        raise PrivacyBudgetExhausted(
            f"privacy budget spent (ε={spent:.2f}, δ={delta:.2g}): the site has taken {done} "
            f"DP steps, privacy.target_epsilon={config.target_epsilon:g} was planned for "
            f"{planned} ({horizon}); it refuses to train this round"
        )
    sigma = plan_noise_multiplier(
        float(config.target_epsilon), delta, sample_rate, planned - done,
        engine.accountant.history, config.accountant,
    )
    return sigma, planned


def _use_sample_rate(dp_optimizer: DPOptimizer, engine: PrivacyEngine, sample_rate: float,
                     n_cases: int) -> None:
    """make_private takes q = 1 / len(loader); with a given q (len = round(1 / q)) the
    accountant and the average of the noisy sum use the true q and n·q instead."""
    dp_optimizer.expected_batch_size = sample_rate * n_cases
    dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))


def _check_private_call(config: PrivacyConfig, seed: int | None) -> None:
    if not config.enabled:
        raise ValueError("make_private_training called with privacy.enabled = false")
    if config.secure_rng and seed is not None:
        raise ValueError(f"secure_rng draws its own randomness; do not pass a seed (got {seed!r})")


def make_private_training(
    model: M4Fuse,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    config: PrivacyConfig,
    *,
    total_epochs: int | None = None,
    accountant_state: Mapping[str, Any] | None = None,
    expert_index: int = 0,
    n_cases: int | None = None,
    seed: int | None = None,
    total_steps: int | None = None,
    sample_rate: float | None = None,
) -> PrivateTraining:
    """Wrap a site's model, optimiser and loader for DP-SGD with Opacus' ``make_private``.

    Args:
        model: the site's network (one expert); checked by :func:`prepare_for_opacus`.
        optimizer: an optimiser over ``model``'s parameters (an LR scheduler on it keeps working).
        loader: the site's training loader (its batch size sets the expected Poisson batch).
        config: the run's :class:`PrivacyConfig` (must be ``enabled``).
        total_epochs: epochs of local training over the whole run, ``rounds × local_epochs``;
            required with ``target_epsilon`` (the budget is planned over them), else unused.
        accountant_state: the site's history of earlier rounds (None for the first).
        expert_index: the site's expert in ``model`` (default 0); ``n_cases``: cases for the
            δ rule (default ``len(loader.dataset)``).
        seed: seeds noise and sampling (default None: fresh); refused with ``secure_rng``.
        total_steps: DP steps over the whole run (default None: ``total_epochs`` epochs);
            the horizon of ``target_epsilon`` (:func:`plan_site`'s ``total_steps``).
        sample_rate: Poisson rate q (default None: ``1 / len(loader)``), e.g. from
            :func:`sample_rate_of`; the accountant and the gradient average use it.

    Raises:
        PrivacyBudgetExhausted: with ``target_epsilon``, the planned steps are all spent.
    """
    _check_private_call(config, seed)
    n = len(loader.dataset) if n_cases is None else n_cases
    delta = resolve_delta(config, n)
    site_model = SiteModel(model, expert_index)
    prepare_for_opacus(model)
    engine = _privacy_engine(config, accountant_state)
    generator, noise_generator = _generators(config, engine, model, seed)
    custom_rate = sample_rate is not None
    dp_loader = poisson_loader(loader, generator, sample_rate)
    sample_rate = sample_rate if custom_rate else 1.0 / len(dp_loader)
    sigma, planned = _noise_multiplier(config, engine, delta, sample_rate, total_epochs,
                                       len(dp_loader), total_steps)
    module, dp_optimizer, _ = engine.make_private(
        module=site_model, optimizer=optimizer, data_loader=dp_loader, noise_multiplier=sigma,
        max_grad_norm=float(config.max_grad_norm),
        poisson_sampling=False,  # dp_loader already samples by Poisson (see poisson_loader)
        noise_generator=noise_generator,
    )
    module.forbid_grad_accumulation()  # what make_private does when it builds the loader
    if custom_rate:
        _use_sample_rate(dp_optimizer, engine, sample_rate, len(loader.dataset))
    return PrivateTraining(
        module=module, optimizer=dp_optimizer, loader=dp_loader, engine=engine, model=model,
        noise_multiplier=sigma, delta=delta, sample_rate=sample_rate, planned_steps=planned,
    )



def noise_only_step(optimizer: DPOptimizer) -> None:
    """One DP step on an empty Poisson batch: the update is noise only, and it is accounted.

    The training loop calls it instead of forward/backward when a batch holds 0 cases (the
    mechanism must not skip the step: whether a batch is empty depends on the data). Sets a
    0-long per-sample gradient on every parameter, then ``optimizer.step()``.
    """
    if not isinstance(optimizer, DPOptimizer):
        raise TypeError(f"noise_only_step needs a DPOptimizer, got {type(optimizer).__name__}")
    optimizer.zero_grad(set_to_none=True)
    for p in optimizer.params:
        p.grad_sample = p.new_zeros((0, *p.shape))
    optimizer.step()



@dataclass
class PrivateRound:
    """What DP-SGD needs for one round of a site (see :func:`make_private_training` for the
    fields), and what it leaves: ``training``, the :class:`PrivateTraining` of the round once
    :meth:`PrivateTrainer.prepare` has wrapped model, optimiser and loader (None before), whose
    accountant holds what the site has spent, even when the round fails afterwards.

    ``max_steps``: optimiser steps of the round (:func:`plan_round`), None for epochs."""

    config: PrivacyConfig
    total_epochs: int | None = None
    accountant_state: Mapping[str, Any] | None = None
    seed: int | None = None
    total_steps: int | None = None
    sample_rate: float | None = None
    max_steps: int | None = None
    training: PrivateTraining | None = None


def plan_round(config: PrivacyConfig, train_cases: int, batch_size: int, rounds: int,
               local_epochs: int, local_steps: int | None, seed: int,
               accountant_state: Mapping[str, Any] | None, site: str) -> PrivateRound:
    """A site's :class:`PrivateRound`: σ, q and the steps over the whole run planned by
    :func:`plan_site` (a target out of reach fails); with ``local_steps`` or
    ``privacy.expected_batch`` the round takes the plan's steps per round."""
    plan = plan_site(config, train_cases, batch_size=batch_size, rounds=rounds,
                     local_epochs=local_epochs, local_steps=local_steps, site=site)
    max_steps = local_steps
    if local_steps is not None or config.expected_batch is not None:
        max_steps = plan.steps_per_round
    return PrivateRound(
        config, total_epochs=rounds * local_epochs, accountant_state=accountant_state,
        seed=None if config.secure_rng else seed, total_steps=plan.total_steps,
        sample_rate=plan.sample_rate if config.expected_batch is not None else None,
        max_steps=max_steps)


class PrivateTrainer(LocalTrainer):
    """The local trainer under DP-SGD: :meth:`prepare` wraps the model, optimiser and loader
    with Opacus (:func:`make_private_training` with the fields of ``dp``, a
    :class:`PrivateRound`), an empty Poisson batch takes a :func:`noise_only_step`, and
    :meth:`close` removes Opacus' hooks. The kept optimiser state stays that of the AdamW."""

    def __init__(self, *args: Any, dp: PrivateRound, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dp = dp

    def prepare(self, loader: DataLoader) -> DataLoader:
        """Wrap model, optimiser and ``loader`` for DP-SGD; the Poisson loader to pass over."""
        dp = self.dp
        dp.training = make_private_training(
            self.model, self.optimizer, loader, dp.config, total_epochs=dp.total_epochs,
            accountant_state=dp.accountant_state, seed=dp.seed, total_steps=dp.total_steps,
            sample_rate=dp.sample_rate)
        self.forward_model, self.step_optimizer = dp.training.module, dp.training.optimizer
        return dp.training.loader

    def empty_batch(self) -> None:
        """A 0-case Poisson batch: a noise-only step, accounted."""
        noise_only_step(self.step_optimizer)

    def close(self) -> None:
        """Remove Opacus' hooks and per-sample buffers (the accountant stays in ``dp``)."""
        if self.dp.training is not None:
            self.dp.training.close()
