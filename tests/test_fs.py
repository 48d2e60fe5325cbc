"""Building containers from outside: roots, mounts, proc, and *at() calls confined to the root."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterator
from typing import Any

import pytest

import syscalls as S
from syscalls import (
    CONTAINER_FD_CLOEXEC,
    CONTAINER_KILL_ON_CLOSE,
    CONTAINER_NEW_EMPTY_FS_NS,
    CONTAINER_NEW_PID_NS,
    FSCONFIG_SET_CONTAINER,
    MOVE_MOUNT_T_CONTAINER_ROOT,
)

from .conftest import OTHER_GID, OTHER_UID, child_result, held_init, run_as, tmpfs

AT_RECURSIVE = 0x8000
SET_ROOT = S.MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_CONTAINER_ROOT


@pytest.fixture
def rooted(service: Any) -> Iterator[int]:
    """An empty-fs container whose root is a fresh tmpfs."""
    cfd = S.container_create("rooted", CONTAINER_NEW_EMPTY_FS_NS | CONTAINER_NEW_PID_NS
                             | CONTAINER_KILL_ON_CLOSE | CONTAINER_FD_CLOEXEC)
    mfd = tmpfs()
    S.move_mount(mfd, "", cfd, "/", SET_ROOT)
    os.close(mfd)
    yield cfd
    os.close(cfd)


def bind_host(cfd: int, *dirs: str) -> None:
    for d in dirs:
        S.mkdirat(cfd, d, 0o755)
        tree = S.open_tree(S.AT_FDCWD, "/" + d, S.OPEN_TREE_CLONE | S.OPEN_TREE_CLOEXEC | AT_RECURSIVE)
        S.move_mount(tree, "", cfd, d, S.MOVE_MOUNT_F_EMPTY_PATH)
        os.close(tree)


def errno_of(fn: Any, *args: Any) -> int:
    with pytest.raises(OSError) as info:
        fn(*args)
    return info.value.errno


# ---- the proposal's sample ----------------------------------------------------------------

def test_proposal_sample(rooted: int) -> None:
    cfd = rooted
    bind_host(cfd, "usr", "bin", "lib", "lib64")
    S.mkdirat(cfd, "proc", 0o555)
    # proc is made from outside before init exists: it must show the container's PID namespace.
    fs = S.fsopen("proc", S.FSOPEN_CLOEXEC)
    S.fsconfig(fs, FSCONFIG_SET_CONTAINER, None, None, cfd)
    S.fsconfig(fs, S.FSCONFIG_CMD_CREATE)
    mfd = S.fsmount(fs, S.FSMOUNT_CLOEXEC)
    S.move_mount(mfd, "", cfd, "proc", S.MOVE_MOUNT_F_EMPTY_PATH)
    r, w = os.pipe()
    pid = S.fork_into_container(cfd)
    if pid == 0:
        os.close(r)
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        os.write(w, json.dumps({"pid": os.getpid(), "root": sorted(os.listdir("/")),
                                "proc_pids": pids, "cwd": os.getcwd()}).encode())
        os._exit(0)
    os.close(w)
    got = json.loads(os.read(r, 65536))
    assert child_result(pid) == 0
    assert got["pid"] == 1
    assert got["root"] == ["bin", "lib", "lib64", "proc", "usr"]
    assert got["proc_pids"] == [1], "the container's /proc shows another PID namespace"
    assert got["cwd"] == "/"


def test_proc_after_init_shows_container_pids(rooted: int) -> None:
    cfd = rooted
    bind_host(cfd, "usr", "bin", "lib", "lib64")
    S.mkdirat(cfd, "proc", 0o555)
    init, w = held_init(cfd)
    fs = S.fsopen("proc", S.FSOPEN_CLOEXEC)
    S.fsconfig(fs, FSCONFIG_SET_CONTAINER, None, None, cfd)
    S.fsconfig(fs, S.FSCONFIG_CMD_CREATE)
    mfd = S.fsmount(fs, S.FSMOUNT_CLOEXEC)
    S.move_mount(mfd, "", cfd, "proc", S.MOVE_MOUNT_F_EMPTY_PATH)
    proc = S.openat(cfd, "proc", os.O_RDONLY | os.O_DIRECTORY)
    assert sorted(int(p) for p in os.listdir(proc) if p.isdigit()) == [1]
    os.close(proc)
    os.close(w)
    assert child_result(init) == 0


# ---- hostile trees ------------------------------------------------------------------------

@pytest.fixture
def hostile(rooted: int) -> int:
    cfd = rooted
    S.mkdirat(cfd, "dir")
    fd = S.openat(cfd, "dir/file", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"inside")
    os.close(fd)
    S.symlinkat("/etc", cfd, "abs")                 # absolute, points "out"
    S.symlinkat("../../../../../etc", cfd, "rel")   # relative, climbs "out"
    S.symlinkat("loop", cfd, "loop")
    S.symlinkat("/", cfd, "slash")
    S.symlinkat("/host-marker-cfs", cfd, "dangling")
    S.symlinkat("dir/../../..", cfd, "dotdot")
    return cfd


HOST_FILE = "/etc/hostname"  # exists on the host, never inside the test container


@pytest.mark.parametrize("path, flags, expect", [
    ("abs/hostname", os.O_RDONLY, errno.ENOENT),
    ("rel/hostname", os.O_RDONLY, errno.ENOENT),
    ("../../../etc/hostname", os.O_RDONLY, errno.ENOENT),
    ("slash/etc/hostname", os.O_RDONLY, errno.ENOENT),
    ("dotdot/etc/hostname", os.O_RDONLY, errno.ENOENT),
    ("loop", os.O_RDONLY, errno.ELOOP),
    ("loop/x", os.O_RDONLY, errno.ELOOP),
    ("dir/file/..", os.O_RDONLY, errno.ENOTDIR),
    ("", os.O_RDONLY, errno.EINVAL),
    ("../dir/file", os.O_RDONLY, 0),
    ("slash/dir/file", os.O_RDONLY, 0),
    ("dotdot/dir/file", os.O_RDONLY, 0),
])
def test_openat_stays_inside(hostile: int, path: str, flags: int, expect: int) -> None:
    if expect:
        assert errno_of(S.openat, hostile, path, flags) == expect
    else:
        fd = S.openat(hostile, path, flags)
        assert os.read(fd, 10) == b"inside"
        os.close(fd)


def test_final_symlinks_are_never_followed_out(hostile: int) -> None:
    cfd = hostile
    # O_CREAT through a dangling absolute symlink creates the file inside the container.
    fd = S.openat(cfd, "dangling", os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)
    assert not os.path.exists("/host-marker-cfs")
    assert stat.S_ISREG(S.fstatat(cfd, "host-marker-cfs").st_mode)
    # Acting on the final entry acts on the symlink itself.
    assert stat.S_ISLNK(S.fstatat(cfd, "abs", S.AT_SYMLINK_NOFOLLOW).st_mode)
    assert S.readlinkat(cfd, "abs") == "/etc"
    assert errno_of(S.mkdirat, cfd, "abs/new") == errno.ENOENT
    assert errno_of(S.symlinkat, "x", cfd, "abs/evil") == errno.ENOENT
    assert errno_of(S.renameat2, cfd, "dir/file", cfd, "abs/stolen") == errno.ENOENT
    assert errno_of(S.linkat, cfd, "dir/file", cfd, "rel/stolen") == errno.ENOENT
    assert errno_of(S.mknodat, cfd, "slash/etc/node", stat.S_IFIFO | 0o600) == errno.ENOENT
    assert errno_of(S.unlinkat, cfd, "abs/hostname") == errno.ENOENT
    S.unlinkat(cfd, "abs")  # removes the link, nothing it points to
    assert os.path.exists(HOST_FILE)
    assert errno_of(S.fstatat, cfd, "abs", S.AT_SYMLINK_NOFOLLOW) == errno.ENOENT


def test_dot_dot_at_root_stays_at_root(hostile: int) -> None:
    cfd = hostile
    root = S.fstatat(cfd, ".")
    for path in ("..", "../..", "dir/../..", "slash", "dotdot"):
        assert S.fstatat(cfd, path).st_ino == root.st_ino, path
    assert errno_of(S.mkdirat, cfd, "..") == errno.EEXIST
    assert errno_of(S.unlinkat, cfd, "..", S.AT_REMOVEDIR) == errno.ENOTEMPTY
    S.mkdirat(cfd, "../../escape")
    assert not os.path.exists("/escape")
    assert stat.S_ISDIR(S.fstatat(cfd, "escape").st_mode)


def test_directory_swapped_for_symlink(hostile: int) -> None:
    cfd = hostile
    S.mkdirat(cfd, "victim")
    S.unlinkat(cfd, "victim", S.AT_REMOVEDIR)
    S.symlinkat("/", cfd, "victim")  # a hostile process inside swaps it between our calls
    S.mkdirat(cfd, "victim/planted")
    assert not os.path.exists("/planted")
    assert stat.S_ISDIR(S.fstatat(cfd, "planted").st_mode)
    fd = S.openat(cfd, "victim/dir/file", os.O_RDONLY)
    assert os.read(fd, 10) == b"inside"
    os.close(fd)


def test_magic_links_are_not_followed(rooted: int) -> None:
    cfd = rooted
    bind_host(cfd, "proc")  # the host's proc: its magic links lead anywhere
    assert errno_of(S.openat, cfd, "proc/self/root/etc/hostname", os.O_RDONLY) == errno.ELOOP
    assert errno_of(S.openat, cfd, f"proc/{os.getpid()}/cwd", os.O_RDONLY) == errno.ELOOP


def test_metadata_calls(hostile: int) -> None:
    cfd = hostile
    S.fchmodat(cfd, "dir/file", 0o600)
    assert stat.S_IMODE(S.fstatat(cfd, "dir/file").st_mode) == 0o600
    S.fchownat(cfd, "dir/file", 123, 456)
    st = S.statx(cfd, "dir/file")
    assert (st["uid"], st["gid"], st["size"]) == (123, 456, 6)
    S.utimensat(cfd, "dir/file", (1_000_000_000, 2_000_000_000))
    assert S.fstatat(cfd, "dir/file").st_mtime_ns == 2_000_000_000
    S.utimensat(cfd, "dir/file")  # no times: now
    assert S.fstatat(cfd, "dir/file").st_mtime_ns > 2_000_000_000
    assert S.faccessat(cfd, "dir/file", os.R_OK)
    assert not S.faccessat(cfd, "nothing", os.R_OK)
    S.linkat(cfd, "dir/file", cfd, "hard")
    assert S.fstatat(cfd, "hard").st_ino == S.fstatat(cfd, "dir/file").st_ino
    S.renameat2(cfd, "hard", cfd, "dir/renamed")
    assert errno_of(S.fstatat, cfd, "hard") == errno.ENOENT
    # An absolute path ignores the handle, as for any *at() call.
    assert S.fstatat(cfd, HOST_FILE).st_ino == os.stat(HOST_FILE).st_ino


# ---- errors -------------------------------------------------------------------------------

def test_root_errors(service: Any) -> None:
    cfd = S.container_create("r", CONTAINER_NEW_EMPTY_FS_NS)
    assert errno_of(S.openat, cfd, "x", os.O_RDONLY) == errno.ENOENT
    assert errno_of(S.fork_into_container, cfd) == errno.ENOENT
    mfd = tmpfs()
    assert errno_of(S.move_mount, mfd, "", cfd, "/sub", SET_ROOT) == errno.EINVAL
    assert errno_of(S.move_mount, mfd, "", cfd, "sub", SET_ROOT) == errno.EINVAL
    S.move_mount(mfd, "", cfd, "/", SET_ROOT)
    other = tmpfs()
    assert errno_of(S.move_mount, other, "", cfd, "/", SET_ROOT) == errno.EBUSY
    plain = S.container_create("p", 0)  # shares its creator's mount namespace
    assert errno_of(S.move_mount, other, "", plain, "/", SET_ROOT) == errno.EBUSY
    for fd in (cfd, mfd, other, plain):
        os.close(fd)


def test_fsconfig_set_container_errors(service: Any) -> None:
    cfd = S.container_create("f", CONTAINER_NEW_PID_NS)
    fs = S.fsopen("tmpfs", S.FSOPEN_CLOEXEC)
    assert errno_of(S.fsconfig, fs, FSCONFIG_SET_CONTAINER, "key", None, cfd) == errno.EINVAL
    S.fsconfig(fs, S.FSCONFIG_SET_STRING, "size", "1m")
    assert errno_of(S.fsconfig, fs, FSCONFIG_SET_CONTAINER, None, None, cfd) == errno.EBUSY
    fs2 = S.fsopen("tmpfs", S.FSOPEN_CLOEXEC)
    r, w = os.pipe()
    assert errno_of(S.fsconfig, fs2, FSCONFIG_SET_CONTAINER, None, None, r) == errno.EINVAL
    for fd in (cfd, fs, fs2, r, w):
        os.close(fd)


def test_non_handle_dirfds(service: Any, tmp_path: Any) -> None:
    f = os.open(tmp_path / "regular", os.O_CREAT | os.O_RDWR, 0o644)
    r, w = os.pipe()
    for fd in (f, r):
        assert errno_of(S.openat, fd, "x", os.O_RDONLY) == errno.ENOTDIR
        assert errno_of(S.mkdirat, fd, "x") == errno.ENOTDIR
    os.close(w)
    os.close(r)
    os.close(f)
    assert errno_of(S.openat, f, "x", os.O_RDONLY) == errno.EBADF
    d = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)  # ordinary fds are the kernel's own
    S.mkdirat(d, "sub")
    assert os.path.isdir(tmp_path / "sub")
    assert S.openat(d, "sub", os.O_RDONLY | os.O_DIRECTORY) >= 0
    os.close(d)


def test_at_calls_work_after_death(rooted: int) -> None:
    cfd = rooted
    S.mkdirat(cfd, "kept")
    pid = S.fork_into_container(cfd)
    if pid == 0:
        os._exit(0)
    assert child_result(pid) == 0
    S.container_wait(cfd)
    assert stat.S_ISDIR(S.fstatat(cfd, "kept").st_mode)
    S.mkdirat(cfd, "after")


# ---- credentials --------------------------------------------------------------------------

def test_unprivileged_holder_gets_only_its_own_rights(service: Any) -> None:
    cfd = S.container_create("host-root", 0)  # its root is the host's /
    got = run_as(OTHER_UID, OTHER_GID, f"""
        import syscalls as S
        out = {{}}
        for path in ("etc/shadow", "etc/passwd"):
            try:
                os.close(S.openat({cfd}, path, os.O_RDONLY))
                out[path] = 0
            except OSError as e:
                out[path] = e.errno
        mfd = None
        try:
            S.mkdirat({cfd}, "root/planted")
            out["mkdir"] = 0
        except OSError as e:
            out["mkdir"] = e.errno
        return out
    """, pass_fds=(cfd,))
    assert got == {"etc/shadow": errno.EACCES, "etc/passwd": 0, "mkdir": errno.EACCES}
    os.close(cfd)


def test_mount_calls_need_a_mounter(rooted: int) -> None:
    cfd = rooted
    got = run_as(OTHER_UID, OTHER_GID, f"""
        import syscalls as S
        tree = S.open_tree(S.AT_FDCWD, "/tmp", S.OPEN_TREE_CLOEXEC)
        try:
            S.move_mount(tree, "", {cfd}, "x", S.MOVE_MOUNT_F_EMPTY_PATH)
            return 0
        except OSError as e:
            return e.errno
    """, pass_fds=(cfd,))
    assert got == errno.EPERM


def test_unprivileged_owner_builds_its_container(service: Any) -> None:
    got = run_as(OTHER_UID, OTHER_GID, """
        import syscalls as S
        from syscalls import (CONTAINER_NEW_USER_NS, CONTAINER_NEW_EMPTY_FS_NS,
                              CONTAINER_NEW_PID_NS, FSCONFIG_SET_CONTAINER,
                              MOVE_MOUNT_T_CONTAINER_ROOT)
        cfd = S.container_create("mine", CONTAINER_NEW_USER_NS | CONTAINER_NEW_EMPTY_FS_NS
                                 | CONTAINER_NEW_PID_NS)
        plain_fs = S.fsopen("tmpfs")  # refused by the kernel: the EPERM comes at first use
        try:
            S.fsconfig(plain_fs, S.FSCONFIG_CMD_CREATE)
            plain = 0
        except OSError as e:
            plain = e.errno
        fs = S.fsopen("tmpfs", S.FSOPEN_CLOEXEC)
        S.fsconfig(fs, FSCONFIG_SET_CONTAINER, None, None, cfd)
        S.fsconfig(fs, S.FSCONFIG_CMD_CREATE)
        mfd = S.fsmount(fs, S.FSMOUNT_CLOEXEC)
        S.move_mount(mfd, "", cfd, "/", S.MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_CONTAINER_ROOT)
        S.mkdirat(cfd, "made-outside")
        r, w = os.pipe()
        pid = S.fork_into_container(cfd)
        if pid == 0:
            os.write(w, json.dumps([os.getuid(), os.getpid(), os.listdir("/")]).encode())
            os._exit(0)
        os.close(w)
        inside = json.loads(os.read(r, 4096))
        os.waitpid(pid, 0)
        return {"plain": plain, "inside": inside}
    """)
    assert got["plain"] == errno.EPERM
    assert got["inside"] == [0, 1, ["made-outside"]]
