#!/usr/bin/env bash
# Run the test suite on the real kernel (as root; some tests switch to other users).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -ra "$@"
