"""Atomic file writes: a reader, or a process that restarts after a crash, sees either the old
file or the complete new one, never a partial write.

Used by the model checkpoint (:mod:`m4fuse.io.checkpoint`) and the sites' state store
(``m4fuse/personal/site_store.py``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: Path, write: Callable[[BinaryIO], object], sync_dir: bool = False) -> None:
    """Write ``path`` atomically with ``write(fh)``.

    ``write`` fills a temporary file opened ``"wb"`` in ``path``'s folder (which must exist),
    named ``.<name>.<random>.tmp``; the file is flushed, fsync'd and renamed over ``path``
    (``os.replace``). On any error the temporary file is removed and the error re-raised.
    ``sync_dir`` (default False) also fsyncs the folder after the rename so that the rename
    itself survives a power loss (skipped where the folder cannot be opened).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if not sync_dir:
        return
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
