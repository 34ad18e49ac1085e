"""Where a comparison comes from: the command that made it, the date and the code version
(stored in its summary's ``provenance`` and heading its report)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from m4fuse.run.runtime import numerics_platform, platform_text

#: The project checkout this module runs from (its git commit is a comparison's code version).
PROJECT_DIR = Path(__file__).resolve().parents[2]
UNKNOWN = "unknown"


def code_version(root: Path = PROJECT_DIR) -> str:
    """The git commit of the checkout at ``root`` (default: this project's), with ``+dirty``
    when its tree holds uncommitted changes or untracked, not ignored files; ``unknown`` when
    ``root`` is no git checkout or git is missing. Asked of the ``git`` command itself (no
    library reads a work tree's state more simply)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    return commit + ("+dirty" if dirty else "")


def invoking_command(argv: Sequence[str] | None = None, root: Path = PROJECT_DIR) -> str:
    """The command line of this process as a user would type it: a module of the project run
    with ``python -m`` (``sys.argv[0]`` is then its file, a package's ``__main__.py``) is named
    by its module path, e.g. ``python -m simulations.compare --seeds 0,1 fl.rounds=60``;
    ``argv`` defaults to ``sys.argv``."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return UNKNOWN
    program = Path(argv[0])
    try:
        parts = program.resolve().relative_to(root).with_suffix("").parts
        head = "python -m " + ".".join(parts[:-1] if parts[-1] == "__main__" else parts)
    except ValueError:
        head = shlex.quote(program.name)
    return " ".join([head, *(shlex.quote(a) for a in argv[1:])])


def provenance() -> dict[str, Any]:
    """Where a comparison comes from, stored in its summary: the command that made it, the
    date (UTC), the code version (:func:`code_version`) and the platform its numbers were
    computed on (:func:`m4fuse.run.runtime.numerics_platform`: another CPU or library build
    moves the last bits, and training amplifies them)."""
    return {"command": invoking_command(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "code_version": code_version(), "platform": numerics_platform()}


def provenance_line(summary: Mapping[str, Any]) -> str:
    """The report's provenance line; a summary written before provenance was recorded reads
    ``unknown``, one written before the platform was recorded names none."""
    made = summary.get("provenance") or {}
    where = f"; computed on {platform_text(made['platform'])}" if made.get("platform") else ""
    return (f"Made by `{made.get('command') or UNKNOWN}` on {made.get('date') or UNKNOWN}; "
            f"code version {made.get('code_version') or UNKNOWN}{where}.")
