"""Deployment on loopback: a SuperLink and two SuperNodes as separate processes, TLS on,
SuperNode authentication on, one short run of this project's Flower app on tiny synthetic data,
then both SuperNodes restarted (stopped by PID, started again with the same node config and state
folder) and the run resumed for a second round with ``fl.resume=true``.

The commands are the ones docs/deployment.md gives to the coordinator and
the hospitals (the last test checks that every flag used here is documented there). Every process is started in its
own session and stopped by PID at teardown, with all its descendants (the SuperLink's and the
SuperNodes' SuperExec, ServerApp and ClientApp processes), also when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from engine_fixtures import TINY_OVERRIDES

from m4fuse.cli.certs import make_certificates
from server import round_checkpoint as server_ckpt

REPO = Path(__file__).resolve().parents[1]
#: The Flower app submitted with `flwr run`: this checkout (a copy elsewhere when
#: $M4FUSE_DEPLOY_TEST_APP names one, e.g. to try a packaging change before committing it).
APP = Path(os.environ.get("M4FUSE_DEPLOY_TEST_APP", str(REPO)))
BIN = Path(sys.executable).parent
CONNECTION = "hospitals"
SITES = ("site0", "site1")  # the synthesiser's site names for 2 sites
#: Everything small (engine_fixtures.TINY_OVERRIDES) with 4 cases a site (2 train, 1 val, 1
#: test), 1 round of 1 epoch, no MLflow (tracking is tested elsewhere).
OVERRIDES = " ".join([
    *TINY_OVERRIDES, "run_name=deploy-test", "data.cases_per_site=4", "data.val_fraction=0.25",
    "data.test_fraction=0.25", "data.workers=1", "fl.rounds=1", "fl.local_epochs=1",
    "train.amp=false", "tracking.enabled=false", "fl.strategy=personal",
])
RUN_TIMEOUT_S = 240


def flwr_env(home: Path) -> dict[str, str]:
    """The environment every Flower process of the project gets (docs/deployment.md)."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children() -> dict[int, list[int]]:
    """Parent PID -> child PIDs of every process visible in /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (collected before anything is killed: once a parent dies
    its children are re-parented and can no longer be found this way)."""
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@dataclass
class Proc:
    """A started process, its log file, and how to stop it with everything it started."""

    name: str
    popen: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process, its descendants and their process groups; SIGKILL after
        ``grace_s`` whatever is still alive."""
        pids = [self.popen.pid, *descendants(self.popen.pid)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                for kill in (os.killpg, os.kill):
                    try:
                        kill(pid, sig)
                    except (ProcessLookupError, PermissionError):
                        pass
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and any(_alive(p) for p in pids):
                time.sleep(0.2)
                try:
                    self.popen.wait(timeout=0)  # reap our own child
                except subprocess.TimeoutExpired:
                    pass
            if not any(_alive(p) for p in pids):
                return


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class Federation:
    """One SuperLink and its SuperNodes on loopback, with the files they use."""

    root: Path
    port: int
    certs: object
    procs: list[Proc] = field(default_factory=list)

    @property
    def cli_home(self) -> Path:
        return self.root / "coordinator-flwr"

    def start(self, name: str, argv: list[str], home: Path) -> Proc:
        log = self.root / f"{name}.log"
        handle = open(log, "wb")
        popen = subprocess.Popen(
            argv, cwd=self.root, env=flwr_env(home), stdout=handle, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        handle.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI as the coordinator does (its own FLWR_HOME)."""
        return subprocess.run(
            [str(BIN / "flwr"), *args], cwd=self.root, env=flwr_env(self.cli_home),
            capture_output=True, text=True, timeout=timeout, check=False,
        )

    def logs(self) -> str:
        return "\n".join(f"----- {p.name} -----\n{p.text()[-4000:]}" for p in self.procs)


def _wait(what: str, ready, timeout: float, fed: Federation) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{fed.logs()}")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def start_supernode(fed: Federation, index: int, key: Path, port: int, tag: str = "") -> Proc:
    """A hospital's SuperNode (docs/deployment.md, 'Each hospital'); ``tag``
    (default none) is appended to the process and log name, e.g. for a restarted one."""
    site = SITES[index]
    hospital = fed.root / f"hospital-{index + 1}"
    node_config = (
        f'site="{site}" site-index={index} data-root="{hospital / "data"}" '
        f'cache-dir="{hospital / "cache"}" state-dir="{hospital / "state"}" device="auto"'
    )
    return fed.start(
        f"supernode-{index + 1}{tag}",
        [
            str(BIN / "flower-supernode"),
            "--superlink", f"localhost:{fed.port}",
            "--root-certificates", str(fed.certs.ca_cert),
            "--auth-supernode-private-key", str(key),
            "--port", str(port),
            "--node-config", node_config,
        ],
        home=hospital / "flwr",
    )


def online_count(fed: Federation) -> int:
    """How many SuperNodes the SuperLink lists as online (-1 when the CLI call fails)."""
    done = fed.flwr("supernode", "ls", CONNECTION, "--format", "json")
    if done.returncode != 0:
        return -1
    nodes = json.loads(done.stdout).get("nodes", [])
    return sum(n.get("status") == "online" for n in nodes)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """SuperLink with TLS and SuperNode authentication, two registered SuperNodes online."""
    root = tmp_path_factory.mktemp("deploy")
    certs = make_certificates(root / "certs", ["localhost"], ["hospital-1", "hospital-2"])
    fed = Federation(root=root, port=free_port(), certs=certs)
    try:
        fed.start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--ssl-ca-certfile", str(certs.ca_cert),
                "--ssl-certfile", str(certs.server_cert),
                "--ssl-keyfile", str(certs.server_key),
                "--enable-supernode-auth",
                "--host", "127.0.0.1",
                "--port", str(fed.port),
                "--database", str(root / "superlink.db"),
            ],
            home=root / "superlink-flwr",
        )
        _wait("the SuperLink port", lambda: _port_open(fed.port), 60, fed)
        fed.cli_home.mkdir()
        (fed.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "localhost:{fed.port}"\nroot-certificates = "{certs.ca_cert}"\n'
        )
        for name in ("hospital-1", "hospital-2"):
            done = fed.flwr("supernode", "register", str(certs.supernode_keys[name][1]),
                            CONNECTION)
            assert done.returncode == 0 and "registered successfully" in done.stdout, (
                done.stdout + done.stderr + fed.logs()
            )
        for index, name in enumerate(("hospital-1", "hospital-2")):
            start_supernode(fed, index, certs.supernode_keys[name][0], free_port())
        _wait("both SuperNodes online", lambda: online_count(fed) == 2, 90, fed)
        yield fed
    finally:
        for proc in reversed(fed.procs):
            proc.stop()
        leftover = [p.name for p in fed.procs if _alive(p.popen.pid)]
        assert not leftover, f"processes left running: {leftover}"


@pytest.mark.slow
def test_unregistered_supernode_is_refused(federation: Federation) -> None:
    stranger = make_certificates(federation.root / "stranger", ["localhost"], ["x"])
    proc = federation.start(
        "stranger",
        [
            str(BIN / "flower-supernode"),
            "--superlink", f"localhost:{federation.port}",
            "--root-certificates", str(federation.certs.ca_cert),
            "--auth-supernode-private-key", str(stranger.supernode_keys["x"][0]),
            "--port", str(free_port()),
            "--max-retries", "0",
        ],
        home=federation.root / "stranger-flwr",
    )
    assert proc.popen.wait(timeout=60) != 0
    assert "Failed to activate SuperNode" in proc.text(), proc.text()


def submit(fed: Federation, overrides: str) -> tuple[dict, str, float]:
    """``flwr run`` this app with ``overrides`` as the coordinator does, streaming its log to the
    end; returns the run's ``flwr list`` entry, the CLI's output and the seconds it took."""
    started = time.monotonic()
    done = fed.flwr(
        "run", str(APP), CONNECTION, "--run-config", f"overrides='{overrides}'", "--stream",
        timeout=RUN_TIMEOUT_S,
    )
    seconds = time.monotonic() - started
    out = done.stdout + done.stderr
    match = re.search(r"Successfully started run (\d+)", out)
    assert match, out + fed.logs()
    listed = fed.flwr("list", CONNECTION, "--run-id", match.group(1), "--format", "json")
    return json.loads(listed.stdout)["runs"][0], out, seconds


def site_state(fed: Federation, index: int, server_round: int) -> tuple[Path, dict]:
    """The one ``site-state-r<round>.pt`` in hospital ``index``'s state folder and its content."""
    files = list((fed.root / f"hospital-{index + 1}" / "state").rglob(
        f"site-state-r{server_round}.pt"))
    assert len(files) == 1, f"hospital-{index + 1}, round {server_round}: {files}"
    return files[0], torch.load(files[0], weights_only=True)


@dataclass
class FirstRun:
    """The 1-round run every later test starts from."""

    coordinator_root: Path
    overrides: str
    history: list[dict]


def test_a_bad_setting_fails_the_run_in_one_line(federation: Federation) -> None:
    """A misspelt key through ``flwr run``: Flower's run status is failed, the stream's last
    line names the key and the fix, and no traceback is shown (docs/bad-input.md)."""
    started = time.monotonic()
    done = federation.flwr("run", str(APP), CONNECTION, "--run-config",
                           f"overrides='fl.rouns=2 root={federation.root / 'bad'}'", "--stream",
                           timeout=RUN_TIMEOUT_S)
    seconds = time.monotonic() - started
    run_id = re.search(r"Successfully started run (\d+)", done.stdout).group(1)
    listed = federation.flwr("list", CONNECTION, "--run-id", run_id, "--format", "json")
    run = json.loads(listed.stdout)["runs"][0]
    assert run["status"] == "finished:failed", f"{run}\n{done.stdout}"
    stream = [line for line in done.stdout.splitlines() if line.strip()]  # the run's log
    assert stream[-1].startswith("m4fuse: error: fl.rouns=2:"), done.stdout
    assert "did you mean fl.rounds?" in stream[-1]
    assert "Traceback" not in done.stdout + done.stderr and "fl.rouns" in run["status-details"]
    assert not (federation.root / "bad").exists()  # refused before anything was written
    assert seconds < 120  # no waiting


@pytest.fixture(scope="module")
def first_run(federation: Federation) -> FirstRun:
    """One round of the app on the federation, checked to have finished."""
    coordinator_root = federation.root / "coordinator"
    overrides = f"{OVERRIDES} root={coordinator_root}"
    run, out, seconds = submit(federation, overrides)
    assert run["status"] == "finished:completed", f"{run}\n{out}\n{federation.logs()}"
    print(f"flwr run took {seconds:.1f} s; traffic {run['network-traffic']}")
    history = json.loads((coordinator_root / "runs" / "deploy-test" / "history.json").read_text())
    return FirstRun(coordinator_root, overrides, history)


@pytest.mark.slow
def test_run_finishes_and_each_site_keeps_its_expert(federation: Federation,
                                                      first_run: FirstRun) -> None:
    # both sites reported: the coordinator's round history holds validation from both indices
    assert sorted(first_run.history[-1]["val_by_site"]) == ["0", "1"], first_run.history[-1]

    # each hospital's state dir holds its own expert, and only expert weights
    experts = []
    for index, site in enumerate(SITES):
        _, kept = site_state(federation, index, 1)
        assert kept["site"] == site and kept["round"] == 1
        assert kept["expert"] and all("site_experts.*." in k for k in kept["expert"]), list(kept["expert"])[:3]
        assert kept["shared"] is None
        experts.append(kept["expert"])
    key = next(iter(experts[0]))
    assert not torch.equal(experts[0][key], experts[1][key])  # trained apart


def _smallest(tensors: dict[str, torch.Tensor]) -> str:
    """The key of the tensor with the fewest elements (first by name on ties)."""
    return min(tensors, key=lambda k: (tensors[k].numel(), k))


#: Added to one shared tensor in the server checkpoint and one expert tensor in each hospital's
#: round-1 state while everything is stopped. A round of training moves a weight by a few lr
#: (AdamW, peak lr 0.008), far less than MARK / 2, so after round 2 the marked tensors show
#: whether the round started from those files (about MARK away from round 1's values) or from
#: fresh weights (about 0 away).
MARK = 1.0


@pytest.mark.slow
def test_restarted_hospitals_resume_the_run(federation: Federation, first_run: FirstRun) -> None:
    """On loopback: after round 1, stop both SuperNodes, start them again with the same
    node config and state folders, and resume the run (same run_name and settings,
    ``fl.rounds=2 fl.resume=true``): round 2 starts from the checkpoint's shared weights and
    from each hospital's own expert, and round 1 is not repeated."""
    rdir = first_run.coordinator_root / "runs" / "deploy-test"
    ckpt_path = rdir / "server_checkpoint.pt"
    assert server_ckpt.load(ckpt_path).server_round == 1

    # a restarted hospital: stop each SuperNode (with its ClientApp processes) by PID
    for index, _name in enumerate(("hospital-1", "hospital-2")):
        old = next(p for p in federation.procs if p.name == f"supernode-{index + 1}")
        old.stop()
        assert not _alive(old.popen.pid), old.name
        federation.procs.remove(old)
    _wait("both SuperNodes offline", lambda: online_count(federation) == 0, 90, federation)

    # mark the shared weights the server resumes from and each hospital's kept expert
    raw = torch.load(ckpt_path, weights_only=True)
    shared_key = _smallest(raw["arrays"])
    marked_shared = raw["arrays"][shared_key] + MARK
    raw["arrays"][shared_key] = marked_shared
    torch.save(raw, ckpt_path)
    r1_experts, marked_experts = [], []
    for index in range(len(SITES)):
        path, kept = site_state(federation, index, 1)
        r1_experts.append({k: v.clone() for k, v in kept["expert"].items()})
        key = _smallest(kept["expert"])
        kept["expert"][key] = kept["expert"][key] + MARK
        marked_experts.append((key, kept["expert"][key]))
        torch.save(kept, path)

    for index, name in enumerate(("hospital-1", "hospital-2")):
        start_supernode(federation, index, federation.certs.supernode_keys[name][0], free_port(),
                        tag="-restarted")
    _wait("both restarted SuperNodes online", lambda: online_count(federation) == 2, 90,
          federation)

    run, out, seconds = submit(federation,
                               f"{first_run.overrides} fl.rounds=2 fl.resume=true")
    assert run["status"] == "finished:completed", f"{run}\n{out}\n{federation.logs()}"
    print(f"resumed flwr run took {seconds:.1f} s")

    # the server continued at round 2 and kept round 1 as the first run left it
    summary = json.loads((rdir / "summary.json").read_text())
    assert summary["first_round"] == 2, summary
    history = json.loads((rdir / "history.json").read_text())
    assert [e["round"] for e in history] == [1, 2], [e["round"] for e in history]
    assert history[0] == first_run.history[0]
    assert sorted(history[1]["val_by_site"]) == ["0", "1"], history[1]
    resumed = server_ckpt.load(ckpt_path)
    assert resumed.server_round == 2
    # round 2 was trained from the checkpoint's (marked) shared weights, not fresh ones
    moved = torch.from_numpy(resumed.arrays[shared_key]) - marked_shared
    assert moved.abs().max() < MARK / 2, (shared_key, moved)

    for index, site in enumerate(SITES):
        _, kept = site_state(federation, index, 2)
        assert kept["site"] == site and kept["round"] == 2 and kept["shared"] is None
        assert kept["expert"].keys() == r1_experts[index].keys()
        # trained further: round 2's expert is not round 1's
        assert any(not torch.equal(kept["expert"][k], v) for k, v in r1_experts[index].items())
        # continuity: the restarted hospital started round 2 from its own kept (marked) expert
        key, marked = marked_experts[index]
        moved = kept["expert"][key] - marked
        assert moved.abs().max() < MARK / 2, (site, key, moved)


def test_commands_are_the_documented_ones() -> None:
    """Every executable and flag this test uses appears in the deployment walk-through."""
    doc = (REPO / "docs" / "deployment.md").read_text()
    for needed in (
        "flower-superlink", "--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile",
        "--enable-supernode-auth", "--database", "flwr supernode register",
        "flower-supernode", "--root-certificates", "--auth-supernode-private-key",
        "--node-config", "site-index=", "data-root=", "cache-dir=", "state-dir=", "device=",
        "flwr run", "--run-config", "--stream", "root-certificates =", "m4fuse certs",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1", "flwr list",
    ):
        assert needed in doc, f"docs/deployment.md does not mention {needed!r}"
