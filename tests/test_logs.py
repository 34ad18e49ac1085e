"""m4fuse/run/logs.py: with Opacus imported (it calls logging.basicConfig), a Flower log line is
printed once, by Flower's own handler, not a second time by the root logger's."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


@pytest.mark.slow  # a fresh interpreter imports Flower, Opacus and the apps
def test_a_flower_line_is_printed_once_after_the_apps_are_imported() -> None:
    code = textwrap.dedent("""
        import client.app, server.app   # import Opacus and configure logging
        from logging import INFO
        from flwr.supercore import log
        log(INFO, "marker-line-for-the-test")
        import logging
        logging.getLogger("m4fuse.test").info("project-line-for-the-test")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True)
    text = out.stdout + out.stderr
    assert text.count("marker-line-for-the-test") == 1, text
    assert text.count("project-line-for-the-test") == 1, text


def test_configure_logging_is_idempotent() -> None:
    import logging

    from m4fuse.run.logs import configure_logging

    first = configure_logging()
    handlers = list(first.handlers)
    assert configure_logging() is first and first.handlers == handlers
    assert logging.getLogger("flwr").propagate is False and first.propagate is False
