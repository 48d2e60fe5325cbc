"""The last steps of a process the runtime made, under the container's confinement: its
own capability sets, no_new_privs, umask, cwd, controlling terminal; "ready" told to the
runtime; for init the wait on exec.fifo until `start`; then execve of the program.
Imported before the fork (nothing can be loaded once inside the container's root)."""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import signal
from typing import Any

from syscalls import caps as capset
from syscalls import linux

from .config import Process
from .inside import PR_SET_NO_NEW_PRIVS, TIOCSCTTY, Channel


def look_up(p: Process) -> str:
    """args[0] as execve will find it (PATH from the process's env), with runc's message."""
    name = p.args[0]
    if "/" in name:
        try:
            os.stat(name)
        except OSError as e:
            raise OSError(e.errno, f'exec: "{name}": stat {name}: '
                                   f"{(e.strerror or '').lower()}") from None
        return name
    path = next((e[5:] for e in p.env if e.startswith("PATH=")), "/usr/bin:/bin")
    for d in path.split(":"):
        full = os.path.join(d or ".", name)
        if os.path.isfile(full) and os.access(full, os.X_OK):
            return full
    raise OSError(errno.ENOENT, f'exec: "{name}": executable file not found in $PATH')


def finish(p: Process, chan: Channel, state: dict[str, Any], fifo: int,
           preserve_fds: int) -> None:
    """Under the container's confinement: the process's own capability sets,
    no_new_privs, umask, cwd, terminal; "ready" to the runtime; for init (`fifo` >= 0) the
    wait for `start`; then execve. Never returns."""
    try:
        if p.caps is not None:
            _eff, perm, inh = capset.get_caps()
            perm &= p.caps["permitted"]
            inh = p.caps["inheritable"] & (inh | perm)
            capset.set_sets(p.caps["effective"] & perm, perm, inh)
            for n in range(capset.cap_last_cap() + 1):
                if (p.caps["ambient"] & perm & inh) >> n & 1:
                    capset.raise_ambient(n)
        if p.no_new_privs:
            linux.prctl(PR_SET_NO_NEW_PRIVS, 1)
        os.umask(0o022 if p.umask is None else p.umask)
        try:
            os.chdir(p.cwd)
        except OSError as e:
            raise OSError(e.errno, f"process.cwd: chdir to {p.cwd}: {e.strerror}") from None
        program = look_up(p)
        tty = state.get("tty", -1)
        if tty >= 0:
            os.setsid()
            fcntl.ioctl(tty, TIOCSCTTY, 0)
            for fd in (0, 1, 2):
                os.dup2(tty, fd)
            os.close(tty)
        for fd in range(3, 3 + preserve_fds):
            try:
                os.set_inheritable(fd, True)
            except OSError:
                pass
        env = dict(e.partition("=")[::2] for e in p.env)
        for sig in range(1, signal.NSIG):
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError, RuntimeError):
                pass
    except OSError as e:
        chan.fail(e.strerror or str(e))
    except Exception as e:
        chan.fail(repr(e))
    chan.send({"ok": True})
    chan.sock.close()
    if fifo >= 0:
        while True:  # released by `start` writing a byte (or killed)
            try:
                if os.read(fifo, 1):
                    break
            except InterruptedError:
                continue
        os.close(fifo)
    # Nothing of ours or of whoever ran us leaks into the program: runc closes every fd
    # past stdio and --preserve-fds too.
    os.closerange(3 + preserve_fds, max(65536, resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    try:
        os.execve(program, p.args, env)
    except OSError as e:
        os.write(2, f"containerfs-oci: exec {program}: {e.strerror}\n".encode())
    os._exit(127)
