"""Experiment settings and the per-site training steps shared by every training mode.

The Flower ClientApp, the pooled baseline and the local baseline all call the functions here,
so that they train with the same loss, optimiser, epochs and data split (docs/design.md §3). This
module knows nothing of Flower (docs/design.md §1: ``m4fuse/`` stays usable without it); it reads the
Hydra configs in ``configs/`` (composed with :func:`compose`) and turns them into the
contracts of ``m4fuse.model``, ``m4fuse.engine`` and ``m4fuse.data`` (docs/interfaces.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

#: The Hydra config folder: beside the packages, in a checkout and in an installed Flower app
#: (the FAB ships ``*.yaml``), so the same path works for ``flwr run .`` and for pytest.
CONFIG_DIR: Path = Path(__file__).resolve().parents[1] / "configs"

def _strategy_names() -> tuple[str, ...]:
    from m4fuse.state import STRATEGIES as table

    return tuple(table)


#: The ``fl.strategy`` names (what each keeps/sends: :data:`m4fuse.state.STRATEGIES`).
STRATEGIES: tuple[str, ...] = _strategy_names()

# Split records are loaded once per process (a Ray actor serves many messages).
_SPLITS: dict[tuple, Any] = {}


def compose(config_name: str = "config", overrides: Sequence[str] = ()) -> DictConfig:
    """Compose the Hydra config ``config_name`` from :data:`CONFIG_DIR` with ``overrides``.

    Works inside an already-running Hydra app too (the global Hydra state is restored).
    The result is checked by :func:`check_config`.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if not (CONFIG_DIR / f"{config_name}.yaml").is_file():
        raise FileNotFoundError(f"no Hydra config {config_name!r} in {CONFIG_DIR}")
    overrides = [o for o in overrides if o]
    previous = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    if previous is not None:
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    finally:
        if previous is not None:
            GlobalHydra.instance().initialize(previous.config_loader)
    check_config(cfg)
    return cfg


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


def check_config(cfg: DictConfig) -> None:
    """Fail early, naming the key and the bad value, on settings that cannot work."""
    from m4fuse.state import check_personal_set
    from m4fuse.state import strategy as named_strategy

    chosen = named_strategy(str(cfg.fl.strategy))  # unknown names fail here, listing the known
    if int(cfg.fl.get("finetune_epochs", 0)) < 0:
        raise ValueError(f"fl.finetune_epochs must be >= 0, got {cfg.fl.finetune_epochs!r}")
    if not float(cfg.fl.get("personal_lr_scale", 1.0)) > 0:
        raise ValueError(f"fl.personal_lr_scale must be > 0, got {cfg.fl.personal_lr_scale!r}")
    privacy = cfg.get("privacy")
    from m4fuse.state import check_optimizer_state

    check_optimizer_state(cfg.fl.get("optimizer_state", "fresh"),
                          privacy is not None and bool(privacy.get("enabled", False)))
    if (privacy is not None and bool(privacy.get("enabled", False)) and chosen.finetune
            and int(cfg.fl.get("finetune_epochs", 0)) > 0):
        raise ValueError(f"fl.strategy={cfg.fl.strategy} with privacy.enabled is not supported: "
                         "the fine-tuning after the last round is not DP-SGD (use "
                         "fl.finetune_epochs=0 or fl.strategy=personal-norm)")
    if chosen.kept not in ("experts", "none", "all") or chosen.finetune:
        # The personal layers must exist in the configured model (a cheap tiny build).
        names = list(build_model(cfg, num_experts=1).state_dict())
        check_personal_set(names, chosen.kept, f"fl.strategy={cfg.fl.strategy}")
        if chosen.finetune:
            check_personal_set(names, chosen.finetune, f"fl.strategy={cfg.fl.strategy}")
    if int(cfg.fl.rounds) < 1:
        raise ValueError(f"fl.rounds must be >= 1, got {cfg.fl.rounds!r}")
    if int(cfg.fl.local_epochs) < 1:
        raise ValueError(f"fl.local_epochs must be >= 1, got {cfg.fl.local_epochs!r}")
    if not 0.0 < float(cfg.fl.fraction_train) <= 1.0:
        raise ValueError(f"fl.fraction_train must be in (0, 1], got {cfg.fl.fraction_train!r}")
    if float(cfg.fl.proximal_mu) < 0:
        raise ValueError(f"fl.proximal_mu must be >= 0, got {cfg.fl.proximal_mu!r}")
    if int(cfg.train.batch_size) < 1:
        raise ValueError(f"train.batch_size must be >= 1, got {cfg.train.batch_size!r}")
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


def project_root(cfg: DictConfig) -> Path:
    """The folder for runs, data and the MLflow store (``root`` in the config).

    ``root`` when set; else ``$M4FUSE_HOME``; else the checkout the code runs from (a folder
    with ``.git`` above :data:`CONFIG_DIR`); else ``~/.cache/m4fuse`` (an installed Flower app
    is a copy without ``.git``, so it never writes into ``$FLWR_HOME/apps``).
    """
    if cfg.root is not None:
        return Path(str(cfg.root))
    env = os.environ.get("M4FUSE_HOME")
    if env:
        if not Path(env).is_absolute():
            raise ValueError(f"M4FUSE_HOME must be an absolute path, got {env!r}")
        return Path(env)
    checkout = CONFIG_DIR.parent
    if (checkout / ".git").exists():
        return checkout
    return Path.home() / ".cache" / "m4fuse"


def run_name(cfg: DictConfig) -> str:
    """``run_name`` or ``<strategy>-seed<seed>``."""
    return str(cfg.run_name) if cfg.run_name else f"{cfg.fl.strategy}-seed{int(cfg.seed)}"


def run_dir(cfg: DictConfig) -> Path:
    """``<root>/runs/<run name>``: checkpoints, tables, plots of one experiment."""
    return project_root(cfg) / "runs" / run_name(cfg)


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


def resolve_device(name: str | None) -> torch.device:
    """The configured ``device`` (``None``/empty = ``auto``) as a torch device, with the checks
    of :func:`m4fuse.inference.resolve_device` (the one implementation; a CUDA device asked
    for where there is none is an error naming it)."""
    from m4fuse.inference import resolve_device as resolve

    return resolve("auto" if name in (None, "") else str(name))


def apply_threads(cfg: DictConfig) -> None:
    """``torch.set_num_threads(cfg.threads)`` when ``threads`` > 0 (0: torch's default)."""
    threads = int(cfg.get("threads", 0) or 0)
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- model / train


def model_config(cfg: DictConfig, num_experts: int):
    """The :class:`m4fuse.model.M4FuseConfig` of ``cfg.model`` with ``num_experts`` experts."""
    from m4fuse.model import M4FuseConfig

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
    """A freshly initialised network; the same ``seed`` gives the same weights everywhere."""
    from m4fuse.model import M4Fuse

    torch.manual_seed(int(cfg.seed) if seed is None else seed)
    return M4Fuse(model_config(cfg, num_experts))


LOADER_KEYS: tuple[str, ...] = ("augment", "num_workers")


def train_config(cfg: DictConfig, epochs: int, seed: int | None = None):
    """The :class:`m4fuse.engine.TrainConfig` of ``cfg.train`` for ``epochs`` passes
    (``local_epochs``), seeded by ``seed`` (default the config's ``seed``)."""
    from m4fuse.engine import TrainConfig

    values = {k: v for k, v in OmegaConf.to_container(cfg.train, resolve=True).items()
              if k not in LOADER_KEYS}
    values["local_epochs"] = int(epochs)
    values["seed"] = int(cfg.seed) if seed is None else int(seed)
    return TrainConfig.from_dict(values)


# --------------------------------------------------------------------------- data


def data_paths(cfg: DictConfig) -> tuple[Path, Path]:
    """``(source, cache_dir)`` absolute folders of the configured data set."""
    d = cfg.data
    root = project_root(cfg)
    size = "x".join(str(int(s)) for s in d.size)
    if d.kind == "synthetic":
        shape = "x".join(str(int(s)) for s in d.shape)
        name = f"synthetic-s{int(d.sites)}-c{int(d.cases_per_site)}-{shape}-seed{int(cfg.seed)}"
        source = Path(str(d.source)) if d.source else root / "data" / name
    else:
        if d.source in (None, "???"):
            raise ValueError("data.source must name the BraTS folder (absolute path)")
        source = Path(str(d.source))
    cache = Path(str(d.cache_dir)) if d.cache_dir else root / "cache" / f"{source.name}-{size}"
    return source, cache


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock file (fcntl): concurrent clients prepare the data only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def generator_version() -> str:
    """Version of the synthetic generator, recorded in the data folder's marker.

    ``m4fuse.data.SYNTH_VERSION`` when the data package exports one; else the first 12 hex
    digits of the SHA-256 of the generator's source file (``m4fuse/data/synth.py``). The
    data package has no generator version constant, so the source hash is what notices that
    the generator changed (e.g. a new acquisition table) and makes :func:`ensure_data`
    generate the set again instead of reusing files of the old generator.
    """
    from m4fuse import data as mdata
    from m4fuse.data import synth

    version = getattr(mdata, "SYNTH_VERSION", None)
    if version is not None:
        return f"v{version}"
    return hashlib.sha256(Path(synth.__file__).read_bytes()).hexdigest()[:12]


def data_markers(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(source marker, cache marker)``: what :func:`ensure_data` writes into the
    ``.complete`` files of the data folders once they are ready, and compares on later calls.

    Source (synthetic only; ``{}`` for BraTS): generator version, sites, cases per site,
    shape, seed. Cache: the source marker, ``PREPROCESS_VERSION`` and the training size, so a
    new generator or preprocessing version re-prepares the cache too.
    """
    from m4fuse.data import PREPROCESS_VERSION

    d = cfg.data
    source: dict[str, Any] = {}
    if d.kind == "synthetic":
        source = {"generator": generator_version(), "sites": int(d.sites),
                  "cases_per_site": int(d.cases_per_site),
                  "shape": [int(s) for s in d.shape], "seed": int(cfg.seed)}
    cache = {"source": source, "preprocess_version": int(PREPROCESS_VERSION),
             "size": [int(s) for s in d.size]}
    return source, cache


def _marker_matches(path: Path, expected: Mapping[str, Any]) -> bool:
    """Whether the JSON marker file ``path`` exists and records ``expected`` (an old plain
    ``ok`` marker never matches)."""
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()) == json.loads(json.dumps(expected))
    except json.JSONDecodeError:
        return False


def ensure_data(cfg: DictConfig) -> Path:
    """Generate (synthetic) and prepare the data set once; returns the prepared cache folder.

    Safe to call from many processes at once (file lock); later calls only check the
    ``.complete`` markers (:func:`data_markers`). A marker of another generator or
    preprocessing version (or an old marker without versions) makes it generate and prepare
    again: the synthesiser overwrites the cases, ``prepare_dataset`` redoes the changed ones.
    """
    from m4fuse import data as mdata

    source, cache = data_paths(cfg)
    d = cfg.data
    source_marker, cache_marker = data_markers(cfg)
    with _file_lock(cache.parent / f".{cache.name}.lock"):
        if d.kind == "synthetic" and not _marker_matches(source / ".complete", source_marker):
            (source / ".complete").unlink(missing_ok=True)
            (cache / ".complete").unlink(missing_ok=True)
            mdata.synthesize(
                source,
                sites=int(d.sites),
                cases_per_site=int(d.cases_per_site),
                seed=int(cfg.seed),
                shape=tuple(int(s) for s in d.shape),
            )
            (source / ".complete").write_text(json.dumps(source_marker) + "\n")
        if not source.is_dir():
            raise FileNotFoundError(f"data.source does not exist: {source}")
        if not _marker_matches(cache / ".complete", cache_marker):
            (cache / ".complete").unlink(missing_ok=True)
            mdata.prepare_dataset(
                source, cache, size=tuple(int(s) for s in d.size), workers=int(d.workers)
            )
            (cache / ".complete").write_text(json.dumps(cache_marker) + "\n")
    return cache


def partition_csv(cfg: DictConfig) -> Path | None:
    """The partition CSV: configured, or the one the synthesiser wrote."""
    if cfg.data.partition_csv:
        return Path(str(cfg.data.partition_csv))
    if cfg.data.kind == "synthetic":
        return data_paths(cfg)[0] / "partition.csv"
    return None


def load_sites(cfg: DictConfig) -> Any:
    """The :class:`SiteSplit` of the configured data (prepared on first use; memoised),
    without the sites that have fewer cases than ``data.min_cases_per_site``
    (:func:`small_sites` names them)."""
    split = _full_split(cfg)
    minimum = min_cases_per_site(cfg)
    kept = {site: parts for site, parts in split.items() if _site_cases(parts) >= minimum}
    if not kept:
        raise ValueError(f"data.min_cases_per_site={minimum} leaves no site: the largest has "
                         f"{max(_site_cases(p) for p in split.values())} cases")
    return kept


def _full_split(cfg: DictConfig) -> Any:
    from m4fuse.data import load_split

    cache = ensure_data(cfg)
    csv = partition_csv(cfg)
    key = (str(cache), str(csv), int(cfg.seed), float(cfg.data.val_fraction),
           float(cfg.data.test_fraction))
    if key not in _SPLITS:
        _SPLITS[key] = load_split(
            cache,
            partition_csv=csv,
            seed=int(cfg.seed),
            val_fraction=float(cfg.data.val_fraction),
            test_fraction=float(cfg.data.test_fraction),
        )
    return _SPLITS[key]


def _site_cases(parts: Mapping[str, Sequence[Any]]) -> int:
    return sum(len(v) for v in parts.values())


def min_cases_per_site(cfg: DictConfig) -> int:
    """``data.min_cases_per_site`` (default 1: every site with a case takes part)."""
    return int(cfg.data.get("min_cases_per_site", 1) or 1)


def small_sites(cfg: DictConfig) -> dict[str, int]:
    """Sites of the data that :func:`load_sites` leaves out (fewer cases than
    ``data.min_cases_per_site``): ``{name: number of cases}``; the server says so before
    training."""
    split = _full_split(cfg)
    minimum = min_cases_per_site(cfg)
    return {site: _site_cases(p) for site, p in sorted(split.items())
            if _site_cases(p) < minimum}


def site_names(split: Mapping[str, Any]) -> list[str]:
    """Sites sorted by name: the position is the site index (docs/interfaces.md)."""
    return sorted(split)


# --------------------------------------------------------------------------- steps

#: ``wrap(model, optimizer, loader) -> (model, optimizer, loader)`` of :func:`train_site`.
Wrap = Callable[[torch.nn.Module, torch.optim.Optimizer, Any],
                tuple[torch.nn.Module, torch.optim.Optimizer, Any]]



def train_site(
    model: torch.nn.Module,
    records: Sequence[Any],
    expert_index: int,
    cfg: DictConfig,
    device: torch.device,
    epochs: int,
    seed: int,
    prox_mu: float = 0.0,
    prox_reference: Mapping[str, torch.Tensor] | None = None,
    schedule: tuple[int, int] | None = None,
    wrap: Wrap | None = None,
    on_empty_batch: Callable[[torch.optim.Optimizer], None] | None = None,
    lr_scale: Mapping[str, float] | None = None,
    optimizer_state: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` for ``epochs`` on ``records`` routed to ``expert_index``.

    A fresh AdamW per call (FedAvg-style local training) whose warm-up/cosine learning rate
    continues one curve over the whole run: ``schedule = (round index, number of rounds)``
    places this call on it (default ``(0, 1)``: the curve spans this call alone). Returns
    ``{"loss", "num-examples"}`` with ``num-examples`` = number of training cases.

    ``wrap`` (default None: plain training) is called as ``model, optimizer, loader =
    wrap(model, optimizer, loader)`` after the optimiser and its schedule are built and right
    before the training loop (the ClientApp's DP-SGD wraps them with Opacus there; the caller
    keeps what it needs, e.g. extra metrics, in its own closure). ``on_empty_batch`` (default
    None) goes to :func:`m4fuse.engine.train_epochs` (a 0-case Poisson batch). ``lr_scale``
    (default None: one lr) multiplies the lr of the named parameters (e.g. the personal ones).

    ``optimizer_state`` (default None: a fresh AdamW, the result has no such key): AdamW
    state by parameter name (:func:`m4fuse.engine.optimizer_state_by_name`, e.g. ``{}`` in a
    site's first round) loaded into the new optimiser before training (parameters it does not
    name start fresh; the lr curve is unchanged); the result then carries the state after
    training as ``"optimizer_state"`` (``fl.optimizer_state``). ``on_epoch_end`` (default
    None) goes to :func:`m4fuse.engine.train_epochs`.
    """
    from m4fuse.data import make_loader

    loader = make_loader(
        list(records), expert_index, batch_size=int(cfg.train.batch_size),
        augment=bool(cfg.train.augment), shuffle=True,
        num_workers=int(cfg.train.num_workers), seed=seed,
    )
    return run_epochs(model, loader, cfg, device, epochs, seed, prox_mu, prox_reference,
                      schedule, len(records), wrap=wrap, on_empty_batch=on_empty_batch,
                      lr_scale=lr_scale, optimizer_state=optimizer_state,
                      on_epoch_end=on_epoch_end)


def run_epochs(
    model: torch.nn.Module,
    loader: Any,
    cfg: DictConfig,
    device: torch.device,
    epochs: int,
    seed: int,
    prox_mu: float = 0.0,
    prox_reference: Mapping[str, torch.Tensor] | None = None,
    schedule: tuple[int, int] | None = None,
    num_cases: int | None = None,
    wrap: Wrap | None = None,
    on_empty_batch: Callable[[torch.optim.Optimizer], None] | None = None,
    lr_scale: Mapping[str, float] | None = None,
    optimizer_state: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """``epochs`` passes of :func:`m4fuse.engine.train_epochs` with the configured optimiser
    (see :func:`train_site` for ``schedule``, ``wrap``, ``on_empty_batch``,
    ``optimizer_state`` and ``on_epoch_end``)."""
    from m4fuse.engine import (
        load_optimizer_state_by_name,
        make_optimizer,
        optimizer_state_by_name,
        train_epochs,
    )

    if len(loader) == 0:
        raise ValueError("no training batches: the site has no training cases")
    index, count = schedule or (0, 1)
    if not 0 <= index < count:
        raise ValueError(f"schedule must be (index, count) with 0 <= index < count, got {schedule}")
    tcfg = train_config(cfg, epochs, seed)
    steps = epochs * len(loader)
    model.to(device)
    optimizer, scheduler = make_optimizer(model, tcfg, steps * count, start_step=steps * index,
                                          lr_scale=lr_scale)
    net, adamw = model, optimizer  # before any wrap: the names and state optimizer_state uses
    if optimizer_state:
        load_optimizer_state_by_name(adamw, net, optimizer_state)
    if prox_reference is not None:
        params = dict(model.named_parameters())
        prox_reference = {k: v for k, v in prox_reference.items() if k in params}
    if wrap is not None:
        model, optimizer, loader = wrap(model, optimizer, loader)
    out = train_epochs(
        model, loader, optimizer, scheduler, tcfg, device,
        prox_mu=prox_mu, prox_reference=prox_reference, on_empty_batch=on_empty_batch,
        on_epoch_end=on_epoch_end,
    )
    result: dict[str, Any] = {"loss": float(out["loss"]),
                              "num-examples": float(out["num-examples"]), "steps": float(steps)}
    if num_cases is not None:
        result["num-examples"] = float(num_cases)
    if optimizer_state is not None:
        result["optimizer_state"] = optimizer_state_by_name(adamw, net)
    return result


def finetune_site(
    model: torch.nn.Module,
    records: Sequence[Any],
    expert_index: int,
    cfg: DictConfig,
    device: torch.device,
    personal: str,
    epochs: int,
    seed: int,
    on_epoch_end: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Fine-tune only the personal set ``personal`` (:data:`m4fuse.state.PERSONAL_SETS`) of
    ``model`` on ``records`` for ``epochs`` epochs, every other weight frozen: a fresh AdamW
    at ``train.lr`` x ``fl.personal_lr_scale`` (default 1) on its own warm-up/cosine curve.
    The freezing is undone afterwards. Returns ``{"loss", "num-examples", "steps"}``.
    ``on_epoch_end(epochs done)`` (default None) runs after each epoch (the ClientApp
    validates there and keeps the best epoch)."""
    from m4fuse.state import split_state

    if epochs < 1:
        raise ValueError(f"fine-tuning epochs must be >= 1, got {epochs}")
    names = set(split_state(dict(model.named_parameters()), personal)[1])
    if not names:
        raise ValueError(f"personal set {personal!r} selects no parameter of the model")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    scale = float(cfg.fl.get("personal_lr_scale", 1.0))
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
        model.train()
        return train_site(model, records, expert_index, cfg, device, epochs, seed,
                          lr_scale={n: scale for n in names} if scale != 1.0 else None,
                          on_epoch_end=on_epoch_end)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(before[n])


def personal_lr_scale(model: torch.nn.Module, cfg: DictConfig) -> dict[str, float] | None:
    """``{parameter name: fl.personal_lr_scale}`` for the parameters of the strategy's kept
    set, or None when the scale is 1 (default) or the strategy keeps nothing/everything."""
    from m4fuse.state import split_state
    from m4fuse.state import strategy as named_strategy

    scale = float(cfg.fl.get("personal_lr_scale", 1.0))
    kept = named_strategy(str(cfg.fl.strategy)).kept
    if scale == 1.0 or kept in ("none", "all"):
        return None
    names = split_state(dict(model.named_parameters()), kept)[1]
    return {n: scale for n in names}


def validate_site(
    model: torch.nn.Module,
    records: Sequence[Any],
    expert_index: int,
    cfg: DictConfig,
    device: torch.device,
) -> dict[str, float]:
    """Dice and HD95 (mm) per region at training resolution on ``records`` (+
    ``num-examples``).

    HD95 is measured on the resized training grid with each case's own voxel size in mm
    (:func:`training_grid_spacing`), so it is in the same unit as the test HD95 on the
    original grid (and :data:`m4fuse.metrics.EMPTY_HD95_MM` is a penalty in mm). Mixed
    precision follows ``train.amp``/``train.amp_dtype``, as in training.
    """
    from m4fuse.data import make_loader
    from m4fuse.engine import evaluate

    if not records:
        raise ValueError("no validation cases for this site")
    loader = make_loader(list(records), expert_index, batch_size=1, augment=False,
                         shuffle=False, num_workers=int(cfg.train.num_workers))
    model.to(device)
    metrics = evaluate(model, loader, device,
                       spacing={r.case_id: training_grid_spacing(r) for r in records},
                       amp=bool(cfg.train.amp), amp_dtype=str(cfg.train.amp_dtype))
    out = {k: float(v) for k, v in metrics.items() if k in METRIC_KEYS}
    missing = set(METRIC_KEYS) - set(out)
    if missing:
        raise KeyError(f"engine.evaluate returned no {sorted(missing)}; got {sorted(metrics)}")
    out["num-examples"] = float(len(records))
    return out


def training_grid_spacing(record: Any) -> tuple[float, float, float]:
    """Voxel size in mm, ``(D, H, W)``, of a cached case's resized training grid.

    The cache holds the brain's crop box (``crop_start``/``crop_end``, voxels in the canonical
    grid's ``(X, Y, Z)``) of a volume with that grid's voxel size
    (:func:`m4fuse.data.preprocess.canonical_spacing`, mm), resized to ``size`` ``(D, H, W)``
    with D along Z: a grid voxel spans ``spacing * crop extent / size`` mm on each axis.
    """
    from m4fuse.data.preprocess import canonical_spacing

    meta = record.meta
    extent = [int(e) - int(s) for s, e in zip(meta["crop_start"], meta["crop_end"])]
    size = [int(v) for v in meta["size"]]
    if len(extent) != 3 or len(meta["spacing"]) != 3 or len(size) != 3 or min(size) < 1:
        raise ValueError(f"case {record.case_id}: cache meta needs 3-axis crop_start/crop_end, "
                         f"spacing and size, got {extent}, {list(meta['spacing'])}, {size}")
    spacing = canonical_spacing(meta)
    return tuple(spacing[2 - axis] * extent[2 - axis] / size[axis] for axis in range(3))  # type: ignore[return-value]


METRIC_KEYS: tuple[str, ...] = (
    "dice_wt", "dice_tc", "dice_et", "hd95_wt", "hd95_tc", "hd95_et", "dice_mean", "hd95_mean",
)


def test_site(
    model: torch.nn.Module,
    records: Sequence[Any],
    expert_index: int,
    device: torch.device,
    cfg: DictConfig | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Scores on the original voxel grid: ``(mean over cases, per-case rows)``.

    ``cfg`` (default None: autocast on CUDA in bfloat16) gives ``train.amp``/
    ``train.amp_dtype``, so that the test forward runs in the precision of training."""
    from m4fuse.engine import test_original_grid

    if not records:
        raise ValueError("no test cases for this site")
    model.to(device)
    amp = {} if cfg is None else {"amp": bool(cfg.train.amp),
                                  "amp_dtype": str(cfg.train.amp_dtype)}
    rows = list(test_original_grid(model, list(records), device, expert_index, **amp))
    means = {k: float(np.mean([float(r[k]) for r in rows])) for k in METRIC_KEYS if k in rows[0]}
    if "dice_mean" not in means:
        means["dice_mean"] = float(np.mean([means[k] for k in ("dice_wt", "dice_tc", "dice_et")]))
    if "hd95_mean" not in means:
        means["hd95_mean"] = float(np.mean([means[k] for k in ("hd95_wt", "hd95_tc", "hd95_et")]))
    means["num-examples"] = float(len(rows))
    return means, rows


def overlay_case(
    model: torch.nn.Module,
    record: Any,
    expert_index: int | None,
    device: torch.device,
    path: Path,
    title: str = "",
    cfg: DictConfig | None = None,
) -> Path:
    """PNG of axial slices of one cached case on its original grid (FLAIR and T1ce), with the
    reference (its segmentation file, when it has one) and the model's prediction outlined per
    region (:func:`m4fuse.overlay.overlay_png`); ``cfg`` (default None) gives ``train.amp``."""
    import nibabel as nib

    from m4fuse.data import restore_to_original
    from m4fuse.inference import output_mode, predict_probs, probs_to_regions
    from m4fuse.overlay import overlay_png
    from m4fuse.regions import labels_to_regions

    amp = {} if cfg is None else {"amp": bool(cfg.train.amp),
                                  "amp_dtype": str(cfg.train.amp_dtype)}
    model.to(device)
    probs = predict_probs(model, np.array(record.image(), dtype=np.float32), device,
                          expert_index, **amp)
    mode = output_mode(model)
    prediction = np.asarray(probs_to_regions(restore_to_original(probs.numpy(), record,
                                                                 mode="linear"), mode))
    # source_files are T1, T1ce, T2, FLAIR (m4fuse.data.CaseRecord)
    images = {name: np.asarray(nib.load(f).dataobj, dtype=np.float32)
              for name, f in zip(("t1", "t1ce", "t2", "flair"), record.source_files)
              if name in ("t1ce", "flair")}
    reference = None
    if record.seg_file:
        label = np.rint(np.asarray(nib.load(record.seg_file).dataobj)).astype(np.int16)
        reference = np.asarray(labels_to_regions(label, record.et_label))
    return overlay_png(images, path, prediction=prediction, reference=reference, title=title)


def weighted_mean(rows: Sequence[Mapping[str, float]], weight: str = "num-examples") -> dict:
    """Case-weighted mean of the metric keys of per-site rows."""
    total = sum(float(r[weight]) for r in rows)
    if total <= 0:
        raise ValueError(f"weights {weight!r} sum to {total}")
    keys = [k for k in METRIC_KEYS if all(k in r for r in rows)]
    out = {k: sum(float(r[k]) * float(r[weight]) for r in rows) / total for k in keys}
    out[weight] = total
    return out
