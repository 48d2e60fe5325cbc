"""The namespace maker: a process of the service's own that makes fresh namespaces ahead.

Making a network namespace costs ~0.4 ms of kernel time, a copy of the service's mount
namespace less; the service keeps a few of each ready (namespaces.NamespacePool,
MountCopies). Made by a worker thread of the service, that work ran beside the next request
and slowed it (the thread's share of the GIL and of the two CPUs came out of the request's
time, 0.3-0.7 ms a container measured); made here, in a process of its own at nice 10, the
requests of the moment go first and the GIL is not shared.

Protocol (a socketpair, SOCK_SEQPACKET), once the maker has said "ready": the service sends
the namespace types wanted, comma-separated ("uts,ipc,net"; "mnt" alone for a copy of the
service's mount namespace, which comes with its root as "root"); the maker answers with one
fd per name, in that order, or "error <errno>" and no fd. "close" with fds asks it to close
them, with no answer: the last close of a mount namespace (its teardown, ~80 us) is then
paid here, not on the service's event loop. It exits when the service's end closes.

Run as `python -m containerfs.nsmaker FD` by the service (Maker.start); nothing else.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from typing import TYPE_CHECKING

from syscalls import fdpass, linux

from .namespaces import NamespacePool

if TYPE_CHECKING:  # (the maker itself runs without trio: a shorter start)
    import trio

MAX_REQUEST = 64
READY = b"ready"  # its first message, once it has started
CLOSE = b"close"  # the fds that come with it are closed here (no answer)
MAX_DISPOSED = 16
MAKE_TIMEOUT = 10.0  # seconds an answer may take (a network namespace takes ~0.5 ms)
MADE_FRESH = NamespacePool.KINDS  # what a request may ask for beside "mnt"


class Home:
    """Where the maker stands between requests (the service's namespaces and root, as it
    started), and its own /proc/PID/ns directory: every request goes back here, and no fd
    is ever opened through a namespace it made (each one becomes a container's, which its
    processes may change: mounts on /proc, a pivot_root)."""

    def __init__(self) -> None:
        self.ns = {t: os.open(f"/proc/self/ns/{t}", os.O_RDONLY | os.O_CLOEXEC)
                   for t in ("mnt",) + MADE_FRESH}
        self.root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        # (this process has one thread: thread-self is it, for its whole life)
        self.nsdir = os.open("/proc/thread-self/ns", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def open_own(self, names: list[str]) -> list[int]:
        """fds of the namespaces of `names` this process stands in now."""
        fds: list[int] = []
        try:
            for n in names:
                fds.append(os.open(n, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.nsdir))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def back(self, names: list[str]) -> None:
        """Back into the home namespaces of `names` (and root, for "mnt"); a maker that
        cannot come back ends (it would stand in a container's)."""
        try:
            for n in names:
                linux.setns(self.ns[n], linux.NS_FLAGS[n])
            if "mnt" in names:
                os.fchdir(self.root)
                os.chroot(".")
                os.chdir("/")
        except OSError:
            os._exit(70)


def _make(names: list[str], home: Home) -> list[int]:
    """The fds of `names`, made now by this process, which then goes home."""
    if names == ["mnt"]:
        linux.unshare(linux.CLONE_NEWNS)  # a copy of home's: we never stand elsewhere
        try:
            fds = home.open_own(["mnt"])
            try:
                fds.append(os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
            except BaseException:
                os.close(fds[0])
                raise
            return fds
        finally:
            home.back(["mnt"])
    if not names or any(n not in MADE_FRESH for n in names) or len(set(names)) != len(names):
        raise OSError(errno.EINVAL, f"the namespace maker makes none of {names}")
    flags = 0
    for nstype in names:
        flags |= linux.NS_FLAGS[nstype]
    linux.unshare(flags)
    try:
        return home.open_own(names)
    finally:
        home.back(names)


def serve(sock: socket.socket) -> None:
    """Answer the service's requests until it hangs up."""
    home = Home()
    sock.send(READY)
    while True:
        request, fds, _flags, _ = socket.recv_fds(sock, MAX_REQUEST, MAX_DISPOSED)
        if not request:
            return
        for fd in fds:  # (a namespace's last close: its teardown happens here)
            os.close(fd)
        if request == CLOSE:
            continue
        try:
            fds = _make(request.decode("ascii", "replace").split(","), home)
        except OSError as e:
            sock.send(f"error {e.errno or errno.EIO}".encode())
            continue
        try:
            socket.send_fds(sock, [b"ok"], fds)
        finally:
            for fd in fds:
                os.close(fd)


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    # Below the service's requests, but not at the bottom (nice 19, SCHED_IDLE): making a
    # namespace holds kernel locks (rtnl, namespace_sem) that other work waits for.
    os.nice(10)
    try:
        serve(sock)
    except (BrokenPipeError, ConnectionResetError):
        pass


class MakerGone(OSError):
    """The namespace maker is not there (never started, exited, or spoke nonsense)."""


class Maker:
    """The service's end: start the maker, ask it for namespaces without blocking."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: trio.socket.SocketType | None = None
        self.failed = False  # it failed once: namespaces are made elsewhere from then on
        self._raw: socket.socket | None = None
        self._ready = False

    def start(self) -> None:
        import trio

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            # Not a fork of the service: a new program (posix_spawn or vfork, as subprocess
            # does it), which holds nothing of the service but this socket.
            # -P: nothing imported from the service's working directory. A session of its
            # own: a terminal's Ctrl-C is for the service (the maker ends with it).
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "containerfs.nsmaker", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, close_fds=True,
                start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._raw, self._ready = ours, False
        self.sock = trio.socket.from_stdlib_socket(ours)

    def ready(self) -> bool:
        """Whether it has started and can be asked (never blocks). MakerGone if it has
        exited or said something else first."""
        if self._ready:
            return True
        if self._raw is None:
            raise MakerGone(errno.ESRCH, "the namespace maker is not running")
        try:
            first = self._raw.recv(MAX_REQUEST, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError as e:
            raise MakerGone(errno.ESRCH, f"the namespace maker is gone: {e}") from None
        if first != READY:
            raise MakerGone(errno.EPROTO, f"the namespace maker began with {first!r}")
        self._ready = True
        return True

    async def make(self, names: list[str]) -> dict[str, int]:
        """New namespaces of `names` ({"mnt", "root"} for ["mnt"]), as fds the caller owns.
        MakerGone if it is not there, or did not answer within MAKE_TIMEOUT (it is then
        ended: make them elsewhere); the OSError it met making them (EMFILE here included:
        fds it sent that did not fit are dropped). One request at a time."""
        import trio

        if self.sock is None:
            raise MakerGone(errno.ESRCH, "the namespace maker is not running")
        want = names + (["root"] if names == ["mnt"] else [])
        answered = False
        try:
            with trio.move_on_after(MAKE_TIMEOUT):
                await self.sock.send(",".join(names).encode())
                data, anc, flags, _ = await self.sock.recvmsg(
                    MAX_REQUEST, socket.CMSG_SPACE(len(want) * 4), socket.MSG_CMSG_CLOEXEC)
                answered = True
        except (ConnectionError, trio.ClosedResourceError) as e:
            raise MakerGone(errno.ESRCH, f"the namespace maker is gone: {e}") from None
        finally:
            if not answered:  # (timed out or cancelled: its answer would go to the next one)
                self.close()
        if not answered:
            raise MakerGone(errno.ETIMEDOUT, f"the namespace maker did not answer in "
                                             f"{MAKE_TIMEOUT:.0f} s; ended")
        fds = fdpass.fds_from_ancdata(anc)
        if data == b"ok" and len(fds) == len(want):
            return dict(zip(want, fds))
        for fd in fds:
            os.close(fd)
        if data == b"ok" and flags & socket.MSG_CTRUNC:
            raise OSError(errno.EMFILE, "no fd left for the namespaces made ahead")
        words = data.split()
        if len(words) == 2 and words[0] == b"error" and words[1].isdigit():
            raise OSError(int(words[1]), f"the namespace maker: {os.strerror(int(words[1]))}")
        raise MakerGone(errno.EPROTO, f"the namespace maker exited or answered {data!r}")

    def close_ns(self, nstype: str, fd: int) -> None:
        """Close namespace fd `fd` (taken), a mount namespace's last close in the maker if it
        runs (never blocks: if the message does not go at once, closed here)."""
        if nstype == "mnt" and self._ready and self._raw is not None:
            try:
                socket.send_fds(self._raw, [CLOSE], [fd], socket.MSG_DONTWAIT)
            except OSError:
                pass  # (full, or gone: the next request says so)
        os.close(fd)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = self._raw = None
        if self.proc is not None:
            # It holds nothing to save: ended now, never waited for (it would exit on its
            # own once our end is closed, after the request it may be making).
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None


if __name__ == "__main__":
    main()
