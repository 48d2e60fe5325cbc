"""Root's plan of its first fork: what container_create's reply said that fork will enter,
kept (at most one) so the fork can enter it while the Fork request is on its way."""

from __future__ import annotations

import os
from typing import NamedTuple

from . import linux, replies
from .client import Connection, give_back


class Plan(NamedTuple):
    reply: replies.ForkGrant  # the Fork reply the service expects to give
    fds: list[int]
    ids: list[tuple[int, int]]  # what each fd was, so a reused fd number is never taken
    handle: tuple[int, int]
    pid: int  # the process that created the container
    conn: Connection  # the create's: the fork goes on it (no new connection to accept)


class Plans:
    """What root's last container_create said its first fork will enter (at most one plan,
    so a caller that never forks holds a few fds, not a few per container)."""

    def __init__(self) -> None:
        self.plan: Plan | None = None
        os.register_at_fork(after_in_child=self.drop)

    def keep(self, handle: int, reply: replies.ForkGrant | None, fds: list[int],
             conn: Connection) -> None:
        self.drop()
        if reply is None or reply.role != "init" or len(reply.fds) != len(fds):
            close_fds(fds)
            give_back(conn)
            return
        st = os.fstat(handle)
        self.plan = Plan(reply, fds, [file_id(fd) for fd in fds], (st.st_dev, st.st_ino),
                          os.getpid(), conn)

    def take(self, handle: int) -> Plan | None:
        """The plan for `handle`, if this process made it and its fds are still its own."""
        plan = self.plan
        if plan is None:
            return None
        st = os.fstat(handle)
        if (st.st_dev, st.st_ino) != plan.handle:
            return None  # kept for its own container's first fork
        if plan.pid != os.getpid() or not still(plan) or (
                "ns:user" in plan.reply.fds and not linux.same_file(
                    plan.fds[plan.reply.fds.index("ns:user")], "/proc/self/ns/user")):
            # Not this process's, its fds reused by the caller, or the caller moved to
            # another user namespace since.
            self.drop()
            return None
        self.plan = None
        return plan

    def drop(self) -> None:
        plan, self.plan = self.plan, None
        if plan is None:
            return
        for fd, fid in zip(plan.fds, plan.ids):
            try:
                if file_id(fd) == fid:  # never an fd the caller reused
                    os.close(fd)
            except OSError:
                pass
        give_back(plan.conn)  # unused, and kept only by the process that made it


def file_id(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def still(plan: Plan) -> bool:
    """Whether the plan's fds are still the files it was given (the caller may have closed
    them and opened others under the same numbers)."""
    try:
        return all(file_id(fd) == fid for fd, fid in zip(plan.fds, plan.ids))
    except OSError:
        return False


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
