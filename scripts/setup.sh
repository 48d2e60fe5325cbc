#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine, as root: apt packages and a venv in .venv.
# Fast when already done: each step checks first. Sourced or run by demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "$(id -u)" != 0 ]; then
    echo "setup: run as root (containerfs creates namespaces and cgroups)" >&2
    exit 1
fi

. scripts/apt-missing.sh
install_missing setup python3 python3-venv keyutils util-linux fuse3 libfuse3-dev pkg-config gcc \
    python3-dev libseccomp2 podman runc busybox-static file

# Debian's interpreter, not a per-user one: tests run parts of the suite as unprivileged
# users, who must be able to execute the venv's python.
stamp=.venv/.installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    rm -rf .venv
    /usr/bin/python3 -m venv .venv
    # pip's notes about package-index locations that this machine lacks are noise; its errors
    # still fail the set-up (pipefail).
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]' 2>&1 \
        | { grep -v "^WARNING: Location" || true; }
    echo "$want" > "$stamp"
fi

# The compiled spawn path (cffi, API mode; rebuilt only when its C source changes).
.venv/bin/python -m syscalls.build_cspawn
