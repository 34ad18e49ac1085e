"""Starting a run from a pre-trained network: ``fl.init_checkpoint``.

``fl.init_checkpoint: null|PATH`` names a model checkpoint this project wrote (a run's
``model.ckpt`` or its run folder, :mod:`m4fuse.io.checkpoint`), typically a pooled run on the
public reference set (``data=public_reference``, docs/privacy.md). Every network the run
builds (:func:`m4fuse.run.settings.build_model`: the server's initial shared weights, each site's
model in round 1, the pooled and local baselines) starts from it instead of a random
initialisation:

* shared weights: the checkpoint's ``shared``;
* norms and any other weight the checkpoint keeps per site (``site_layers``), and every
  site's expert: those of the checkpoint's *reference site*, the only site of a
  public-set checkpoint, else the first site in sorted order (``site0`` of the synthetic
  sets, whose acquisition is the reference scanner's). Every expert slot of the network
  (one per site in the pooled baseline) gets that expert.

A path that does not exist, a file that is not a checkpoint, or a checkpoint of another
architecture or widths fails in one line naming ``fl.init_checkpoint`` before anything
trains (:func:`m4fuse.run.settings.check_config` builds the model once).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from m4fuse.io.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from m4fuse.personal.sets import place_expert

KEY = "fl.init_checkpoint"

#: Loaded checkpoints by (path, mtime_ns, size): a site process builds its model every round.
_CACHE: dict[tuple[str, int, int], Checkpoint] = {}

#: Model-config fields that may differ between the checkpoint and the run (they do not change
#: which weights exist or their shapes).
_FREE_FIELDS: frozenset[str] = frozenset({"num_experts", "dropout"})


def init_checkpoint_path(cfg: Any) -> Path | None:
    """``fl.init_checkpoint`` as a path (None when unset); a relative path is refused."""
    fl = cfg.get("fl") if hasattr(cfg, "get") else None
    value = None if fl is None else fl.get("init_checkpoint")
    if value in (None, ""):
        return None
    path = Path(str(value))
    if not path.is_absolute():
        raise ValueError(f"{KEY}={value}: not an absolute path; name the checkpoint file (or "
                         "its run folder) by its absolute path")
    return path


def load_init_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint at ``path`` (cached by path, mtime and size); errors name the key."""
    try:
        stat = os.stat(path / "model.ckpt" if path.is_dir() else path)
    except OSError:
        raise ValueError(f"{KEY}={path}: no checkpoint file or run folder there; train one "
                         "first (e.g. m4fuse train --mode pooled data=public_reference) or "
                         f"set {KEY}=null") from None
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _CACHE:
        try:
            _CACHE[key] = load_checkpoint(path)
        except (CheckpointError, FileNotFoundError) as err:
            raise ValueError(f"{KEY}={path}: {err}") from None
    return _CACHE[key]


def reference_site(checkpoint: Checkpoint) -> str | None:
    """The site whose expert and site layers start every site: the only one, else the first
    in sorted order; None for a checkpoint without any."""
    sites = sorted(checkpoint.experts) or checkpoint.sites
    return sites[0] if sites else None


def _check_architecture(checkpoint: Checkpoint, model_config: dict[str, Any]) -> None:
    saved = {k: v for k, v in checkpoint.model_config.items() if k not in _FREE_FIELDS}
    wanted = {k: v for k, v in model_config.items() if k not in _FREE_FIELDS}
    differ = sorted(k for k in set(saved) | set(wanted)
                    if _plain(saved.get(k)) != _plain(wanted.get(k)))
    if differ:
        detail = ", ".join(f"{k} {saved.get(k)!r} (run: {wanted.get(k)!r})" for k in differ[:3])
        raise ValueError(f"{KEY}={checkpoint.path}: a checkpoint of another network: {detail}; "
                         "pre-train with the run's model settings or set the model to match")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def init_state(cfg: Any, model: torch.nn.Module, model_config: dict[str, Any]
               ) -> dict[str, torch.Tensor] | None:
    """The full state dict ``model`` starts from under ``fl.init_checkpoint`` (None when
    unset): shared weights, the reference site's layers and its expert in every slot."""
    path = init_checkpoint_path(cfg)
    if path is None:
        return None
    checkpoint = load_init_checkpoint(path)
    _check_architecture(checkpoint, model_config)
    site = reference_site(checkpoint)
    state = dict(checkpoint.shared)
    if site is not None:
        state.update(checkpoint.site_layers.get(site, {}))
    num_experts = int(model_config.get("num_experts", 1))
    if site is not None and site in checkpoint.experts:
        for index in range(num_experts):
            state.update(place_expert(checkpoint.experts[site], index))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise ValueError(f"{KEY}={checkpoint.path}: its weights do not fit the configured "
                         f"network (missing {missing[:3]}, unexpected {unexpected[:3]}, other "
                         f"shapes {wrong[:3]}); pre-train with the run's model settings")
    return state


def apply_init_checkpoint(cfg: Any, model: torch.nn.Module, model_config: dict[str, Any]
                          ) -> torch.nn.Module:
    """Load :func:`init_state` into ``model`` when ``fl.init_checkpoint`` is set; returns it."""
    state = init_state(cfg, model, model_config)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model
