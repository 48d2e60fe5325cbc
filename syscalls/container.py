"""container_create, fork_into_container, container_wait: the container object as a program sees it."""

from __future__ import annotations

import errno
import json
import os
import select
import signal
from collections.abc import Callable
from typing import Any

from . import childsetup, confine, forkplans, keys, linux, protocol, replies, validate
from .handle import check_handle
from .nstypes import NAMESPACES

# Each type, and the /proc/self/ns file that names ours (for children, for pid).
_OWN_NS_FILES = [(t.name, t.for_children) for t in NAMESPACES]
from .client import Connection, call, call_holding, give_back
from .constants import CONTAINER_FD_CLOEXEC


def container_create(name: str | bytes, flags: int) -> int:
    """Create a container; return its handle, a new fd (close-on-exec with CONTAINER_FD_CLOEXEC)."""
    raw = validate.container_name(name)
    validate.create_flags(flags, os.geteuid())
    # A plan of the first fork only for the callers that can use one (and so no plan is
    # ever kept or dropped by two threads at once).
    plan = os.geteuid() == 0 and _single_threaded()
    (reply, fds), conn = call_holding(protocol.Create(
        name=raw.decode("utf-8", "surrogateescape"), flags=flags, plan=int(plan)))
    fd, plan_fds = fds[0], fds[1:]
    if plan_fds:
        plans.keep(fd, reply.plan, plan_fds, conn)  # its fork goes on conn
    else:
        give_back(conn)
    if not flags & CONTAINER_FD_CLOEXEC:
        os.set_inheritable(fd, True)
    return fd


def container_status(fd: int) -> dict[str, Any]:
    """The service's record of the container behind `fd` (id, name, state, init pid...)."""
    check_handle(fd)
    reply: replies.ContainerStatus = call(protocol.Status(), [fd])[0]
    return replies.to_json(reply)


def container_list() -> list[dict[str, Any]]:
    """The containers the caller may see (all, for root), as container_status gives them;
    an extension, like the command line's `ls`."""
    rows: list[dict[str, Any]] = []
    after = 0
    while True:
        page: replies.ContainerList = call(protocol.List(after=after))[0]
        rows += [replies.to_json(row) for row in page.containers]
        if not page.more or not page.containers:
            return rows
        after = page.containers[-1].id


def container_kill(fd: int) -> None:
    """Kill every process of the container behind `fd` (an extension: the owner's kill)."""
    check_handle(fd)
    call(protocol.Kill(), [fd])


def container_wait(fd: int) -> int:
    """Block until the container is dead; return its init's wait status."""
    check_handle(fd)
    poller = select.poll()
    poller.register(fd, select.POLLHUP)
    while not poller.poll():  # poll() retries EINTR itself (PEP 475)
        pass
    status = container_status(fd).get("exit_status")
    if status is None:
        raise OSError(errno.ECHILD, f"container behind fd {fd} died without an init status")
    return int(status)


Setup = Callable[[], None]


def fork_into_container(fd: int, *, clone_parent: bool = False,
                        before_confinement: Setup | None = None) -> int:
    """Fork a process into the container: its pid in the caller, 0 in the child.

    The caller is the child's real parent (waitpid works). The first process becomes init.
    With `clone_parent` (an extension, for a spawn server), the child is made with CLONE_PARENT:
    the caller's parent is its parent. Only for root, single-threaded, with no user namespace
    to enter: EAGAIN otherwise, with nothing made.

    `before_confinement` (an extension, for an OCI runtime's init): called in the child once
    it stands in the container (namespaces, root, cgroup, procs in place) and before the
    container's capabilities and seccomp filter apply, as runc's init mounts, sets the
    hostname and changes user before it drops capabilities. It runs with the caller's own
    privileges in namespaces the caller could enter anyway, so it lends nothing; the child
    is confined once it returns. If it raises, the child writes the error to fd 2 and exits
    (127) without running the caller's code.
    """
    check_handle(fd)
    if clone_parent and not (os.geteuid() == 0 and _single_threaded()):
        raise OSError(errno.EAGAIN, "fork_into_container: clone_parent needs root and one thread")
    if os.geteuid() == 0 and _single_threaded():
        # Fast path: root in a single-threaded process enters the namespaces itself, forks
        # once, and comes back; only a user namespace (which no process can leave) needs an
        # intermediate process.
        plan = None if clone_parent else plans.take(fd)
        if plan is not None:
            return _fork_ahead(fd, plan, before_confinement)
        conn = Connection()
        try:
            reply, fds = conn.call(protocol.Fork(keep=1), [fd])
        except BaseException:
            conn.close()
            raise
        if "ns:user" not in reply.fds or linux.same_file(
                fds[reply.fds.index("ns:user")], "/proc/self/ns/user"):
            return _fork_here(conn, reply, fds, clone_parent=clone_parent,
                              setup=before_confinement)
        if clone_parent:
            conn.send(protocol.ForkFailed(errno=errno.EAGAIN))
            _close(conn, fds)
            raise OSError(errno.EAGAIN, "fork_into_container: clone_parent with a user namespace")
        return _via_intermediate(fd, conn, reply, fds, before_confinement)
    return _via_intermediate(fd, None, None, [], before_confinement)


def _single_threaded() -> bool:
    # One entry per thread, C threads included; a quarter of the cost of /proc/self/status.
    return len(os.listdir("/proc/self/task")) == 1


def _close(conn: Connection, fds: list[int]) -> None:
    conn.close()
    for fd in fds:
        os.close(fd)


def _fork_here(conn: Connection, reply: replies.ForkGrant | None, fds: list[int],
               plan: forkplans.Plan | None = None, clone_parent: bool = False,
               setup: Setup | None = None) -> int:
    """Enter, fork once, and restore the caller's namespaces, root and cwd. With `plan` (its
    Fork request sent, not answered), the plan is entered first and the reply read there if
    it comes at once; a reply that is not the plan, or that keeps us waiting (it is then read
    where signals can be taken), is followed instead."""
    # No Python signal handler may run while this thread stands in the container.
    old_mask = linux.block_signals()
    saved: list[tuple[str, int]] = []
    cwd = os.open(".", os.O_PATH | os.O_CLOEXEC)
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    in_child = False
    try:
        cgroup_fd = None
        if plan is not None:
            got = _enter_planned(conn, plan, saved, cwd, root)
            if got is None:
                linux.restore_signals(old_mask)
                try:
                    reply, fds = conn.receive(replies.ForkGrant)
                finally:
                    old_mask = linux.block_signals()
            else:
                reply, fds, cgroup_fd = got
        assert reply is not None  # given, or read above
        done_r, done_w = childsetup.done_pipe(reply)
        try:
            if cgroup_fd is None:
                cgroup_fd = _enter(reply, fds, saved)
            if clone_parent:  # the kernel gives it our own exit signal
                pid, pidfd = linux.clone3_fork(linux.CLONE_PARENT, 0, cgroup_fd)
            else:
                pid, pidfd = linux.clone3_fork(0, signal.SIGCHLD, cgroup_fd)
        except OSError as e:
            forkplans.close_fds([fd for fd in (done_r, done_w) if fd >= 0])
            conn.send(protocol.ForkFailed(errno=e.errno or errno.EIO))
            _close(conn, fds)
            raise
        if pid == 0:
            in_child = True
            childsetup.join_groups(reply, fds)
            plans.drop()  # another container's, inherited: not this process's to use
            keys.enter_container(conn, reply, join=True)
            for _nstype, saved_fd in saved:
                os.close(saved_fd)
            os.close(cwd)
            os.close(root)
            if done_r >= 0:
                os.close(done_r)
            childsetup.child_setup(reply, fds, -1, done_w)
            _close(conn, fds)
            childsetup.run_setup(setup)
            confine.confine_child(reply)
            return 0
        try:
            childsetup.wait_done(done_r, done_w)
            # Reported while signals are still blocked, so that a handler raising once they
            # are let through cannot leave a process that nobody knows of. No need to wait:
            # the keeper holds the service's end of this connection during a fork, so the
            # report outlives a crash of the service and a new one reads it.
            conn.send(protocol.StartedNoReply(pid=pid), [pidfd])
        except BaseException:
            linux.pidfd_send_signal(pidfd, signal.SIGKILL)  # no half-made process is left
            if not clone_parent:  # else our parent's child: it reaps
                os.waitpid(pid, 0)
            raise
        finally:
            os.close(pidfd)
            _close(conn, fds)
    finally:
        if not in_child:
            _restore(saved, cwd, root)
        linux.restore_signals(old_mask)
    return pid


# The one plan this process keeps (root, single-threaded callers only).
plans = forkplans.Plans()


def drop_fork_plan(fd: int) -> None:
    """Forget the plan of the first fork into the container behind `fd`, if this process
    keeps one: for a caller that will not fork into it itself (its fds pin the container's
    namespaces and root)."""
    plan = plans.plan
    if plan is not None and forkplans.file_id(fd) == plan.handle:
        plans.drop()


def _fork_ahead(handle: int, plan: forkplans.Plan, setup: Setup | None = None) -> int:
    """Root's first fork into the container it created: the namespaces of the plan are
    entered while the Fork request travels (on the create's connection), and the process
    is made once the reply confirms that plan (any other reply is followed instead)."""
    try:
        conn = send_planned_fork(plan.conn, handle)
    except BaseException:
        forkplans.close_fds(plan.fds)
        raise
    try:
        return _fork_here(conn, None, [], plan, setup=setup)
    except BaseException:
        conn.close()
        raise


def send_planned_fork(conn: Connection, handle: int, planned: bool = False) -> Connection:
    """Send Fork(keep=1, planned) for `handle` on a plan's connection (the create's); the
    connection it went on. A service gone since (restarted) read nothing of it: the one that
    answers now is asked on a new connection. Closes what it fails on."""
    req = protocol.Fork(keep=1, planned=int(planned))
    try:
        try:
            conn.send(req, [handle])
        except (BrokenPipeError, ConnectionResetError):
            conn.close()
            conn = Connection()
            conn.send(req, [handle])
    except BaseException:
        conn.close()
        raise
    return conn


# How long the planned fork waits for the Fork reply with signals blocked, standing in the
# container; a reply slower than this (another fork under way) is waited for outside.
PLAN_WAIT_MS = 50


def _enter_planned(conn: Connection, plan: forkplans.Plan, saved: list[tuple[str, int]], cwd: int,
                   root: int) -> tuple[replies.ForkGrant, list[int], int | None] | None:
    """Enter the plan, then read the Fork reply: (reply, its fds, the cgroup fd to fork
    into), the cgroup fd None if the reply is not the plan; None if the reply is slow to
    come. In both of those cases nothing of the plan is entered any more. Raises the
    service's error, with nothing entered, if it refuses the fork."""
    try:
        try:
            cgroup_fd: int | None = _enter(plan.reply, plan.fds, saved)
        except OSError:
            cgroup_fd = None
        poller = select.poll()
        poller.register(conn.sock, select.POLLIN)
        if not poller.poll(PLAN_WAIT_MS):
            _go_back(saved, cwd, root)
            return None
        try:
            reply, fds = conn.receive(replies.ForkGrant)
        except BaseException:
            _go_back(saved, cwd, root)
            raise
        try:
            if cgroup_fd is not None and _confirms(plan, reply, fds):
                cgroup_fd = fds[reply.fds.index("cgroup")] if "cgroup" in reply.fds else -1
            else:
                _go_back(saved, cwd, root)
                cgroup_fd = None
        except BaseException:
            forkplans.close_fds(fds)
            raise
    finally:
        forkplans.close_fds(plan.fds)
    return reply, fds, cgroup_fd


def _confirms(plan: forkplans.Plan, reply: replies.ForkGrant, fds: list[int]) -> bool:
    """Whether the service's Fork reply is the plan the process was made from."""
    return (reply == plan.reply and len(fds) == len(plan.fds)
            and all(linux.same_file(a, b) for a, b in zip(fds, plan.fds)))


def _restore(saved: list[tuple[str, int]], cwd: int, root: int) -> None:
    """Put the calling thread back where it stood, and close `cwd` and `root`."""
    try:
        _go_back(saved, cwd, root)
    finally:
        os.close(cwd)
        os.close(root)


def _go_back(saved: list[tuple[str, int]], cwd: int, root: int) -> None:
    """Leave what _enter entered (in reverse order of entry): namespaces, root and cwd."""
    while saved:  # each taken off as it is left, so a failure never leaves it twice
        nstype, fd = saved.pop()
        try:
            linux.setns(fd, linux.NS_FLAGS[nstype])
        finally:
            os.close(fd)
    if _moved(root):  # leaving a mount namespace put us at its root, not at ours
        os.fchdir(root)
        os.chroot(".")
    os.fchdir(cwd)


def _moved(root: int) -> bool:
    """Whether the root we stand in is another place than `root` (another mount of the
    same tree counts: a bind or a copy shows the same inode)."""
    here = os.open("/", os.O_PATH | os.O_CLOEXEC)
    try:
        return not linux.same_place(root, here)
    finally:
        os.close(here)


def _via_intermediate(handle: int, conn: Connection | None,
                      reply: replies.ForkGrant | None,
                      fds: list[int], setup: Setup | None = None) -> int:
    """Fork an intermediate that enters and makes the process with CLONE_PARENT."""
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    try:
        mid = os.fork()
    except BaseException:
        os.close(rfd)
        os.close(wfd)
        if conn:
            _close(conn, fds)
        raise
    if mid == 0:
        os.close(rfd)
        if _intermediate(handle, wfd, conn, reply, fds, setup):
            return 0  # we are the new process in the container
        os._exit(0)
    os.close(wfd)
    if conn:
        _close(conn, fds)  # the intermediate has its own copies
    try:
        data = b""
        while chunk := os.read(rfd, 4096):
            data += chunk
    finally:
        os.close(rfd)
        _, status = os.waitpid(mid, 0)
    if not data:
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            # Killed with the container (it stands in its cgroup while it works).
            raise OSError(errno.ECANCELED, "fork_into_container: the container was killed")
        raise OSError(errno.EIO, "fork_into_container: the intermediate process died")
    result = json.loads(data)
    if "errno" in result:
        if result.get("reap"):
            os.waitpid(result["reap"], 0)
        raise OSError(result["errno"], result["message"])
    return int(result["pid"])





def _enter(reply: replies.ForkGrant, fds: list[int],
           saved: list[tuple[str, int]] | None = None,
           visible_proc: list[int] | None = None) -> int:
    """Enter what the service handed over; return the cgroup fd or -1.

    With `saved`, keep an fd of each namespace left, so the caller can come back. Everything
    of our own is opened first: once in the container's mount namespace /proc may not exist.
    With `visible_proc`, for an init that must mount procs in a mount namespace of the
    container's user namespace: an fd of a copy, made in that user namespace, of the mount
    namespace we stand in (where a proc is fully visible) is appended to it.
    """
    own = {t: os.open(f"/proc/thread-self/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
           for t, name in _OWN_NS_FILES}
    cgroup_fd = -1
    in_userns = False
    try:
        for name, fd in zip(reply.fds, fds):
            kind, _, nstype = name.partition(":")
            if kind == "ns":
                if not linux.same_file(fd, own[nstype]):
                    if (nstype == "mnt" and in_userns and visible_proc is not None
                            and reply.proc_paths):
                        # The kernel mounts a proc in a user namespace only where one is
                        # fully visible already (mount_too_revealing); the container's root
                        # has none before init's. A copy of the caller's mount namespace
                        # (its own /proc in view) made here, in the container's user
                        # namespace, is where init will mount its own, then come back.
                        linux.unshare(linux.CLONE_NEWNS)
                        visible_proc.append(os.open("/proc/thread-self/ns/mnt",
                                                    os.O_RDONLY | os.O_CLOEXEC))
                    if saved is not None:
                        saved.append((nstype, own.pop(nstype)))
                    linux.setns(fd, linux.NS_FLAGS[nstype])
                    in_userns = in_userns or nstype == "user"
            elif kind == "root":
                # Compared with the root we stand in now: entering a mount namespace moved
                # us to its root.
                if _moved(fd):
                    os.fchdir(fd)
                    os.chroot(".")
                os.chdir("/")
            elif kind == "cgroup":
                cgroup_fd = fd
        if reply.new_pid_ns:
            if saved is not None:
                saved.append(("pid", own.pop("pid")))
            linux.unshare(linux.CLONE_NEWPID)
    finally:
        for fd in own.values():
            os.close(fd)
    return cgroup_fd


def _intermediate(handle: int, wfd: int, conn: Connection | None,
                  reply: replies.ForkGrant | None,
                  fds: list[int], setup: Setup | None = None) -> bool:
    """Run in the short-lived intermediate; True only in the new process, which must return 0."""
    result: dict[str, Any]
    reap = 0
    # Root's fork asked the service to keep its connection (Fork(keep=1)): the report can be
    # one way. Others wait for it to be recorded: the service must first move this
    # intermediate out of the container's cgroup, or a fast-dying init would take it along.
    one_way = conn is not None
    try:
        if conn is None:
            conn = Connection()
            reply, fds = conn.call(protocol.Fork(), [handle])
        assert reply is not None  # the caller's, or read above
        visible_proc: list[int] = []
        done_r, done_w = childsetup.done_pipe(reply)
        try:
            # Keyring names are per user namespace: join before entering the container's.
            keys.join_container_keyring(reply)
            cgroup_fd = _enter(reply, fds, visible_proc=visible_proc)
            # CLONE_PARENT makes the caller the parent; the kernel then wants exit_signal 0 and
            # gives the child the intermediate's own exit signal (SIGCHLD), so waitpid works.
            pid, pidfd = linux.clone3_fork(linux.CLONE_PARENT, 0, cgroup_fd)
        except OSError as e:
            conn.send(protocol.ForkFailed(errno=e.errno or errno.EIO))
            raise
        if pid == 0:
            childsetup.join_groups(reply, fds)
            keys.enter_container(conn, reply, join=False)
            os.close(wfd)
            if done_r >= 0:
                os.close(done_r)
            childsetup.child_setup(reply, fds, visible_proc[0] if visible_proc else -1, done_w)
            _close(conn, fds)
            childsetup.run_setup(setup)
            confine.confine_child(reply)
            return True
        forkplans.close_fds(visible_proc)
        try:
            childsetup.wait_done(done_r, done_w)
            if one_way:
                conn.send(protocol.StartedNoReply(pid=pid), [pidfd])
            else:
                conn.call(protocol.Started(pid=pid), [pidfd])
        except OSError:
            # No half-made process is left: kill it; the caller, its parent, reaps it.
            linux.pidfd_send_signal(pidfd, signal.SIGKILL)
            reap = pid
            raise
        result = {"pid": pid}
    except OSError as e:
        result = {"errno": e.errno or errno.EIO, "message": e.strerror or str(e), "reap": reap}
    except BaseException as e:  # never let the intermediate run on as a second caller
        result = {"errno": errno.EIO, "message": f"fork_into_container: {e!r}"}
    try:
        os.write(wfd, json.dumps(result).encode())
    finally:
        os._exit(0)
