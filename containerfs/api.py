"""containerfs.Container: one object over a container handle, with the standard library's
process conventions (contract section 13)."""

from __future__ import annotations

import errno
import os
import select
import socket
import subprocess
import threading
from types import TracebackType
from typing import Any

import syscalls
from syscalls import linux, nsexec
from syscalls.container import drop_fork_plan

from . import spawn


class Container:
    """A container and its handle (close-on-exec). Leaving the `with` block (or `close()`)
    kills the container and closes the handle.

    `root=DIR` (implies CONTAINER_NEW_EMPTY_FS_NS) makes a recursive bind of DIR the root and
    mounts a proc of the container's own at /proc (made in DIR if missing, unless read-only;
    skipped if DIR has no /proc and `readonly`); `readonly=True` makes that tree read-only;
    `hostname=` (implies CONTAINER_NEW_UTS_NS) is set, from outside, in the UTS namespace of
    the first process this object starts, before that process's own code or program runs.
    """

    def __init__(self, name: str = "container", flags: int = 0, *, root: str | None = None,
                 readonly: bool = False, hostname: str | None = None) -> None:
        if readonly and root is None:
            raise ValueError("readonly=True needs root=DIR")
        flags |= syscalls.CONTAINER_FD_CLOEXEC
        if root is not None:
            flags = (flags & ~syscalls.CONTAINER_NEW_FS_NS) | syscalls.CONTAINER_NEW_EMPTY_FS_NS
        if hostname is not None:
            flags |= syscalls.CONTAINER_NEW_UTS_NS
            hostname.encode()  # a str: checked before anything is made
        self.name = name
        self.hostname = hostname
        self._lock = threading.Lock()  # held while the first process (init) is made
        self._started = False
        self._closed = False
        self._init: spawn.ContainerPopen | None = None  # the first process, if popen made it
        self._id: int | None = None
        self.user_ns = bool(flags & syscalls.CONTAINER_NEW_USER_NS)
        self.fd: int = syscalls.container_create(name, flags)
        try:
            if root is not None:
                set_root(self.fd, root, readonly)
        except BaseException:
            self.close()  # killed too: a created container is not left listed
            raise

    # -- the object's life ------------------------------------------------------------
    def __enter__(self) -> Container:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Kill the container (if alive) and close the handle; once."""
        if self._closed:
            return
        self._closed = True
        try:
            drop_fork_plan(self.fd)
            # Dead already: POLLHUP, or its init reaped here (its death is the container's,
            # which the service is dealing with; no need to ask for a kill).
            reaped = self._init is not None and self._init.returncode is not None
            if not reaped and not select.select([self.fd], [], [], 0)[0]:
                self.kill()
        except OSError as e:
            if e.errno not in (errno.ECANCELED, errno.ESRCH):
                raise
        finally:
            os.close(self.fd)

    @property
    def id(self) -> int:
        """The container's 64-bit id (asked of the service once)."""
        if self._id is None:
            self._id = int(syscalls.container_status(self.fd)["id"])
        return self._id

    def fileno(self) -> int:
        """The handle (pollable: POLLHUP once the container is dead)."""
        return self.fd

    # -- processes ----------------------------------------------------------------------
    def fork(self) -> int:
        """fork_into_container: the child's pid here, 0 in the child (this process forks)."""
        with self._first() as first:
            if not (first and self.hostname is not None):
                return syscalls.fork_into_container(self.fd)
            r, w = os.pipe2(os.O_CLOEXEC)
            try:
                pid = syscalls.fork_into_container(self.fd)
            except BaseException:
                os.close(r)
                os.close(w)
                raise
            if pid == 0:  # wait until the hostname is set
                os.close(w)
                while os.read(r, 64):
                    pass
                os.close(r)
                return 0
            os.close(r)
            try:
                self._set_hostname(pid)
            except BaseException:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise
            finally:
                os.close(w)
            return pid

    def popen(self, args: Any, **kwargs: Any) -> spawn.ContainerPopen:
        """subprocess.Popen in the container (see ContainerPopen); this process never forks."""
        with self._first() as first:
            on_init = self._set_hostname if first and self.hostname is not None else None
            process = spawn.ContainerPopen(self, args, on_init=on_init, **kwargs)
            if first:
                self._init = process
            return process

    def run(self, args: Any, **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """subprocess.run in the container: same arguments, result and exceptions."""
        return spawn.run(self.popen, args, **kwargs)

    def kill(self) -> None:
        """SIGKILL every process of the container (container_kill)."""
        syscalls.container_kill(self.fd)

    def wait(self) -> int:
        """Block until the container is dead; return init's wait status."""
        return syscalls.container_wait(self.fd)

    def pids(self) -> list[tuple[int, int]]:
        """(pid as seen here, pid inside) of each living process, init first."""
        return syscalls.container_pids(self.fd)

    def status(self) -> dict[str, Any]:
        """The service's record of the container (container_status)."""
        return syscalls.container_status(self.fd)

    # -- resources --------------------------------------------------------------------
    def set_limit(self, name: str, value: str) -> None:
        """container_set_limit (cgroup v2 name and syntax)."""
        syscalls.container_set_limit(self.fd, name, value)

    def get_limit(self, name: str) -> str:
        """container_get_limit."""
        return syscalls.container_get_limit(self.fd, name)

    def stats(self) -> dict[str, int]:
        """container_stats."""
        return syscalls.container_stats(self.fd)

    def freeze(self) -> None:
        """Stop every member (returns once all are frozen)."""
        syscalls.container_freeze(self.fd)

    def thaw(self) -> None:
        """Let every member run again."""
        syscalls.container_thaw(self.fd)

    # -- inside -------------------------------------------------------------------------
    def _first(self) -> _First:
        return _First(self)

    def _set_hostname(self, pid: int) -> None:
        assert self.hostname is not None
        set_hostname(pid, self.hostname)


def set_hostname(pid: int, name: str) -> None:
    """Set the hostname in the UTS namespace of process `pid`, from outside: in a short-lived
    thread (root), or a child that enters its user namespace first (an owner)."""
    with nsexec.step("setting the hostname"):
        uts = os.open(f"/proc/{pid}/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
        try:
            user = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
            try:
                def make() -> list[int]:
                    socket.sethostname(name)
                    return []
                nsexec.fds_in([("user", user), ("uts", uts)], make, 0)
            finally:
                os.close(user)
        finally:
            os.close(uts)


class _First:
    """Context: True while making the container's first process (the lock held), else False."""

    def __init__(self, c: Container) -> None:
        self.c = c
        self.held = False

    def __enter__(self) -> bool:
        if self.c._started:
            return False
        self.c._lock.acquire()
        if self.c._started:
            self.c._lock.release()
            return False
        self.held = True
        return True

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.held:
            self.c._started = True
            self.c._lock.release()


def set_root(cfd: int, root: str, readonly: bool) -> None:
    """A recursive bind of `root` as the container's root, and a proc of its own at /proc."""
    with nsexec.step(f"binding {root} as the root"):
        tree = syscalls.open_tree(syscalls.AT_FDCWD, root, syscalls.OPEN_TREE_CLONE
                                  | syscalls.OPEN_TREE_CLOEXEC | linux.AT_RECURSIVE)
    try:
        if readonly:
            with nsexec.step("making the root read-only"):
                linux.mount_setattr(tree, "", syscalls.AT_EMPTY_PATH | linux.AT_RECURSIVE,
                                    linux.MOUNT_ATTR_RDONLY)
        with nsexec.step("setting the root"):
            syscalls.move_mount(tree, "", cfd, "/", syscalls.MOVE_MOUNT_F_EMPTY_PATH
                                | syscalls.MOVE_MOUNT_T_CONTAINER_ROOT)
    finally:
        os.close(tree)
    try:
        syscalls.fstatat(cfd, "proc", 0)
    except FileNotFoundError:
        if readonly:
            return
        syscalls.mkdirat(cfd, "proc", 0o555)
    with nsexec.step("mounting proc"):
        mount_proc(cfd)


def mount_proc(cfd: int) -> None:
    """A proc of the container's own PID namespace at its /proc, through the mount API with
    FSCONFIG_SET_CONTAINER (a placeholder until init exists; init puts its own in place)."""
    fs = syscalls.fsopen("proc", syscalls.FSOPEN_CLOEXEC)
    try:
        syscalls.fsconfig(fs, syscalls.FSCONFIG_SET_CONTAINER, None, None, cfd)
        syscalls.fsconfig(fs, syscalls.FSCONFIG_CMD_CREATE, None, None, 0)
        mnt = syscalls.fsmount(fs, syscalls.FSMOUNT_CLOEXEC, 0)
    finally:
        os.close(fs)
    try:
        syscalls.move_mount(mnt, "", cfd, "proc", syscalls.MOVE_MOUNT_F_EMPTY_PATH)
    finally:
        os.close(mnt)
