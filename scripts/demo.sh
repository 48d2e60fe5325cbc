#!/usr/bin/env bash
# Start the service, then make a container, list it, run something in it and watch it die.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export CONTAINERFS_SOCKET=${CONTAINERFS_SOCKET:-/run/containerfs-demo.sock}
export CONTAINERFS_VIEW=/run/containerfs-demo-view
.venv/bin/containerfs serve --socket "$CONTAINERFS_SOCKET" --runtime-dir /run/containerfs-demo.d \
    --cgroup containerfs-demo --mount "$CONTAINERFS_VIEW" &
service=$!
# The keeper outlives the service on purpose (restarts keep containers); the demo ends both.
trap 'kill -TERM $service 2>/dev/null; wait $service 2>/dev/null || true
      kill "$(cat /run/containerfs-demo.d/keeper.pid 2>/dev/null)" 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S "$CONTAINERFS_SOCKET" ] && break; sleep 0.05; done
.venv/bin/python examples/demo.py
