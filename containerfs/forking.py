"""fork_into_container, the service's half: the plan a forking process follows (what it
enters, in which order), and the record of the process it made.

The caller makes the process itself (it must be its parent); the service only grants the
fork, hands over the namespace fds, and believes the reported process once its pidfd shows it
where the container's processes are.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from collections.abc import Callable
from typing import Any

import trio

from syscalls import linux
from syscalls.constants import CONTAINER_NEW_PID_NS
from syscalls.fd import Fd
from syscalls.replies import ForkGrant
from syscalls.nstypes import NAMES

from .confining import Confiner
from .keyring.service import KeyringService
from .lifecycle import Lifecycle
from .policy import Policy
from .process import Peer, pid_namespace, pidfd_exited, pidfd_pid
from .record import Container
from .registry import Registry
from .resources import Origin
from .states import State, check_transition

# Forks.plan_key: what decides a plan's fds, and what decides the rest of its reply.
PlanKey = tuple[tuple[object, ...], tuple[object, ...]]
# A plan create sent: (container id, its PlanKey, the names of its fds).
Planned = tuple[int, PlanKey, list[str]]

log = logging.getLogger("containerfs")

# Order in which a forking process enters namespaces. The creator's own (not asked-for) ones
# come first, while the process still has its host privileges; then the new user namespace,
# whose capabilities it needs to enter the others the container owns.
ENTRY_ORDER = tuple(t for t in NAMES if t not in ("user", "pid"))


class Forks:
    def __init__(self, reg: Registry, policy: Policy, life: Lifecycle,
                 keyrings: KeyringService, confiner: Confiner) -> None:
        self.reg = reg
        self.policy = policy
        self.life = life
        self.keyrings = keyrings
        self.confiner = confiner
        self._origins: dict[Peer, Origin] = {}  # a non-root intermediate -> its own groups
        # ... and the container, and its groups in lazy hierarchies (lazy_return).
        self._lazy: dict[Peer, tuple[int, dict[str, str]]] = {}
        # Forks whose connections the keeper held across a restart (see recover).
        self._pending: list[tuple[str, int, Container, str]] = []
        self._boot = os.urandom(4).hex()  # keeper keys of this run never meet an older one's
        self._count = 0

    # ---- granting a fork ----------------------------------------------------------------

    async def begin(self, peer: Peer, c: Container,
                    planned: Planned | None = None
                    ) -> tuple[ForkGrant, list[int]]:
        """Check a fork and return what the intermediate must enter: (reply, fds it names).
        `planned`: (container id, plan_key, fd names) of the plan its caller holds: if that
        plan still holds, the reply says so (as_planned) and carries no fds; if its fds do,
        the reply says so (plan_fds), with the rest of it, and carries none."""
        self.policy.owner(peer, c, "fork into")
        # Its filter compiled (once, off the event loop) before the state is looked at: no
        # await comes between that look and the fork's grant.
        await self.confiner.prepare(c)
        while True:
            while c.state == State.STARTING:  # another caller is making init: wait for it
                await c.started.wait()
            if c.state == State.CREATED and c.proc_mounts:
                # A proc placeholder is being mounted: init must be told of it.
                await c.proc_mounts_idle.wait()
                continue
            break
        c.check_alive()
        if "root" not in c.ns:
            raise OSError(errno.ENOENT, f"container {c.id} has no root filesystem yet")
        role = "init" if c.state == State.CREATED else "member"
        fds: list[int] = []
        key = self.plan_key(peer, c, role) if planned is not None and planned[0] == c.id \
            else None
        if planned is not None and planned[1] == key:
            reply = ForkGrant(role=role, fds=[], id=c.id, as_planned=True)
        elif planned is not None and key is not None and planned[1][0] == key[0]:
            # The plan's fds hold (a proc placeholder mounted since, say): only the rest of
            # the reply is sent again.
            reply = self._grant(c, role, planned[2], plan_fds=True)
        else:
            reply, fds = self._plan(peer, c, role)
        if peer.uid != 0:
            # Others may not place a process with CLONE_INTO_CGROUP; move the intermediate
            # itself, before it makes the child, and back out once the child is reported
            # (return_intermediate), so that the container's death, however early, never
            # kills the intermediate.
            try:
                # In every hierarchy, the pid written only while the pidfd shows it unreaped.
                lazy: dict[str, str] = {}
                self._origins[peer] = self.reg.cgroups.place(
                    c.id, peer.pidfd.fileno(), peer.pid, v2=True, lazy=lazy)
                # A first cpu limit set meanwhile would move it in with the container's
                # processes: where it was there, to move it back.
                if lazy:
                    self._lazy[peer] = (c.id, lazy)
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
        if role == "init":
            check_transition(c.state, State.STARTING)
            c.state = State.STARTING
            c.started = trio.Event()
            self.reg.changed()
        return reply, fds

    def creator_plan(self, peer: Peer, c: Container) -> tuple[ForkGrant, list[int]] | None:
        """For root's container_create: what its first fork will be told to enter, so it can
        make the process while the Fork request is on its way (the reply then confirms it).
        None where that fork takes an intermediate anyway (a user namespace) or cannot be."""
        if peer.uid != 0 or "root" not in c.ns or "user" in c.new_ns or c.seccomp is not None:
            return None  # (a fresh container has no profile yet: the plan is made at create)
        return self._plan(peer, c, "init")

    def plan_key(self, peer: Peer, c: Container, role: str) -> PlanKey:
        """Everything _plan reads, with no fd opened, in two parts: what decides its fds (the
        namespaces by inode, the groups by path) and what decides the rest of its reply.
        Equal keys, equal plans."""
        return ((role, peer.uid, c.flags, c.new_ns, tuple(sorted(c.ns.ids.items())), c.ns.root,
                 self.reg.cgroups.v1_groups(c.id)),
                (repr(c.proc_paths) if role == "init" else "", repr(self.keyrings.fork_info(c)),
                 c.caps, self.confiner.program(c)))

    def _plan(self, peer: Peer, c: Container, role: str) -> tuple[ForkGrant, list[int]]:
        """What a fork in `role` enters, in order: (reply, the fds it names). No side effect
        but the fds, which are the reply's own copies."""
        names: list[str] = []
        fds: list[int] = []

        def add(name: str, fd: int) -> None:
            names.append(name)
            fds.append(os.dup(fd))  # the reply's own copy, closed once sent

        try:
            self._add_fds(peer, c, role, add)
            reply = self._grant(c, role, names)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return reply, fds

    def _grant(self, c: Container, role: str, names: list[str], **extra: Any) -> ForkGrant:
        """The reply of a fork in `role` whose fds are `names`."""
        program, flags = self.confiner.program(c) or ("", 0)
        return ForkGrant(role=role, fds=names, id=c.id,
                         new_pid_ns=role == "init" and bool(c.flags & CONTAINER_NEW_PID_NS),
                         proc_paths=list(c.proc_paths) if role == "init" else [],
                         keyring=self.keyrings.fork_info(c), caps=c.caps,
                         seccomp=program, seccomp_flags=flags, **extra)

    def _add_fds(self, peer: Peer, c: Container, role: str,
                 add: Callable[[str, int], None]) -> None:
        """The fds of a fork in `role`, in the order they are entered."""
        if "user" not in c.new_ns:
            add("ns:user", c.ns["user"])
        for nstype in ENTRY_ORDER:
            if nstype not in c.new_ns:
                add(f"ns:{nstype}", c.ns[nstype])
        if "user" in c.new_ns:
            add("ns:user", c.ns["user"])
        for nstype in ENTRY_ORDER:
            if nstype in c.new_ns:
                add(f"ns:{nstype}", c.ns[nstype])
        if role == "member" or not c.flags & CONTAINER_NEW_PID_NS:
            add("ns:pid", c.ns["pid"])
        add("root", c.ns["root"])
        if peer.uid == 0:
            # Root may place a process with CLONE_INTO_CGROUP: no cgroup.procs write, no stall.
            # The v1 groups (limits on a hybrid host) it joins itself, writing "0" to their
            # cgroup.procs before it runs anything: only for root, as v1 checks the opener.
            for name, fd in [("cgroup", self.reg.cgroups.open(c.id))] + [
                    ("cgroup.v1", fd) for fd in self.reg.cgroups.open_procs(c.id)]:
                try:
                    add(name, fd)
                finally:
                    os.close(fd)

    # ---- the outcome --------------------------------------------------------------------

    def abort(self, c: Container, role: str) -> None:
        """The intermediate failed or vanished before reporting a process."""
        if role == "init" and c.state == State.STARTING:
            c.state = State.CREATED
            c.started.set()
            self.reg.changed()
            if c.kill_pending:
                self.life.kill(c)

    def finish(self, c: Container, role: str, pidfd: int, reported_pid: int = 0) -> int:
        """Record the process the intermediate made; return its pid. Takes `pidfd`.

        `reported_pid` (non-zero only for root's one-way report) is trusted for a process
        already reaped: its caller reaps without waiting for us.
        """
        if role == "init" and c.state != State.STARTING:
            # Recorded already (a report read again after a restart, control.Connection), or
            # the container is dead meanwhile: nothing to record.
            os.close(pidfd)
            return c.init_pid if c.init_pid is not None else reported_pid
        try:
            pid = pidfd_pid(pidfd)
            placed = pid > 0 and self.reg.cgroups.container_id_of_pidfd(pidfd, pid) == c.id
            # Trust the pidfd only if its process is where the container's processes are. A
            # process reaped meanwhile cannot be looked at any more: only root's own report
            # of it is believed (anyone else could pass off some other dead process as init
            # and choose the container's exit status).
            if not placed:
                if pidfd_pid(pidfd, checked=True) > 0 or reported_pid <= 0:
                    raise OSError(errno.EINVAL,
                                  "reported process is not in the container's cgroup")
                pid = reported_pid
            elif c.state == State.DEAD:
                # Made while the container died (its group killed before the process was in
                # it): a dead container's members are killed, this one too. Only a process
                # in the container's group is ever signalled.
                try:
                    linux.pidfd_send_signal(pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                raise OSError(errno.ECANCELED, f"container {c.id} died while the process "
                                               "was being made; it was killed")
            else:
                try:
                    # Into the container's groups made since its fork was granted (a first
                    # cpu limit meanwhile, containerfs.lazygroups); a no-op without any.
                    owed = self.reg.cgroups.complete(c.id, pidfd, pid)
                    if owed:  # (its children, if it made any already: off the event loop)
                        self.reg.nursery.start_soon(self._sweep_owed, c.id, owed)
                except ProcessLookupError:
                    pass  # exited meanwhile: nothing to limit
        except BaseException:
            os.close(pidfd)
            self.abort(c, role)
            raise
        if role != "init":
            os.close(pidfd)
            return pid
        c.init_pid, c.init_pidfd = pid, Fd(pidfd)
        # (An init that has exited already, as a short command's has by its report, makes
        # the container dead at once: nobody will join its PID namespace.)
        if c.flags & CONTAINER_NEW_PID_NS and placed and not pidfd_exited(pidfd):
            try:
                c.ns.put("pid", pid_namespace(pidfd, pid))
            except (FileNotFoundError, ProcessLookupError):
                pass  # init already reaped: nobody can join its PID namespace anyway
        check_transition(c.state, State.RUNNING)
        c.state = State.RUNNING
        c.started.set()
        self.reg.changed()
        self.reg.save_later(c.row())
        self.reg.keep(c)
        self.life.watch_init(c)
        if c.kill_pending:
            self.life.kill(c)
        return pid

    async def _sweep_owed(self, cid: int, bases: list[str]) -> None:
        try:
            await trio.to_thread.run_sync(self.reg.cgroups.sweep_owed, cid, bases)
        except Exception:  # (a restarted service settles it: settle_adopted)
            log.exception("container %d: its processes not all moved into its groups", cid)

    def return_intermediate(self, peer: Peer) -> None:
        """Move a non-root caller's intermediate back to its own cgroup after a fork."""
        origin = self._origins.pop(peer, None)
        cid, lazy = self._lazy.pop(peer, (0, {}))
        if origin is not None and lazy:
            origin.update(self.reg.cgroups.lazy_return(cid, lazy))
        if origin is not None:
            try:
                self.reg.cgroups.unplace(origin, peer.pidfd.fileno(), peer.pid)
            except (OSError, ValueError) as e:  # gone, or its group went away: nothing left to protect
                log.debug("intermediate %d stays: %s", peer.pid, e)

    # ---- the fork's connection, kept by the keeper ------------------------------------

    def key(self, c: Container, role: str) -> str:
        """A new keeper key for the connection of a fork into `c` as `role`."""
        self._count += 1
        return f"fork.{c.id}.{role}.{self._boot}.{self._count}"

    def recover(self, held: dict[str, dict[str, int]]) -> None:
        """Take the connections of forks in progress out of `held`: what their callers
        reported (Started, listeners) may still wait in them, unread."""
        for key in [k for k in held if k.startswith("fork.")]:
            fd = held.pop(key)["s"]
            _, cid, role, _ = key.split(".", 3)
            c = self.reg.containers.get(int(cid))
            if c is None or c.state == State.DEAD:
                os.close(fd)
                self.reg.fdstore.drop(key)
                continue
            if role == "init" and c.state == State.CREATED:
                c.state = State.STARTING  # until its report is read, or its caller is gone
                c.started = trio.Event()
            self._pending.append((key, fd, c, role))

    def take_pending(self) -> list[tuple[str, int, Container, str]]:
        """(keeper key, socket fd, container, role) of each fork to read on; once."""
        out, self._pending = self._pending, []
        return out
