"""Settings: the Hydra configs of ``configs/`` composed and checked, and what is built from them.

:func:`compose` (and :func:`compose_run` for a Flower run) gives the checked config every
command, the ServerApp and the ClientApp read; :func:`model_config`, :func:`build_model` and
:func:`train_config` turn it into the contracts of ``m4fuse.nets.model`` and ``m4fuse.training.engine``
(docs/interfaces.md). Knows nothing of Flower (docs/design.md §1).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from m4fuse.run.workspace import CONFIG_DIR  # noqa: F401 (re-exported: the Hydra config folder)


def _strategy_names() -> tuple[str, ...]:
    from m4fuse.personal.sets import STRATEGIES as table

    return tuple(table)


#: The ``fl.strategy`` names (what each keeps/sends: :data:`m4fuse.personal.sets.STRATEGIES`).
STRATEGIES: tuple[str, ...] = _strategy_names()


#: The ``train`` keys that are :class:`m4fuse.training.engine.TrainConfig` fields, in the YAML's order
#: (the others come from elsewhere: epochs from ``fl.local_epochs``, the seed from ``seed``).
TRAIN_KEYS: tuple[str, ...] = ("batch_size", "lr", "weight_decay", "warmup_steps", "min_lr",
                               "amp", "amp_dtype", "amp_cpu", "grad_clip", "lambda_dice",
                               "lambda_ce")


def schema_of(cls: type, name: str, keys: Sequence[str] | None = None,
              extra: Sequence[tuple[str, Any, Any]] = ()) -> type:
    """A Hydra structured-config schema from the dataclass ``cls``: its fields ``keys`` (all
    by default, in that order) with their types and defaults, then ``extra``
    ``(name, type, default)`` fields. Not frozen (Hydra merges the YAML into it) and without
    ``cls``'s checks, which run when the contract is built from the composed config."""
    hints = typing.get_type_hints(cls)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    chosen = list(defaults) if keys is None else list(keys)
    schema = dataclasses.make_dataclass(
        name, [(k, hints[k], dataclasses.field(default=defaults[k])) for k in chosen]
        + [(k, t, dataclasses.field(default=d)) for k, t, d in extra])
    schema.__module__ = __name__  # picklable: a module attribute of this name (below)
    return schema


#: The ``model`` keys that are :class:`m4fuse.nets.model.M4FuseConfig` fields; ``preset`` and
#: ``widths`` (one or the other, either may be null) come after them in its schema.
MODEL_KEYS: tuple[str, ...] = ("output", "d_state", "d_conv", "expand", "mixer_groups",
                               "dropout", "norm_groups")

_SCHEMAS: dict[str, type] = {}


def _build_schema(name: str) -> type:
    if name == "TrainSchema":
        from m4fuse.training.engine import TrainConfig

        return schema_of(TrainConfig, name, TRAIN_KEYS,
                         [("augment", bool, True), ("num_workers", int, 0)])
    from m4fuse.nets.model import M4FuseConfig

    return schema_of(M4FuseConfig, name, MODEL_KEYS,
                     [("preset", typing.Optional[str], None),
                      ("widths", typing.Optional[list[int]], None)])


def __getattr__(name: str) -> Any:
    """``TrainSchema`` and ``ModelSchema``, built on first use (they import ``m4fuse.training.engine``
    / ``m4fuse.nets.model``); module attributes so that a composed config pickles."""
    if name not in ("TrainSchema", "ModelSchema"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _SCHEMAS:
        _SCHEMAS[name] = _build_schema(name)
    return _SCHEMAS[name]


def register_schemas() -> None:
    """Store the schemas of the ``train`` and ``model`` groups in Hydra's ConfigStore as
    ``schema/train`` and ``schema/model``: the :class:`m4fuse.training.engine.TrainConfig` fields of
    :data:`TRAIN_KEYS` plus the loader keys ``augment: bool`` and ``num_workers: int``; the
    :class:`m4fuse.nets.model.M4FuseConfig` fields of :data:`MODEL_KEYS` plus ``preset`` and
    ``widths`` (optional). Each group's YAML names its schema first in its defaults list, so a
    misspelt key or a value of the wrong type fails at compose time with Hydra's message
    naming the key; the YAML stays the source of the values. The ``fl``, ``data`` and
    ``tracking`` groups' schemas are stored too
    (:func:`m4fuse.run.schema.register_group_schemas`); ``privacy`` has none yet (its
    dataclass, :class:`m4fuse.training.dp_plan.PrivacyConfig`, fills in unset keys by rules
    of its own)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(group="schema", name="train", node=__getattr__("TrainSchema"))
    store.store(group="schema", name="model", node=__getattr__("ModelSchema"))
    from m4fuse.run.schema import register_group_schemas

    register_group_schemas()


def compose(config_name: str = "config", overrides: Sequence[str] = ()) -> DictConfig:
    """Compose the Hydra config ``config_name`` from :data:`CONFIG_DIR` with ``overrides``.

    Works inside an already-running Hydra app too (the global Hydra state is restored).
    The ``train`` and ``model`` groups are checked against their schemas (:func:`register_schemas`), the
    result by :func:`check_config`. Every override is checked against the configs' keys and
    types (:func:`m4fuse.run.config_check.check_overrides`: an unknown key, also through
    ``+key``, or a value of another type than the YAML default's); any of these mistakes,
    and Hydra's own errors, raise :class:`m4fuse.run.config_check.ConfigError` (a ``ValueError``)
    with one line naming the key, the value and the fix.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException

    if not (CONFIG_DIR / f"{config_name}.yaml").is_file():
        raise FileNotFoundError(f"no Hydra config {config_name!r} in {CONFIG_DIR}")
    register_schemas()
    overrides = [o for o in overrides if o]
    previous = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    if previous is not None:
        GlobalHydra.instance().clear()
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from m4fuse.run.config_check import ConfigError, check_overrides, hydra_message, is_group_choice

    base = None
    choices = [o for o in overrides if is_group_choice(o, CONFIG_DIR)]
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            if len(choices) < len(overrides):
                # the same config with the group choices only: the keys and types a setting
                # may have (m4fuse.run.config_check)
                base = OmegaConf.to_container(hydra_compose(config_name=config_name,
                                                            overrides=choices))
                _check_override_values(base, overrides)
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    except MissingConfigException as err:  # Hydra's message spans lines (options, search path)
        raise ConfigError(_missing_option(str(err))) from None
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(hydra_message(err, overrides, base, CONFIG_DIR)) from err
    finally:
        if previous is not None:
            GlobalHydra.instance().initialize(previous.config_loader)
    from m4fuse.training.engine import TrainConfig

    if base is not None:  # some override sets a key: check it against the configs
        check_overrides(OmegaConf.to_container(cfg), base, overrides, CONFIG_DIR,
                        {"train": [f.name for f in dataclasses.fields(TrainConfig)]})
    try:
        check_config(cfg)
    except (ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(str(err).strip().splitlines()[0] if str(err).strip() else
                          type(err).__name__) from err
    return cfg


def _check_override_values(base: Mapping[str, Any], overrides: Sequence[str]) -> None:
    """Refuse an override of the ``fl``, ``data`` or ``tracking`` group in the words of the
    configs before Hydra's schema sees the value (:mod:`m4fuse.run.schema`), as these groups'
    mistakes were refused before they had one: an unknown key or a value of another type than
    the YAML default's (:func:`m4fuse.run.config_check.check_overrides`), or a word that is
    not one of a named choice's (:func:`m4fuse.run.config_check.check_choices`). The
    ``train`` and ``model`` groups' mistakes are Hydra's (their schemas are older)."""
    from m4fuse.run.config_check import (
        check_choices,
        check_overrides,
        override_key,
        preview_overrides,
    )
    from m4fuse.run.schema import choice_type

    own = [o for o in overrides
           if override_key(o).split(".")[0] in ("fl", "data", "tracking")]
    check_overrides(preview_overrides(base, own, CONFIG_DIR), base, own, CONFIG_DIR)

    def words(key: str) -> list[str] | None:
        kind = choice_type(key)
        return None if kind is None else [member.value for member in kind]

    check_choices(own, CONFIG_DIR, words)


def parse_overrides(text: str) -> list[str]:
    """Split a Flower run-config ``overrides`` string (``"a=1 b.c=x"``) into Hydra overrides."""
    import shlex

    return shlex.split(text or "")


#: Environment variable with Hydra overrides applied after the run config's. Flower's
#: in-process ``run_simulation`` passes no run config, so tests and scripts set this.
OVERRIDES_ENV = "M4FUSE_OVERRIDES"


def compose_run(run_config: Mapping[str, Any]) -> DictConfig:
    """The config a Flower run uses: ``config-name`` and ``overrides`` from the run config
    (defaults ``config`` and none), then ``$M4FUSE_OVERRIDES``."""
    overrides = parse_overrides(str(run_config.get("overrides", "")))
    overrides += parse_overrides(os.environ.get(OVERRIDES_ENV, ""))
    return compose(str(run_config.get("config-name", "config")), overrides)


def app_overrides(app: str | os.PathLike) -> list[str]:
    """The ``overrides`` of the Flower app's own run config (``[tool.flwr.app.config]`` of
    ``<app>/pyproject.toml``): what a plain ``flwr run <app>`` composes. A run config given to
    ``flwr run --run-config "overrides='...'"`` replaces the whole value, as Flower replaces
    any key of the run config."""
    import tomllib
    from pathlib import Path

    path = Path(app) / "pyproject.toml"
    try:
        with open(path, "rb") as handle:
            table = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"{path}: cannot read the Flower app's run config ({err})") from None
    run_config = table.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})
    return parse_overrides(str(run_config.get("overrides", "")))


def app_sites(app: str | os.PathLike) -> int:
    """The sites of the federation plain ``flwr run <app>`` trains (:func:`app_overrides`
    composed), i.e. the SuperNodes its local simulation needs (``scripts/setup.sh`` writes
    them). Only a synthetic federation knows its sites before its data is prepared; for any
    other the one-line error says to set ``M4FUSE_SITES``."""
    cfg = compose("config", app_overrides(app))
    if cfg.data.kind != "synthetic":
        raise ValueError(f"the app's run config trains data={cfg.data.kind}, whose sites are "
                         "known only from its folder: set M4FUSE_SITES (or use m4fuse simulate)")
    return int(cfg.data.sites)


def _missing_option(message: str) -> str:
    """Hydra's message for an unknown option of a group (``data=nonexistent``) on one line:
    ``"unknown data=nonexistent: the options are brats, synthetic (configs/data/)"``."""
    import re

    found = re.search(r"Could not find '([^'/]+)/([^']+)'", message)
    if not found:
        return message.splitlines()[0] if message else "unknown Hydra option"
    group, name = found.groups()
    options = [line.strip() for line in message.split("Config search path:")[0].splitlines()[1:]
               if line.startswith("\t")]
    return (f"unknown {group}={name}: the options are {', '.join(options)} "
            f"(configs/{group}/)")


def check_config(cfg: DictConfig) -> None:
    """Fail early, naming the key and the bad value, on settings that cannot work: the rules
    of :func:`m4fuse.run.rules.check_rules`, on the network :func:`build_model` builds."""
    from m4fuse.run.rules import check_rules

    check_rules(cfg, lambda c: build_model(c, num_experts=1))


def config_hash(cfg: DictConfig, ignore: Sequence[str] = ("fl.resume", "fl.rounds")) -> str:
    """A short hash of the resolved config without the keys that may change on resume."""
    flat = flatten(OmegaConf.to_container(cfg, resolve=True))
    for key in ignore:
        flat.pop(key, None)
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:12]


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists -> ``{"a.b.0": value}`` (MLflow params, config hashes)."""
    out: dict[str, Any] = {}
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            out.update(flatten(value, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = tree
    return out


def model_config(cfg: DictConfig, num_experts: int):
    """The :class:`m4fuse.nets.model.M4FuseConfig` of ``cfg.model`` with ``num_experts`` experts."""
    from m4fuse.nets.model import M4FuseConfig

    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts!r}")
    m = cfg.model
    kwargs = {
        "output": str(m.output),
        "out_channels": 3 if str(m.output) == "regions" else 4,
        "num_experts": num_experts,
        "d_state": int(m.d_state),
        "d_conv": int(m.d_conv),
        "expand": int(m.expand),
        "mixer_groups": int(m.mixer_groups),
        "dropout": float(m.dropout),
        "norm_groups": int(m.norm_groups),
    }
    if m.preset:
        return M4FuseConfig.preset(str(m.preset), **kwargs)
    if m.widths is None or len(m.widths) != 6:
        raise ValueError(f"model.widths must list 6 ints when model.preset is null, got {m.widths!r}")
    return M4FuseConfig(widths=[int(w) for w in m.widths], **kwargs)


def build_model(cfg: DictConfig, num_experts: int, seed: int | None = None) -> torch.nn.Module:
    """A freshly initialised network; the same ``seed`` gives the same weights everywhere.
    With ``fl.init_checkpoint`` set, its weights instead (:mod:`m4fuse.io.pretrained`)."""
    from m4fuse.nets.model import M4Fuse

    # torch's RNG only (what initialises the weights); monai.utils.set_determinism would also
    # reseed Python's and NumPy's RNGs and switch cuDNN to deterministic mode, a side effect
    # on whatever runs next in the process.
    torch.manual_seed(int(cfg.seed) if seed is None else seed)
    config = model_config(cfg, num_experts)
    model = M4Fuse(config)
    # fl.init_checkpoint: start from a pre-trained network (m4fuse.io.pretrained)
    from m4fuse.io.pretrained import apply_init_checkpoint

    return apply_init_checkpoint(cfg, model, config.to_dict())


LOADER_KEYS: tuple[str, ...] = ("augment", "num_workers")


def train_config(cfg: DictConfig, epochs: int, seed: int | None = None):
    """The :class:`m4fuse.training.engine.TrainConfig` of ``cfg.train`` for ``epochs`` passes
    (``local_epochs``), seeded by ``seed`` (default the config's ``seed``)."""
    from m4fuse.training.engine import TrainConfig

    values = {k: v for k, v in OmegaConf.to_container(cfg.train, resolve=True).items()
              if k not in LOADER_KEYS}
    values["local_epochs"] = int(epochs)
    values["seed"] = int(cfg.seed) if seed is None else int(seed)
    return TrainConfig.from_dict(values)


def amp_settings(cfg: DictConfig) -> dict[str, Any]:
    """``{"amp", "amp_dtype", "amp_cpu"}`` of ``cfg.train``, the keywords of
    :func:`m4fuse.training.scoring.evaluate`,
    :func:`m4fuse.training.scoring.score_on_original_grid` and
    :func:`m4fuse.inference.predict.predict_probs`, so that their forwards run in the precision of
    training (``amp_cpu`` False when the key is absent)."""
    return {"amp": bool(cfg.train.amp), "amp_dtype": str(cfg.train.amp_dtype),
            "amp_cpu": bool(cfg.train.get("amp_cpu", False))}
