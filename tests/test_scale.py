"""At scale (issue 18): containers' namespaces are held without an fd each (nsfs binds in the
service's own holder mount namespace, containerfs/nsstore.py). Closed containers give every
fd back, in service, keeper and caller; namespaces held that way still work after a kill -9
of the service; and the binds go when their containers go, never showing in the host's mounts.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import syscalls as S
from syscalls import (
    CONTAINER_KILL_ON_CLOSE, CONTAINER_NEW_EMPTY_FS_NS, CONTAINER_NEW_FS_NS, CONTAINER_NEW_IPC_NS,
    CONTAINER_NEW_NET_NS, CONTAINER_NEW_PID_NS, CONTAINER_NEW_UTS_NS, MOVE_MOUNT_T_CONTAINER_ROOT,
    at, linux, nsexec,
)

from containerfs import nsholder

from .conftest import OTHER_GID, OTHER_UID, child_result, hung_up, run_as, start_service, tmpfs
from .test_restart import restart

IDLE = CONTAINER_NEW_FS_NS | CONTAINER_NEW_PID_NS | CONTAINER_NEW_UTS_NS | CONTAINER_NEW_IPC_NS
SET_ROOT = S.MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_CONTAINER_ROOT
SIOCGSKNS = 0x894C  # the network namespace of a socket, as an fd


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def keeper_pid(service: Any) -> int:
    with open(os.path.join(service.runtime_dir, "keeper.pid")) as f:
        return int(f.read())


def settled(pid: int, bound: int, timeout: float = 15) -> int:
    """The fd count of `pid` once at or under `bound` (deaths are dealt with in the
    background), or as it is after `timeout` s."""
    deadline = time.monotonic() + timeout
    while (n := fds(pid)) > bound and time.monotonic() < deadline:
        time.sleep(0.1)
    return n


def in_holder(service: Any, act: Callable[[list[str]], Any]) -> Any:
    """`act(mountinfo lines)` run by this thread standing for a moment in the namespace
    holder (reached through the keeper's fd of it), at the root of its tmpfs."""
    kp = keeper_pid(service)
    proc = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in os.listdir(f"/proc/{kp}/fd"):
            try:
                if not os.readlink(f"/proc/{kp}/fd/{name}").startswith("mnt:["):
                    continue
                ns = os.open(f"/proc/{kp}/fd/{name}", os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                with nsexec.elsewhere(["mnt"]):
                    linux.setns(ns, linux.CLONE_NEWNS)
                    info = os.open("thread-self/mountinfo", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
                    with open(info) as f:
                        lines = f.read().splitlines()
                    if any(line.split()[4] == "/" and " - tmpfs containerfs-ns " in line
                           for line in lines):
                        return act(lines)
            finally:
                os.close(ns)
    finally:
        os.close(proc)
    raise AssertionError("no namespace holder among the keeper's fds")


def holder(service: Any) -> tuple[list[str], int]:
    """What the namespace holder holds: its tmpfs's entries and how many mounts it has."""
    return in_holder(service, lambda lines: (sorted(os.listdir("/")), len(lines)))


def own_namespaces(init: int, netns: int) -> None:
    """Init's UTS, IPC, mount and network namespaces are not ours; the network one `netns`."""
    for t in ("uts", "ipc", "mnt", "net"):
        assert os.stat(f"/proc/{init}/ns/{t}").st_ino != os.stat(f"/proc/self/ns/{t}").st_ino
    assert os.stat(f"/proc/{init}/ns/net").st_ino == netns


def member_after_crash(service: Any, cfd: int, hostname: str) -> None:
    """After a kill -9 of the service, a member forked into `cfd` joins init's namespaces
    (its UTS namespace named `hostname`, its PID namespace: pid 2)."""
    restart(service, hard=True)
    pid = S.fork_into_container(cfd)
    if pid == 0:
        os._exit(0 if socket.gethostname() == hostname and os.getpid() == 2 else 1)
    assert child_result(pid) == 0


def host_mounts() -> list[str]:
    """The host's mounts a namespace holder could leak: nsfs binds and its tmpfs (others
    come and go with what else runs on the machine)."""
    with open("/proc/self/mountinfo") as f:
        return sorted(line for line in f if " - nsfs " in line or " containerfs-ns " in line)


def test_closed_containers_leave_no_fds(service: Any) -> None:
    """300 containers made, used (a fork, a root fetched for *at() calls) and closed: the
    service, its keeper and this process end with the fds they started with, give or take
    a few (idle connections, the last create's fork plan, a handful of cached roots)."""
    svc, kp, me = service.proc.pid, keeper_pid(service), os.getpid()
    warm = S.container_create("warm", IDLE | CONTAINER_KILL_ON_CLOSE)  # pool, holder, caches
    os.close(warm)
    time.sleep(0.3)
    start = fds(svc), fds(kp), fds(me)
    for i in range(300):
        cfd = S.container_create("c", IDLE | CONTAINER_KILL_ON_CLOSE)
        assert at.container_root(cfd) is not None  # the caller's root cache
        if i % 10 == 0:
            pid = S.fork_into_container(cfd)
            if pid == 0:
                os._exit(0)
            assert child_result(pid) == 0
        os.close(cfd)
    left = settled(svc, start[0] + 16) - start[0], settled(kp, start[1] + 2) - start[1]
    assert left[0] <= 16, f"the service kept {left[0]} fds of 300 closed containers"
    assert left[1] <= 2, f"the keeper kept {left[1]} fds of 300 closed containers"
    assert fds(me) - start[2] <= 24, f"this process kept {fds(me) - start[2]} fds"


def test_a_container_s_namespaces_work_after_kill_9(service: Any) -> None:
    """Held by binds across a crash of the service: the namespaces and root of an idle
    container serve *at() calls, mounts, sockets and forks from the restarted service, and
    are the same namespaces as before."""
    cfd = S.container_create("held", CONTAINER_NEW_EMPTY_FS_NS | CONTAINER_NEW_PID_NS
                             | CONTAINER_NEW_UTS_NS | CONTAINER_NEW_IPC_NS | CONTAINER_NEW_NET_NS)
    r = w = -1
    try:
        mfd = tmpfs()
        S.move_mount(mfd, "", cfd, "/", SET_ROOT)
        os.close(mfd)
        S.mkdirat(cfd, "sub", 0o755)
        with socket.socket(fileno=S.container_socket(cfd, socket.AF_INET, socket.SOCK_STREAM, 0)) as s:
            netns = os.fstat(fcntl.ioctl(s, SIOCGSKNS)).st_ino
        restart(service, hard=True)
        assert not hung_up(cfd, 0.2)
        # *at() calls through the handle (the root, re-derived from the mount namespace).
        f = S.openat(cfd, "sub/file", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644)
        os.write(f, b"made after the restart")
        os.close(f)
        # A mount from outside, into the held mount namespace.
        S.mkdirat(cfd, "mnt", 0o755)
        mfd = tmpfs()
        S.move_mount(mfd, "", cfd, "mnt", S.MOVE_MOUNT_F_EMPTY_PATH)
        os.close(mfd)
        # A socket in the held network namespace: the same one as before the crash.
        with socket.socket(fileno=S.container_socket(cfd, socket.AF_INET, socket.SOCK_STREAM, 0)) as s:
            sock_netns = fcntl.ioctl(s, SIOCGSKNS)
            assert os.fstat(sock_netns).st_ino == netns
            os.close(sock_netns)
        # Init sees both, in namespaces of its own, and stays while we look at them.
        r, w = os.pipe()
        done_r, done_w = os.pipe()
        init = S.fork_into_container(cfd)
        if init == 0:
            try:
                os.close(r)
                os.close(done_w)
                socket.sethostname("held")
                with open("/sub/file") as fh:
                    text = fh.read()
                os.write(w, json.dumps({"pid": os.getpid(), "file": text,
                                        "mnt": os.path.ismount("/mnt")}).encode())
                os.close(w)
                os.read(done_r, 1)
            finally:
                os._exit(0)
        os.close(w)
        os.close(done_r)
        got = json.loads(os.read(r, 4096))
        assert got == {"pid": 1, "file": "made after the restart", "mnt": True}
        own_namespaces(init, netns)
        # Once more after another crash: a member joins init's namespaces (its PID
        # namespace, bound when init was born, included).
        member_after_crash(service, cfd, "held")
        os.close(done_w)
        assert child_result(init) == 0
        assert hung_up(cfd, 5)
    finally:
        for fd in (r,):
            if fd >= 0:
                os.close(fd)
        os.close(cfd)


def test_binds_go_with_their_containers(service: Any) -> None:
    """The holder gains a bind per namespace while containers live and is empty once they
    are gone; none of it ever shows among the host's mounts; once service and keeper stop,
    nothing holds the holder any more."""
    before = host_mounts()
    handles = [S.container_create("b", IDLE | CONTAINER_KILL_ON_CLOSE) for _ in range(20)]
    inits: list[int] = []
    try:
        for cfd in handles[:5]:  # running ones: their PID namespaces are held too
            pid = S.fork_into_container(cfd)
            if pid == 0:
                for h in handles:  # (a handle left open here would keep them all alive)
                    os.close(h)
                signal.pause()
                os._exit(0)
            inits.append(pid)
        # Bound once they have lived nsstore.BIND_DELAY (fresh, held by fd, until then).
        deadline = time.monotonic() + 5
        while (mounts := holder(service)[1]) < 1 + 20 * 3 + 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        entries, mounts = holder(service)
        ids = {f"c{S.container_status(cfd)['id']}" for cfd in handles}
        assert ids <= set(entries)
        assert mounts >= 1 + 20 * 3 + 5, f"{mounts} mounts in the holder"
        assert host_mounts() == before
    finally:
        for cfd in handles:
            os.close(cfd)
        for pid in inits:  # killed with their containers (never left behind if not)
            deadline = time.monotonic() + 10
            while os.waitpid(pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    raise AssertionError(f"init {pid} outlived its container's last close")
                time.sleep(0.02)
    deadline = time.monotonic() + 15
    while holder(service) != ([], 1) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert holder(service) == ([], 1), "binds were left in the holder"
    assert host_mounts() == before
    # A container left running across the stop keeps the holder alive in the keeper...
    keep = S.container_create("kept", IDLE)
    holder_link = ""
    kp = keeper_pid(service)
    for name in os.listdir(f"/proc/{kp}/fd"):
        link = os.readlink(f"/proc/{kp}/fd/{name}")
        if link.startswith("mnt:["):
            holder_link = link
    service.stop()
    assert holder(service)[0] != []
    os.close(keep)
    # ...until the keeper goes too: then no process holds it (nothing to unmount by hand).
    service.stop_keeper()
    time.sleep(0.2)
    holders = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            holders += [p for n in os.listdir(f"/proc/{p}/fd")
                        if os.readlink(f"/proc/{p}/fd/{n}") == holder_link]
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    assert not holders, f"processes {holders} still hold the namespace holder"
    assert host_mounts() == before
    again = start_service(Path(service.socket).parent, os.path.basename(service.cgroups.base))
    service.proc, service.log = again.proc, again.log  # (the fixture stops what runs)


def test_an_owner_s_user_namespace_container_after_kill_9(service: Any) -> None:
    """An unprivileged owner's container (its user namespace owns the rest) forks from the
    namespaces the restarted service re-opens from the holder."""
    cid = run_as(OTHER_UID, OTHER_GID, """
        import syscalls
        cfd = syscalls.container_create("u", syscalls.CONTAINER_NEW_USER_NS
                                        | syscalls.CONTAINER_NEW_PID_NS
                                        | syscalls.CONTAINER_NEW_FS_NS
                                        | syscalls.CONTAINER_NEW_UTS_NS)
        return syscalls.container_status(cfd)["id"]
    """)
    restart(service, hard=True)
    got = run_as(OTHER_UID, OTHER_GID, f"""
        import os, syscalls
        from syscalls import client, protocol
        _reply, fds = client.call(protocol.Open(id={cid}))
        pid = syscalls.fork_into_container(fds[0])
        if pid == 0:
            os._exit(0 if os.getpid() == 1 and os.getuid() == 0 else 3)
        _, status = os.waitpid(pid, 0)
        syscalls.container_kill(fds[0])
        return os.waitstatus_to_exitcode(status)
    """)
    assert got == 0


def test_a_root_set_while_the_container_dies_leaves_no_bind(service: Any) -> None:
    """MOVE_MOUNT_T_CONTAINER_ROOT works in a thread; a container killed meanwhile has
    released its namespaces already: the new mount namespace must not be held for it
    (a bind and fds nobody would ever let go)."""
    import threading
    from syscalls import CONTAINER_NEW_EMPTY_FS_NS, MOVE_MOUNT_F_EMPTY_PATH, \
        MOVE_MOUNT_T_CONTAINER_ROOT
    for i in range(40):
        cfd = S.container_create("r", CONTAINER_NEW_EMPTY_FS_NS | CONTAINER_KILL_ON_CLOSE)
        mfd = tmpfs()

        def set_root(cfd: int = cfd, mfd: int = mfd) -> None:
            try:
                S.move_mount(mfd, "", cfd, "/",
                             MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_CONTAINER_ROOT)
            except OSError:
                pass  # (dead first)
        t = threading.Thread(target=set_root)
        t.start()
        time.sleep(0.0002 * (i % 10))
        S.container_kill(cfd)
        t.join()
        os.close(mfd)
        os.close(cfd)
    deadline = time.monotonic() + 15
    while holder(service) != ([], 1) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert holder(service) == ([], 1), "binds were left in the holder"


def test_fresh_namespaces_survive_kill_9(service: Any, monkeypatch: Any) -> None:
    """A namespace not bound yet (fresh: nsstore.BIND_DELAY, made long here) lives on the
    keeper's copy across a crash: the restarted service finds the same namespaces, for
    init and then for a member (init's PID namespace, fresh too)."""
    monkeypatch.setenv("CONTAINERFS_BIND_DELAY", "60")
    restart(service, hard=False)
    cfd = S.container_create("fresh", IDLE | CONTAINER_NEW_NET_NS)
    done_r = done_w = -1
    try:
        with socket.socket(fileno=S.container_socket(cfd, socket.AF_INET, socket.SOCK_STREAM, 0)) as s:
            sock_netns = fcntl.ioctl(s, SIOCGSKNS)
            netns = os.fstat(sock_netns).st_ino
            os.close(sock_netns)
        assert holder(service) == ([f"c{S.container_status(cfd)['id']}"], 1), "bound already"
        restart(service, hard=True)
        done_r, done_w = os.pipe()
        init = S.fork_into_container(cfd)
        if init == 0:
            os.close(done_w)
            socket.sethostname("fresh")
            os.read(done_r, 1)
            os._exit(0)
        os.close(done_r)
        done_r = -1
        own_namespaces(init, netns)
        assert holder(service)[1] == 1, "bound before BIND_DELAY"
        member_after_crash(service, cfd, "fresh")
        os.close(done_w)
        done_w = -1
        assert child_result(init) == 0
        assert hung_up(cfd, 5)
    finally:
        for fd in (done_r, done_w):
            if fd >= 0:
                os.close(fd)
        os.close(cfd)


def socket_netns(cfd: int) -> int:
    """The inode of the network namespace a container's sockets are made in."""
    with socket.socket(fileno=S.container_socket(cfd, socket.AF_INET, socket.SOCK_STREAM, 0)) as s:
        ns = fcntl.ioctl(s, SIOCGSKNS)
        try:
            return os.fstat(ns).st_ino
        finally:
            os.close(ns)


def test_a_bind_cut_short_by_kill_9_loses_no_namespace(service: Any, monkeypatch: Any) -> None:
    """A bind is made as an empty file first, then mounted on (nsholder._bind_one): a kill -9
    between the two leaves the file at the name c<id>'s link gives. The restarted service
    must hold the namespace by the keeper's copy, not take that file for its bind, and bind
    it there later."""
    monkeypatch.setenv("CONTAINERFS_BIND_DELAY", "60")
    restart(service, hard=False)
    cfd = S.container_create("cut", IDLE | CONTAINER_NEW_NET_NS)
    try:
        netns = socket_netns(cfd)
        cid = S.container_status(cfd)["id"]
        assert holder(service)[1] == 1, "bound already"
        service.proc.send_signal(signal.SIGKILL)
        service.proc.wait()

        def cut_short(_lines: list[str]) -> None:
            name = os.readlink(f"c{cid}/net").removeprefix("../")
            os.close(os.open(name, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        in_holder(service, cut_short)
        monkeypatch.setenv("CONTAINERFS_BIND_DELAY", "0.1")
        restart(service, hard=True)  # (dead already: started again)
        assert socket_netns(cfd) == netns
        deadline = time.monotonic() + 5  # mount, UTS, IPC and network namespaces bound
        while holder(service)[1] < 1 + 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert holder(service)[1] == 1 + 4
        restart(service, hard=True)  # from the binds now
        assert socket_netns(cfd) == netns
    finally:
        os.close(cfd)


def test_a_namespace_stays_fresh_for_bind_delay(service: Any, monkeypatch: Any) -> None:
    """A namespace is bound once it has lived nsstore.BIND_DELAY (2 s here), not when the
    oldest fresh one has: a container made 1.2 s after another is not bound with it."""
    monkeypatch.setenv("CONTAINERFS_BIND_DELAY", "2")
    restart(service, hard=False)
    first = S.container_create("first", IDLE | CONTAINER_NEW_NET_NS)
    second = -1
    try:
        made = time.monotonic()
        time.sleep(1.2)
        second_made = time.monotonic()
        second = S.container_create("second", IDLE | CONTAINER_NEW_NET_NS)
        while holder(service)[1] < 1 + 4 and time.monotonic() < made + 4:
            time.sleep(0.02)
        mounts = holder(service)[1]
        if time.monotonic() < second_made + 1.9:  # (a slow machine: nothing to tell)
            assert mounts == 1 + 4, "the second container's namespaces were bound young"
        while holder(service)[1] < 1 + 8 and time.monotonic() < second_made + 6:
            time.sleep(0.02)
        assert holder(service)[1] == 1 + 8
        assert time.monotonic() >= second_made + 2
    finally:
        os.close(first)
        if second >= 0:
            os.close(second)


MS_BIND = 0x1000


def fill_holder(_lines: list[str]) -> int:
    """Mount copies of a tmpfs in the holder (standing in it) until the kernel refuses one
    more (fs.mount-max); how many were added."""
    os.mkdir("fill")
    linux.mount("none", "fill", "tmpfs")
    linux.mount(None, "fill", None, linux.MS_PRIVATE)
    added, k = 1, 0
    while True:  # doubling: fill/d<k> holds 2**k mounts
        os.mkdir(f"fill/d{k}")
        try:
            linux.mount("fill", f"fill/d{k}", None, MS_BIND | linux.MS_REC)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
            break
        added, k = added + 2 ** k, k + 1
    n = 0
    for j in reversed(range(k)):  # then what still fits, largest first
        while True:
            os.mkdir(f"fill/e{n}")
            n += 1
            try:
                linux.mount(f"fill/d{j}", f"fill/e{n - 1}", None, MS_BIND | linux.MS_REC)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                break
            added += 2 ** j
    return added


def empty_holder(_lines: list[str]) -> None:
    linux.umount2("fill", linux.MNT_DETACH)
    os.rmdir("fill")


def test_past_fs_mount_max_create_gets_eagain(service: Any) -> None:
    """Past fs.mount-max (the holder filled here with other mounts) a namespace cannot be
    bound: the one made first stays fresh, held by fd, and creates that need new
    namespaces get EAGAIN naming the sysctl (docs/limits.md) instead of piling up fds
    nobody can bind. Once there is room again, it is bound and creates work."""
    handles: list[int] = []
    filled = False
    try:
        in_holder(service, fill_holder)
        filled = True
        handles.append(S.container_create("first", IDLE | CONTAINER_NEW_NET_NS))
        time.sleep(0.5)  # nsstore.BIND_DELAY, and its bind tried
        with pytest.raises(OSError) as err:
            handles.append(S.container_create("more", IDLE | CONTAINER_NEW_NET_NS))
        assert err.value.errno == errno.EAGAIN
        assert "fs.mount-max" in str(err.value)
        handles.append(S.container_create("shares", 0))  # no namespace of its own: made
        in_holder(service, empty_holder)
        filled = False
        deadline = time.monotonic() + 5  # tried again each second: bound now
        while holder(service)[1] < 1 + 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert holder(service)[1] == 1 + 4
        while True:  # (the binds show before the service has seen its batch through)
            try:
                handles.append(S.container_create("more", IDLE | CONTAINER_NEW_NET_NS))
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        if filled:
            in_holder(service, empty_holder)
        for fd in handles:
            os.close(fd)


def test_an_older_service_s_binds_of_the_host_namespaces_are_swept(service: Any) -> None:
    """The service holds its own namespaces (the host's) by fd for its life; a service of
    an earlier version bound them in the holder like any other. After a restart such a bind
    is unmounted (no leak), and the container that shares them keeps them."""
    cfd = S.container_create("host", 0)
    try:
        cid = S.container_status(cfd)["id"]
        netns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        ino = os.fstat(netns).st_ino
        service.proc.send_signal(signal.SIGKILL)
        service.proc.wait()

        def as_an_older_service_left_it(_lines: list[str]) -> None:
            nsholder._bind_one(netns, f"net.{ino}.old0")
            os.unlink(f"c{cid}/net")
            os.symlink(f"../net.{ino}.old0", f"c{cid}/net")
        try:
            in_holder(service, as_an_older_service_left_it)
        finally:
            os.close(netns)
        assert holder(service)[1] == 2
        restart(service, hard=True)  # (dead already: started again)
        deadline = time.monotonic() + 5
        while holder(service)[1] > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert holder(service) == ([f"c{cid}"], 1)
        assert socket_netns(cfd) == ino
        restart(service, hard=True)
        assert socket_netns(cfd) == ino
    finally:
        os.close(cfd)



def test_fresh_namespaces_of_a_root_set_later_and_of_a_nested_container_after_kill_9(
        service: Any, monkeypatch: Any) -> None:
    """Fresh namespaces (nsstore.BIND_DELAY made long) across two crashes: the mount
    namespace MOVE_MOUNT_T_CONTAINER_ROOT puts in place of an empty-fs container's, and
    those a nested container shares with its parent (made by the parent's init, it has no
    namespace of its own: its keeper entry has copies of its own)."""
    from syscalls import client, protocol
    monkeypatch.setenv("CONTAINERFS_BIND_DELAY", "60")
    restart(service, hard=False)
    empty = S.container_create("e", CONTAINER_NEW_EMPTY_FS_NS | CONTAINER_NEW_UTS_NS)
    parent = S.container_create("p", IDLE | CONTAINER_NEW_NET_NS)
    done_r, done_w = os.pipe()
    id_r, id_w = os.pipe()
    inits: list[int] = []
    nested = -1
    try:
        mfd = tmpfs()
        S.move_mount(mfd, "", empty, "/", SET_ROOT)
        os.close(mfd)
        S.mkdirat(empty, "sub", 0o755)
        netns = socket_netns(parent)
        for cfd in (empty, parent):
            pid = S.fork_into_container(cfd)
            if pid == 0:
                try:
                    os.close(done_w)
                    if cfd == parent:
                        made = S.container_create("nested", 0)
                        os.write(id_w, str(S.container_status(made)["id"]).encode())
                    os.read(done_r, 1)
                finally:
                    os._exit(0)
            inits.append(pid)
        os.close(id_w)
        id_w = -1
        _reply, fds = client.call(protocol.Open(id=int(os.read(id_r, 32))))
        nested = fds[0]
        assert S.container_status(nested)["parent"] == S.container_status(parent)["id"]
        assert holder(service)[1] == 1, "bound already"
        for _ in range(2):
            restart(service, hard=True)
            f = S.openat(empty, "sub/file", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644)
            os.close(f)
            pid = S.fork_into_container(empty)
            if pid == 0:
                os._exit(0 if os.path.exists("/sub/file") else 1)
            assert child_result(pid) == 0
            assert socket_netns(nested) == netns
            assert socket_netns(parent) == netns
    finally:
        for fd in (done_r, done_w, id_r, id_w, nested, empty, parent):
            if fd >= 0:
                os.close(fd)
        for pid in inits:
            child_result(pid)
