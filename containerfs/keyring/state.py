"""The keyring service's state: per-container keyrings, traps, the requests waiting for an
answer and who waits on them, and the channels that carry them to managers."""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
from dataclasses import dataclass, field

import trio

from syscalls import protocol
from syscalls.fdpass import fds_from_ancdata
from syscalls.replies import KeyRequest, Reply, UpcallReply
from syscalls.keys import KEY_ALL, KEY_LINK, KEY_READ, KEY_SEARCH, KEY_VIEW

from .registry import perm

log = logging.getLogger("containerfs")

# A search that finds nothing, or only a negative, expired or revoked key: not found.
NOT_FOUND = (errno.ENOKEY, errno.EKEYEXPIRED, errno.EKEYREVOKED, errno.EKEYREJECTED)
MAX_PENDING = 128  # requests waiting for an answer, per container (then EAGAIN)
MAX_TRAPS = 64
MAX_TIMEOUT_MS = 3600 * 1000
SECCOMP_NOTIFY_LINK = "anon_inode:seccomp notify"  # what /proc names a listener fd
UPCALL_REPORT_S = 10.0  # how long an instantiate waits for the handler to say it made the key

# A container's session keyring: its possessors (members, and the service through the
# registry) may do anything; its owner may only search it, which is what joining by name needs.
SESSION_PERM = perm(pos=KEY_ALL, usr=KEY_SEARCH)
# The slot that holds the attached keyring: members find keys through it, but cannot change it.
SLOT_PERM = perm(pos=KEY_VIEW | KEY_READ | KEY_SEARCH | KEY_LINK)


def quota_error(e: OSError, uid: int, what: str) -> OSError:
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

    def __init__(self, first: Reply) -> None:
        self._send, self._recv = trio.open_memory_channel[Reply](math.inf)
        self._send.send_nowait(first)
        self.scope = trio.CancelScope()
        self.closed = False

    def push(self, event: KeyRequest) -> None:
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
    answer: UpcallReply | None = None
    told: trio.Event = field(default_factory=trio.Event)
    gone: bool = False  # the handler hung up before it was told
    result: int | None = None  # after an instantiate: the handler's errno (0: made)
    reported: trio.Event = field(default_factory=trio.Event)

    def tell(self, answer: UpcallReply) -> None:
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

    def event(self, cid: int) -> KeyRequest:
        return KeyRequest(event="request", rid=self.rid, container=cid, operation="create",
                          type=self.type, description=self.description,
                          callout_info=self.callout_info, uid=self.uid, gid=self.gid,
                          pid=self.pid)


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


def fs_ids(pid: int) -> tuple[int, int]:
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


