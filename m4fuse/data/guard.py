"""May this writer write into this folder? The checks every writer of the project makes
before its first byte, so that a mistyped path never overwrites a user's data.

The rules (docs/bad-input.md):

* the synthesiser writes only into a folder that is missing, empty, or holds its own earlier
  set (:data:`SYNTH_MARKER`, or the ``acquisition.json`` / ``.complete`` files an earlier set
  has); :func:`claim_for_synthesizer` checks and writes the marker first;
* the preparation cache writes only into a folder that is missing, empty or holds its own
  earlier cache (``index.json``, ``cases/``, ``.complete``), never into or below its source
  (:func:`check_cache_folder`);
* nothing is written inside a folder the user names as input (:func:`check_outside`): the
  BraTS source of a run, a case folder given to ``m4fuse segment``, the root of
  ``m4fuse data sites``;
* the project root (runs, caches, ``mlflow.db``) is never a BraTS folder, and a run name is
  one folder name (:func:`check_project_folders`).

A refused folder raises :class:`FolderRefused` (a ``ValueError``: the commands print it as one
line) naming the folder, what is in it and the fix; a folder holding BraTS cases gets "this
looks like BraTS data". No library offers "is this folder mine to write?", hence this module.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

#: The file the synthesiser writes first into its output folder: the folder is its own.
SYNTH_MARKER = ".m4fuse-synthetic"
#: Files and folders that make a folder the preparation cache's own.
CACHE_OWN = ("index.json", "cases", ".complete")
#: How many entries a refusal names.
SHOWN = 4

# A BraTS image or label file name (the layouts of m4fuse.data.layout, any of the years).
_BRATS_FILE = re.compile(
    r"^(?P<case>.+?)[_-](t1ce|t1c|t1n|t1|t2w|t2f|t2|flair|seg)\.nii(\.gz)?$", re.IGNORECASE)


class FolderRefused(ValueError):
    """A writer was pointed at a folder that is not its own; the message is one line naming
    the folder, what is in it and the fix."""


def brats_cases(folder: str | os.PathLike, depth: int = 3) -> list[str]:
    """Ids of the BraTS cases (files named ``<case>_<modality>.nii[.gz]``) found at most
    ``depth`` levels below ``folder`` (default 3: ``HGG/<case>/<files>`` of the 2019 layout),
    sorted. Shallow on purpose: a project checkout holds synthetic sets deeper down
    (``data/<set>/<case>/<files>``) and is not itself a BraTS folder."""
    found: set[str] = set()
    base = Path(folder)
    if not base.is_dir():
        return []
    for dirpath, dirnames, filenames in os.walk(base):
        level = len(Path(dirpath).relative_to(base).parts)
        if level + 1 >= depth:
            dirnames[:] = []
        for name in filenames:
            match = _BRATS_FILE.match(name)
            if match:
                found.add(match["case"])
    return sorted(found)


def describe(folder: str | os.PathLike, shown: int = SHOWN) -> str:
    """What ``folder`` holds, in a few words: ``"3 entries (a/, b.txt, c/)"``."""
    entries = sorted(Path(folder).iterdir())
    names = [e.name + ("/" if e.is_dir() else "") for e in entries[:shown]]
    more = ", ..." if len(entries) > shown else ""
    return f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'} ({', '.join(names)}{more})"


def _brats_note(folder: Path, what: str, depth: int = 3) -> str | None:
    """"``what`` <folder> looks like BraTS data ..." when ``folder`` holds BraTS cases at most
    ``depth`` levels down (:func:`brats_cases`)."""
    cases = brats_cases(folder, depth)
    if not cases:
        return None
    return (f"{what} {folder} looks like BraTS data ({len(cases)} case(s), e.g. {cases[0]})")


def _is_synthetic_set(folder: Path) -> bool:
    """Whether ``folder`` holds the synthesiser's own earlier set: its marker, or the files an
    earlier set (before the marker existed) has: ``acquisition.json`` with the generator's
    keys, or the ``.complete`` record of :func:`m4fuse.run.provision.ensure_data` (a JSON with the
    generator's version, or the plain ``ok`` of its first version)."""
    if (folder / SYNTH_MARKER).is_file():
        return True
    try:  # the plain marker ensure_data wrote before it recorded versions
        if (folder / ".complete").read_text().strip() == "ok":
            return True
    except (OSError, UnicodeDecodeError):
        pass
    for name, keys in (("acquisition.json", {"seed", "shape", "sites"}),
                       (".complete", {"generator", "cases_per_site"})):
        try:
            record = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and keys <= set(record):
            return True
    return False


def check_synth_folder(out_dir: str | os.PathLike, what: str = "the synthetic data folder"
                       ) -> Path:
    """Refuse (:class:`FolderRefused`) an ``out_dir`` the synthesiser must not write into: an
    existing path that is not a folder, or a folder that is neither empty nor its own earlier
    set. ``what`` names the setting in the message (e.g. ``data.source``). Writes nothing;
    returns the folder."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FolderRefused(f"{what} {out} is a file, not a folder: name a new or empty folder")
    if not out.is_dir() or not any(out.iterdir()) or _is_synthetic_set(out):
        return out
    brats = _brats_note(out, what)
    if brats:
        raise FolderRefused(
            f"{brats}: this looks like BraTS data: add data=brats to train on it (the "
            "synthesiser writes only into an empty folder or its own earlier set, and wrote "
            "nothing)")
    raise FolderRefused(
        f"{what} {out} holds {describe(out)} and no synthetic set of this project: the "
        "synthesiser writes only into an empty folder or its own earlier set; name a new "
        "folder (nothing was written)")


def claim_for_synthesizer(out_dir: str | os.PathLike,
                          what: str = "the synthetic data folder") -> Path:
    """:func:`check_synth_folder`, then create the folder and write :data:`SYNTH_MARKER`
    into it (before any case, so that an interrupted set is still recognised as the
    synthesiser's own); returns the folder. The first statement of
    :func:`m4fuse.data.synthesize`."""
    out = check_synth_folder(out_dir, what)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / SYNTH_MARKER
    if not marker.is_file():
        marker.write_text("written by m4fuse.data.synthesize: this folder holds a synthetic "
                          "set and may be rewritten by it\n")
    return out


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or below it (both resolved; neither need exist)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_outside(path: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike]],
                  what: str) -> None:
    """Refuse writing ``path`` (named ``what`` in the message, e.g. ``--out``) inside any of
    the ``(name, folder)`` ``inputs`` the user named as input: they are read-only."""
    for name, folder in inputs:
        if folder is not None and _inside(Path(path), Path(folder)):
            raise FolderRefused(
                f"{what} {path} is inside {name} {folder}, an input folder, which is never "
                f"written: put {what} outside it")


def check_cache_folder(cache_dir: str | os.PathLike, source: str | os.PathLike,
                       what: str = "the cache folder") -> Path:
    """Refuse a preparation cache ``cache_dir`` that is (or is below) ``source``, an existing
    file, or a folder that is neither empty nor an earlier cache (:data:`CACHE_OWN`); a folder
    holding BraTS cases is named as such. Writes nothing; returns the folder."""
    cache = Path(cache_dir)
    check_outside(cache, [("the BraTS source", source)], what)
    if cache.exists() and not cache.is_dir():
        raise FolderRefused(f"{what} {cache} is a file, not a folder: name a new or empty folder")
    if not cache.is_dir() or not any(cache.iterdir()):
        return cache
    if any((cache / name).exists() for name in CACHE_OWN):
        return cache
    brats = _brats_note(cache, what)
    if brats:
        raise FolderRefused(f"{brats}: the cache is written only into an empty folder or an "
                            "earlier cache; name the BraTS folder as the source and a new "
                            "folder as the cache")
    raise FolderRefused(f"{what} {cache} holds {describe(cache)} and no cache of this project: "
                        "the cache is written only into an empty folder or an earlier cache; "
                        "name a new folder")


def check_run_name(name: str) -> str:
    """Refuse a run name that is not one plain folder name (a ``/``, ``..`` or an absolute
    path would put the run folder outside ``<root>/runs``); returns it."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise FolderRefused(f"run_name={name!r} is not a folder name: the run folder is "
                            "<root>/runs/<run_name>; use letters, digits, '-', '_' or '.'")
    return name


def check_project_root(root: str | os.PathLike, source: str | os.PathLike | None = None
                       ) -> Path:
    """Refuse a project ``root`` (runs, caches, ``mlflow.db`` are written below it) that holds
    BraTS case folders directly (``<root>/<case>/<files>``, the 2020/2021/2023 layouts) or lies
    inside the BraTS ``source``; returns it. Only two levels are looked at: the root of a
    checkout holds synthetic sets and caches deeper down."""
    folder = Path(root)
    if source is not None:
        check_outside(folder, [("data.source", source)], "root")
    brats = _brats_note(folder, "root", depth=2)
    if brats:
        raise FolderRefused(f"{brats}: runs, caches and mlflow.db would be written there; set "
                            "root to a folder of its own (data.source names the BraTS folder)")
    return folder
