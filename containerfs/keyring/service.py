"""The service's half of per-container keyrings and request_key() interception.

What the kernel proposal did in the kernel, done here with real keys:
- each container gets a session keyring (made at container_create, owned by the creator so
  it counts against the creator's key quota); fork_into_container makes it the new process's
  session keyring (syscalls.keys.join_container_keyring);
- keyctl_set_container_keyring links the creator's keyring into that session keyring, by a
  slot that members cannot change, so the kernel's own search finds its keys after the
  process's own;
- every process forked in traps its request_key() with a seccomp filter whose listener it
  hands to the service; the service answers each trapped call: "carry on" (the kernel's own
  path) unless the container has a trap for the type and the key is in none of the
  container's keyrings; then the request waits for the creator's answer, or its timeout;
- requests the kernel makes itself (never a system call of the process) reach the service
  through a request-key.d rule per trapped type (upcall.Rules) whose handler
  (upcall_handler.py) names the requester's session keyring: a container's, with a trap for
  the type, and the request waits for the creator just the same.

Everything here runs in the service's trio loop and never blocks it: keyctl calls take
microseconds, and a trapped request waits in a task of its own.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import math
import os
import select
import socket
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from syscalls import keys, protocol
from syscalls.fdpass import fds_from_ancdata
from syscalls.keys import KEY_ALL, KEY_LINK, KEY_READ, KEY_SEARCH, KEY_VIEW, KEY_WRITE

from ..states import State
from .registry import Registry, destroy, perm
from .upcall import Rules, probe_upcall

if TYPE_CHECKING:
    from ..control import Connection
    from ..service import Container, Peer, Service

log = logging.getLogger("containerfs")

# A search that finds nothing, or only a negative, expired or revoked key: not found.
_NOT_FOUND = (errno.ENOKEY, errno.EKEYEXPIRED, errno.EKEYREVOKED, errno.EKEYREJECTED)
MAX_PENDING = 128  # requests waiting for an answer, per container (then EAGAIN)
MAX_TRAPS = 64
MAX_TIMEOUT_MS = 3600 * 1000
UPCALL_REPORT_S = 10.0  # how long an instantiate waits for the handler to say it made the key

# A container's session keyring: its possessors (members, and the service through the
# registry) may do anything; its owner may only search it, which is what joining by name needs.
SESSION_PERM = perm(pos=KEY_ALL, usr=KEY_SEARCH)
# The slot that holds the attached keyring: members find keys through it, but cannot change it.
SLOT_PERM = perm(pos=KEY_VIEW | KEY_READ | KEY_SEARCH | KEY_LINK)


def _quota_error(e: OSError, uid: int, what: str) -> OSError:
    if e.errno == errno.EDQUOT:
        return OSError(errno.EAGAIN, f"uid {uid} has no key quota left for {what} "
                                     "(kernel.keys.maxkeys / maxbytes)")
    return e


@dataclass(eq=False)
class Listener:
    """A seccomp listener handed over by a process forked into a container."""
    key: str  # under which the keeper holds a copy
    fd: int
    closed: bool = False


@dataclass(eq=False)
class Waiter:
    """One trapped request_key() call waiting for an answer."""
    listener: Listener
    notif_id: int
    keep_key: str


class Channel:
    """A connection that carries trapped requests to a manager, in order: after the reply
    that opened it, events only."""

    def __init__(self, first: dict[str, Any]) -> None:
        self._send, self._recv = trio.open_memory_channel[dict[str, Any]](math.inf)
        self._send.send_nowait(first)
        self.scope = trio.CancelScope()
        self.closed = False

    def push(self, event: dict[str, Any]) -> None:
        if not self.closed:
            self._send.send_nowait(event)

    def close(self) -> None:
        self.closed = True
        self.scope.cancel()

    async def serve(self, sock: trio.socket.SocketType) -> None:
        """Send events until the manager hangs up (or close())."""
        with self.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, sock, nursery.cancel_scope)
                await self._until_hangup(sock)
                nursery.cancel_scope.cancel()
        self.closed = True

    async def _writer(self, sock: trio.socket.SocketType, scope: trio.CancelScope) -> None:
        try:
            async for event in self._recv:
                await sock.send(protocol.encode(event))
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            scope.cancel()

    @staticmethod
    async def _until_hangup(sock: trio.socket.SocketType) -> None:
        # A manager sends nothing on this connection: anything it sends ends it, like EOF.
        try:
            _data, anc, _flags, _ = await sock.recvmsg(
                protocol.MAX_MESSAGE, socket.CMSG_SPACE(protocol.MAX_FDS * 4),
                socket.MSG_CMSG_CLOEXEC)
        except OSError:
            return
        for fd in fds_from_ancdata(anc):
            os.close(fd)


@dataclass(eq=False)
class Trap:
    type: str
    timeout: float
    owner: int  # who set it: the records are theirs
    group: int
    record_ring: int = 0  # the keyring the records go in (linked by the setter into its own)
    records_locked: bool = False
    channel: Channel | None = None  # bound: lives as long as this manager's connection


@dataclass(eq=False)
class Upcall:
    """A request the kernel made: our request-key.d rule's handler waits on its connection
    to be told what to do with the key under construction."""
    key: int
    answer: dict[str, Any] | None = None
    told: trio.Event = field(default_factory=trio.Event)
    gone: bool = False  # the handler hung up before it was told
    result: int | None = None  # after an instantiate: the handler's errno (0: made)
    reported: trio.Event = field(default_factory=trio.Event)

    def tell(self, answer: dict[str, Any]) -> None:
        if self.answer is None:
            self.answer = answer
            self.told.set()


@dataclass(eq=False)
class Pending:
    rid: int
    trap: Trap
    type: str
    description: str
    callout_info: str
    uid: int
    gid: int
    pid: int
    waiters: list[Waiter]
    done: trio.Event = field(default_factory=trio.Event)
    record: int = 0
    finished: bool = False
    upcall: Upcall | None = None  # made by the kernel (pid 0: the requester is not known)

    @property
    def what(self) -> tuple[str, str, int]:
        return self.type, self.description, self.uid

    def event(self, cid: int) -> dict[str, Any]:
        return {"event": "request", "rid": self.rid, "container": cid, "operation": "create",
                "type": self.type, "description": self.description,
                "callout_info": self.callout_info, "uid": self.uid, "gid": self.gid,
                "pid": self.pid}


@dataclass(eq=False)
class ContainerKeys:
    cid: int
    owner: int
    group: int
    session: int
    name: str
    slot: int = 0  # holds the attached keyring
    stage: int = 0
    stage_uid: int = -1
    traps: dict[str, Trap] = field(default_factory=dict)
    negative: dict[tuple[str, str], tuple[float, int]] = field(default_factory=dict)
    pending: dict[int, Pending] = field(default_factory=dict)
    waiting: dict[tuple[str, str, int], Pending] = field(default_factory=dict)
    listeners: set[Channel] = field(default_factory=set)

    def trap_for(self, key_type: str) -> Trap | None:
        return self.traps.get(key_type) or self.traps.get("*")


def _fs_ids(pid: int) -> tuple[int, int]:
    """The fsuid and fsgid of `pid` (as the service sees them): what a key it asks for is
    owned by when the kernel constructs one."""
    uid = gid = -1
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                uid = int(line.split()[4])
            elif line.startswith("Gid:"):
                gid = int(line.split()[4])
                break
    return uid, gid


class KeyringService:
    def __init__(self, service: Service) -> None:
        self.svc = service
        self.registry = Registry(os.path.dirname(service.fdstore.path))
        self.containers: dict[int, ContainerKeys] = {}
        self._rid = 0
        self._boot = f"{os.getpid()}.{time.monotonic_ns()}"
        self._nlisteners = 0
        self._listener_conns: weakref.WeakSet[Connection] = weakref.WeakSet()  # one each
        self.rules = Rules(os.path.dirname(service.fdstore.path))
        self._upcall_ok: bool | None = None  # probed when the first rule is to be written
        self._probed: trio.Event | None = None

    # ---- the container's life ---------------------------------------------------------

    def create_session(self, cid: int, owner: int, group: int) -> ContainerKeys:
        """Make container `cid`'s session keyring, owned by (and counted against) `owner`."""
        secret = os.urandom(16).hex()  # the name is what a process joins it by
        serial = self.registry.make(cid, "s", secret)
        try:
            keys.setperm(serial, SESSION_PERM)
            keys.chown(serial, owner, group)
        except OSError as e:
            destroy(serial)
            raise _quota_error(e, owner, f"container {cid}'s session keyring") from None
        ck = ContainerKeys(cid, owner, group, serial, Registry.name_of(cid, "s", secret))
        self.containers[cid] = ck
        return ck

    def discard(self, cid: int) -> None:
        """The container was never made, or is dead: its keyrings go, its requests fail."""
        ck = self.containers.pop(cid, None)
        if ck is None:
            return
        for p in list(ck.pending.values()):
            self._finish(ck, p, error=errno.ENOKEY)
        for trap in list(ck.traps.values()):
            self._drop_trap(ck, trap)
        for channel in list(ck.listeners):
            channel.close()
        for serial in (ck.session, ck.slot, ck.stage):
            if serial:
                destroy(serial)

    def container_died(self, c: Container) -> None:
        self.discard(c.id)

    def fork_info(self, c: Container) -> dict[str, Any]:
        """What a process forking into `c` needs to join the container's session keyring."""
        ck = self.containers.get(c.id) or self.create_session(c.id, c.owner, c.group)
        return {"keyring": {"name": ck.name, "serial": ck.session, "owner": ck.owner}}

    def _keys_of(self, c: Container) -> ContainerKeys:
        ck = self.containers.get(c.id)
        if ck is None:
            raise OSError(errno.ECANCELED, f"container {c.id} is dead")
        return ck

    # ---- requests from clients --------------------------------------------------------

    async def dispatch(self, conn: Connection, req: protocol.Request,
                       fds: list[int]) -> tuple[dict[str, Any] | None, list[int]]:
        """Serve one keyring request. A listener fd or a channel's handle is taken out of
        `fds` (the connection closes what is left in it)."""
        if isinstance(req, protocol.KeyListener):
            self._take_listener(conn, fds)
            return None, []
        if isinstance(req, protocol.KeyUpcall):
            return await self._serve_upcall(conn, req)
        if isinstance(req, protocol.KeyUpcallDone):
            raise protocol.ProtocolError("key_upcall_done outside an upcall")
        c = self.svc.lookup(fds[0])
        peer = conn.peer
        if isinstance(req, protocol.KeyringStage):
            self.svc._check_manager(peer, c, "set the keyring of")
            return {"stage": self._stage(self._keys_of(c), peer)}, []
        if isinstance(req, protocol.KeyringAttach):
            self.svc._check_manager(peer, c, "set the keyring of")
            self._attach(self._keys_of(c), peer, req.keyring)
            return {}, []
        if isinstance(req, protocol.KeyIntercept):
            self.svc._check_manager(peer, c, "intercept key requests of")
            ck = self._keys_of(c)
            trap = self._add_trap(ck, peer, req)
            await self._install_rules()  # "from now on" holds for the kernel's requests too
            reply = {"record_keyring": trap.record_ring}
            if not req.bind:
                return reply, []
            return await self._serve_channel(conn, fds, ck, reply, trap)
        if isinstance(req, protocol.KeyUnintercept):
            self.svc._check_manager(peer, c, "intercept key requests of")
            ck = self._keys_of(c)
            if req.all:
                traps = list(ck.traps.values())
            else:
                keys.check_type(req.type)
                traps = [ck.traps[req.type]] if req.type in ck.traps else []
            for trap in traps:
                self._drop_trap(ck, trap)
            return {"removed": len(traps)}, []
        if isinstance(req, protocol.KeyListen):
            self.svc._check_manager(peer, c, "intercept key requests of")
            return await self._serve_channel(conn, fds, self._keys_of(c), {}, None)
        if isinstance(req, protocol.KeyAnswer):
            self.svc._check_manager(peer, c, "answer key requests of")
            return await self._answer(self._keys_of(c), req), []
        raise protocol.ProtocolError(f"unhandled op {req.op}")

    async def _serve_channel(self, conn: Connection, fds: list[int], ck: ContainerKeys,
                             reply: dict[str, Any], trap: Trap | None
                             ) -> tuple[dict[str, Any] | None, list[int]]:
        # The service must not hold the handle while the channel lasts: its last close
        # (kill-on-close) is the manager's business, not ours.
        for fd in fds:
            os.close(fd)
        fds.clear()
        channel = Channel(reply)
        if trap is not None:
            trap.channel = channel
        else:
            ck.listeners.add(channel)
            for p in ck.pending.values():
                if p.trap.channel is None:
                    channel.push(p.event(ck.cid))
        try:
            await channel.serve(conn.sock)
        finally:
            if trap is not None and ck.traps.get(trap.type) is trap:
                self._drop_trap(ck, trap)
            ck.listeners.discard(channel)
            # Only now: a manager that waits for our end knows its trap is gone.
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return None, []

    # ---- keyctl_set_container_keyring ---------------------------------------------------

    def _stage(self, ck: ContainerKeys, peer: Peer) -> int:
        if ck.slot:
            raise OSError(errno.EBUSY, f"container {ck.cid} has a keyring already")
        if ck.stage and ck.stage_uid != peer.uid:
            destroy(ck.stage)
            ck.stage = 0
        if not ck.stage:
            stage = self.registry.make(ck.cid, "stage")
            try:
                keys.setperm(stage, perm(pos=KEY_ALL, usr=KEY_WRITE))
                keys.chown(stage, peer.uid, peer.gid)
            except OSError as e:
                destroy(stage)
                raise _quota_error(e, peer.uid, "a keyring link") from None
            ck.stage, ck.stage_uid = stage, peer.uid
        return ck.stage

    def _attach(self, ck: ContainerKeys, peer: Peer, keyring: int) -> None:
        if ck.slot:
            raise OSError(errno.EBUSY, f"container {ck.cid} has a keyring already")
        if not ck.stage or ck.stage_uid != peer.uid or keyring not in keys.keyring_contents(ck.stage):
            raise OSError(errno.EINVAL, f"keyring {keyring} was not linked into the stage of "
                                        f"container {ck.cid}")
        if keys.describe(keyring)[0] != "keyring":
            raise OSError(errno.ENOTDIR, f"key {keyring} is not a keyring")
        slot = self.registry.make(ck.cid, "ck")
        try:
            keys.link(keyring, slot)  # we possess it through the stage the caller linked it in
            keys.chown(slot, ck.owner, ck.group)
            keys.setperm(slot, SLOT_PERM)
            keys.link(slot, ck.session)
        except OSError as e:
            destroy(slot)
            raise _quota_error(e, ck.owner, "the container keyring") from None
        ck.slot = slot
        destroy(ck.stage)
        ck.stage, ck.stage_uid = 0, -1

    # ---- traps -----------------------------------------------------------------------

    def _add_trap(self, ck: ContainerKeys, peer: Peer, req: protocol.KeyIntercept) -> Trap:
        keys.check_type(req.type)
        if not 0 < req.timeout_ms <= MAX_TIMEOUT_MS:
            raise OSError(errno.EINVAL, f"timeout of {req.timeout_ms} ms is out of range")
        if req.type in ck.traps:
            raise OSError(errno.EEXIST, f"container {ck.cid} traps {req.type!r} keys already")
        if len(ck.traps) >= MAX_TRAPS:
            raise OSError(errno.EAGAIN, f"container {ck.cid} has {MAX_TRAPS} traps, its limit")
        trap = Trap(req.type, req.timeout_ms / 1000, peer.uid, peer.gid)
        if req.dest:
            ring = self.registry.make(ck.cid, "b" if req.bind else "t",
                                      f"{req.timeout_ms}.{req.type}")
            try:
                # The setter links it into its own keyring (the kernel checks it may write
                # that one); once records arrive, only possessors keep any right to it.
                keys.setperm(ring, perm(pos=KEY_ALL, usr=KEY_VIEW | KEY_LINK))
                keys.chown(ring, peer.uid, peer.gid)
            except OSError as e:
                destroy(ring)
                raise _quota_error(e, peer.uid, "a trap's record keyring") from None
            trap.record_ring = ring
        ck.traps[req.type] = trap
        return trap

    def _drop_trap(self, ck: ContainerKeys, trap: Trap) -> None:
        if ck.traps.get(trap.type) is trap:
            del ck.traps[trap.type]
        for p in list(ck.pending.values()):
            if p.trap is trap:
                self._finish(ck, p, error=errno.ENOKEY)
        if trap.record_ring:
            destroy(trap.record_ring)
            trap.record_ring = 0
        if trap.channel is not None:
            trap.channel.close()
        self._sync_rules()

    # ---- answers ---------------------------------------------------------------------

    async def _answer(self, ck: ContainerKeys, req: protocol.KeyAnswer) -> dict[str, Any]:
        p = ck.pending.get(req.rid)
        if p is None:
            raise OSError(errno.ENOENT, f"no request {req.rid} waits in container {ck.cid} "
                                        "(answered, timed out, or its caller died)")
        if req.timeout_ms < 0:
            raise OSError(errno.EINVAL, "negative timeout")
        if req.action == "instantiate":
            try:
                payload = base64.b64decode(req.payload, validate=True)
            except ValueError:
                raise OSError(errno.EINVAL, "payload is not base64") from None
            if p.upcall is not None:
                return {"serial": await self._instantiate_upcall(ck, p, req.payload)}
            return {"serial": self._instantiate(ck, p, payload)}
        if req.action == "negate":
            err = errno.ENOKEY
        elif req.action == "reject":
            err = req.errno
            if not 0 < err < 4096:
                raise OSError(errno.EINVAL, f"invalid errno {err}")
        else:
            raise OSError(errno.EINVAL, f"unknown answer {req.action!r}")
        if req.timeout_ms:
            # The kernel would keep a negative key this long: later requests fail at once.
            ck.negative[(p.type, p.description)] = (time.monotonic() + req.timeout_ms / 1000, err)
        self._finish(ck, p, error=err, timeout_ms=req.timeout_ms)
        return {}

    def _instantiate(self, ck: ContainerKeys, p: Pending, payload: bytes) -> int:
        """Make the key in the container's session keyring, owned by the requester (so it
        counts against the requester's quota), and let the requester's call find it."""
        try:
            try:
                serial = keys.search(ck.session, p.type, p.description)
            except OSError as e:
                if e.errno not in _NOT_FOUND:
                    raise
                serial = keys.add_key(p.type, p.description, payload, ck.session)
                try:
                    keys.chown(serial, p.uid, p.gid)
                except OSError:
                    destroy(serial)
                    raise
        except OSError as e:
            self._finish(ck, p, error=e.errno or errno.EIO)
            if e.errno == errno.EDQUOT:
                raise OSError(errno.EDQUOT, f"uid {p.uid} has no key quota left for the key "
                                            "(kernel.keys.maxkeys / maxbytes)") from None
            raise
        # The key is known to exist now: the kernel's own request_key finds it, links it where
        # the caller asked and returns it, with every check made as the caller.
        self._finish(ck, p, continue_=True)
        return serial

    async def _instantiate_upcall(self, ck: ContainerKeys, p: Pending, payload: str) -> int:
        """The handler instantiates the key under construction; its errno is the answer's."""
        assert p.upcall is not None
        up = p.upcall
        self._finish(ck, p, payload=payload)
        with trio.move_on_after(UPCALL_REPORT_S):
            await up.reported.wait()
        if up.result is None:
            raise OSError(errno.EIO, f"the request-key handler of key {up.key} went away "
                                     "before it said whether it made the key")
        if up.result == errno.EDQUOT:
            raise OSError(errno.EDQUOT, f"uid {p.uid} has no key quota left for the key "
                                        "(kernel.keys.maxkeys / maxbytes)")
        if up.result:
            raise OSError(up.result, f"the kernel refused key {up.key}: "
                                     f"{os.strerror(up.result)}")
        return up.key

    def _finish(self, ck: ContainerKeys, p: Pending, *, error: int = 0,
                continue_: bool = False, timeout_ms: int = 0,
                payload: str | None = None) -> None:
        """Answer every waiter of `p`: fail with `error`, carry on, or (for a request the
        kernel made) instantiate with `payload` / reject with `error` for `timeout_ms`."""
        if p.finished:
            return
        p.finished = True
        # Forget the request (and its record) before answering: a requester woken by the
        # answer must find no trace of a request that is over.
        ck.pending.pop(p.rid, None)
        if ck.waiting.get(p.what) is p:
            del ck.waiting[p.what]
        if p.record:
            destroy(p.record)
        for w in p.waiters:
            if not w.listener.closed:
                keys.notif_send(w.listener.fd, w.notif_id, error=error, continue_=continue_)
            self.svc.fdstore.drop(w.keep_key)
        if p.upcall is not None:
            p.upcall.tell({"action": "instantiate", "payload": payload} if payload is not None
                          else {"action": "reject", "errno": error or errno.ENOKEY,
                                "timeout_ms": timeout_ms})
        p.done.set()

    async def _expire(self, ck: ContainerKeys, p: Pending) -> None:
        with trio.move_on_after(p.trap.timeout):
            await p.done.wait()
        if not p.finished:
            log.info("container %d: request for %s %r not answered in %.1fs", ck.cid, p.type,
                     p.description, p.trap.timeout)
            self._finish(ck, p, error=errno.ENOKEY)

    # ---- seccomp listeners -------------------------------------------------------------

    def _take_listener(self, conn: Connection, fds: list[int]) -> None:
        # One way: this must never answer (the fork's caller reads that connection).
        if conn.fork_container is None:
            log.warning("pid %d sent a seccomp listener without a fork; ignored", conn.peer.pid)
            return
        # A fork's process hands over one listener. Anything else would be held until it
        # hangs up, which an eventfd or a socket never does: one connection could make the
        # service (and the keeper) hold fds without end.
        if not keys.is_listener(fds[-1]):
            log.warning("pid %d sent a key listener that is no seccomp listener (%s); ignored",
                        conn.peer.pid, os.readlink(f"/proc/self/fd/{fds[-1]}"))
            return
        if conn in self._listener_conns:
            log.warning("pid %d sent a second seccomp listener for one fork; ignored",
                        conn.peer.pid)
            return
        self._listener_conns.add(conn)
        fd = fds.pop()
        self._nlisteners += 1
        self.add_listener(f"kl.{self._boot}.{self._nlisteners}", fd)

    def add_listener(self, key: str, fd: int, keep: bool = True) -> None:
        listener = Listener(key, fd)
        if keep:
            self.svc.fdstore.put(key, {"l": fd})
        self.svc.nursery.start_soon(self._serve_listener, listener)

    async def _serve_listener(self, listener: Listener) -> None:
        poller = select.poll()
        poller.register(listener.fd, select.POLLIN)
        try:
            while True:
                await trio.lowlevel.wait_readable(listener.fd)
                events = dict(poller.poll(0)).get(listener.fd, 0)
                if events & select.POLLIN:
                    notif = keys.notif_recv(listener.fd)
                    if notif is not None:
                        self._on_notif(listener, notif)
                elif events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    return  # every process using this filter is gone
        except Exception:  # a bug here must not take the service down
            log.exception("seccomp listener %s failed; dropped", listener.key)
        finally:
            listener.closed = True
            trio.lowlevel.notify_closing(listener.fd)
            os.close(listener.fd)
            self.svc.fdstore.drop(listener.key)

    def _on_notif(self, listener: Listener, n: keys.Notification) -> None:
        """Answer a trapped request_key() now, or queue it for the container's manager."""
        try:
            answer = self._classify(listener, n)
        except Exception:
            log.exception("trapped request_key of pid %d", n.pid)
            answer = errno.ENOKEY
        if answer is None:
            return  # queued, or its caller is gone
        if answer == 0:
            keys.notif_send(listener.fd, n.id, continue_=True)
        else:
            keys.notif_send(listener.fd, n.id, error=answer)

    def _classify(self, listener: Listener, n: keys.Notification) -> int | None:
        """0: let the kernel carry on; an errno: fail with it; None: queued (or gone).

        Cheapest checks first: most calls are let through. A reply to a call that is no
        longer waiting is harmless (the kernel refuses it), so only queueing needs the proof
        that what was read belongs to the caller."""
        if not n.args[2]:
            return 0  # no callout info: the kernel constructs nothing (ENOKEY); nothing to trap
        cid = self.svc.cgroups.container_id_of(n.pid)
        ck = self.containers.get(cid) if cid is not None else None
        if ck is None or not ck.traps:
            return 0  # not in a container, or nothing trapped: untouched
        try:
            mem = os.open(f"/proc/{n.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return 0  # gone
        try:
            raw_type = keys.read_cstring(mem, n.args[0], keys.KEY_TYPE_MAX)
            key_type = raw_type.decode("utf-8", "surrogateescape") if raw_type else ""
            trap = ck.trap_for(key_type) if key_type and not key_type.startswith(".") else None
            if trap is None:
                return 0
            raw_desc = keys.read_cstring(mem, n.args[1], keys.KEY_DESC_MAX)
            raw_callout = keys.read_cstring(mem, n.args[2], keys.CALLOUT_MAX)
            if not raw_desc or raw_callout is None:
                return 0  # the kernel's own EINVAL
        except OSError:
            return 0  # EFAULT: the kernel says so itself
        finally:
            os.close(mem)
        desc = raw_desc.decode("utf-8", "surrogateescape")
        negative = ck.negative.get((key_type, desc))
        if negative is not None:
            if negative[0] > time.monotonic():
                return negative[1]
            del ck.negative[(key_type, desc)]
        try:
            keys.search(ck.session, key_type, desc)
            return 0  # found in the container's keyrings: the kernel finds it too
        except OSError as e:
            if e.errno not in _NOT_FOUND:
                return 0  # an unknown type, say: the kernel's own answer
        try:
            uid, gid = _fs_ids(n.pid)
        except OSError:
            return None  # gone
        # What was read belongs to the process that made the call only if the call is still
        # waiting: then its pid cannot have been reused.
        if not keys.notif_id_valid(listener.fd, n.id):
            return None
        return self._queue(ck, trap, listener, n, key_type, desc,
                           raw_callout.decode("utf-8", "surrogateescape"), uid, gid)

    def _queue(self, ck: ContainerKeys, trap: Trap, listener: Listener, n: keys.Notification,
               key_type: str, desc: str, callout: str, uid: int, gid: int) -> int | None:
        """Make the call wait for the creator's answer (or join one that waits already)."""
        same = ck.waiting.get((key_type, desc, uid))
        if same is None and len(ck.pending) >= MAX_PENDING:
            return errno.EAGAIN
        waiter = Waiter(listener, n.id, f"kn.{listener.key}.{n.id}")
        # A copy of the listener under the call's cookie: a restarted service can still fail
        # the call rather than leave it waiting forever.
        self.svc.fdstore.put(waiter.keep_key, {"l": listener.fd})
        if same is not None:
            same.waiters.append(waiter)  # one construction at a time, as the kernel does
            return None
        self._rid += 1
        p = Pending(self._rid, trap, key_type, desc, callout, uid, gid, n.pid, [waiter])
        ck.waiting[p.what] = p
        self._open(ck, p)
        return None

    def _open(self, ck: ContainerKeys, p: Pending) -> None:
        """Make `p` wait: recorded, sent to its trap's manager, failed after its timeout."""
        ck.pending[p.rid] = p
        self._record(ck, p)
        event = p.event(ck.cid)
        if p.trap.channel is not None:
            p.trap.channel.push(event)
        else:
            for channel in ck.listeners:
                channel.push(event)
        self.svc.nursery.start_soon(self._expire, ck, p)

    def _record(self, ck: ContainerKeys, p: Pending) -> None:
        """Link a record of the request into the trap's record keyring, owned by the trap's
        setter: managers in the proposal's style find their work there."""
        trap = p.trap
        if not trap.record_ring:
            return
        try:
            if not trap.records_locked:
                keys.setperm(trap.record_ring, perm(pos=KEY_ALL))
                trap.records_locked = True
            payload = json.dumps({k: v for k, v in p.event(ck.cid).items() if k != "event"})
            p.record = keys.add_key("user", f"containerfs:{ck.cid}:{p.rid}", payload.encode(),
                                    trap.record_ring)
            keys.chown(p.record, trap.owner, trap.group)
        except OSError as e:
            log.warning("container %d: no record of request %d: %s", ck.cid, p.rid, e)
            if p.record:
                destroy(p.record)
                p.record = 0

    # ---- requests the kernel makes (the request-key.d rule) -----------------------------

    def _sync_rules(self) -> None:
        """The rule file names the types trapped now; none while the upcall is not known to
        work (a write waits for _install_rules' probe), none without traps."""
        types = [t for ck in self.containers.values() for t in ck.traps]
        if types and not self._upcall_ok:
            if self._upcall_ok is None:
                return
            types = []
        try:
            self.rules.write(types)
        except OSError as e:
            log.warning("could not write the request-key rule %s: %s", self.rules.path, e)

    async def _install_rules(self) -> None:
        """Probe the upcall once (in a thread: the probe forks and waits for the kernel),
        then write the rule file."""
        if self._upcall_ok is None:
            if self._probed is None:
                self._probed = trio.Event()
                try:
                    reason = await trio.to_thread.run_sync(probe_upcall)
                except Exception as e:  # a probe that cannot run says "no upcall" too
                    reason = f"the upcall probe failed: {e!r}"
                self._upcall_ok = reason is None
                if reason is not None:
                    log.info("no request-key.d rule for the kernel's own requests: %s", reason)
                self._probed.set()
            else:
                await self._probed.wait()
        self._sync_rules()

    async def _serve_upcall(self, conn: Connection, req: protocol.KeyUpcall
                            ) -> tuple[dict[str, Any] | None, list[int]]:
        """A key the kernel constructs, from our rule's handler: the host's business (the
        handler hands it to the host's rules), or a container's request for its creator."""
        peer = conn.peer
        if peer.uid != 0 or self.svc.cgroups.container_id_of(peer.pid) is not None:
            raise OSError(errno.EPERM, "only the kernel's request-key handler (root, in no "
                                       "container) may hand over key requests")
        ck = next((k for k in self.containers.values() if k.session == req.session), None)
        trap = (ck.trap_for(req.type) if ck is not None and req.type
                and not req.type.startswith(".") else None)
        if ck is None or trap is None:
            return {"host": 1}, []
        negative = ck.negative.get((req.type, req.description))
        if negative is not None:
            left = negative[0] - time.monotonic()
            if left > 0:
                return {"action": "reject", "errno": negative[1],
                        "timeout_ms": math.ceil(left * 1000)}, []
            del ck.negative[(req.type, req.description)]
        if len(ck.pending) >= MAX_PENDING:
            return {"action": "reject", "errno": errno.EAGAIN, "timeout_ms": 0}, []
        self._rid += 1
        up = Upcall(req.key)
        # Not in ck.waiting: the kernel already makes one construction of a key at a time.
        p = Pending(self._rid, trap, req.type, req.description, req.callout_info, req.uid,
                    req.gid, 0, [], upcall=up)
        self._open(ck, p)
        sock = conn.sock
        try:
            await sock.send(protocol.encode({"queued": round(trap.timeout * 1000)}))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._until_handler_gone, ck, p, sock)
                await up.told.wait()
                nursery.cancel_scope.cancel()
            if not up.gone and up.answer is not None:
                await sock.send(protocol.encode(up.answer))
                if up.answer["action"] == "instantiate":
                    with trio.move_on_after(UPCALL_REPORT_S):
                        data = await sock.recv(protocol.MAX_MESSAGE)
                        done = protocol.decode_request(data) if data else None
                        if isinstance(done, protocol.KeyUpcallDone):
                            up.result = done.errno
        except (OSError, protocol.ProtocolError) as e:
            log.info("container %d: request-key handler of key %d: %s", ck.cid, req.key, e)
        finally:
            self._finish(ck, p, error=errno.ENOKEY)  # if nobody answered it yet
            up.reported.set()
        return None, []

    async def _until_handler_gone(self, ck: ContainerKeys, p: Pending,
                                  sock: trio.socket.SocketType) -> None:
        # The handler says nothing until it is told: anything it sends, like EOF, ends it.
        try:
            await sock.recv(protocol.MAX_MESSAGE)
        except OSError:
            pass
        if p.upcall is not None:
            p.upcall.gone = True
        self._finish(ck, p, error=errno.ENOKEY)

    # ---- restart ---------------------------------------------------------------------

    def recover(self, held: dict[str, dict[str, int]]) -> None:
        """Take back the keyrings of adopted containers and the listeners the keeper held;
        fail the calls that were waiting when the previous service died."""
        slots: dict[int, int] = {}
        traps: list[tuple[int, Trap]] = []
        for entry in self.registry.entries():
            c = self.svc.containers.get(entry.cid)
            if c is None or c.state == State.DEAD:
                destroy(entry.serial)
            elif entry.kind == "s" and entry.cid not in self.containers:
                self.containers[entry.cid] = ContainerKeys(
                    entry.cid, c.owner, c.group, entry.serial,
                    Registry.name_of(entry.cid, "s", entry.rest))
            elif entry.kind == "ck":
                slots[entry.cid] = entry.serial
            elif entry.kind == "t":
                timeout_ms, _, key_type = entry.rest.partition(".")
                trap = Trap(key_type, int(timeout_ms) / 1000, entry.uid, entry.gid,
                            record_ring=entry.serial, records_locked=True)
                traps.append((entry.cid, trap))
            else:  # a stage, or the records of a trap bound to a connection now gone
                destroy(entry.serial)
        for cid, slot in slots.items():
            ck = self.containers.get(cid)
            if ck is None:
                destroy(slot)
                continue
            ck.slot = slot
        for cid, trap in traps:
            ck = self.containers.get(cid)
            if ck is None or trap.type in ck.traps:
                destroy(trap.record_ring)
            else:
                ck.traps[trap.type] = trap
        for key in [k for k in held if k.startswith("kl.")]:
            fds = held.pop(key)
            self.add_listener(key, fds["l"], keep=False)
        for key in [k for k in held if k.startswith("kn.")]:
            fds = held.pop(key)
            notif_id = int(key.rsplit(".", 1)[1])
            keys.notif_send(fds["l"], notif_id, error=errno.ENOKEY)
            os.close(fds["l"])
            self.svc.fdstore.drop(key)
        # A rule file left by the previous service says what its traps were; now it says ours.
        self._sync_rules()
        if any(ck.traps for ck in self.containers.values()):
            self.svc.nursery.start_soon(self._install_rules)

    def close(self) -> None:
        """The service stops: its request-key rule goes; with no container left, nothing of
        ours stays in the kernel."""
        self.rules.remove()
        if not self.containers:
            self.registry.remove()
