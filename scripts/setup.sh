#!/usr/bin/env bash
# Create .venv (if missing), install the project with its pinned dependencies, and set up
# Flower so that plain `flwr run . --stream` runs the local simulation of this checkout.
#
# torch is installed first so that pip keeps the build that fits this host: on a CPU-only
# machine the CPU wheel, on a GPU host whatever `TORCH_SPEC` names (default torch==2.13.0).
#
# Flower settings (written by the last step, see docs/simulation.md):
#  - .venv/lib/python*/site-packages/m4fuse_flower.pth: default environment for every
#    process of this venv (`flwr`, the local SuperLink it starts, the ServerApp/ClientApp
#    processes): FLWR_HOME=<checkout>/.flwr, M4FUSE_HOME=<checkout>,
#    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 (the app runs on this venv's packages
#    instead of a per-run `uv sync` environment), FLWR_DISABLE_UPDATE_CHECK=1,
#    FLWR_TELEMETRY_ENABLED=0. Each is a default: a value set in the shell wins. It also puts
#    .venv/bin on PATH (Flower starts `flower-superlink` by name).
#  - .flwr/config.toml: the `local` connection with one SuperNode per site of the main job
#    (M4FUSE_SITES, default: the sites of the app's own run config, 14), 1 CPU each and a GPU
#    share per site (M4FUSE_GPUS_PER_SITE; default 1/sites on a host where torch sees a GPU,
#    else 0).
set -euo pipefail
cd "$(dirname "$0")/.."
CHECKOUT=$PWD
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is needed (flwr 1.42), got " + sys.version.split()[0] + ": set PYTHON=python3.11 and remove .venv")'
# pip's output without its harmless "WARNING: Location ... is ignored" lines (an index folder
# this host lacks); pip's exit status is kept (pipefail), so a failed install stops here.
pip_install() {
    .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v '^WARNING: Location' || :; }
}
if [ -z "${M4FUSE_SKIP_INSTALL:-}" ]; then
    pip_install --upgrade "pip>=24"
    pip_install "${TORCH_SPEC:-torch==2.13.0}"
    # the test extra: pytest, ruff and the tests' oracles (scripts/test.sh, .ci/run)
    pip_install -e ".[test,bench]"
    .venv/bin/python -m pip check
fi

# ---- Flower: the environment of this venv's processes
SITE_PACKAGES=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
.venv/bin/python - "$SITE_PACKAGES/m4fuse_flower.pth" "$CHECKOUT" <<'PY'
import sys
target, checkout = sys.argv[1], sys.argv[2]
defaults = {
    "FLWR_HOME": f"{checkout}/.flwr",
    "M4FUSE_HOME": checkout,
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
}
# A .pth line that starts with "import" is executed at interpreter start-up (site module).
line = "import os, sys; " + "; ".join(f"os.environ.setdefault({k!r}, {v!r})" for k, v in defaults.items())
# `flwr run` starts `flower-superlink` by name: put this venv's bin/ on PATH, so that
# `.venv/bin/flwr run .` works without activating the venv.
line += ("; b = os.path.join(sys.prefix, 'bin'); p = os.environ.get('PATH', ''); "
         "os.environ['PATH'] = p if b in p.split(os.pathsep) else b + os.pathsep + p")
with open(target, "w") as handle:
    handle.write("# written by scripts/setup.sh: Flower/M4Fuse defaults of this checkout's venv\n")
    handle.write(line + "\n")
PY

# ---- Flower: the local connection (one SuperNode per site, 1 CPU and a GPU share each)
# In .flwr/config.toml, sent with every `flwr run`. Flower 1.42 calls these `options.` fields
# deprecated (one warning line per run) and points to `flwr federation simulation-config`,
# but that setting lives only in the running SuperLink's memory (its NoOpFederationManager)
# and is lost when the SuperLink restarts, silently giving 2 SuperNodes again.
# One per site of the federation plain `flwr run .` trains (the app's run config in
# pyproject.toml, composed: m4fuse.run.settings.app_sites).
SITES=${M4FUSE_SITES:-$(.venv/bin/python -c "
import sys
from m4fuse.run.settings import app_sites
try:
    print(app_sites('.'))
except ValueError as err:  # one line, no traceback
    sys.exit(f'setup.sh: {err}')
")}
GPUS=${M4FUSE_GPUS_PER_SITE:-$(.venv/bin/python -c "import torch; n = torch.cuda.device_count(); print(round(min(1.0, n / $SITES), 4) if n else 0.0)")}
mkdir -p .flwr
CONFIG=.flwr/config.toml
MARKER="# written by scripts/setup.sh"
if [ -f "$CONFIG" ] && ! head -n 1 "$CONFIG" | grep -q "^$MARKER"; then
    echo "kept $CONFIG (not written by setup.sh); its local connection needs options.num-supernodes = $SITES"
else
    cat > "$CONFIG" <<TOML
$MARKER (M4FUSE_SITES=$SITES, M4FUSE_GPUS_PER_SITE=$GPUS); rerun it to change them.
[superlink]
default = "local"

[superlink.local]
address = ":local:"
options.num-supernodes = $SITES
options.backend.client-resources.num-cpus = 1
options.backend.client-resources.num-gpus = $GPUS
TOML
fi
.venv/bin/python -c "import os, torch, flwr, monai; print('ready: torch', torch.__version__, '| flwr', flwr.__version__, '| monai', monai.__version__, '| FLWR_HOME', os.environ.get('FLWR_HOME'))"
echo "Flower local simulation: $SITES SuperNodes, 1 CPU and $GPUS GPU each"
