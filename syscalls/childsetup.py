"""What a new process does first, in fork_into_container, before the caller's code runs in
it: its umask, and for init the procs of its own PID namespace put in the place of the
placeholders a creator mounted before init existed (docs/design.md)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from . import linux
from .replies import ForkGrant


def join_groups(reply: ForkGrant, fds: list[int]) -> None:
    """The new process's first act: join the container's cgroup v1 groups (its limits on a
    hybrid host) through the cgroup.procs fds the service lent; its cgroup2 group it was
    cloned into. A process that cannot join never runs unlimited: it exits (127)."""
    for name, fd in zip(reply.fds, fds):
        if name == "cgroup.v1":
            try:
                os.write(fd, b"0")
            except OSError as e:
                os.write(2, f"fork_into_container: joining the container's cgroups: {e}\n"
                         .encode())
                os._exit(127)


def child_setup(reply: ForkGrant, fds: list[int], visible_proc: int = -1,
                 done: int = -1) -> None:
    """In the new process, before any of the caller's code runs in it: umask, and init's
    procs. `fds` are the Fork reply's; `visible_proc` is a mount namespace where a proc
    may be mounted (see _enter); `done` is closed once everything is in place."""
    os.umask(0o022)
    unsafe_path = ""
    try:
        entries = reply.proc_paths
        placeholders = {entry["mnt_id"] for entry in entries}
        mine: set[int] = set()
        for entry in entries:
            unsafe_path = entry["path"]
            complete_proc(entry, placeholders, mine,
                           make_proc(entry, visible_proc, reply, fds))
    except BaseException as e:
        # Nobody can be told any more: the caller already has our pid. Die loudly instead of
        # running with a placeholder for /proc, or anywhere but in the container.
        os.write(2, f"fork_into_container: mounting proc at {unsafe_path}: {e}\n".encode())
        os._exit(127)
    if visible_proc >= 0:
        os.close(visible_proc)
    if done >= 0:
        os.close(done)


def make_proc(entry: dict[str, Any], visible_proc: int, reply: ForkGrant,
               fds: list[int]) -> int:
    """A detached mount of a proc of our own (new) PID namespace, with the parameters and
    mount attributes the caller gave."""
    fs = linux.fsopen("proc", linux.FSOPEN_CLOEXEC)
    try:
        for cmd, key, value in entry["params"]:
            linux.fsconfig(fs, cmd, key, value, 0)
        linux.fsconfig(fs, linux.FSCONFIG_CMD_CREATE, None, None, 0)
        if visible_proc < 0:
            return linux.fsmount(fs, linux.FSMOUNT_CLOEXEC, entry["attrs"])
        # In a user namespace, the kernel mounts a proc only where one is already fully
        # visible, which our own root (built empty) has not: mount it in that copy of the
        # caller's mount namespace, then come back to ours.
        names = reply.fds
        linux.setns(visible_proc, linux.CLONE_NEWNS)
        try:
            return linux.fsmount(fs, linux.FSMOUNT_CLOEXEC, entry["attrs"])
        finally:
            linux.setns(fds[names.index("ns:mnt")], linux.CLONE_NEWNS)
            os.fchdir(fds[names.index("root")])
            os.chroot(".")
            os.chdir("/")
    finally:
        os.close(fs)


def complete_proc(entry: dict[str, Any], placeholders: set[int], mine: set[int],
                   mnt: int) -> None:
    """Put proc mount `mnt` (taken) at the entry's path (inside our root) in the place of the
    placeholders mounted there before we existed: those on top are taken away first (no
    process but us is in the container yet: the fork is reported once we are done), so the
    proc is the only mount there. A placeholder moved or covered since is left alone, and
    the proc goes on top of what is there. `mine` holds the procs already put in place, so
    two entries naming one place give it one proc."""
    try:
        target = open_in_root(entry["path"])
        try:
            while (top := linux.mount_id(target)) in placeholders:
                os.fchdir(target)  # the placeholder's root: "." names that mount
                try:
                    linux.umount2(".", linux.MNT_DETACH)
                finally:
                    os.chdir("/")
                os.close(target)
                target = open_in_root(entry["path"])
            if top in mine:
                return
            linux.move_mount(mnt, "", target, "",
                              linux.MOVE_MOUNT_F_EMPTY_PATH | linux.MOVE_MOUNT_T_EMPTY_PATH)
            mine.add(linux.mount_id(mnt))
        finally:
            os.close(target)
    finally:
        os.close(mnt)


def open_in_root(unsafe_path: str) -> int:
    """An O_PATH fd of `unsafe_path` resolved in our root, never outside it."""
    root = os.open("/", os.O_PATH | os.O_CLOEXEC)
    try:
        return linux.openat2(root, unsafe_path, os.O_PATH | os.O_CLOEXEC,
                              resolve=linux.RESOLVE_IN_ROOT | linux.RESOLVE_NO_MAGICLINKS)
    finally:
        os.close(root)


def done_pipe(reply: ForkGrant) -> tuple[int, int]:
    """For init with procs to put in place: a pipe whose write end init closes once they are
    (so that the process is reported, and the container seen running, only then); else
    (-1, -1)."""
    if not reply.proc_paths:
        return -1, -1
    return os.pipe2(os.O_CLOEXEC)


def wait_done(done_r: int, done_w: int) -> None:
    """In the parent: wait until init has closed its end of the _done_pipe (or exited)."""
    if done_r < 0:
        return
    os.close(done_w)
    try:
        while os.read(done_r, 1):
            pass
    finally:
        os.close(done_r)


def run_setup(setup: Callable[[], None] | None) -> None:
    """The caller's own setup (fork_into_container's `before_confinement`), in the new
    process before its confinement. A failure is never followed by the caller's code: the
    process says why on fd 2 and exits (127)."""
    if setup is None:
        return
    try:
        setup()
    except BaseException as e:
        try:
            os.write(2, f"fork_into_container: setup before confinement: {e}\n".encode())
        finally:
            os._exit(127)
