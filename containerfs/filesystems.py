"""Building a container from outside (contract sections 4, 5 and 8): its root, mounts into
it, proc placeholders before init, the namespaces a new superblock or socket belongs in, and
the root lent to *at() calls.

Mount work runs in a worker thread (root) or in a helper with the caller's credentials inside
the container's own user namespace, never with the service's privilege for someone else.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

import trio

from syscalls import linux
from syscalls.constants import CONTAINER_NEW_EMPTY_FS_NS, CONTAINER_NEW_PID_NS
from syscalls.replies import Mounted, NamespaceFds, PidList

from . import namespaces
from .policy import Policy
from .process import Peer
from .record import Container
from .registry import Registry
from .states import State
from .view.readers import PidView, pid_pairs


def proc_params(text: str) -> list[list[Any]]:
    """The fsconfig parameters of a pending proc, checked: [[cmd, key, value or None]...]
    with cmd FSCONFIG_SET_FLAG (no value) or FSCONFIG_SET_STRING (a value). EINVAL else."""
    try:
        params = json.loads(text)
    except ValueError:
        params = None
    ok = isinstance(params, list) and len(params) <= 64
    for item in params if ok else ():
        ok = (isinstance(item, list) and len(item) == 3 and type(item[0]) is int
              and isinstance(item[1], str)
              and 0 < len(item[1]) < 256 and "\0" not in item[1] and item[1] != "pidns"
              and ((item[0] == linux.FSCONFIG_SET_FLAG and item[2] is None)
                   or (item[0] == linux.FSCONFIG_SET_STRING and isinstance(item[2], str)
                       and len(item[2]) < 4096 and "\0" not in item[2])))
        if not ok:
            break
    if not ok:
        raise OSError(errno.EINVAL, "malformed proc parameters")
    return params  # type: ignore[no-any-return]


def proc_attrs(attrs: int) -> int:
    if attrs & ~linux.FSMOUNT_VALID_ATTRS:
        raise OSError(errno.EINVAL, f"unknown mount attributes {attrs:#x}")
    return attrs


def _userns_for(peer: Peer, c: Container) -> int | None:
    """The user namespace a helper must enter to act as `peer` (None: root in a thread): an
    fd of the caller's own, to close (it is used across an await, where a lent one may go)."""
    return c.ns.dup("user") if peer.uid != 0 and "user" in c.new_ns else None


def _dups(c: Container, names: list[str]) -> list[int]:
    """Copies of the named namespace fds of `c`, the reply's own (closed once sent)."""
    fds: list[int] = []
    try:
        for name in names:
            fds.append(c.ns.dup(name))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


class Filesystems:
    def __init__(self, reg: Registry, policy: Policy) -> None:
        self.reg = reg
        self.policy = policy

    def root_fd(self, c: Container) -> list[int]:
        """A copy of the container's root (O_PATH) for *at() calls; none before it has one.
        ECANCELED once it is dead: its root was released at death."""
        if c.state == State.DEAD:
            raise OSError(errno.ECANCELED, f"container {c.id} is dead; its root is released")
        return [c.ns.dup("root")] if "root" in c.ns else []

    async def set_root(self, peer: Peer, c: Container, mfd: int) -> None:
        """MOVE_MOUNT_T_CONTAINER_ROOT: mount `mfd` becomes the root of an empty-fs container."""
        self.policy.mounter(peer, c, "set the root of")
        if not c.flags & CONTAINER_NEW_EMPTY_FS_NS or "root" in c.ns:
            raise OSError(errno.EBUSY, f"container {c.id} already has a mount namespace")
        c.check_alive()
        # Copies, not lent fds: the thread works while other requests run.
        fds = _dups(c, ["mnt"])
        userns = _userns_for(peer, c)
        try:
            made = await trio.to_thread.run_sync(
                namespaces.root_namespace, mfd, {"mnt": fds[0]},
                namespaces.Credentials(peer.uid, peer.gid), userns)
        finally:
            for fd in fds + ([userns] if userns is not None else []):
                os.close(fd)
        if c.state == State.DEAD:  # died while we worked: its namespaces are released
            namespaces.close_all(made)
            c.check_alive()
        if "root" in c.ns:  # set by a racing call while we worked: keep the first
            namespaces.close_all(made)
            raise OSError(errno.EBUSY, f"container {c.id} already has a mount namespace")
        # The new mount namespace replaces the one made empty.
        self.reg.ns.put(c.ns, made)
        c.new_ns = c.new_ns | {"mnt"}
        self.reg.keep(c)

    async def mount_at(self, peer: Peer, c: Container, mfd: int, unsafe_path: str,
                       proc: bool = False, attrs: int = 0, params: str = "[]",
                       own_fork: bool = False) -> Mounted:
        """move_mount into the container at `unsafe_path`, resolved from its root.

        With `proc`, `mfd` is a placeholder for a proc of the container's PID namespace: init
        replaces it as it starts (see syscalls.container). If init exists already, nothing is
        mounted and the reply says so: the caller makes that proc now."""
        self.policy.mounter(peer, c, "mount into")
        if "root" not in c.ns:
            raise OSError(errno.ENOENT, f"container {c.id} has no root filesystem yet")
        c.check_alive()
        placeholder: dict[str, Any] | None = None
        if proc and c.flags & CONTAINER_NEW_PID_NS:
            placeholder = {"path": unsafe_path, "mnt_id": linux.mount_id(mfd),
                           "params": proc_params(params), "attrs": proc_attrs(attrs)}
            if c.state == State.STARTING and own_fork:
                # The fork being reported on this very connection: waiting for its report
                # would wait for ever.
                raise OSError(errno.EBUSY, f"container {c.id}'s init is being made by this "
                                           "connection's fork; report it first")
            while c.state == State.STARTING:  # init is being made: its PID namespace decides
                await c.started.wait()
            if c.state == State.RUNNING:
                return Mounted(pid_born=True)
            c.check_alive()  # killed while we waited
            if not c.proc_mounts:
                c.proc_mounts_idle = trio.Event()
            c.proc_mounts += 1  # init's fork waits until this is attached and recorded
        fds: list[int] = []
        userns: int | None = None
        try:
            fds = _dups(c, ["mnt", "root"])  # copies: the thread works while others run
            userns = _userns_for(peer, c)
            await trio.to_thread.run_sync(
                namespaces.mount_inside, mfd, fds[0], fds[1], unsafe_path,
                namespaces.Credentials(peer.uid, peer.gid), userns)
            if placeholder is not None and c.state == State.CREATED:
                c.proc_paths.append(placeholder)
        finally:
            for fd in fds + ([userns] if userns is not None else []):
                os.close(fd)
            if placeholder is not None:
                c.proc_mounts -= 1
                if not c.proc_mounts:
                    c.proc_mounts_idle.set()
        return Mounted()

    def fs_namespaces(self, peer: Peer, c: Container) -> tuple[NamespaceFds, list[int]]:
        """FSCONFIG_SET_CONTAINER: the container's user (own), network and PID namespaces."""
        self.policy.mounter(peer, c, "create a filesystem in")
        c.check_alive()
        names = (["user"] if "user" in c.new_ns else []) + ["net"]
        pid_born = c.state == State.RUNNING or not c.flags & CONTAINER_NEW_PID_NS
        if pid_born:
            names.append("pid")
        return NamespaceFds(names, pid_pending=not pid_born), _dups(c, names)

    def pid_ns_fd(self, c: Container) -> tuple[NamespaceFds, list[int]]:
        """translate_pid: the container's PID namespace, for any holder of its handle; ESRCH
        while it has none (NEW_PID_NS before init) and once dead (no process is in it)."""
        if c.state == State.DEAD:
            raise OSError(errno.ESRCH, f"container {c.id} is dead: no process is in it")
        if c.flags & CONTAINER_NEW_PID_NS and c.state != State.RUNNING:
            raise OSError(errno.ESRCH, f"container {c.id} has no PID namespace before its init")
        return NamespaceFds(["pid"]), _dups(c, ["pid"])

    def pids(self, peer: Peer, c: Container, members: list[int]) -> PidList:
        """container_pids: `members` as (pid as `peer` sees it, pid inside), init first."""
        if c.state == State.DEAD or (c.flags & CONTAINER_NEW_PID_NS and c.state != State.RUNNING):
            return PidList([])
        view = peer.at_pid(PidView, lambda _: None)
        return PidList([[o, i] for o, i in pid_pairs(c.ns, c.init_pid, members, view)])

    def netns_fds(self, peer: Peer, c: Container) -> tuple[NamespaceFds, list[int]]:
        """container_socket: the container's network namespace (and its own user namespace,
        if it has one) for a caller that could enter it: root, the owner, or a member."""
        self.policy.enterer(peer, c, "open a socket in")
        c.check_alive()
        names = (["user"] if "user" in c.new_ns else []) + ["net"]
        return NamespaceFds(names), _dups(c, names)
