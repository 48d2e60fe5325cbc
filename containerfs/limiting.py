"""Resource control through the handle (contract section 10): limits, usage, freeze and
thaw, applied live to the container's groups (resources.ResourceGroups hides the layout).

Checked in this order, before anything is written: who asks (EPERM: not the owner or root,
or from inside), whether the container lives (ECANCELED), then the name and value (EINVAL,
EOPNOTSUPP). Reading limits and usage needs only the handle.
"""

from __future__ import annotations


import trio

from syscalls.replies import LimitValue, Reply, Usage

from .policy import Policy
from .process import Peer
from .record import Container
from .registry import Registry


class Limits:
    def __init__(self, reg: Registry, policy: Policy) -> None:
        self.reg = reg
        self.policy = policy

    async def set(self, peer: Peer, c: Container, name: str, value: str) -> Reply:
        self.policy.manager(peer, c, "limit")
        c.check_alive()
        if self.reg.cgroups.needs_groups(c.id, name):
            # The first limit of a lazy controller makes groups and moves every process of
            # the container (a cgroup.procs write can stall): off the event loop.
            await trio.to_thread.run_sync(self.reg.cgroups.set_limit, c.id, name, value)
        else:
            self.reg.cgroups.set_limit(c.id, name, value)
        self.reg.changed()  # the view's limits/ shows it
        return Reply()

    def get(self, c: Container, name: str) -> LimitValue:
        c.check_alive()
        return LimitValue(self.reg.cgroups.get_limit(c.id, name))

    def stats(self, c: Container) -> Usage:
        c.check_alive()
        return Usage(self.reg.cgroups.stats(c.id))

    async def freeze(self, peer: Peer, c: Container, frozen: bool) -> Reply:
        """Freeze (answered once every member is frozen: in a worker thread, as it waits) or
        thaw."""
        self.policy.manager(peer, c, "freeze" if frozen else "thaw")
        c.check_alive()
        if frozen:
            await trio.to_thread.run_sync(self.reg.cgroups.freeze, c.id)
        else:
            self.reg.cgroups.thaw(c.id)
        self.reg.changed()
        return Reply()
