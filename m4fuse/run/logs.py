"""Logging set-up of every M4Fuse-FL process, done once.

Why by hand: two libraries each print a record once, but together twice. Flower's ``flwr``
logger has its own console handler and also passes its records up to the root logger, and
Opacus calls ``logging.basicConfig`` when it is imported (``opacus.utils.module_utils``),
which gives the root logger a second stderr handler: every Flower line (and its DEBUG lines)
then appears twice in the ServerApp/ClientApp output. :func:`configure_logging` stops the
``flwr`` logger from propagating (Flower's own handler prints it) and gives the project's
``m4fuse`` logger one handler of its own. This module never imports flwr: it only names
Flower's logger.
"""

from __future__ import annotations

import logging
import sys

#: The loggers that print through their own handler and must not also reach the root's.
OWN_HANDLER_LOGGERS: tuple[str, ...] = ("flwr",)

PROJECT_LOGGER = "m4fuse"

_configured = False


def configure_logging(level: int = logging.INFO) -> logging.Logger:
    """Configure the process's loggers once (later calls change nothing); returns the project
    logger ``m4fuse`` (level ``level``, default INFO; one stderr handler, no propagation)."""
    global _configured
    project = logging.getLogger(PROJECT_LOGGER)
    if _configured:
        return project
    for name in OWN_HANDLER_LOGGERS:
        logging.getLogger(name).propagate = False
    if not project.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)-8s: %(name)s: %(message)s"))
        project.addHandler(handler)
    project.setLevel(level)
    project.propagate = False
    _configured = True
    return project
