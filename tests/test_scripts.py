"""scripts/stop-superlink.sh stops the local SuperLink of one Flower home (and the process
group of what it started), by PID, and leaves every other process alone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "stop-superlink.sh"

# A stand-in for `flower-superlink`: starts a child in its own session (as Flower's SuperExec
# does), then waits. Only its command line matters to the script.
FAKE = """#!{python}
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as handle:  # a zombie is dead
        return handle.read().split()[2] != "Z"


def _start(tmp_path: Path, home: Path) -> tuple[subprocess.Popen, int]:
    fake = tmp_path / "flower-superlink"
    fake.write_text(FAKE.format(python=sys.executable))
    fake.chmod(0o755)
    link = subprocess.Popen([str(fake), "--insecure", "--log-file",
                             str(home / "local-superlink" / "superlink.log")],
                            start_new_session=True)
    for _ in range(100):
        children = subprocess.run(["pgrep", "-P", str(link.pid)], capture_output=True,
                                  text=True).stdout.split()
        if children:
            return link, int(children[0])
        time.sleep(0.1)
    raise AssertionError("the fake SuperLink started no child")


def test_stop_superlink_stops_this_homes_superlink_and_its_children(tmp_path: Path) -> None:
    mine, other = tmp_path / "mine" / ".flwr", tmp_path / "other" / ".flwr"
    link, child = _start(tmp_path, mine)
    bystander, bystander_child = _start(tmp_path, other)
    try:
        env = {**os.environ, "FLWR_HOME": str(mine)}
        out = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                             check=True, timeout=60).stdout
        assert f"stopped local SuperLink {link.pid}" in out
        link.wait(timeout=10)
        for _ in range(50):
            if not _alive(child):
                break
            time.sleep(0.1)
        assert not _alive(child), "the SuperLink's child (its own session) was left running"
        assert _alive(bystander.pid) and _alive(bystander_child)
        again = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                               check=True, timeout=60).stdout
        assert "no local SuperLink" in again
    finally:
        for pid in (child, bystander_child):
            if _alive(pid):
                os.kill(pid, 9)
        for proc in (link, bystander):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
