"""The queue of key requests waiting for a container's manager: a request is opened
(recorded, sent to its trap's manager, failed after its timeout), answered (instantiated,
negated, rejected) and finished, once, for every caller waiting on it."""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import time

import trio

from syscalls import keys, protocol, replies, seccomp_notify
from syscalls.replies import Instantiated, UpcallReply
from syscalls.keys import KEY_ALL

from .hooks import Hooks
from .registry import destroy, perm
from .state import (
    NOT_FOUND,
    UPCALL_REPORT_S,
    ContainerKeys,
    Pending,
)

log = logging.getLogger("containerfs")


class RequestQueue:
    """The requests of every container that wait for an answer, by container."""

    def __init__(self, hooks: Hooks) -> None:
        self.hooks = hooks
        self.containers: dict[int, ContainerKeys] = {}
        self._rid = 0

    def next_rid(self) -> int:
        self._rid += 1
        return self._rid

    def open(self, ck: ContainerKeys, p: Pending) -> None:
        """Make `p` wait: recorded, sent to its trap's manager, failed after its timeout."""
        ck.pending[p.rid] = p
        self._record(ck, p)
        event = p.event(ck.cid)
        if p.trap.channel is not None:
            p.trap.channel.push(event)
        else:
            for channel in ck.listeners:
                channel.push(event)
        self.hooks.nursery.start_soon(self._expire, ck, p)

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
            payload = json.dumps({k: v for k, v in replies.to_json(p.event(ck.cid)).items()
                                  if k != "event"})
            p.record = keys.add_key("user", f"containerfs:{ck.cid}:{p.rid}", payload.encode(),
                                    trap.record_ring)
            keys.chown(p.record, trap.owner, trap.group)
        except OSError as e:
            log.warning("container %d: no record of request %d: %s", ck.cid, p.rid, e)
            if p.record:
                destroy(p.record)
                p.record = 0

    def finish(self, ck: ContainerKeys, p: Pending, *, error: int = 0,
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
            destroy(p.record, p.trap.record_ring)
        for w in p.waiters:
            if not w.listener.closed:
                seccomp_notify.notif_send(w.listener.fd, w.notif_id, error=error, continue_=continue_)
            self.hooks.let_go(w.keep_key)
        if p.upcall is not None:
            p.upcall.tell(UpcallReply(action="instantiate", payload=payload)
                          if payload is not None else
                          UpcallReply(action="reject", reject_errno=error or errno.ENOKEY,
                                      timeout_ms=timeout_ms))
        p.done.set()

    async def _expire(self, ck: ContainerKeys, p: Pending) -> None:
        with trio.move_on_after(p.trap.timeout):
            await p.done.wait()
        if not p.finished:
            log.info("container %d: request for %s %r not answered in %.1fs", ck.cid, p.type,
                     p.description, p.trap.timeout)
            self.finish(ck, p, error=errno.ENOKEY)

    async def answer(self, ck: ContainerKeys, req: protocol.KeyAnswer) -> Instantiated:
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
                return Instantiated(await self._instantiate_upcall(ck, p, req.payload))
            return Instantiated(self._instantiate(ck, p, payload))
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
        self.finish(ck, p, error=err, timeout_ms=req.timeout_ms)
        return Instantiated()

    def _instantiate(self, ck: ContainerKeys, p: Pending, payload: bytes) -> int:
        """Make the key in the container's session keyring, owned by the requester (so it
        counts against the requester's quota), and let the requester's call find it."""
        try:
            try:
                serial = keys.search(ck.session, p.type, p.description)
            except OSError as e:
                if e.errno not in NOT_FOUND:
                    raise
                serial = keys.add_key(p.type, p.description, payload, ck.session)
                try:
                    keys.chown(serial, p.uid, p.gid)
                except OSError:
                    destroy(serial)
                    raise
        except OSError as e:
            self.finish(ck, p, error=e.errno or errno.EIO)
            if e.errno == errno.EDQUOT:
                raise OSError(errno.EDQUOT, f"uid {p.uid} has no key quota left for the key "
                                            "(kernel.keys.maxkeys / maxbytes)") from None
            raise
        # The key is known to exist now: the kernel's own request_key finds it, links it where
        # the caller asked and returns it, with every check made as the caller.
        self.finish(ck, p, continue_=True)
        return serial

    async def _instantiate_upcall(self, ck: ContainerKeys, p: Pending, payload: str) -> int:
        """The handler instantiates the key under construction; its errno is the answer's."""
        assert p.upcall is not None
        up = p.upcall
        self.finish(ck, p, payload=payload)
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

