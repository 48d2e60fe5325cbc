"""The namespace holder: a mount namespace of the service's own, whose only mount is a private
tmpfs, where containers' namespaces are held as nsfs binds (containerfs/nsstore.py keeps the
books). What is done in it, by a thread that stands there for a moment, and on its tmpfs.
"""

from __future__ import annotations

import errno
import logging
import os

from syscalls import linux, nsexec
from syscalls.mount import OPEN_TREE_CLOEXEC, OPEN_TREE_CLONE

from .namespaces import pivot_into

log = logging.getLogger("containerfs")


def make_holder() -> tuple[int, int]:
    """A new holder, older than any mount namespace made after it on our CPUs: (its mount
    namespace, an O_PATH fd of its tmpfs root).

    The kernel binds a mount namespace only into an older one (by namespace id), and since
    6.18 ids come from per-CPU batches (of 4096): a holder made on a CPU whose batch is above
    another CPU's would refuse the namespaces made on that one until its batch runs out (a
    third of the first thousand containers here). So the holder is made on the CPU whose next
    id is lowest, and checked: the next id on every CPU we may run on must be above it (ids
    on one CPU only grow)."""
    cpus = sorted(os.sched_getaffinity(0))
    for _ in range(8):
        nexts = {cpu: _next_id_on(cpu, cpus) for cpu in cpus}
        lowest = min(cpus, key=lambda cpu: nexts[cpu] or 0)
        try:
            os.sched_setaffinity(0, {lowest})
            mnt, root = _make_here()
        finally:
            os.sched_setaffinity(0, cpus)
        mine = linux.ns_id(mnt)
        if mine is None or all((_next_id_on(cpu, cpus) or 0) > mine for cpu in cpus):
            return mnt, root
        os.close(mnt)
        os.close(root)
    log.warning("namespace holder: some CPU gives older namespace ids; mount namespaces "
                "made there are held by fd until its batch runs out")
    return _make_here()


def _make_here() -> tuple[int, int]:
    fs = linux.fsopen("tmpfs", linux.FSOPEN_CLOEXEC)
    try:
        linux.fsconfig(fs, linux.FSCONFIG_SET_STRING, "source", "containerfs-ns", 0)
        linux.fsconfig(fs, linux.FSCONFIG_SET_STRING, "mode", "0700", 0)
        linux.fsconfig(fs, linux.FSCONFIG_CMD_CREATE, None, None, 0)
        tmpfs = linux.fsmount(fs, linux.FSMOUNT_CLOEXEC, 0)
    finally:
        os.close(fs)
    try:
        with nsexec.elsewhere(["mnt"]):
            linux.unshare(linux.CLONE_NEWNS)
            made = pivot_into(tmpfs)
    finally:
        os.close(tmpfs)
    return made["mnt"], made["root"]


def _next_id_on(cpu: int, cpus: list[int]) -> int | None:
    """The id the next namespace made on `cpu` gets (about: a throwaway UTS namespace's)."""
    try:
        os.sched_setaffinity(0, {cpu})
        with nsexec.elsewhere(["uts"]):
            linux.unshare(linux.CLONE_NEWUTS)
            fd = os.open("/proc/thread-self/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
            try:
                return linux.ns_id(fd)
            finally:
                os.close(fd)
    finally:
        os.sched_setaffinity(0, cpus)


def mount_max_error() -> OSError:
    """What a create gets once the holder has as many mounts as fs.mount-max allows."""
    return OSError(errno.EAGAIN, "the service holds as many namespaces as fs.mount-max lets "
                   "one mount namespace have; remove containers first, or raise that sysctl")


def bind(holder: int, items: list[tuple[str, int]]) -> tuple[set[int], int]:
    """Bind each namespace fd of `items` at its name in holder `holder`, in one trip of this
    thread; return (the indices of the items the kernel refused to bind (ELOOP: a mount
    namespace not younger than the holder), how many items were tried: the rest are not
    bound, fs.mount-max is reached). Any other error undoes the binds made and is raised."""
    refused: set[int] = set()
    made: list[str] = []
    if not items:
        return refused, 0
    with nsexec.elsewhere(["mnt"]):
        linux.setns(holder, linux.CLONE_NEWNS)
        try:
            for i, (name, fd) in enumerate(items):
                try:
                    _bind_one(fd, name)
                    made.append(name)
                except OSError as e:
                    if e.errno == errno.ENOSPC:  # (the binds made stay: they fitted)
                        return refused, i
                    if e.errno != errno.ELOOP:
                        raise
                    refused.add(i)
        except BaseException:
            for name in made:
                _unbind_one(name)
            raise
    return refused, len(items)


def unbind_all(holder: int, names: list[str]) -> None:
    """Unmount and remove the binds `names` (in a worker thread: each unmount waits for an
    RCU grace period)."""
    with nsexec.elsewhere(["mnt"]):
        linux.setns(holder, linux.CLONE_NEWNS)
        for name in names:
            _unbind_one(name)


def _bind_one(fd: int, name: str) -> None:
    """Bind namespace `fd` at `name` (the thread stands in the holder, at its root)."""
    os.close(os.open(name, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
    try:
        tree = linux.open_tree(fd, "", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | linux.AT_EMPTY_PATH)
        try:
            linux.move_mount(tree, "", linux.AT_FDCWD, name, linux.MOVE_MOUNT_F_EMPTY_PATH)
        finally:
            os.close(tree)
    except BaseException:
        os.unlink(name)
        raise


def _unbind_one(name: str) -> None:
    try:
        linux.umount2(name, linux.MNT_DETACH)
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: not mounted (a bind that never was)
            log.warning("namespace %s not unmounted: %s", name, e)
    unlink(name, linux.AT_FDCWD)


# ---- on the tmpfs, through the service's fd of its root ------------------------------------

def key(name: str) -> tuple[str, int] | None:
    """(type, ino) of a bind's name, <type>.<ino>[.<tag>]; None if it is none."""
    nstype, _, rest = name.partition(".")
    ino = rest.partition(".")[0]
    return (nstype, int(ino)) if ino.isdigit() else None


def replace_link(target: str, path: str, dirfd: int, new: bool = False) -> None:
    """Make `path` a symlink to `target`, replacing one there; `new`: none is expected (then
    one syscall, two only if one was there after all)."""
    if new:
        try:
            os.symlink(target, path, dir_fd=dirfd)
            return
        except FileExistsError:
            pass
    unlink(path, dirfd)
    os.symlink(target, path, dir_fd=dirfd)


def unlink(path: str, dirfd: int) -> None:
    try:
        os.unlink(path, dir_fd=None if dirfd == linux.AT_FDCWD else dirfd)
    except FileNotFoundError:
        pass


def exists(path: str, dirfd: int) -> bool:
    try:
        os.stat(path, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def bound_at(name: str, ino: int, dirfd: int) -> bool:
    """Whether `name` is a bind of namespace `ino`. A file a bind cut short left there (a
    kill -9 between _bind_one's file and its mount) is removed: the name can be bound."""
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if st.st_ino == ino and st.st_dev == os.stat("/proc/self/ns/mnt").st_dev:  # (nsfs)
        return True
    unlink(name, dirfd)
    return False


def listdir(path: str, dirfd: int) -> list[str]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)
