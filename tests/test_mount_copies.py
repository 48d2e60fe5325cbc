"""Copies of the service's mount namespace made ahead for root's containers
(containerfs/namespaces.py MountCopies): a container given one sees what a fresh copy would
show, mounts made after the copy included, and each gets its own."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import syscalls
from syscalls import linux
from syscalls import (
    CONTAINER_KILL_ON_CLOSE, CONTAINER_NEW_FS_NS, CONTAINER_NEW_NET_NS, CONTAINER_NEW_UTS_NS,
)

from .conftest import child_result, in_container

FLAGS = CONTAINER_NEW_FS_NS | CONTAINER_NEW_UTS_NS | CONTAINER_NEW_NET_NS | CONTAINER_KILL_ON_CLOSE


def _claimed(service: Any, count: int, timeout: float = 10) -> int:
    """Wait until the service's log says `count` containers were given a copy made ahead."""
    deadline = time.monotonic() + timeout
    while True:
        claimed = service.log.read_text().count("copy made ahead")
        if claimed >= count or time.monotonic() > deadline:
            return claimed


def test_a_mount_made_after_the_copy_is_seen(service: Any) -> None:
    """A copy of the mount namespace made before a mount is never handed out."""
    first = syscalls.container_create("first", FLAGS)
    os.close(first)
    where = tempfile.mkdtemp(prefix="cfs-prepared-")
    fd = -1
    try:
        time.sleep(0.5)  # copies are made meanwhile, before the mount below
        fs = syscalls.fsopen("tmpfs", syscalls.FSOPEN_CLOEXEC)
        syscalls.fsconfig(fs, syscalls.FSCONFIG_CMD_CREATE)
        mnt = syscalls.fsmount(fs, syscalls.FSMOUNT_CLOEXEC)
        os.close(fs)
        syscalls.move_mount(mnt, "", -100, where, syscalls.MOVE_MOUNT_F_EMPTY_PATH)
        os.close(mnt)
        fd = syscalls.container_create("second", FLAGS)
        pid, seen = in_container(fd, lambda: os.path.ismount(where))
        assert child_result(pid) == 0
        assert seen is True
    finally:
        if fd >= 0:
            os.close(fd)
        if os.path.ismount(where):
            linux.umount2(where, linux.MNT_DETACH)
        os.rmdir(where)


def test_copies_are_their_own(service: Any) -> None:
    """Containers given copies made ahead each have their own namespaces."""
    fds = [syscalls.container_create("p", FLAGS) for _ in range(6)]
    try:
        time.sleep(0.3)
        fds += [syscalls.container_create("p", FLAGS) for _ in range(3)]
        assert _claimed(service, 1) >= 1
        ids = [syscalls.container_status(fd)["id"] for fd in fds]
        assert len(set(ids)) == len(ids)
        nets = set()
        for fd in fds:
            pid, net = in_container(fd, lambda: os.stat("/proc/self/ns/net").st_ino)
            assert child_result(pid) == 0
            nets.add(net)
        assert len(nets) == len(fds)
        assert os.stat("/proc/self/ns/net").st_ino not in nets
    finally:
        for fd in fds:
            os.close(fd)
