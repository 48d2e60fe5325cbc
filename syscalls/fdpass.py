"""Receiving fds over SCM_RIGHTS, close-on-exec from the first instant.

CPython 3.11's socket.recv_fds ignores its flags argument, so it cannot ask for
MSG_CMSG_CLOEXEC; these helpers do.
"""

from __future__ import annotations

import array
import errno
import os
import socket


def fds_from_ancdata(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds carried in a recvmsg() ancillary list."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


def recv_fds(sock: socket.socket, bufsize: int, maxfds: int) -> tuple[bytes, list[int], int]:
    """One message and its fds (close-on-exec); returns (data, fds, msg_flags)."""
    data, anc, flags, _ = sock.recvmsg(bufsize, socket.CMSG_SPACE(maxfds * 4),
                                       socket.MSG_CMSG_CLOEXEC)
    fds = fds_from_ancdata(anc)
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise OSError(errno.EMSGSIZE, "fds were truncated")
    return data, fds, flags
