"""Per-round server checkpoints: the arrays the server holds and the round they finished.

Written atomically every round (temporary file + ``os.replace``), so a stop at any moment
leaves the previous or the new checkpoint, never half of one. ``fl.resume=true`` continues at
the round after the saved one, provided the strategy and the config hash (all settings but
``fl.rounds`` and ``fl.resume``) match.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from m4fuse.io.atomic import write_atomic

FORMAT = "m4fuse-server-round/1"


@dataclass
class ServerCheckpoint:
    """What the server needs to continue a run."""

    server_round: int
    strategy: str
    config_hash: str
    arrays: dict[str, np.ndarray]
    mlflow_run_id: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    #: The run's identity (a uuid made by the server at the run's start, sent to the sites in
    #: every config record); a resumed run keeps it. None in checkpoints written before it.
    run_identity: str | None = None

    def to_record(self) -> ArrayRecord:
        """The arrays as the ArrayRecord the strategy continues from."""
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in self.arrays.items()})


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> ``{name: ndarray}`` (copies)."""
    return {k: np.array(v.numpy(), copy=True) for k, v in record.items()}


def save(path: Path, checkpoint: ServerCheckpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically (:func:`m4fuse.io.atomic.write_atomic`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "server_round": checkpoint.server_round,
        "strategy": checkpoint.strategy,
        "config_hash": checkpoint.config_hash,
        "arrays": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
                   checkpoint.arrays.items()},
        "mlflow_run_id": checkpoint.mlflow_run_id,
        "history": checkpoint.history,
        "run_identity": checkpoint.run_identity,
    }
    write_atomic(path, lambda fh: torch.save(payload, fh))


def load(path: Path) -> ServerCheckpoint:
    """Read a checkpoint written by :func:`save`; a foreign file is refused by name."""
    if not path.is_file():
        raise FileNotFoundError(f"no server checkpoint at {path}")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a server checkpoint ({FORMAT})")
    return ServerCheckpoint(
        server_round=int(data["server_round"]),
        strategy=str(data["strategy"]),
        config_hash=str(data["config_hash"]),
        arrays={k: v.numpy() for k, v in data["arrays"].items()},
        mlflow_run_id=data.get("mlflow_run_id"),
        history=list(data.get("history", [])),
        run_identity=data.get("run_identity"),
    )


def check_resumable(checkpoint: ServerCheckpoint, strategy: str, config_hash: str,
                    path: Path) -> None:
    """Refuse to resume a checkpoint made by another strategy or other settings."""
    if checkpoint.strategy != strategy:
        raise ValueError(f"{path} was written by strategy {checkpoint.strategy!r}, "
                         f"this run uses {strategy!r}")
    if checkpoint.config_hash != config_hash:
        raise ValueError(f"{path} was written with other settings (config hash "
                         f"{checkpoint.config_hash} != {config_hash}); use another run_name")
