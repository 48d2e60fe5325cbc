"""The container object on the real kernel: create, fork_into_container, death, handles."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import threading
import time
from typing import Any

import pytest
from pathlib import Path

import syscalls
from syscalls import (
    CONTAINER_FD_CLOEXEC,
    CONTAINER_KILL_ON_CLOSE,
    CONTAINER_NEW_CGROUP_NS,
    CONTAINER_NEW_EMPTY_FS_NS,
    CONTAINER_NEW_FS_NS,
    CONTAINER_NEW_IPC_NS,
    CONTAINER_NEW_NET_NS,
    CONTAINER_NEW_PID_NS,
    CONTAINER_NEW_UTS_NS,
)

from .conftest import (
    OTHER_GID,
    OTHER_UID,
    THIRD_UID,
    child_result,
    hung_up,
    in_container,
    pid_alive,
    run_as,
    users_handle,
)

ALL_NS = (CONTAINER_NEW_FS_NS | CONTAINER_NEW_CGROUP_NS | CONTAINER_NEW_UTS_NS
          | CONTAINER_NEW_IPC_NS | CONTAINER_NEW_NET_NS | CONTAINER_NEW_PID_NS)


def ns_ids() -> dict[str, int]:
    return {t: os.stat(f"/proc/self/ns/{t}").st_ino
            for t in ("mnt", "uts", "ipc", "net", "cgroup", "pid", "user")}


def _links() -> list[str]:
    """Network interfaces of the calling process's network namespace (not sysfs's)."""
    with open("/proc/self/net/dev") as f:
        return sorted(line.split(":")[0].strip() for line in f.readlines()[2:])


# ---- container_create: arguments and errors -------------------------------------------------

@pytest.mark.parametrize("name, flags, err", [
    ("x", 0x400, errno.EINVAL),                                           # unknown flag bit
    ("x", 1 << 40, errno.EINVAL),
    ("x", CONTAINER_NEW_FS_NS | CONTAINER_NEW_EMPTY_FS_NS, errno.EINVAL),
    ("a/b", 0, errno.EINVAL),
    (None, 0, errno.EINVAL),
    ("x" * 24, 0, errno.ENAMETOOLONG),
    ("é" * 12, 0, errno.ENAMETOOLONG),                                    # 24 bytes of UTF-8
    (b"x" * 30, 0, errno.ENAMETOOLONG),
])
def test_create_errors(service: Any, name: Any, flags: int, err: int) -> None:
    with pytest.raises(OSError) as info:
        syscalls.container_create(name, flags)
    assert info.value.errno == err
    assert service.cgroups.procs(2) == [] and not os.path.exists(service.cgroups.path(2))


def test_create_errors_have_no_side_effects(service: Any) -> None:
    with pytest.raises(OSError):
        syscalls.container_create("a/b", CONTAINER_NEW_NET_NS)
    fd = syscalls.container_create("ok", 0)
    assert syscalls.container_status(fd)["id"] == 2  # the failure used up no id
    os.close(fd)


def test_longest_name_and_ids(service: Any) -> None:
    a = syscalls.container_create("x" * 23, 0)
    b = syscalls.container_create(b"bytes-name", 0)
    sa, sb = syscalls.container_status(a), syscalls.container_status(b)
    assert (sa["id"], sb["id"]) == (2, 3)
    assert sa["name"] == "x" * 23 and sb["name"] == "bytes-name"
    assert sa["owner"] == 0 and sa["state"] == "created"
    os.close(a)
    os.close(b)


def test_no_service_is_enosys(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("CONTAINERFS_SOCKET", str(tmp_path / "nothing.sock"))
    with pytest.raises(OSError) as info:
        syscalls.container_create("x", 0)
    assert info.value.errno == errno.ENOSYS
    assert "containerfs serve" in str(info.value)


def test_ids_persist_across_restart(service: Any) -> None:
    fd = syscalls.container_create("one", 0)
    os.close(fd)
    service.stop()
    from .conftest import start_service
    again = start_service(Path(service.socket).parent, os.path.basename(service.cgroups.base))
    service.proc = again.proc
    fd = syscalls.container_create("two", 0)
    assert syscalls.container_status(fd)["id"] == 3
    os.close(fd)


# ---- the handle ---------------------------------------------------------------------------

def test_handle_cloexec_flag(service: Any) -> None:
    a = syscalls.container_create("a", CONTAINER_FD_CLOEXEC)
    b = syscalls.container_create("b", 0)
    assert not os.get_inheritable(a)
    assert os.get_inheritable(b)
    assert not hung_up(a) and not hung_up(b)
    os.close(a)
    os.close(b)


def test_bad_handles(service: Any, tmp_path: Any) -> None:
    fd = syscalls.container_create("x", 0)
    os.close(fd)
    with pytest.raises(OSError) as info:
        syscalls.fork_into_container(fd)
    assert info.value.errno == errno.EBADF
    with open(tmp_path / "file", "w") as f:
        with pytest.raises(OSError) as info:
            syscalls.fork_into_container(f.fileno())
        assert info.value.errno == errno.EINVAL
    r, w = os.pipe()  # a pipe, but not one of the service's
    for call in (syscalls.fork_into_container, syscalls.container_status, syscalls.container_kill):
        with pytest.raises(OSError) as info:
            call(r)
        assert info.value.errno == errno.EINVAL
    os.close(r)
    os.close(w)


# ---- fork_into_container ------------------------------------------------------------------

def test_fork_enters_everything(service: Any) -> None:
    cfd = syscalls.container_create("all", ALL_NS | CONTAINER_FD_CLOEXEC)
    before = ns_ids()

    def inside() -> dict[str, Any]:
        with open("/proc/self/cgroup") as f:
            cg = [line for line in f if line.startswith("0::")][0].strip()
        return {"ns": ns_ids(), "pid": os.getpid(), "cwd": os.getcwd(), "umask": os.umask(0),
                "cgroup": cg, "links": _links()}

    pid, got = in_container(cfd, inside)
    assert child_result(pid) == 0
    assert ns_ids() == before, "the caller's own namespaces changed"
    for t in ("mnt", "uts", "ipc", "net", "cgroup", "pid"):
        assert got["ns"][t] != before[t], f"child shares the caller's {t} namespace"
    assert got["ns"]["user"] == before["user"]
    assert got["pid"] == 1
    assert got["cwd"] == "/"
    assert got["umask"] == 0o022
    assert got["cgroup"] == "0::/"  # its own cgroup namespace, rooted at its group
    assert got["links"] == ["lo"]
    assert len(_links()) >= 1
    os.close(cfd)


def test_first_is_init_then_members(service: Any) -> None:
    cfd = syscalls.container_create("m", CONTAINER_NEW_PID_NS | CONTAINER_NEW_UTS_NS)
    r, w = os.pipe()
    init = syscalls.fork_into_container(cfd)
    if init == 0:
        os.close(w)
        os.read(r, 1)  # live until told
        os._exit(3)
    os.close(r)
    member, got = in_container(cfd, lambda: {"pid": os.getpid(), "uts": ns_ids()["uts"]})
    assert child_result(member) == 0
    assert got["pid"] not in (0, 1), "a later process must not be PID 1"
    status = syscalls.container_status(cfd)
    assert status["init_pid"] == init and status["state"] == "running"
    assert init in status["members"]
    assert service.cgroups.contains(status["id"], init)
    os.close(w)
    assert child_result(init) == 3
    assert syscalls.container_wait(cfd) == 3 << 8
    os.close(cfd)


def test_init_death_kills_members_and_hangs_up(service: Any) -> None:
    for flags in (CONTAINER_NEW_PID_NS, 0):  # with a PID namespace, and by the cgroup alone
        cfd = syscalls.container_create("d", flags)
        r, w = os.pipe()
        init = syscalls.fork_into_container(cfd)
        if init == 0:
            os.close(w)
            os.read(r, 1)
            os._exit(5)
        os.close(r)
        member = syscalls.fork_into_container(cfd)
        if member == 0:
            os.close(w)
            while True:
                time.sleep(1)
        assert not hung_up(cfd, 0.05)
        os.close(w)  # init exits
        # Reap the member first: a dying PID-namespace init waits, in the kernel, until
        # every other process of its namespace has been reaped by its parent (us).
        assert child_result(member) == -9, "the member was not killed with SIGKILL"
        assert hung_up(cfd, 5)
        assert child_result(init) == 5
        assert syscalls.container_wait(cfd) == 5 << 8
        with pytest.raises(OSError) as info:
            syscalls.fork_into_container(cfd)
        assert info.value.errno == errno.ECANCELED
        os.close(cfd)


def test_wait_before_and_after_reap(service: Any) -> None:
    cfd = syscalls.container_create("w", CONTAINER_NEW_PID_NS)
    pid = syscalls.fork_into_container(cfd)
    if pid == 0:
        os._exit(9)
    # Not reaped yet: the service reads the zombie's status.
    assert syscalls.container_wait(cfd) == 9 << 8
    assert child_result(pid) == 9
    assert syscalls.container_wait(cfd) == 9 << 8
    os.close(cfd)



def test_dead_at_once_after_init_is_reaped(service: Any) -> None:
    """Once waitpid() has returned init's status, no call may find the container alive, as
    no call of the kernel would: not even one made before the service's own watcher ran."""
    for flags in (CONTAINER_NEW_PID_NS, 0) * 5:
        cfd = syscalls.container_create("reaped", flags)
        pid = syscalls.fork_into_container(cfd)
        if pid == 0:
            os._exit(7)
        assert child_result(pid) == 7
        with pytest.raises(OSError) as info:
            syscalls.fork_into_container(cfd)
        assert info.value.errno == errno.ECANCELED
        status = syscalls.container_status(cfd)
        assert (status["state"], status["exit_status"]) == ("dead", 7 << 8)
        assert hung_up(cfd, 5)
        os.close(cfd)

def test_fork_from_threaded_caller(service: Any) -> None:
    cfd = syscalls.container_create("t", CONTAINER_NEW_PID_NS | CONTAINER_NEW_NET_NS)
    stop = threading.Event()
    seen: list[int] = []

    def spin() -> None:
        while not stop.is_set():
            seen.append(os.stat("/proc/thread-self/ns/net").st_ino)
            time.sleep(0.001)

    threads = [threading.Thread(target=spin) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        own_net = os.stat("/proc/self/ns/net").st_ino
        r, w = os.pipe()
        init = syscalls.fork_into_container(cfd)
        if init == 0:
            os.close(w)
            os._exit(0 if os.getpid() == 1 and not os.read(r, 1) else 1)
        os.close(r)
        pid, got = in_container(cfd, lambda: os.getpid())
        assert got not in (0, 1) and child_result(pid) == 0
        os.close(w)
        assert child_result(init) == 0
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert set(seen) == {own_net}
    os.close(cfd)


def test_empty_fs_container_has_no_root(service: Any) -> None:
    cfd = syscalls.container_create("e", CONTAINER_NEW_EMPTY_FS_NS)
    with pytest.raises(OSError) as info:
        syscalls.fork_into_container(cfd)
    assert info.value.errno == errno.ENOENT
    assert syscalls.container_status(cfd)["state"] == "created"
    os.close(cfd)


def test_uts_namespace_is_private(service: Any) -> None:
    cfd = syscalls.container_create("u", CONTAINER_NEW_UTS_NS)
    host = socket.gethostname()

    def inside() -> str:
        socket.sethostname("inside-container")
        return socket.gethostname()

    pid, got = in_container(cfd, inside)
    assert child_result(pid) == 0
    assert got == "inside-container" and socket.gethostname() == host
    os.close(cfd)


# ---- handles across processes, close and kill ------------------------------------------

def test_handle_over_scm_rights_then_fork(service: Any) -> None:
    cfd = syscalls.container_create("s", CONTAINER_NEW_PID_NS | CONTAINER_NEW_UTS_NS)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    helper = os.fork()
    if helper == 0:
        code = 1
        try:
            a.close()
            _, fds, _, _ = socket.recv_fds(b, 16, 1)
            r, w = os.pipe()
            pid = syscalls.fork_into_container(fds[0])
            if pid == 0:
                os.write(w, str(os.getpid()).encode())
                os._exit(0)
            os.close(w)
            inner = int(os.read(r, 16))
            code = 0 if inner == 1 and child_result(pid) == 0 else 2
        finally:
            os._exit(code)
    b.close()
    socket.send_fds(a, [b"h"], [cfd])
    os.close(cfd)
    assert child_result(helper) == 0
    a.close()


def test_kill_on_close_by_last_close_in_other_process(service: Any) -> None:
    cfd = syscalls.container_create("k", CONTAINER_KILL_ON_CLOSE | CONTAINER_NEW_PID_NS)
    init = syscalls.fork_into_container(cfd)
    if init == 0:
        os.close(cfd)
        while True:
            time.sleep(1)
    r, w = os.pipe()
    holder = os.fork()  # inherits the handle; closes it last
    if holder == 0:
        os.close(w)
        os.read(r, 1)
        os.close(cfd)
        os._exit(0)
    os.close(r)
    os.close(cfd)
    time.sleep(0.2)
    assert pid_alive(init), "killed while another process still held the handle"
    os.close(w)
    assert child_result(holder) == 0
    assert child_result(init) == -9


def test_without_kill_on_close_container_lives_on(service: Any) -> None:
    cfd = syscalls.container_create("live", CONTAINER_NEW_PID_NS)
    init = syscalls.fork_into_container(cfd)
    if init == 0:
        os.close(cfd)
        while True:
            time.sleep(1)
    cid = syscalls.container_status(cfd)["id"]
    os.close(cfd)
    time.sleep(0.2)
    assert pid_alive(init)
    from syscalls import client, protocol
    rows = syscalls.container.container_list()
    assert [r["state"] for r in rows if r["id"] == cid] == ["running"]
    client.call(protocol.Kill(id=cid))  # the owner can still kill it by id
    assert child_result(init) == -9


def test_no_holder_can_fake_death_or_last_close(service: Any) -> None:
    cfd = syscalls.container_create("f", CONTAINER_KILL_ON_CLOSE | CONTAINER_NEW_PID_NS)
    init = syscalls.fork_into_container(cfd)
    if init == 0:
        os.close(cfd)  # an inherited handle is a reference like any other
        while True:
            time.sleep(1)
    other = os.dup(cfd)
    with pytest.raises(OSError):
        os.write(other, b"x")
    fcntl.fcntl(other, fcntl.F_SETFL, os.O_NONBLOCK)
    with pytest.raises(BlockingIOError):
        os.read(other, 1)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.shutdown(other, socket.SHUT_RDWR) == -1
    assert ctypes.get_errno() == errno.ENOTSOCK
    reopened = os.open(f"/proc/self/fd/{other}", os.O_RDONLY | os.O_NONBLOCK)
    os.close(reopened)
    os.close(other)
    assert not hung_up(cfd, 0.1)
    assert pid_alive(init)
    assert syscalls.container_status(cfd)["state"] == "running"
    os.close(cfd)
    assert child_result(init) == -9


# ---- users and privilege ------------------------------------------------------------------

def test_unprivileged_user_namespace_container(service: Any) -> None:
    got = run_as(OTHER_UID, OTHER_GID, """
        import syscalls, errno
        try:
            syscalls.container_create("x", syscalls.CONTAINER_NEW_NET_NS)
            refused = None
        except OSError as e:
            refused = e.errno
        cfd = syscalls.container_create("mine", syscalls.CONTAINER_NEW_USER_NS
                                        | syscalls.CONTAINER_NEW_PID_NS
                                        | syscalls.CONTAINER_NEW_NET_NS
                                        | syscalls.CONTAINER_NEW_FS_NS)
        r, w = os.pipe()
        pid = syscalls.fork_into_container(cfd)
        if pid == 0:
            os.write(w, json.dumps([os.getuid(), os.getgid(), os.getpid()]).encode())
            os._exit(0)
        os.close(w)
        inside = json.loads(os.read(r, 100))
        _, status = os.waitpid(pid, 0)
        return {"refused": refused, "inside": inside, "status": status,
                "owner": syscalls.container_status(cfd)["owner"]}
    """)
    assert got["refused"] == errno.EPERM
    assert got["inside"] == [0, 0, 1]
    assert got["status"] == 0
    assert got["owner"] == OTHER_UID


def test_other_user_cannot_fork_into_passed_handle(service: Any) -> None:
    cfd = syscalls.container_create("root-owned", CONTAINER_NEW_PID_NS)
    got = run_as(OTHER_UID, OTHER_GID, f"""
        import syscalls
        try:
            syscalls.fork_into_container({cfd})
            return "forked"
        except OSError as e:
            return e.errno
    """, pass_fds=(cfd,))
    assert got == errno.EPERM
    user_fd = run_as(OTHER_UID, OTHER_GID, "return 0")  # sanity: the helper itself works
    assert user_fd == 0
    os.close(cfd)


def test_user_handle_refused_to_third_user(service: Any) -> None:
    # The owner makes a user-namespace container and sends its handle to us...
    cfd = users_handle(service, OTHER_UID, OTHER_GID)
    # ...and a third user who holds it still cannot enter.
    got = run_as(THIRD_UID, THIRD_UID, f"""
        import syscalls
        try:
            syscalls.fork_into_container({cfd})
            return "forked"
        except OSError as e:
            return e.errno
    """, pass_fds=(cfd,))
    assert got == errno.EPERM
    os.close(cfd)


def test_member_cannot_manage_its_container(service: Any) -> None:
    cfd = syscalls.container_create("self", CONTAINER_NEW_PID_NS)
    r, w = os.pipe()
    init = syscalls.fork_into_container(cfd)
    if init == 0:
        os.close(r)
        try:
            syscalls.container_kill(cfd)
            os.write(w, b"killed")
        except OSError as e:
            os.write(w, str(e.errno).encode())
        os._exit(0)
    os.close(w)
    assert os.read(r, 16) == str(errno.EPERM).encode()
    assert child_result(init) == 0
    os.close(cfd)


def test_unprivileged_inits_that_die_at_once(service: Any) -> None:
    # The intermediate stands in the container's cgroup while it works: a container whose
    # init dies at once must not take the intermediate with it (it once did, at random).
    got = run_as(OTHER_UID, OTHER_GID, """
        import syscalls
        codes = []
        for _ in range(30):
            cfd = syscalls.container_create("brief", syscalls.CONTAINER_NEW_USER_NS
                                            | syscalls.CONTAINER_NEW_PID_NS)
            pid = syscalls.fork_into_container(cfd)
            if pid == 0:
                os._exit(7)
            codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
            os.close(cfd)
        return codes
    """, timeout=60)
    assert got == [7] * 30


def test_many_running_containers_all_answer(service: Any) -> None:
    """Past 1024 fds in the service (write ends, init pidfds, cached namespace fds), every
    request still gets its answer: nothing in it may use select() on an fd."""
    r, w = os.pipe()
    held = []
    try:
        # Running containers cost the service about two fds each (namespaces are held by
        # binds): make them until it holds more than 1024.
        while len(os.listdir(f"/proc/{service.proc.pid}/fd")) <= 1100 and len(held) < 1000:
            cfd = syscalls.container_create("many", CONTAINER_NEW_PID_NS)
            pid = syscalls.fork_into_container(cfd)
            if pid == 0:
                os.close(w)
                os.read(r, 1)
                os._exit(0)
            held.append((cfd, pid))
        assert len(os.listdir(f"/proc/{service.proc.pid}/fd")) > 1024
        assert all(syscalls.container_status(cfd)["state"] == "running" for cfd, _ in held)
    finally:
        os.close(w)
        os.close(r)
        for cfd, pid in held:
            assert child_result(pid) == 0
            assert hung_up(cfd, 5)
            os.close(cfd)
