"""The control socket: one trio task per connection, requests dispatched to the Service.

A connection's peer credentials come from the kernel (SO_PEERCRED at connect), never from the
message. Bad bytes get an error reply and the connection is dropped; nothing a client sends
can stop the service from serving others.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import socket
import struct
from typing import Any

import trio

from syscalls import fdpass, protocol

from . import rundir
from .service import Container, Peer, Service
from .states import State

log = logging.getLogger("containerfs")

_UCRED = struct.Struct("3i")
_SO_PEERPIDFD = 77


def _peer(sock: trio.socket.SocketType) -> Peer:
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return Peer(pid=pid, uid=uid, gid=gid)


def _peer_pidfd(sock: trio.socket.SocketType) -> int:
    (fd,) = struct.unpack("i", sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD, 4))
    return int(fd)


async def _send(sock: trio.socket.SocketType, reply: dict[str, Any], fds: list[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    await sock.sendmsg([protocol.encode(reply)], anc)


# How long a request about a container waits for a fork in progress elsewhere to report its
# process (the report is normally already queued: the forking caller does not wait for it).
SETTLE_TIMEOUT = 2.0


class Connection:
    """One client connection and what it has in progress (a fork between Fork and Started)."""

    def __init__(self, service: Service, sock: trio.socket.SocketType,
                 forking: tuple[Container, str] | None = None, keep_key: str = "") -> None:
        self.service = service
        self.sock = sock
        self.peer = _peer(sock)
        self.forking = forking
        # The container this connection forked into: its processes may hand over seccomp
        # listeners here (KeyListener), even after Started.
        self.fork_container: Container | None = forking[0] if forking else None
        # Under this key the keeper holds our socket while a fork is reported on it.
        self.keep_key = keep_key

    async def run(self) -> None:
        try:
            while True:
                # While the keeper holds this socket, a report of a fork (Started or
                # ForkFailed) is only peeked at, and taken off the socket once recorded: a
                # crash in between leaves it there for the next service.
                peeking = bool(self.keep_key)
                data, fds, flags = await self._receive(socket.MSG_PEEK if peeking else 0)
                if not data and not fds:
                    return  # the client hung up
                out: list[int] = []
                req: protocol.Request | None = None
                try:
                    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                        raise protocol.ProtocolError("message or its fds were truncated")
                    req = protocol.decode_request(data)
                    if peeking and not isinstance(req, (protocol.Started, protocol.ForkFailed)):
                        await self._consume()
                        peeking = False
                    one_or_none = isinstance(req, protocol.Kill) and len(fds) == 1
                    if len(fds) != req.nfds and not one_or_none:
                        raise protocol.ProtocolError(
                            f"{req.op} takes {req.nfds} fd(s), got {len(fds)}")
                    reply, out = await self.dispatch(req, fds)
                except protocol.ProtocolError as e:
                    await _send(self.sock, protocol.error_reply(errno.EINVAL, f"bad request: {e}"), [])
                    return
                except OSError as e:
                    reply = protocol.error_reply(e.errno or errno.EIO, e.strerror or str(e))
                except Exception as e:  # a bug must cost one request, never the service
                    log.exception("internal error serving %s from pid %d", data[:80], self.peer.pid)
                    reply = protocol.error_reply(errno.EIO, f"containerfs internal error: {e!r}")
                finally:
                    for fd in fds:
                        os.close(fd)
                    if peeking:
                        if isinstance(req, protocol.ForkFailed):
                            # No process, so nothing more can come that must outlive a
                            # crash: the keeper lets go first, so a restarted service
                            # either reads this report again or never sees the connection.
                            self.service.fdstore.drop(self.keep_key)
                            self.keep_key = ""
                        await self._consume()
                if reply is None or req is not None and req.one_way:
                    if reply is not None and "errno" in reply:  # an error nobody would read
                        log.info("one-way %s from pid %d failed: %s", req.op if req else "?",
                                 self.peer.pid, reply.get("message"))
                    continue
                try:
                    await _send(self.sock, reply, out)
                finally:
                    self.after_send(out)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            log.debug("connection from pid %d dropped: %s", self.peer.pid, e)
        except trio.Cancelled:
            # The service is stopping: a report still unread stays with the keeper, for the
            # next service (see Service.take_pending_forks); nothing is given up here.
            if self.keep_key:
                self.forking, self.keep_key = None, ""
            raise
        finally:
            if self.forking:
                self.service.abort_fork(*self.forking)
                self.service.return_intermediate(self.peer)
            if self.keep_key:
                self.service.fdstore.drop(self.keep_key)
            self.sock.close()

    async def _receive(self, flags: int) -> tuple[bytes, list[int], int]:
        data, anc, msg_flags, _ = await self.sock.recvmsg(
            protocol.MAX_MESSAGE, socket.CMSG_SPACE(protocol.MAX_FDS * 4),
            socket.MSG_CMSG_CLOEXEC | flags)
        return data, fdpass.fds_from_ancdata(anc), msg_flags

    async def _consume(self) -> None:
        """Take the message peeked at off the socket (its fds were received with the peek)."""
        _data, fds, _flags = await self._receive(0)
        for fd in fds:
            os.close(fd)

    async def _container(self, fd: int) -> Container:
        """The container behind handle `fd`, once a fork into it elsewhere has reported and
        an exit of its init has been dealt with."""
        c = self.service.lookup(fd)
        if c.state == State.STARTING and (self.forking is None or self.forking[0] is not c):
            with trio.move_on_after(SETTLE_TIMEOUT):
                await c.started.wait()
        if self.service.init_gone(c):
            await self.service.init_exited(c)
        return c

    def after_send(self, out: list[int]) -> None:
        """Close what was only lent to the reply; a new handle's reader now lives elsewhere."""
        for fd in out:
            c = self.service.by_pipe.get(_pipe_key(fd))
            os.close(fd)
            if c is not None:
                self.service.watch_handle(c)

    async def dispatch(self, req: protocol.Request,
                       fds: list[int]) -> tuple[dict[str, Any] | None, list[int]]:
        """Do one request; return the reply (None for a one-way message) and fds to send."""
        svc = self.service
        if isinstance(req, protocol.Create):
            pidfd = _peer_pidfd(self.sock)
            try:
                raw = req.name.encode("utf-8", "surrogateescape")
                c, rfd = await svc.create(self.peer, pidfd, raw, req.flags)
            finally:
                os.close(pidfd)
            try:
                plan = svc.creator_plan(self.peer, c) if req.plan else None
            except OSError as e:  # the plan is only a head start: the container stands
                log.warning("container %d: no plan of its first fork: %s", c.id, e)
                plan = None
            if plan is not None:
                return {"id": c.id, "plan": plan[0]}, [rfd, *plan[1]]
            return {"id": c.id}, [rfd]
        if isinstance(req, protocol.Fork):
            if self.fork_container is not None:
                # One fork per connection: the keeper's record of it names that fork.
                raise protocol.ProtocolError("a connection forks once")
            c = await self._container(fds[0])
            reply, ns_fds = await svc.begin_fork(self.peer, c)
            self.forking = (c, reply["role"])
            self.fork_container = c
            if req.keep:
                # Before the reply: whatever the caller reports from now on outlives a crash.
                self.keep_key = svc.fork_key(c, reply["role"])
                svc.fdstore.put(self.keep_key, {"s": self.sock.fileno()})
            return reply, ns_fds
        if isinstance(req, (protocol.Started, protocol.ForkFailed)):
            if not self.forking:
                raise protocol.ProtocolError(f"{req.op} without a fork")
            forking, self.forking = self.forking, None
            try:
                if isinstance(req, protocol.ForkFailed):
                    svc.abort_fork(*forking)
                    return None, []
                root_report = isinstance(req, protocol.StartedNoReply) and self.peer.uid == 0
                pid = svc.finish_fork(forking[0], forking[1], os.dup(fds[0]),
                                      req.pid if root_report else 0)
            finally:
                svc.return_intermediate(self.peer)
            return {"pid": pid}, []
        if isinstance(req, protocol.Status):
            return svc.describe(await self._container(fds[0])), []
        if isinstance(req, protocol.Kill):
            if fds:
                c = svc.lookup(fds[0])  # a kill during a fork waits for its report itself
            elif (found := svc.containers.get(req.id)) is not None:
                c = found
            else:
                raise OSError(errno.ESRCH, f"no container with id {req.id}")
            svc.kill_by(self.peer, c)
            return {}, []
        if isinstance(req, protocol.NetNs):
            return svc.netns_fds(self.peer, await self._container(fds[0]))
        if isinstance(req, protocol.List):
            rows = [svc.describe(c) for c in svc.containers.values()
                    if self.peer.uid == 0 or c.owner == self.peer.uid]
            return {"containers": rows}, []
        if isinstance(req, protocol.Root):
            return {}, svc.root_fd(svc.lookup(fds[0]))
        if isinstance(req, protocol.SetRoot):
            await svc.set_root(self.peer, await self._container(fds[0]), fds[1])
            return {}, []
        if isinstance(req, protocol.MountAt):
            c = await self._container(fds[0])
            await svc.mount_at(self.peer, c, fds[1], req.path, bool(req.proc))
            return {}, []
        if isinstance(req, protocol.FsNamespaces):
            return svc.fs_namespaces(self.peer, await self._container(fds[0]))
        if isinstance(req, protocol.Open):
            return {}, [svc.open_handle(self.peer, req.id)]
        if isinstance(req, protocol.KEY_REQUESTS):
            if req.nfds and not isinstance(req, protocol.KeyListener):
                await self._container(fds[0])  # its first fd is the handle: settle it
            return await svc.keyrings.dispatch(self, req, fds)
        raise protocol.ProtocolError(f"unhandled op {req.op}")


def _pipe_key(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


async def _serve_connection(connection: Connection) -> None:
    """Serve one connection until it ends: a bug that escapes its own handling costs that
    connection (closed, its fork undone), never the service and every other client."""
    try:
        await connection.run()
    except Exception:
        log.exception("connection from pid %d failed; dropped", connection.peer.pid)


async def serve_control(service: Service, path: str,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on `path` (usable by every local user, as a system call is) until cancelled.

    The path appears already listening (a client never finds it and is refused), and goes
    with the service unless another socket has taken its place."""
    listener, ident = rundir.listen_unix(path, 0o666, 512)
    sock = trio.socket.from_stdlib_socket(listener)
    task_status.started()
    try:
        async with trio.open_nursery() as nursery:
            for key, fd, c, role in service.take_pending_forks():
                # A fork that was being reported when the last service stopped: read on.
                nursery.start_soon(_serve_connection, Connection(
                    service, trio.socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_SEQPACKET),
                    (c, role), key))
                os.close(fd)
            while True:
                conn, _ = await sock.accept()
                try:
                    connection = Connection(service, conn)
                except OSError:
                    conn.close()
                    continue
                nursery.start_soon(_serve_connection, connection)
    finally:
        sock.close()
        rundir.unlink_if_ours(path, ident)
