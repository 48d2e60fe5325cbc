"""Request/response exchanges with the service over its control socket (public on purpose:
the command line and the keyring manager speak to the service through it too)."""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Sequence
from typing import Any

from . import fdpass, protocol, replies
from .replies import R
from .constants import DEFAULT_SOCKET


def socket_path() -> str:
    """The control socket: $CONTAINERFS_SOCKET, else the default."""
    return os.environ.get("CONTAINERFS_SOCKET") or DEFAULT_SOCKET


class Connection:
    """A connection to the service, used by one caller at a time, so that sharers of a handle
    never mix replies."""

    def __init__(self) -> None:
        path = socket_path()
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            self.sock.close()
            exc = OSError(errno.ENOSYS,
                          f"no containerfs service at {path} ({e.strerror}); start one with "
                          f"`containerfs serve` (as root) or point CONTAINERFS_SOCKET at it")
            raise exc from None
        # Who the service takes us for: the kernel recorded these at connect().
        self.identity = (os.getpid(), os.geteuid(), os.getegid(), path)
        self.hung_up = False

    def call(self, req: protocol.Request, fds: Sequence[int] = ()) -> tuple[Any, list[int]]:
        """Send `req` with `fds`; return its reply (a `req.answer`) and the fds it carried, or
        raise the error the service answered."""
        self.send(req, fds)
        return self.receive(req.answer)

    def send(self, req: protocol.Request, fds: Sequence[int] = ()) -> None:
        data = protocol.encode(req)
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.send(data)

    def receive(self, cls: type[R]) -> tuple[R, list[int]]:
        """The next reply, as a `cls`, and its fds; the service's error raised as OSError."""
        data, fds, _flags = fdpass.recv_fds(self.sock, protocol.MAX_MESSAGE, protocol.MAX_FDS)
        if not data:
            for fd in fds:
                os.close(fd)
            self.hung_up = True
            raise OSError(errno.EIO, "the containerfs service closed the connection")
        try:
            reply = replies.decode(data, cls)
        except replies.ProtocolError as e:
            for fd in fds:
                os.close(fd)
            raise OSError(errno.EPROTO, f"a reply from the containerfs service is malformed: "
                                        f"{e}") from None
        if isinstance(reply, replies.ErrorReply):
            for fd in fds:
                os.close(fd)
            raise OSError(reply.errno, reply.message or os.strerror(reply.errno))
        return reply, fds

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Idle connections of this process, reused by call(): a connection costs the service about as
# much as the request itself (accept, a task, epoll registrations). The service knows a peer
# by the credentials and pid the kernel recorded at connect, so a connection is reused only by
# the process, with the credentials, that made it; a forked child never uses its parent's.
_idle: list[Connection] = []
_idle_lock = threading.Lock()
_IDLE_MAX = 4


def _identity() -> tuple[int, int, int, str]:
    return os.getpid(), os.geteuid(), os.getegid(), socket_path()


def _take() -> tuple[Connection, bool]:
    """A connection for one call, and whether it was idle (and so may have gone stale)."""
    me = _identity()
    with _idle_lock:
        while _idle:
            conn = _idle.pop()
            if conn.identity == me:
                return conn, True
            conn.close()
    return Connection(), False


def give_back(conn: Connection) -> None:
    """Keep `conn`, with no exchange under way on it, for this process's next call."""
    with _idle_lock:
        if len(_idle) < _IDLE_MAX and conn.identity == _identity():
            _idle.append(conn)
            return
    conn.close()


def _forget_after_fork() -> None:
    """In a new child: close the parent's idle connections (it must never speak to the service
    with the identity its parent connected with). No lock: another thread of the parent may
    have held it at the fork, and that thread does not exist here."""
    global _idle_lock
    _idle_lock = threading.Lock()
    while _idle:
        _idle.pop().close()


os.register_at_fork(after_in_child=_forget_after_fork)


def call(req: protocol.Request, fds: Sequence[int] = ()) -> tuple[Any, list[int]]:
    """One request and its reply, on an idle connection of this process or a new one."""
    reply, conn = call_holding(req, fds)
    give_back(conn)
    return reply


def call_holding(req: protocol.Request, fds: Sequence[int] = ()
                 ) -> tuple[tuple[Any, list[int]], Connection]:
    """call(), but the connection is the caller's afterwards (to give back, or to fork on)."""
    conn, reused = _take()
    try:
        try:
            conn.send(req, fds)
        except (BrokenPipeError, ConnectionResetError):
            if not reused:
                raise
            # The service that accepted this idle connection is gone (restarted): nothing was
            # delivered, so the request goes again, to the one that answers now.
            conn.close()
            conn = Connection()
            conn.send(req, fds)
    except BaseException:
        conn.close()
        raise
    try:
        reply = conn.receive(req.answer)
    except OSError:
        if conn.hung_up:
            conn.close()
        else:
            give_back(conn)  # an error reply: the exchange is complete
        raise
    except BaseException:  # interrupted before the reply: it must not reach the next call
        conn.close()
        raise
    return reply, conn
