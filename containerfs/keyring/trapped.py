"""Trapped request_key() calls: the seccomp listener each process forked into a container
hands over, and each call it traps, let through (the kernel's own path), failed, or queued
for the container's manager when the container traps the type and has no such key."""

from __future__ import annotations

import errno
import logging
import os
import select
import time

import trio

from syscalls import linux, keys, seccomp_notify

from .hooks import Client, Hooks
from .state import (
    MAX_PENDING,
    NOT_FOUND,
    SECCOMP_NOTIFY_LINK,
    ContainerKeys,
    Listener,
    Pending,
    Trap,
    Waiter,
    fs_ids,
)
from .queue import RequestQueue

log = logging.getLogger("containerfs")


class TrappedCalls:
    """request_key() calls trapped by the seccomp listeners of processes forked in."""

    def __init__(self, hooks: Hooks, queue: RequestQueue) -> None:
        self.hooks = hooks
        self.queue = queue
        self._boot = f"{os.getpid()}.{time.monotonic_ns()}"
        self._nlisteners = 0

    def take_listener(self, conn: Client, fds: list[int]) -> None:
        """Keep the one seccomp listener of the process a connection forked; ignore anything
        else (a flood of fds must never be kept, here or by the keeper)."""
        # One way: this must never answer (the fork's caller reads that connection).
        if conn.fork_container is None:
            log.warning("pid %d sent a seccomp listener without a fork; ignored", conn.peer.pid)
            return
        kind = linux.fd_link(fds[0])
        if kind != SECCOMP_NOTIFY_LINK:
            log.warning("pid %d sent a key listener that is no seccomp listener (%s); ignored",
                        conn.peer.pid, kind)
            return
        if conn.listener_taken:
            log.warning("pid %d sent a second seccomp listener for one fork; ignored",
                        conn.peer.pid)
            return
        conn.listener_taken = True
        fd = fds.pop()
        self._nlisteners += 1
        self.add_listener(f"kl.{self._boot}.{self._nlisteners}", fd)

    def add_listener(self, key: str, fd: int, keep: bool = True) -> None:
        listener = Listener(key, fd)
        if keep:
            self.hooks.keep(key, {"l": fd})
        self.hooks.nursery.start_soon(self._serve_listener, listener)

    async def _serve_listener(self, listener: Listener) -> None:
        poller = select.poll()
        poller.register(listener.fd, select.POLLIN)
        try:
            while True:
                await trio.lowlevel.wait_readable(listener.fd)
                events = dict(poller.poll(0)).get(listener.fd, 0)
                if events & select.POLLIN:
                    notif = seccomp_notify.notif_recv(listener.fd)
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
            self.hooks.let_go(listener.key)

    def _on_notif(self, listener: Listener, n: seccomp_notify.Notification) -> None:
        """Answer a trapped request_key() now, or queue it for the container's manager."""
        try:
            answer = self._classify(listener, n)
        except Exception:
            log.exception("trapped request_key of pid %d", n.pid)
            answer = errno.ENOKEY
        if answer is None:
            return  # queued, or its caller is gone
        if answer == 0:
            seccomp_notify.notif_send(listener.fd, n.id, continue_=True)
        else:
            seccomp_notify.notif_send(listener.fd, n.id, error=answer)

    def _classify(self, listener: Listener, n: seccomp_notify.Notification) -> int | None:
        """0: let the kernel carry on; an errno: fail with it; None: queued (or gone).

        Cheapest checks first: most calls are let through. A reply to a call that is no
        longer waiting is harmless (the kernel refuses it), so only queueing needs the proof
        that what was read belongs to the caller."""
        if not n.args[2]:
            return 0  # no callout info: the kernel constructs nothing (ENOKEY); nothing to trap
        cid = self.hooks.container_id_of(n.pid)
        ck = self.queue.containers.get(cid) if cid is not None else None
        if ck is None or not ck.traps:
            return 0  # not in a container, or nothing trapped: untouched
        try:
            mem = os.open(f"/proc/{n.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return 0  # gone
        try:
            raw_type = seccomp_notify.read_cstring(mem, n.args[0], keys.KEY_TYPE_MAX)
            key_type = raw_type.decode("utf-8", "surrogateescape") if raw_type else ""
            trap = ck.trap_for(key_type) if key_type and not key_type.startswith(".") else None
            if trap is None:
                return 0
            raw_desc = seccomp_notify.read_cstring(mem, n.args[1], keys.KEY_DESC_MAX)
            raw_callout = seccomp_notify.read_cstring(mem, n.args[2], keys.CALLOUT_MAX)
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
            if e.errno not in NOT_FOUND:
                return 0  # an unknown type, say: the kernel's own answer
        try:
            uid, gid = fs_ids(n.pid)
        except OSError:
            return None  # gone
        # What was read belongs to the process that made the call only if the call is still
        # waiting: then its pid cannot have been reused.
        if not seccomp_notify.notif_id_valid(listener.fd, n.id):
            return None
        return self._queue(ck, trap, listener, n, key_type, desc,
                           raw_callout.decode("utf-8", "surrogateescape"), uid, gid)

    def _queue(self, ck: ContainerKeys, trap: Trap, listener: Listener, n: seccomp_notify.Notification,
               key_type: str, desc: str, callout: str, uid: int, gid: int) -> int | None:
        """Make the call wait for the creator's answer (or join one that waits already)."""
        same = ck.waiting.get((key_type, desc, uid))
        if same is None and len(ck.pending) >= MAX_PENDING:
            return errno.EAGAIN
        waiter = Waiter(listener, n.id, f"kn.{listener.key}.{n.id}")
        # A copy of the listener under the call's cookie: a restarted service can still fail
        # the call rather than leave it waiting forever.
        self.hooks.keep(waiter.keep_key, {"l": listener.fd})
        if same is not None:
            same.waiters.append(waiter)  # one construction at a time, as the kernel does
            return None
        p = Pending(self.queue.next_rid(), trap, key_type, desc, callout, uid, gid, n.pid, [waiter])
        ck.waiting[p.what] = p
        self.queue.open(ck, p)
        return None

