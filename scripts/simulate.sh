#!/usr/bin/env bash
# The main job: `flwr run .` on the default config (4 synthetic sites, one SuperNode each),
# ending in the per-site results table. Extra arguments go to `flwr run`, e.g.
#   scripts/simulate.sh --run-config "overrides='fl.strategy=fedavg fl.rounds=5'"
# Flower's local connection starts a detached SuperLink; it is stopped (by PID) on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_TELEMETRY_ENABLED=0
# Flower state and the project's outputs (data, runs, mlflow.db) stay inside the checkout.
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr}"
export M4FUSE_HOME="${M4FUSE_HOME:-$PWD}"
export PATH="$PWD/.venv/bin:$PATH"
stop_superlink() {
    local pids
    pids=$(pgrep -f "flower-superlink.*$FLWR_HOME" || true)
    if [ -n "$pids" ]; then kill $pids 2>/dev/null || true; fi
}
trap stop_superlink EXIT
stop_superlink  # a SuperLink left by an earlier run would keep its old environment
flwr run . --federation-config "num-supernodes=4 client-resources-num-cpus=1" --stream "$@"
