"""A run refused for a user's mistake ends in one line, with Flower's run status ``failed``.

Flower 1.42 marks a run ``failed`` when its ServerApp raises (``flwr ls`` shows the status,
``flwr ls --run-id N`` the details; ``flwr run`` itself exits 0 either way) and logs the
exception with its traceback and then an ``Exit Code: ...`` message, both into the stream of
``flwr run --stream``. For a :class:`RunRefused` (a bad setting, a folder the run may not
write, fewer SuperNodes than sites: found before any training or waiting) the filter of
:func:`install` replaces that traceback with the one line and puts the line again at the end
of the exit message, so the last line of the stream names the key, the value and the fix.
``M4FUSE_DEBUG=1`` keeps the traceback. Other exceptions (the project's own bugs, a round
that failed) keep Flower's traceback. Flower has no hook for this; a ``logging.Filter`` on
its logger is the least intrusive place.
"""

from __future__ import annotations

import logging
from typing import Any

from m4fuse.run.config_check import debug_enabled

#: Flower's logger (``flwr.supercore.log`` writes through it).
FLOWER_LOGGER = "flwr"


class RunRefused(Exception):
    """The run was refused before it started; the message is the one line for the user."""


def refused_in(exc: BaseException | None) -> RunRefused | None:
    """The :class:`RunRefused` that is ``exc`` or one of its causes, else None."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, RunRefused):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


class OneLineFilter(logging.Filter):
    """Rewrites Flower's log records of a :class:`RunRefused` (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.line: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        exc: Any = record.exc_info[1] if record.exc_info else None
        refused = refused_in(exc)
        if refused is not None and not debug_enabled():
            self.line = f"m4fuse: error: {refused}"
            record.msg, record.args = self.line, ()
            record.exc_info, record.exc_text = None, None
        elif self.line and str(record.msg).startswith("Exit Code:"):
            record.msg = f"{record.getMessage()}\n{self.line}"
            record.args = ()
        return True


def install() -> OneLineFilter:
    """Add the :class:`OneLineFilter` to Flower's logger once; returns it."""
    logger = logging.getLogger(FLOWER_LOGGER)
    for existing in logger.filters:
        if isinstance(existing, OneLineFilter):
            return existing
    one_line = OneLineFilter()
    logger.addFilter(one_line)
    return one_line
