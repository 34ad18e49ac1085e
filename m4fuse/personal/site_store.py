"""A hospital's personal state on its own disk (the node config's ``state-dir``).

The format both the ClientApp (which writes and reads its own folder) and the final-model
assembly (:func:`m4fuse.io.checkpoint.add_site_states`, run by the simulation driver or
``m4fuse model assemble`` on the machine that holds the folders) need; it imports nothing from
``client/`` or ``server/``.

What a site keeps between rounds and across SuperNode restarts: its expert (index-free keys
from :func:`m4fuse.personal.sets.expert_state`, so it loads at whatever index the site's model uses),
its optimiser state, the metrics of its last round and the round number. None of it is ever
put in a reply; only this site's process reads or writes the folder.

Layout of ``state_dir``::

    site-state-r<round>.pt   torch.save of {"format", "site", "round", "fingerprint",
                             "expert", "optimizer", "metrics", "shared"}; the newest
                             ``keep`` rounds
    last-metrics.json        the newest round's metrics, for people (never read back)
    dp-accountant.json       with DP-SGD: the site's privacy accountant history (one file,
                             always the newest, never rolled back with the rounds: privacy
                             spent in a round that is later repeated stays spent)
    run-identity.txt         the identity of the federated run this state belongs to (the
                             server's ``run-identity``, :meth:`SiteStateStore.bind_run`)

Every file is written to a temporary name in the same folder, flushed, fsync'd and renamed
over the target (``os.replace``), so a crash or a killed SuperNode leaves either the old or the
new file, never half of one. The folder is created with mode 0700 (the expert is the hospital's).

A ``fingerprint`` of the model config is stored with the state; :meth:`SiteStateStore.load`
refuses an expert saved for a different architecture (other widths, state size, ...) with a
message naming the file and both fingerprints, instead of a shape error deep in
``load_state_dict``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from m4fuse.io.atomic import write_atomic
from m4fuse.personal.sets import place_expert

#: Version of the on-disk layout; a file of another version is refused with a clear error.
FORMAT = 1
#: Config fields that do not change an expert's weights: the number of experts of the model
#: the expert sits in (experts are stored index-free) and the dropout rate.
FINGERPRINT_IGNORES: tuple[str, ...] = ("num_experts", "dropout")
#: Rounds kept on disk by default: the newest two, so that a stop between this site's save and
#: the server's checkpoint does not lose the round the server resumes from.
DEFAULT_KEEP = 2
_FILE = re.compile(r"^site-state-r(\d+)\.pt$")
#: The accountant file in a state folder (see the module docstring).
ACCOUNTANT_FILE = "dp-accountant.json"
#: The file naming the run a state folder belongs to (see :meth:`SiteStateStore.bind_run`).
RUN_IDENTITY_FILE = "run-identity.txt"
_EXPERT_KEY = "site_experts.*."


class StateStoreError(RuntimeError):
    """A state file that cannot be used: corrupt, another site's, another model's."""


def model_fingerprint(
    config: Mapping[str, Any] | Any, ignore: tuple[str, ...] = FINGERPRINT_IGNORES
) -> str:
    """A short stable hash of a model config (a dataclass such as ``M4FuseConfig`` or a
    mapping), leaving out the fields in ``ignore`` (default :data:`FINGERPRINT_IGNORES`).

    Two configs with the same fingerprint give experts with the same keys and shapes.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        items = dataclasses.asdict(config)
    elif isinstance(config, Mapping):
        items = dict(config)
    else:
        raise TypeError(f"model config must be a dataclass or a mapping, got {type(config)!r}")
    kept = {k: v for k, v in items.items() if k not in ignore}
    text = json.dumps(kept, sort_keys=True, default=list, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class SiteState:
    """One round of a site's personal state.

    Attributes:
        site: the site's name (a state folder belongs to one site).
        round: the server round after which this was saved (>= 0).
        fingerprint: :func:`model_fingerprint` of the model the expert belongs to.
        expert: index-free expert weights (keys contain ``site_experts.*.``).
        optimizer: the optimiser's ``state_dict()``, or None when not kept.
        metrics: the site's last scalar metrics (name -> finite number).
        shared: the site's own copy of the shared weights, only when they are not exchanged
            (``fl.strategy=local``); None otherwise (default).
    """

    site: str
    round: int
    fingerprint: str
    expert: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    shared: dict[str, torch.Tensor] | None = None

    def check(self) -> None:
        """Raise ValueError naming the bad field when this state cannot be stored."""
        if not self.site or not isinstance(self.site, str):
            raise ValueError(f"site must be a non-empty string, got {self.site!r}")
        if not isinstance(self.round, int) or self.round < 0:
            raise ValueError(f"round must be an int >= 0, got {self.round!r}")
        if not self.fingerprint:
            raise ValueError("fingerprint is empty; use model_fingerprint(model config)")
        if not self.expert:
            raise ValueError("expert is empty; pass m4fuse.personal.sets.expert_state(state, index)")
        for key, value in self.expert.items():
            if _EXPERT_KEY not in f".{key}" and not key.startswith(_EXPERT_KEY):
                raise ValueError(
                    f"expert key {key!r} is not index-free (expected 'site_experts.*.'); "
                    "pass m4fuse.personal.sets.expert_state(state, index)"
                )
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"expert[{key!r}] is a {type(value).__name__}, not a tensor")
        for key, value in (self.shared or {}).items():
            if _EXPERT_KEY in f".{key}" or ".site_experts." in f".{key}":
                raise ValueError(f"shared key {key!r} is an expert weight; put it in expert")
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"shared[{key!r}] is a {type(value).__name__}, not a tensor")
        for key, value in self.metrics.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"metric {key!r} must be a finite number, got {value!r}")


class SiteStateStore:
    """Read and write one site's :class:`SiteState` in ``state_dir``.

    Args:
        state_dir: the site's folder (created with mode 0700 on the first save).
        site: the site's name; a folder holding another site's state is refused.
        keep: how many newest rounds stay on disk (default :data:`DEFAULT_KEEP`, >= 1).
    """

    def __init__(self, state_dir: str | Path, site: str, keep: int = DEFAULT_KEEP) -> None:
        if not site:
            raise ValueError(f"site must be a non-empty string, got {site!r}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.state_dir = Path(state_dir).expanduser()
        if self.state_dir.exists() and not self.state_dir.is_dir():
            raise NotADirectoryError(f"state-dir {self.state_dir} exists and is not a folder")
        self.site = site
        self.keep = keep

    def path(self, server_round: int) -> Path:
        """The file of ``server_round``."""
        return self.state_dir / f"site-state-r{server_round}.pt"

    def rounds(self) -> list[int]:
        """The rounds with a state file, oldest first."""
        if not self.state_dir.is_dir():
            return []
        found = (_FILE.match(p.name) for p in self.state_dir.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def save(self, state: SiteState) -> Path:
        """Store ``state`` (checked first) atomically; drop all but the newest ``keep`` rounds.

        Returns the path written.
        """
        state.check()
        if state.site != self.site:
            raise ValueError(f"state of site {state.site!r} given to the store of {self.site!r}")
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        payload = {
            "format": FORMAT,
            "site": state.site,
            "round": state.round,
            "fingerprint": state.fingerprint,
            "expert": {k: v.detach().cpu().contiguous() for k, v in state.expert.items()},
            "optimizer": state.optimizer,
            "metrics": {k: float(v) for k, v in state.metrics.items()},
            "shared": None if state.shared is None else {
                k: v.detach().cpu().contiguous() for k, v in state.shared.items()
            },
        }
        target = self.path(state.round)
        write_atomic(target, lambda fh: torch.save(payload, fh), sync_dir=True)
        summary = {"site": state.site, "round": state.round, "metrics": payload["metrics"]}
        summary_text = json.dumps(summary, indent=2, sort_keys=True) + "\n"
        write_atomic(self.state_dir / "last-metrics.json",
                     lambda fh: fh.write(summary_text.encode()), sync_dir=True)
        for old in self.rounds()[: -self.keep]:
            self.path(old).unlink(missing_ok=True)
        return target

    def load(
        self,
        fingerprint: str,
        before_round: int | None = None,
        like: Mapping[str, torch.Tensor] | None = None,
    ) -> SiteState | None:
        """The newest stored state (with round < ``before_round`` when given), or None.

        Args:
            fingerprint: :func:`model_fingerprint` of the model about to use the expert; a
                stored state with another fingerprint is refused.
            before_round: only rounds strictly before this one (e.g. the current round, so a
                repeated round starts from what the site had before it).
            like: index-free expert weights of that model; when given, the stored expert must
                have exactly these keys and shapes.

        Raises:
            StateStoreError: the file is unreadable or corrupt, belongs to another site or
                another model, or its keys/shapes differ from ``like`` (the message names the
                file).
        """
        rounds = [r for r in self.rounds() if before_round is None or r < before_round]
        if not rounds:
            return None
        path = self.path(rounds[-1])
        raw = _read_state_file(path)
        if raw["site"] != self.site:
            raise StateStoreError(
                f"site state file {path} belongs to site {raw['site']!r}, not {self.site!r}; "
                "give each site its own state-dir"
            )
        if raw["fingerprint"] != fingerprint:
            raise StateStoreError(
                f"site state file {path} holds an expert of another model (fingerprint "
                f"{raw['fingerprint']}, this model {fingerprint}); the model config changed. "
                "Use a new state-dir, or restore the model config it was trained with"
            )
        expert = raw["expert"]
        if like is not None:
            if set(expert) != set(like):
                diff = sorted(set(expert) ^ set(like))
                raise StateStoreError(
                    f"site state file {path}: expert keys differ from the model's at {diff[:5]}"
                )
            for key, ref in like.items():
                if tuple(expert[key].shape) != tuple(ref.shape):
                    raise StateStoreError(
                        f"site state file {path}: {key} has shape {tuple(expert[key].shape)}, "
                        f"the model expects {tuple(ref.shape)}"
                    )
        return _to_state(raw)

    def run_identity(self) -> str | None:
        """The run identity this folder's state belongs to, or None when it names none."""
        path = self.state_dir / RUN_IDENTITY_FILE
        return (path.read_text().strip() or None) if path.is_file() else None

    def bind_run(self, identity: str) -> str | None:
        """Bind this folder to the run ``identity``; returns what had to be discarded.

        The same identity: nothing changes (a resumed run keeps its identity, so its experts
        and accountant carry on); returns None. Another identity, or state files with no
        identity: the folder held another run of the same name, whose expert must not be
        loaded and whose privacy spending is not this run's; its round states,
        ``last-metrics.json`` and accountant are deleted, the new identity is written, and a
        sentence saying what was discarded is returned (the caller logs it). An empty
        folder just gets the identity (returns None).
        """
        if not identity:
            raise ValueError(f"run identity must be a non-empty string, got {identity!r}")
        previous = self.run_identity()
        if previous == identity:
            return None
        stale = [self.path(r) for r in self.rounds()]
        stale += [p for p in (self.accountant_path(), self.state_dir / "last-metrics.json")
                  if p.is_file()]
        for path in stale:
            path.unlink()
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(self.state_dir / RUN_IDENTITY_FILE,
                     lambda fh: fh.write((identity + "\n").encode()), sync_dir=True)
        if not stale:
            return None
        return (f"state folder {self.state_dir} held run {previous or '(no identity)'}, this "
                f"is run {identity}: started clean (deleted {', '.join(p.name for p in stale)})")

    def accountant_path(self) -> Path:
        """The DP accountant file of this folder (:data:`ACCOUNTANT_FILE`)."""
        return self.state_dir / ACCOUNTANT_FILE

    def save_accountant(self, record: Mapping[str, Any]) -> Path:
        """Store the site's DP accountant history (``m4fuse.training.dp.accountant_to_record``
        output: lists of numbers and a mechanism name) atomically; returns the path.

        One file, overwritten each round and never rolled back by :meth:`load`'s
        ``before_round``: a repeated round adds its steps to what was already spent.
        """
        try:
            text = json.dumps({"site": self.site, "accountant": dict(record)}, sort_keys=True)
        except TypeError as err:
            raise ValueError(f"accountant record is not plain JSON data: {err}") from err
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.accountant_path()
        write_atomic(path, lambda fh: fh.write((text + "\n").encode()), sync_dir=True)
        return path

    def load_accountant(self) -> dict[str, Any] | None:
        """The stored accountant history, or None when this folder has none.

        Raises:
            StateStoreError: the file is not JSON or belongs to another site.
        """
        path = self.accountant_path()
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise StateStoreError(f"corrupt accountant file {path}: {err!r}") from err
        if not isinstance(raw, dict) or not isinstance(raw.get("accountant"), dict):
            raise StateStoreError(f"corrupt accountant file {path}: no 'accountant' mapping")
        if raw.get("site") != self.site:
            raise StateStoreError(
                f"accountant file {path} belongs to site {raw.get('site')!r}, not {self.site!r}"
            )
        return dict(raw["accountant"])


def _read_state_file(path: Path) -> dict[str, Any]:
    """A state file's raw payload, checked for format and required fields."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise StateStoreError(f"corrupt site state file {path}: {err!r}") from err
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise StateStoreError(
            f"site state file {path} has format {found!r}, expected {FORMAT}"
        )
    missing = {"site", "round", "fingerprint", "expert", "metrics"} - set(raw)
    if missing:
        raise StateStoreError(f"corrupt site state file {path}: missing {sorted(missing)}")
    return raw


def _to_state(raw: Mapping[str, Any]) -> SiteState:
    return SiteState(
        site=raw["site"],
        round=int(raw["round"]),
        fingerprint=raw["fingerprint"],
        expert=dict(raw["expert"]),
        optimizer=raw.get("optimizer"),
        metrics=dict(raw["metrics"]),
        shared=None if raw.get("shared") is None else dict(raw["shared"]),
    )


def newest_state(state_dir: str | Path, before_round: int | None = None) -> SiteState | None:
    """The newest state in ``state_dir`` (round < ``before_round`` when given) whatever its
    site and model, or None. For readers that only collect experts (the simulation's
    coordinator, which shares the machine with its sites); a site itself uses
    :meth:`SiteStateStore.load`, which checks site and fingerprint."""
    folder = Path(state_dir).expanduser()
    if not folder.is_dir():
        return None
    found = (_FILE.match(p.name) for p in folder.iterdir())
    rounds = sorted(int(m.group(1)) for m in found if m)
    rounds = [r for r in rounds if before_round is None or r < before_round]
    if not rounds:
        return None
    return _to_state(_read_state_file(folder / f"site-state-r{rounds[-1]}.pt"))


def newest_kept(folder: str | Path, before_round: int | None = None) -> dict[str, Any] | None:
    """The kept weights of the newest site state in ``folder`` (a :class:`SiteStateStore`
    folder; round < ``before_round`` when given), as ``{"state": weights with the expert at
    index 0 plus the state's ``shared`` field (the norms of ``personal-norm``, the whole model
    of ``local`` ...), "round": int, "site": str, "metrics": dict}``, or None when there is
    none.

    For readers on the same file system as the sites (the simulation's final model, the
    comparison, diagnostics); no site or fingerprint check (a site reads its own folder with
    :meth:`SiteStateStore.load`).
    """
    saved = newest_state(folder, before_round)
    if saved is None:
        return None
    state = dict(saved.shared or {})
    state.update(place_expert(saved.expert, 0))
    return {"state": state, "round": saved.round, "site": saved.site, "metrics": saved.metrics}
