"""The control socket: one trio task per connection, requests dispatched to the Service.

A connection's peer credentials come from the kernel (SO_PEERCRED at connect), never from the
message. Bad bytes get an error reply and the connection is dropped; nothing a client sends
can stop the service from serving others.
"""

from __future__ import annotations

import array
import collections
import errno
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from syscalls import fdpass, protocol
from syscalls.fd import Fd
from syscalls.replies import ContainerList, Created, ErrorReply, Reply, Reported

from . import rundir
from .forking import Planned
from .process import Peer
from .record import Container
from .service import Service
from .states import State

log = logging.getLogger("containerfs")

_UCRED = struct.Struct("3i")
_SO_PEERPIDFD = 77


def _peer(sock: trio.socket.SocketType) -> Peer:
    """The connecting process's credentials and a pidfd of it (the caller owns the pidfd;
    -1 if that process is gone already: then nothing is done on its pid)."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    try:
        (pidfd,) = struct.unpack("i", sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD, 4))
    except OSError as e:
        if e.errno != errno.ESRCH:
            raise
        pidfd = -1
    return Peer(pid=pid, uid=uid, gid=gid, pidfd=Fd(pidfd))


async def _send(sock: trio.socket.SocketType, reply: Reply, fds: list[int]) -> None:
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
        # The forked process's seccomp listener was taken: a connection hands over one.
        self.listener_taken = False
        # The fork plan create sent on this connection.
        self.plan_made: Planned | None = None

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
                    if e.errno in (errno.EMFILE, errno.ENFILE):  # ours, not the caller's
                        e = OSError(errno.EAGAIN, f"the service is out of fds ({e.strerror}); "
                                                  "try again later")
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
                            self.service.reg.fdstore.drop(self.keep_key)
                            self.keep_key = ""
                        await self._consume()
                if reply is None or req is not None and req.one_way:
                    if isinstance(reply, ErrorReply):  # an error nobody would read
                        log.info("one-way %s from pid %d failed: %s", req.op if req else "?",
                                 self.peer.pid, reply.message)
                    continue
                try:
                    try:
                        await _send(self.sock, reply, out)
                    except protocol.ProtocolError as e:  # too large a reply: say so instead
                        await _send(self.sock, protocol.error_reply(
                            errno.EMSGSIZE, f"the reply to {req.op if req else '?'} is too "
                            f"large to send ({e})"), [])
                finally:
                    self.after_send(out)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            log.debug("connection from pid %d dropped: %s", self.peer.pid, e)
        except trio.Cancelled:
            # The service is stopping: a report still unread stays with the keeper, for the
            # next service (see Forks.take_pending); nothing is given up here.
            if self.keep_key:
                self.forking, self.keep_key = None, ""
            raise
        finally:
            if self.forking:
                self.service.forks.abort(*self.forking)
                self.service.forks.return_intermediate(self.peer)
            if self.keep_key:
                self.service.reg.fdstore.drop(self.keep_key)
            self.sock.close()
            self.peer.pidfd.close()

    def close(self) -> None:
        """Close a connection never served (its run() closes the others)."""
        self.sock.close()
        self.peer.pidfd.close()

    async def refuse(self, error: OSError) -> None:
        """Answer the first request with `error` (waiting a second at most) and close.

        Its request is read first: a connection closed with a request unread would make the
        client's recv() fail with ECONNRESET rather than read the answer."""
        self.peer.pidfd.close()
        try:
            with trio.move_on_after(REFUSAL_WAIT):
                data, fds, _flags = await self._receive(0)
                for fd in fds:
                    os.close(fd)
                if data:
                    await _send(self.sock, protocol.error_reply(
                        error.errno or errno.EAGAIN, str(error.strerror)), [])
        except OSError:
            pass  # gone already: closing says enough
        finally:
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
        c = self.service.reg.lookup(fd)
        if c.state == State.STARTING and (self.forking is None or self.forking[0] is not c):
            with trio.move_on_after(SETTLE_TIMEOUT):
                await c.started.wait()
        if self.service.life.init_gone(c):
            await self.service.life.init_exited(c)
        return c

    def after_send(self, out: list[int]) -> None:
        """Close what was only lent to the reply; a new handle's reader now lives elsewhere."""
        for fd in out:
            c = self.service.reg.by_pipe.get(_pipe_key(fd))
            os.close(fd)
            if c is not None:
                self.service.reg.watch_handle(c)

    async def dispatch(self, req: protocol.Request, fds: list[int]) -> Answer:
        """Do one request; return the reply (None for a one-way message) and fds to send."""
        if isinstance(req, protocol.KEY_REQUESTS):
            if req.nfds and not isinstance(req, protocol.KeyListener):
                await self._container(fds[0])  # its first fd is the handle: settle it
            return await self.service.keyrings.dispatch(self, req, fds)
        handler = _HANDLERS.get(type(req))
        if handler is None:
            raise protocol.ProtocolError(f"unhandled op {req.op}")
        return await handler(self, req, fds)

    # ---- one handler per request type (see _HANDLERS) -----------------------------------

    async def _create(self, req: protocol.Create, fds: list[int]) -> Answer:
        svc = self.service
        raw = req.name.encode("utf-8", "surrogateescape")
        c, rfd = await svc.life.create(self.peer, raw, req.flags)
        try:
            plan = svc.forks.creator_plan(self.peer, c) if req.plan else None
        except OSError as e:  # the plan is only a head start: the container stands
            log.warning("container %d: no plan of its first fork: %s", c.id, e)
            plan = None
        if plan is not None:
            self.plan_made = (c.id, svc.forks.plan_key(self.peer, c, "init"), plan[0].fds)
            return Created(c.id, plan=plan[0]), [rfd, *plan[1]]
        return Created(c.id), [rfd]

    async def _fork(self, req: protocol.Fork, fds: list[int]) -> Answer:
        svc = self.service
        if self.fork_container is not None:
            # One fork per connection: the keeper's record of it names that fork.
            raise protocol.ProtocolError("a connection forks once")
        c = await self._container(fds[0])
        reply, ns_fds = await svc.forks.begin(self.peer, c,
                                              self.plan_made if req.planned else None)
        self.forking = (c, reply.role)
        self.fork_container = c
        if req.keep:
            # Before the reply: whatever the caller reports from now on outlives a crash.
            self.keep_key = svc.forks.key(c, reply.role)
            svc.reg.fdstore.put(self.keep_key, {"s": self.sock.fileno()})
        return reply, ns_fds

    async def _reported(self, req: protocol.Started | protocol.ForkFailed,
                        fds: list[int]) -> Answer:
        forks = self.service.forks
        if not self.forking:
            raise protocol.ProtocolError(f"{req.op} without a fork")
        forking, self.forking = self.forking, None
        try:
            if isinstance(req, protocol.ForkFailed):
                forks.abort(*forking)
                return None, []
            root_report = isinstance(req, protocol.StartedNoReply) and self.peer.uid == 0
            pid = forks.finish(forking[0], forking[1], os.dup(fds[0]),
                               req.pid if root_report else 0)
        finally:
            forks.return_intermediate(self.peer)
        return Reported(pid), []

    async def _status(self, req: protocol.Status, fds: list[int]) -> Answer:
        return self.service.reg.describe(await self._container(fds[0])), []

    async def _kill(self, req: protocol.Kill, fds: list[int]) -> Answer:
        reg = self.service.reg
        if fds:
            c = reg.lookup(fds[0])  # a kill during a fork waits for its report itself
        elif (found := reg.containers.get(req.id)) is not None:
            c = found
        else:
            raise OSError(errno.ESRCH, f"no container with id {req.id}")
        self.service.life.kill_by(self.peer, c)
        return Reply(), []

    async def _netns(self, req: protocol.NetNs, fds: list[int]) -> Answer:
        return self.service.fs.netns_fds(self.peer, await self._container(fds[0]))

    async def _list(self, req: protocol.List, fds: list[int]) -> Answer:
        reg = self.service.reg
        ids = sorted(cid for cid, c in reg.containers.items()
                     if cid > req.after and (self.peer.uid == 0 or c.owner == self.peer.uid))
        rows = [reg.describe(reg.containers[cid]) for cid in ids[:LIST_PAGE]]
        return ContainerList(rows, more=len(ids) > LIST_PAGE), []

    async def _root(self, req: protocol.Root, fds: list[int]) -> Answer:
        return Reply(), self.service.fs.root_fd(self.service.reg.lookup(fds[0]))

    async def _set_root(self, req: protocol.SetRoot, fds: list[int]) -> Answer:
        await self.service.fs.set_root(self.peer, await self._container(fds[0]), fds[1])
        return Reply(), []

    async def _mount_at(self, req: protocol.MountAt, fds: list[int]) -> Answer:
        c = await self._container(fds[0])
        own = self.forking is not None and self.forking[0] is c
        return await self.service.fs.mount_at(self.peer, c, fds[1], req.path, bool(req.proc),
                                              req.attrs, req.params, own_fork=own), []

    async def _fs_namespaces(self, req: protocol.FsNamespaces, fds: list[int]) -> Answer:
        return self.service.fs.fs_namespaces(self.peer, await self._container(fds[0]))

    async def _open(self, req: protocol.Open, fds: list[int]) -> Answer:
        return Reply(), [self.service.reg.open_handle(self.peer, req.id)]

    async def _set_limit(self, req: protocol.SetLimit, fds: list[int]) -> Answer:
        c = await self._container(fds[0])
        return await self.service.limits.set(self.peer, c, req.name, req.value), []

    async def _get_limit(self, req: protocol.GetLimit, fds: list[int]) -> Answer:
        return self.service.limits.get(await self._container(fds[0]), req.name), []

    async def _stats(self, req: protocol.Stats, fds: list[int]) -> Answer:
        return self.service.limits.stats(await self._container(fds[0])), []

    async def _set_caps(self, req: protocol.SetCaps, fds: list[int]) -> Answer:
        c = await self._container(fds[0])
        return await self.service.confiner.set_caps(self.peer, c, req.caps), []

    async def _set_seccomp(self, req: protocol.SetSeccomp, fds: list[int]) -> Answer:
        c = await self._container(fds[0])
        return await self.service.confiner.set_seccomp(self.peer, c, req.profile), []

    async def _pidns(self, req: protocol.PidNs, fds: list[int]) -> Answer:
        return self.service.fs.pid_ns_fd(await self._container(fds[0]))

    async def _pids(self, req: protocol.Pids, fds: list[int]) -> Answer:
        c = await self._container(fds[0])
        return self.service.fs.pids(self.peer, c, self.service.reg.cgroups.procs(c.id)), []

    async def _freeze(self, req: protocol.Freeze, fds: list[int]) -> Answer:
        c = await self._container(fds[0])
        return await self.service.limits.freeze(self.peer, c, bool(req.frozen)), []


# Rows in one List reply: a page stays well under MAX_MESSAGE (a row is at most ~250 bytes
# but for its members).
LIST_PAGE = 100
# A reply and the fds that go with it; None for a one-way message.
Answer = tuple[Reply | None, list[int]]
# The handler of each request type (the keyring's own go to the keyring service).
_HANDLERS: dict[type[protocol.Request], Callable[[Connection, Any, list[int]], Awaitable[Answer]]] = {
    protocol.Create: Connection._create,
    protocol.Fork: Connection._fork,
    protocol.Started: Connection._reported,
    protocol.StartedNoReply: Connection._reported,
    protocol.ForkFailed: Connection._reported,
    protocol.Status: Connection._status,
    protocol.Kill: Connection._kill,
    protocol.NetNs: Connection._netns,
    protocol.List: Connection._list,
    protocol.Root: Connection._root,
    protocol.SetRoot: Connection._set_root,
    protocol.MountAt: Connection._mount_at,
    protocol.FsNamespaces: Connection._fs_namespaces,
    protocol.Open: Connection._open,
    protocol.SetLimit: Connection._set_limit,
    protocol.GetLimit: Connection._get_limit,
    protocol.Stats: Connection._stats,
    protocol.Freeze: Connection._freeze,
    protocol.SetCaps: Connection._set_caps,
    protocol.SetSeccomp: Connection._set_seccomp,
    protocol.PidNs: Connection._pidns,
    protocol.Pids: Connection._pids,
}


# accept() errors that a flood causes and that pass once connections close.
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# Connections one user (other than root) may hold open at once.
MAX_CONNECTIONS_PER_USER = 256
# Refused connections given a second to send the request their refusal answers; past this
# many at once, one is closed unanswered (its client sees ECONNRESET or EOF).
MAX_REFUSING = 16
REFUSAL_WAIT = 1.0


class Admission:
    """Who may open one more connection: every user but root up to MAX_CONNECTIONS_PER_USER,
    and only while the service has fds to spare (Service.fds_short), so that no user can take
    the fds that root's requests and the service's own work need. Decided at accept, before
    the next accept: a flood cannot run ahead of the count."""

    def __init__(self, per_user: int = MAX_CONNECTIONS_PER_USER) -> None:
        self.per_user = per_user
        self.open: collections.Counter[int] = collections.Counter()
        self.refusing = 0  # refused connections waiting for their request

    def _refusal(self, connection: Connection) -> OSError | None:
        uid = connection.peer.uid
        if uid == 0:
            return None
        if self.open[uid] >= self.per_user:
            return OSError(errno.EAGAIN, f"uid {uid} has {self.per_user} connections open to "
                                         "the service, its limit; close some")
        # The connection's fd was the lowest free one: a lower bound on the fds in use.
        if connection.sock.fileno() >= connection.service.reg.fd_reserve_mark:
            return OSError(errno.EAGAIN, "the service is short of fds; try again later")
        return None

    def admit(self, connection: Connection, nursery: trio.Nursery) -> None:
        """Start serving `connection`, or refusing it: answered if few refusals wait, else
        closed at once (its client sees the connection reset)."""
        refusal = self._refusal(connection)
        if refusal is None:
            self.open[connection.peer.uid] += 1
            nursery.start_soon(self._serve, connection)
        elif self.refusing < MAX_REFUSING:
            self.refusing += 1
            nursery.start_soon(self._refuse, connection, refusal)
        else:
            connection.close()

    async def _serve(self, connection: Connection) -> None:
        uid = connection.peer.uid
        try:
            await _serve_connection(connection)
        finally:
            self.open[uid] -= 1
            if not self.open[uid]:
                del self.open[uid]

    async def _refuse(self, connection: Connection, refusal: OSError) -> None:
        try:
            await connection.refuse(refusal)
        finally:
            self.refusing -= 1


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
            for key, fd, c, role in service.forks.take_pending():
                # A fork that was being reported when the last service stopped: read on.
                nursery.start_soon(_serve_connection, Connection(
                    service, trio.socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_SEQPACKET),
                    (c, role), key))
                os.close(fd)
            admission = Admission()
            while True:
                try:
                    conn, _ = await sock.accept()
                except OSError as e:
                    if e.errno not in _OUT_OF_RESOURCES:
                        raise
                    # Out of fds or memory: the client waits in the backlog until some are
                    # closed; the service goes on (trio's own listeners do the same).
                    log.warning("accept: %s; trying again in 100 ms", e.strerror)
                    await trio.sleep(0.1)
                    continue
                try:
                    connection = Connection(service, conn)
                except OSError as e:  # EMFILE for its pidfd, or the peer is gone
                    log.warning("connection dropped before its first request: %s", e.strerror)
                    conn.close()
                    continue
                admission.admit(connection, nursery)
    finally:
        sock.close()
        rundir.unlink_if_ours(path, ident)
