"""The helper program that containerfs's run/popen start with posix_spawn (vfork), as a
spawn server kept per calling process (`serve`) or for one process: it enters the container
as fork_into_container's intermediate does (or the server forks on its fast path) and makes
the new process with CLONE_PARENT, so the caller, not this helper, is its parent; that
process then execs the command. The caller never forks itself. The one-shot layout:

fds, as the caller lays them out: 0-2 the command's stdio, 3 the container handle, 4 where this
helper writes {"pid": N} or {"errno", "message"} before it exits, 5 where the new process
writes "STEP:ERRNO" if it cannot exec (close-on-exec: EOF means the exec happened), 6 the spec
(JSON: argv, executable, env, cwd, user, pty, go), 7 (if go) a pipe the new process reads to
EOF before its program: the caller sets the hostname of a new init meanwhile.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
from typing import Any, NoReturn

from . import linux
from .container import _intermediate, fork_into_container

HANDLE, RESULT, EXEC_ERR, SPEC, GO = 3, 4, 5, 6, 7


def main() -> NoReturn:
    """Run the helper for one process; with argument "serve", the spawn server."""
    import sys
    if sys.argv[1:] == ["serve"]:
        serve()
    _once()


def _once() -> NoReturn:
    """Make the process, which then runs the spec's command."""
    with os.fdopen(SPEC, "rb") as f:
        spec: dict[str, Any] = json.loads(f.read())
    last = GO if spec.get("go") else SPEC
    os.closerange(last + 1, os.sysconf("SC_OPEN_MAX"))  # close_fds=True, as subprocess does
    for fd in (HANDLE, RESULT, EXEC_ERR) + ((GO,) if spec.get("go") else ()):
        fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
    if _intermediate(HANDLE, RESULT, None, None, []):
        _child(spec)
    os._exit(0)  # not reached: _intermediate exits the helper itself


def serve() -> NoReturn:
    """The spawn server: one per calling process, started once with posix_spawn and socket
    fd 3, single-threaded; it never has a child of its own. Each request is a JSON spec with
    fds [handle, stdin, stdout, stderr, exec-error pipe, (result pipe,) go pipe?]. Mode
    "fork" (root, no user namespace to enter): fork_into_container's fast path with
    CLONE_PARENT, reply {"pid": N}; mode "intermediate": a copy of the server made with
    CLONE_PARENT does the one-shot helper's work, reply {"helper": its pid}; or
    {"errno", "message"}. It exits when the caller's end closes."""
    import socket

    # Ctrl-C at the terminal is for the caller and its commands, not for the server.
    for sig in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    os.closerange(HANDLE + 1, os.sysconf("SC_OPEN_MAX"))  # whatever the caller let inherit
    sock = socket.socket(fileno=HANDLE)
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 8)
        except OSError:
            os._exit(0)
        if not data:
            os._exit(0)
        reply: dict[str, Any]
        pid = -1
        try:
            spec = json.loads(data)
            # the service the caller uses now (the variable may have changed since)
            if spec.get("socket"):
                os.environ["CONTAINERFS_SOCKET"] = spec["socket"]
            else:
                os.environ.pop("CONTAINERFS_SOCKET", None)
            if spec.get("mode") == "intermediate":
                # A copy of us that is the caller's child (CLONE_PARENT) does what a helper
                # of its own would: its process is the caller's child too, and nothing is
                # imported again.
                pid, pidfd = linux.clone3_fork(linux.CLONE_PARENT, 0)
                if pid == 0:
                    _served_intermediate(spec, fds)
                os.close(pidfd)
                reply = {"helper": pid}
            else:
                pid = fork_into_container(fds[0], clone_parent=True)
                if pid == 0:
                    sock.close()
                    _served_child(spec, fds)
                reply = {"pid": pid}
        except OSError as e:
            reply = {"errno": e.errno or 5, "message": e.strerror or str(e)}
        except Exception as e:  # a bad request must not end the server
            reply = {"errno": 5, "message": f"spawn server: {e!r}"}
        finally:
            if pid != 0:
                for fd in fds:
                    os.close(fd)
        try:
            sock.send(json.dumps(reply).encode())
        except OSError:
            os._exit(0)


def _served_child(spec: dict[str, Any], fds: list[int]) -> NoReturn:
    """In a process the server made: lay out the caller's fds as the helper's are, run."""
    try:
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 64) for fd in fds[1:]]
        for fd, target in zip(high, (0, 1, 2, EXEC_ERR, GO)):
            os.dup2(fd, target)
        os.closerange(3, EXEC_ERR)
        os.closerange((GO if spec.get("go") else EXEC_ERR) + 1, os.sysconf("SC_OPEN_MAX"))
        for fd in (EXEC_ERR, GO) if spec.get("go") else (EXEC_ERR,):
            fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
    except OSError:
        os._exit(255)
    _child(spec)


def _served_intermediate(spec: dict[str, Any], fds: list[int]) -> NoReturn:
    """In a copy of the server, the caller's child: lay out the fds as a helper of its own has
    them (fds: handle, stdin, stdout, stderr, exec-error pipe, result pipe, go pipe?), then
    make the process as that helper does."""
    try:
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 64) for fd in fds]
        for fd, target in zip(high, (HANDLE, 0, 1, 2, EXEC_ERR, RESULT, GO)):
            os.dup2(fd, target)  # over the server's socket too
        os.closerange(SPEC, SPEC + 1)
        os.closerange((GO if spec.get("go") else SPEC) + 1, os.sysconf("SC_OPEN_MAX"))
        for fd in (HANDLE, RESULT, EXEC_ERR) + ((GO,) if spec.get("go") else ()):
            fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
    except OSError:
        os._exit(255)
    if _intermediate(HANDLE, RESULT, None, None, []):
        _child(spec)
    os._exit(0)


def _fail(step: str, e: OSError) -> NoReturn:
    os.write(EXEC_ERR, f"{step}:{e.errno or 5}".encode())
    os._exit(255)


def _child(spec: dict[str, Any]) -> NoReturn:
    """In the new process (in the container): the caller's steps, then exec."""
    step = "go"
    try:
        if spec.get("go"):
            while os.read(GO, 64):
                pass
            os.close(GO)
        # Python ignores SIGPIPE and SIGXFSZ, the server SIGINT and SIGQUIT: a program
        # expects the defaults (unless the caller ignores them: then not in the list).
        for sig in ["SIGPIPE", "SIGXFSZ"] + spec.get("default_signals", []):
            signal.signal(getattr(signal, sig), signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        if spec.get("pty"):
            step = "setsid"
            os.setsid()
            step = "TIOCSCTTY"
            import termios
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        if spec.get("user") is not None:
            uid, gid = spec["user"]
            step = "setgroups"
            try:
                os.setgroups([])
            except PermissionError:
                # Denied for everyone in this user namespace (an owner's): nothing to drop.
                with open("/proc/self/setgroups") as f:
                    if f.read().strip() != "deny":
                        raise
            step = "setgid"
            os.setgid(gid)
            step = "setuid"
            os.setuid(uid)
        if spec.get("cwd") is not None:
            step = "chdir"
            os.chdir(spec["cwd"])
        step = "exec"
        env = {k.encode("utf-8", "surrogateescape"): v.encode("utf-8", "surrogateescape")
               for k, v in spec["env"].items()}
        argv = [a.encode("utf-8", "surrogateescape") for a in spec["argv"]]
        executable = spec["executable"].encode("utf-8", "surrogateescape")
        if b"/" in executable:
            os.execve(executable, argv, env)
        _execvpe(executable, argv, env)
    except OSError as e:
        _fail(step, e)
    os._exit(255)


def _execvpe(name: bytes, argv: list[bytes], env: dict[bytes, bytes]) -> NoReturn:
    """execvpe with the command's own PATH; the first error that is not ENOENT/ENOTDIR wins,
    as subprocess and os.execvpe report it."""
    saved: OSError | None = None
    for d in env.get(b"PATH", os.defpath.encode()).split(b":"):
        try:
            os.execve(os.path.join(d or b".", name), argv, env)
        except (FileNotFoundError, NotADirectoryError) as e:
            last: OSError = e
        except OSError as e:
            last = e
            saved = saved or e
    raise saved or last
