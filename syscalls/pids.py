"""Process ids in context (contract section 12): translate_pid and container_pids.

A process has one pid in each PID namespace from its own up to the initial one. Linux 6.11+
translates with ioctls on a PID-namespace fd (NS_GET_PID_FROM_PIDNS: from that namespace into
the caller's; NS_GET_PID_IN_PIDNS: from the caller's into that one); older kernels read the
NSpid line of /proc/PID/status, walking namespaces up with NS_GET_PARENT.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import stat

from . import linux, protocol, replies
from .client import call
from .handle import check_handle

# ioctl(2) requests on nsfs files (include/uapi/linux/nsfs.h): _IO(0xb7, n) and
# _IOR(0xb7, n, int) = 0x80000000 | sizeof(int) << 16 | 0xb7 << 8 | n.
_NS_GET_PARENT = 0xB702
_NS_GET_NSTYPE = 0xB703
NS_GET_PID_FROM_PIDNS = 0x8004B706   # nr 6: pid in that namespace -> the caller's
NS_GET_TGID_FROM_PIDNS = 0x8004B707  # nr 7: the same, its thread-group leader
NS_GET_PID_IN_PIDNS = 0x8004B708     # nr 8: pid in the caller's namespace -> that one
NS_GET_TGID_IN_PIDNS = 0x8004B709    # nr 9: the same, its thread-group leader
# Errors of an ioctl a kernel before 6.11 does not know on an nsfs file.
_NO_IOCTL = (errno.ENOTTY, errno.EINVAL)
# Set to False to force the /proc fallback (tests of older kernels' path).
use_ioctls = True


def translate_pid(pid: int, source: int, target: int) -> int:
    """`pid` as seen in the PID namespace of `source`, as seen in that of `target`.

    `source` and `target` are container handles, PID-namespace fds (/proc/PID/ns/pid) or -1
    for the caller's own. ESRCH: no such process in `source`, or not visible from `target`
    (or the container has no PID namespace yet, or is dead); EBADF: a closed fd; EINVAL: an fd
    that is neither a handle nor a PID-namespace fd. The process is held by a pidfd between
    steps, so a pid recycled meanwhile gives ESRCH, never another process's pid.
    """
    if not isinstance(pid, int) or isinstance(pid, bool):
        raise TypeError(f"a pid is an int, not {type(pid).__name__}")
    for fd in (source, target):
        _check_ns_arg(fd)  # every argument before the first request
    src = _pidns_fd(source)
    try:
        dst = _pidns_fd(target)
        try:
            return _translate(pid, src, dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def container_pids(cfd: int) -> list[tuple[int, int]]:
    """The living processes of the container behind `cfd` as (pid as the caller sees it, pid
    inside the container), init first; processes the caller cannot see are left out."""
    check_handle(cfd)
    reply: replies.PidList = call(protocol.Pids(), [cfd])[0]
    return [(outer, inner) for outer, inner in reply.pids]


def pid_in(ns_fd: int, pid: int) -> int:
    """`pid` (in the caller's PID namespace) as seen in the namespace `ns_fd`; ESRCH if not
    visible there. The service's own helper (NS_GET_PID_IN_PIDNS, or NSpid before 6.11)."""
    if pid <= 0:
        raise OSError(errno.ESRCH, f"no process {pid}")
    if use_ioctls:
        try:
            return int(fcntl.ioctl(ns_fd, NS_GET_PID_IN_PIDNS, pid))
        except OSError as e:
            if e.errno not in _NO_IOCTL:
                raise
    return _nspid_at(pid, ns_fd)


def _check_ns_arg(fd: int) -> None:
    if not isinstance(fd, int) or isinstance(fd, bool):
        raise TypeError(f"a namespace or handle fd is an int, not {type(fd).__name__}")
    if fd == -1:
        return
    st = os.fstat(fd)  # EBADF for a closed fd
    if stat.S_ISFIFO(st.st_mode):
        return  # a container handle, as far as a caller can tell; the service decides
    try:
        nstype = fcntl.ioctl(fd, _NS_GET_NSTYPE)
    except OSError:
        nstype = -1  # not an nsfs file at all
    if nstype != linux.CLONE_NEWPID:
        raise OSError(errno.EINVAL, f"fd {fd} is neither a container handle nor a PID namespace")


def _pidns_fd(fd: int) -> int:
    """An fd of our own of the PID namespace `fd` names (checked by _check_ns_arg)."""
    if fd == -1:
        return os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        return os.dup(fd)
    reply: replies.NamespaceFds
    reply, fds = call(protocol.PidNs(), [fd])
    if reply.fds != ["pid"] or len(fds) != 1:
        for f in fds:
            os.close(f)
        raise OSError(errno.EPROTO, f"the service answered {reply.fds} for a PID namespace")
    return fds[0]


def _translate(pid: int, src: int, dst: int) -> int:
    if pid <= 0:
        raise OSError(errno.ESRCH, f"no process {pid}")
    mine = _from(src, pid)
    try:
        pidfd = os.pidfd_open(mine)
    except ProcessLookupError:
        raise OSError(errno.ESRCH, f"process {pid} is gone") from None
    try:
        # The pidfd holds the process that had `mine` when we opened it; asking again shows
        # it is still the one `pid` names in the source (it cannot have been recycled while
        # still running), and its running after the last step shows `out` is its pid too.
        if _from(src, pid) != mine:
            raise OSError(errno.ESRCH, f"process {pid} is gone")
        out = pid_in(dst, mine)
        if not _running(pidfd):
            raise OSError(errno.ESRCH, f"process {pid} exited during the translation")
        return out
    finally:
        os.close(pidfd)


def _from(src: int, pid: int) -> int:
    """`pid` of namespace `src` as the caller sees it (ESRCH if not there or not visible)."""
    if use_ioctls:
        try:
            return int(fcntl.ioctl(src, NS_GET_PID_FROM_PIDNS, pid))
        except OSError as e:
            if e.errno not in _NO_IOCTL:
                raise
    return _nspid_from(src, pid)


def _running(pidfd: int) -> bool:
    """Whether the process behind `pidfd` still holds its pid: not reaped (PIDFD_GET_INFO),
    or, where that is missing, not exited (a pidfd polls readable once its process exits)."""
    info = linux.pidfd_info(pidfd)
    if info is not None:
        return info.pid != 0
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return not p.poll(0)


# ---- /proc fallback (kernels before 6.11) ---------------------------------------------------

def _depth(ns_fd: int) -> int | None:
    """How many levels `ns_fd` lies below the caller's PID namespace (None: not below it)."""
    mine = os.stat("/proc/self/ns/pid")
    fd = os.dup(ns_fd)
    try:
        for depth in range(64):  # PID namespaces nest at most 32 deep
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                return depth
            try:
                parent = fcntl.ioctl(fd, _NS_GET_PARENT)
            except OSError:
                return None  # above the caller's (EPERM) or the initial one (EPERM)
            os.close(fd)
            fd = parent
        return None
    finally:
        os.close(fd)


def _status_nspid(pid: int) -> list[int] | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(x) for x in line.split()[1:]]
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def _ns_at(pid: int, levels_up: int, ns_fd: int) -> bool:
    """Whether the PID namespace `levels_up` above that of process `pid` is `ns_fd`'s."""
    try:
        fd = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return False
    try:
        for _ in range(levels_up):
            parent = fcntl.ioctl(fd, _NS_GET_PARENT)
            os.close(fd)
            fd = parent
        return linux.same_file(fd, ns_fd)
    except OSError:
        return False
    finally:
        os.close(fd)


def _nspid_at(pid: int, ns_fd: int) -> int:
    """Fallback of NS_GET_PID_IN_PIDNS: the NSpid entry of `pid` at `ns_fd`'s level."""
    depth = _depth(ns_fd)
    nspid = _status_nspid(pid)
    if depth is None or nspid is None or len(nspid) <= depth:
        raise OSError(errno.ESRCH, f"process {pid} is not visible in that PID namespace")
    if not _ns_at(pid, len(nspid) - 1 - depth, ns_fd):
        raise OSError(errno.ESRCH, f"process {pid} is not visible in that PID namespace")
    return nspid[depth]


def _nspid_from(src: int, pid: int) -> int:
    """Fallback of NS_GET_PID_FROM_PIDNS: scan /proc for the process with `pid` at `src`'s
    level (a scan: slow, but only on kernels before 6.11)."""
    depth = _depth(src)
    if depth is None:
        raise OSError(errno.ESRCH, f"no process {pid} visible in that PID namespace")
    if depth == 0:
        if _status_nspid(pid) is None:
            raise OSError(errno.ESRCH, f"no process {pid}")
        return pid
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        nspid = _status_nspid(int(name))
        if (nspid and len(nspid) > depth and nspid[depth] == pid
                and _ns_at(int(name), len(nspid) - 1 - depth, src)):
            return nspid[0]
    raise OSError(errno.ESRCH, f"no process {pid} in that PID namespace")
