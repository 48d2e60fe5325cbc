"""One request/response exchange with the service over its control socket."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Sequence
from typing import Any

from . import fdpass, protocol
from .constants import DEFAULT_SOCKET


def socket_path() -> str:
    """The control socket: $CONTAINERFS_SOCKET, else the default."""
    return os.environ.get("CONTAINERFS_SOCKET") or DEFAULT_SOCKET


class Connection:
    """A connection to the service; one per call, so sharers of a handle never mix replies."""

    def __init__(self) -> None:
        path = socket_path()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            self.sock.close()
            exc = OSError(errno.ENOSYS,
                          f"no containerfs service at {path} ({e.strerror}); start one with "
                          f"`containerfs serve` (as root) or point CONTAINERFS_SOCKET at it")
            raise exc from None

    def call(self, req: protocol.Request, fds: Sequence[int] = ()) -> tuple[dict[str, Any], list[int]]:
        """Send `req` with `fds`; return the reply and the fds it carried, or raise its OSError."""
        self.send(req, fds)
        return self.receive()

    def send(self, req: protocol.Request, fds: Sequence[int] = ()) -> None:
        data = protocol.encode(req)
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.send(data)

    def receive(self) -> tuple[dict[str, Any], list[int]]:
        data, fds, _flags = fdpass.recv_fds(self.sock, protocol.MAX_MESSAGE, protocol.MAX_FDS)
        if not data:
            for fd in fds:
                os.close(fd)
            raise OSError(errno.EIO, "the containerfs service closed the connection")
        reply = protocol.decode_reply(data)
        if "errno" in reply:
            for fd in fds:
                os.close(fd)
            raise OSError(int(reply["errno"]), str(reply.get("message") or os.strerror(reply["errno"])))
        return reply, fds

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def call(req: protocol.Request, fds: Sequence[int] = ()) -> tuple[dict[str, Any], list[int]]:
    """One request on a fresh connection."""
    with Connection() as conn:
        return conn.call(req, fds)
