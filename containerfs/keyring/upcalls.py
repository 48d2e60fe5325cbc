"""Key requests the kernel makes in a container process's name (never a system call of the
process): our request-key.d rule, one line per trapped type, names a handler that hands them
to us; a container's trapped request waits for its manager like a seccomp-trapped one."""

from __future__ import annotations

import errno
import logging
import math
import time

import trio

from syscalls import protocol
from syscalls.replies import UpcallReply

from .hooks import Client, Hooks
from .upcall import Rules, probe_upcall
from .state import (
    MAX_PENDING,
    UPCALL_REPORT_S,
    ContainerKeys,
    Pending,
    Upcall,
)
from .queue import RequestQueue

log = logging.getLogger("containerfs")


class Upcalls:
    """Key requests the kernel makes itself, handed over by our request-key.d rule."""

    def __init__(self, hooks: Hooks, queue: RequestQueue, rules: Rules) -> None:
        self.hooks = hooks
        self.queue = queue
        self.rules = rules
        self._upcall_ok: bool | None = None  # probed when the first rule is to be written
        self._probed: trio.Event | None = None

    def sync_rules(self) -> None:
        """The rule file names the types trapped now; none while the upcall is not known to
        work (a write waits for _install_rules' probe), none without traps."""
        types = [t for ck in self.queue.containers.values() for t in ck.traps]
        if types and not self._upcall_ok:
            if self._upcall_ok is None:
                return
            types = []
        try:
            self.rules.write(types)
        except OSError as e:
            log.warning("could not write the request-key rule %s: %s", self.rules.path, e)

    async def install_rules(self) -> None:
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
        self.sync_rules()

    async def serve(self, conn: Client, req: protocol.KeyUpcall
                            ) -> tuple[UpcallReply | None, list[int]]:
        """A key the kernel constructs, from our rule's handler: the host's business (the
        handler hands it to the host's rules), or a container's request for its creator."""
        peer = conn.peer
        if peer.uid != 0 or self.hooks.member_of(peer) is not None:
            raise OSError(errno.EPERM, "only the kernel's request-key handler (root, in no "
                                       "container) may hand over key requests")
        ck = next((k for k in self.queue.containers.values() if k.session == req.session), None)
        trap = (ck.trap_for(req.type) if ck is not None and req.type
                and not req.type.startswith(".") else None)
        if ck is None or trap is None:
            return UpcallReply(host=True), []
        negative = ck.negative.get((req.type, req.description))
        if negative is not None:
            left = negative[0] - time.monotonic()
            if left > 0:
                return UpcallReply(action="reject", reject_errno=negative[1],
                                   timeout_ms=math.ceil(left * 1000)), []
            del ck.negative[(req.type, req.description)]
        if len(ck.pending) >= MAX_PENDING:
            return UpcallReply(action="reject", reject_errno=errno.EAGAIN), []
        up = Upcall(req.key)
        # Not in ck.waiting: the kernel already makes one construction of a key at a time.
        p = Pending(self.queue.next_rid(), trap, req.type, req.description, req.callout_info, req.uid,
                    req.gid, 0, [], upcall=up)
        self.queue.open(ck, p)
        sock = conn.sock
        try:
            await sock.send(protocol.encode(UpcallReply(queued=round(trap.timeout * 1000))))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._until_handler_gone, ck, p, sock)
                await up.told.wait()
                nursery.cancel_scope.cancel()
            if not up.gone and up.answer is not None:
                await sock.send(protocol.encode(up.answer))
                if up.answer.action == "instantiate":
                    with trio.move_on_after(UPCALL_REPORT_S):
                        data = await sock.recv(protocol.MAX_MESSAGE)
                        done = protocol.decode_request(data) if data else None
                        if isinstance(done, protocol.KeyUpcallDone):
                            up.result = done.errno
        except (OSError, protocol.ProtocolError) as e:
            log.info("container %d: request-key handler of key %d: %s", ck.cid, req.key, e)
        finally:
            self.queue.finish(ck, p, error=errno.ENOKEY)  # if nobody answered it yet
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
        self.queue.finish(ck, p, error=errno.ENOKEY)

