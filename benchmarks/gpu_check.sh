#!/bin/sh
# GPU readiness check (benchmarks/gpu_check.py): run from anywhere on a machine with one
# CUDA GPU; PYTHON selects the interpreter (default: python). Exit 2 means no GPU was found.
cd "$(dirname "$0")/.." || exit 1
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python}" -m benchmarks.gpu_check "$@"
