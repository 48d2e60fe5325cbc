"""The service's side of confinement: the defaults (`DEFAULT_CAPS`, `DEFAULT_SECCOMP`) and
the checks made when a container's capabilities or profile are set, so that a fault is
reported to the caller then, not in a forked child.

DEFAULT_SECCOMP is read from default_seccomp.json beside this module: a profile in Docker's
own format, so it can be compared with Docker's line by line and copied as a starting point
for `containerfs run --seccomp FILE`.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from syscalls import caps as _caps
from syscalls.seccomp import SeccompFilter, compile_profile
from syscalls.seccomp_profile import parse_profile

# Podman's default capabilities (containers.conf default_capabilities).
DEFAULT_CAP_NAMES = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
                     "CAP_NET_BIND_SERVICE", "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP",
                     "CAP_SETUID", "CAP_SYS_CHROOT")
DEFAULT_CAPS: int = sum(1 << _caps.CAPABILITIES[name] for name in DEFAULT_CAP_NAMES)


def _default_seccomp() -> dict[str, Any]:
    text = resources.files("containerfs").joinpath("default_seccomp.json").read_text("utf-8")
    profile: dict[str, Any] = json.loads(text)
    return profile


# A dict, as container_set_seccomp takes it. Not to be changed in place: copy it
# (copy.deepcopy) to make a profile of your own.
DEFAULT_SECCOMP: dict[str, Any] = _default_seccomp()


def check_caps(mask: object) -> int:
    """`mask` if it is a capability mask for this kernel, else OSError(EINVAL)."""
    return _caps.check_mask(mask)


def check_profile(profile: object) -> str:
    """Check an OCI profile (dict, JSON text or bytes) and return it as compact JSON, the
    form to store and hand to forks. OSError(EINVAL) names the first fault: fields and
    values first, then what libseccomp refuses when compiling it. Blocking (a compile takes
    milliseconds): call from a worker thread."""
    parsed = parse_profile(profile)
    compile_profile(parsed)
    if isinstance(profile, (bytes, bytearray, memoryview)):
        profile = bytes(profile).decode("utf-8")
    if isinstance(profile, str):
        profile = json.loads(profile)
    return json.dumps(profile, separators=(",", ":"), sort_keys=True)


def compile_for(profile_json: str, caps: int | None) -> SeccompFilter:
    """The filter a process forked into a container runs under: its stored profile compiled
    for its capability mask (Docker-style `includes.caps` rules depend on it)."""
    return compile_profile(profile_json, caps=caps)
