"""The namespace maker (containerfs/nsmaker.py): root's fresh namespaces made ahead by a
process of the service's own; what it refuses; the service going on without it."""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
import trio

import syscalls
from containerfs.nsmaker import Maker, MakerGone
from syscalls import linux
from syscalls import (
    CONTAINER_KILL_ON_CLOSE, CONTAINER_NEW_FS_NS, CONTAINER_NEW_IPC_NS, CONTAINER_NEW_NET_NS,
    CONTAINER_NEW_PID_NS, CONTAINER_NEW_UTS_NS,
)

from .conftest import child_result, in_container

FLAGS = CONTAINER_NEW_UTS_NS | CONTAINER_NEW_IPC_NS | CONTAINER_NEW_NET_NS | CONTAINER_KILL_ON_CLOSE
ALL = FLAGS | CONTAINER_NEW_FS_NS | CONTAINER_NEW_PID_NS


def _children(service: Any) -> set[int]:
    pids: set[int] = set()
    for task in os.listdir(f"/proc/{service.proc.pid}/task"):
        with open(f"/proc/{service.proc.pid}/task/{task}/children") as f:
            pids.update(int(p) for p in f.read().split())
    return pids


def _maker_of(service: Any) -> int | None:
    """The pid of the service's namespace maker, if it runs."""
    for pid in _children(service):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"containerfs.nsmaker" in f.read():
                    return pid
        except FileNotFoundError:
            continue
    return None


def _wait_log(service: Any, text: str, count: int = 1, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while (seen := service.log.read_text().count(text)) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return seen


def _until_the_maker_made(service: Any, fds: list[int], timeout: float = 10) -> bool:
    """Create containers (appended to `fds`) until the maker refilled the pool: at its start
    (~0.1 s) the service fills it itself."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fds.append(syscalls.container_create("m", FLAGS))
        if _wait_log(service, "the namespace maker made uts,ipc,net", timeout=0.05):
            return True
    return False


def _net_of(cfd: int) -> tuple[int, list[str]]:
    """The container's network namespace (inode) and its interfaces."""
    pid, seen = in_container(cfd, lambda: (os.stat("/proc/self/ns/net").st_ino,
                                           sorted(n for _, n in socket.if_nameindex())))
    assert child_result(pid) == 0
    return seen[0], seen[1]


def test_fresh_namespaces_come_from_the_maker(service: Any) -> None:
    """The pool is filled by the maker, a child of the service at nice 10: the containers
    given its namespaces have fresh ones of their own (only lo, none the host's)."""
    fds: list[int] = []
    try:
        assert _until_the_maker_made(service, fds)
        maker = _maker_of(service)
        assert maker is not None
        assert os.getpriority(os.PRIO_PROCESS, maker) == 10
        fds += [syscalls.container_create("m", FLAGS) for _ in range(5)]
        nets = [_net_of(fd) for fd in fds]
        assert all(links == ["lo"] for _, links in nets)
        inodes = {ino for ino, _ in nets}
        assert len(inodes) == len(fds)
        assert os.stat("/proc/self/ns/net").st_ino not in inodes
    finally:
        for fd in fds:
            os.close(fd)


def test_the_service_goes_on_when_the_maker_dies(service: Any) -> None:
    """A killed maker costs nothing but speed: namespaces are made by a worker thread from
    then on, and said so."""
    fds: list[int] = []
    try:
        assert _until_the_maker_made(service, fds)
        maker = _maker_of(service)
        assert maker is not None
        os.kill(maker, signal.SIGKILL)
        for _ in range(8):  # more than the pool holds: refills after the kill are needed
            fds.append(syscalls.container_create("m", FLAGS))
        assert _wait_log(service, "worker thread from now on") == 1
        nets = {_net_of(fd)[0] for fd in fds}
        assert len(nets) == len(fds)
        assert service.alive()
        assert _maker_of(service) is None
        assert maker not in _children(service)  # reaped: not left a zombie
    finally:
        for fd in fds:
            os.close(fd)


# init: its mounts its own, a proc of its PID namespace on /proc (as any container's init
# does), then it says so and waits.
INIT = ("import os, sys; from syscalls import linux\n"
        "linux.mount(None, '/', None, linux.MS_REC | linux.MS_PRIVATE)\n"
        "linux.mount('proc', '/proc', 'proc', 0)\n"
        "os.write(3, b'ok'); os.close(3); sys.stdin.read()\n")


def _mnt(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/mnt").st_ino


def test_the_maker_never_stands_in_a_containers_mount_namespace(service: Any) -> None:
    """Both copies made ahead taken while the maker lags (stopped here, to be sure), by
    containers whose init mounts its own proc: the maker is never found in their mount
    namespaces, refills go on without failing, and their namespaces die with them (found
    by review: it stayed in the last copy it made, which then was a container's)."""
    fds: list[int] = []
    maker = None
    try:
        assert _until_the_maker_made(service, fds)
        for _ in range(3):  # the mount copies taken: the maker makes the next ones
            fds.append(syscalls.container_create("warm", ALL))
            time.sleep(0.3)
        for fd in fds:
            os.close(fd)
        fds.clear()
        assert _wait_log(service, "the namespace maker made mnt,root", 2)
        time.sleep(1.5)  # the pool and the mount copies refilled: the maker rests
        maker = _maker_of(service)
        assert maker is not None
        os.kill(maker, signal.SIGSTOP)  # (only to make the refill's lag certain)
        mine = set()
        for _ in range(2):  # both copies made ahead taken, the last the maker made too
            cfd = syscalls.container_create("pinned", ALL)
            fds.append(cfd)
            r, w = os.pipe()
            pid = syscalls.container_spawn(
                cfd, sys.executable, [sys.executable, "-c", INIT],
                file_actions=[(os.POSIX_SPAWN_DUP2, w, 3)], pass_fds=[3],
                env={"PYTHONPATH": os.environ.get("PYTHONPATH", "")})
            os.close(w)
            assert os.read(r, 2) == b"ok"
            os.close(r)
            mine.add(_mnt(pid))
        os.kill(maker, signal.SIGCONT)
        time.sleep(3)  # the refill, three times over if it fails
        warnings = service.log.read_text().count("namespace pool not refilled")
        inside = _mnt(maker) in mine
        for fd in fds:
            os.close(fd)  # the containers die
        fds.clear()
        time.sleep(1)
        pinned = _mnt(maker) in mine
        assert warnings == 0 and not inside and not pinned, (
            f"{warnings} refill failures; the maker in a container's mount namespace: "
            f"{inside}, and still after its death: {pinned}\n"
            + service.log.read_text()[-800:])
    finally:
        if maker is not None:
            try:
                os.kill(maker, signal.SIGCONT)
            except ProcessLookupError:
                pass
        for fd in fds:
            os.close(fd)


@pytest.fixture
def maker() -> Any:
    """A maker of our own on a socketpair, as the service starts one."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    proc = subprocess.Popen([sys.executable, "-m", "containerfs.nsmaker", str(theirs.fileno())],
                            pass_fds=[theirs.fileno()])
    theirs.close()
    try:
        assert ours.recv(64) == b"ready"
        yield ours, proc
    finally:
        ours.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("the maker did not exit when its service hung up") from None


@pytest.mark.parametrize("request_", [b"pid", b"user", b"net,net", b"mnt,net", b"", b"\xff"])
def test_the_maker_refuses_what_it_does_not_make(maker: Any, request_: bytes) -> None:
    sock, proc = maker
    if not request_:
        sock.close()  # (an empty datagram reads as a hang-up: it ends the maker)
        assert proc.wait(5) == 0
        return
    sock.send(request_)
    data, fds, _flags, _ = socket.recv_fds(sock, 64, 4)
    assert fds == []
    assert data == f"error {errno.EINVAL}".encode()
    sock.send(b"uts")  # and it goes on
    data, fds, _flags, _ = socket.recv_fds(sock, 64, 4)
    try:
        assert data == b"ok" and len(fds) == 1
        assert os.readlink(f"/proc/self/fd/{fds[0]}").startswith("uts:")
        assert os.fstat(fds[0]).st_ino != os.stat("/proc/self/ns/uts").st_ino
    finally:
        for fd in fds:
            os.close(fd)


def _in_mount_ns(mnt: int, fn: Any) -> Any:
    """Run `fn` in a child standing in mount namespace `mnt`; its result (an int)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            linux.setns(mnt, linux.CLONE_NEWNS)
            os.write(w, str(int(fn())).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    assert child_result(pid) == 0
    return int(out)


def _copy(sock: socket.socket) -> list[int]:
    sock.send(b"mnt")
    data, fds, _flags, _ = socket.recv_fds(sock, 64, 4)
    assert data == b"ok" and len(fds) == 2
    assert os.readlink(f"/proc/self/fd/{fds[0]}").startswith("mnt:")
    return fds


@pytest.mark.parametrize("request_", [b"uts,ipc,net", b"mnt"])
def test_the_maker_goes_home_after_each_request(maker: Any, request_: bytes) -> None:
    """What it made is handed out: the maker itself stands in our namespaces again (it was
    started in them), never in one it made."""
    sock, proc = maker
    sock.send(request_)
    data, fds, _flags, _ = socket.recv_fds(sock, 64, 4)
    try:
        assert data == b"ok"
        for name in request_.decode().split(","):
            theirs = os.stat(f"/proc/{proc.pid}/ns/{name}").st_ino
            assert theirs == os.stat(f"/proc/self/ns/{name}").st_ino
            assert theirs not in {os.fstat(fd).st_ino for fd in fds}
        assert os.readlink(f"/proc/{proc.pid}/root") == "/"
    finally:
        for fd in fds:
            os.close(fd)


def test_a_mount_copy_is_of_the_makers_first_namespace(maker: Any) -> None:
    """Each copy is of the mount namespace the maker started in (the service's), never of
    the copy it made last: a mount made in one copy is not in the next."""
    sock, _proc = maker
    where = "/mnt"
    copies = [_copy(sock)]
    try:
        def mount_there() -> bool:
            linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)  # ours alone
            linux.mount("tmpfs", where, "tmpfs", 0)
            return os.path.ismount(where)
        assert not os.path.ismount(where)
        assert _in_mount_ns(copies[0][0], mount_there)
        copies.append(_copy(sock))
        assert not _in_mount_ns(copies[1][0], lambda: os.path.ismount(where))
        assert not os.path.ismount(where)  # nothing reached the host either
        inodes = {os.fstat(c[0]).st_ino for c in copies}
        assert len(inodes) == 2 and os.stat("/proc/self/ns/mnt").st_ino not in inodes
    finally:
        for fds in copies:
            for fd in fds:
                os.close(fd)


SILENT = b"(silent)"


def _answering(answer: bytes | None) -> Any:
    """Maker.make against a fake maker that reads the request and answers `answer` (None:
    hangs up; SILENT: says nothing); what make raised or returned."""
    async def run() -> Any:
        m = Maker()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        m.sock = trio.socket.from_stdlib_socket(ours)
        try:
            async with trio.open_nursery() as nursery:
                async def fake() -> None:
                    await trio.to_thread.run_sync(theirs.recv, 64)
                    if answer is None:
                        theirs.close()
                    elif answer is not SILENT:
                        theirs.send(answer)
                nursery.start_soon(fake)
                try:
                    return await m.make(["net"])
                except OSError as e:
                    return e
        finally:
            if m.sock is not None:
                m.sock.close()
            if theirs.fileno() >= 0:
                theirs.close()
    return trio.run(run)


def test_the_makers_errors_are_told_apart() -> None:
    """Its error (the pool retries later) from its absence (made elsewhere from then on)."""
    full = _answering(f"error {errno.ENOSPC}".encode())
    assert isinstance(full, OSError) and not isinstance(full, MakerGone)
    assert full.errno == errno.ENOSPC
    assert isinstance(_answering(None), MakerGone)
    assert isinstance(_answering(b"nonsense"), MakerGone)
    assert isinstance(_answering(b"ok"), MakerGone)  # "ok" with no fd: not a maker's answer


def test_the_maker_closes_what_it_is_given() -> None:
    """close_ns: a mount namespace's fd goes to the maker, which closes it (its teardown paid
    there); the caller's copy is closed at once; the maker answers nothing, and the next
    request still gets its own answer."""
    async def run() -> None:  # (a Maker's trio socket closes inside trio, as the service's)
        m = Maker()
        m.start()
        try:
            deadline = time.monotonic() + 10
            while not m.ready():
                assert time.monotonic() < deadline, "the maker never said ready"
                await trio.sleep(0.01)
            for nstype in ("mnt", "net"):
                r, w = os.pipe()
                m.close_ns(nstype, w)  # (a pipe stands for the namespace: its end is seen)
                with pytest.raises(OSError) as e:
                    os.fstat(w)
                assert e.value.errno == errno.EBADF
                ready, _, _ = select.select([r], [], [], 5)
                assert ready and os.read(r, 1) == b""  # every write end closed, the maker's too
                os.close(r)
            made = await m.make(["uts"])
            assert list(made) == ["uts"]
            os.close(made["uts"])
        finally:
            m.close()
        assert m.proc is None
    trio.run(run)


def test_a_maker_that_does_not_answer_is_given_up(monkeypatch: Any) -> None:
    """No answer within MAKE_TIMEOUT: MakerGone (ETIMEDOUT) about then; make closed its end,
    so an answer coming later can never be taken for the next request's."""
    from containerfs import nsmaker
    monkeypatch.setattr(nsmaker, "MAKE_TIMEOUT", 0.2)
    t = time.monotonic()
    silent = _answering(SILENT)
    assert isinstance(silent, MakerGone) and silent.errno == errno.ETIMEDOUT
    assert time.monotonic() - t < 5
