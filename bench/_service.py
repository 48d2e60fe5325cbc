"""A service for a benchmark: the one CONTAINERFS_SOCKET names, or a fresh one of our own."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class ServiceInfo:
    """Where a benchmark's service listens, and its processes (None when not known: a
    service named by CONTAINERFS_SOCKET has its keeper found only through
    CONTAINERFS_RUNTIME_DIR, default /run/containerfs.d)."""
    socket: str
    pid: int | None
    keeper_pid: int | None


def _peer_pid(sock: str) -> int | None:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.connect(sock)
        pid, _uid, _gid = struct.unpack("3i", probe.getsockopt(socket.SOL_SOCKET,
                                                               socket.SO_PEERCRED, 12))
        return int(pid)
    except OSError:
        return None
    finally:
        probe.close()


def _pid_file(path: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            return int(f.read())
    return None


@contextlib.contextmanager
def running_service() -> Iterator[str]:
    with started_service() as info:
        yield info.socket


@contextlib.contextmanager
def started_service(profile: str | None = None, view: str = "") -> Iterator[ServiceInfo]:
    """A service for the duration: the one CONTAINERFS_SOCKET names, else our own in a
    temporary runtime directory, without the FUSE view unless `view` names where to mount it
    (the default, /run/containerfs, may be another service's). `profile`: a path where our own service
    writes a cProfile of its main thread when it stops."""
    if os.environ.get("CONTAINERFS_SOCKET"):
        sock = os.environ["CONTAINERFS_SOCKET"]
        rundir = os.environ.get("CONTAINERFS_RUNTIME_DIR", "/run/containerfs.d")
        yield ServiceInfo(sock, _peer_pid(sock), _pid_file(os.path.join(rundir, "keeper.pid")))
        return
    where = tempfile.mkdtemp(prefix="cfs-bench-")
    sock = os.path.join(where, "cfs.sock")
    state = os.path.join(where, "state")
    prefix = [sys.executable] + (["-m", "cProfile", "-o", profile] if profile else [])
    proc = subprocess.Popen(prefix + ["-m", "containerfs", "serve", "--socket", sock,
                                      "--runtime-dir", state, "--mount", view,
                                      "--cgroup", f"cfs-bench-{os.getpid()}", "--log-level", "warning"])
    try:
        wait_for(sock, proc, "the service")
        os.environ["CONTAINERFS_SOCKET"] = sock
        yield ServiceInfo(sock, proc.pid, _pid_file(os.path.join(state, "keeper.pid")))
    finally:
        os.environ.pop("CONTAINERFS_SOCKET", None)
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
            with open(os.path.join(state, "keeper.pid")) as f:
                os.kill(int(f.read()), signal.SIGKILL)
        from containerfs.cgroups import CgroupTree
        CgroupTree(f"cfs-bench-{os.getpid()}").remove_all()
        shutil.rmtree(where, ignore_errors=True)


def wait_for(sock: str, proc: subprocess.Popen[bytes], what: str) -> None:
    """Until the service `proc` answers at `sock` (RuntimeError naming `what` if it exits)."""
    while True:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(sock)
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.02)
        finally:
            probe.close()
