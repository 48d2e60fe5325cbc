"""Attacks on the root service by local users (issue 13): each is tried for real and must be
refused or harmless, with the service still serving everyone else."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import syscalls as S
from syscalls import CONTAINER_NEW_EMPTY_FS_NS, CONTAINER_NEW_PID_NS, fdpass, protocol

from containerfs.cgroups import process_cgroup

from .conftest import (
    OTHER_GID,
    OTHER_UID,
    ROOT,
    ServiceUnderTest,
    child_result,
    fresh_service,
    raw,
    run_as,
    service_holds,
    still_serves,
    tmpfs,
    users_handle,
)

SET_ROOT = S.MOVE_MOUNT_F_EMPTY_PATH | S.MOVE_MOUNT_T_CONTAINER_ROOT


def ask(sock: socket.socket, req: protocol.Request, fds: tuple[int, ...] | list[int] = ()) -> dict[str, Any]:
    """Send `req` with `fds` on a raw connection; its reply (fds that came with it closed)."""
    socket.send_fds(sock, [protocol.encode(req)], list(fds)) if fds else sock.send(protocol.encode(req))
    data, got, _ = fdpass.recv_fds(sock, 65536, protocol.MAX_FDS)
    for fd in got:
        os.close(fd)
    assert data, f"the service closed the connection instead of answering {req.op}"
    return protocol.decode_reply(data)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def keeper_pid(service: ServiceUnderTest) -> int:
    with open(os.path.join(service.runtime_dir, "keeper.pid")) as f:
        return int(f.read())


# ---- a recycled pid -----------------------------------------------------------------------

def connection_of_gone_process(path: str, uid: int, gid: int) -> tuple[socket.socket, int]:
    """A connection whose connecting process (of `uid`) has exited and been reaped: the socket
    (in our hands) and the pid that process had."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            s.connect(path)
        finally:
            os._exit(0)
    assert child_result(pid) == 0
    return s, pid


def root_process_with_pid(pid: int) -> subprocess.Popen[bytes]:
    """A root `sleep` given exactly `pid` (through ns_last_pid), as an attacker would wait for."""
    for _ in range(50):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        proc = subprocess.Popen(["sleep", "120"])
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    raise AssertionError(f"could not start a process with pid {pid}: the test proves nothing")


def test_recycled_pid_is_never_acted_on(service: ServiceUnderTest) -> None:
    cfd = users_handle(service, OTHER_UID, OTHER_GID)  # the attacker's own container
    s, old_pid = connection_of_gone_process(service.socket, OTHER_UID, OTHER_GID)
    victim = root_process_with_pid(old_pid)
    try:
        home = process_cgroup(victim.pid)
        reply = ask(s, protocol.Fork(), [cfd])
        assert reply.get("errno") == errno.ESRCH, reply  # it used to move the victim in
        assert process_cgroup(victim.pid) == home
        assert S.container_status(cfd)["state"] == "created"
        pidfd = os.pidfd_open(victim.pid)
        try:  # nor can the victim be reported as a process of the container
            reply = ask(s, protocol.Started(pid=victim.pid), [pidfd])
            assert reply.get("errno") == errno.EINVAL, reply
        finally:
            os.close(pidfd)
        S.container_kill(cfd)
        time.sleep(0.2)
        assert victim.poll() is None, "the root process was killed with the container"
        assert process_cgroup(victim.pid) == home
    finally:
        victim.kill()
        victim.wait()
        s.close()
        os.close(cfd)
    still_serves()


def test_member_check_needs_the_connecting_process(service: ServiceUnderTest) -> None:
    """A member that connected and exited cannot pass off its connection as an outsider's:
    manager requests on it are refused, not granted."""
    cfd = S.container_create("members", CONTAINER_NEW_PID_NS)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = S.fork_into_container(cfd)
    if pid == 0:
        try:
            s.connect(service.socket)
        finally:
            os._exit(0)
    assert child_result(pid) == 0  # init connected, then exited: the container is dead
    other = S.container_create("target", 0)
    try:
        reply = ask(s, protocol.Kill(), [other])
        assert reply.get("errno") == errno.ESRCH, reply
        assert S.container_status(other)["state"] == "created"
    finally:
        s.close()
        os.close(other)
        os.close(cfd)


# ---- the creator's mount namespace ----------------------------------------------------------

def test_creators_mounts_cannot_redirect_a_root_write(service: ServiceUnderTest) -> None:
    """A user binds its own tree over the service's cgroup directory in its mount namespace,
    with the next containers' cgroup.procs pointing at a root-owned file, and creates a
    container with a cgroup namespace: the root-owned file must stay as it was."""
    probe = S.container_create("probe", 0)
    next_id = S.container_status(probe)["id"] + 1
    os.close(probe)
    where = Path(tempfile.mkdtemp(prefix="cfs-redirect-"))
    try:
        where.chmod(0o755)
        target = where / "root-owned"
        target.write_text("ORIGINAL\n")
        target.chmod(0o644)
        fake = where / "fake"
        fake.mkdir()
        os.chown(fake, OTHER_UID, OTHER_GID)
        got = run_as(OTHER_UID, OTHER_GID, f"""
            import ctypes, os, syscalls
            libc = ctypes.CDLL(None, use_errno=True)
            uid, gid = os.getuid(), os.getgid()
            if libc.unshare(0x10000000 | 0x00020000) != 0:  # CLONE_NEWUSER | CLONE_NEWNS
                raise OSError(ctypes.get_errno(), "unshare")
            for name, text in (("setgroups", "deny"), ("uid_map", f"0 {{uid}} 1"),
                               ("gid_map", f"0 {{gid}} 1")):
                with open(f"/proc/self/{{name}}", "w") as f:
                    f.write(text)
            for n in range({next_id}, {next_id} + 4):
                os.makedirs(f"{fake}/c{{n}}")
                os.symlink("{target}", f"{fake}/c{{n}}/cgroup.procs")
            if libc.mount(b"{fake}", b"{service.cgroups.base}", None, 0x1000, None) != 0:
                raise OSError(ctypes.get_errno(), "bind mount")  # MS_BIND
            fd = syscalls.container_create("redirect", syscalls.CONTAINER_NEW_USER_NS
                                           | syscalls.CONTAINER_NEW_CGROUP_NS)
            return syscalls.container_status(fd)["id"]
        """)
        assert target.read_text() == "ORIGINAL\n", "the service wrote into a root-owned file"
        assert next_id <= got < next_id + 4, "the attack missed the container's cgroup"
    finally:
        shutil.rmtree(where, ignore_errors=True)
    still_serves()


# ---- a file of the view, or of any FUSE mount, passed as a handle ---------------------------

@pytest.mark.parametrize("req", [protocol.Status(), protocol.Fork(), protocol.Root(),
                                 protocol.NetNs(), protocol.Kill(), protocol.FsNamespaces(),
                                 protocol.KeyIntercept(type="user")], ids=lambda r: r.op)
def test_view_file_as_handle_is_refused(service: ServiceUnderTest, req: protocol.Request) -> None:
    view_file = os.open(os.path.join(service.view, "containers"), os.O_PATH | os.O_CLOEXEC)
    s = raw(service)  # times out (fails) rather than hang if the service hangs
    try:
        assert ask(s, req, [view_file]).get("errno") == errno.EINVAL
    finally:
        s.close()
        os.close(view_file)
    with open(os.path.join(service.view, "containers")) as f:  # the view still answers
        assert f.readline().startswith("NAME")
    still_serves()


# ---- floods -----------------------------------------------------------------------------------

def test_one_user_cannot_hold_every_connection(service: ServiceUnderTest) -> None:
    from containerfs.control import MAX_CONNECTIONS_PER_USER
    got = run_as(OTHER_UID, OTHER_GID, f"""
        import socket
        from syscalls import protocol
        socks, answers = [], []
        for _ in range({MAX_CONNECTIONS_PER_USER} + 40):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(10)
            s.connect({service.socket!r})
            s.send(protocol.encode(protocol.List()))
            answers.append(protocol.decode_reply(s.recv(65536)).get("errno", 0))
            socks.append(s)
        return answers
    """, timeout=60)
    assert got[:MAX_CONNECTIONS_PER_USER] == [0] * MAX_CONNECTIONS_PER_USER
    assert set(got[MAX_CONNECTIONS_PER_USER:]) == {errno.EAGAIN}
    still_serves()  # root, and the same user once its connections are gone
    assert run_as(OTHER_UID, OTHER_GID, """
        import syscalls
        fd = syscalls.container_create("again", syscalls.CONTAINER_NEW_USER_NS)
        return syscalls.container_status(fd)["state"]
    """) == "created"


@pytest.fixture
def small_service(request: pytest.FixtureRequest,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[ServiceUnderTest]:
    """A service whose fd limit is 200, so that floods reach it in a test."""
    yield from fresh_service(request, monkeypatch, nofile=200)


def test_running_out_of_fds_does_not_end_the_service(small_service: ServiceUnderTest) -> None:
    socks = []
    try:
        for _ in range(400):  # far past the service's 200 fds: accept() meets EMFILE
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.setblocking(False)
            try:
                s.connect(small_service.socket)
            except BlockingIOError:  # the backlog is full
                s.close()
                break
            socks.append(s)
        deadline = time.monotonic() + 10
        while ("Too many open files" not in small_service.log.read_text()
               and time.monotonic() < deadline):
            time.sleep(0.05)
        assert "Too many open files" in small_service.log.read_text(), "no fd limit reached"
        time.sleep(0.2)
        assert small_service.alive(), small_service.log.read_text()
    finally:
        for s in socks:
            s.close()
    time.sleep(0.3)  # closed connections are noticed
    still_serves()


def test_fresh_namespaces_at_the_fd_limit_do_not_end_the_service(
        small_service: ServiceUnderTest) -> None:
    """Root's creates may use the service's fds to the last (fresh namespaces are held by
    fd until bound, nsstore.BIND_DELAY): binding them then needs fds too, and must wait for
    some, not end the service. Once fds are free again they are bound."""
    flags = (S.CONTAINER_NEW_FS_NS | S.CONTAINER_NEW_UTS_NS | S.CONTAINER_NEW_IPC_NS
             | S.CONTAINER_NEW_NET_NS | S.CONTAINER_KILL_ON_CLOSE)
    handles: list[int] = []
    try:
        for _ in range(200):  # far past what 200 fds hold: creates meet EMFILE
            try:
                handles.append(S.container_create("full", flags))
            except OSError as e:
                assert e.errno in (errno.EMFILE, errno.EAGAIN), e
                break
        else:
            raise AssertionError("no fd limit reached")
        time.sleep(1)  # nsstore.BIND_DELAY (0.1 s) and more
        assert small_service.alive(), small_service.log.read_text()[-3000:]
    finally:
        for fd in handles[len(handles) // 2:]:
            os.close(fd)
        del handles[len(handles) // 2:]
    try:
        time.sleep(0.5)
        still_serves()
        from .test_scale import holder
        deadline = time.monotonic() + 5  # what is left is bound in the end
        while holder(small_service)[1] < 1 + 4 * len(handles) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert holder(small_service)[1] >= 1 + 4 * len(handles)
    finally:
        for fd in handles:
            os.close(fd)


def test_users_leave_fds_for_root(small_service: ServiceUnderTest) -> None:
    """Another user's flood stops short of the fds root's requests need."""
    flooder = subprocess.Popen(
        [sys.executable, "-c", f"""
import json, socket, sys
sys.path.insert(0, {str(ROOT)!r})
import syscalls
from syscalls import protocol
socks, errors = [], []
for _ in range(200):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(10)
    s.connect({small_service.socket!r})
    s.send(protocol.encode(protocol.List()))
    errors.append(protocol.decode_reply(s.recv(65536)).get("errno", 0))
    socks.append(s)
try:
    syscalls.container_create("more", syscalls.CONTAINER_NEW_USER_NS)
    made = 0
except OSError as e:
    made = e.errno
print(json.dumps([sorted(set(errors)), made]), flush=True)
sys.stdin.read()  # holds every connection until the test is done
"""], user=OTHER_UID, group=OTHER_GID, extra_groups=[], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        assert flooder.stdout is not None and flooder.stderr is not None
        line = flooder.stdout.readline()
        if not line:
            flooder.kill()
            raise AssertionError(f"the flooding user's program failed: {flooder.stderr.read()}"
                                 f"\nservice log:\n{small_service.log.read_text()[-3000:]}")
        assert json.loads(line) == [[0, errno.EAGAIN], errno.EAGAIN]
        still_serves()  # root, while the user holds everything it could get
    finally:
        flooder.kill()
        flooder.wait()


def test_a_flood_of_listener_fds_is_not_kept(service: ServiceUnderTest) -> None:
    cfd = S.container_create("listeners", CONTAINER_NEW_PID_NS)
    r, w = os.pipe()
    s = raw(service)
    try:
        reply = ask(s, protocol.Fork(), [cfd])
        assert reply.get("role") == "init"
        for _ in range(300):  # one way: no reply comes
            socket.send_fds(s, [protocol.encode(protocol.KeyListener())], [r])
        s.send(protocol.encode(protocol.ForkFailed(errno=errno.EIO)))
        assert ask(s, protocol.Status(), [cfd])["state"] == "created"  # all were read
        assert service_holds(service, r) == 0, "the service kept fds that are no listener"
        target = os.readlink(f"/proc/self/fd/{r}")
        keeper = keeper_pid(service)
        kept = [n for n in os.listdir(f"/proc/{keeper}/fd")
                if os.readlink(f"/proc/{keeper}/fd/{n}") == target]
        assert kept == [], "the keeper kept them"
    finally:
        s.close()
        os.close(r)
        os.close(w)
        os.close(cfd)


# ---- what a dead container keeps ---------------------------------------------------------------

def dead_container(mfd: int) -> int:
    """The handle of an empty-fs container whose root was `mfd` and whose init has exited."""
    cfd = S.container_create("sample", CONTAINER_NEW_EMPTY_FS_NS | CONTAINER_NEW_PID_NS)
    try:
        S.move_mount(mfd, "", cfd, "/", SET_ROOT)
        pid = S.fork_into_container(cfd)
        if pid == 0:
            os._exit(0)
        assert child_result(pid) == 0
        S.container_wait(cfd)
        assert S.container_status(cfd)["state"] == "dead"
    except BaseException:
        os.close(cfd)
        raise
    return cfd


def lifecycle(mfd: int) -> None:
    """The proposal's sample: a root set from outside, an init that exits, a last close."""
    os.close(dead_container(mfd))


def test_dead_containers_leave_no_fds(service: ServiceUnderTest) -> None:
    for _ in range(3):  # warm up: connections, the namespace pool, lazily made state
        mfd = tmpfs()
        lifecycle(mfd)
        os.close(mfd)
    before = fd_count(service.proc.pid)
    for _ in range(30):
        mfd = tmpfs()
        lifecycle(mfd)
        os.close(mfd)
    time.sleep(0.2)
    assert fd_count(service.proc.pid) - before < 5, "each dead container kept fds"


@pytest.fixture
def loop_ext4(tmp_path: Path) -> Iterator[str]:
    """A loop device over a fresh ext4 image, set to detach itself once nothing uses it."""
    if not os.path.exists("/dev/loop-control") or shutil.which("mkfs.ext4") is None:
        reason = "no loop devices or no mkfs.ext4 here"
        print(f"skipping: {reason}")
        pytest.skip(reason)
    image = tmp_path / "root.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    dev = subprocess.run(["losetup", "--show", "-f", str(image)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def test_dead_container_lets_go_of_its_loop_device(service: ServiceUnderTest, loop_ext4: str) -> None:
    fs = S.fsopen("ext4", S.FSOPEN_CLOEXEC)
    S.fsconfig(fs, S.FSCONFIG_SET_STRING, "source", loop_ext4)
    S.fsconfig(fs, S.FSCONFIG_CMD_CREATE)
    mfd = S.fsmount(fs, S.FSMOUNT_CLOEXEC)
    os.close(fs)
    lifecycle(mfd)
    os.close(mfd)
    subprocess.run(["losetup", "-d", loop_ext4], check=True)  # detaches once unused
    backing = f"/sys/block/{os.path.basename(loop_ext4)}/loop/backing_file"
    deadline = time.monotonic() + 5
    while os.path.exists(backing) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(backing), "the dead container's filesystem is still mounted"


def test_first_at_call_after_death_is_ecanceled(service: ServiceUnderTest) -> None:
    mfd = tmpfs()
    cfd = dead_container(mfd)
    try:
        with pytest.raises(OSError) as info:  # this process never used the root before
            S.mkdirat(cfd, "after", 0o755)
        assert info.value.errno == errno.ECANCELED
    finally:
        os.close(mfd)
        os.close(cfd)
