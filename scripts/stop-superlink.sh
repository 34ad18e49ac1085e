#!/usr/bin/env bash
# Stop the local SuperLink that `flwr run .` started for this checkout, with the processes it
# started (its SuperExec and a simulation still running in it). Flower keeps the SuperLink
# running between runs and reuses it; stop it after changing the venv or .flwr/config.toml,
# after interrupting a run (Ctrl-C stops `flwr run`, not the simulation), or to free ports
# 39091-39093. Matches only a SuperLink whose files are in this checkout's .flwr/ (FLWR_HOME)
# and stops it by process group (the SuperLink and its SuperExec each start their own).
set -euo pipefail
cd "$(dirname "$0")/.."
home="${FLWR_HOME:-$PWD/.flwr}"
pids=$(pgrep -f "flower-superlink.*--log-file $home/local-superlink/" || true)
if [ -z "$pids" ]; then
    echo "no local SuperLink of $home is running"
    exit 0
fi
for pid in $pids; do
    groups=$(ps -o pgid= -p "$pid" $(pgrep -P "$pid" | sed 's/^/-p /') | sort -u)
    for group in $groups; do
        kill -- "-$group" 2>/dev/null || true
    done
    echo "stopped local SuperLink $pid and its process groups $(echo $groups) ($home)"
done
