"""The proposal's container sample on our API: an empty container built from outside.

A tmpfs root, the host's /usr, /bin and /lib bound in, proc mounted from outside before init
exists, then a command forked into it. Run as root with a service up; prints what init sees.
"""

from __future__ import annotations

import os
import sys

import syscalls as S
from syscalls import (
    CONTAINER_FD_CLOEXEC, CONTAINER_KILL_ON_CLOSE, CONTAINER_NEW_EMPTY_FS_NS,
    CONTAINER_NEW_PID_NS, FSCONFIG_SET_CONTAINER, MOVE_MOUNT_T_CONTAINER_ROOT,
)

AT_RECURSIVE = 0x8000


def main(command: list[str]) -> int:
    cfd = S.container_create("foo-test", CONTAINER_NEW_EMPTY_FS_NS | CONTAINER_NEW_PID_NS
                             | CONTAINER_KILL_ON_CLOSE | CONTAINER_FD_CLOEXEC)
    # The root: a fresh tmpfs, made the container's only mount.
    fs = S.fsopen("tmpfs", S.FSOPEN_CLOEXEC)
    S.fsconfig(fs, FSCONFIG_SET_CONTAINER, None, None, cfd)
    S.fsconfig(fs, S.FSCONFIG_CMD_CREATE)
    root = S.fsmount(fs, S.FSMOUNT_CLOEXEC)
    S.move_mount(root, "", cfd, "/", S.MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_CONTAINER_ROOT)
    # The host's programs, bound in read-only trees, each at a path inside the container.
    for d in ("usr", "bin", "lib", "lib64"):
        if not os.path.exists("/" + d):
            continue
        S.mkdirat(cfd, d, 0o755)
        tree = S.open_tree(S.AT_FDCWD, "/" + d, S.OPEN_TREE_CLONE | S.OPEN_TREE_CLOEXEC | AT_RECURSIVE)
        S.move_mount(tree, "", cfd, d, S.MOVE_MOUNT_F_EMPTY_PATH)
        os.close(tree)
    # proc, from outside, before init: it will show the container's own PID namespace.
    S.mkdirat(cfd, "proc", 0o555)
    fs = S.fsopen("proc", S.FSOPEN_CLOEXEC)
    S.fsconfig(fs, FSCONFIG_SET_CONTAINER, None, None, cfd)
    S.fsconfig(fs, S.FSCONFIG_CMD_CREATE)
    proc = S.fsmount(fs, S.FSMOUNT_CLOEXEC)
    S.move_mount(proc, "", cfd, "proc", S.MOVE_MOUNT_F_EMPTY_PATH)

    pid = S.fork_into_container(cfd)
    if pid == 0:
        os.execvp(command[0], command)
    _, status = os.waitpid(pid, 0)
    os.close(cfd)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["sh", "-c", "echo pid $$; ls /; ls /proc | grep '^[0-9]'"]))
