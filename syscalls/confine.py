"""Confining a process just forked into a container: its capabilities limited to a mask,
no_new_privs, a seccomp filter, in runc's order (libcontainer/standard_init_linux.go and
init_linux.go's finalizeNamespace). The order is data: the table _STEPS, each step with why
it comes where it does. Everything is checked (and a profile compiled) before the first
change; a failure afterwards names its step.
"""

from __future__ import annotations

import base64
import errno
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

from . import caps as _caps
from . import protocol
from .client import call
from .handle import check_handle
from .replies import ForkGrant
from .nsexec import step
from .seccomp import SeccompFilter, compile_profile, load, set_no_new_privs


@dataclass(frozen=True)
class Confinement:
    """What to apply: a capability mask (None: leave capabilities alone) and a compiled
    filter (None: no filter, and no_new_privs left as it is)."""
    caps: int | None
    seccomp: SeccompFilter | None


def _no_new_privs(c: Confinement) -> None:
    if c.seccomp is not None:
        set_no_new_privs()


def _bounding(c: Confinement) -> None:
    if c.caps is not None:
        _caps.drop_bounding(c.caps)


def _sets(c: Confinement) -> None:
    if c.caps is not None:
        _caps.limit_sets(c.caps)


def _ambient(c: Confinement) -> None:
    if c.caps is not None:
        _caps.clear_ambient()


def _filter(c: Confinement) -> None:
    if c.seccomp is not None:
        load(c.seccomp)


_STEPS: tuple[tuple[str, Callable[[Confinement], None]], ...] = (
    # runc sets it first of these (before finalizeNamespace). It needs no capability, and
    # from here on nothing this process execs can gain privileges back (setuid, file caps).
    ("no_new_privs", _no_new_privs),
    # PR_CAPBSET_DROP needs CAP_SETPCAP in the effective set, which the next step may take
    # away: runc's ApplyBoundingSet comes before its capset for that reason.
    ("bounding set", _bounding),
    # One capset(2) for permitted, effective and inheritable: after it the process can never
    # raise a capability outside the mask again (execve included, bounded by step 2).
    ("permitted, effective and inheritable sets", _sets),
    # Ambient capabilities must lie in permitted and inheritable; the kernel has dropped the
    # rest already, and runc clears them then raises the configured ones (none, here).
    ("ambient set", _ambient),
    # Last, as runc does with no_new_privs: the steps above make calls (prctl, capset) that a
    # profile may refuse, and with no_new_privs set it needs no capability.
    ("seccomp filter", _filter),
)


def prepare(caps: int | None, profile: object | None) -> Confinement:
    """Check `caps` and compile `profile` (a SeccompFilter, an OCI profile as dict, JSON
    text or bytes, or None), without changing anything. OSError(EINVAL) names the fault."""
    mask = None if caps is None else _caps.check_mask(caps)
    if profile is None or isinstance(profile, SeccompFilter):
        return Confinement(mask, profile)
    return Confinement(mask, compile_profile(profile, caps=mask))


def apply_confinement(caps: int | None, profile: object | None) -> None:
    """Confine the calling process, which must be single-threaded (a forked child): limit
    its five capability sets to `caps`, set no_new_privs and install `profile`'s filter.

    All is checked before the first change (EINVAL for a bad mask or profile, nothing done);
    a later OSError's message begins with the step that failed, e.g. "confinement: bounding
    set: dropping CAP_SYS_ADMIN: Operation not permitted". Filters stack: one installed
    before (the request_key() trap) stays in force, and its listener keeps working as long
    as this filter allows request_key."""
    plan = prepare(caps, profile)
    for name, run in _STEPS:
        with step(f"confinement: {name}"):
            run(plan)


# ---- the calls (contract section 11) --------------------------------------------------------

def container_set_caps(cfd: int, caps: int) -> None:
    """Every process forked into the container behind `cfd` from now on has its bounding,
    permitted, effective, inheritable and ambient sets limited to `caps` (bit n: capability
    n). Before init starts only (EBUSY); EINVAL for bits above cap_last_cap."""
    check_handle(cfd)
    call(protocol.SetCaps(caps=_caps.check_mask(caps)), [cfd])


def container_set_seccomp(cfd: int, profile: object) -> None:
    """Every process forked into the container behind `cfd` from now on runs under the OCI
    seccomp `profile` (a dict, JSON text or bytes), with no_new_privs set. Before init starts
    only (EBUSY); EINVAL, naming the fault, for a malformed profile."""
    check_handle(cfd)
    if isinstance(profile, (bytes, bytearray, memoryview)):
        try:
            profile = bytes(profile).decode("utf-8")
        except UnicodeDecodeError:
            raise OSError(errno.EINVAL, "seccomp profile: not UTF-8 text") from None
    if isinstance(profile, str):
        text = profile
    elif isinstance(profile, dict):
        text = json.dumps(profile, separators=(",", ":"))
    else:
        raise OSError(errno.EINVAL, f"seccomp profile: a dict, JSON text or bytes, not "
                                    f"{type(profile).__name__}")
    call(protocol.SetSeccomp(profile=text), [cfd])


def confine_child(reply: ForkGrant) -> None:
    """In a process just forked into a container, last before the caller's code: the
    container's confinement, from the Fork grant. A process that cannot be confined never
    runs unconfined: it exits (127) saying which step failed."""
    if reply.caps is None and not reply.seccomp:
        return
    filt = (SeccompFilter(base64.b64decode(reply.seccomp), reply.seccomp_flags)
            if reply.seccomp else None)
    try:
        apply_confinement(reply.caps, filt)
    except OSError as e:
        os.write(2, f"fork_into_container: {e.strerror or e}\n".encode())
        os._exit(127)
