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

import errno
import logging
import os
import socket
from typing import Any


from syscalls import keys, protocol, seccomp_notify
from syscalls.replies import Intercepting, Removed, Reply, Staged
from syscalls.keys import KEY_ALL, KEY_LINK, KEY_VIEW, KEY_WRITE

from ..process import Peer
from ..record import Container
from ..states import State
from .hooks import Client, Hooks
from .registry import Registry, destroy, perm
from .upcall import Rules
from .state import (
    MAX_TIMEOUT_MS,
    MAX_TRAPS,
    SESSION_PERM,
    SLOT_PERM,
    Channel,
    ContainerKeys,
    Trap,
    quota_error,
)
from .queue import RequestQueue
from .trapped import TrappedCalls
from .upcalls import Upcalls

log = logging.getLogger("containerfs")


class KeyringService:
    def __init__(self, hooks: Hooks) -> None:
        self.hooks = hooks
        self.registry = Registry(hooks.runtime_dir)
        self.queue = RequestQueue(hooks)
        self.containers = self.queue.containers  # one dict: every part sees the same
        self.trapped = TrappedCalls(hooks, self.queue)
        self.rules = Rules(hooks.runtime_dir)
        self.upcalls = Upcalls(hooks, self.queue, self.rules)

    def create_session(self, cid: int, owner: int, group: int) -> ContainerKeys:
        """Make container `cid`'s session keyring, owned by (and counted against) `owner`."""
        secret = os.urandom(16).hex()  # the name is what a process joins it by
        serial = self.registry.make(cid, "s", secret)
        try:
            keys.setperm(serial, SESSION_PERM)
            keys.chown(serial, owner, group)
        except OSError as e:
            destroy(serial)
            raise quota_error(e, owner, f"container {cid}'s session keyring") from None
        ck = ContainerKeys(cid, owner, group, serial, Registry.name_of(cid, "s", secret))
        self.containers[cid] = ck
        return ck

    def discard(self, cid: int) -> None:
        """The container was never made, or is dead: its keyrings go, its requests fail."""
        ck = self.containers.pop(cid, None)
        if ck is None:
            return
        for p in list(ck.pending.values()):
            self.queue.finish(ck, p, error=errno.ENOKEY)
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
        return {"name": ck.name, "serial": ck.session, "owner": ck.owner}

    def _keys_of(self, c: Container) -> ContainerKeys:
        ck = self.containers.get(c.id)
        if ck is None:
            raise OSError(errno.ECANCELED, f"container {c.id} is dead")
        return ck

    async def dispatch(self, conn: Client, req: protocol.Request,
                       fds: list[int]) -> tuple[Reply | None, list[int]]:
        """Serve one keyring request. A listener fd or a channel's handle is taken out of
        `fds` (the connection closes what is left in it)."""
        if isinstance(req, protocol.KeyListener):
            self.trapped.take_listener(conn, fds)
            return None, []
        if isinstance(req, protocol.KeyUpcall):
            return await self.upcalls.serve(conn, req)
        if isinstance(req, protocol.KeyUpcallDone):
            raise protocol.ProtocolError("key_upcall_done outside an upcall")
        c = self.hooks.lookup(fds[0])
        peer = conn.peer
        if isinstance(req, protocol.KeyringStage):
            self.hooks.check_manager(peer, c, "set the keyring of")
            return Staged(self._stage(self._keys_of(c), peer)), []
        if isinstance(req, protocol.KeyringAttach):
            self.hooks.check_manager(peer, c, "set the keyring of")
            self._attach(self._keys_of(c), peer, req.keyring)
            return Reply(), []
        if isinstance(req, protocol.KeyIntercept):
            self.hooks.check_manager(peer, c, "intercept key requests of")
            ck = self._keys_of(c)
            trap = self._add_trap(ck, peer, req)
            await self.upcalls.install_rules()  # "from now on" holds for the kernel's requests too
            reply = Intercepting(trap.record_ring)
            if not req.bind:
                return reply, []
            return await self._serve_channel(conn, fds, ck, reply, trap)
        if isinstance(req, protocol.KeyUnintercept):
            self.hooks.check_manager(peer, c, "intercept key requests of")
            ck = self._keys_of(c)
            if req.all:
                traps = list(ck.traps.values())
            else:
                keys.check_type(req.type)
                traps = [ck.traps[req.type]] if req.type in ck.traps else []
            for trap in traps:
                self._drop_trap(ck, trap)
            return Removed(len(traps)), []
        if isinstance(req, protocol.KeyListen):
            self.hooks.check_manager(peer, c, "intercept key requests of")
            return await self._serve_channel(conn, fds, self._keys_of(c), Reply(), None)
        if isinstance(req, protocol.KeyAnswer):
            self.hooks.check_manager(peer, c, "answer key requests of")
            return await self.queue.answer(self._keys_of(c), req), []
        raise protocol.ProtocolError(f"unhandled op {req.op}")

    async def _serve_channel(self, conn: Client, fds: list[int], ck: ContainerKeys,
                             reply: Reply, trap: Trap | None) -> tuple[Reply | None, list[int]]:
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
                raise quota_error(e, peer.uid, "a keyring link") from None
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
            raise quota_error(e, ck.owner, "the container keyring") from None
        ck.slot = slot
        destroy(ck.stage)
        ck.stage, ck.stage_uid = 0, -1

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
                raise quota_error(e, peer.uid, "a trap's record keyring") from None
            trap.record_ring = ring
        ck.traps[req.type] = trap
        return trap

    def _drop_trap(self, ck: ContainerKeys, trap: Trap) -> None:
        if ck.traps.get(trap.type) is trap:
            del ck.traps[trap.type]
        for p in list(ck.pending.values()):
            if p.trap is trap:
                self.queue.finish(ck, p, error=errno.ENOKEY)
        if trap.record_ring:
            destroy(trap.record_ring)
            trap.record_ring = 0
        if trap.channel is not None:
            trap.channel.close()
        self.upcalls.sync_rules()

    def recover(self, held: dict[str, dict[str, int]]) -> None:
        """Take back the keyrings of adopted containers and the listeners the keeper held;
        fail the calls that were waiting when the previous service died."""
        slots: dict[int, int] = {}
        traps: list[tuple[int, Trap]] = []
        for entry in self.registry.entries():
            c = self.hooks.live(entry.cid)
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
            self.trapped.add_listener(key, fds["l"], keep=False)
        for key in [k for k in held if k.startswith("kn.")]:
            fds = held.pop(key)
            notif_id = int(key.rsplit(".", 1)[1])
            seccomp_notify.notif_send(fds["l"], notif_id, error=errno.ENOKEY)
            os.close(fds["l"])
            self.hooks.let_go(key)
        # A rule file left by the previous service says what its traps were; now it says ours.
        self.upcalls.sync_rules()
        if any(ck.traps for ck in self.containers.values()):
            self.hooks.nursery.start_soon(self.upcalls.install_rules)

    def close(self) -> None:
        """The service stops: its request-key rule goes; with no container left, nothing of
        ours stays in the kernel."""
        self.rules.remove()
        if not self.containers:
            self.registry.remove()
