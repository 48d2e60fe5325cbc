"""The proposed container system calls, as a Python program sees them.

    from syscalls import container_create, fork_into_container, CONTAINER_NEW_PID_NS

Each call raises OSError with the errno the kernel call would give. With no containerfs service
running, the container calls fail with ENOSYS, as a kernel without them would.
"""

from .constants import (
    CONTAINER_FD_CLOEXEC,
    CONTAINER_KILL_ON_CLOSE,
    CONTAINER_NEW_CGROUP_NS,
    CONTAINER_NEW_EMPTY_FS_NS,
    CONTAINER_NEW_FS_NS,
    CONTAINER_NEW_IPC_NS,
    CONTAINER_NEW_NET_NS,
    CONTAINER_NEW_PID_NS,
    CONTAINER_NEW_USER_NS,
    CONTAINER_NEW_UTS_NS,
    FSCONFIG_SET_CONTAINER,
    MOVE_MOUNT_T_CONTAINER_ROOT,
)
from .container import (
    container_create,
    container_kill,
    container_status,
    container_wait,
    fork_into_container,
)

__all__ = [
    "CONTAINER_FD_CLOEXEC",
    "CONTAINER_KILL_ON_CLOSE",
    "CONTAINER_NEW_CGROUP_NS",
    "CONTAINER_NEW_EMPTY_FS_NS",
    "CONTAINER_NEW_FS_NS",
    "CONTAINER_NEW_IPC_NS",
    "CONTAINER_NEW_NET_NS",
    "CONTAINER_NEW_PID_NS",
    "CONTAINER_NEW_USER_NS",
    "CONTAINER_NEW_UTS_NS",
    "FSCONFIG_SET_CONTAINER",
    "MOVE_MOUNT_T_CONTAINER_ROOT",
    "container_create",
    "container_kill",
    "container_status",
    "container_wait",
    "fork_into_container",
]
