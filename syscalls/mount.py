"""The new mount API (fsopen, fsconfig, fsmount, move_mount, open_tree), with the proposal's
container extensions.

With ordinary fds every call is the kernel's, errno for errno. With a container handle:
- fsconfig(fsfd, FSCONFIG_SET_CONTAINER, None, None, cfd), first on its context, remakes the
  context inside the container's user and network namespaces (and, for proc, its PID
  namespace); the fsfd number stays the same.
- move_mount(mfd, "", cfd, "/", F_EMPTY_PATH | MOVE_MOUNT_T_CONTAINER_ROOT) gives an
  empty-fs container its root; move_mount(mfd, "", cfd, "rel/path", ...) mounts inside it.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from . import _linux, nsexec, protocol
from ._client import call
from .constants import FSCONFIG_SET_CONTAINER, MOVE_MOUNT_T_CONTAINER_ROOT

FSOPEN_CLOEXEC = _linux.FSOPEN_CLOEXEC
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_SET_BINARY = 2
FSCONFIG_SET_PATH = 3
FSCONFIG_SET_PATH_EMPTY = 4
FSCONFIG_SET_FD = 5
FSCONFIG_CMD_CREATE = _linux.FSCONFIG_CMD_CREATE
FSCONFIG_CMD_RECONFIGURE = 7
FSMOUNT_CLOEXEC = _linux.FSMOUNT_CLOEXEC
MOVE_MOUNT_F_SYMLINKS = 0x01
MOVE_MOUNT_F_AUTOMOUNTS = 0x02
MOVE_MOUNT_F_EMPTY_PATH = 0x04
MOVE_MOUNT_T_SYMLINKS = 0x10
MOVE_MOUNT_T_AUTOMOUNTS = 0x20
MOVE_MOUNT_T_EMPTY_PATH = 0x40
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC


@dataclass
class _Context:
    """What we know of a filesystem context we opened: its type and whether it was touched."""
    fstype: str
    configured: bool = False
    pending_proc: bool = False  # proc for a container whose PID namespace is not born yet
    # The container's user namespace, for a caller that may mount only inside it (non-root).
    userns: int = -1
    # fsopen was refused (EPERM, non-root): a placeholder until FSCONFIG_SET_CONTAINER.
    refused: bool = False


# fsfd -> context, and mount fd -> "is a proc waiting for its PID namespace"
_contexts: dict[int, _Context] = {}
_pending_proc_mounts: set[int] = set()


def is_container_handle(fd: int) -> bool:
    """True for a FIFO (a possible handle); EBADF for a closed fd, as the kernel says."""
    return stat.S_ISFIFO(os.fstat(fd).st_mode)


def fsopen(fstype: str, flags: int = 0) -> int:
    """fsopen(2).

    A caller without CAP_SYS_ADMIN gets EPERM from the kernel; here it gets a placeholder
    that only FSCONFIG_SET_CONTAINER can make real (for a container whose user namespace it
    owns), and EPERM from anything else done with it.
    """
    try:
        fd = _linux.fsopen(fstype, flags)
        refused = False
    except PermissionError:
        if os.geteuid() == 0:
            raise
        fd = os.open("/dev/null", os.O_RDONLY | (os.O_CLOEXEC if flags & FSOPEN_CLOEXEC else 0))
        refused = True
    close_context(fd)
    _contexts[fd] = _Context(fstype, refused=refused)
    return fd


def close_context(fd: int) -> None:
    """Forget a context whose fd number is being reused."""
    ctx = _contexts.pop(fd, None)
    if ctx is not None and ctx.userns >= 0:
        os.close(ctx.userns)


def fsconfig(fsfd: int, cmd: int, key: str | None = None, value: str | bytes | None = None,
             aux: int = 0) -> None:
    """fsconfig(2), plus FSCONFIG_SET_CONTAINER (aux is the container handle)."""
    ctx = _contexts.get(fsfd)
    if cmd != FSCONFIG_SET_CONTAINER:
        if ctx is not None and ctx.refused:
            raise OSError(errno.EPERM, "fsopen was refused: only FSCONFIG_SET_CONTAINER, for a "
                                       "container with your own user namespace, can use it")
        _linux.fsconfig(fsfd, cmd, key, value, aux)
        if ctx is not None:
            ctx.configured = True
        return
    if key is not None or value is not None:
        raise OSError(errno.EINVAL, "FSCONFIG_SET_CONTAINER takes no key and no value")
    os.fstat(fsfd)  # EBADF first, as the kernel checks the fd before the command
    if ctx is None:
        raise OSError(errno.EINVAL, f"fd {fsfd} is not a context from syscalls.fsopen()")
    if ctx.configured:
        raise OSError(errno.EBUSY, "FSCONFIG_SET_CONTAINER must come before any other parameter")
    if not is_container_handle(aux):
        raise OSError(errno.EINVAL, f"fd {aux} is not a container handle")
    reply, fds = call(protocol.FsNamespaces(), [aux])
    try:
        named = dict(zip(reply["fds"], fds))
        if ctx.refused and "user" not in named:
            raise OSError(errno.EPERM, "fsopen was refused and the container has no user "
                                       "namespace of its own")
        order = [(t, named[t]) for t in ("user", "net") if t in named]
        cloexec = os.get_inheritable(fsfd) is False
        inside_userns = "user" in named and os.geteuid() != 0

        def make() -> int:
            if inside_userns:
                _mountable()
            return _linux.fsopen(ctx.fstype, FSOPEN_CLOEXEC)

        new = nsexec.fd_in(order, make)
        try:
            if ctx.fstype == "proc" and "pid" in named:
                _linux.fsconfig(new, FSCONFIG_SET_FD, "pidns", None, named["pid"])
            os.dup2(new, fsfd, inheritable=not cloexec)  # the caller's fd number stays
        finally:
            os.close(new)
        if "user" in named and os.geteuid() != 0:
            ctx.userns = os.dup(named["user"])
    finally:
        for fd in fds:
            os.close(fd)
    ctx.configured = True
    ctx.refused = False
    ctx.pending_proc = ctx.fstype == "proc" and bool(reply.get("pid_pending"))


def _mountable() -> None:
    """In a helper that entered a user namespace: fsopen and fsmount want CAP_SYS_ADMIN over
    the mount namespace one stands in, so stand in one of that user namespace's own."""
    _linux.unshare(_linux.CLONE_NEWNS)


def fsmount(fsfd: int, flags: int = 0, attr_flags: int = 0) -> int:
    """fsmount(2)."""
    ctx = _contexts.get(fsfd)
    if ctx is not None and ctx.userns >= 0:
        # Mounting needs CAP_SYS_ADMIN over one's mount namespace: a non-root owner has it
        # only in a mount namespace of the container's user namespace.
        def inside() -> int:
            _mountable()
            return _linux.fsmount(fsfd, flags, attr_flags)
        mfd = nsexec.fd_in([("user", ctx.userns)], inside)
        os.set_inheritable(mfd, not flags & FSMOUNT_CLOEXEC)
    else:
        mfd = _linux.fsmount(fsfd, flags, attr_flags)
    if ctx is not None and ctx.pending_proc:
        _pending_proc_mounts.add(mfd)
    return mfd


def close(fd: int) -> None:
    """Close an fd of this module (forgets what it knew of it)."""
    close_context(fd)
    _pending_proc_mounts.discard(fd)
    os.close(fd)


def open_tree(dfd: int, path: str, flags: int) -> int:
    """open_tree(2); a container handle as `dfd` resolves `path` in the container's root."""
    from .at import resolve_in_container
    target = resolve_in_container(dfd, path, flags & _linux.AT_EMPTY_PATH)
    if target is None:
        return _linux.open_tree(dfd, path, flags)
    try:
        return _linux.open_tree(target, "", flags | _linux.AT_EMPTY_PATH)
    finally:
        os.close(target)


def move_mount(from_dfd: int, from_path: str, to_dfd: int, to_path: str, flags: int) -> None:
    """move_mount(2), with a container handle as `to_dfd` (or `from_dfd`)."""
    from .at import resolve_in_container
    into = flags & MOVE_MOUNT_T_CONTAINER_ROOT or not to_path.startswith("/")
    if to_dfd != _linux.AT_FDCWD and into and is_container_handle(to_dfd):
        _move_into_container(from_dfd, from_path, to_dfd, to_path, flags)
        return
    if flags & MOVE_MOUNT_T_CONTAINER_ROOT:
        raise OSError(errno.EINVAL, "MOVE_MOUNT_T_CONTAINER_ROOT needs a container handle")
    source = resolve_in_container(from_dfd, from_path, flags & MOVE_MOUNT_F_EMPTY_PATH)
    if source is None:
        _linux.move_mount(from_dfd, from_path, to_dfd, to_path, flags)
        return
    try:
        _linux.move_mount(source, "", to_dfd, to_path, flags | MOVE_MOUNT_F_EMPTY_PATH)
    finally:
        os.close(source)


def _move_into_container(from_dfd: int, from_path: str, cfd: int, to_path: str,
                         flags: int) -> None:
    if flags & MOVE_MOUNT_T_EMPTY_PATH or not to_path:
        raise OSError(errno.EINVAL, "an empty path with a container handle")
    if from_path or not flags & MOVE_MOUNT_F_EMPTY_PATH:
        mfd = _linux.open_tree(from_dfd, from_path, OPEN_TREE_CLOEXEC |
                               (0 if flags & MOVE_MOUNT_F_SYMLINKS else 0x100))  # AT_SYMLINK_NOFOLLOW
    else:
        mfd = from_dfd
    try:
        if flags & MOVE_MOUNT_T_CONTAINER_ROOT:
            if to_path != "/":
                raise OSError(errno.EINVAL, f"a container's root is set at '/', not {to_path!r}")
            call(protocol.SetRoot(), [cfd, mfd])
        else:
            call(protocol.MountAt(path=to_path, proc=int(mfd in _pending_proc_mounts)), [cfd, mfd])
    finally:
        if mfd != from_dfd:
            os.close(mfd)
