"""The settings schema: a dataclass per Hydra group, with enumerations for the named choices.

:func:`register_group_schemas` stores them in Hydra's ConfigStore (group ``schema``); each
group's YAML names its schema first in its defaults list, so a misspelt key, a value of the
wrong type or an unknown choice fails when the config is composed. The YAML files stay the
source of the values: every field here is ``MISSING`` (the YAML sets it). The ``train`` and
``model`` schemas are built from their contracts' dataclasses
(:func:`m4fuse.run.settings.register_schemas`). What a type cannot say (ranges, rules between
keys) is :mod:`m4fuse.run.rules`'.

The enumerations are :class:`enum.StrEnum`, each member's name and value the YAML's word, so a
composed value compares, hashes, formats and serialises as that plain string
(``cfg.fl.strategy == "fedavg"``, ``str(cfg.fl.strategy)``, JSON, MLflow parameters).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Optional

from omegaconf import MISSING

from m4fuse.personal.sets import OPTIMIZER_STATES, STRATEGIES
from m4fuse.run.aggregation import AGGREGATION_WEIGHTS, AGGREGATIONS
from m4fuse.run.server_opt import SERVER_OPTS


def _choices(name: str, words: tuple[str, ...] | list[str]) -> type[StrEnum]:
    """A StrEnum ``name`` of this module whose members are ``words`` (name = value)."""
    return StrEnum(name, [(w, w) for w in words], module=__name__, qualname=name)


#: ``fl.strategy``: :data:`m4fuse.personal.sets.STRATEGIES`.
Strategy = _choices("Strategy", list(STRATEGIES))
#: ``fl.aggregation``: :data:`m4fuse.run.aggregation.AGGREGATIONS`.
Aggregation = _choices("Aggregation", AGGREGATIONS)
#: ``fl.aggregation_weight``: :data:`m4fuse.run.aggregation.AGGREGATION_WEIGHTS`.
AggregationWeight = _choices("AggregationWeight", AGGREGATION_WEIGHTS)
#: ``fl.server_opt``: :data:`m4fuse.run.server_opt.SERVER_OPTS`.
ServerOpt = _choices("ServerOpt", SERVER_OPTS)
#: ``fl.optimizer_state``: :data:`m4fuse.personal.sets.OPTIMIZER_STATES`.
OptimizerState = _choices("OptimizerState", list(OPTIMIZER_STATES))
#: ``data.kind``.
DataKind = _choices("DataKind", ("synthetic", "brats"))


@dataclass
class FlSchema:
    """The ``fl`` group (configs/fl/default.yaml documents every key)."""

    strategy: Strategy = MISSING  # type: ignore[valid-type]
    finetune_epochs: int = MISSING
    personal_lr_scale: float = MISSING
    optimizer_state: OptimizerState = MISSING  # type: ignore[valid-type]
    rounds: int = MISSING
    local_epochs: int = MISSING
    local_steps: Optional[int] = MISSING
    init_checkpoint: Optional[str] = MISSING
    fraction_train: float = MISSING
    min_train_sites: int = MISSING
    proximal_mu: float = MISSING
    resume: bool = MISSING
    wait_for_sites: int = MISSING
    round_timeout: int = MISSING
    norm_bound: float = MISSING
    aggregation: Aggregation = MISSING  # type: ignore[valid-type]
    aggregation_weight: AggregationWeight = MISSING  # type: ignore[valid-type]
    trim: float = MISSING
    krum_malicious: int = MISSING
    krum_select: int = MISSING
    server_opt: Optional[ServerOpt] = MISSING  # type: ignore[valid-type]  # null: none
    server_lr: Optional[float] = MISSING
    server_momentum: Optional[float] = MISSING
    server_beta_1: Optional[float] = MISSING
    server_beta_2: Optional[float] = MISSING
    server_tau: Optional[float] = MISSING
    min_sites: int = MISSING
    site_names: Optional[list[str]] = MISSING
    faults: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSchema:
    """The ``data`` keys of every data set (configs/data/brats.yaml)."""

    kind: DataKind = MISSING  # type: ignore[valid-type]
    source: Optional[str] = MISSING
    cache_dir: Optional[str] = MISSING
    size: list[int] = MISSING
    partition_csv: Optional[str] = MISSING
    val_fraction: float = MISSING
    test_fraction: float = MISSING
    test_cases_per_site: Optional[Any] = MISSING
    min_cases_per_site: Any = MISSING
    workers: int = MISSING


@dataclass
class SyntheticDataSchema(DataSchema):
    """The ``data`` group of the synthetic sets: :class:`DataSchema` plus the federation's
    layout (configs/data/synthetic.yaml; sizes and names are checked by
    :func:`m4fuse.run.rules.check_data_settings`)."""

    sites: Any = MISSING
    cases_per_site: int = MISSING
    site_sizes: Optional[Any] = MISSING
    site_names: Optional[Any] = MISSING
    lower_grade_sites: Optional[Any] = MISSING
    shape: list[int] = MISSING
    seed_salt: int = MISSING


@dataclass
class TrackingSchema:
    """The ``tracking`` group (configs/tracking/default.yaml)."""

    enabled: bool = MISSING
    tracking_uri: Optional[str] = MISSING
    experiment: str = MISSING


#: ConfigStore name (group ``schema``) -> the dataclass the YAML of that group names.
GROUP_SCHEMAS: dict[str, type] = {
    "fl": FlSchema,
    "data": DataSchema,
    "data_synthetic": SyntheticDataSchema,
    "tracking": TrackingSchema,
}


def register_group_schemas() -> None:
    """Store :data:`GROUP_SCHEMAS` in Hydra's ConfigStore as ``schema/<name>``."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, node in GROUP_SCHEMAS.items():
        store.store(group="schema", name=name, node=node)


def choice_type(path: str) -> type[StrEnum] | None:
    """The enumeration of the dotted key ``path`` (``fl.strategy`` -> :data:`Strategy`), or
    None when the key is not a named choice."""
    group, _, key = path.partition(".")
    schema = {"fl": FlSchema, "data": SyntheticDataSchema, "tracking": TrackingSchema}.get(group)
    if schema is None or "." in key:
        return None
    kind = schema.__dataclass_fields__.get(key)
    if kind is None:
        return None
    found = globals().get(kind.type) if isinstance(kind.type, str) else kind.type
    return found if isinstance(found, type) and issubclass(found, StrEnum) else None
