# Sourced by setup.sh and bench-setup.sh: install_missing WHO PKG... installs, as root on
# Debian, whichever PKG is not installed yet (nothing, not even apt-get update, when all
# are); APT_OPTIONS adds options to apt-get install.
install_missing() {
    local who=$1 pkg
    shift
    local need=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
    done
    if [ ${#need[@]} -gt 0 ]; then
        echo "$who: installing ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # shellcheck disable=SC2086  # (options, split on purpose)
        apt-get install -y -qq ${APT_OPTIONS:-} "${need[@]}" >/dev/null
    fi
}
