"""openat(cfd, path) + close through a container handle, against os.open(path, dir_fd=rootfd).

Starts its own service in a temporary directory unless CONTAINERFS_SOCKET names a running one.
Prints both medians and the ratio.
"""

from __future__ import annotations

import os
import statistics
import time

import syscalls as S
from syscalls import CONTAINER_NEW_EMPTY_FS_NS, MOVE_MOUNT_T_CONTAINER_ROOT

from ._service import running_service


def timed(fn, n: int) -> float:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main(n: int = 20000) -> None:
    with running_service():
        cfd = S.container_create("bench-at", CONTAINER_NEW_EMPTY_FS_NS)
        fs = S.fsopen("tmpfs", S.FSOPEN_CLOEXEC)
        S.fsconfig(fs, S.FSCONFIG_CMD_CREATE)
        mfd = S.fsmount(fs, S.FSMOUNT_CLOEXEC)
        S.move_mount(mfd, "", cfd, "/", S.MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_CONTAINER_ROOT)
        S.mkdirat(cfd, "a")
        S.mkdirat(cfd, "a/b")
        os.close(S.openat(cfd, "a/b/file", os.O_CREAT | os.O_WRONLY, 0o644))
        rootfd = S.openat(cfd, ".", os.O_RDONLY | os.O_DIRECTORY)  # the same tree, plainly

        def ours() -> None:
            os.close(S.openat(cfd, "a/b/file", os.O_RDONLY))

        def plain() -> None:
            os.close(os.open("a/b/file", os.O_RDONLY, dir_fd=rootfd))

        ours()  # the first call fetches the root from the service; later ones use the cache
        a = b = 0.0
        for _ in range(3):
            a += timed(ours, n // 3)
            b += timed(plain, n // 3)
        print(f"syscalls.openat(cfd, 'a/b/file') + close  median {a / 3 * 1e6:.2f} us")
        print(f"os.open('a/b/file', dir_fd=rootfd) + close median {b / 3 * 1e6:.2f} us")
        print(f"ratio: {a / b:.2f}x")


if __name__ == "__main__":
    main()
