"""The container record: what the service knows of one container, and how a record is saved."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any

import trio

from syscalls.constants import CONTAINER_NEW_EMPTY_FS_NS
from syscalls.fd import Fd
from syscalls.nstypes import FLAG_NAMESPACES

from .containerns import ContainerNs
from .states import State


@dataclass(eq=False)
class Container:
    id: int
    name: bytes
    flags: int
    owner: int
    group: int
    parent: int
    pipe: tuple[int, int]
    wfd: Fd  # the service's write end of the handle pipe; closing it is the death notice
    # Every namespace the container's processes enter, by type (and "root"): held by the
    # service's NsStore (nsfs binds), lent as fds on demand.
    ns: ContainerNs
    new_ns: frozenset[str]
    state: State = State.CREATED
    handle_open: bool = True
    init_pid: int | None = None
    init_pidfd: Fd = field(default_factory=Fd)
    exit_status: int | None = None
    kill_pending: bool = False
    death_seen: trio.Event | None = None  # set once init's exit has been dealt with
    # Placeholders of procs mounted before init, which init replaces with procs of its PID
    # namespace: {"path" (from the root), "mnt_id" (the placeholder's), "params", "attrs"}.
    proc_paths: list[dict[str, Any]] = field(default_factory=list)
    # Placeholder mounts being attached: init's fork waits for them (it must see them all).
    proc_mounts: int = 0
    proc_mounts_idle: trio.Event = field(default_factory=trio.Event)
    started: trio.Event = field(default_factory=trio.Event)
    # Confinement of every process forked in (contract section 11), set before init: the
    # capability mask (None: unchanged) and the seccomp profile as checked JSON (None: none).
    caps: int | None = None
    seccomp: str | None = None

    @property
    def dead(self) -> bool:
        return self.state == State.DEAD

    def check_alive(self) -> None:
        """ECANCELED once the container is dead (the kernel's answer for a dead object)."""
        if self.state == State.DEAD:
            raise OSError(errno.ECANCELED, f"container {self.id} is dead")

    def row(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "flags": self.flags, "owner": self.owner,
                "grp": self.group, "parent": self.parent, "state": self.state.value,
                "pipe_dev": self.pipe[0], "pipe_ino": self.pipe[1], "init_pid": self.init_pid,
                "exit_status": self.exit_status, "caps": self.caps, "seccomp": self.seccomp}


def requested_namespaces(flags: int) -> frozenset[str]:
    """The namespace types a container with `flags` has of its own (an empty-fs container gets
    its mount namespace only when a root is set)."""
    new = {FLAG_NAMESPACES[bit] for bit in FLAG_NAMESPACES if flags & bit}
    if flags & CONTAINER_NEW_EMPTY_FS_NS:
        new.discard("mnt")
    return frozenset(new)
