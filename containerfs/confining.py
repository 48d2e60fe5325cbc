"""Confinement through the handle (contract section 11): a container's capability mask and
seccomp profile, set before its init starts and applied by every process forked in.

Checked in this order before anything is stored: who asks (EPERM: not the owner or root, or
from inside), whether init has started (EBUSY) or the container is dead (ECANCELED), then
the mask or profile (EINVAL, naming the fault). The profile is compiled here (libseccomp,
in a worker thread: it takes milliseconds) for the container's mask, once, and the program
handed to each fork: a forked process makes no libseccomp call.
"""

from __future__ import annotations

import base64
import errno

import trio

from syscalls.replies import Reply

from . import confine
from .policy import Policy
from .process import Peer
from .record import Container
from .registry import Registry
from .states import State


class Confiner:
    def __init__(self, reg: Registry, policy: Policy) -> None:
        self.reg = reg
        self.policy = policy
        # Compiled programs by container id: (base64 program, filter flags).
        self._programs: dict[int, tuple[str, int]] = {}

    def _check(self, peer: Peer, c: Container, what: str) -> None:
        self.policy.manager(peer, c, what)
        c.check_alive()
        if c.state != State.CREATED:
            raise OSError(errno.EBUSY, f"container {c.id} has started: its {what.split()[-1]} "
                                       "can only be set before its first fork")

    async def set_caps(self, peer: Peer, c: Container, mask: int) -> Reply:
        self._check(peer, c, "confine the capabilities")
        mask = confine.check_caps(mask)
        if peer.uid != 0 and "user" not in c.new_ns:
            # Dropping from the bounding set needs CAP_SETPCAP, which a process of another
            # user has only inside a user namespace of its own.
            raise OSError(errno.EPERM, f"container {c.id} has no user namespace: only root "
                                       "can limit its capabilities")
        c.caps = mask
        if c.seccomp is not None:  # a profile's caps-dependent rules follow the mask
            await self._compile(c)
        self._saved(c)
        return Reply()

    async def set_seccomp(self, peer: Peer, c: Container, profile: str) -> Reply:
        self._check(peer, c, "confine the system calls")
        checked = await trio.to_thread.run_sync(confine.check_profile, profile)
        if c.state != State.CREATED:  # init started while the profile was checked
            raise OSError(errno.EBUSY, f"container {c.id} has started")
        c.seccomp = checked
        await self._compile(c)
        self._saved(c)
        return Reply()

    async def _compile(self, c: Container) -> None:
        assert c.seccomp is not None
        filt = await trio.to_thread.run_sync(confine.compile_for, c.seccomp, c.caps)
        self._programs[c.id] = (base64.b64encode(filt.program).decode(), filt.flags)

    def _saved(self, c: Container) -> None:
        # Written now: a crash a moment later must not leave it unconfined after the restart.
        self.reg.store.save(c.row())
        self.reg.changed()

    async def prepare(self, c: Container) -> None:
        """Make sure the program of `c`'s profile is compiled (after a restart it is not)."""
        if c.seccomp is not None and c.id not in self._programs:
            await self._compile(c)

    def program(self, c: Container) -> tuple[str, int] | None:
        """(base64 program, flags) of `c`'s filter; None without a profile. Raises EAGAIN if
        a profile is set but not compiled yet (prepare() first)."""
        if c.seccomp is None:
            return None
        got = self._programs.get(c.id)
        if got is None:
            raise OSError(errno.EAGAIN, f"container {c.id}'s seccomp profile is not compiled")
        return got

    def forget(self, c: Container) -> None:
        self._programs.pop(c.id, None)
