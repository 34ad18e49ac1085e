"""The cross-field rules of the settings, each written once.

The types and the named choices of every group are the schema's (:mod:`m4fuse.run.schema`,
checked by Hydra when the config is composed); what a type cannot say (a range, a rule
between keys, a personal set the configured network must have) is checked here, by
:func:`check_rules`, which :func:`m4fuse.run.settings.compose` runs on every composed config.
Every rule raises a ``ValueError`` whose one line names the key, the bad value and the fix.
The other places that read these settings (the ServerApp's strategy, the ClientApp, the data
provisioning) call the rule they need from here instead of checking again. Knows nothing of
Flower.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

#: Builds the configured network (one expert) for the rules that look at its weights:
#: :func:`m4fuse.run.settings.build_model` with ``num_experts=1``.
ModelBuilder = Callable[[DictConfig], torch.nn.Module]


def check_rules(cfg: DictConfig, build_model: ModelBuilder) -> None:
    """Fail early, naming the key and the bad value, on settings that cannot work:
    the strategy's rules (:func:`strategy_rules`), the rounds and the server's
    (:func:`round_rules`), the local training's (:func:`train_rules`) and the data's
    (:func:`data_rules`) and the privacy group's (:func:`privacy_rules`); ``build_model``
    builds the configured network."""
    strategy_rules(cfg, build_model)
    round_rules(cfg)
    train_rules(cfg)
    data_rules(cfg)
    privacy_rules(cfg)


def privacy_rules(cfg: DictConfig) -> None:
    """The ``privacy`` group read into its dataclass,
    :class:`m4fuse.training.dp_plan.PrivacyConfig`, which checks each field (it has no Hydra
    schema: one would add every field to every composed config and change the hash that
    guards a resumed run). Planning σ from ε needs the sites' sizes and runs before the
    first round instead (``server.runner.check_privacy_plan``)."""
    from omegaconf import OmegaConf

    from m4fuse.training.dp_plan import PrivacyConfig

    group = cfg.get("privacy")
    if group is None:
        return
    try:
        PrivacyConfig.from_mapping(OmegaConf.to_container(group, resolve=True))
    except KeyError as err:  # unknown keys: one line, as every other settings error
        raise ValueError(str(err).strip("'\"")) from None
    except ValueError as err:  # name the key as the user writes it
        text = str(err)
        raise ValueError(text if text.startswith("privacy.") else f"privacy.{text}") from None


def privacy_enabled(cfg: DictConfig) -> bool:
    """Whether ``privacy.enabled`` is set (False without a ``privacy`` group)."""
    privacy = cfg.get("privacy")
    return privacy is not None and bool(privacy.get("enabled", False))


def strategy_rules(cfg: DictConfig, build_model: ModelBuilder) -> None:
    """``fl.strategy`` (a known name, its personal sets present in the configured network),
    ``fl.finetune_epochs``, ``fl.personal_lr_scale``, ``fl.optimizer_state``,
    ``fl.init_checkpoint`` (exists, fits the network) and what DP-SGD refuses
    (:func:`dp_rules`)."""
    from m4fuse.personal.sets import check_optimizer_state, check_personal_set
    from m4fuse.personal.sets import strategy as named_strategy

    chosen = named_strategy(str(cfg.fl.strategy))  # unknown names fail here, listing the known
    if int(cfg.fl.get("finetune_epochs", 0)) < 0:
        raise ValueError(f"fl.finetune_epochs must be >= 0, got {cfg.fl.finetune_epochs!r}")
    if not float(cfg.fl.get("personal_lr_scale", 1.0)) > 0:
        raise ValueError(f"fl.personal_lr_scale must be > 0, got {cfg.fl.personal_lr_scale!r}")
    check_optimizer_state(cfg.fl.get("optimizer_state", "fresh"), privacy_enabled(cfg))
    if privacy_enabled(cfg):
        dp_rules(cfg, str(cfg.fl.strategy))
    if cfg.fl.get("init_checkpoint") is not None:
        build_model(cfg)  # fl.init_checkpoint: exists, fits the network
    if chosen.kept not in ("experts", "none", "all") or chosen.finetune:
        # The personal layers must exist in the configured model (a cheap tiny build).
        names = list(build_model(cfg).state_dict())
        check_personal_set(names, chosen.kept, f"fl.strategy={cfg.fl.strategy}")
        if chosen.finetune:
            check_personal_set(names, chosen.finetune, f"fl.strategy={cfg.fl.strategy}")


def dp_rules(cfg: DictConfig, strategy: str) -> None:
    """What DP-SGD (``privacy.enabled``) cannot run with under ``strategy``.

    FedProx: the proximal term's gradient is not a per-case gradient, so Opacus would neither
    clip nor account it. A fine-tuning after the last round: it is not DP-SGD. AMP float16:
    its loss scaling multiplies the per-case gradients Opacus clips. CPU bfloat16 autocast
    (``train.amp_cpu``): the per-case gradients are recomputed in backward, outside autocast,
    from bfloat16 activations; untried and refused.
    """
    from m4fuse.personal.sets import strategy as named_strategy

    if strategy == "fedprox":
        raise ValueError("privacy.enabled with fl.strategy=fedprox is not supported: the "
                         "proximal term is not a per-case gradient (use fl.strategy=personal)")
    if named_strategy(strategy).finetune and int(cfg.fl.get("finetune_epochs", 0)) > 0:
        raise ValueError(f"fl.strategy={strategy} with privacy.enabled is not supported: "
                         "the fine-tuning after the last round is not DP-SGD (use "
                         "fl.finetune_epochs=0 or fl.strategy=personal-norm)")
    if bool(cfg.train.amp) and str(cfg.train.amp_dtype) == "float16":
        raise ValueError("privacy.enabled with train.amp_dtype=float16 is not supported: "
                         "loss scaling changes the per-case gradients Opacus clips "
                         "(use train.amp_dtype=bfloat16 or train.amp=false)")
    if bool(cfg.train.amp) and bool(cfg.train.get("amp_cpu", False)):
        raise ValueError("privacy.enabled with train.amp_cpu=true is not supported: the "
                         "per-case gradients are recomputed outside autocast from bfloat16 "
                         "activations (use train.amp_cpu=false)")


def round_rules(cfg: DictConfig) -> None:
    """``fl.rounds``, ``fl.local_epochs``, ``fl.fraction_train``, ``fl.proximal_mu``, the
    server optimiser's keys (:func:`m4fuse.run.server_opt.server_opt_settings`) and the
    aggregation's (:func:`m4fuse.run.aggregation.aggregation_settings`, with Krum's least
    number of sites where the federation's size is known here: :func:`known_sites`;
    :func:`server_rules`)."""
    from m4fuse.run.server_opt import server_opt_settings

    if int(cfg.fl.rounds) < 1:
        raise ValueError(f"fl.rounds must be >= 1, got {cfg.fl.rounds!r}")
    if int(cfg.fl.local_epochs) < 1:
        raise ValueError(f"fl.local_epochs must be >= 1, got {cfg.fl.local_epochs!r}")
    if not 0.0 < float(cfg.fl.fraction_train) <= 1.0:
        raise ValueError(f"fl.fraction_train must be in (0, 1], got {cfg.fl.fraction_train!r}")
    if float(cfg.fl.proximal_mu) < 0:
        raise ValueError(f"fl.proximal_mu must be >= 0, got {cfg.fl.proximal_mu!r}")
    server_opt_settings(cfg.fl)  # fl.server_opt and its parameters
    server_rules(cfg.fl, known_sites(cfg))  # the sites per round, the aggregation


def server_rules(fl: Mapping[str, Any], num_sites: int | None,
                 site_names: Sequence[str] = ()) -> tuple[str, dict[str, Any]]:
    """The server's rules on the ``fl`` keys ``norm_bound`` (> 0), ``min_sites`` and
    ``min_train_sites`` (at least 1; with ``num_sites`` known, at most the sites asked per
    round and the sites) and the aggregation's
    (:func:`m4fuse.run.aggregation.aggregation_settings`: Krum's least number of sites when
    ``num_sites`` is known). ``site_names`` (default none), when given, must be
    ``num_sites`` names. The config is checked with the size it knows
    (:func:`known_sites`), the ServerApp's strategy with the federation's. Returns
    ``aggregation_settings``'s ``(name, parameters)``."""
    from m4fuse.run.aggregation import aggregation_settings, sites_asked

    norm_bound = fl.get("norm_bound", math.inf)
    if not norm_bound > 0:
        raise ValueError(f"fl.norm_bound must be > 0 (.inf: off), got {norm_bound!r}")
    min_sites, min_train_sites = fl.get("min_sites", 1), fl.get("min_train_sites", 1)
    if num_sites is None:
        if min_sites < 1:
            raise ValueError(f"fl.min_sites must be >= 1, got {min_sites!r}")
        return aggregation_settings(fl)
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    if site_names and len(site_names) != num_sites:
        raise ValueError(f"{len(site_names)} site names {list(site_names)} for {num_sites} sites")
    if not 1 <= min_train_sites <= num_sites:
        raise ValueError(f"fl.min_train_sites must be in [1, {num_sites}], got {min_train_sites}")
    asked = sites_asked(num_sites, float(fl.get("fraction_train", 1.0)), min_train_sites)
    if not 1 <= min_sites <= asked:
        raise ValueError(f"fl.min_sites must be in [1, {asked}] (sites asked to train per "
                         f"round), got {min_sites}")
    return aggregation_settings(fl, num_sites)  # also fl.aggregation_weight, fl.local_steps


def known_sites(cfg: DictConfig) -> int | None:
    """The federation's size where the config says it: the number of ``fl.site_names``, or
    the synthesiser's ``data.sites`` (at most that many sites); None for a BraTS split
    (counted by the server, which checks the Krum rule again)."""
    if cfg.fl.get("site_names"):
        return len(cfg.fl.site_names)
    if cfg.data.get("kind") == "synthetic" and not cfg.data.get("partition_csv"):
        return int(cfg.data.sites)
    return None


def train_rules(cfg: DictConfig) -> None:
    """``train.batch_size`` >= 1, and CPU autocast (``train.amp_cpu``) in bfloat16 only."""
    if int(cfg.train.batch_size) < 1:
        raise ValueError(f"train.batch_size must be >= 1, got {cfg.train.batch_size!r}")
    if (bool(cfg.train.amp) and bool(cfg.train.get("amp_cpu", False))
            and str(cfg.train.amp_dtype) != "bfloat16"):
        raise ValueError("train.amp_cpu=true (CPU autocast) runs in bfloat16 only, got "
                         f"train.amp_dtype={cfg.train.amp_dtype!r}: set "
                         "train.amp_dtype=bfloat16 or train.amp_cpu=false")


def data_rules(cfg: DictConfig) -> None:
    """Absolute ``root``, ``data.source``, ``data.cache_dir``, ``data.partition_csv``;
    ``data.min_cases_per_site`` >= 1; ``data.kind``; the federation's layout
    (:func:`check_data_settings`)."""
    if cfg.root is not None and not Path(str(cfg.root)).is_absolute():
        raise ValueError(f"root must be an absolute path, got {cfg.root!r}")
    for key in ("source", "cache_dir", "partition_csv"):
        value = cfg.data.get(key)
        if value not in (None, "???") and not Path(str(value)).is_absolute():
            raise ValueError(f"data.{key} must be an absolute path, got {value!r}")
    minimum = cfg.data.get("min_cases_per_site", 1)
    if isinstance(minimum, bool) or not isinstance(minimum, int) or minimum < 1:
        raise ValueError(f"data.min_cases_per_site must be an integer >= 1, got {minimum!r}")
    if cfg.data.kind not in ("synthetic", "brats"):
        raise ValueError(f"data.kind must be 'synthetic' or 'brats', got {cfg.data.kind!r}")
    check_data_settings(cfg)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_data_settings(cfg: DictConfig) -> None:
    """Fail before any data is written, naming the key, the value and the fix, on a bad
    federation layout: ``data.site_sizes`` (one integer >= 1 per site of ``data.sites``),
    ``data.site_names`` (``data.sites`` distinct names), ``data.lower_grade_sites`` (names
    of sites) and ``data.test_cases_per_site`` (null or an integer >= 1)."""
    d = cfg.data
    test_cases = d.get("test_cases_per_site")
    if test_cases is not None and (not _is_int(test_cases) or test_cases < 1):
        raise ValueError(f"data.test_cases_per_site must be null or an integer >= 1, got {test_cases!r}")
    if d.get("kind") != "synthetic":
        return
    sites = d.get("sites")
    if not _is_int(sites) or sites < 1:
        raise ValueError(f"data.sites must be an integer >= 1, got {sites!r}")
    _check_site_sizes(d.get("site_sizes"), sites)
    names = d.get("site_names")
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != sites or len(set(names)) != sites or not all(n.strip() for n in names):
            raise ValueError(f"data.site_names must be {sites} distinct non-empty names "
                             f"(data.sites={sites}), got {names}")
        bad = [n for n in names if "/" in n or "\\" in n or "," in n or n != n.strip()]
        if bad:
            raise ValueError(f"data.site_names: {bad} cannot name a site (no '/', '\\', ',' or "
                             "surrounding spaces)")
    lower = [str(n) for n in (d.get("lower_grade_sites") or [])]
    if lower:
        from m4fuse.data.sites import site_names as default_names

        known = names if names is not None else default_names(sites)
        unknown = [n for n in lower if n not in known]
        if unknown:
            raise ValueError(f"data.lower_grade_sites names {unknown}, not sites of this "
                             f"federation: {known}")


def _check_site_sizes(sizes: Any, sites: int) -> None:
    """``data.site_sizes``: null, or one integer >= 1 per site of ``data.sites``."""
    if sizes is None:
        return
    if isinstance(sizes, (str, int, float)) or not hasattr(sizes, "__len__"):
        raise ValueError(f"data.site_sizes must be a list of {sites} integers or null, got {sizes!r}")
    if len(sizes) != sites:
        raise ValueError(f"data.site_sizes has {len(sizes)} entries for data.sites={sites}: "
                         f"give one size per site (or set data.sites={len(sizes)})")
    for index, size in enumerate(sizes):
        if not _is_int(size) or size < 1:
            raise ValueError(f"data.site_sizes[{index}]={size!r}: every site needs an integer "
                             "number of cases >= 1")
