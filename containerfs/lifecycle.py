"""How a container is born and dies: container_create, init's death, kill, the last close.

Runs in the service's trio loop; what blocks (a namespace helper's fork) runs in a worker
thread. At death every kernel resource the container held is released; what lingers (for
container_wait on a held handle) is data.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from collections.abc import Callable

import trio

from syscalls import linux, validate
from syscalls.constants import CONTAINER_KILL_ON_CLOSE, CONTAINER_NEW_EMPTY_FS_NS
from syscalls.fd import Fd

from . import namespaces
from .keyring.service import KeyringService
from .containerns import ContainerNs
from .nsmaker import Maker, MakerGone
from .process import Peer, pidfd_exited, pidfd_pid, stat_fields
from .record import Container, requested_namespaces
from .registry import Registry
from .policy import Policy
from .states import State, check_transition

log = logging.getLogger("containerfs")


class Lifecycle:
    def __init__(self, reg: Registry, policy: Policy, keyrings: KeyringService,
                 max_per_user: int = 1024, dead_linger: float = 30.0) -> None:
        self.reg = reg
        self.policy = policy
        self.keyrings = keyrings
        self.max_per_user = max_per_user
        self.dead_linger = dead_linger
        self.pool = namespaces.NamespacePool()
        self.mounts = namespaces.MountCopies()
        self.maker = Maker()
        reg.ns.close_ns = self.maker.close_ns
        # Told of each death (what other parts keep per container goes then).
        self.on_death: Callable[[Container], None] | None = None
        self.pool_wanted = trio.Event()

    # ---- container_create ---------------------------------------------------------------

    async def create(self, peer: Peer, raw_name: bytes, flags: int) -> tuple[Container, int]:
        """Make a container for `peer`; return it and the handle's read end."""
        validate.container_name(raw_name)
        validate.create_flags(flags, peer.uid)
        if peer.uid != 0 and self.reg.owned_by(peer.uid) >= self.max_per_user:
            raise OSError(errno.EAGAIN, f"uid {peer.uid} has {self.max_per_user} containers, "
                                        "its limit")
        if peer.uid != 0 and self.reg.fds_short():
            raise OSError(errno.EAGAIN, "the service is short of fds; try again later")
        # The PID namespace is born with init; the others are made now.
        new = sorted(requested_namespaces(flags) - {"pid"}, key=namespaces.NS_TYPES.index)
        # The creator's namespaces, for those not asked for, proven to be the connecting
        # process's: a recycled pid must not lend us someone else's.
        ns = peer.at_pid(namespaces.open_process_namespaces, namespaces.close_all)
        # A member's container is the new one's parent: its cgroup nests in the parent's.
        parent = self.reg.containers.get(self.reg.member_of(peer) or 0)
        cid = -1
        held: ContainerNs | None = None
        try:
            cid = self.reg.store.next_id()
            self.reg.cgroups.create(cid, parent=parent.id if parent else None)
            self.keyrings.create_session(cid, peer.uid, peer.gid)  # EAGAIN: key quota
            made, root_derived = await self._make_namespaces(peer, new, ns, cid,
                                                             pooled=parent is None)
            for nstype, fd in made.items():
                os.close(ns.pop(nstype))
                ns[nstype] = fd
            if flags & CONTAINER_NEW_EMPTY_FS_NS:
                os.close(ns.pop("root"))
            taken, ns = ns, {}
            held = self.reg.ns.hold(cid, taken, root_derived)  # takes the fds, whatever happens
            rfd, wfd = os.pipe2(os.O_CLOEXEC)
        except BaseException as e:
            namespaces.close_all(ns)
            if held is not None:
                held.close_all()
            if cid > 0:
                self.reg.cgroups.try_remove(cid)
                self.keyrings.discard(cid)
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise OSError(errno.EAGAIN, f"uid {peer.uid} has no user namespaces left "
                                            f"(user.max_user_namespaces): {e.strerror}") from None
            raise
        assert held is not None
        st = os.fstat(rfd)
        c = Container(id=cid, name=raw_name, flags=flags, owner=peer.uid, group=peer.gid,
                      parent=parent.id if parent else 1, pipe=(st.st_dev, st.st_ino), wfd=Fd(wfd),
                      ns=held, new_ns=requested_namespaces(flags))
        # Written once the reply is sent; the keeper's entry carries it meanwhile.
        self.reg.save_later(c.row(), new_pipe=True, soon=True)
        self.reg.keep(c)
        self.reg.add(c)
        return c, rfd

    async def _make_namespaces(self, peer: Peer, new: list[str], creator: dict[str, int],
                               cid: int, pooled: bool = True) -> tuple[dict[str, int], bool | None]:
        """The new namespaces of a container, as `peer` would make them: ({type: fd}, whether
        its root is known to be its mount namespace's, None if not known). The pool's (made
        in the service's own namespaces) only if `pooled` (not nested)."""
        made: dict[str, int] = {}
        root_derived: bool | None = None
        if peer.uid == 0 and "user" not in new and pooled:
            for nstype in new:
                fd = self.pool.take(nstype)
                if fd is not None:
                    made[nstype] = fd
            self.pool_wanted.set()
        rest = [t for t in new if t not in made]
        if rest == ["mnt"] and peer.uid == 0 and pooled:
            copy = self.mounts.take(creator)
            self.pool_wanted.set()
            if copy is not None:
                log.debug("container %d: its mount namespace is a copy made ahead", cid)
                made.update(copy)
                root_derived = self.mounts.root_derived
                rest = []
        try:
            if rest == ["mnt"] and peer.uid == 0:
                # Copying a mount namespace takes tens of microseconds: cheaper here than a
                # trip to a worker thread.
                made.update(namespaces.make_in_thread(rest, creator))
            elif rest:
                # Opened here, in the service's own mount namespace: the helper writes it
                # standing in nothing the caller controls.
                procs = (os.open(os.path.join(self.reg.cgroups.path(cid), "cgroup.procs"),
                                 os.O_WRONLY | os.O_CLOEXEC) if "cgroup" in rest else None)
                try:
                    made.update(await trio.to_thread.run_sync(
                        namespaces.make_namespaces, rest, creator,
                        namespaces.Credentials(peer.uid, peer.gid), procs))
                finally:
                    if procs is not None:
                        os.close(procs)
        except BaseException:
            namespaces.close_all(made)
            raise
        return made, root_derived

    async def fill_pool(self) -> None:
        """Forever: keep the namespace pool and the mount copies full, off the path of any
        request."""
        while True:
            while self.pool.missing() or self.mounts.missing():
                failed = False
                # Each on its own: one failing (out of fds, say) never holds up the other.
                for refill in (self._refill_pool, self._refill_mounts):
                    try:
                        await refill()
                    except OSError as e:  # creates make their own meanwhile
                        log.warning("namespace pool not refilled: %s; again in 1 s", e)
                        failed = True
                if failed:
                    await trio.sleep(1)
            self.pool_wanted = trio.Event()
            await self.pool_wanted.wait()

    async def _refill_pool(self) -> None:
        if self.pool.missing():
            made = await self._made_ahead(self.pool.missing())
            if made is None:
                await trio.to_thread.run_sync(self.pool.fill_once)
            else:
                self.pool.add(made)

    async def _refill_mounts(self) -> None:
        if self.mounts.missing():
            generation = self.mounts.generation_now()  # before the copy
            made = await self._made_ahead(["mnt"])
            if made is None:
                await trio.to_thread.run_sync(self.mounts.fill_once)
            else:
                self.mounts.add(generation, made)

    async def _made_ahead(self, names: list[str]) -> dict[str, int] | None:
        """Namespaces from the namespace maker (started on first use); None if it is gone
        (said once: a worker thread makes them from then on). Its errors are raised."""
        if self.maker.failed:
            return None
        try:
            if self.maker.proc is None:
                self.maker.start()
            if not self.maker.ready():  # (starting: ~0.1 s) these are made here meanwhile
                return None
            made = await self.maker.make(names)
            log.debug("the namespace maker made %s", ",".join(made))
            return made
        except MakerGone as e:
            log.warning("%s: namespaces made ahead are made by a worker thread from now on", e)
            self.maker.close()
            self.maker.failed = True
            return None

    # ---- init's death -------------------------------------------------------------------

    def watch_init(self, c: Container) -> None:
        """From now on, init's exit (its pidfd readable) is the container's death."""
        self.reg.nursery.start_soon(self._watch_init, c)

    async def _watch_init(self, c: Container) -> None:
        if c.death_seen is None:  # a request may have dealt with the death already
            try:
                await trio.lowlevel.wait_readable(c.init_pidfd)
            except Exception:  # a bug here must not take the whole service down
                log.exception("container %d: watching init failed; killing it", c.id)
        await self.init_exited(c)

    def init_gone(self, c: Container) -> bool:
        """Whether init has exited though its death may not have been dealt with yet."""
        if c.state != State.RUNNING or c.init_pidfd.closed:
            return False
        return pidfd_exited(c.init_pidfd.fileno())

    async def init_exited(self, c: Container) -> None:
        """Deal with init's exit once, whoever notices it first: the watcher, or a request
        that must not see a container alive whose init is gone (the kernel never would)."""
        if c.death_seen is not None:
            await c.death_seen.wait()
            return
        c.death_seen = trio.Event()
        try:
            c.exit_status = await self._exit_status(c)
        except Exception:
            log.exception("container %d: reading init's exit status failed", c.id)
        self.die(c)
        c.death_seen.set()

    async def _exit_status(self, c: Container) -> int | None:
        """Init's wait status, whether or not its parent has reaped it yet."""
        for _ in range(200):
            status = linux.pidfd_exit_status(c.init_pidfd.fileno())
            if status is not None:  # already reaped (Linux 6.15+ keeps it on the pidfd)
                return status
            pidfd = c.init_pidfd.fileno()
            pid = pidfd_pid(pidfd, checked=True)
            fields = stat_fields(pid) if pid > 0 else None
            # Still a zombie: field 52 holds the status. The pid was init's all along if
            # init is still unreaped after the look (a pid is reused only once reaped).
            if fields and fields[0] == "Z" and pidfd_pid(pidfd, checked=True) == pid:
                return int(fields[49])
            await trio.sleep(0.001)
        log.warning("container %d: could not read init's exit status", c.id)
        return None

    def die(self, c: Container) -> None:
        """Init is gone or the container was killed: kill the rest, tell every holder, and
        release every kernel resource it held."""
        if c.state == State.DEAD:
            return
        self.reg.cgroups.kill(c.id)  # the processes of nested containers too
        check_transition(c.state, State.DEAD)
        c.state = State.DEAD
        c.started.set()
        self.reg.changed()
        self.reg.close_write_end(c)
        if c.id in self.reg.store.unwritten:  # (the keeper's entry was its only record)
            self.reg.store.flush()
        self.reg.fdstore.drop(f"c{c.id}")  # the keeper's copy too: now holders see POLLHUP
        self.keyrings.container_died(c)
        if self.on_death is not None:
            self.on_death(c)
        c.init_pidfd.close()
        # Every kernel resource goes now (a root may pin a filesystem and its loop device);
        # what lingers is data. A holder that used the root before keeps its own copy.
        c.ns.close_all()
        # Its children die with it (those without an init have no process to notice).
        for child in [self.reg.containers[i] for i in self.reg.children.get(c.id, ())]:
            self.kill(child)
        self.reg.save_later(c.row())
        self.reg.nursery.start_soon(self.remove_cgroup, c.id)
        if not c.handle_open:
            self.reg.remove(c)
        else:
            # Once the write end is closed nothing tells when the last handle goes: keep the
            # dead container listed for a while, then unlist it (its record stays).
            self.reg.nursery.start_soon(self._remove_later, c)

    async def _remove_later(self, c: Container) -> None:
        await trio.sleep(self.dead_linger)
        self.reg.remove(c)

    async def remove_cgroup(self, cid: int) -> None:
        """Remove the container's group once its last process is gone (a few seconds at
        most; left in place, and said so, after that)."""
        for _ in range(2000):
            try:
                if self.reg.cgroups.try_remove(cid):
                    return
            except OSError as e:  # never the service's end: the group stays, said so
                log.warning("container %d: its cgroup could not be removed: %s", cid, e)
                return
            await trio.sleep(0.005)
        log.warning("container %d: its cgroup stayed busy; left in place", cid)

    # ---- kill and the last close --------------------------------------------------------

    def kill(self, c: Container) -> None:
        """SIGKILL init and every member; the death path does the rest."""
        if c.state == State.STARTING:
            c.kill_pending = True  # init is being made: kill it as soon as it is known
        elif c.state == State.RUNNING:
            try:
                linux.pidfd_send_signal(c.init_pidfd.fileno(), signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.reg.cgroups.kill(c.id)
        elif c.state == State.CREATED:
            self.die(c)

    def kill_by(self, peer: Peer, c: Container) -> None:
        self.policy.manager(peer, c, "kill")
        self.kill(c)

    async def watch_last_close(self) -> None:
        """Forever: act on the last close of any handle (EPOLLERR on its write end)."""
        while True:
            await trio.lowlevel.wait_readable(self.reg.epoll.fileno())
            for wfd, _events in self.reg.epoll.poll(0):
                c = self.reg.by_wfd.get(wfd)
                if c is None:
                    continue
                self.reg.epoll.unregister(wfd)
                c.handle_open = False
                self.reg.changed()
                if c.flags & CONTAINER_KILL_ON_CLOSE:
                    self.kill(c)
                    if c.state == State.DEAD:
                        self.reg.remove(c)
                elif c.state == State.DEAD:
                    self.reg.remove(c)

    def close(self) -> None:
        self.maker.close()
        self.mounts.close()
        self.pool.close()
