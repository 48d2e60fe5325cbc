"""The runtime's commands on a container that exists: start, state, kill, delete, pause,
resume, ps, exec, and run's waiting; each checks the container is still the one its state
names (state.py) before acting."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from typing import Any

import syscalls

from . import console, outside, state
from .config import OciError, Process
from .state import State


def _living(root: str, cid: str, socket_path: str | None) -> tuple[State, str, int | None]:
    st = state.load(root, cid)
    state.use_socket(st, socket_path)
    status, cfd = state.status_of(root, st)
    return st, status, cfd


def _close(cfd: int | None) -> None:
    if cfd is not None:
        os.close(cfd)


def start(root: str, cid: str, socket_path: str | None) -> None:
    st, status, cfd = _living(root, cid, socket_path)
    _close(cfd)
    if status == "stopped":
        raise OciError("cannot start a container that has stopped")
    if status != "created":
        raise OciError("cannot start an already running container")
    path = state.fifo_path(root, cid)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise OciError("cannot start an already running container") from None
    except OSError as e:
        if e.errno == errno.ENXIO:  # no reader: init is gone
            raise OciError("cannot start a container that has stopped") from None
        raise
    try:
        os.unlink(path)  # first: a second start finds no fifo
        os.write(fd, b"0")
    finally:
        os.close(fd)
    if st.hooks.get("poststart"):
        try:
            outside.run_hooks(st.hooks["poststart"], state.oci_state(st, "running"),
                              "poststart")
        except OciError as e:  # runc warns only: the container runs
            print(f"containerfs-oci: warning: {e}", file=sys.stderr)


def show_state(root: str, cid: str, socket_path: str | None) -> dict[str, Any]:
    st, status, cfd = _living(root, cid, socket_path)
    _close(cfd)
    return state.oci_state(st, status)


def parse_signal(text: str) -> int:
    name = text.upper()
    if name.isdigit():
        return int(name)
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise OciError(f"unknown signal {text!r}") from None


def kill(root: str, cid: str, sig: int, all_procs: bool, socket_path: str | None) -> None:
    st, status, cfd = _living(root, cid, socket_path)
    if status == "stopped" or cfd is None:
        raise OciError("container not running")
    try:
        if all_procs:
            # A pidfd opened before a listing that still names its pid is that member: a
            # pid recycled in between would leave the pidfd on a dead process (ESRCH).
            pidfds: dict[int, int] = {}
            try:
                for outer, _inner in syscalls.container_pids(cfd):
                    try:
                        pidfds[outer] = os.pidfd_open(outer)
                    except OSError:
                        pass  # gone meanwhile
                members = {outer for outer, _inner in syscalls.container_pids(cfd)}
                for pid, pfd in pidfds.items():
                    if pid in members:
                        try:
                            signal.pidfd_send_signal(pfd, sig)
                        except ProcessLookupError:
                            pass
            finally:
                for pfd in pidfds.values():
                    os.close(pfd)
            return
        init = state.init_pidfd(st)
        if init is None:
            raise OciError("container not running")
        try:
            signal.pidfd_send_signal(init, sig)
        except ProcessLookupError:
            raise OciError("container not running") from None
        finally:
            os.close(init)
    finally:
        os.close(cfd)


def delete(root: str, cid: str, force: bool, socket_path: str | None) -> None:
    try:
        st, status, cfd = _living(root, cid, socket_path)
    except OciError:
        if force and not os.path.exists(os.path.join(root, state.check_id(cid), "state.json")):
            state.remove(root, cid)  # a create that died half-way leaves a bare directory
            return
        raise
    try:
        if status not in ("stopped", "created") and not force:
            raise OciError(f"cannot delete container {cid} that is not stopped: {status}")
        if cfd is not None:
            try:
                syscalls.container_kill(cfd)
            except OSError as e:
                if e.errno not in (errno.ECANCELED, errno.ESRCH):
                    raise
            if not outside.wait_dead(cfd):
                raise OciError(f"container {cid} did not die within 10 s of SIGKILL")
    finally:
        _close(cfd)
    state.remove(root, cid)
    if st.hooks.get("poststop"):
        try:
            outside.run_hooks(st.hooks["poststop"], state.oci_state(st, "stopped"), "poststop")
        except OciError as e:
            print(f"containerfs-oci: warning: {e}", file=sys.stderr)


def pause(root: str, cid: str, resume: bool, socket_path: str | None) -> None:
    _st, status, cfd = _living(root, cid, socket_path)
    try:
        if resume:
            if status != "paused" or cfd is None:
                raise OciError("container not paused")
            syscalls.container_thaw(cfd)
        else:
            if status not in ("running", "created") or cfd is None:
                raise OciError("container not running")
            syscalls.container_freeze(cfd)
    finally:
        _close(cfd)


def ps(root: str, cid: str, fmt: str, ps_args: list[str], socket_path: str | None) -> str:
    _st, status, cfd = _living(root, cid, socket_path)
    if cfd is None:
        raise OciError("container not running")
    try:
        pids = [outer for outer, _inner in syscalls.container_pids(cfd)]
    finally:
        os.close(cfd)
    if fmt == "json":
        return json.dumps(pids)
    if fmt != "table":
        raise OciError(f"invalid format option {fmt!r}: table or json")
    res = subprocess.run(["ps", *(ps_args or ["-ef"])], capture_output=True, text=True)
    if res.returncode != 0:
        raise OciError(f"ps: {res.stderr.strip()}")
    lines = res.stdout.splitlines()
    if not lines:
        return ""
    try:
        column = lines[0].split().index("PID")
    except ValueError:
        raise OciError("couldn't find PID field in ps output") from None
    keep = [lines[0]]
    for line in lines[1:]:
        fields = line.split()
        if len(fields) > column and fields[column].isdigit() and int(fields[column]) in pids:
            keep.append(line)
    return "\n".join(keep)


def exec_process(root: str, cid: str, proc: Process, *, detach: bool, pid_file: str | None,
                 console_socket: str | None, preserve_fds: int,
                 socket_path: str | None, pidfd_socket: str | None = None) -> int:
    st, status, cfd = _living(root, cid, socket_path)
    if status == "stopped" or cfd is None:
        raise OciError("cannot exec in a stopped container")
    if status == "paused":
        os.close(cfd)
        raise OciError("cannot exec in a paused container (resume it first)")
    if proc.terminal and detach and not console_socket:
        os.close(cfd)
        raise OciError("cannot allocate tty if runc will detach without setting console socket")
    try:
        made = outside.exec_in(st, cfd, proc, console_socket=console_socket,
                               pid_file=pid_file, preserve_fds=preserve_fds,
                               pidfd_socket=pidfd_socket)
    finally:
        os.close(cfd)
    if detach:
        if made.master >= 0:
            os.close(made.master)
        return 0
    return wait_for(made)


def wait_for(made: outside.Made) -> int:
    """Forward signals to the process, relay its terminal if we hold it, and return its
    exit code (128+N for signal N), as runc's foreground run and exec do."""
    pfd = os.pidfd_open(made.pid)

    def forward(sig: int, _frame: Any) -> None:
        try:
            signal.pidfd_send_signal(pfd, sig)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, forward)
    try:
        if made.master >= 0:
            console.relay(made.master)
        _, status = os.waitpid(made.pid, 0)
    finally:
        os.close(pfd)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code
