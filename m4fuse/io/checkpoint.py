"""One-file model checkpoints: network config, training size, shared weights, each site's
personal weights.

A checkpoint is ``torch.save`` of a plain dict (readable with ``torch.load(weights_only=True)``,
so loading never runs pickled code)::

    {"format": "m4fuse-checkpoint", "version": 2,
     "model_config": {...M4FuseConfig fields...},
     "size": [D, H, W] | None,            # training size the preprocessing resizes to
     "shared": {name: tensor},            # every weight that is not a site expert
     "experts": {site: {"…site_experts.*.…": tensor}},   # index-free (m4fuse.personal.sets.expert_state)
     "site_layers": {site: {name: tensor}},  # version 2: a site's own copy of some shared
                                             # weights (the norms of personal-norm ...)
     "metadata": {...JSON values...}}

A site's model is ``shared``, overwritten by its ``site_layers`` (keys and shapes must be
those of ``shared``), plus its expert. Version 1 files (no ``site_layers``) still load.

Writes are atomic (temporary file in the same folder, fsync, rename). A run folder holds its
final model as :data:`CHECKPOINT_NAME` (``model.ckpt``); :func:`resolve_checkpoint_path` accepts
either the file or such a folder. A federated run's final model is made in two steps: the
ServerApp writes what it holds (:func:`save_server_model`, ``shared.ckpt``), and the driver or
``m4fuse model assemble`` adds each site's own weights from the sites' state folders
(:func:`add_site_states`, ``model.ckpt``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from m4fuse.io.atomic import write_atomic
from m4fuse.personal.sets import expert_state, is_personal, place_expert, split_state

FORMAT = "m4fuse-checkpoint"
VERSION = 2
#: Versions :func:`load_checkpoint` reads (1: no ``site_layers``).
READABLE_VERSIONS: tuple[int, ...] = (1, 2)
CHECKPOINT_NAME = "model.ckpt"
#: What the ServerApp writes in its run folder: the server's part of the final model
#: (:func:`save_server_model`); :func:`add_site_states` makes ``model.ckpt`` from it.
SERVER_MODEL_NAME = "shared.ckpt"
REQUIRED_KEYS: tuple[str, ...] = ("format", "version", "model_config", "size", "shared", "experts")

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A file that is not a (complete, supported) M4Fuse checkpoint; the message names it."""


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        model_config: the :class:`m4fuse.nets.model.M4FuseConfig` fields (``num_experts`` as saved;
            :func:`build_model` sets it to 1).
        size: training size ``(D, H, W)`` for preprocessing, or None when the writer did not
            record it.
        shared: shared weights by state-dict name.
        experts: ``{site name: index-free expert weights}``.
        site_layers: ``{site name: {shared weight name: the site's own tensor}}`` (version 2;
            empty for version 1 files and for strategies that keep only the expert).
        metadata: free JSON-like values (strategy, rounds, metrics ...).
        path: the file it was read from (None for one built in memory).
    """

    model_config: dict[str, Any]
    size: tuple[int, int, int] | None
    shared: dict[str, torch.Tensor]
    experts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    site_layers: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def sites(self) -> list[str]:
        """Sites that have an expert or site layers, sorted."""
        return sorted(set(self.experts) | set(self.site_layers))


def _config_dict(model_config: Any) -> dict[str, Any]:
    if hasattr(model_config, "to_dict"):
        data = model_config.to_dict()
    elif dataclasses.is_dataclass(model_config) and not isinstance(model_config, type):
        data = dataclasses.asdict(model_config)
    elif isinstance(model_config, Mapping):
        data = dict(model_config)
    else:
        raise TypeError(f"model_config must be an M4FuseConfig or a dict, got {type(model_config).__name__}")
    return _json_plain(data, "model_config")


def _json_plain(value: Any, what: str) -> Any:
    """JSON round trip: plain values that ``weights_only`` loading accepts; error otherwise."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} must hold JSON values only (str, numbers, lists, dicts): {err}") from err


def _tensors(state: Mapping[str, Any], what: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"{what}: keys must be str, got {key!r}")
        if not isinstance(value, torch.Tensor):
            try:
                value = torch.as_tensor(value)
            except (TypeError, RuntimeError) as err:
                raise TypeError(f"{what}[{key!r}] is not an array: {type(value).__name__}") from err
        out[key] = value.detach().cpu().clone()
    return out


def _check_size(size: Sequence[int] | None) -> tuple[int, int, int] | None:
    if size is None:
        return None
    try:
        out = tuple(int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be three positive ints (D, H, W) or None, got {size!r}") from None
    if len(out) != 3 or min(out) < 1:
        raise ValueError(f"size must be three positive ints (D, H, W) or None, got {size!r}")
    return out  # type: ignore[return-value]


def _site_layers_problem(site_layers: Any, shared: Mapping[str, Any]) -> str | None:
    """Why ``site_layers`` is not ``{site: {shared key: tensor of the shared shape}}``, or None."""
    if not isinstance(site_layers, Mapping):
        return f"'site_layers' must map site names to dicts of tensors, got {type(site_layers).__name__}"
    for site, layers in site_layers.items():
        if not isinstance(site, str) or not site:
            return f"site_layers: site names must be non-empty str, got {site!r}"
        if not isinstance(layers, Mapping) or not layers:
            return f"site_layers[{site!r}] must be a non-empty dict of tensors"
        for key, value in layers.items():
            if not isinstance(value, torch.Tensor):
                return f"site_layers[{site!r}][{key!r}] is a {type(value).__name__}, not a tensor"
            if key not in shared:
                return f"site_layers[{site!r}][{key!r}] is not a shared weight"
            if tuple(value.shape) != tuple(shared[key].shape):
                return (f"site_layers[{site!r}][{key!r}] has shape {tuple(value.shape)}, the "
                        f"shared weight {tuple(shared[key].shape)}")
    return None


def save_checkpoint(
    path: str | os.PathLike,
    model_config: Any,
    shared: Mapping[str, Any],
    experts: Mapping[str, Mapping[str, Any]] | None = None,
    size: Sequence[int] | None = None,
    metadata: Mapping[str, Any] | None = None,
    site_layers: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write a checkpoint (version :data:`VERSION`) atomically and return its path.

    Args:
        path: file to write (parent folders are created).
        model_config: an :class:`m4fuse.nets.model.M4FuseConfig` (or its dict).
        shared: shared weights (tensors or arrays); a site-expert key here is an error.
        experts: ``{site name: index-free expert weights}`` (from
            :func:`m4fuse.personal.sets.expert_state`); default none. All must have the same keys.
        size: training size ``(D, H, W)`` the model was trained at (needed by ``segment``);
            default None (not recorded).
        metadata: free JSON values; default empty.
        site_layers: ``{site name: {shared weight name: tensor}}``, each site's own copy of
            some shared weights (e.g. its norms under ``personal-norm``), which replaces the
            shared one when that site's model is built; keys must be in ``shared`` with the
            same shapes; default none.
    """
    path = Path(path)
    personal = sorted(k for k in shared if is_personal(k))
    if personal:
        raise ValueError(f"shared weights include site-expert keys, e.g. {personal[0]!r}")
    expert_sets: dict[str, dict[str, torch.Tensor]] = {}
    first_keys: set[str] | None = None
    for site, state in (experts or {}).items():
        if not isinstance(site, str) or not site:
            raise ValueError(f"expert site names must be non-empty str, got {site!r}")
        place_expert(state, 0)  # raises KeyError for a key that is not index-free
        keys = set(state)
        if not keys:
            raise ValueError(f"expert of site {site!r} is empty")
        if first_keys is not None and keys != first_keys:
            raise ValueError(f"expert of site {site!r} has other keys than the first expert's")
        first_keys = keys
        expert_sets[site] = _tensors(state, f"experts[{site!r}]")
    layer_sets = {site: _tensors(layers, f"site_layers[{site!r}]")
                  for site, layers in (site_layers or {}).items()}
    problem = _site_layers_problem(layer_sets, shared)
    if problem:
        raise ValueError(problem)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": _config_dict(model_config),
        "size": list(s) if (s := _check_size(size)) else None,
        "shared": _tensors(shared, "shared"),
        "experts": expert_sets,
        "site_layers": layer_sets,
        "metadata": _json_plain(dict(metadata or {}), "metadata"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda fh: torch.save(payload, fh))
    return path


def save_model_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    sites: Sequence[str] = (),
    size: Sequence[int] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Checkpoint of a live model: its shared weights and expert ``k`` saved as ``sites[k]``.

    ``sites`` may name fewer sites than the model has experts (the rest are not saved), never
    more. ``model.config`` provides the network config.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError("model has no .config to rebuild it from (expected an M4Fuse)")
    num_experts = int(getattr(config, "num_experts", 0))
    if len(sites) > num_experts:
        raise ValueError(f"{len(sites)} site names for a model with {num_experts} expert(s)")
    if len(set(sites)) != len(sites):
        raise ValueError(f"site names repeat: {list(sites)}")
    shared, personal = split_state(model.state_dict())
    experts = {name: expert_state(personal, k) for k, name in enumerate(sites)}
    return save_checkpoint(path, config, shared, experts, size, metadata)


def resolve_checkpoint_path(run_or_checkpoint: str | os.PathLike) -> Path:
    """The checkpoint file: the path itself, or ``<folder>/model.ckpt`` for a run folder."""
    path = Path(run_or_checkpoint)
    if path.is_dir():
        candidate = path / CHECKPOINT_NAME
        if not candidate.is_file():
            hint = (f" (its {SERVER_MODEL_NAME} is the server's part: `m4fuse model assemble "
                    f"{path}` adds the sites' own weights)"
                    if (path / SERVER_MODEL_NAME).is_file() else "")
            raise FileNotFoundError(f"run folder {path} holds no {CHECKPOINT_NAME}{hint}")
        return candidate
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint file or run folder at {path}")
    return path


def load_checkpoint(run_or_checkpoint: str | os.PathLike) -> Checkpoint:
    """Read and check a checkpoint (file, or run folder holding ``model.ckpt``).

    Raises:
        FileNotFoundError: no such file / folder.
        CheckpointError: not a torch file, truncated, another format, a version not in
            :data:`READABLE_VERSIONS`, or missing / ill-typed parts (``site_layers`` naming
            a weight that is not shared, or of another shape); the message names the file.
    """
    path = resolve_checkpoint_path(run_or_checkpoint)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... here
        raise CheckpointError(
            f"{path}: not a readable M4Fuse checkpoint (truncated, corrupt, or not a torch.save "
            f"file of tensors and plain values) [{type(err).__name__}]"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: not an M4Fuse checkpoint (format {found!r}, expected {FORMAT!r})")
    version = payload.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint version {version!r} not supported (this code "
                              f"reads {', '.join(map(str, READABLE_VERSIONS))})")
    required = REQUIRED_KEYS + (("site_layers",) if version >= 2 else ())
    missing = [k for k in required if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}")
    shared, experts = payload["shared"], payload["experts"]
    if not isinstance(payload["model_config"], dict):
        raise CheckpointError(f"{path}: model_config is not a dict")
    if not isinstance(shared, dict) or not shared or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in shared.items()
    ):
        raise CheckpointError(f"{path}: 'shared' must be a non-empty dict of tensors")
    if not isinstance(experts, dict) or not all(
        isinstance(s, str) and isinstance(e, dict) and all(isinstance(v, torch.Tensor) for v in e.values())
        for s, e in experts.items()
    ):
        raise CheckpointError(f"{path}: 'experts' must map site names to dicts of tensors")
    site_layers = payload.get("site_layers", {})
    problem = _site_layers_problem(site_layers, shared)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    try:
        size = _check_size(payload["size"])
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from err
    return Checkpoint(
        model_config=payload["model_config"],
        size=size,
        shared=shared,
        experts=experts,
        metadata=payload.get("metadata") or {},
        path=path,
        site_layers={site: dict(layers) for site, layers in site_layers.items()},
    )


def build_model(checkpoint: Checkpoint, site: str | None = None) -> tuple[nn.Module, int | None]:
    """Rebuild the network for one site: ``(model in eval mode, expert index or None)``.

    The model has one expert slot and starts from the shared weights. When ``site`` has site
    layers in the checkpoint (version 2: e.g. its own norms) they replace the shared ones.
    When it has an expert, that is loaded at index 0 and ``0`` is returned; otherwise (no
    site, or a site without an expert) the shared path alone is used and ``None`` is returned
    (pass it as ``expert`` to the model). Which of these happened is logged.
    """
    from m4fuse.nets.model import M4Fuse, M4FuseConfig

    where = checkpoint.path or "<checkpoint>"
    try:
        config = M4FuseConfig.from_dict({**checkpoint.model_config, "num_experts": 1})
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: model_config does not build an M4Fuse: {err}") from err
    model = M4Fuse(config)
    state = dict(checkpoint.shared)
    expert: int | None = None
    layers = checkpoint.site_layers.get(site, {}) if site is not None else {}
    state.update(layers)
    if site is not None and site in checkpoint.experts:
        state.update(place_expert(checkpoint.experts[site], 0))
        expert = 0
    if site is None:
        log.info("no site given: shared model alone (%s)", where)
    elif expert is None and not layers:
        log.info("site %r has no personal weights in %s (sites with some: %s): shared model "
                 "alone", site, where, checkpoint.sites or "none")
    else:
        log.info("site %r: shared weights with its %s from %s", site,
                 " and ".join(p for p, have in (("expert", expert is not None),
                                                (f"{len(layers)} own layer tensors", layers))
                              if have),
                 where)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(f"{where}: weights do not fit the configured network: {err}") from err
    missing = [k for k in result.missing_keys if expert is not None or not is_personal(k)]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{where}: weights do not match the network: missing {missing[:5]}, "
            f"unexpected {list(result.unexpected_keys)[:5]}"
        )
    model.eval()
    return model, expert


def save_server_model(
    path: str | os.PathLike,
    model_config: Any,
    strategy: str,
    held: Mapping[str, Any],
    initial: Mapping[str, Any],
    sites: Sequence[str],
    size: Sequence[int] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path | None:
    """Write what the server alone knows at the end of a federated run (the run folder's
    :data:`SERVER_MODEL_NAME`): its shared weights and, where it held one (``fedavg``...), the
    expert every site then uses. Returns the path, or None for ``local`` (no shared model).

    Args:
        path: file to write.
        model_config: the one-expert network config (:class:`m4fuse.nets.model.M4FuseConfig`).
        strategy: ``fl.strategy`` (:data:`m4fuse.personal.sets.STRATEGIES`), recorded in the metadata.
        held: what the server holds at the end: the shared weights (the whole one-expert
            model under ``fedavg``).
        initial: the whole initial one-expert model; fills the weights the server never held
            (the strategy's personal set outside the expert, e.g. the norms of
            ``personal-norm``) with what a site without a state of its own starts from.
        sites: the federation's site names, recorded as ``sites`` in the metadata (what
            :func:`add_site_states` looks for by default).
        size: training size ``(D, H, W)``; default None.
        metadata: extra JSON values; default none.
    """
    from m4fuse.personal.sets import strategy as named_strategy

    if named_strategy(strategy).kept == "all":
        return None
    unknown = sorted(set(held) - set(initial))
    if unknown:
        raise KeyError(f"server weights the initial model lacks: {unknown[:5]}")
    full = {k: torch.as_tensor(v) for k, v in initial.items()}
    full.update({k: torch.as_tensor(v) for k, v in held.items()})
    shared, personal = split_state(full)
    experts = {}
    if any(is_personal(k) for k in held):
        experts = {site: expert_state(personal, 0) for site in sites}
    meta = {**dict(metadata or {}), "strategy": strategy, "sites": list(sites),
            "site_rounds": {}, "site_cases": {}}
    return save_checkpoint(path, model_config, shared, experts, size, meta)


def add_site_states(
    server_model: str | os.PathLike,
    site_folders: Mapping[str, str | os.PathLike | None],
    out: str | os.PathLike,
) -> Path:
    """The final model of a federated run: the server's model (:func:`save_server_model`)
    plus each site's own weights read from its state folder, written to ``out``.

    Written by hand because no library knows the project's site-state format: each folder
    (:class:`m4fuse.personal.site_store.SiteStateStore` layout) that holds a state gives its newest
    state's expert (``experts``, replacing a held one: the personal set of a "+FT"
    fine-tuning) and its other kept weights (``site_layers``); a folder that is None or holds
    no state is skipped (a deployed site's folder is on its own machine; the site runs this
    itself on its own folder). The metadata gains the round of each site's state
    (``site_rounds``) and, where its metrics record it, its training cases (``site_cases``,
    from ``num-examples``).

    Raises:
        ValueError: a folder holds another site's state (the message names the folder).
    """
    from m4fuse.personal.site_store import newest_kept

    base = load_checkpoint(server_model)
    experts = {site: dict(e) for site, e in base.experts.items()}
    site_layers = {site: dict(layers) for site, layers in base.site_layers.items()}
    rounds = dict(base.metadata.get("site_rounds") or {})
    cases = dict(base.metadata.get("site_cases") or {})
    for site, folder in site_folders.items():
        kept = newest_kept(folder) if folder is not None else None
        if kept is None:
            continue
        if kept["site"] != site:
            raise ValueError(f"state folder {folder} holds site {kept['site']!r}, not {site!r}")
        layers, own = split_state(kept["state"])
        if own:
            experts[site] = expert_state(own, 0)
        if layers:
            site_layers[site] = layers
        rounds[site] = int(kept["round"])
        if float(kept["metrics"].get("num-examples", 0)) > 0:
            cases[site] = int(kept["metrics"]["num-examples"])
    meta = {**base.metadata, "site_rounds": rounds, "site_cases": cases}
    log.info("final model %s: %d site(s) with an expert, %d with own layers", out,
             len(experts), len(site_layers))
    return save_checkpoint(out, base.model_config, base.shared, experts, base.size, meta,
                           site_layers)


def save_final_model(
    path: str | os.PathLike,
    model_config: Any,
    strategy: str,
    held: Mapping[str, Any],
    initial: Mapping[str, Any],
    site_folders: Mapping[str, str | os.PathLike | None],
    size: Sequence[int] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path | None:
    """:func:`save_server_model` then :func:`add_site_states` in one call, to ``path`` (the
    arguments are theirs; the sites are ``site_folders``' keys). None for ``local``.

    Under a strategy that keeps nothing (``fedavg``...) every site gets the held expert
    unless its folder holds a state (the personal set of a "+FT" fine-tuning).
    """
    server = save_server_model(path, model_config, strategy, held, initial, list(site_folders),
                               size, metadata)
    if server is None:
        return None
    return add_site_states(server, site_folders, path)
