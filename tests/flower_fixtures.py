"""Shared helpers of the tests that drive the Flower apps (test_client_integration,
test_federated, test_leak, test_server_faults): the Flower environment for tests, the tiny
federated config, one client train round called directly, the project's ClientApp behind a
client mod, and a 2-site in-process simulation. The Flower task identity fixture these tests
need is ``flower_task_identity`` in conftest.py.

Importing this module sets (unless already set) the Flower environment variables that keep a
test run offline and quiet: no runtime dependency installation, no update check, no telemetry.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from collections.abc import Callable  # noqa: E402

from engine_fixtures import TINY_OVERRIDES  # noqa: E402
from flwr.app import (  # noqa: E402
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.clientapp import ClientApp  # noqa: E402

# The tiny federation (engine_fixtures.TINY_OVERRIDES), strategy personal. Modules add their
# own keys.
TINY_FL = [
    *TINY_OVERRIDES,
    # the paper's scheme (experts only), whatever the default strategy is
    "fl.strategy=personal",
]


def client_train_round(partition: int, arrays: ArrayRecord, state: RecordDict, rnd: int,
                       run_dir: str, identity: str | None = None) -> Message:
    """Call the project's ClientApp train handler once, outside Flower, behind the project's
    client mods (fault injection) as the ClientApp calls it, as site ``partition`` (of 2) in
    round ``rnd`` with one local epoch; ``state`` is the site's Context state, ``identity``
    (default none sent) the server's run identity."""
    from client.app import MODS, train

    def behind(mod: Callable, call_next: Callable) -> Callable[[Message, Context], Message]:
        return lambda m, c: mod(m, c, call_next)

    handler: Callable[[Message, Context], Message] = train
    for mod in reversed(MODS):
        handler = behind(mod, handler)

    config = {"server-round": rnd, "local-epochs": 1, "run-dir": run_dir}
    if identity is not None:
        config["run-identity"] = identity
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(config)})
    msg = Message(content=content, dst_node_id=partition + 1, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=partition + 1,
                      node_config={"partition-id": partition, "num-partitions": 2},
                      state=state, run_config={})
    return handler(msg, context)


def project_client_app_with(mod: Callable[[Message, Context, Callable], Message]) -> ClientApp:
    """The project's train/evaluate handlers in a ClientApp behind the client mod ``mod``
    (outermost) and the project's own mods (fault injection)."""
    from client import app as project

    app = ClientApp(mods=[mod, *project.MODS])
    app.train()(project.train)
    app.evaluate()(project.evaluate)
    return app


def simulate_two_sites(client_app: ClientApp | None = None) -> None:
    """Run the project's ServerApp with ``client_app`` (default: the project's ClientApp) on 2
    SuperNodes in Flower's in-process simulation, one CPU and no GPU each. The run config comes
    from ``settings.OVERRIDES_ENV``, which the caller sets."""
    from flwr.simulation import run_simulation

    from client.app import app as project_client
    from server.app import app as server_app

    run_simulation(server_app, client_app or project_client, num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})


def simulate_recorded(client_app: ClientApp, args: list[str], record_env: str, folder,
                      monkeypatch) -> tuple[object, object, list[dict]]:
    """Run :func:`simulate_two_sites` with ``client_app`` (a project ClientApp behind a client
    mod that writes one JSON file per reply into ``$<record_env>``) on the Hydra overrides
    ``args``; checks that the run finished and that the ServerApp wrote no ``model.ckpt``
    (it never reads the sites' folders), then assembles it as the simulation driver does
    (:func:`m4fuse.io.assembly.assemble_run`), and returns ``(composed config, run folder, the
    recorded entries)``."""
    import json

    from m4fuse.io.assembly import assemble_run
    from m4fuse.run import settings, workspace

    folder.mkdir()
    monkeypatch.setenv(settings.OVERRIDES_ENV, " ".join(args))
    monkeypatch.setenv(record_env, str(folder))
    simulate_two_sites(client_app)
    cfg = settings.compose("config", args)
    rdir = workspace.run_dir(cfg)
    assert (rdir / "summary.json").is_file(), "the run did not finish"
    assert not (rdir / "model.ckpt").exists(), "the ServerApp wrote the sites' final model"
    assemble_run(rdir)
    entries = [json.loads(p.read_text()) for p in folder.glob("*.json")]
    return cfg, rdir, entries

