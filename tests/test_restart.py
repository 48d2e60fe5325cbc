"""Restarting the service, even after kill -9, neither kills nor loses running containers."""

from __future__ import annotations

import errno
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import syscalls
from syscalls import CONTAINER_KILL_ON_CLOSE, CONTAINER_NEW_NET_NS, CONTAINER_NEW_PID_NS, fdpass, protocol

from .conftest import child_result, hung_up, pid_alive, start_service


def restart(service: Any, hard: bool) -> None:
    if hard:
        service.proc.send_signal(signal.SIGKILL)
        service.proc.wait()
    else:
        service.stop()
    again = start_service(Path(service.socket).parent, os.path.basename(service.cgroups.base))
    service.proc, service.log = again.proc, again.log


def test_running_container_survives_kill_9(service: Any) -> None:
    cfd = syscalls.container_create("keep", CONTAINER_NEW_PID_NS | CONTAINER_NEW_NET_NS)
    r, w = os.pipe()
    init = syscalls.fork_into_container(cfd)
    if init == 0:
        os.close(w)
        os.close(cfd)
        os._exit(4 if not os.read(r, 1) else 1)
    os.close(r)
    restart(service, hard=True)
    assert not hung_up(cfd, 0.3), "a crash of the service looked like a death"
    assert pid_alive(init)
    status = syscalls.container_status(cfd)
    assert (status["state"], status["init_pid"]) == ("running", init)
    member = syscalls.fork_into_container(cfd)  # the namespaces came back too
    if member == 0:
        os._exit(0 if os.getpid() != 1 else 1)
    assert child_result(member) == 0
    os.close(w)
    assert child_result(init) == 4
    assert hung_up(cfd, 5)
    assert syscalls.container_wait(cfd) == 4 << 8
    os.close(cfd)


def test_death_while_down_is_seen_after_restart(service: Any) -> None:
    cfd = syscalls.container_create("gone", CONTAINER_NEW_PID_NS)
    init = syscalls.fork_into_container(cfd)
    if init == 0:
        os._exit(6)
    service.proc.send_signal(signal.SIGKILL)
    service.proc.wait()
    assert child_result(init) == 6  # reaped while no service runs
    restart(service, hard=False)
    assert hung_up(cfd, 5)
    assert syscalls.container_wait(cfd) == 6 << 8
    os.close(cfd)


def test_last_close_while_down_kills_after_restart(service: Any) -> None:
    cfd = syscalls.container_create("koc", CONTAINER_KILL_ON_CLOSE | CONTAINER_NEW_PID_NS)
    init = syscalls.fork_into_container(cfd)
    if init == 0:
        os.close(cfd)
        while True:
            time.sleep(1)
    service.proc.send_signal(signal.SIGKILL)
    service.proc.wait()
    os.close(cfd)
    time.sleep(0.1)
    assert pid_alive(init), "nothing should act while no service runs"
    restart(service, hard=False)
    assert child_result(init) == -9


def test_clean_stop_and_start_keeps_created_container(service: Any) -> None:
    cfd = syscalls.container_create("idle", CONTAINER_NEW_NET_NS)
    cid = syscalls.container_status(cfd)["id"]
    restart(service, hard=False)
    assert not hung_up(cfd, 0.2)
    assert syscalls.container_status(cfd)["id"] == cid
    pid = syscalls.fork_into_container(cfd)
    if pid == 0:
        os._exit(0)
    assert child_result(pid) == 0
    assert hung_up(cfd, 5)
    os.close(cfd)


def test_failed_fork_on_an_open_connection_is_over_after_restart(service: Any) -> None:
    # A caller reported ForkFailed and kept its connection open; the service then crashed. The
    # next one must not take that connection for a fork still being reported.
    cfd = syscalls.container_create("failed", CONTAINER_NEW_PID_NS)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.connect(service.socket)
        socket.send_fds(s, [protocol.encode(protocol.Fork(keep=1))], [cfd])
        _data, fds, _ = fdpass.recv_fds(s, protocol.MAX_MESSAGE, protocol.MAX_FDS)
        for fd in fds:
            os.close(fd)
        s.send(protocol.encode(protocol.ForkFailed(errno=errno.EPERM)))
        deadline = time.monotonic() + 5
        while syscalls.container_status(cfd)["state"] != "created":
            assert time.monotonic() < deadline, "ForkFailed was not taken"
            time.sleep(0.01)
        restart(service, hard=True)
        t = time.monotonic()
        assert syscalls.container_status(cfd)["state"] == "created"
        assert time.monotonic() - t < 1, "the status waited for a fork that had failed"
        pid = syscalls.fork_into_container(cfd)
        if pid == 0:
            os._exit(7)
        assert child_result(pid) == 7
        assert hung_up(cfd, 5)
    finally:
        s.close()
        os.close(cfd)


def test_first_fork_after_restart_between_create_and_fork(service: Any) -> None:
    """The creator's first fork goes on its create's connection: if the service that
    answered the create is gone, the fork asks the one that answers now."""
    cfd = syscalls.container_create("planned", CONTAINER_NEW_PID_NS | CONTAINER_NEW_NET_NS)
    restart(service, hard=True)
    init = syscalls.fork_into_container(cfd)
    if init == 0:
        os._exit(5 if os.getpid() == 1 else 1)
    assert child_result(init) == 5
    assert hung_up(cfd, 5)
    assert syscalls.container_wait(cfd) == 5 << 8
    os.close(cfd)


def test_container_made_just_before_kill_9_is_kept(service: Any, monkeypatch: Any) -> None:
    """A new container's row is written once create is answered; a crash before that
    loses nothing: the keeper's entry carries the row (as it carries the handle). (The
    write is held back here, so that the crash surely comes first.)"""
    monkeypatch.setenv("CONTAINERFS_STORE_DELAY", "60")
    restart(service, hard=False)
    for _ in range(2):
        cfd = syscalls.container_create("just-made", CONTAINER_NEW_NET_NS | CONTAINER_NEW_PID_NS)
        restart(service, hard=True)  # at once: nothing between the reply and the kill
        assert not hung_up(cfd, 0.2), "a container made before the crash was lost"
        got = syscalls.container_status(cfd)
        assert (got["name"], got["state"]) == ("just-made", "created")
        pid = syscalls.fork_into_container(cfd)
        if pid == 0:
            os._exit(0 if os.getpid() == 1 else 1)
        assert child_result(pid) == 0
        assert hung_up(cfd, 5)
        os.close(cfd)


def test_confinement_set_just_before_kill_9_is_kept(service: Any) -> None:
    """Capabilities set a moment before a crash still confine the init forked after it."""
    cfd = syscalls.container_create("confined", CONTAINER_NEW_PID_NS)
    syscalls.container_set_caps(cfd, 1 << 0)  # CAP_CHOWN only
    restart(service, hard=True)
    r, w = os.pipe()
    pid = syscalls.fork_into_container(cfd)
    if pid == 0:
        with open("/proc/self/status") as f:
            eff = [line.split()[1] for line in f if line.startswith("CapEff:")][0]
        os.write(w, eff.encode())
        os._exit(0)
    os.close(w)
    assert child_result(pid) == 0
    assert int(os.read(r, 64), 16) == 1
    os.close(r)
    os.close(cfd)
