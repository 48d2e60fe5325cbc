"""Confining a process just forked into a container: its capabilities limited to a mask,
no_new_privs, a seccomp filter, in runc's order (libcontainer/standard_init_linux.go and
init_linux.go's finalizeNamespace). The order is data: the table _STEPS, each step with why
it comes where it does. Everything is checked (and a profile compiled) before the first
change; a failure afterwards names its step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import caps as _caps
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
