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


def test_a_creator_whose_root_is_another_mount_of_it_gets_no_copy() -> None:
    """A copy made ahead has the service's own root. A creator chrooted into another mount of
    that directory (a read-only bind of /, say: same device and inode) must not be given
    one: its container's root would be the writable / instead of a copy of its own."""
    from containerfs.namespaces import MountCopies
    ms_rdonly, ms_remount, ms_bind = 1, 32, 4096
    where = tempfile.mkdtemp(prefix="cfs-rootbind-")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # in a mount namespace of its own: nothing here is seen outside
        result = "error"
        try:
            os.close(r)
            linux.unshare(linux.CLONE_NEWNS)
            linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
            linux.mount("/", where, None, ms_bind)
            linux.mount(None, where, None, ms_bind | ms_remount | ms_rdonly)
            copies = MountCopies()
            copies.fill_once()
            bound = os.open(where, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            creator = {"mnt": os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC),
                       "root": bound}
            assert linux.same_file(bound, "/")
            got = copies.take(creator)
            result = "no copy" if got is None else "copy"
        finally:
            os.write(w, result.encode())
            os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r) as f:
            result = f.read()
        assert child_result(pid) == 0
    finally:
        os.rmdir(where)
    assert result == "no copy"
