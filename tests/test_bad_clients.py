"""Hostile or broken clients get an error or are dropped; the service keeps serving others."""

from __future__ import annotations

import errno
import os
import socket
import time
from typing import Any

import pytest

import syscalls
from syscalls import CONTAINER_NEW_PID_NS, fdpass, protocol

from .conftest import child_result, raw, service_holds, still_serves


@pytest.mark.parametrize("data", [b"\xff garbage", b"[]", b'{"op":"fork"}', b'{"op":"started","pid":1}',
                                  b'{"op":"create","name":"x","flags":-1}'])
def test_garbage_gets_error_then_close(service: Any, data: bytes) -> None:
    s = raw(service)
    s.send(data)
    reply = s.recv(65536)
    assert protocol.decode_reply(reply)["errno"] in (errno.EINVAL, errno.EPERM)
    s.close()
    still_serves()


def test_non_handle_fds_and_too_many_fds(service: Any) -> None:
    r, w = os.pipe()
    s = raw(service)
    socket.send_fds(s, [protocol.encode(protocol.Status())], [r])
    data, fds, _ = fdpass.recv_fds(s, 65536, 4)
    assert protocol.decode_reply(data)["errno"] == errno.EINVAL and fds == []
    s.close()
    s = raw(service)  # more fds than any message may carry: truncated, all closed
    socket.send_fds(s, [protocol.encode(protocol.Status())], [r] * (protocol.MAX_FDS + 8))
    assert protocol.decode_reply(s.recv(65536))["errno"] == errno.EINVAL
    s.close()
    deadline = time.monotonic() + 3  # the service closes a dropped connection soon, not at once
    while service_holds(service, r) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert service_holds(service, r) == 0, "the service kept fds a client sent"
    os.close(r)
    os.close(w)
    still_serves()


def test_disconnect_mid_fork_rolls_back(service: Any) -> None:
    cfd = syscalls.container_create("mid", CONTAINER_NEW_PID_NS)
    s = raw(service)
    socket.send_fds(s, [protocol.encode(protocol.Fork())], [cfd])
    data, fds, _ = fdpass.recv_fds(s, 65536, protocol.MAX_FDS)
    assert protocol.decode_reply(data)["role"] == "init"
    for fd in fds:
        os.close(fd)
    assert syscalls.container_status(cfd)["state"] == "starting"
    s.close()  # vanish before reporting a process
    pid = syscalls.fork_into_container(cfd)
    if pid == 0:
        os._exit(0 if os.getpid() == 1 else 1)
    assert child_result(pid) == 0, "the next fork did not become init"
    os.close(cfd)


def test_client_gone_before_reply(service: Any) -> None:
    for _ in range(20):
        s = raw(service)
        s.send(protocol.encode(protocol.Create(name="gone", flags=CONTAINER_NEW_PID_NS)))
        s.close()
    still_serves()


def test_one_way_messages_never_get_replies(service: Any) -> None:
    cfd = syscalls.container_create("oneway", CONTAINER_NEW_PID_NS)
    s = raw(service)
    socket.send_fds(s, [protocol.encode(protocol.Fork())], [cfd])
    _data, fds, _ = fdpass.recv_fds(s, 65536, protocol.MAX_FDS)
    for fd in fds:
        os.close(fd)
    s.send(protocol.encode(protocol.ForkFailed(errno=errno.EPERM)))
    r, w = os.pipe()  # not a seccomp listener: refused, silently
    socket.send_fds(s, [protocol.encode(protocol.KeyListener())], [r])
    os.close(r)
    os.close(w)
    s.send(protocol.encode(protocol.Status()))  # wrong: no fd; this one is answered
    reply = protocol.decode_reply(s.recv(65536))
    assert reply["errno"] == errno.EINVAL and "status takes 1 fd" in reply["message"]
    s.close()
    assert syscalls.container_status(cfd)["state"] == "created"
    os.close(cfd)


def _fork_request(service: Any, cfd: int) -> tuple[socket.socket, list[int]]:
    """Send Fork for `cfd` on a raw connection, as an intermediate would; return it and the
    fds the reply carried (closed by the caller)."""
    s = raw(service)
    socket.send_fds(s, [protocol.encode(protocol.Fork())], [cfd])
    data, fds, _ = fdpass.recv_fds(s, 65536, protocol.MAX_FDS)
    assert "errno" not in protocol.decode_reply(data)
    return s, fds


def test_reaped_process_is_not_taken_as_init(service: Any) -> None:
    """A report naming a process that is already gone is believed only from root's one-way
    fast path; anyone else could pass off a stranger's death as init's and its status."""
    cfd = syscalls.container_create("fake-init", CONTAINER_NEW_PID_NS)
    s, fds = _fork_request(service, cfd)
    stranger = os.fork()
    if stranger == 0:
        os._exit(42)
    pidfd = os.pidfd_open(stranger)
    assert child_result(stranger) == 42  # reaped: its pidfd no longer names a live pid
    socket.send_fds(s, [protocol.encode(protocol.Started(pid=stranger))], [pidfd])
    reply = protocol.decode_reply(s.recv(65536))
    assert reply["errno"] == errno.EINVAL, reply
    s.close()
    for fd in (pidfd, *fds):
        os.close(fd)
    status = syscalls.container_status(cfd)
    assert (status["state"], status["exit_status"]) == ("created", None)
    os.close(cfd)


def test_a_connection_forks_once(service: Any) -> None:
    """The keeper's record of a fork names one fork: a second Fork on the same connection is
    refused, and the first one is undone as if its caller had gone."""
    cfd = syscalls.container_create("twice", 0)
    s, fds = _fork_request(service, cfd)
    socket.send_fds(s, [protocol.encode(protocol.Fork())], [cfd])
    assert protocol.decode_reply(s.recv(65536))["errno"] == errno.EINVAL
    assert s.recv(65536) == b""  # dropped
    s.close()
    for fd in fds:
        os.close(fd)
    deadline = time.monotonic() + 5
    while syscalls.container_status(cfd)["state"] != "created":
        assert time.monotonic() < deadline, "the abandoned fork was never undone"
        time.sleep(0.01)
    os.close(cfd)
    still_serves()
