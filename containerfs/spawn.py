"""run and popen in a container, with subprocess's signatures and semantics, without forking
the calling process: a helper (syscalls/spawnhelper.py), started with posix_spawn (vfork) once
per process as a spawn server (or once per command), enters the container and makes the
process with CLONE_PARENT, so the caller is its parent (Popen.wait, poll, kill and
send_signal work as for any child)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import termios
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import syscalls
from syscalls import cspawn
from syscalls.container import drop_fork_plan

# The helper program: no site, no environment, only our package on its path.
_PKG_PARENT = str(Path(syscalls.__file__).resolve().parent.parent)
_HELPER_CODE = ("import sys; sys.path.insert(0, %r); "
                "from syscalls.spawnhelper import main; main()" % _PKG_PARENT)
_HELPER_ARGV = [sys.executable, "-I", "-S", "-c", _HELPER_CODE]


class _Server:
    """This process's spawn server: a helper started once, kept single-threaded, that makes
    each process with CLONE_PARENT (directly, or through a copy of itself that is our child),
    so that interpreter start and imports are paid once. One request at a time; a new server
    after a fork of ours or if it died."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.pid = 0
        self.owner = 0

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX,
                                         socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            env = {k: v for k, v in os.environ.items() if k == "CONTAINERFS_SOCKET"}
            actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                       (os.POSIX_SPAWN_DUP2, theirs.fileno(), 3)]
            self.pid = os.posix_spawn(_HELPER_ARGV[0], _HELPER_ARGV + ["serve"], env,
                                      file_actions=actions, setsigmask=())
        finally:
            theirs.close()
        self.sock, self.owner = ours, os.getpid()
        return ours

    def _stop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass

    def spawn(self, spec: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """Ask the server to make the process; its reply. A server found dead before the
        request (it read nothing) is replaced once; one that dies after reading it gives EIO:
        asking again could make a second process."""
        with self.lock:
            if self.owner != os.getpid() and self.sock is not None:
                # forked: that server is our parent's; drop our copy of its socket
                self.sock.close()
                self.sock = None
            sock = self.sock or self._start()
            msg = [json.dumps(spec).encode()]
            try:
                socket.send_fds(sock, msg, fds)
            except (BrokenPipeError, ConnectionResetError):
                self._stop()
                sock = self._start()
                socket.send_fds(sock, msg, fds)
            try:
                data = sock.recv(4096)
            except OSError:
                data = b""
            if not data:
                self._stop()
                raise OSError(errno.EIO, "the spawn server died while making a process")
            result: dict[str, Any] = json.loads(data)
            return result

    def after_fork_in_child(self) -> None:
        """A fork of ours: that server is our parent's; a lock another thread held is free."""
        self.lock = threading.Lock()
        if self.sock is not None:
            self.sock.close()
            self.sock = None


_server = _Server()
os.register_at_fork(after_in_child=_server.after_fork_in_child)


# Popen arguments that would act on the host, or that the helper cannot honour.
_REFUSED = ("preexec_fn", "group", "extra_groups", "umask", "process_group",
            "start_new_session", "pass_fds", "startupinfo", "creationflags")


class ContainerPopen(subprocess.Popen):  # type: ignore[type-arg]
    """A subprocess.Popen whose process runs in a container (its pid as the caller sees it).

    `user=(uid, gid)` sets the process's ids inside (groups cleared); `cwd` is inside;
    `pty=True` gives it a new terminal as stdin, stdout and stderr (unless given), its master
    fd in `.pty`, and `resize(rows, cols)`.
    """

    def __init__(self, container: Any, args: Any, *, user: tuple[int, int] | None = None,
                 pty: bool = False, on_init: Callable[[int], None] | None = None,
                 **kwargs: Any) -> None:
        for name in _REFUSED:
            if name in kwargs:
                raise TypeError(f"popen in a container: {name} is not supported")
        if user is not None and not (isinstance(user, tuple) and len(user) == 2 and all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in user)):
            raise TypeError(f"popen in a container: user must be (uid, gid), not {user!r}")
        if not kwargs.pop("close_fds", True):
            raise TypeError("popen in a container: close_fds=False is not supported")
        self._container = container
        self._inner_user = user
        self._on_init = on_init
        self._want_pty = pty
        self.pty = -1
        slave = -1
        if pty:
            self.pty, slave = os.openpty()
            os.set_inheritable(self.pty, False)
            for k in ("stdin", "stdout", "stderr"):
                kwargs.setdefault(k, slave)
        try:
            super().__init__(args, **kwargs)
        except BaseException:
            if self.pty >= 0:
                os.close(self.pty)
                self.pty = -1
            raise
        finally:
            if slave >= 0:
                os.close(slave)

    def resize(self, rows: int, cols: int) -> None:
        """Set the terminal's window size (TIOCSWINSZ); the process gets SIGWINCH."""
        if self.pty < 0:
            raise ValueError("resize: this process has no terminal (popen(..., pty=True))")
        import struct
        fcntl.ioctl(self.pty, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def close_pty(self) -> None:
        """Close the terminal's master fd (once)."""
        if self.pty >= 0:
            os.close(self.pty)
            self.pty = -1

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self.close_pty()

    def _execute_child(self, args: Any, executable: Any, preexec_fn: Any, close_fds: Any,
                       pass_fds: Any, cwd: Any, env: Any, startupinfo: Any,
                       creationflags: Any, shell: bool, p2cread: int, p2cwrite: int,
                       c2pread: int, c2pwrite: int, errread: int, errwrite: int,
                       *_rest: Any) -> None:
        if isinstance(args, (str, bytes)):
            args = [args]
        elif isinstance(args, os.PathLike):
            args = [args]
        else:
            args = list(args)
        if shell:
            args = ["/bin/sh", "-c"] + args
        argv = [os.fsdecode(a) for a in args]
        if not argv:
            raise IndexError("list index out of range")  # what subprocess raises
        spec = {
            "argv": argv,
            "executable": os.fsdecode(executable) if executable is not None else argv[0],
            # None: ours, as it is at the spawn (only the paths that send it decode it).
            "env": None if env is None else {os.fsdecode(k): os.fsdecode(v)
                                             for k, v in env.items()},
            "cwd": os.fsdecode(cwd) if cwd is not None else None,
            "user": list(self._inner_user) if self._inner_user is not None else None,
            "pty": self._want_pty,
        }
        try:
            self.pid = _spawn(self._container, spec, (p2cread, c2pwrite, errwrite),
                              self._on_init)
            self._child_created = True
        finally:
            self._close_pipe_fds(  # type: ignore[attr-defined]
                p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)


def _high(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)


def _read_all(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
    return data


def _stdio_actions(stdio: tuple[int, int, int], owned: list[int]) -> list[tuple[Any, ...]]:
    """posix_spawn file actions putting `stdio` at 0, 1 and 2 (-1: inherit ours, as
    subprocess does), each from a copy above 2 (so no dup2 clobbers another's source),
    appended to `owned` for the caller to close."""
    actions: list[tuple[Any, ...]] = []
    for src, target in zip(stdio, (0, 1, 2)):
        if src != -1:
            owned.append(_high(src))
            actions.append((os.POSIX_SPAWN_DUP2, owned[-1], target))
    return actions


def _by_helper(container: Any, spec: dict[str, Any], stdio: tuple[int, int, int],
               err_w: int, go_r: int) -> dict[str, Any]:
    """Make the process through a helper of its own (posix_spawn); the helper's reply."""
    owned: list[int] = []
    try:
        actions = _stdio_actions(stdio, owned)
        result_r, result_w = os.pipe2(os.O_CLOEXEC)
        owned += [result_r, result_w]
        spec_fd = os.memfd_create("containerfs-spawn", os.MFD_CLOEXEC)
        owned.append(spec_fd)
        os.write(spec_fd, json.dumps(_with_env(spec)).encode())
        os.lseek(spec_fd, 0, os.SEEK_SET)
        owned.append(_high(container.fd))
        extra = [(owned[-1], 3), (result_w, 4), (err_w, 5), (spec_fd, 6)]
        if go_r >= 0:
            extra.append((go_r, 7))
        actions += [(os.POSIX_SPAWN_DUP2, fd, target) for fd, target in extra]
        helper_env = {k: v for k, v in os.environ.items() if k == "CONTAINERFS_SOCKET"}
        helper = os.posix_spawn(_HELPER_ARGV[0], _HELPER_ARGV, helper_env, file_actions=actions,
                                setsigmask=(), setsigdef=(signal.SIGPIPE,))
        os.close(result_w)
        owned.remove(result_w)
        try:
            data = _read_all(result_r)
        finally:
            os.waitpid(helper, 0)
        result: dict[str, Any] = (json.loads(data) if data else
                                  {"errno": errno.EIO, "message": "the spawn helper died"})
        return result
    finally:
        for fd in owned:
            os.close(fd)


def _by_server(container: Any, spec: dict[str, Any], stdio: tuple[int, int, int],
               err_w: int, go_r: int, mode: str) -> dict[str, Any]:
    """Make the process through this process's spawn server: its fork (`mode` "fork": root,
    no user namespace to enter) or a copy of it that does what a helper of its own would
    ("intermediate"); the reply, as a helper gives it."""
    spec = dict(_with_env(spec), mode=mode, socket=os.environ.get("CONTAINERFS_SOCKET"), default_signals=[
        name for name in ("SIGINT", "SIGQUIT")
        if signal.getsignal(getattr(signal, name)) != signal.SIG_IGN])
    fds = [container.fd] + [src if src != -1 else i for i, src in enumerate(stdio)] + [err_w]
    if mode == "fork":
        if go_r >= 0:
            fds.append(go_r)
        return _server.spawn(spec, fds)
    result_r, result_w = os.pipe2(os.O_CLOEXEC)
    try:
        fds.append(result_w)
        if go_r >= 0:
            fds.append(go_r)
        reply = _server.spawn(spec, fds)
        os.close(result_w)
        result_w = -1
        if "helper" not in reply:
            return reply
        try:
            data = _read_all(result_r)
        finally:
            os.waitpid(reply["helper"], 0)  # the copy is our child (CLONE_PARENT)
        result: dict[str, Any] = (json.loads(data) if data else
                                  {"errno": errno.EIO, "message": "the spawn helper died"})
        return result
    finally:
        os.close(result_r)
        if result_w >= 0:
            os.close(result_w)


def _with_env(spec: dict[str, Any]) -> dict[str, Any]:
    """`spec` with the environment spelled out (for a process that does not have ours)."""
    if spec["env"] is not None:
        return spec
    return dict(spec, env={os.fsdecode(k): os.fsdecode(v) for k, v in os.environb.items()})


def _by_cspawn(container: Any, spec: dict[str, Any], stdio: tuple[int, int, int]) -> int:
    """Make the process here with container_spawn (compiled, vfork: nothing of ours is
    copied); its pid, or the OSError subprocess would raise. EAGAIN, with nothing made, where
    only the spawn server can make it."""
    owned: list[int] = []
    try:
        actions = _stdio_actions(stdio, owned)
        return syscalls.container_spawn(
            container.fd, spec["executable"], spec["argv"], spec["env"], file_actions=actions,
            setsid=spec["pty"], ctty=spec["pty"],
            user=tuple(spec["user"]) if spec["user"] is not None else None, cwd=spec["cwd"],
            # What the spawn server's processes get: Python's ignored signals back to their
            # defaults, nothing blocked.
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ), setsigmask=())
    finally:
        for fd in owned:
            os.close(fd)


def _spawn(container: Any, spec: dict[str, Any], stdio: tuple[int, int, int],
           on_init: Callable[[int], None] | None) -> int:
    """Make the process; return its pid once its command runs, or raise the OSError
    subprocess would (the step named for a setup step)."""
    if USE_CSPAWN and on_init is None and os.geteuid() == 0 and cspawn.available():
        try:
            return _by_cspawn(container, spec, stdio)
        except BlockingIOError:
            pass  # the spawn server can: below
    # The server makes it: a plan of this process's first fork is of no use.
    drop_fork_plan(container.fd)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    go_r = go_w = -1
    try:
        if on_init is not None:
            spec["go"] = True
            go_r, go_w = os.pipe2(os.O_CLOEXEC)
        if not USE_SERVER:
            result = _by_helper(container, spec, stdio, err_w, go_r)
        else:
            result = {"errno": errno.EAGAIN}
            if os.geteuid() == 0 and not getattr(container, "user_ns", False):
                result = _by_server(container, spec, stdio, err_w, go_r, "fork")
            if result.get("errno") == errno.EAGAIN:  # a user namespace to enter
                result = _by_server(container, spec, stdio, err_w, go_r, "intermediate")
        os.close(err_w)
        err_w = -1
        if go_r >= 0:
            os.close(go_r)
            go_r = -1
        if "errno" in result:
            if result.get("reap"):
                os.waitpid(result["reap"], 0)
            raise OSError(result["errno"], f"fork_into_container: {result['message']}")
        pid = int(result["pid"])
        if on_init is not None:
            try:
                on_init(pid)
            except BaseException:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise
            finally:
                os.close(go_w)
                go_w = -1
        failure = _read_all(err_r)
        if failure:
            os.waitpid(pid, 0)
            step, _, num = failure.decode().partition(":")
            code = int(num)
            if step == "exec":
                raise OSError(code, os.strerror(code), spec["executable"])
            if step == "chdir":
                raise OSError(code, os.strerror(code), spec["cwd"])
            raise OSError(code, f"{step}: {os.strerror(code)}")
        return pid
    finally:
        for fd in (err_r, err_w, go_r, go_w):
            if fd >= 0:
                os.close(fd)


# Whether processes are made by the spawn server (else a helper each, started for it), and
# whether the compiled path is tried first (root, where it is built).
USE_SERVER = True
USE_CSPAWN = True


def run(popen: Callable[..., ContainerPopen], args: Any, *, input: Any = None, capture_output: bool = False,
        timeout: float | None = None, check: bool = False,
        **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """subprocess.run in the container: same arguments, result and exceptions."""
    if input is not None:
        if kwargs.get("stdin") is not None:
            raise ValueError("stdin and input arguments may not both be used.")
        kwargs["stdin"] = subprocess.PIPE
    if capture_output:
        if kwargs.get("stdout") is not None or kwargs.get("stderr") is not None:
            raise ValueError("stdout and stderr arguments may not be used "
                             "with capture_output.")
        kwargs["stdout"] = subprocess.PIPE
        kwargs["stderr"] = subprocess.PIPE
    with popen(args, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            process.kill()
            exc.stdout, exc.stderr = process.communicate()
            raise
        except BaseException:
            process.kill()
            raise
        retcode = process.wait()
        if check and retcode:
            raise subprocess.CalledProcessError(retcode, process.args, output=stdout,
                                                stderr=stderr)
    return subprocess.CompletedProcess(process.args, retcode, stdout, stderr)


__all__ = ["ContainerPopen", "run"]
