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
from .confine import container_set_caps, container_set_seccomp
from .limits import (
    container_freeze,
    container_get_limit,
    container_set_limit,
    container_stats,
    container_thaw,
)
from .sockets import container_socket, socketns
from .pids import container_pids, translate_pid
from .cspawn import container_spawn

__all__ = [
    "container_set_caps",
    "container_set_seccomp",
    "container_freeze",
    "container_get_limit",
    "container_set_limit",
    "container_stats",
    "container_thaw",
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
    "container_pids",
    "translate_pid",
    "container_kill",
    "container_socket",
    "container_spawn",
    "container_status",
    "container_wait",
    "fork_into_container",
    "socketns",
]

# The mount API and the *at() calls, each accepting a container handle (issue 4).
from .at import (  # noqa: E402
    AT_EMPTY_PATH, AT_FDCWD, AT_REMOVEDIR, AT_SYMLINK_FOLLOW, AT_SYMLINK_NOFOLLOW,
    RESOLVE_BENEATH, RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS,
    faccessat, fchmodat, fchownat, fstatat, linkat, mkdirat, mknodat, openat, openat2,
    readlinkat, renameat2, statx, symlinkat, unlinkat, utimensat,
)
from .mount import (  # noqa: E402
    FSCONFIG_CMD_CREATE, FSCONFIG_SET_FD, FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING,
    FSMOUNT_CLOEXEC, FSOPEN_CLOEXEC, MOVE_MOUNT_F_EMPTY_PATH, MOVE_MOUNT_T_EMPTY_PATH,
    OPEN_TREE_CLOEXEC, OPEN_TREE_CLONE, fsconfig, fsmount, fsopen, move_mount, open_tree,
)

__all__ += [
    "AT_EMPTY_PATH", "AT_FDCWD", "AT_REMOVEDIR", "AT_SYMLINK_FOLLOW", "AT_SYMLINK_NOFOLLOW",
    "RESOLVE_BENEATH", "RESOLVE_IN_ROOT", "RESOLVE_NO_MAGICLINKS", "RESOLVE_NO_SYMLINKS",
    "faccessat", "fchmodat", "fchownat", "fstatat", "linkat", "mkdirat", "mknodat", "openat",
    "openat2", "readlinkat", "renameat2", "statx", "symlinkat", "unlinkat", "utimensat",
    "FSCONFIG_CMD_CREATE", "FSCONFIG_SET_FD", "FSCONFIG_SET_FLAG", "FSCONFIG_SET_STRING",
    "FSMOUNT_CLOEXEC", "FSOPEN_CLOEXEC", "MOVE_MOUNT_F_EMPTY_PATH", "MOVE_MOUNT_T_EMPTY_PATH",
    "OPEN_TREE_CLOEXEC", "OPEN_TREE_CLONE", "fsconfig", "fsmount", "fsopen", "move_mount",
    "open_tree",
]

# Per-container keyrings and request_key() interception (issue 6, section 7).
from .keys import (  # noqa: E402
    KEY_SPEC_PROCESS_KEYRING, KEY_SPEC_SESSION_KEYRING, KEY_SPEC_THREAD_KEYRING,
    KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING, keyctl_container_intercept,
    keyctl_set_container_keyring,
)

__all__ += [
    "KEY_SPEC_PROCESS_KEYRING", "KEY_SPEC_SESSION_KEYRING", "KEY_SPEC_THREAD_KEYRING",
    "KEY_SPEC_USER_KEYRING", "KEY_SPEC_USER_SESSION_KEYRING", "keyctl_container_intercept",
    "keyctl_set_container_keyring",
]
