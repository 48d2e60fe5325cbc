"""The container registry and what the kernel would do for each call: create, fork, kill, die.

Runs inside the service's trio loop. Anything that blocks (forking a namespace helper) runs in a
worker thread. Every privileged act is preceded by a check of the peer's credentials against the
container (the contract's first rule: never lend the service's privilege).
"""

from __future__ import annotations

import collections
import errno
import functools
import json
import logging
import os
import resource
import select
import signal
from collections.abc import Callable
from typing import Any

import trio

from syscalls import _linux, validate
from syscalls.constants import (
    CONTAINER_KILL_ON_CLOSE,
    CONTAINER_NEW_EMPTY_FS_NS,
    CONTAINER_NEW_PID_NS,
    CONTAINER_NEW_USER_NS,
)

from . import namespaces
from .cgroups import CgroupTree, process_cgroup
from .fdstore import FdStore
from .keyring.hooks import Hooks
from .keyring.service import KeyringService
from .process import Peer, pid_namespace, pidfd_pid, stat_fields
from .record import Container, requested_namespaces
from .states import State, check_transition
from .store import Store

log = logging.getLogger("containerfs")

# Order in which a forking process enters namespaces. The creator's own (not asked-for) ones
# come first, while the process still has its host privileges; then the new user namespace,
# whose capabilities it needs to enter the others the container owns.
_ENTRY_ORDER = ("mnt", "uts", "ipc", "net", "cgroup")
# How long a record may wait to be written (rows a crash could lose without harm: an init's
# start, a death, a removal); writes within it share one transaction.
STORE_DELAY = 0.05


def _proc_params(text: str) -> list[list[Any]]:
    """The fsconfig parameters of a pending proc, checked: [[cmd, key, value or None]...]
    with cmd FSCONFIG_SET_FLAG (no value) or FSCONFIG_SET_STRING (a value). EINVAL else."""
    try:
        params = json.loads(text)
    except ValueError:
        params = None
    ok = isinstance(params, list) and len(params) <= 64
    for item in params if ok else ():
        ok = (isinstance(item, list) and len(item) == 3 and type(item[0]) is int
              and isinstance(item[1], str)
              and 0 < len(item[1]) < 256 and "\0" not in item[1] and item[1] != "pidns"
              and ((item[0] == _linux.FSCONFIG_SET_FLAG and item[2] is None)
                   or (item[0] == _linux.FSCONFIG_SET_STRING and isinstance(item[2], str)
                       and len(item[2]) < 4096 and "\0" not in item[2])))
        if not ok:
            break
    if not ok:
        raise OSError(errno.EINVAL, "malformed proc parameters")
    return params  # type: ignore[no-any-return]


def _proc_attrs(attrs: int) -> int:
    if attrs & ~_linux.FSMOUNT_VALID_ATTRS:
        raise OSError(errno.EINVAL, f"unknown mount attributes {attrs:#x}")
    return attrs


def _check_alive(c: Container) -> None:
    if c.state == State.DEAD:
        raise OSError(errno.ECANCELED, f"container {c.id} is dead")


class Service:
    def __init__(self, store: Store, cgroups: CgroupTree, nursery: trio.Nursery,
                 fdstore: FdStore, max_per_user: int = 1024, dead_linger: float = 30.0) -> None:
        self.store = store
        self.fdstore = fdstore
        self.pool = namespaces.NamespacePool()
        self._origins: dict[int, str] = {}  # intermediate's pidfd -> its own cgroup
        self.pool_wanted = trio.Event()
        self.cgroups = cgroups
        self.nursery = nursery
        self.max_per_user = max_per_user
        self.dead_linger = dead_linger
        self.containers: dict[int, Container] = {}  # listed: alive, or dead and still held
        self.by_pipe: dict[tuple[int, int], Container] = {}
        self.by_wfd: dict[int, Container] = {}
        # Dead containers kept (bounded) so container_wait on a still-held handle answers.
        self.gone: collections.OrderedDict[tuple[int, int], Container] = collections.OrderedDict()
        # One epoll set of every write end: EPOLLERR, always reported, means "no reader is
        # left anywhere": the last reference to that handle was closed.
        self.epoll = select.epoll()
        # Called after any change a reader of the FUSE view could see (a container made,
        # started, dead, removed, its last handle closed); the view sets it.
        self.on_change: Callable[[], None] | None = None
        # Forks whose connections the keeper held across a restart (see _recover_forks).
        self._pending_forks: list[tuple[str, int, Container, str]] = []
        self._boot = os.urandom(4).hex()  # keeper keys of this run never meet an older one's
        self._forks = 0
        self._store_dirty = trio.Event()
        # Past this many fds in use, users other than root get EAGAIN (see fds_short).
        self.fd_reserve_mark = resource.getrlimit(resource.RLIMIT_NOFILE)[0] * 4 // 5

    # ---- lookups and checks -------------------------------------------------------------

    def lookup(self, fd: int) -> Container:
        """The container whose handle `fd` is: EINVAL if it is none (the kernel's answer).

        Only an anonymous pipe is ever stat()ed: a file of a FUSE mount (this service's own
        view, or a server that never answers) would make fstat wait on that server, here on
        the event loop that serves it."""
        if not _linux.fd_link(fd).startswith("pipe:["):
            raise OSError(errno.EINVAL, "fd is not a container handle")
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        c = self.by_pipe.get(key) or self.gone.get(key)
        if c is None:
            # The handle of a container removed before this service started: its record.
            row = self.store.by_pipe(*key)
            if row is not None and (row["removed"] or row["state"] == State.DEAD.value):
                c = self._container_from_row(row, key, wfd=-1, ns={})
                c.state = State.DEAD
        if c is None:
            raise OSError(errno.EINVAL, "fd is not a container handle")
        return c

    def _container_from_row(self, row: dict[str, Any], pipe: tuple[int, int], wfd: int,
                            ns: dict[str, int]) -> Container:
        return Container(id=row["id"], name=row["name"], flags=row["flags"], owner=row["owner"],
                         group=row["grp"], parent=row["parent"], pipe=pipe, wfd=wfd, ns=ns,
                         new_ns=requested_namespaces(row["flags"]), init_pid=row["init_pid"],
                         exit_status=row["exit_status"])

    # ---- recovery after a restart -------------------------------------------------------

    def recover(self) -> None:
        """Adopt the containers a previous service left, with the fds the keeper kept."""
        held = self.fdstore.get_all()
        for row in self.store.unremoved_rows():
            fds = held.pop(f"c{row['id']}", {})
            if row["state"] == State.DEAD.value or "w" not in fds:
                # Dead, or nothing kept its handles alive (the keeper died too): holders have
                # seen their hang-up already; make sure nothing of it runs on.
                for fd in fds.values():
                    os.close(fd)
                self.cgroups.kill(row["id"])
                self.nursery.start_soon(self._remove_cgroup, row["id"])
                row["state"] = State.DEAD.value
                self.store.save({**row, "removed": 1})
                self.fdstore.drop(f"c{row['id']}")
                continue
            self._adopt(row, fds)
        self._recover_forks(held)
        self.keyrings.recover(held)  # takes its own keys out of `held`
        for key, fds in held.items():
            for fd in fds.values():
                os.close(fd)
            self.fdstore.drop(key)

    def _recover_forks(self, held: dict[str, dict[str, int]]) -> None:
        """Take the connections of forks in progress out of `held`: what their callers
        reported (Started, listeners) may still wait in them, unread."""
        for key in [k for k in held if k.startswith("fork.")]:
            fd = held.pop(key)["s"]
            _, cid, role, _ = key.split(".", 3)
            c = self.containers.get(int(cid))
            if c is None or c.state == State.DEAD:
                os.close(fd)
                self.fdstore.drop(key)
                continue
            if role == "init" and c.state == State.CREATED:
                c.state = State.STARTING  # until its report is read, or its caller is gone
                c.started = trio.Event()
            self._pending_forks.append((key, fd, c, role))

    def _save_later(self, row: dict[str, Any]) -> None:
        """Record `row` within STORE_DELAY (with the next immediate write, if sooner)."""
        self.store.save_later(row)
        self._store_dirty.set()

    async def flush_store(self) -> None:
        """Forever: write the rows saved for later, a batch at a time, off any request."""
        while True:
            await self._store_dirty.wait()
            await trio.sleep(STORE_DELAY)
            self._store_dirty = trio.Event()
            try:
                self.store.flush()
            except Exception:  # the rows stay pending and go with the next write
                log.exception("registry write failed; retried with the next one")

    def take_pending_forks(self) -> list[tuple[str, int, Container, str]]:
        """(keeper key, socket fd, container, role) of each fork to read on; once."""
        out, self._pending_forks = self._pending_forks, []
        return out

    def fork_key(self, c: Container, role: str) -> str:
        """A new keeper key for the connection of a fork into `c` as `role`."""
        self._forks += 1
        return f"fork.{c.id}.{role}.{self._boot}.{self._forks}"

    def _adopt(self, row: dict[str, Any], fds: dict[str, int]) -> None:
        wfd = fds.pop("w")
        init_pidfd = fds.pop("init", -1)
        ns = {name[3:]: fd for name, fd in fds.items() if name.startswith("ns:")}
        st = os.fstat(wfd)
        c = self._container_from_row(row, (st.st_dev, st.st_ino), wfd, ns)
        if c.flags & CONTAINER_NEW_EMPTY_FS_NS and "root" in ns:
            c.new_ns = c.new_ns | {"mnt"}  # its root was set before the restart
        if init_pidfd >= 0:
            c.init_pidfd = init_pidfd
            c.state = State.RUNNING
            pid = pidfd_pid(init_pidfd)
            if pid > 0:  # the row's init_pid may not have been written before a crash
                c.init_pid = pid
            self.nursery.start_soon(self._watch_init, c)
        # A fork cut short by the crash left no process: the container is as it was before.
        self.containers[c.id] = c
        self.by_pipe[c.pipe] = c
        self.by_wfd[wfd] = c
        self._save_later(c.row())
        self.watch_handle(c)  # if every handle closed while we were down, this fires at once
        log.info("container %d adopted (%s)", c.id, c.state.value)
        self._changed()

    def fds_short(self) -> bool:
        """Whether a fifth or less of the service's fd limit is left. The number of the
        lowest free fd is a lower bound on the fds in use; one dup finds it."""
        probe = os.dup(self.epoll.fileno())
        os.close(probe)
        return probe >= self.fd_reserve_mark

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def check_owner(self, peer: Peer, c: Container, what: str) -> None:
        if peer.uid != 0 and peer.uid != c.owner:
            raise OSError(errno.EPERM, f"container {c.id} belongs to uid {c.owner}; "
                                       f"uid {peer.uid} may not {what} it")

    def check_manager(self, peer: Peer, c: Container, what: str) -> None:
        """Owner or root, and not from inside the container itself."""
        self.check_owner(peer, c, what)
        if c.state != State.DEAD and self.member_of(peer) == c.id:
            raise OSError(errno.EPERM, f"a member of container {c.id} may not {what} it")

    # ---- container_create ---------------------------------------------------------------

    async def create(self, peer: Peer, raw_name: bytes, flags: int) -> tuple[Container, int]:
        """Make a container for `peer`; return it and the handle's read end."""
        validate.container_name(raw_name)
        validate.create_flags(flags, peer.uid)
        if peer.uid != 0 and sum(1 for c in self.containers.values()
                                 if c.owner == peer.uid and c.state != State.DEAD) >= self.max_per_user:
            raise OSError(errno.EAGAIN, f"uid {peer.uid} has {self.max_per_user} containers, "
                                        "its limit")
        if peer.uid != 0 and self.fds_short():
            raise OSError(errno.EAGAIN, "the service is short of fds; try again later")
        # The PID namespace is born with init; the others are made now.
        new = sorted(requested_namespaces(flags) - {"pid"}, key=namespaces.NS_TYPES.index)
        # The creator's namespaces, for those not asked for, proven to be the connecting
        # process's: a recycled pid must not lend us someone else's.
        ns = peer.at_pid(namespaces.open_process_namespaces, namespaces.close_all)
        cid = -1
        try:
            cid = self.store.next_id()
            self.cgroups.create(cid)
            self.keyrings.create_session(cid, peer.uid, peer.gid)  # EAGAIN: key quota
            made = await self._make_namespaces(peer, new, ns, cid)
            for nstype, fd in made.items():
                os.close(ns.pop(nstype))
                ns[nstype] = fd
            if flags & CONTAINER_NEW_EMPTY_FS_NS:
                os.close(ns.pop("root"))
            rfd, wfd = os.pipe2(os.O_CLOEXEC)
        except BaseException as e:
            namespaces.close_all(ns)
            if cid > 0:
                self.cgroups.try_remove(cid)
                self.keyrings.discard(cid)
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise OSError(errno.EAGAIN, f"uid {peer.uid} has no user namespaces left "
                                            f"(user.max_user_namespaces): {e.strerror}") from None
            raise
        st = os.fstat(rfd)
        parent = self.containers.get(self.member_of(peer) or 0)
        c = Container(id=cid, name=raw_name, flags=flags, owner=peer.uid, group=peer.gid,
                      parent=parent.id if parent else 1, pipe=(st.st_dev, st.st_ino), wfd=wfd,
                      ns=ns, new_ns=requested_namespaces(flags))
        self.store.save(c.row(), new_pipe=True)
        self._keep(c)
        self.containers[cid] = c
        self.by_pipe[c.pipe] = c
        self.by_wfd[wfd] = c
        self._changed()
        return c, rfd

    async def _make_namespaces(self, peer: Peer, new: list[str], creator: dict[str, int],
                               cid: int) -> dict[str, int]:
        """The new namespaces of a container, as `peer` would make them: {type: fd}."""
        made: dict[str, int] = {}
        if peer.uid == 0 and "user" not in new:
            for nstype in new:
                fd = self.pool.take(nstype)
                if fd is not None:
                    made[nstype] = fd
            self.pool_wanted.set()
        rest = [t for t in new if t not in made]
        try:
            if rest == ["mnt"] and peer.uid == 0:
                # Copying a mount namespace takes tens of microseconds: cheaper here than a
                # trip to a worker thread.
                made.update(namespaces.make_in_thread(rest, creator))
            elif rest:
                # Opened here, in the service's own mount namespace: the helper writes it
                # standing in nothing the caller controls.
                procs = (os.open(os.path.join(self.cgroups.path(cid), "cgroup.procs"),
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
        return made

    async def fill_pool(self) -> None:
        """Forever: keep the namespace pool full, off the path of any request."""
        while True:
            while self.pool.missing():
                try:
                    await trio.to_thread.run_sync(self.pool.fill_once)
                except OSError as e:  # out of fds, say: creates make their own meanwhile
                    log.warning("namespace pool not refilled: %s; again in 1 s", e)
                    await trio.sleep(1)
            self.pool_wanted = trio.Event()
            await self.pool_wanted.wait()

    def _keep(self, c: Container) -> None:
        """Hand the keeper copies of what must outlive a crash of the service."""
        fds = {"w": c.wfd, **{f"ns:{t}": fd for t, fd in c.ns.items()}}
        if c.init_pidfd >= 0:
            fds["init"] = c.init_pidfd
        self.fdstore.put(f"c{c.id}", fds)

    def watch_handle(self, c: Container) -> None:
        """Start noticing the last close of `c`'s handle (once the service holds no reader)."""
        if c.wfd >= 0:
            try:
                self.epoll.register(c.wfd, 0)
            except FileExistsError:
                pass  # watched already (another handle of it is open)

    def member_of(self, peer: Peer) -> int | None:
        """The id of the container whose group holds the process that connected, None if
        none; ESRCH once that process is reaped (nobody can tell where it was)."""
        return peer.at_pid(lambda pid: self.cgroups.container_id_of_pidfd(peer.pidfd, pid))

    # ---- fork_into_container ------------------------------------------------------------

    async def begin_fork(self, peer: Peer, c: Container) -> tuple[dict[str, Any], list[int]]:
        """Check a fork and return what the intermediate must enter: (reply, fds it names)."""
        self.check_owner(peer, c, "fork into")
        while True:
            while c.state == State.STARTING:  # another caller is making init: wait for it
                await c.started.wait()
            if c.state == State.CREATED and c.proc_mounts:
                # A proc placeholder is being mounted: init must be told of it.
                await c.proc_mounts_idle.wait()
                continue
            break
        if c.state == State.DEAD:
            raise OSError(errno.ECANCELED, f"container {c.id} is dead")
        if "root" not in c.ns:
            raise OSError(errno.ENOENT, f"container {c.id} has no root filesystem yet")
        role = "init" if c.state == State.CREATED else "member"
        reply, fds = self._fork_plan(peer, c, role)
        if peer.uid != 0:
            # Others may not place a process with CLONE_INTO_CGROUP; move the intermediate
            # itself, before it makes the child, and back out once the child is reported
            # (return_intermediate), so that the container's death, however early, never
            # kills the intermediate.
            try:
                origin = peer.at_pid(process_cgroup)
                peer.at_pid(lambda pid: self.cgroups.move(c.id, pid))
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
            if origin is not None:
                self._origins[peer.pidfd] = origin
        if role == "init":
            check_transition(c.state, State.STARTING)
            c.state = State.STARTING
            c.started = trio.Event()
            self._changed()
        return reply, fds

    def creator_plan(self, peer: Peer, c: Container) -> tuple[dict[str, Any], list[int]] | None:
        """For root's container_create: what its first fork will be told to enter, so it can
        make the process while the Fork request is on its way (the reply then confirms it).
        None where that fork takes an intermediate anyway (a user namespace) or cannot be."""
        if peer.uid != 0 or "root" not in c.ns or "user" in c.new_ns:
            return None
        return self._fork_plan(peer, c, "init")

    def _fork_plan(self, peer: Peer, c: Container, role: str) -> tuple[dict[str, Any], list[int]]:
        """What a fork in `role` enters, in order: (reply, the fds it names). No side effect
        but the fds, which are the reply's own copies."""
        names: list[str] = []
        fds: list[int] = []

        def add(name: str, fd: int) -> None:
            names.append(name)
            fds.append(os.dup(fd))  # the reply's own copy, closed once sent

        try:
            self._add_fork_fds(peer, c, role, add)
            reply = {"role": role, "fds": names, "id": c.id,
                     "new_pid_ns": role == "init" and bool(c.flags & CONTAINER_NEW_PID_NS),
                     "proc_paths": c.proc_paths if role == "init" else []}
            reply.update(self.keyrings.fork_info(c))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return reply, fds

    def _add_fork_fds(self, peer: Peer, c: Container, role: str,
                      add: Callable[[str, int], None]) -> None:
        """The fds of a fork in `role`, in the order they are entered."""
        if "user" not in c.new_ns:
            add("ns:user", c.ns["user"])
        for nstype in _ENTRY_ORDER:
            if nstype not in c.new_ns:
                add(f"ns:{nstype}", c.ns[nstype])
        if "user" in c.new_ns:
            add("ns:user", c.ns["user"])
        for nstype in _ENTRY_ORDER:
            if nstype in c.new_ns:
                add(f"ns:{nstype}", c.ns[nstype])
        if role == "member" or not c.flags & CONTAINER_NEW_PID_NS:
            add("ns:pid", c.ns["pid"])
        add("root", c.ns["root"])
        if peer.uid == 0:
            # Root may place a process with CLONE_INTO_CGROUP: no cgroup.procs write, no stall.
            cgroup_fd = self.cgroups.open(c.id)
            try:
                add("cgroup", cgroup_fd)
            finally:
                os.close(cgroup_fd)

    def abort_fork(self, c: Container, role: str) -> None:
        """The intermediate failed or vanished before reporting a process."""
        if role == "init" and c.state == State.STARTING:
            c.state = State.CREATED
            c.started.set()
            self._changed()
            if c.kill_pending:
                self.kill(c)

    def finish_fork(self, c: Container, role: str, pidfd: int, reported_pid: int = 0) -> int:
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
            placed = pid > 0 and self.cgroups.container_id_of_pidfd(pidfd, pid) == c.id
            # Trust the pidfd only if its process is where the container's processes are. A
            # process reaped meanwhile cannot be looked at any more: only root's own report
            # of it is believed (anyone else could pass off some other dead process as init
            # and choose the container's exit status).
            if not placed:
                if pidfd_pid(pidfd) > 0 or reported_pid <= 0:
                    raise OSError(errno.EINVAL,
                                  "reported process is not in the container's cgroup")
                pid = reported_pid
        except BaseException:
            os.close(pidfd)
            self.abort_fork(c, role)
            raise
        if role != "init":
            os.close(pidfd)
            return pid
        c.init_pid, c.init_pidfd = pid, pidfd
        if c.flags & CONTAINER_NEW_PID_NS and placed:
            try:
                pidns = pid_namespace(pidfd, pid)
                os.close(c.ns["pid"])
                c.ns["pid"] = pidns
            except (FileNotFoundError, ProcessLookupError):
                pass  # init already reaped: nobody can join its PID namespace anyway
        check_transition(c.state, State.RUNNING)
        c.state = State.RUNNING
        c.started.set()
        self._changed()
        self._save_later(c.row())
        self._keep(c)
        self.nursery.start_soon(self._watch_init, c)
        if c.kill_pending:
            self.kill(c)
        return pid

    # ---- death, kill and last close -----------------------------------------------------

    async def _watch_init(self, c: Container) -> None:
        if c.death_seen is None:  # a request may have dealt with the death already
            try:
                await trio.lowlevel.wait_readable(c.init_pidfd)
            except Exception:  # a bug here must not take the whole service down
                log.exception("container %d: watching init failed; killing it", c.id)
        await self.init_exited(c)

    def init_gone(self, c: Container) -> bool:
        """Whether init has exited though its death may not have been dealt with yet."""
        if c.state != State.RUNNING or c.init_pidfd < 0:
            return False
        poller = select.poll()  # any fd number (select() stops at 1024)
        poller.register(c.init_pidfd, select.POLLIN)
        return bool(poller.poll(0))

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
        self._die(c)
        c.death_seen.set()

    async def _exit_status(self, c: Container) -> int | None:
        """Init's wait status, whether or not its parent has reaped it yet."""
        for _ in range(200):
            status = _linux.pidfd_exit_status(c.init_pidfd)
            if status is not None:  # already reaped (Linux 6.15+ keeps it on the pidfd)
                return status
            pid = pidfd_pid(c.init_pidfd)
            fields = stat_fields(pid) if pid > 0 else None
            # Still a zombie: field 52 holds the status. The pid was init's all along if
            # init is still unreaped after the look (a pid is reused only once reaped).
            if fields and fields[0] == "Z" and pidfd_pid(c.init_pidfd) == pid:
                return int(fields[49])
            await trio.sleep(0.001)
        log.warning("container %d: could not read init's exit status", c.id)
        return None

    def _die(self, c: Container) -> None:
        """Init is gone or the container was killed: kill the rest, tell every holder."""
        if c.state == State.DEAD:
            return
        self.cgroups.kill(c.id)
        check_transition(c.state, State.DEAD)
        c.state = State.DEAD
        c.started.set()
        self._changed()
        self._close_write_end(c)
        self.fdstore.drop(f"c{c.id}")  # the keeper's copy too: now holders see POLLHUP
        self.keyrings.container_died(c)
        if c.init_pidfd >= 0:
            os.close(c.init_pidfd)
            c.init_pidfd = -1
        # Every kernel resource goes now (a root may pin a filesystem and its loop device);
        # what lingers is data. A holder that used the root before keeps its own copy.
        namespaces.close_all(c.ns)
        self._save_later(c.row())
        self.nursery.start_soon(self._remove_cgroup, c.id)
        if not c.handle_open:
            self._remove(c)
        else:
            # Once the write end is closed nothing tells when the last handle goes: keep the
            # dead container listed for a while, then unlist it (its record stays).
            self.nursery.start_soon(self._remove_later, c)

    async def _remove_later(self, c: Container) -> None:
        await trio.sleep(self.dead_linger)
        self._remove(c)

    def _close_write_end(self, c: Container) -> None:
        if c.wfd >= 0:
            try:
                self.epoll.unregister(c.wfd)
            except (KeyError, FileNotFoundError, OSError):
                pass
            self.by_wfd.pop(c.wfd, None)
            os.close(c.wfd)
            c.wfd = -1

    async def _remove_cgroup(self, cid: int) -> None:
        for _ in range(2000):
            try:
                if self.cgroups.try_remove(cid):
                    return
            except OSError as e:  # never the service's end: the group stays, said so
                log.warning("container %d: its cgroup could not be removed: %s", cid, e)
                return
            await trio.sleep(0.005)
        log.warning("container %d: its cgroup stayed busy; left in place", cid)

    def kill(self, c: Container) -> None:
        """SIGKILL init and every member; the death path does the rest."""
        if c.state == State.STARTING:
            c.kill_pending = True  # init is being made: kill it as soon as it is known
        elif c.state == State.RUNNING:
            try:
                _linux.pidfd_send_signal(c.init_pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.cgroups.kill(c.id)
        elif c.state == State.CREATED:
            self._die(c)

    def kill_by(self, peer: Peer, c: Container) -> None:
        self.check_manager(peer, c, "kill")
        self.kill(c)

    def _remove(self, c: Container) -> None:
        """Forget a dead container: unlisted, but its record answers container_wait."""
        if self.containers.pop(c.id, None) is None:
            return
        self.by_pipe.pop(c.pipe, None)
        self.gone[c.pipe] = c
        while len(self.gone) > 4096:
            self.gone.popitem(last=False)
        self._save_later({**c.row(), "removed": 1})
        self._changed()

    async def watch_last_close(self) -> None:
        """Forever: act on the last close of any handle (EPOLLERR on its write end)."""
        while True:
            await trio.lowlevel.wait_readable(self.epoll.fileno())
            for wfd, _events in self.epoll.poll(0):
                c = self.by_wfd.get(wfd)
                if c is None:
                    continue
                self.epoll.unregister(wfd)
                c.handle_open = False
                self._changed()
                if c.flags & CONTAINER_KILL_ON_CLOSE:
                    self.kill(c)
                    if c.state == State.DEAD:
                        self._remove(c)
                elif c.state == State.DEAD:
                    self._remove(c)

    # ---- reading ------------------------------------------------------------------------

    def describe(self, c: Container) -> dict[str, Any]:
        return {"id": c.id, "name": c.name.decode("utf-8", "surrogateescape"), "flags": c.flags,
                "owner": c.owner, "group": c.group, "parent": c.parent, "state": c.state.value,
                "init_pid": c.init_pid, "exit_status": c.exit_status,
                "members": self.cgroups.procs(c.id) if c.state != State.DEAD else [],
                "user_ns": bool(c.flags & CONTAINER_NEW_USER_NS)}

    def close(self) -> None:
        self.epoll.close()
        self.pool.close()
        if "keyrings" in self.__dict__:
            self.keyrings.close()

    # ---- container_socket ---------------------------------------------------------------

    def netns_fds(self, peer: Peer, c: Container) -> tuple[dict[str, Any], list[int]]:
        """The container's network namespace (and its own user namespace, if it has one) for
        a caller that could enter it: root, the owner, or a member. Returns dup'd fds."""
        if peer.uid not in (0, c.owner) and not (
                c.state != State.DEAD and self.member_of(peer) == c.id):
            self.check_owner(peer, c, "open a socket in")  # raises EPERM
        if c.state == State.DEAD:
            raise OSError(errno.ECANCELED, f"container {c.id} is dead")
        names = (["user"] if "user" in c.new_ns else []) + ["net"]
        fds: list[int] = []
        try:
            for name in names:
                fds.append(os.dup(c.ns[name]))  # the reply's own copy, closed once sent
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return {"fds": names}, fds

    # ---- filesystems: roots, mounts and *at() (issue 4) ---------------------------------

    def check_mounter(self, peer: Peer, c: Container, what: str) -> None:
        """Root, or the owner of the container's own user namespace; never a member."""
        self.check_manager(peer, c, what)
        if peer.uid != 0 and "user" not in c.new_ns:
            raise OSError(errno.EPERM, f"only root may {what} container {c.id}: it has no "
                                       "user namespace of its own")

    def root_fd(self, c: Container) -> list[int]:
        """A copy of the container's root (O_PATH) for *at() calls; none before it has one.
        ECANCELED once it is dead: its root was released at death."""
        if c.state == State.DEAD:
            raise OSError(errno.ECANCELED, f"container {c.id} is dead; its root is released")
        return [os.dup(c.ns["root"])] if "root" in c.ns else []

    def _userns_for(self, peer: Peer, c: Container) -> int | None:
        """The user namespace a helper must enter to act as `peer` (None: root in a thread)."""
        return c.ns["user"] if peer.uid != 0 and "user" in c.new_ns else None

    async def set_root(self, peer: Peer, c: Container, mfd: int) -> None:
        """MOVE_MOUNT_T_CONTAINER_ROOT: mount `mfd` becomes the root of an empty-fs container."""
        self.check_mounter(peer, c, "set the root of")
        if not c.flags & CONTAINER_NEW_EMPTY_FS_NS or "root" in c.ns:
            raise OSError(errno.EBUSY, f"container {c.id} already has a mount namespace")
        if c.state == State.DEAD:
            raise OSError(errno.ECANCELED, f"container {c.id} is dead")
        made = await trio.to_thread.run_sync(
            namespaces.root_namespace, mfd, c.ns, namespaces.Credentials(peer.uid, peer.gid),
            self._userns_for(peer, c))
        if "root" in c.ns:  # set by a racing call while we worked: keep the first
            namespaces.close_all(made)
            raise OSError(errno.EBUSY, f"container {c.id} already has a mount namespace")
        os.close(c.ns.pop("mnt"))
        c.ns.update(made)
        c.new_ns = c.new_ns | {"mnt"}
        self._keep(c)

    async def mount_at(self, peer: Peer, c: Container, mfd: int, unsafe_path: str,
                       proc: bool = False, attrs: int = 0, params: str = "[]") -> dict[str, Any]:
        """move_mount into the container at `unsafe_path`, resolved from its root.

        With `proc`, `mfd` is a placeholder for a proc of the container's PID namespace: init
        replaces it as it starts (see syscalls.container). If init exists already, nothing is
        mounted and the reply says so: the caller makes that proc now."""
        self.check_mounter(peer, c, "mount into")
        if "root" not in c.ns:
            raise OSError(errno.ENOENT, f"container {c.id} has no root filesystem yet")
        if c.state == State.DEAD:
            raise OSError(errno.ECANCELED, f"container {c.id} is dead")
        placeholder: dict[str, Any] | None = None
        if proc and c.flags & CONTAINER_NEW_PID_NS:
            placeholder = {"path": unsafe_path, "mnt_id": _linux.mount_id(mfd),
                           "params": _proc_params(params), "attrs": _proc_attrs(attrs)}
            while c.state == State.STARTING:  # init is being made: its PID namespace decides
                await c.started.wait()
            if c.state == State.RUNNING:
                return {"pid_born": 1}
            _check_alive(c)  # killed while we waited
            if not c.proc_mounts:
                c.proc_mounts_idle = trio.Event()
            c.proc_mounts += 1  # init's fork waits until this is attached and recorded
        try:
            await trio.to_thread.run_sync(
                namespaces.mount_inside, mfd, c.ns["mnt"], c.ns["root"], unsafe_path,
                namespaces.Credentials(peer.uid, peer.gid), self._userns_for(peer, c))
            if placeholder is not None and c.state == State.CREATED:
                c.proc_paths.append(placeholder)
        finally:
            if placeholder is not None:
                c.proc_mounts -= 1
                if not c.proc_mounts:
                    c.proc_mounts_idle.set()
        return {}

    def fs_namespaces(self, peer: Peer, c: Container) -> tuple[dict[str, Any], list[int]]:
        """FSCONFIG_SET_CONTAINER: the container's user (own), network and PID namespaces."""
        self.check_mounter(peer, c, "create a filesystem in")
        if c.state == State.DEAD:
            raise OSError(errno.ECANCELED, f"container {c.id} is dead")
        names = (["user"] if "user" in c.new_ns else []) + ["net"]
        pid_born = c.state == State.RUNNING or not c.flags & CONTAINER_NEW_PID_NS
        if pid_born:
            names.append("pid")
        return ({"fds": names, "pid_pending": not pid_born},
                [os.dup(c.ns[name]) for name in names])

    def open_handle(self, peer: Peer, cid: int) -> int:
        """A new handle (read end) for container `cid`, for its owner or root."""
        c = self.containers.get(cid)
        if c is None or (peer.uid != 0 and peer.uid != c.owner):
            raise OSError(errno.ESRCH, f"no container {cid} of yours")
        if c.wfd < 0:
            raise OSError(errno.ECANCELED, f"container {cid} is dead")
        # Reopening the pipe through /proc gives another reader of the same pipe: a handle
        # like the first, counted like it (a reader again, if the last one had gone).
        rfd = os.open(f"/proc/self/fd/{c.wfd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(rfd, True)
        if not c.handle_open:
            c.handle_open = True
            self._changed()
        return rfd

    def return_intermediate(self, peer: Peer) -> None:
        """Move a non-root caller's intermediate back to its own cgroup after a fork."""
        origin = self._origins.pop(peer.pidfd, None)
        if origin is not None:
            try:
                peer.at_pid(lambda pid: self.cgroups.move_to(origin, pid))
            except OSError as e:  # gone, or its group went away: nothing left to protect
                log.debug("intermediate %d stays: %s", peer.pid, e)

    # ---- keyrings (section 7) -----------------------------------------------------------

    @functools.cached_property
    def keyrings(self) -> KeyringService:
        """Per-container keyrings and request_key() traps (made on first use)."""
        return KeyringService(Hooks(
            runtime_dir=os.path.dirname(self.fdstore.path), nursery=self.nursery,
            keep=self.fdstore.put, let_go=self.fdstore.drop, lookup=self.lookup,
            live=self.containers.get, check_manager=self.check_manager,
            member_of=self.member_of, container_id_of=self.cgroups.container_id_of))
