"""Who owns a runtime directory, and sockets that are never seen before they listen.

A runtime directory (registry, keeper socket, request-key rule, registry keyring) serves one
service and one keeper at a time. Two services on one directory adopted each other's containers
through the keeper, and the one that stopped first destroyed the registry keyring the other
still used. So each of the two holds a lock for its whole life: `service.pid` and `keeper.pid`,
each holding its process's pid. The keeper's lock is its own because the keeper outlives a
service on purpose (a restarted service adopts the containers it kept).

The locks are POSIX record locks: the kernel releases one when its process exits, kill -9
included, so a restart after a crash just works, and it tells who holds one (F_GETLK), so a
refusal can name a pid that is true, not one read from a file a crash left behind.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket

from syscalls import linux

SERVICE_LOCK = "service.pid"
KEEPER_LOCK = "keeper.pid"
# The keeper's exit status when another keeper holds the directory: its starter then connects
# to that one instead (it may be about to listen).
KEEPER_BUSY_EXIT = 75  # EX_TEMPFAIL
_SUN_PATH_MAX = 107  # sizeof(sun_path) less the NUL


def hold(runtime_dir: str, name: str, holder: str, advice: str) -> int:
    """Lock `runtime_dir/name` for the rest of this process's life and write our pid in it;
    return its fd, to be kept open (closing any fd of that file lets the lock go).

    EBUSY, naming the directory and the pid of the `holder` that has it, if one does; nothing
    else is touched then.
    """
    path = os.path.join(runtime_dir, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        pid = linux.lock_whole_file(fd)
    except BaseException:
        os.close(fd)
        raise
    if pid is not None:
        os.close(fd)  # we hold no lock on it: closing lets nothing go
        raise OSError(errno.EBUSY, f"runtime directory {runtime_dir} is in use by the {holder} "
                                   f"with pid {pid or '(not visible here)'}; {advice}")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def listen_unix(path: str, mode: int, backlog: int) -> tuple[socket.socket, tuple[int, int]]:
    """A SOCK_SEQPACKET socket listening at `path` (replacing what is there), and the path's
    (st_dev, st_ino) for unlink_if_ours.

    `path` never names a socket that does not listen yet: the socket is bound under a temporary
    name in the same directory, made listening and given `mode`, then renamed into place. A
    client that finds the path can connect (one that came a moment earlier got ENOENT, or the
    stale socket of a stopped service: "no service", either way, never a false refusal).
    """
    where = os.path.dirname(path)
    tmp = os.path.join(where, f".{secrets.token_hex(4)}.tmp")
    room = _SUN_PATH_MAX - len(os.fsencode(tmp)) + len(os.fsencode(where))
    if len(os.fsencode(where)) > room:
        raise OSError(errno.ENAMETOOLONG,
                      f"the directory of socket {path} is too long for a temporary name beside "
                      f"it: keep it to {room} bytes")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.bind(tmp)
        try:
            sock.listen(backlog)
            os.chmod(tmp, mode)
            st = os.stat(tmp)
            os.rename(tmp, path)
        except BaseException:
            _unlink(tmp)
            raise
    except BaseException:
        sock.close()
        raise
    return sock, (st.st_dev, st.st_ino)


def unlink_if_ours(path: str, ident: tuple[int, int]) -> None:
    """Remove `path` if it is still the socket listen_unix made (not one put there since)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) == ident:
        _unlink(path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
