"""Seccomp user notification: the filter that traps request_key() in every ABI, and the
listener's calls (receive a trapped call, check it still waits, answer it), plus reading a
string out of the trapped process. The keyring service and fork_into_container use these.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from typing import Any

from . import linux

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
PR_SET_NO_NEW_PRIVS = 38

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_AARCH64 = 0xC00000B7
AUDIT_ARCH_ARM = 0x40000028
_X32_SYSCALL_BIT = 0x40000000

# request_key's number in every ABI a process on these machines can call it through. A 64-bit
# process can still make a 32-bit call (int 0x80 on x86_64), so every entry is in every filter.
REQUEST_KEY_NRS: dict[int, tuple[int, ...]] = {
    AUDIT_ARCH_X86_64: (249, _X32_SYSCALL_BIT | 249),
    AUDIT_ARCH_I386: (287,),
    AUDIT_ARCH_AARCH64: (218,),
    AUDIT_ARCH_ARM: (310,),
}

_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_RET_K = 0x06
_DATA_NR, _DATA_ARCH = 0, 4  # offsets in struct seccomp_data


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def request_key_filter() -> list[tuple[int, int, int, int]]:
    """The BPF program: USER_NOTIF for request_key in any known ABI, ALLOW for the rest."""
    prog: list[tuple[int, int, int, int]] = [(_BPF_LD_W_ABS, 0, 0, _DATA_ARCH)]
    jumps: list[tuple[int, int]] = []  # (index, which) of jumps to the USER_NOTIF return
    for arch, nrs in REQUEST_KEY_NRS.items():
        block_len = 1 + len(nrs) + 1  # load nr, compare each, return allow
        prog.append((_BPF_JEQ_K, 0, block_len, arch))  # not this arch: skip its block
        prog.append((_BPF_LD_W_ABS, 0, 0, _DATA_NR))
        for nr in nrs:
            jumps.append((len(prog), 0))
            prog.append((_BPF_JEQ_K, 0, 0, nr))
        prog.append((_BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    prog.append((_BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))  # an ABI not listed
    notif = len(prog)
    prog.append((_BPF_RET_K, 0, 0, SECCOMP_RET_USER_NOTIF))
    for index, _ in jumps:
        code, _jt, jf, k = prog[index]
        prog[index] = (code, notif - index - 1, jf, k)
    return prog


_FILTER = (_SockFilter * len(request_key_filter()))(*(
    _SockFilter(code, jt, jf, k) for code, jt, jf, k in request_key_filter()))
_FPROG = _SockFprog(len(_FILTER), ctypes.cast(_FILTER, ctypes.POINTER(_SockFilter)))
# The same program as bytes (struct sock_filter[]), for a compiled caller (cspawn.c).
REQUEST_KEY_PROGRAM = bytes(_FILTER)


def install_request_key_filter() -> int:
    """Trap this thread's (and its future children's) request_key(); return the listener fd.

    Installing a filter needs CAP_SYS_ADMIN in the current user namespace or no_new_privs: a
    process without the capability gets no_new_privs set first (setuid programs it runs
    afterwards no longer gain privileges). EBUSY: a filter with a listener is already installed.
    """
    def install() -> int:
        return linux.syscall("seccomp", ctypes.c_uint(SECCOMP_SET_MODE_FILTER),
                              ctypes.c_uint(SECCOMP_FILTER_FLAG_NEW_LISTENER),
                              ctypes.byref(_FPROG))
    try:
        return install()
    except PermissionError:
        linux.prctl(PR_SET_NO_NEW_PRIVS, 1)
        return install()


class SeccompData(ctypes.Structure):
    _fields_ = [("nr", ctypes.c_int), ("arch", ctypes.c_uint32),
                ("instruction_pointer", ctypes.c_uint64), ("args", ctypes.c_uint64 * 6)]


class _SeccompNotif(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("pid", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("data", SeccompData)]


class _SeccompNotifResp(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("val", ctypes.c_int64), ("error", ctypes.c_int32),
                ("flags", ctypes.c_uint32)]


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (ord("!") << 8) | nr


SECCOMP_IOCTL_NOTIF_RECV = _iowr(0, ctypes.sizeof(_SeccompNotif))
SECCOMP_IOCTL_NOTIF_SEND = _iowr(1, ctypes.sizeof(_SeccompNotifResp))
SECCOMP_IOCTL_NOTIF_ID_VALID = (1 << 30) | (8 << 16) | (ord("!") << 8) | 2


@dataclass(frozen=True)
class Notification:
    """One trapped system call: its cookie, the caller's pid (as the listener's holder sees
    it), the ABI and the raw arguments."""
    id: int
    pid: int
    arch: int
    nr: int
    args: tuple[int, ...]


def _ioctl(fd: int, request: int, arg: Any) -> int:
    while True:
        res = linux._libc.ioctl(ctypes.c_int(fd), ctypes.c_ulong(request), arg)
        if res >= 0:
            return int(res)
        err = ctypes.get_errno()
        if err != errno.EINTR:
            linux._raise(err, "ioctl(seccomp listener)")


def notif_recv(listener: int) -> Notification | None:
    """The next trapped call (call when the listener is readable); None if it vanished."""
    n = _SeccompNotif()
    try:
        _ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, ctypes.byref(n))
    except FileNotFoundError:  # the caller was killed between poll and receive
        return None
    return Notification(n.id, n.pid, n.data.arch, n.data.nr, tuple(n.data.args))


def notif_id_valid(listener: int, notif_id: int) -> bool:
    """Whether the trapped call is still waiting (its process alive, its pid not reused)."""
    cookie = ctypes.c_uint64(notif_id)
    try:
        _ioctl(listener, SECCOMP_IOCTL_NOTIF_ID_VALID, ctypes.byref(cookie))
    except FileNotFoundError:
        return False
    return True


def notif_send(listener: int, notif_id: int, *, val: int = 0, error: int = 0,
               continue_: bool = False) -> bool:
    """Answer a trapped call: a return value, -errno, or let the kernel carry on with it.

    False if the call is no longer waiting (its process died)."""
    resp = _SeccompNotifResp(notif_id, val, -error if error else 0,
                             SECCOMP_USER_NOTIF_FLAG_CONTINUE if continue_ else 0)
    try:
        _ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, ctypes.byref(resp))
    except (FileNotFoundError, ProcessLookupError):
        return False
    return True


def read_cstring(mem_fd: int, addr: int, limit: int) -> bytes | None:
    """The NUL-terminated string at `addr` in the process whose /proc/PID/mem is `mem_fd`.

    None if it is longer than `limit` bytes; OSError (EFAULT, EIO) if it cannot be read.
    """
    out = b""
    page = os.sysconf("SC_PAGE_SIZE")
    while len(out) <= limit:
        chunk_len = page - (addr % page)  # never read across a page that may not exist
        try:
            chunk = os.pread(mem_fd, chunk_len, addr)
        except OSError as e:
            raise OSError(errno.EFAULT, f"unreadable string at {addr:#x}") from e
        if not chunk:
            raise OSError(errno.EFAULT, f"unreadable string at {addr:#x}")
        end = chunk.find(b"\0")
        if end >= 0:
            out += chunk[:end]
            return out if len(out) <= limit else None
        out += chunk
        addr += len(chunk)
    return None
