"""`containerfs serve`: the trio program that plays the kernel's part."""

from __future__ import annotations

import errno
import logging
import os
import resource
import signal
import socket
import struct
from dataclasses import dataclass

import trio

from . import rundir
from .cgroups import CgroupTree
from .control import serve_control
from .fdstore import FdStore
from .service import Service
from .store import Store

log = logging.getLogger("containerfs")


@dataclass(frozen=True)
class Config:
    socket: str
    runtime_dir: str = "/run/containerfs.d"
    cgroup: str = "containerfs"
    max_per_user: int = 1024
    mount: str = "/run/containerfs"  # the FUSE view; "" for none


async def serve(config: Config) -> None:
    """Run the service until SIGTERM or SIGINT; running containers are left running.

    Refused (OSError EBUSY or EADDRINUSE, naming the directory or socket and the pid that has
    it) while another service holds the runtime directory or answers on the socket; nothing is
    touched then: no keeper contacted, no socket replaced, nothing adopted.
    """
    # Every container costs fds, here and in the keeper (which inherits this): take all the
    # hard limit allows (raising it needs CAP_SYS_RESOURCE).
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.makedirs(config.runtime_dir, mode=0o755, exist_ok=True)
    lock = rundir.hold(config.runtime_dir, rundir.SERVICE_LOCK, "service",
                       "stop that service first, or give this one another --runtime-dir")
    try:
        _check_socket_free(config.socket)
        await _serve_locked(config)
    finally:
        os.close(lock)  # last: the next service may start once everything here is closed


def _check_socket_free(path: str) -> None:
    """EADDRINUSE if something answers at `path`: a service on another runtime directory
    would otherwise take over its clients (a stale socket left by a crash is free)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    probe.setblocking(False)  # a listener with a full backlog must not hold us up
    try:
        probe.connect(path)
        pid, _uid, _gid = struct.unpack(
            "3i", probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        holder = f"pid {pid}"
    except BlockingIOError:
        holder = "a process whose backlog is full"
    except OSError:
        return  # nothing there, or nothing that listens
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"control socket {path} is in use by {holder}; stop that "
                                    "service first, or give this one another --socket")


async def _serve_locked(config: Config) -> None:
    store = Store(os.path.join(config.runtime_dir, "registry.sqlite"))
    cgroups = CgroupTree(config.cgroup)
    fdstore = FdStore(config.runtime_dir)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            service = Service(store, cgroups, nursery, fdstore, max_per_user=config.max_per_user)
            # Named in the request-key.d rule: where the kernel's key requests find us.
            service.keyrings.rules.socket = os.path.abspath(config.socket)
            service.recover()
            nursery.start_soon(service.life.watch_last_close)
            nursery.start_soon(service.life.fill_pool)
            nursery.start_soon(service.reg.flush_store)
            nursery.start_soon(service.reg.ns.unbind_forever)
            nursery.start_soon(service.reg.ns.bind_forever)
            if config.mount:
                from .view.fuse import serve_view  # pyfuse3 only when there is a view
                await nursery.start(serve_view, service, config.mount)
            await nursery.start(serve_control, service, config.socket)
            log.info("serving on %s (cgroups under %s)", config.socket, cgroups.base)
            async for signum in signals:
                log.info("stopping on signal %d", signum)
                break
            nursery.cancel_scope.cancel()
    service.close()
    fdstore.close()
    store.close()
