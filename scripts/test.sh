#!/usr/bin/env bash
# The whole test suite (tiny volumes and widths), the slow simulation and deployment tests
# included; extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` for the
# quick set. Needs the `test` extra (scripts/setup.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_TELEMETRY_ENABLED=0
exec .venv/bin/python -m pytest -q "$@"
