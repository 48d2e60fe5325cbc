"""Raw Linux system calls that the standard library lacks, typed and errno-exact.

Public on purpose: the service (containerfs) makes these calls too. Only this module (and its
siblings in `syscalls/`) touches ctypes. Every wrapper raises a plain
`OSError(errno, strerror)` on failure, so Python's own subclasses (FileNotFoundError...) appear,
and retries EINTR where the call is restartable.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import fcntl
import os
import platform
import struct
from typing import Any, NamedTuple

from . import nstypes
from .nstypes import NS_FLAGS as NS_FLAGS  # re-exported: setns() callers name types

# One table of syscall numbers per architecture. Calls added after 4.x (clone3, pidfd_*, the
# mount API) share one number on every architecture, so only the old ones differ.
_ARCH_NUMBERS: dict[str, dict[str, int]] = {
    "x86_64": {"setns": 308, "unshare": 272, "mount": 165, "umount2": 166, "pivot_root": 155,
               "statx": 332, "renameat2": 316,
               "add_key": 248, "request_key": 249, "keyctl": 250, "seccomp": 317,
               "setfsuid": 122, "setfsgid": 123},
    "aarch64": {"setns": 268, "unshare": 97, "mount": 40, "umount2": 39, "pivot_root": 41,
                "statx": 291, "renameat2": 276,
                "add_key": 217, "request_key": 218, "keyctl": 219, "seccomp": 277,
                "setfsuid": 151, "setfsgid": 152},
}
_COMMON_NUMBERS = {
    "pidfd_send_signal": 424,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "pidfd_open": 434,
    "clone3": 435,
    "openat2": 437,
    "pidfd_getfd": 438,
    "mount_setattr": 442,
}
NR: dict[str, int] = {**_COMMON_NUMBERS, **_ARCH_NUMBERS.get(platform.machine(), {})}

# clone(2) and namespace flags.
CLONE_FS = 0x00000200
CLONE_NEWNS = NS_FLAGS["mnt"]
CLONE_NEWCGROUP = NS_FLAGS["cgroup"]
CLONE_NEWUTS = NS_FLAGS["uts"]
CLONE_NEWIPC = NS_FLAGS["ipc"]
CLONE_NEWUSER = NS_FLAGS["user"]
CLONE_NEWPID = NS_FLAGS["pid"]
CLONE_NEWNET = NS_FLAGS["net"]
CLONE_PARENT = 0x00008000
CLONE_PIDFD = 0x00001000
CLONE_INTO_CGROUP = 0x200000000


PR_SET_DUMPABLE = 4
PR_SET_PDEATHSIG = 1
SO_PEERPIDFD = 77

PIDFD_INFO_PID = 1 << 0
PIDFD_INFO_CGROUPID = 1 << 2
PIDFD_INFO_EXIT = 1 << 3
_PIDFD_INFO_SIZE = 64
# _IOWR(PIDFS_IOCTL_MAGIC=0xFF, 11, struct pidfd_info)
_PIDFD_GET_INFO = (3 << 30) | (_PIDFD_INFO_SIZE << 16) | (0xFF << 8) | 11

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
# The GIL stays held across this one (PyDLL): a raw clone3 child must not try to re-take a GIL
# that, in its copy of memory, belongs to a thread that does not exist.
_libc_gil = ctypes.PyDLL(None, use_errno=True)
_libc_gil.syscall.restype = ctypes.c_long


def _raise(err: int, *context: Any) -> None:
    exc = OSError(err, os.strerror(err))
    for note in context:
        exc.add_note(str(note))
    raise exc


def same_file(a: int | str, b: int | str) -> bool:
    """Whether two fds or paths name the same file (namespaces compare this way too)."""
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def same_place(a: int, b: int) -> bool:
    """Whether two fds name the same file on the same mount: another mount of a tree (a
    bind, a copy in another mount namespace) shows the same file but is another place."""
    return same_file(a, b) and mount_id(a) == mount_id(b)


def syscall(name: str, *args: Any) -> int:
    """Call system call `name` with ctypes-ready arguments; return its result or raise OSError.

    EINTR is retried: every call made through here is restartable.
    """
    nr = NR[name]
    while True:
        res = _libc.syscall(ctypes.c_long(nr), *args)
        if res != -1:
            return int(res)
        err = ctypes.get_errno()
        if err != _errno.EINTR:
            _raise(err, f"{name}()")


def setns(fd: int, nstype: int = 0) -> None:
    """Move the calling thread into the namespace that `fd` refers to."""
    syscall("setns", ctypes.c_int(fd), ctypes.c_int(nstype))


def unshare(flags: int) -> None:
    """Give the calling thread new namespaces of the kinds in `flags`."""
    syscall("unshare", ctypes.c_int(flags))


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    """Send `sig` to the process `pidfd` refers to (ESRCH once it has exited)."""
    syscall("pidfd_send_signal", ctypes.c_int(pidfd), ctypes.c_int(sig), None, ctypes.c_uint(0))


class PidfdInfo(NamedTuple):
    """What PIDFD_GET_INFO tells of a process: its pid in our namespace (0 once reaped), the
    id of its cgroup2 group (the group directory's inode number), its wait status once reaped."""
    pid: int
    cgroup_id: int
    exit_status: int | None


def pidfd_info(pidfd: int) -> PidfdInfo | None:
    """PIDFD_GET_INFO (Linux 6.13+; the exit status 6.15+) on `pidfd`; None on older kernels.

    One ioctl instead of three files under /proc, and about their pid-reuse races: the answer
    is about the process itself, whatever has become of its pid number.
    """
    buf = ctypes.create_string_buffer(_PIDFD_INFO_SIZE)
    struct.pack_into("=Q", buf, 0, PIDFD_INFO_PID | PIDFD_INFO_CGROUPID | PIDFD_INFO_EXIT)
    while True:
        res = _libc.ioctl(ctypes.c_int(pidfd), ctypes.c_ulong(_PIDFD_GET_INFO), buf)
        if res == 0:
            break
        err = ctypes.get_errno()
        if err == _errno.EINTR:
            continue
        if err == _errno.ESRCH:  # reaped, on a kernel that keeps no exit status
            return PidfdInfo(0, 0, None)
        if err in (_errno.ENOTTY, _errno.EINVAL):  # an older kernel, or not a pidfd at all
            return None
        _raise(err, "ioctl(PIDFD_GET_INFO)")
    mask, cgroup_id, pid = struct.unpack_from("=QQI", buf, 0)
    (status,) = struct.unpack_from("=i", buf, 60)
    return PidfdInfo(pid if mask & PIDFD_INFO_PID else 0,
                     cgroup_id if mask & PIDFD_INFO_CGROUPID else 0,
                     status if mask & PIDFD_INFO_EXIT else None)


def fd_link(fd: int) -> str:
    """What `fd` is, as /proc/self/fd names it ("pipe:[N]", "anon_inode:[pidfd]", a path...),
    learnt without calling into its filesystem: safe on an fd of a FUSE mount whose server
    never answers. EBADF if it is no open fd."""
    return os.readlink(f"/proc/self/fd/{fd}")


def is_pidfd(fd: int) -> bool:
    """Whether `fd` is a pidfd (EBADF if it is no open fd)."""
    return fd_link(fd) == "anon_inode:[pidfd]"


# PIDFD_GET_<TYPE>_NAMESPACE: _IO(PIDFS_IOCTL_MAGIC=0xFF, n)
_PIDFD_GET_NAMESPACE = {**{t.name: t.pidfd_ioctl for t in nstypes.NAMESPACES},
                        "pid_for_children": 6, "time": 7, "time_for_children": 8}


def pidfd_namespace(pidfd: int, nstype: str) -> int:
    """An fd (close-on-exec) of the `nstype` namespace of the process behind `pidfd` (Linux
    6.11+; ENOTTY before). ESRCH once it has exited: a zombie has no namespaces left here."""
    res = _libc.ioctl(ctypes.c_int(pidfd), ctypes.c_ulong((0xFF << 8) | _PIDFD_GET_NAMESPACE[nstype]),
                      ctypes.c_ulong(0))
    if res < 0:
        _raise(ctypes.get_errno(), f"ioctl(PIDFD_GET_{nstype.upper()}_NAMESPACE)")
    return int(res)


# NS_GET_ID (Linux 6.18+; ENOTTY before): the 64-bit id of the namespace an nsfs fd is of.
_NS_GET_ID = (2 << 30) | (8 << 16) | (0xB7 << 8) | 0xD


def ns_id(fd: int) -> int | None:
    """The namespace id of nsfs fd `fd` (the order mount-namespace binds are checked in), or
    None where the kernel has no NS_GET_ID."""
    try:
        raw = fcntl.ioctl(fd, _NS_GET_ID, bytes(8))
    except OSError as e:
        if e.errno in (_errno.ENOTTY, _errno.EINVAL):
            return None
        raise
    return int(struct.unpack("Q", raw)[0])


def pidfd_exit_status(pidfd: int) -> int | None:
    """Return the wait status of the reaped process behind `pidfd`, or None if not known yet.

    Uses PIDFD_GET_INFO with PIDFD_INFO_EXIT (Linux 6.15+), which is filled only after the reap.
    """
    info = pidfd_info(pidfd)
    return info.exit_status if info is not None else None


# struct flock, laid out alike on x86_64 and aarch64: l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = struct.Struct("hhqqi4x")


def lock_whole_file(fd: int) -> int | None:
    """Take a write lock on all of `fd`'s file for this process; None once taken, else the pid
    of a process that holds it (0 if it is not visible from our PID namespace).

    A POSIX record lock (fcntl F_SETLK): the kernel drops it when its process exits, however it
    exits, and a forked child never inherits it. Closing any fd of the file in this process
    drops it too: keep that file for the lock alone.
    """
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except OSError as e:
            if e.errno not in (_errno.EAGAIN, _errno.EACCES):
                raise
        probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        l_type, _whence, _start, _len, pid = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_GETLK, probe))
        if l_type != fcntl.F_UNLCK:
            return int(pid)
        # The holder let go between the two calls: try again.


def prctl(option: int, arg2: int = 0) -> None:
    """prctl(2) with one argument."""
    if _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), 0, 0, 0) != 0:
        _raise(ctypes.get_errno(), "prctl()")


def setresuid_thread(ruid: int, euid: int, suid: int) -> None:
    """setresuid(2) for the calling thread only (glibc's wrapper changes every thread)."""
    syscall_nr = {"x86_64": 117, "aarch64": 147}[platform.machine()]
    if _libc.syscall(ctypes.c_long(syscall_nr), ruid, euid, suid) != 0:
        _raise(ctypes.get_errno(), "setresuid()")


class _CloneArgs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack",
            "stack_size", "tls", "set_tid", "set_tid_size", "cgroup",
        )
    ]


_before_fork = ctypes.pythonapi.PyOS_BeforeFork
_after_child = ctypes.pythonapi.PyOS_AfterFork_Child
_after_parent = ctypes.pythonapi.PyOS_AfterFork_Parent


def clone3_fork(flags: int, exit_signal: int, cgroup_fd: int = -1) -> tuple[int, int]:
    """Fork with clone3(2): return (pid, pidfd) in the parent and (0, -1) in the child.

    Like os.fork() it runs CPython's fork hooks, so the child is a working interpreter. It skips
    glibc's fork bookkeeping, so call it only from a single-threaded process.
    """
    pidfd = ctypes.c_int(-1)
    args = _CloneArgs()
    args.flags = flags | CLONE_PIDFD
    args.pidfd = ctypes.addressof(pidfd)
    args.exit_signal = exit_signal
    if cgroup_fd >= 0:
        args.flags |= CLONE_INTO_CGROUP
        args.cgroup = cgroup_fd
    _before_fork()
    res = _libc_gil.syscall(ctypes.c_long(NR["clone3"]), ctypes.byref(args),
                            ctypes.c_size_t(ctypes.sizeof(args)))
    if res == 0:
        _after_child()
        return 0, -1
    err = ctypes.get_errno()
    _after_parent()
    if res < 0:
        _raise(err, "clone3()")
    return int(res), pidfd.value


# ---- the mount API and path resolution -------------------------------------------------------

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_IN_ROOT = 0x10
MOVE_MOUNT_F_EMPTY_PATH = 0x04
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MNT_DETACH = 2
FSOPEN_CLOEXEC = 0x1
FSMOUNT_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
# fsmount(2) attr_flags the kernel accepts (MOUNT_ATTR_RDONLY ... MOUNT_ATTR_NOSYMFOLLOW).
FSMOUNT_VALID_ATTRS = 0x01 | 0x02 | 0x04 | 0x08 | 0x70 | 0x80 | 0x200000
STATX_MNT_ID = 0x1000
STATX_MNT_ID_UNIQUE = 0x4000  # Linux 6.8+: never reused
MS_REC = 0x4000
MS_PRIVATE = 1 << 18


def _path(p: str | bytes | None) -> bytes | None:
    if p is None:
        return None
    return os.fsencode(p)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str | bytes, flags: int, mode: int = 0, resolve: int = 0) -> int:
    """openat2(2): open `path` relative to `dirfd` under the `resolve` rules."""
    how = _OpenHow(flags, mode, resolve)
    return syscall("openat2", ctypes.c_int(dirfd), _path(path), ctypes.byref(how),
                   ctypes.c_size_t(ctypes.sizeof(how)))


def attach_in_root(mfd: int, root: int, unsafe_path: str) -> None:
    """move_mount the detached mount `mfd` onto `unsafe_path`, resolved in `root` and never
    outside it (RESOLVE_IN_ROOT, no magic links)."""
    target = openat2(root, unsafe_path, os.O_PATH | os.O_CLOEXEC,
                     resolve=RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    try:
        move_mount(mfd, "", target, "", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH)
    finally:
        os.close(target)


def fsopen(fstype: str | bytes, flags: int = 0) -> int:
    return syscall("fsopen", _path(fstype), ctypes.c_uint(flags))


def fsconfig(fsfd: int, cmd: int, key: str | bytes | None, value: Any, aux: int) -> None:
    """fsconfig(2); `value` is bytes/str (a string or path), or None."""
    if isinstance(value, str):
        value = value.encode()
    syscall("fsconfig", ctypes.c_int(fsfd), ctypes.c_uint(cmd), _path(key),
            ctypes.c_char_p(value) if value is not None else None, ctypes.c_int(aux))


def fsmount(fsfd: int, flags: int = 0, attr_flags: int = 0) -> int:
    return syscall("fsmount", ctypes.c_int(fsfd), ctypes.c_uint(flags), ctypes.c_uint(attr_flags))


def move_mount(from_dfd: int, from_path: str | bytes, to_dfd: int, to_path: str | bytes,
               flags: int) -> None:
    syscall("move_mount", ctypes.c_int(from_dfd), _path(from_path), ctypes.c_int(to_dfd),
            _path(to_path), ctypes.c_uint(flags))


def open_tree(dfd: int, path: str | bytes, flags: int) -> int:
    return syscall("open_tree", ctypes.c_int(dfd), _path(path), ctypes.c_uint(flags))


MOUNT_ATTR_RDONLY = 0x1
AT_RECURSIVE = 0x8000


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def mount_setattr(dfd: int, path: str | bytes, flags: int, attr_set: int,
                  attr_clr: int = 0) -> None:
    """mount_setattr(2): set (and clear) mount attributes, e.g. MOUNT_ATTR_RDONLY on a tree."""
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    syscall("mount_setattr", ctypes.c_int(dfd), _path(path), ctypes.c_uint(flags),
            ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))


def mount(source: str | bytes | None, target: str | bytes, fstype: str | bytes | None,
          flags: int = 0, data: bytes | None = None) -> None:
    syscall("mount", _path(source), _path(target), _path(fstype), ctypes.c_ulong(flags), data)


def umount2(target: str | bytes, flags: int = 0) -> None:
    syscall("umount2", _path(target), ctypes.c_int(flags))


def pivot_root(new_root: str | bytes, put_old: str | bytes) -> None:
    syscall("pivot_root", _path(new_root), _path(put_old))


def renameat2(olddirfd: int, oldpath: str | bytes, newdirfd: int, newpath: str | bytes,
              flags: int) -> None:
    syscall("renameat2", ctypes.c_int(olddirfd), _path(oldpath), ctypes.c_int(newdirfd),
            _path(newpath), ctypes.c_uint(flags))


def statx(dirfd: int, path: str | bytes, flags: int, mask: int) -> bytes:
    """statx(2): the raw 256-byte struct statx."""
    buf = ctypes.create_string_buffer(256)
    syscall("statx", ctypes.c_int(dirfd), _path(path), ctypes.c_int(flags), ctypes.c_uint(mask),
            buf)
    return buf.raw


def mount_id(fd: int) -> int:
    """The id of the mount `fd` is on (its unique 64-bit id where the kernel has one, 6.8+:
    an id never given to another mount while the system runs)."""
    for mask in (STATX_MNT_ID_UNIQUE, STATX_MNT_ID):
        raw = statx(fd, "", AT_EMPTY_PATH, mask)
        stx_mask, = struct.unpack_from("I", raw, 0)
        if stx_mask & mask:
            return int(struct.unpack_from("Q", raw, 0x90)[0])  # stx_mnt_id
    _raise(_errno.EOPNOTSUPP, "statx(STATX_MNT_ID)")
    return -1  # not reached


_SigSet = ctypes.c_ubyte * 128  # glibc's sigset_t
_ALL_SIGNALS = _SigSet(*[0xFF] * 128)
_SIG_BLOCK, _SIG_SETMASK = 0, 2


def block_signals() -> ctypes.Array[ctypes.c_ubyte]:
    """Block every signal in the calling thread; return the old mask for restore_signals.

    Not signal.pthread_sigmask: it turns each of ~64 signal numbers into an enum (~90 us here).
    """
    old = _SigSet()
    err = _libc.pthread_sigmask(_SIG_BLOCK, _ALL_SIGNALS, old)
    if err:
        _raise(err, "pthread_sigmask()")
    return old


def restore_signals(old: ctypes.Array[ctypes.c_ubyte]) -> None:
    err = _libc.pthread_sigmask(_SIG_SETMASK, old, None)
    if err:
        _raise(err, "pthread_sigmask()")
