"""Processes known by pidfd: who a connection's peer is, and what the service may learn about
a process without ever trusting a pid number that may have been reused.

A pid number names a process only until that process is reaped; a pidfd names it for good.
Everything here either works on a pidfd, or reads by pid and then checks through the pidfd
that the process was not reaped meanwhile.
"""

from __future__ import annotations

import errno
import logging
import os
import select
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from syscalls import linux
from syscalls.fd import Fd

log = logging.getLogger("containerfs")
T = TypeVar("T")


@dataclass(frozen=True)
class Peer:
    """Who is at the other end of a connection, as the kernel recorded it at connect(): the
    credentials, and a pidfd of the process (owned by the connection; closed if it had gone
    already). `pid` is only ever used while `present()` shows it still names that process."""
    pid: int
    uid: int
    gid: int
    pidfd: Fd = field(default_factory=Fd)

    def present(self) -> bool:
        """Whether the process that connected is not reaped yet: only then is `pid` its own
        (a pid number is given to another process only once the old one is reaped)."""
        return not self.pidfd.closed and pidfd_pid(self.pidfd.fileno(), checked=True) > 0

    def at_pid(self, act: Callable[[int], T], undo: Callable[[T], None] | None = None) -> T:
        """`act(pid)`, proven to have met the process that connected: present before and
        after (ESRCH if not, after `undo` of what `act` returned)."""
        if not self.present():
            raise ProcessLookupError(errno.ESRCH, f"the process that connected (pid {self.pid}) "
                                                  "has exited; connect again")
        result = act(self.pid)
        if not self.present():
            log.error("pid %d was reaped while the service acted on it; the act may have met "
                      "another process with that pid", self.pid)
            if undo is not None:
                undo(result)
            raise ProcessLookupError(errno.ESRCH, f"the process that connected (pid {self.pid}) "
                                                  "exited during the request")
        return result


def stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (after the command name), or None if it is gone."""
    try:  # (os-level: 3 system calls where open() makes 9, on the path of every death)
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        data = os.read(fd, 4096)
    except ProcessLookupError:
        return None
    finally:
        os.close(fd)
    return data[data.rindex(b")") + 2:].decode().split()


def pidfd_pid(pidfd: int, checked: bool = False) -> int:
    """The pid (in the service's namespace) of the process `pidfd` refers to, -1 once reaped.

    EINVAL for an fd that is not a pidfd (checked first: an ioctl is never tried on a file a
    client passed that may give it another meaning); `checked`: it is known to be one (the
    kernel's SO_PEERPIDFD, ours, or a client's checked before), so it is not looked at."""
    if not checked and not linux.is_pidfd(pidfd):
        raise OSError(errno.EINVAL, "not a pidfd")
    info = linux.pidfd_info(pidfd)
    if info is not None:
        return info.pid if info.pid > 0 else -1
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    raise OSError(errno.EINVAL, "not a pidfd")


def pidfd_exited(pidfd: int) -> bool:
    """Whether the process behind `pidfd` has exited (a pidfd polls readable then; any fd
    number: select() stops at 1024)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def pid_namespace(pidfd: int, pid: int) -> int:
    """An fd of the PID namespace of the process behind `pidfd` (whose pid is `pid`);
    ProcessLookupError once it is reaped."""
    try:
        return linux.pidfd_namespace(pidfd, "pid")
    except OSError as e:
        # ENOTTY before Linux 6.11; ESRCH for a zombie too (it has no namespaces left for
        # the ioctl), whose /proc entry still has them.
        if e.errno not in (errno.ENOTTY, errno.ESRCH):
            raise
    fd = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    # (`pidfd` is checked by then: a report's is, Forks.finish)
    if pidfd_pid(pidfd, checked=True) != pid:  # reaped meanwhile: that pid may be another's now
        os.close(fd)
        raise ProcessLookupError(errno.ESRCH, "process reaped")
    return fd
