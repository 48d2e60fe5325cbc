"""The service's core, put together: the registry of containers, the access policy, their
life and death, forks into them, their filesystems and keyrings; and the recovery of what a
previous service left.

Runs inside the service's trio loop. Every privileged act is preceded by a check of the peer's
credentials against the container (the contract's first rule: never lend the service's
privilege).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import trio

from syscalls.constants import CONTAINER_NEW_EMPTY_FS_NS
from syscalls.fd import Fd

from .cgroups import CgroupTree
from .fdstore import FdStore
from .filesystems import Filesystems
from .forking import Forks
from .keyring.hooks import Hooks
from .keyring.service import KeyringService
from .confining import Confiner
from .lifecycle import Lifecycle
from .limiting import Limits
from .policy import Policy
from .process import pidfd_pid
from .record import Container
from .registry import Registry
from .states import State
from .store import Store, decode_row

log = logging.getLogger("containerfs")


class Service:
    def __init__(self, store: Store, cgroups: CgroupTree, nursery: trio.Nursery,
                 fdstore: FdStore, max_per_user: int = 1024, dead_linger: float = 30.0) -> None:
        self.reg = Registry(store, cgroups, nursery, fdstore)
        self.policy = Policy(self.reg.member_of, self._parent_of)
        self.keyrings = KeyringService(Hooks(
            runtime_dir=os.path.dirname(fdstore.path), nursery=nursery,
            keep=fdstore.put, let_go=fdstore.drop, lookup=self.reg.lookup,
            live=self.reg.containers.get, check_manager=self.policy.manager,
            member_of=self.reg.member_of, container_id_of=cgroups.container_id_of))
        self.life = Lifecycle(self.reg, self.policy, self.keyrings, max_per_user, dead_linger)
        self.confiner = Confiner(self.reg, self.policy)
        self.forks = Forks(self.reg, self.policy, self.life, self.keyrings, self.confiner)
        self.fs = Filesystems(self.reg, self.policy)
        self.limits = Limits(self.reg, self.policy)
        self.life.on_death = self.confiner.forget

    # ---- what the view and the control socket read ------------------------------------

    @property
    def containers(self) -> dict[int, Container]:
        return self.reg.containers

    @property
    def cgroups(self) -> CgroupTree:
        return self.reg.cgroups

    @property
    def on_change(self) -> Callable[[], None] | None:
        return self.reg.on_change

    @on_change.setter
    def on_change(self, hook: Callable[[], None] | None) -> None:
        self.reg.on_change = hook

    def _parent_of(self, cid: int) -> int | None:
        c = self.reg.containers.get(cid)
        return c.parent if c is not None else None

    def kill(self, c: Container) -> None:
        self.life.kill(c)

    # ---- recovery after a restart -------------------------------------------------------

    def recover(self) -> None:
        """Adopt the containers a previous service left, with the fds the keeper kept."""
        reg = self.reg
        held = reg.fdstore.get_all()
        for key, text in reg.fdstore.data.items():
            # A container made just before a crash: its row was still waiting to be written.
            row = decode_row(text) if key in held else None
            if row is not None and key == f"c{row['id']}" and not reg.store.has(row["id"]):
                reg.store.save(row, new_pipe=True)
        reg.ns.start(held)  # the namespaces' holder first: adoption reads it
        for row in reg.store.unremoved_rows():
            fds = held.pop(f"c{row['id']}", {})
            if row["state"] == State.DEAD.value or "w" not in fds or not self._adopt(row, fds):
                # Dead, or nothing kept its handles alive (the keeper died too): holders have
                # seen their hang-up already; make sure nothing of it runs on.
                for fd in fds.values():
                    os.close(fd)
                reg.cgroups.kill(row["id"])
                reg.nursery.start_soon(self.life.remove_cgroup, row["id"])
                row["state"] = State.DEAD.value
                reg.store.save({**row, "removed": 1})
                reg.fdstore.drop(f"c{row['id']}")
        reg.ns.sweep(set(reg.containers))  # what no adopted container uses
        reg.cgroups.settle_adopted(set(reg.containers))  # a first cpu limit left half done
        self.forks.recover(held)
        self.keyrings.recover(held)  # takes its own keys out of `held`
        for key, fds in held.items():
            for fd in fds.values():
                os.close(fd)
            reg.fdstore.drop(key)

    def _adopt(self, row: dict[str, Any], fds: dict[str, int]) -> bool:
        """Adopt one container (taking `fds`); False, taking nothing, if its namespaces
        were lost."""
        old = {name[3:]: fds.pop(name) for name in list(fds) if name.startswith("ns:")}
        keep_again = bool(old)
        if old and not self.reg.ns.recorded(row["id"]):
            # Kept as fds by a service of an earlier version: held the new way now.
            ns = self.reg.ns.hold(row["id"], old)
        else:
            root = fds.pop("root", None)
            # (`old`: copies of namespaces the holder had not bound yet, NsStore.fresh)
            found = self.reg.ns.adopt(row["id"], root, old)
            for fd in old.values():  # (copies of namespaces it does not use)
                os.close(fd)
            if found is None:
                log.warning("container %d: its namespaces were lost; it is dead", row["id"])
                return False
            ns = found
        wfd = fds.pop("w")
        init_pidfd = fds.pop("init", -1)
        st = os.fstat(wfd)
        c = self.reg.from_row(row, (st.st_dev, st.st_ino), wfd, ns)
        self.reg.cgroups.adopt(c.id, c.parent)  # rows come parents first (ids grow)
        if c.flags & CONTAINER_NEW_EMPTY_FS_NS and "root" in ns:
            c.new_ns = c.new_ns | {"mnt"}  # its root was set before the restart
        if init_pidfd >= 0:
            c.init_pidfd = Fd(init_pidfd)
            c.state = State.RUNNING
            pid = pidfd_pid(init_pidfd, checked=True)  # (ours, kept by the keeper)
            if pid > 0:  # the row's init_pid may not have been written before a crash
                c.init_pid = pid
            self.life.watch_init(c)
        # A fork cut short by the crash left no process: the container is as it was before.
        self.reg.add(c)
        self.reg.save_later(c.row())
        self.reg.watch_handle(c)  # if every handle closed while we were down, this fires at once
        if keep_again:
            self.reg.keep(c)  # the keeper lets its copies of the namespace fds go (if bound)
        log.info("container %d adopted (%s)", c.id, c.state.value)
        return True

    def close(self) -> None:
        self.reg.close()
        self.life.close()
        self.keyrings.close()
