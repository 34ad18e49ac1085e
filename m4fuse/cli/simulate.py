"""``m4fuse simulate [hydra overrides]``: ``flwr run . --stream`` with one SuperNode per site.

Composes the config of the overrides (as the ServerApp will), prepares the data once and
counts the sites of its split (:func:`m4fuse.run.provision.load_sites`, the split every run uses),
then runs ``flwr run <app> [connection] --stream --federation-config num-supernodes=K
--run-config overrides='...'``, so a BraTS folder split by institution needs no counting by
hand::

    m4fuse simulate data=brats data.source=/data/BraTS2019 fl.rounds=20

Without overrides it runs what plain ``flwr run .`` runs: the app's own ``overrides`` (its
``pyproject.toml``, the main job's federation); overrides given replace them, as
``--run-config`` does. ``--dry-run`` prints the command instead. The work is done by
:func:`count_sites` and :func:`flwr_command`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``m4fuse simulate`` to the console command."""
    parser = sub.add_parser(
        "simulate", help="flwr run . with one SuperNode per site of the configured split",
        description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides, as for flwr run's overrides, e.g. data=brats "
                             "data.source=/abs/BraTS fl.rounds=5 (none: the app's own, "
                             "as plain flwr run)")
    parser.add_argument("--app", default=None,
                        help="the Flower app folder (default: this checkout)")
    parser.add_argument("--connection", default=None,
                        help="the SuperLink connection of the Flower config (default: its "
                             "default, the local simulation)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the flwr command instead of running it")
    parser.set_defaults(func=run)


def count_sites(overrides: Sequence[str]) -> list[str]:
    """The sites a run of ``overrides`` trains (the data prepared once, small sites left out,
    as the ServerApp counts them); raises the one-line errors of a bad setting or folder."""
    from m4fuse.run import provision, settings

    cfg = settings.compose("config", list(overrides))
    if cfg.fl.get("site_names"):
        return sorted(str(n) for n in cfg.fl.site_names)
    return provision.site_names(provision.load_sites(cfg))


def overrides_value(overrides: Sequence[str]) -> str:
    """The ``overrides`` run-config value: the overrides joined by spaces, one with a space
    or a double quote in double quotes (:func:`m4fuse.run.settings.parse_overrides` splits it
    back). Flower reads the value as a TOML literal string in single quotes, so an override
    holding a single quote cannot pass (ValueError)."""
    from m4fuse.run.config_check import ConfigError

    parts = []
    for item in overrides:
        if "'" in item:
            raise ConfigError(f"{item}: an override passed through flwr run cannot hold a "
                              "single quote ('); use double quotes")
        needs_quotes = any(c.isspace() for c in item) or '"' in item or "\\" in item
        parts.append('"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"'
                     if needs_quotes else item)
    return " ".join(parts)


def flwr_command(overrides: Sequence[str], sites: int, app: str | os.PathLike = ".",
                 connection: str | None = None) -> list[str]:
    """``flwr run APP [CONNECTION] --stream --federation-config num-supernodes=SITES
    --run-config overrides='...'`` (the ``flwr`` beside this Python first)."""
    if sites < 1:
        raise ValueError(f"the split has no site to simulate, got {sites}")
    beside = Path(sys.executable).parent / "flwr"
    command = [str(beside) if beside.is_file() else "flwr", "run", str(app)]
    if connection:
        command.append(connection)
    command += ["--stream", "--federation-config", f"num-supernodes={sites}"]
    value = overrides_value(overrides)
    if value:
        command += ["--run-config", f"overrides='{value}'"]
    return command


def run(args: argparse.Namespace) -> int:
    """Count the sites, print the split rule and the command, run it (or print it only)."""
    from m4fuse.run import provision, settings

    app = args.app or str(settings.CONFIG_DIR.parent)
    # no overrides: the app's own (pyproject.toml), the federation plain `flwr run .` trains
    overrides = list(args.overrides) or settings.app_overrides(app)
    sites = count_sites(overrides)
    command = flwr_command(overrides, len(sites), app, args.connection)
    print(provision.split_rule(settings.compose("config", overrides)))
    print(f"{len(sites)} site(s), one SuperNode each: {', '.join(sites)}")
    print(shlex.join(command), flush=True)
    if args.dry_run:
        return 0
    return run_and_check(command, args.connection)


def run_and_check(command: Sequence[str], connection: str | None = None) -> int:
    """Run the ``flwr run`` ``command``, echoing its output, then ask Flower for the run's
    status (``flwr ls --run-id N``): 0 when it finished completed, else 1 (``flwr run``
    itself exits 0 for a failed run)."""
    import json
    import re

    with subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as process:
        run_id = None
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            found = re.search(r"Successfully started run (\d+)", line)
            run_id = run_id or (found.group(1) if found else None)
        code = process.wait()
    if code != 0 or run_id is None:
        return code or 1
    listing = [command[0], "ls", *([connection] if connection else []), "--run-id", run_id,
               "--format", "json"]
    done = subprocess.run(listing, capture_output=True, text=True, check=False)
    try:
        status = json.loads(done.stdout)["runs"][0]["status"]
    except (ValueError, KeyError, IndexError):
        print(f"m4fuse simulate: could not read the status of run {run_id}: "
              f"{(done.stdout + done.stderr).strip()[:300]}", file=sys.stderr)
        return 1
    if status != "finished:completed":
        print(f"m4fuse simulate: run {run_id} ended {status} (flwr ls --run-id {run_id})",
              file=sys.stderr)
        return 1
    return 0
