"""The runtime's side of making a container and its processes: the container object through
the service, then init (or an exec'd process) forked into it, told what to do inside
(inside.py) and waited for until it is ready.

Order of `create`, each step before the next because of what it needs:
1. the whole config checked (config.py): nothing is made for a bad one;
2. the state directory claimed (the id is ours);
3. namespaces given by path joined by this process (a type not asked for is the creator's,
   so the container takes them);
4. container_create (an empty mount namespace; no kill-on-close: it outlives us), then its
   limits, capability mask and seccomp profile (init is born under them), its root (a bind of
   root.path) and the bind mounts' detached trees (their sources are only visible here);
5. init forked in: it mounts and sets up inside before the confinement applies, then says
   "ready" and waits on exec.fifo for `start`;
6. the state written, the createRuntime hooks run, the pid file written last: only then is
   the container reported created.
A failure after step 4 kills the container and removes the state: nothing is left.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import subprocess
from dataclasses import dataclass
from typing import Any

import syscalls
from syscalls import linux

from . import final, inside, state
from .config import Bundle, OciError, Process, load_bundle, seccomp_for_service
from .mountopts import MOUNT_ATTR_NODEV

OPEN_TREE_CLONE = 0x1


@dataclass
class Made:
    """A process made in a container: its pid (our child) and the pty master we kept (-1)."""
    pid: int
    master: int = -1


def send_console(path: str, master: int, name: str) -> None:
    """The pty master to the engine's console socket: one message, the fd and its name."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
        socket.send_fds(s, [name.encode()], [master])
    except OSError as e:
        raise OciError(f"socket {path}: {(e.strerror or str(e)).lower()}") from None
    finally:
        s.close()


def await_ready(chan: socket.socket, pid: int, console_socket: str | None) -> int:
    """Read the new process's messages until "ok": the pty master goes to the console socket
    (or is returned, to relay, if there is none). OciError with its own message if it
    failed; a process that died silently is reaped and its status reported."""
    master = -1
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(chan, 65536, 4)
        except InterruptedError:
            continue
        if not msg:
            for fd in fds:
                os.close(fd)
            break
        data = json.loads(msg)
        if "pty" in data and fds:
            if console_socket:
                try:
                    send_console(console_socket, fds[0], data["pty"])
                finally:
                    os.close(fds[0])
            else:
                master = fds[0]
        elif "error" in data:
            raise OciError(data["error"])
        elif data.get("ok"):
            return master
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == -9:
        raise OciError("container process was killed (SIGKILL) before it was ready: out of "
                       "memory under linux.resources.memory.limit, or killed by someone")
    raise OciError(f"container process exited ({'signal ' + str(-code) if code < 0 else code})"
                   " before it was ready (its reason, if any, is on the runtime's stderr)")


def send_pidfd(path: str | None, pid: int) -> None:
    """With --pidfd-socket: a pidfd of the new process, sent as runc 1.2 sends it."""
    if not path:
        return
    fd = os.pidfd_open(pid)
    try:
        send_console(path, fd, "pidfd")
    finally:
        os.close(fd)


def write_pid_file(path: str | None, pid: int) -> None:
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(str(pid))
    os.rename(tmp, path)


def run_hooks(hooks: list[dict[str, Any]], st: dict[str, Any], what: str) -> None:
    """OCI hooks (`path`, `args`, `env`, `timeout`), the state JSON on their stdin."""
    for i, hook in enumerate(hooks):
        args = hook.get("args") or [hook["path"]]
        env = dict(e.partition("=")[::2] for e in hook.get("env") or [])
        try:
            res = subprocess.run(args, executable=hook["path"], input=json.dumps(st).encode(),
                                 env=env, capture_output=True, timeout=hook.get("timeout"))
        except (OSError, subprocess.TimeoutExpired) as e:
            raise OciError(f"hooks.{what}[{i}]: {e}") from None
        if res.returncode != 0:
            raise OciError(f"hooks.{what}[{i}]: {hook['path']} exited {res.returncode}: "
                           f"{res.stderr.decode(errors='replace').strip()}")


def _join(joins: list[tuple[str, str]]) -> None:
    """Enter the namespaces given by path (config checked they exist)."""
    fds = []
    try:
        for nstype, path in joins:
            fds.append((nstype, path, os.open(path, os.O_RDONLY | os.O_CLOEXEC)))
        for nstype, path, fd in fds:
            try:
                linux.setns(fd, linux.NS_FLAGS[nstype])
            except OSError as e:
                raise OciError(f"linux.namespaces: joining {path}: {e.strerror}") from None
    finally:
        for _t, _p, fd in fds:
            os.close(fd)


def _bind_trees(b: Bundle) -> list[int]:
    """A detached copy of each bind mount's source, with its attributes (-1 for others)."""
    trees: list[int] = []
    try:
        for m in b.mounts:
            if m.type != "bind":
                trees.append(-1)
                continue
            rec = linux.AT_RECURSIVE if m.recursive else 0
            try:
                tree = linux.open_tree(linux.AT_FDCWD, m.source,
                                       OPEN_TREE_CLONE | os.O_CLOEXEC | rec)
            except OSError as e:
                raise OciError(f"{m.where}: binding {m.source}: {e.strerror}") from None
            trees.append(tree)
            if m.attr_set or m.attr_clr:
                try:
                    linux.mount_setattr(tree, "", linux.AT_EMPTY_PATH | rec, m.attr_set,
                                        m.attr_clr)
                except OSError as e:
                    raise OciError(f"{m.where}.options: {e.strerror}") from None
    except BaseException:
        for t in trees:
            if t >= 0:
                os.close(t)
        raise
    return trees


def _configure(cfd: int, b: Bundle) -> None:
    """Limits, confinement and root of the container, before its init exists."""
    for name, value in b.limits:
        try:
            syscalls.container_set_limit(cfd, name, value)
        except OSError as e:
            raise OciError(f"linux.resources: {name} {value}: {e.strerror or e}") from None
    if b.swap is not None:
        try:
            syscalls.container_set_limit(cfd, "memory.swap.max", b.swap)
        except OSError:
            pass  # no swap accounting on this host: the memory limit alone holds
    if b.process.caps is not None:
        syscalls.container_set_caps(cfd, b.process.caps["bounding"])
    if b.seccomp is not None:
        try:
            syscalls.container_set_seccomp(cfd, seccomp_for_service(b.seccomp))
        except OSError as e:
            raise OciError(f"linux.seccomp: {e.strerror or e}") from None
    try:
        tree = linux.open_tree(linux.AT_FDCWD, b.rootfs,
                               OPEN_TREE_CLONE | os.O_CLOEXEC | linux.AT_RECURSIVE)
    except OSError as e:
        raise OciError(f"root.path: binding {b.rootfs}: {e.strerror}") from None
    try:
        if any(m.destination.rstrip("/") == "/dev" and m.type == "tmpfs" for m in b.mounts):
            # No device cgroup here (runc's guard): the image's own device nodes must not
            # open, only those made in the /dev tmpfs (defaults and linux.devices there).
            try:
                linux.mount_setattr(tree, "", linux.AT_EMPTY_PATH | linux.AT_RECURSIVE,
                                    MOUNT_ATTR_NODEV, 0)
            except OSError as e:
                raise OciError(f"root.path: nodev on {b.rootfs}: {e.strerror}") from None
        syscalls.move_mount(tree, "", cfd, "/", syscalls.MOVE_MOUNT_F_EMPTY_PATH
                            | syscalls.MOVE_MOUNT_T_CONTAINER_ROOT)
    finally:
        os.close(tree)


def create(root: str, cid: str, bundle_dir: str, *, pid_file: str | None,
           console_socket: str | None, preserve_fds: int, detach: bool = True,
           socket_path: str | None = None, pidfd_socket: str | None = None
           ) -> tuple[state.State, Made]:
    """Make container `cid` from the bundle, its init waiting for `start`."""
    b = load_bundle(bundle_dir)
    if b.process.terminal and not console_socket and detach:
        raise OciError("cannot allocate tty if runc will detach without setting console socket")
    if console_socket and not b.process.terminal:
        raise OciError("cannot use console socket if runc will not detach or allocate tty")
    for name, hooks in b.hooks.items():
        if hooks and name in ("createContainer", "startContainer"):
            raise OciError(f"hooks.{name}: not supported (hooks run in the runtime's "
                           "namespaces only)")
    sdir = state.make_dir(root, cid)
    cfd = -1
    pid = 0
    trees: list[int] = []
    try:
        _join(b.joins)
        flags = (b.flags | syscalls.CONTAINER_NEW_EMPTY_FS_NS | syscalls.CONTAINER_FD_CLOEXEC)
        cfd = syscalls.container_create(cid[:23], flags)
        _configure(cfd, b)
        trees = _bind_trees(b)
        fifo = os.path.join(sdir, "exec.fifo")
        os.mkfifo(fifo, 0o600)
        fifo_fd = os.open(fifo, os.O_RDWR | os.O_CLOEXEC)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        chan = inside.Channel(child)
        # Our /proc: init learns its cgroup there, not from the image's /proc (inside.py).
        host_proc = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        shared: dict[str, Any] = {"host_proc": host_proc}
        try:
            pid = syscalls.fork_into_container(
                cfd, before_confinement=lambda: inside.setup_init(b, trees, chan, shared))
        except BaseException:
            os.close(host_proc)
            raise
        if pid == 0:
            parent.close()
            final.finish(b.process, chan, shared, fifo_fd, preserve_fds)
        os.close(host_proc)
        child.close()
        os.close(fifo_fd)
        for t in trees:
            if t >= 0:
                os.close(t)
        trees = []
        try:
            master = await_ready(parent, pid, console_socket)
        finally:
            parent.close()
        start = state.start_time(pid)
        if start is None:
            raise OciError("container init died during create")
        st = state.State(id=cid, cfs_id=int(syscalls.container_status(cfd)["id"]), pid=pid,
                         pid_start=start, bundle=b.path, rootfs=b.rootfs, created=state.now(),
                         socket=socket_path or os.environ.get("CONTAINERFS_SOCKET", ""),
                         annotations=b.annotations, hooks=b.hooks)
        state.save(root, st)
        hook_state = state.oci_state(st, "created")
        run_hooks(b.hooks.get("createRuntime", []) + b.hooks.get("prestart", []), hook_state,
                  "createRuntime")
        send_pidfd(pidfd_socket, pid)
        # Last: a pid file is the engine's word that the container exists, and must never be
        # left naming a pid that this failure path has just killed.
        write_pid_file(pid_file, pid)
        return st, Made(pid, master)
    except BaseException:
        for t in trees:
            if t >= 0:
                os.close(t)
        if cfd >= 0:
            try:
                syscalls.container_kill(cfd)
            except OSError:
                pass
        if pid > 0:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        state.remove(root, cid)
        raise
    finally:
        if cfd >= 0:
            os.close(cfd)


def exec_in(st: state.State, cfd: int, proc: Process, *, console_socket: str | None,
            pid_file: str | None, preserve_fds: int, pidfd_socket: str | None = None) -> Made:
    """A process forked into the living container behind `cfd`, set up as `proc` says."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    chan = inside.Channel(child)
    shared: dict[str, Any] = {}
    try:
        pid = syscalls.fork_into_container(
            cfd, before_confinement=lambda: inside.setup_exec(proc, chan, shared))
    except OSError as e:
        parent.close()
        child.close()
        if e.errno == errno.ECANCELED:
            raise OciError("cannot exec in a stopped container") from None
        raise
    if pid == 0:
        parent.close()
        final.finish(proc, chan, shared, -1, preserve_fds)
    child.close()
    try:
        master = await_ready(parent, pid, console_socket)
    finally:
        parent.close()
    write_pid_file(pid_file, pid)
    send_pidfd(pidfd_socket, pid)
    return Made(pid, master)


def wait_dead(cfd: int, timeout: float = 10.0) -> bool:
    """Whether the container behind `cfd` is dead (POLLHUP) within `timeout` seconds."""
    poller = select.poll()
    poller.register(cfd, select.POLLHUP)
    return bool(poller.poll(int(timeout * 1000)))
