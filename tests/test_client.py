"""The client's reuse of connections: never across processes or credentials, and a restart of
the service costs no call."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path
from typing import Any

import syscalls
from syscalls import client

from .conftest import OTHER_GID, OTHER_UID, child_result, start_service


def service_connections(service: Any) -> int:
    """How many sockets the service holds open (its listening socket and the keeper's too)."""
    base = f"/proc/{service.proc.pid}/fd"
    count = 0
    for name in os.listdir(base):
        try:
            count += os.readlink(f"{base}/{name}").startswith("socket:")
        except FileNotFoundError:
            pass
    return count


def test_calls_reuse_one_connection(service: Any) -> None:
    cfd = syscalls.container_create("reuse", 0)
    syscalls.container_status(cfd)
    before = service_connections(service)
    for _ in range(50):
        assert syscalls.container_status(cfd)["state"] == "created"
    assert service_connections(service) == before
    os.close(cfd)


def test_error_reply_keeps_the_connection(service: Any) -> None:
    r, w = os.pipe()
    try:
        for _ in range(3):
            try:
                syscalls.container_status(r)  # a pipe, but no handle: the service says EINVAL
            except OSError as e:
                assert e.errno == errno.EINVAL
            else:
                raise AssertionError("a plain pipe passed for a handle")
        assert len(client._idle) == 1
    finally:
        os.close(r)
        os.close(w)


def test_forked_child_never_speaks_with_parents_connection(service: Any) -> None:
    cfd = syscalls.container_create("fork", 0)
    syscalls.container_status(cfd)
    parent_conns = list(client._idle)
    assert parent_conns
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            # The inherited connections are closed, not reused; the child makes its own.
            closed = all(c.sock.fileno() == -1 for c in parent_conns)
            state = syscalls.container_status(cfd)["state"]
            os.write(w, json.dumps([closed, state]).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        assert json.loads(f.read()) == [True, "created"]
    assert child_result(pid) == 0
    assert syscalls.container_status(cfd)["state"] == "created"  # the parent's still works
    os.close(cfd)


def test_new_credentials_get_a_new_connection(service: Any) -> None:
    """The service knows a peer by the credentials of its connect(): a process that changed
    them must be seen with the new ones (here: root's container, killed by another uid)."""
    cfd = syscalls.container_create("creds", 0)
    syscalls.container_status(cfd)  # an idle connection made as root
    os.setegid(OTHER_GID)
    os.seteuid(OTHER_UID)
    try:
        try:
            syscalls.container_kill(cfd)
        except OSError as e:
            assert e.errno == errno.EPERM
        else:
            raise AssertionError("another uid killed root's container")
    finally:
        os.seteuid(0)
        os.setegid(0)
    assert syscalls.container_status(cfd)["state"] == "created"
    os.close(cfd)


def test_call_after_restart_goes_to_the_new_service(service: Any) -> None:
    cfd = syscalls.container_create("restart", 0)
    syscalls.container_status(cfd)  # leaves an idle connection to this service
    service.proc.send_signal(signal.SIGKILL)
    service.proc.wait()
    again = start_service(Path(service.socket).parent, os.path.basename(service.cgroups.base))
    service.proc, service.log = again.proc, again.log
    assert syscalls.container_status(cfd)["state"] == "created"
    os.close(cfd)
