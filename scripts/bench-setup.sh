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
need=()
for pkg in bubblewrap lxc util-linux; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "bench-setup: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
