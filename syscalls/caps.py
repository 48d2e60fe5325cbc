"""Capabilities: names and numbers, checks of a mask, and limiting the calling process's
five sets (bounding, permitted, effective, inheritable, ambient) to a mask.

A mask is an int whose bit n is capability n of linux/capability.h. Capabilities are dropped
up to the running kernel's cap_last_cap, never from a fixed list, so a kernel that knows more
capabilities than this table does drops those too.
"""

from __future__ import annotations

import ctypes
import errno
import functools
from collections.abc import Iterable

from . import linux
from .nsexec import step

CAPABILITIES: dict[str, int] = {name: n for n, name in enumerate((
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE"))}
_NAMES = {n: name for name, n in CAPABILITIES.items()}

PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def name_of(cap: int) -> str:
    """CAP_FOO for a number; "CAP_<n>" for one this table does not know."""
    return _NAMES.get(cap, f"CAP_{cap}")


def _prctl(option: int, arg2: int = 0) -> int:
    """prctl(2) with unsigned long arguments (the unused ones must be 0 for the cap calls);
    returns its (non-negative) result."""
    res = int(linux._libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(0),
                                ctypes.c_ulong(0), ctypes.c_ulong(0)))
    if res < 0:
        linux._raise(ctypes.get_errno(), f"prctl({option}, {arg2})")
    return res


@functools.cache
def cap_last_cap() -> int:
    """The highest capability number the running kernel knows.

    From /proc/sys/kernel/cap_last_cap; in a root without /proc (a container's, say), found
    by asking PR_CAPBSET_READ, which fails with EINVAL past the last one."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        pass
    last = -1
    while last < 63:
        try:
            _prctl(PR_CAPBSET_READ, last + 1)
        except OSError:
            break
        last += 1
    return last


def all_caps() -> int:
    """The mask of every capability the running kernel knows."""
    return (1 << (cap_last_cap() + 1)) - 1


def check_mask(mask: object) -> int:
    """Return `mask` if it is a capability mask for this kernel; OSError(EINVAL) otherwise
    (not an int, negative, or bits above cap_last_cap)."""
    if not isinstance(mask, int) or isinstance(mask, bool):
        raise OSError(errno.EINVAL, f"capability mask must be an int, not {type(mask).__name__}")
    if mask < 0:
        raise OSError(errno.EINVAL, f"capability mask {mask} is negative")
    extra = mask & ~all_caps()
    if extra:
        raise OSError(errno.EINVAL, f"capability mask {mask:#x} has bits above cap_last_cap "
                      f"({cap_last_cap()}): {extra:#x}")
    return mask


def mask_of(names: Iterable[str]) -> int:
    """The mask of capability names: "CAP_NET_ADMIN", "net_admin" or "ALL" (every one this
    kernel knows). OSError(EINVAL) names an unknown one."""
    mask = 0
    for raw in names:
        name = raw.strip().upper()
        if name == "ALL":
            mask |= all_caps()
            continue
        if not name.startswith("CAP_"):
            name = "CAP_" + name
        if name not in CAPABILITIES or CAPABILITIES[name] > cap_last_cap():
            raise OSError(errno.EINVAL, f'unknown capability "{raw}"')
        mask |= 1 << CAPABILITIES[name]
    return mask


def names_of(mask: int) -> list[str]:
    """The names of the capabilities in `mask`, lowest first."""
    return [name_of(n) for n in range(mask.bit_length()) if mask >> n & 1]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def get_caps() -> tuple[int, int, int]:
    """This thread's (effective, permitted, inheritable) masks."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    low, high = data = (_CapData * 2)()
    if linux._libc.capget(ctypes.byref(header), data) != 0:
        linux._raise(ctypes.get_errno(), "capget()")
    return (int(low.effective) | int(high.effective) << 32,
            int(low.permitted) | int(high.permitted) << 32,
            int(low.inheritable) | int(high.inheritable) << 32)


def _cap_data(effective: int, permitted: int, inheritable: int) -> ctypes.Array[_CapData]:
    """capset(2)'s data, version 3: each set as two 32-bit halves."""
    return (_CapData * 2)(
        _CapData(effective & 0xFFFFFFFF, permitted & 0xFFFFFFFF, inheritable & 0xFFFFFFFF),
        _CapData(effective >> 32, permitted >> 32, inheritable >> 32))


def capset_data(effective: int, permitted: int, inheritable: int) -> bytes:
    """The bytes of capset(2)'s data for these sets (for a compiled caller: cspawn.c)."""
    return bytes(_cap_data(effective, permitted, inheritable))


def _capset(effective: int, permitted: int, inheritable: int) -> None:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = _cap_data(effective, permitted, inheritable)
    if linux._libc.capset(ctypes.byref(header), data) != 0:
        linux._raise(ctypes.get_errno(), "capset()")


def bounding_set() -> int:
    """This thread's bounding set, as a mask."""
    return sum(1 << n for n in range(cap_last_cap() + 1) if _prctl(PR_CAPBSET_READ, n))


def drop_bounding(mask: int) -> None:
    """Drop from the bounding set every capability (up to cap_last_cap) not in `mask`.

    Needs CAP_SETPCAP in the effective set for each one that is still there: EPERM
    otherwise, naming it. Ones already gone are not asked for, so a process whose bounding
    set is within `mask` already needs nothing."""
    for n in range(cap_last_cap() + 1):
        if not mask >> n & 1 and _prctl(PR_CAPBSET_READ, n):
            try:
                _prctl(PR_CAPBSET_DROP, n)
            except OSError as e:
                e.strerror = f"dropping {name_of(n)}: {e.strerror}"
                raise


def set_sets(effective: int, permitted: int, inheritable: int) -> None:
    """capset(2) of this thread's effective, permitted and inheritable sets, as the kernel
    allows (EPERM for raising permitted, or effective beyond permitted)."""
    _capset(effective, permitted, inheritable)


def raise_ambient(cap: int) -> None:
    """Add capability `cap` to the ambient set (it must be permitted and inheritable)."""
    res = int(linux._libc.prctl(ctypes.c_int(PR_CAP_AMBIENT), ctypes.c_ulong(2),
                                ctypes.c_ulong(cap), ctypes.c_ulong(0), ctypes.c_ulong(0)))
    if res < 0:
        linux._raise(ctypes.get_errno(), f"raising {name_of(cap)} in the ambient set")


def limit_sets(mask: int) -> None:
    """Limit permitted, effective and inheritable to `mask` with one capset(2): each keeps
    what it had within `mask` (capset can lower a set, never raise one)."""
    effective, permitted, inheritable = get_caps()
    _capset(effective & mask, permitted & mask, inheritable & mask)


def clear_ambient() -> None:
    """Empty the ambient set (no capability needed). A kernel without ambient capabilities
    (before 4.3) says EINVAL: there is nothing to clear there."""
    try:
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise


def limit_capabilities(mask: int) -> None:
    """Limit the calling thread's five capability sets to `mask`, in runc's order.

    Call it in a single-threaded process (a forked child): capabilities belong to threads.
    EINVAL before any change for a bad mask; otherwise an OSError names the step that failed.
    1. bounding set: PR_CAPBSET_DROP needs CAP_SETPCAP, which step 2 may take away.
    2. permitted, effective, inheritable: one capset.
    3. ambient: cleared (the kernel would drop what is outside permitted and inheritable
       anyway; none is raised again)."""
    check_mask(mask)
    with step("bounding set"):
        drop_bounding(mask)
    with step("permitted, effective and inheritable sets"):
        limit_sets(mask)
    with step("ambient set"):
        clear_ambient()
