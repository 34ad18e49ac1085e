#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its pinned dependencies.
# torch is installed first so that pip keeps the build that fits this host: on a CPU-only
# machine the CPU wheel, on a GPU host whatever `TORCH_SPEC` names (default torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade "pip>=24" 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q -e ".[test,bench]" 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import torch, flwr, monai; print('ready: torch', torch.__version__, '| flwr', flwr.__version__, '| monai', monai.__version__)"
