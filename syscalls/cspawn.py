"""container_spawn: posix_spawn into a container (an extension). The new process is made by
compiled code (cspawn.c) with CLONE_VM | CLONE_VFORK: nothing of the caller is copied, no
Python runs in it, and the caller may have any number of threads. It ends up as a process
fork_into_container makes and that then execs (syscalls/spawnsteps.py has the steps).
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
import os
import signal
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import forkplans, linux, protocol, replies, spawnsteps
from .client import Connection
from .container import _single_threaded, plans, send_planned_fork
from .handle import check_handle
from .spawnsteps import Step

_lib: Any = None


def available() -> bool:
    """Whether the compiled part is built (scripts/setup.sh builds it)."""
    try:
        _load()
    except OSError:
        return False
    return True


def _load() -> Any:
    global _lib
    if _lib is None:
        try:
            _lib = importlib.import_module("syscalls._cspawn")
        except ImportError as e:
            raise OSError(errno.ENOSYS, "container_spawn: the compiled spawn path is not built; "
                                        f"run scripts/setup.sh ({e})") from None
    return _lib


def _run(steps: Sequence[Step], argv: Sequence[bytes], envp: Sequence[bytes],
         errfd: int, flags: int = 0, cgroup: int = -1) -> tuple[int, int]:
    """Make the process (born in cgroup2 group `cgroup`, an fd, if not -1); (pid, pidfd).
    The C side blocks every signal around the clone."""
    mod = _load()
    ffi, lib = mod.ffi, mod.lib
    keep: list[Any] = []  # every buffer the child reads lives until the call returns

    def c_str(b: bytes) -> Any:
        buf = ffi.new("char[]", b)
        keep.append(buf)
        return buf

    table = ffi.new("struct cfs_step[]", len(steps))
    for row, s in zip(table, steps):
        row.op, row.ignore, row.a, row.b = spawnsteps.OPS[s.op], s.ignore, s.a, s.b
        if s.data is not None:
            row.data, row.len = c_str(s.data), len(s.data)
    c_argv = ffi.new("char *[]", [c_str(a) for a in argv] + [ffi.NULL])
    c_envp = ffi.new("char *[]", [c_str(e) for e in envp] + [ffi.NULL])
    pidfd = ffi.new("int *", -1)
    pid = lib.cfs_spawn(table, len(steps), c_argv, c_envp, errfd, flags, pidfd, cgroup)
    if pid < 0:
        raise OSError(-pid, f"container_spawn: clone: {os.strerror(-pid)}")
    return int(pid), int(pidfd[0])


def _fsencode(s: str | bytes) -> bytes:
    return s if isinstance(s, bytes) else os.fsencode(s)


def container_spawn(fd: int, path: str | bytes, argv: Sequence[str | bytes],
                    env: Mapping[str | bytes, str | bytes] | None = None, *,
                    file_actions: Sequence[tuple[Any, ...]] = (), pass_fds: Sequence[int] = (),
                    close_fds: bool = True, setsid: bool = False, ctty: bool = False,
                    user: tuple[int, int] | None = None, cwd: str | bytes | None = None,
                    setsigdef: Sequence[int] = (), setsigmask: Sequence[int] | None = None
                    ) -> int:
    """Start `path` (searched in env's PATH if it has no slash) with `argv` and `env` (default
    os.environ) in the container behind `fd`; return its pid. The caller is its parent, as
    with os.posix_spawn; the first process becomes init.

    file_actions: os.POSIX_SPAWN_DUP2 and POSIX_SPAWN_CLOSE entries; fds above 2 are closed
    at exec but `pass_fds` (with `close_fds`); `setsid` (and `ctty`: fd 0 becomes the
    controlling terminal); `user` (uid, gid) with no supplementary groups; `cwd` inside the
    container; `setsigdef` signals back to default; `setsigmask` (default: the caller's).

    Errors: the OSError exec gave (FileNotFoundError...), with nothing left running; a set-up
    step's errno with the step named; EAGAIN where only fork_into_container can make the
    process (not root, an init whose procs must be put in place, a new PID namespace inside
    a user namespace): nothing is made then; ENOSYS if the compiled part is not built; and
    fork_into_container's own errors (ECANCELED for a dead container...).
    """
    check_handle(fd)
    if os.geteuid() != 0:
        raise OSError(errno.EAGAIN, "container_spawn: only root enters a container directly; "
                                    "use fork_into_container")
    _load()
    bpath = _fsencode(path)
    bargv = [_fsencode(a) for a in argv]
    envmap = os.environb if env is None else {_fsencode(k): _fsencode(v) for k, v in env.items()}
    envp = [k + b"=" + v for k, v in envmap.items()]
    cwdb = None if cwd is None else _fsencode(cwd)

    def steps_for(reply: replies.ForkGrant, fds: list[int], conn: Connection
                  ) -> tuple[list[Step], int, int]:
        """The steps of a grant, the cgroup2 group to be born in (or -1) and the fd of a
        cgroup.procs the child writes (or -1; the caller closes it)."""
        procs = -1
        cgroup = fds[reply.fds.index("cgroup")] if "cgroup" in reply.fds else -1
        if cgroup >= 0 and not _load().lib.cfs_into_cgroup():
            # Joined by a write after the clone (where clone3 is not wrapped: not x86-64).
            procs = os.open("cgroup.procs", os.O_WRONLY | os.O_CLOEXEC, dir_fd=cgroup)
            cgroup = -1
        steps = spawnsteps.entry_steps(reply, fds, conn.sock.fileno(), procs)
        steps += spawnsteps.caller_steps(
            bpath, envmap.get(b"PATH"), file_actions=file_actions, pass_fds=pass_fds,
            close_fds=close_fds, setsid=setsid, ctty=ctty, user=user, cwd=cwdb,
            sigdef=setsigdef, sigmask=setsigmask, in_userns=spawnsteps.enters_userns(reply, fds))
        return steps, cgroup, procs

    conn, reply, fds, made = _ask(fd, steps_for)
    procs = made[2] if made is not None else -1
    try:
        if not spawnsteps.eligible(reply, fds):
            conn.send(protocol.ForkFailed(errno=errno.EAGAIN))
            raise OSError(errno.EAGAIN, "container_spawn: this process must be made by "
                                        "fork_into_container (its procs, or its user namespace)")
        if made is None:
            made = steps_for(reply, fds, conn)
            procs = made[2]
        return _make(conn, reply, fds, made[0], bpath, bargv, envp, made[1])
    finally:
        if procs >= 0:
            os.close(procs)
        conn.close()
        forkplans.close_fds(fds)


Made = tuple[list[Step], int, int]


def _ask(handle: int, steps_for: Callable[[replies.ForkGrant, list[int], Connection], Made]
         ) -> tuple[Connection, replies.ForkGrant, list[int], Made | None]:
    """The Fork grant: (connection, grant, its fds, its steps if made already). On the
    create's own connection when this process keeps a plan of its first fork (saves a
    connect): the steps of the plan are made while the request travels, and used if the
    service answers that the plan holds (then the plan's fds are the grant's)."""
    plan = plans.take(handle) if _single_threaded() else None
    made: Made | None = None

    def drop_plan() -> None:
        if made is not None and made[2] >= 0:
            os.close(made[2])
        if plan is not None:
            forkplans.close_fds(plan.fds)

    if plan is not None:
        conn = send_planned_fork(plan.conn, handle, planned=True)
        try:
            if spawnsteps.eligible(plan.reply, plan.fds):
                made = steps_for(plan.reply, plan.fds, conn)
        except BaseException:
            conn.close()
            drop_plan()
            raise
    else:
        conn = Connection()
        try:
            conn.send(protocol.Fork(keep=1), [handle])
        except BaseException:
            conn.close()
            raise
    try:
        try:
            reply, fds = conn.receive(replies.ForkGrant)
        except OSError as e:  # the service refused the fork (ECANCELED: dead...)
            raise OSError(e.errno, f"fork_into_container: {e.strerror}") from None
        if reply.as_planned or reply.plan_fds:
            if plan is None or fds or (reply.plan_fds and reply.fds != plan.reply.fds):
                forkplans.close_fds(fds)
                raise OSError(errno.EPROTO, "the containerfs service answered a fork with a "
                                            "plan it never sent")
            if reply.as_planned:
                return conn, plan.reply, plan.fds, made
            if made is not None and made[2] >= 0:  # steps of the old reply: made again
                os.close(made[2])
            return conn, reply, plan.fds, None
    except BaseException:
        conn.close()
        drop_plan()
        raise
    drop_plan()  # another grant than the plan: nothing of the plan is used
    return conn, reply, fds, None


def _make(conn: Connection, reply: replies.ForkGrant, fds: list[int], steps: list[Step],
          path: bytes, argv: list[bytes], envp: list[bytes], cgroup: int = -1) -> int:
    """Make the process in the grant's PID namespace (and in cgroup2 group `cgroup`, unless
    -1) and report it; raise its set-up error."""
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    # No handler may raise between the clone and the report: a process nobody knows of would
    # be left in the container.
    old_mask = linux.block_signals()
    caller_mask = int.from_bytes(bytes(old_mask)[:8], "little")
    steps = [dataclasses.replace(s, a=caller_mask, b=0) if s.op == "sigmask" and s.b else s
             for s in steps]
    try:
        own_pid = os.open("/proc/thread-self/ns/pid_for_children", os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                if "ns:pid" in reply.fds:
                    linux.setns(fds[reply.fds.index("ns:pid")], linux.NS_FLAGS["pid"])
                elif reply.new_pid_ns:
                    linux.unshare(linux.NS_FLAGS["pid"])
                pid, pidfd = _run(steps, argv, envp, err_w, cgroup=cgroup)
            finally:
                linux.setns(own_pid, linux.NS_FLAGS["pid"])
        except OSError as e:
            os.close(err_r)
            conn.send(protocol.ForkFailed(errno=e.errno or errno.EIO))
            raise
        finally:
            os.close(own_pid)
            os.close(err_w)
        try:
            # Made and in the container: reported even if its exec failed (it is then
            # dead, and as init its death is the container's).
            conn.send(protocol.StartedNoReply(pid=pid), [pidfd])
        except BaseException:
            # Nobody would know of it: no process is left (as fork_into_container).
            linux.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(err_r)
            raise
        finally:
            os.close(pidfd)
    finally:
        linux.restore_signals(old_mask)
    try:
        failure = os.read(err_r, 8)
    finally:
        os.close(err_r)
    if not failure:
        return pid
    index, err = struct.unpack("=ii", failure)
    os.waitpid(pid, 0)
    step = steps[index] if 0 <= index < len(steps) else None
    if step is None or step.op == "exec":
        raise OSError(err, os.strerror(err), os.fsdecode(path))
    if step.what == "chdir":  # the caller's cwd: named as subprocess names it
        raise OSError(err, os.strerror(err), os.fsdecode(step.data or b"").rstrip("\0"))
    raise OSError(err, f"container_spawn: {step.what}: {os.strerror(err)}")
