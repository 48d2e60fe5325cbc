"""The new mount API (fsopen, fsconfig, fsmount, move_mount, open_tree), with the proposal's
container extensions.

With ordinary fds every call is the kernel's, errno for errno. With a container handle:
- fsconfig(fsfd, FSCONFIG_SET_CONTAINER, None, None, cfd), first on its context, remakes the
  context inside the container's user and network namespaces (and, for proc, its PID
  namespace); the fsfd number stays the same.
- A proc for a container whose PID namespace is not born yet (no init) is never a proc of
  another PID namespace: the caller's fd becomes the context of an empty read-only tmpfs (a
  placeholder), its parameters are checked on a proc context of ours and kept. Mounted in
  the container, the placeholder is replaced by init, as it starts and before its own code
  runs, with a proc of its PID namespace made with those parameters and mount attributes.
- move_mount(mfd, "", cfd, "/", F_EMPTY_PATH | MOVE_MOUNT_T_CONTAINER_ROOT) gives an
  empty-fs container its root; move_mount(mfd, "", cfd, "rel/path", ...) mounts inside it.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass, field

from . import linux, nsexec, protocol
from .client import call
from .constants import FSCONFIG_SET_CONTAINER, MOVE_MOUNT_T_CONTAINER_ROOT

FSOPEN_CLOEXEC = linux.FSOPEN_CLOEXEC
FSCONFIG_SET_FLAG = linux.FSCONFIG_SET_FLAG
FSCONFIG_SET_STRING = linux.FSCONFIG_SET_STRING
FSCONFIG_SET_BINARY = 2
FSCONFIG_SET_PATH = 3
FSCONFIG_SET_PATH_EMPTY = 4
FSCONFIG_SET_FD = 5
FSCONFIG_CMD_CREATE = linux.FSCONFIG_CMD_CREATE
FSCONFIG_CMD_RECONFIGURE = 7
FSCONFIG_CMD_CREATE_EXCL = 8
FSMOUNT_CLOEXEC = linux.FSMOUNT_CLOEXEC
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
    # A pending proc: the parameters set on it, which init's proc is made with, and whether
    # FSCONFIG_CMD_CREATE has made the fd the placeholder's context.
    params: list[tuple[int, str, str | None]] = field(default_factory=list)
    created: bool = False
    checker: int = -1  # a proc context, never created, that checks the parameters
    handle: tuple[int, int] = (0, 0)  # the container's handle, by pipe (st_dev, st_ino)


@dataclass(frozen=True)
class _PendingProc:
    """A placeholder mount: what init's proc will be made with, and for which container."""
    params: tuple[tuple[int, str, str | None], ...]
    attrs: int
    handle: tuple[int, int]


# fsfd -> context, and placeholder's mount id -> the proc it stands for (by mount, not by fd
# number: any fd of that mount is it, and a number reused after os.close() never is)
_contexts: dict[int, _Context] = {}
_pending_proc_mounts: dict[int, _PendingProc] = {}


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
        fd = linux.fsopen(fstype, flags)
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
    if ctx is not None and ctx.checker >= 0:
        os.close(ctx.checker)


def fsconfig(fsfd: int, cmd: int, key: str | None = None, value: str | bytes | None = None,
             aux: int = 0) -> None:
    """fsconfig(2), plus FSCONFIG_SET_CONTAINER (aux is the container handle)."""
    ctx = _contexts.get(fsfd)
    if cmd != FSCONFIG_SET_CONTAINER:
        if ctx is not None and ctx.refused:
            raise OSError(errno.EPERM, "fsopen was refused: only FSCONFIG_SET_CONTAINER, for a "
                                       "container with your own user namespace, can use it")
        if ctx is not None and ctx.pending_proc:
            _pending_proc_config(fsfd, ctx, cmd, key, value, aux)
            return
        linux.fsconfig(fsfd, cmd, key, value, aux)
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
        named = dict(zip(reply.fds, fds))
        if ctx.refused and "user" not in named:
            raise OSError(errno.EPERM, "fsopen was refused and the container has no user "
                                       "namespace of its own")
        order = [(t, named[t]) for t in ("user", "net") if t in named]
        cloexec = os.get_inheritable(fsfd) is False
        # fsopen wants CAP_SYS_ADMIN over the mount namespace one stands in: once in the
        # container's user namespace, root too must stand in a mount namespace of its own.
        inside_userns = "user" in named
        pending = ctx.fstype == "proc" and reply.pid_pending

        def make() -> list[int]:
            if inside_userns:
                _mountable()
            if not pending:
                return [linux.fsopen(ctx.fstype, FSOPEN_CLOEXEC)]
            # The caller's fd becomes the placeholder's context: whatever is done with it,
            # even by raw system calls, makes no proc. A proc context of our own, never
            # created, checks the parameters.
            checker = linux.fsopen("proc", FSOPEN_CLOEXEC)
            try:
                return [_placeholder_context(), checker]
            except BaseException:
                os.close(checker)
                raise

        # A placeholder and its checker depend on no namespace but the user namespace (the
        # checker parses gid= there): without one of its own they are made right here, with
        # no helper thread. The real proc, made by init, stands in the container's.
        made = make() if pending and not inside_userns else \
            nsexec.fds_in(order, make, 2 if pending else 1)
        try:
            if ctx.fstype == "proc" and "pid" in named:
                linux.fsconfig(made[0], FSCONFIG_SET_FD, "pidns", None, named["pid"])
            os.dup2(made[0], fsfd, inheritable=not cloexec)  # the caller's fd number stays
        except BaseException:
            for fd in made[1:]:
                os.close(fd)
            raise
        finally:
            os.close(made[0])
        if "user" in named and os.geteuid() != 0:
            ctx.userns = os.dup(named["user"])
    finally:
        for fd in fds:
            os.close(fd)
    ctx.configured = True
    ctx.refused = False
    ctx.pending_proc = pending
    if pending:
        ctx.checker = made[1]
    if ctx.fstype == "proc":
        st = os.fstat(aux)
        ctx.handle = (st.st_dev, st.st_ino)


def _pending_proc_config(fsfd: int, ctx: _Context, cmd: int, key: str | None,
                         value: str | bytes | None, aux: int) -> None:
    """fsconfig on a proc waiting for its container's PID namespace (`fsfd` is the
    placeholder's context). Parameters are set on the checker, a proc context (so the
    kernel checks them, errno for errno), and kept for the proc init makes; the create
    commands create the placeholder. Once created, `fsfd` answers as any created context."""
    if ctx.created or cmd not in (FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING, FSCONFIG_SET_BINARY,
                                  FSCONFIG_SET_PATH, FSCONFIG_SET_PATH_EMPTY, FSCONFIG_SET_FD,
                                  FSCONFIG_CMD_CREATE, FSCONFIG_CMD_CREATE_EXCL):
        linux.fsconfig(fsfd, cmd, key, value, aux)  # EBUSY, EOPNOTSUPP... as the kernel says
        return
    if cmd in (FSCONFIG_CMD_CREATE, FSCONFIG_CMD_CREATE_EXCL):
        linux.fsconfig(fsfd, cmd, key, value, aux)  # creates the placeholder
        ctx.created = True
        return
    if key == "pidns":
        raise OSError(errno.EINVAL, "FSCONFIG_SET_CONTAINER decides the PID namespace of this "
                                    "proc: it takes no pidns parameter")
    linux.fsconfig(ctx.checker, cmd, key, value, aux)
    if cmd in (FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING) and key is not None:
        text = value.decode() if isinstance(value, bytes) else value
        ctx.params.append((cmd, key, text if cmd == FSCONFIG_SET_STRING else None))
    else:
        # Accepted by the kernel, but not a parameter init could be given.
        raise OSError(errno.EINVAL, f"proc parameter {key!r} cannot wait for init: only flags "
                                    "and strings can")


def _placeholder_context() -> int:
    """A context (not created yet) of an empty, read-only tmpfs: what a proc made before its
    container's init exists is, until init puts a proc of its PID namespace in its place."""
    fs = linux.fsopen("tmpfs", FSOPEN_CLOEXEC)
    try:
        linux.fsconfig(fs, FSCONFIG_SET_STRING, "source", "proc-pending", 0)
        linux.fsconfig(fs, FSCONFIG_SET_STRING, "mode", "0555", 0)
        linux.fsconfig(fs, FSCONFIG_SET_FLAG, "ro", None, 0)
    except BaseException:
        os.close(fs)
        raise
    return fs


def _mountable() -> None:
    """In a helper that entered a user namespace: fsopen and fsmount want CAP_SYS_ADMIN over
    the mount namespace one stands in, so stand in one of that user namespace's own."""
    linux.unshare(linux.CLONE_NEWNS)


def fsmount(fsfd: int, flags: int = 0, attr_flags: int = 0) -> int:
    """fsmount(2)."""
    ctx = _contexts.get(fsfd)
    if ctx is not None and ctx.userns >= 0:
        # Mounting needs CAP_SYS_ADMIN over one's mount namespace: a non-root owner has it
        # only in a mount namespace of the container's user namespace.
        def inside() -> int:
            _mountable()
            return linux.fsmount(fsfd, flags, attr_flags)
        mfd = nsexec.fd_in([("user", ctx.userns)], inside)
        os.set_inheritable(mfd, not flags & FSMOUNT_CLOEXEC)
    else:
        mfd = linux.fsmount(fsfd, flags, attr_flags)
    if ctx is not None and ctx.pending_proc:
        try:
            _pending_proc_mounts[linux.mount_id(mfd)] = _PendingProc(
                tuple(ctx.params), attr_flags, ctx.handle)
        except BaseException:
            os.close(mfd)
            raise
    return mfd


def _pending_proc(mfd: int) -> _PendingProc | None:
    """The proc that mount `mfd` is a placeholder for, if it is one of ours."""
    if not _pending_proc_mounts:
        return None
    try:
        return _pending_proc_mounts.get(linux.mount_id(mfd))
    except OSError:
        return None


def close(fd: int) -> None:
    """Close an fd of this module (forgets what it knew of it)."""
    close_context(fd)
    os.close(fd)


def open_tree(dfd: int, path: str, flags: int) -> int:
    """open_tree(2); a container handle as `dfd` resolves `path` in the container's root."""
    from .at import resolve_in_container
    target = resolve_in_container(dfd, path, flags & linux.AT_EMPTY_PATH)
    if target is None:
        return linux.open_tree(dfd, path, flags)
    try:
        return linux.open_tree(target, "", flags | linux.AT_EMPTY_PATH)
    finally:
        os.close(target)


def move_mount(from_dfd: int, from_path: str, to_dfd: int, to_path: str, flags: int) -> None:
    """move_mount(2), with a container handle as `to_dfd` (or `from_dfd`)."""
    from .at import resolve_in_container
    into = flags & MOVE_MOUNT_T_CONTAINER_ROOT or not to_path.startswith("/")
    if to_dfd != linux.AT_FDCWD and into and is_container_handle(to_dfd):
        _move_into_container(from_dfd, from_path, to_dfd, to_path, flags)
        return
    if flags & MOVE_MOUNT_T_CONTAINER_ROOT:
        raise OSError(errno.EINVAL, "MOVE_MOUNT_T_CONTAINER_ROOT needs a container handle")
    if flags & MOVE_MOUNT_F_EMPTY_PATH and not from_path and _pending_proc(from_dfd):
        raise OSError(errno.EINVAL, "a proc made for a container before its init exists can "
                                    "only be mounted in that container")
    source = resolve_in_container(from_dfd, from_path, flags & MOVE_MOUNT_F_EMPTY_PATH)
    if source is None:
        linux.move_mount(from_dfd, from_path, to_dfd, to_path, flags)
        return
    try:
        linux.move_mount(source, "", to_dfd, to_path, flags | MOVE_MOUNT_F_EMPTY_PATH)
    finally:
        os.close(source)


def _move_into_container(from_dfd: int, from_path: str, cfd: int, to_path: str,
                         flags: int) -> None:
    if flags & MOVE_MOUNT_T_EMPTY_PATH or not to_path:
        raise OSError(errno.EINVAL, "an empty path with a container handle")
    if from_path or not flags & MOVE_MOUNT_F_EMPTY_PATH:
        mfd = linux.open_tree(from_dfd, from_path, OPEN_TREE_CLOEXEC |
                               (0 if flags & MOVE_MOUNT_F_SYMLINKS else 0x100))  # AT_SYMLINK_NOFOLLOW
    else:
        mfd = from_dfd
    try:
        if flags & MOVE_MOUNT_T_CONTAINER_ROOT:
            if to_path != "/":
                raise OSError(errno.EINVAL, f"a container's root is set at '/', not {to_path!r}")
            call(protocol.SetRoot(), [cfd, mfd])
        elif (pending := _pending_proc(mfd)) is None:
            call(protocol.MountAt(path=to_path), [cfd, mfd])
        else:
            _mount_pending_proc(mfd, cfd, to_path, pending)
    finally:
        if mfd != from_dfd:
            os.close(mfd)


def _mount_pending_proc(mfd: int, cfd: int, to_path: str, pending: _PendingProc) -> None:
    """Mount the placeholder `mfd` for its container's init to replace; or, if init has
    been born since the proc was made, a proc of init's PID namespace instead."""
    st = os.fstat(cfd)
    if (st.st_dev, st.st_ino) != pending.handle:
        raise OSError(errno.EINVAL, "this proc was made for another container's PID namespace "
                                    "(FSCONFIG_SET_CONTAINER): mount it in that container")
    reply, _ = call(protocol.MountAt(path=to_path, proc=1, attrs=pending.attrs,
                                     params=json.dumps(pending.params)), [cfd, mfd])
    if not reply.pid_born:
        _pending_proc_mounts.pop(linux.mount_id(mfd), None)  # attached: init's to complete
        return
    # The PID namespace exists now: make the proc the caller asked for, as if made now.
    fs = fsopen("proc", FSOPEN_CLOEXEC)
    try:
        fsconfig(fs, FSCONFIG_SET_CONTAINER, None, None, cfd)
        for cmd, key, value in pending.params:
            fsconfig(fs, cmd, key, value)
        fsconfig(fs, FSCONFIG_CMD_CREATE)
        proc = fsmount(fs, FSMOUNT_CLOEXEC, pending.attrs)
    finally:
        close(fs)
    try:
        call(protocol.MountAt(path=to_path), [cfd, proc])
    finally:
        close(proc)
