#!/usr/bin/env bash
# The test suite (tiny volumes and widths; a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_TELEMETRY_ENABLED=0
exec .venv/bin/python -m pytest -q "$@"
