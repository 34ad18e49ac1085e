"""Atomic writes: a reader, or a process that restarts after a crash, sees either the old file
(or folder) or the complete new one, never a partial write.

Everything is written under a temporary name in the target's folder and renamed over the target
(``os.replace``); on any error the temporary file or folder is removed and the error re-raised.

- :func:`write_atomic`: a file filled through a binary handle, fsync'd (model checkpoints
  :mod:`m4fuse.io.checkpoint`, the sites' state store ``m4fuse/personal/site_store.py``).
- :func:`replace_atomic`: a file written by a function that takes a path (NIfTI files, whose
  writer picks compression from the name's suffix; CSV files).
- :func:`write_text_atomic`: a text file (the preprocessing cache's index).
- :func:`write_folder_atomic`: a folder filled by a function (one case of the cache).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: Path, write: Callable[[BinaryIO], object], sync_dir: bool = False) -> None:
    """Write ``path`` atomically with ``write(fh)``.

    ``write`` fills a temporary file opened ``"wb"`` in ``path``'s folder (which must exist),
    named ``.<name>.<random>.tmp`` (readable by its owner only); the file is flushed, fsync'd
    and renamed over ``path``. ``sync_dir`` (default False) also fsyncs the folder after the
    rename so that the rename itself survives a power loss (skipped where the folder cannot be
    opened).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")

    def fill(_: Path) -> None:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())

    _make_then_replace(Path(tmp), path, fill)
    if sync_dir:
        _fsync_folder(path.parent)


def replace_atomic(path: Path, make: Callable[[Path], object]) -> None:
    """Write ``path`` atomically: ``make(tmp)`` creates the file ``tmp``, a fresh name in
    ``path``'s folder that ends with ``path``'s name (``.tmp-<random>-<name>``, so writers that
    choose the format from the suffix, e.g. ``.nii.gz``, still do), then renamed over ``path``."""
    _make_then_replace(_temporary_sibling(path, "tmp"), path, make)


def write_text_atomic(path: Path, text: str) -> None:
    """Write the text file ``path`` atomically (:func:`replace_atomic`)."""
    replace_atomic(path, lambda tmp: tmp.write_text(text))


def write_folder_atomic(path: Path, fill: Callable[[Path], object]) -> None:
    """Write the folder ``path`` atomically: ``fill(tmp)`` fills a fresh temporary folder next
    to it (parents created), which is then renamed into place; a folder already at ``path`` is
    first moved aside under a temporary name and deleted after the swap."""
    tmp = _temporary_sibling(path, "tmp")
    tmp.mkdir(parents=True)
    _make_then_replace(tmp, path, fill, _replace_folder)


def _replace_folder(tmp: Path, path: Path) -> None:
    """Rename the folder ``tmp`` to ``path``, replacing a folder already there."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = _temporary_sibling(path, "old")
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _temporary_sibling(path: Path, kind: str) -> Path:
    """A fresh name in ``path``'s folder: ``.<kind>-<random>-<name>``."""
    return path.with_name(f".{kind}-{uuid.uuid4().hex}-{path.name}")


def _make_then_replace(tmp: Path, path: Path, make: Callable[[Path], object],
                       replace: Callable[[Path, Path], None] = os.replace) -> None:
    """``make(tmp)``, then ``replace(tmp, path)``; on any error ``tmp`` (a file or a folder)
    is removed and the error re-raised."""
    try:
        make(tmp)
        replace(tmp, path)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _fsync_folder(folder: Path) -> None:
    """fsync ``folder`` (its entries: a rename survives a power loss); skipped where it cannot
    be opened."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
