"""Resource control of a container (contract section 10): limits named and written as cgroup
v2 names them, usage with v2 meanings, freeze and thaw, whatever the host mounts.

The service checks and applies them (containerfs.limits, containerfs.resources); errors are
the contract's: EINVAL unknown name or malformed value, EOPNOTSUPP the controller is not on
this host, EPERM not the owner (or root) or from inside, ECANCELED the container is dead.
"""

from __future__ import annotations

from . import protocol, replies
from .client import call
from .handle import check_handle


def container_set_limit(cfd: int, name: str, value: str) -> None:
    """Limit the container behind `cfd`: `name` such as "cpu.max", `value` in v2 syntax
    ("20000 100000", "64M", "max"). Applies at once; set before the first fork, init is born
    under it."""
    check_handle(cfd)
    _check_str(name, "limit name")
    _check_str(value, "limit value")
    call(protocol.SetLimit(name=name, value=value), [cfd])


def container_get_limit(cfd: int, name: str) -> str:
    """The limit `name` of the container behind `cfd`, in v2 syntax."""
    check_handle(cfd)
    _check_str(name, "limit name")
    reply: replies.LimitValue = call(protocol.GetLimit(name=name), [cfd])[0]
    return reply.value


def container_stats(cfd: int) -> dict[str, int]:
    """Usage of the container behind `cfd` (and of those nested in it), with cgroup v2 names
    and meanings: at least cpu.usage_usec, memory.current, memory.peak,
    memory.events.oom_kill and pids.current where the host has the controller."""
    check_handle(cfd)
    reply: replies.Usage = call(protocol.Stats(), [cfd])[0]
    return dict(reply.stats)


def container_freeze(cfd: int) -> None:
    """Stop every process of the container; returns once all are frozen. A frozen container
    can still be killed."""
    check_handle(cfd)
    call(protocol.Freeze(frozen=1), [cfd])


def container_thaw(cfd: int) -> None:
    """Let every process of a frozen container run again."""
    check_handle(cfd)
    call(protocol.Freeze(frozen=0), [cfd])


def _check_str(value: object, what: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"the {what} is a str, not {type(value).__name__}")
