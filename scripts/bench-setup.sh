#!/usr/bin/env bash
# Idempotent: installs the peers that bench/peers.py compares containerfs with (bubblewrap,
# lxc; unshare comes with util-linux), as root on Debian 12. Fast when already done.
# A fresh CI machine has none of them; scripts/setup.sh (the project's own set-up) does not
# install them, as nothing but this benchmark needs them.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
    echo "bench-setup: run as root" >&2
    exit 1
fi
. "$(dirname "${BASH_SOURCE[0]}")/apt-missing.sh"
APT_OPTIONS=--no-install-recommends install_missing bench-setup bubblewrap lxc util-linux
