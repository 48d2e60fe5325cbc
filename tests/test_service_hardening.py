"""Attacks on the service itself (issue 13): a second service or keeper on one runtime
directory, the start-up window of the control socket, strings that are not text."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

import syscalls
from containerfs.cgroups import CgroupTree
from syscalls import CONTAINER_NEW_PID_NS, fdpass, keys, protocol

from .conftest import (
    ROOT,
    SKIP_REASON,
    ServiceUnderTest,
    child_result,
    pid_alive,
    raw,
    service_holds_link,
    still_serves,
)
from .test_restart import restart


def _serve(*args: str, log: Any = subprocess.PIPE) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "containerfs", "serve", "--no-mount",
                             "--log-level", "debug", *args],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def _refused(proc: subprocess.Popen[bytes], what: str) -> str:
    """The output of `proc`, which must exit non-zero within 20 s; a `proc` that serves on
    is stopped and the test fails."""
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # as an operator would: this is what did the harm
        out, _ = proc.communicate(timeout=10)
        raise AssertionError(f"{what} was not refused; it ran:\n{out.decode()}") from None
    assert proc.returncode != 0, f"{what} exited 0:\n{out.decode()}"
    return str(out.decode())


def _keeper_pid(service: ServiceUnderTest) -> int:
    return int(Path(service.runtime_dir, "keeper.pid").read_text())


def _running_container() -> tuple[int, int, int]:
    """A container whose init waits for a byte on a pipe: (handle, init pid, pipe write end)."""
    cfd = syscalls.container_create("held", CONTAINER_NEW_PID_NS)
    r, w = os.pipe()
    init = syscalls.fork_into_container(cfd)
    if init == 0:
        os.close(w)
        os._exit(3 if not os.read(r, 1) else 1)
    os.close(r)
    return cfd, init, w


def _end(cfd: int, init: int, w: int) -> None:
    os.close(w)
    assert child_result(init) == 3
    os.close(cfd)


# ---- 1. one service and one keeper per runtime directory ----------------------------------

def test_second_service_on_the_runtime_dir_is_refused(service: ServiceUnderTest) -> None:
    cfd, init, w = _running_container()
    keeper = _keeper_pid(service)
    other_sock = str(Path(service.socket).parent / "other.sock")
    other_cgroup = f"{os.path.basename(service.cgroups.base)}-second"
    out = _refused(_serve("--socket", other_sock, "--runtime-dir", service.runtime_dir,
                          "--cgroup", other_cgroup), "a second service on one runtime directory")
    assert f"runtime directory {service.runtime_dir} is in use by the service with pid " \
           f"{service.proc.pid}" in out, out
    assert "Traceback" not in out, out
    # Nothing was done before the refusal: no socket, no cgroup, no keeper of its own.
    assert not os.path.exists(other_sock)
    assert not os.path.exists(os.path.join(service.cgroups.mount, other_cgroup))
    assert _keeper_pid(service) == keeper and pid_alive(keeper)
    assert Path(service.runtime_dir, "service.pid").read_text() == f"{service.proc.pid}\n"
    # The first one is whole: its registry keyring (every create needs one) and containers.
    still_serves()
    assert syscalls.container_status(cfd)["state"] == "running"
    _end(cfd, init, w)


def test_second_service_on_the_socket_is_refused(service: ServiceUnderTest) -> None:
    """Another runtime directory, the same socket: it would take over the first's clients."""
    where = Path(tempfile.mkdtemp(prefix="cfs-test-"))
    try:
        out = _refused(_serve("--socket", service.socket, "--runtime-dir", str(where / "state"),
                              "--cgroup", f"{os.path.basename(service.cgroups.base)}-second"),
                       "a second service on one socket")
        assert f"control socket {service.socket} is in use by pid {service.proc.pid}" in out, out
        assert not os.path.exists(where / "state" / "keeper.sock")
    finally:
        shutil.rmtree(where, ignore_errors=True)
    still_serves()


def test_second_keeper_is_refused_and_restart_still_adopts(service: ServiceUnderTest) -> None:
    cfd, init, w = _running_container()
    keeper = _keeper_pid(service)
    sock = os.path.join(service.runtime_dir, "keeper.sock")
    before = os.stat(sock).st_ino
    proc = subprocess.Popen([sys.executable, "-m", "containerfs.keeper", "--socket", sock],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    out = _refused(proc, "a second keeper")
    assert proc.returncode == 75, out
    assert f"runtime directory {service.runtime_dir} is in use by the keeper with pid {keeper}" \
           in out, out
    assert os.stat(sock).st_ino == before, "the refused keeper touched the socket"
    # The kept fds are where the next service looks for them: after kill -9 (the service's
    # lock goes with its process), a new service takes the directory and adopts.
    restart(service, hard=True)
    status = syscalls.container_status(cfd)
    assert (status["state"], status["init_pid"]) == ("running", init)
    assert _keeper_pid(service) == keeper
    _end(cfd, init, w)


def test_restart_after_clean_stop_takes_the_directory(service: ServiceUnderTest) -> None:
    cfd, init, w = _running_container()
    restart(service, hard=False)
    assert syscalls.container_status(cfd)["state"] == "running"
    assert Path(service.runtime_dir, "service.pid").read_text() == f"{service.proc.pid}\n"
    _end(cfd, init, w)


# ---- 2. the control socket never exists before it listens --------------------------------

def _first_connect(path: str, proc: subprocess.Popen[bytes], deadline: float) -> int:
    """Connect to `path` from a tight loop as soon as it exists; the errno of the first
    connect to find it (0: accepted)."""
    while time.monotonic() < deadline and proc.poll() is None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.connect(path)
            return 0
        except FileNotFoundError:
            continue
        except OSError as e:
            return e.errno or -1
        finally:
            s.close()
    raise AssertionError(f"the service did not start: {proc.poll()}")


@pytest.mark.skipif(bool(SKIP_REASON), reason=SKIP_REASON or "")
def test_socket_path_accepts_once_it_exists() -> None:
    for attempt in range(4):
        where = Path(tempfile.mkdtemp(prefix="cfs-test-"))
        where.chmod(0o755)
        sock = str(where / "cfs.sock")
        cgroup = f"cfs-test-{os.getpid()}-{time.monotonic_ns()}"
        log = where / "service.log"
        proc = _serve("--socket", sock, "--runtime-dir", str(where / "state"), "--cgroup", cgroup,
                      log=log.open("wb"))
        svc = ServiceUnderTest(sock, str(where / "state"), CgroupTree(cgroup), proc, log)
        try:
            err = _first_connect(sock, proc, time.monotonic() + 20)
            assert err == 0, f"start {attempt}: the socket existed but refused: " \
                             f"{errno.errorcode.get(err, err)}"
        finally:
            svc.cleanup()
            shutil.rmtree(where, ignore_errors=True)


# ---- 3. strings that are not text --------------------------------------------------------

_UPCALL = {"key": 1, "type": "user", "description": "d", "callout_info": "c", "uid": 0,
           "gid": 0, "session": 1}


@pytest.mark.parametrize("body,nfds", [
    ({"op": "create", "name": "\ud800", "flags": 0}, 0),
    ({"op": "create", "name": "a\0b", "flags": 0}, 0),
    ({"op": "mount_at", "path": "\udfff/x"}, 2),
    ({"op": "mount_at", "path": "tmp\0/etc"}, 2),
    ({"op": "key_intercept", "type": "\ud800"}, 1),
    ({"op": "key_intercept", "type": "k\udcff"}, 1),  # byte 0xff: no type name (check_type)
    ({"op": "key_unintercept", "type": "us\0er"}, 1),
    ({"op": "key_answer", "rid": 1, "action": "\ud800"}, 1),
    ({"op": "key_upcall", **_UPCALL, "description": "\udbff\udbff"}, 0),
    ({"op": ["create"], "name": "x", "flags": 0}, 0),
    ({"op": "list", "\ud800": 1}, 0),
], ids=lambda v: json.dumps(v) if isinstance(v, dict) else str(v))
def test_strings_that_are_not_text_get_einval(service: ServiceUnderTest, body: dict[str, Any],
                                              nfds: int) -> None:
    cfd = syscalls.container_create("text", 0)
    r, w = os.pipe()
    logged = len(service.log.read_bytes())
    s = raw(service)
    try:
        data = json.dumps(body).encode()  # a lone surrogate goes as its JSON escape
        assert b"\\u" in data or b"[" in data
        socket.send_fds(s, [data], [cfd, r][:nfds])
        reply, fds, _ = fdpass.recv_fds(s, 65536, protocol.MAX_FDS)
        for fd in fds:
            os.close(fd)
        reply_body = protocol.decode_reply(reply)
        assert reply_body.get("errno") == errno.EINVAL, reply_body
        assert "internal error" not in reply_body["message"]
    finally:
        s.close()
        for fd in (r, w):
            os.close(fd)
    still_serves()
    assert syscalls.container_status(cfd)["state"] == "created"
    os.close(cfd)
    log = service.log.read_bytes()[logged:].decode(errors="replace")
    assert "Traceback" not in log and "internal error" not in log, log


# ---- found by the fuzz: a forking connection's seccomp listener ---------------------------

def _listener_holder() -> tuple[int, int, int]:
    """A child holding a real seccomp listener: (its pid, the listener (ours now), a pipe end
    whose closing lets it exit)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            a.close()
            os.close(w)
            socket.send_fds(b, [b"l"], [keys.install_request_key_filter()])
            os.read(r, 1)
        finally:
            os._exit(0)
    b.close()
    os.close(r)
    _, fds, _, _ = socket.recv_fds(a, 16, 1)
    a.close()
    return pid, fds[0], w


def test_key_listener_must_be_one_seccomp_listener(service: ServiceUnderTest) -> None:
    """A process forked in hands over its seccomp listener on the fork's connection. Any other
    fd was held until it hung up (an eventfd never does), as often as it was sent: without
    end, in the service and in the keeper."""
    cfd = syscalls.container_create("listener", CONTAINER_NEW_PID_NS)
    holders = [_listener_holder() for _ in range(2)]
    efd = os.eventfd(0)
    logged = len(service.log.read_bytes())
    s = raw(service)
    try:
        socket.send_fds(s, [protocol.encode(protocol.Fork())], [cfd])
        _data, fds, _ = fdpass.recv_fds(s, 65536, protocol.MAX_FDS)
        for fd in fds:
            os.close(fd)
        for _ in range(20):
            socket.send_fds(s, [protocol.encode(protocol.KeyListener())], [efd])
        for _pid, listener, _w in holders:  # the second is one too many for one fork
            socket.send_fds(s, [protocol.encode(protocol.KeyListener())], [listener])
        s.send(protocol.encode(protocol.Status()))  # answered once all before it were taken
        assert protocol.decode_reply(s.recv(65536))["errno"] == errno.EINVAL
        assert service_holds_link(service, "anon_inode:[eventfd]") == 0
        assert service_holds_link(service, "anon_inode:seccomp notify") == 1
    finally:
        s.close()
        os.close(efd)
        for _pid, listener, w in holders:  # all first: each child holds the others' ends
            os.close(listener)
            os.close(w)
        for pid, _listener, _w in holders:
            assert child_result(pid) == 0
    log = service.log.read_bytes()[logged:].decode(errors="replace")
    assert "no seccomp listener (anon_inode:[eventfd]); ignored" in log
    assert "a second seccomp listener for one fork; ignored" in log
    assert "Traceback" not in log, log
    assert syscalls.container_status(cfd)["state"] == "created"
    os.close(cfd)
    still_serves()


def test_a_bug_in_one_connection_costs_only_that_connection(service: ServiceUnderTest) -> None:
    """An exception that escapes a connection's own handling ends that connection, never the
    service. The one the fuzz found: a List reply over 64 KiB (about 330 containers listed)
    raised out of the reply path and stopped the service for every client."""
    cfds = [syscalls.container_create("x" * 23, syscalls.CONTAINER_KILL_ON_CLOSE)
            for _ in range(400)]
    try:
        rows = syscalls.container.container_list()  # pages of List: every one is listed
        assert len([r for r in rows if r["name"] == "x" * 23]) == 400
        assert service.alive(), service.log.read_text()[-3000:]
        still_serves()
    finally:
        for fd in cfds:
            os.close(fd)
