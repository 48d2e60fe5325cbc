"""The namespace types, once: every other list of them (clone flags, container flags, what
/proc/PID/ns names, the command line's options, orders of entry) is derived from this table."""

from __future__ import annotations

from dataclasses import dataclass

from .constants import (
    CONTAINER_NEW_CGROUP_NS,
    CONTAINER_NEW_EMPTY_FS_NS,
    CONTAINER_NEW_FS_NS,
    CONTAINER_NEW_IPC_NS,
    CONTAINER_NEW_NET_NS,
    CONTAINER_NEW_PID_NS,
    CONTAINER_NEW_USER_NS,
    CONTAINER_NEW_UTS_NS,
)


@dataclass(frozen=True)
class NsType:
    name: str  # as /proc/PID/ns names it
    clone_flag: int  # CLONE_NEW*
    container_flag: int  # the CONTAINER_NEW_*_NS that asks for one
    option: str  # the command line's --option
    # What /proc/PID/ns file a process's children get ("pid_for_children" for pid).
    for_children: str
    pidfd_ioctl: int  # PIDFD_GET_<TYPE>_NAMESPACE's number


# In the order a container's namespaces are made (its user namespace first: it owns the rest).
NAMESPACES: tuple[NsType, ...] = (
    NsType("user", 0x10000000, CONTAINER_NEW_USER_NS, "user", "user", 9),
    NsType("mnt", 0x00020000, CONTAINER_NEW_FS_NS, "mount", "mnt", 3),
    NsType("uts", 0x04000000, CONTAINER_NEW_UTS_NS, "uts", "uts", 10),
    NsType("ipc", 0x08000000, CONTAINER_NEW_IPC_NS, "ipc", "ipc", 2),
    NsType("net", 0x40000000, CONTAINER_NEW_NET_NS, "net", "net", 4),
    NsType("cgroup", 0x02000000, CONTAINER_NEW_CGROUP_NS, "cgroupns", "cgroup", 1),
    NsType("pid", 0x20000000, CONTAINER_NEW_PID_NS, "pid", "pid_for_children", 5),
)
BY_NAME: dict[str, NsType] = {t.name: t for t in NAMESPACES}
NAMES: tuple[str, ...] = tuple(t.name for t in NAMESPACES)
# Namespace type name to its clone flag.
NS_FLAGS: dict[str, int] = {t.name: t.clone_flag for t in NAMESPACES}
# Namespace type that each container flag asks for. NEW_EMPTY_FS_NS also makes a mount
# namespace; it differs in what the namespace holds.
FLAG_NAMESPACES: dict[int, str] = {
    **{t.container_flag: t.name for t in NAMESPACES}, CONTAINER_NEW_EMPTY_FS_NS: "mnt"}
