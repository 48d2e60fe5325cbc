"""The creator's side of request_key() interception (contract section 7).

    with intercept(cfd, "user") as requests:
        req = requests.get(timeout=5.0)
        req.instantiate(b"payload")

`requests` is a connection on which the service sends each trapped request, in order, and
nothing else: its fileno() is readable exactly while a request waits to be read. Answers go
over a second connection, with the container handle, like any other call.
"""

from __future__ import annotations

import base64
import errno
import os
import select
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Self

from syscalls import keys, protocol, replies
from syscalls.client import Connection
from syscalls.fdpass import recv_fds
from syscalls.keys import DEFAULT_INTERCEPT_TIMEOUT


@dataclass
class Request:
    """One trapped request_key(): what was asked, by whom (ids as the service sees them)."""
    rid: int
    operation: str
    type: str
    description: str
    callout_info: str
    uid: int
    gid: int
    pid: int
    container: int
    _requests: Requests = field(repr=False)

    def instantiate(self, payload: bytes | str) -> int:
        """Give the requester a key with this payload (owned by the requester); its serial."""
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        reply = self._requests._answer(self.rid, "instantiate",
                                       payload=base64.b64encode(data).decode())
        return reply.serial

    def negate(self, timeout_s: float = 0.0) -> None:
        """The requester gets ENOKEY; so does every request for this key for `timeout_s`."""
        self._requests._answer(self.rid, "negate", timeout_ms=_ms(timeout_s))

    def reject(self, errno_value: int, timeout_s: float = 0.0) -> None:
        """The requester gets `errno_value` (for `timeout_s` more requests, too)."""
        self._requests._answer(self.rid, "reject", errno=int(errno_value),
                               timeout_ms=_ms(timeout_s))


def _ms(seconds: float) -> int:
    if seconds < 0:
        raise OSError(errno.EINVAL, "negative timeout")
    return round(seconds * 1000)


class Requests:
    """The requests trapped in one container, as they come. A context manager; iterable
    under trio with `async for`."""

    def __init__(self, cfd: int, conn: Connection) -> None:
        self._cfd = cfd
        self._conn = conn
        self._answers: Connection | None = None

    def fileno(self) -> int:
        return self._conn.sock.fileno()

    def _read(self) -> Request:
        data, fds, _ = recv_fds(self._conn.sock, protocol.MAX_MESSAGE, protocol.MAX_FDS)
        for fd in fds:
            os.close(fd)
        if not data:
            raise EOFError("no more key requests: the container died, the trap was removed "
                           "or the service stopped")
        try:
            event = replies.decode(data, replies.KeyRequest)
        except replies.ProtocolError as e:
            raise OSError(errno.EPROTO, f"a key request from the service is malformed: {e}") from None
        if isinstance(event, replies.ErrorReply):
            raise OSError(event.errno, event.message)
        return Request(rid=event.rid, operation=event.operation, type=event.type,
                       description=event.description, callout_info=event.callout_info,
                       uid=event.uid, gid=event.gid, pid=event.pid, container=event.container,
                       _requests=self)

    def get(self, timeout: float | None = None) -> Request:
        """The next request; TimeoutError if none comes within `timeout` seconds."""
        poller = select.poll()
        poller.register(self.fileno(), select.POLLIN | select.POLLHUP)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if poller.poll(None if left is None else left * 1000):
                return self._read()
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"no key request came in {timeout} s")

    def __aiter__(self) -> AsyncIterator[Request]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Request]:
        import trio
        while True:
            await trio.lowlevel.wait_readable(self.fileno())
            try:
                yield self._read()
            except EOFError:
                return

    def _answer(self, rid: int, action: str, **fields: Any) -> replies.Instantiated:
        if self._answers is None:
            self._answers = Connection()
        reply: replies.Instantiated = self._answers.call(
            protocol.KeyAnswer(rid=rid, action=action, **fields), [self._cfd])[0]
        return reply

    def close(self) -> None:
        """Stop receiving; a trap made by intercept() is gone when this returns."""
        sock = self._conn.sock
        try:
            sock.shutdown(socket.SHUT_WR)
            # The service hangs up once it has removed the trap (and failed what waited).
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            deadline = time.monotonic() + 5
            while poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
                data, fds, _ = recv_fds(sock, protocol.MAX_MESSAGE, protocol.MAX_FDS)
                for fd in fds:
                    os.close(fd)
                if not data:
                    break
        except OSError:
            pass
        self._conn.close()
        if self._answers is not None:
            self._answers.close()
            self._answers = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def intercept(cfd: int, key_type: str, *, timeout: float = DEFAULT_INTERCEPT_TIMEOUT,
              dest_keyring: int = 0) -> Requests:
    """Trap request_key() calls for `key_type` keys ("*": any) made in the container that
    are not found; the trap lives until the returned Requests is closed.

    A request not answered within `timeout` seconds fails with ENOKEY. With `dest_keyring`,
    a record of each request is also linked (inside a keyring of the service's) into it.
    EEXIST if the type is trapped already; EPERM from inside the container.
    """
    return Requests(cfd, keys.open_intercept(cfd, key_type, timeout=timeout,
                                             dest_keyring=dest_keyring))


def listen(cfd: int) -> Requests:
    """The requests of the traps set with keyctl_container_intercept() (those waiting now,
    then each new one)."""
    return Requests(cfd, keys.open_intercept(cfd, None))
