"""The registry: every container the service knows, found by id, by handle or by write end,
and the bookkeeping each change shares (the record on disk, the keeper's copies, the view).

Everything else in the service acts on containers through this; nothing here decides who may
do what (policy.py) or how a container lives and dies (lifecycle.py).
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import resource
import select
from collections.abc import Callable
from typing import Any

import trio

from syscalls import linux
from syscalls.constants import CONTAINER_NEW_USER_NS
from syscalls.fd import Fd
from syscalls.replies import ContainerStatus

from .cgroups import CgroupTree
from .fdstore import FdStore
from .containerns import ContainerNs
from .nsstore import NsStore
from .process import Peer
from .record import Container, requested_namespaces
from .states import State
from .store import Store, encode_row

log = logging.getLogger("containerfs")

# How long a record may wait to be written (rows a crash could lose without harm: an init's
# start, a death, a removal); writes within it share one transaction.
STORE_DELAY = 0.05
# Set (CONTAINERFS_STORE_DELAY, for tests that crash the service before a write): every
# row waits that long, a new container's too (otherwise written once create is answered).
STORE_DELAY_SET = os.environ.get("CONTAINERFS_STORE_DELAY")
if STORE_DELAY_SET:
    STORE_DELAY = float(STORE_DELAY_SET)
KEEPER_ROW_MAX = 16384  # a row longer than this as text is written at once, not kept
# Dead containers remembered in memory (by handle) after they are unlisted, for
# container_wait; older ones are answered from their registry row (a few KiB each saved).
GONE_KEPT = 256


class Registry:
    def __init__(self, store: Store, cgroups: CgroupTree, nursery: trio.Nursery,
                 fdstore: FdStore) -> None:
        self.store = store
        self.fdstore = fdstore
        self.ns = NsStore(fdstore)  # every container's namespaces (started by recovery)
        self.ns.on_bound = self._keep_again
        self.cgroups = cgroups
        self.nursery = nursery
        self.containers: dict[int, Container] = {}  # listed: alive, or dead and still held
        self.by_pipe: dict[tuple[int, int], Container] = {}
        self.by_wfd: dict[int, Container] = {}
        self.children: dict[int, set[int]] = {}  # listed containers by parent id
        # Dead containers kept (bounded) so container_wait on a still-held handle answers.
        self.gone: collections.OrderedDict[tuple[int, int], Container] = collections.OrderedDict()
        # One epoll set of every write end: EPOLLERR, always reported, means "no reader is
        # left anywhere": the last reference to that handle was closed.
        self.epoll = select.epoll()
        # Called after any change a reader of the FUSE view could see (a container made,
        # started, dead, removed, its last handle closed); the view sets it.
        self.on_change: Callable[[], None] | None = None
        self._store_dirty = trio.Event()
        self._store_soon = trio.Event()
        # Past this many fds in use, users other than root get EAGAIN (see fds_short).
        self.fd_reserve_mark = resource.getrlimit(resource.RLIMIT_NOFILE)[0] * 4 // 5

    # ---- finding containers -------------------------------------------------------------

    def lookup(self, fd: int) -> Container:
        """The container whose handle `fd` is: EINVAL if it is none (the kernel's answer).

        Only an anonymous pipe is ever stat()ed: a file of a FUSE mount (this service's own
        view, or a server that never answers) would make fstat wait on that server, here on
        the event loop that serves it."""
        if not linux.fd_link(fd).startswith("pipe:["):
            raise OSError(errno.EINVAL, "fd is not a container handle")
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        c = self.by_pipe.get(key) or self.gone.get(key)
        if c is None:
            # The handle of a container removed before this service started: its record.
            row = self.store.by_pipe(*key)
            if row is not None and (row["removed"] or row["state"] == State.DEAD.value):
                c = self.from_row(row, key, wfd=-1, ns=ContainerNs(None, row["id"]))
                c.state = State.DEAD
        if c is None:
            raise OSError(errno.EINVAL, "fd is not a container handle")
        return c

    def from_row(self, row: dict[str, Any], pipe: tuple[int, int], wfd: int,
                 ns: ContainerNs) -> Container:
        """A container record rebuilt from its registry row."""
        return Container(id=row["id"], name=row["name"], flags=row["flags"], owner=row["owner"],
                         group=row["grp"], parent=row["parent"], pipe=pipe, wfd=Fd(wfd),
                         ns=ns,
                         new_ns=requested_namespaces(row["flags"]), init_pid=row["init_pid"],
                         exit_status=row["exit_status"], caps=row.get("caps"),
                         seccomp=row.get("seccomp"))

    def member_of(self, peer: Peer) -> int | None:
        """The id of the container whose group holds the process that connected, None if
        none; ESRCH once that process is reaped (nobody can tell where it was)."""
        return peer.at_pid(lambda pid: self.cgroups.container_id_of_pidfd(peer.pidfd.fileno(), pid))

    def owned_by(self, uid: int) -> int:
        """How many live containers `uid` owns."""
        return sum(1 for c in self.containers.values()
                   if c.owner == uid and c.state != State.DEAD)

    def fds_short(self) -> bool:
        """Whether a fifth or less of the service's fd limit is left. The number of the
        lowest free fd is a lower bound on the fds in use; one dup finds it."""
        probe = os.dup(self.epoll.fileno())
        os.close(probe)
        return probe >= self.fd_reserve_mark

    # ---- listing and unlisting ----------------------------------------------------------

    def add(self, c: Container) -> None:
        """List `c` and find it by its handle and write end from now on."""
        self.containers[c.id] = c
        self.children.setdefault(c.parent, set()).add(c.id)
        self.by_pipe[c.pipe] = c
        if not c.wfd.closed:
            self.by_wfd[c.wfd.fileno()] = c
        self.changed()

    def remove(self, c: Container) -> None:
        """Forget a dead container: unlisted, but its record answers container_wait."""
        if self.containers.pop(c.id, None) is None:
            return
        siblings = self.children.get(c.parent)
        if siblings is not None:
            siblings.discard(c.id)
            if not siblings:
                del self.children[c.parent]
        self.by_pipe.pop(c.pipe, None)
        self.gone[c.pipe] = c
        while len(self.gone) > GONE_KEPT:
            self.gone.popitem(last=False)
        self.save_later({**c.row(), "removed": 1})
        self.changed()

    def changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # ---- handles ------------------------------------------------------------------------

    def watch_handle(self, c: Container) -> None:
        """Start noticing the last close of `c`'s handle (once the service holds no reader)."""
        if not c.wfd.closed:
            try:
                self.epoll.register(c.wfd.fileno(), 0)
            except FileExistsError:
                pass  # watched already (another handle of it is open)

    def close_write_end(self, c: Container) -> None:
        """Close the service's write end: every holder sees POLLHUP (with the keeper's)."""
        if not c.wfd.closed:
            try:
                self.epoll.unregister(c.wfd.fileno())
            except (KeyError, FileNotFoundError, OSError):
                pass
            self.by_wfd.pop(c.wfd.fileno(), None)
            c.wfd.close()

    def open_handle(self, peer: Peer, cid: int) -> int:
        """A new handle (read end) for container `cid`, for its owner or root."""
        c = self.containers.get(cid)
        if c is None or (peer.uid != 0 and peer.uid != c.owner):
            raise OSError(errno.ESRCH, f"no container {cid} of yours")
        if c.wfd.closed:
            raise OSError(errno.ECANCELED, f"container {cid} is dead")
        # Reopening the pipe through /proc gives another reader of the same pipe: a handle
        # like the first, counted like it (a reader again, if the last one had gone).
        rfd = os.open(f"/proc/self/fd/{c.wfd.fileno()}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(rfd, True)
        if not c.handle_open:
            c.handle_open = True
            self.changed()
        return rfd

    # ---- what outlives the service: the record and the keeper's copies -----------------

    def keep(self, c: Container) -> None:
        """Hand the keeper copies of what must outlive a crash of the service (the
        namespaces outlive it in the NsStore's holder, which the keeper holds)."""
        fds = {"w": c.wfd.fileno(), **self.ns.keep_fds(c.ns)}
        if not c.init_pidfd.closed:
            fds["init"] = c.init_pidfd.fileno()
        # The row too, as it is now: its write may wait (save_later), a crash may not.
        row = c.row()
        data = encode_row(row)
        if len(data) <= KEEPER_ROW_MAX:
            self.fdstore.put(f"c{c.id}", fds, data)
        else:  # (a long seccomp profile) written now instead
            self.store.save(row)
            self.fdstore.put(f"c{c.id}", fds)

    def _keep_again(self, ids: set[int]) -> None:
        """The namespaces of containers `ids` are bound now: their keeper entries let the
        copies of them go."""
        for cid in ids:
            c = self.containers.get(cid)
            if c is None or c.state == State.DEAD:
                continue
            if self.ns.has_fresh(c.ns):  # (its entry has what it must: kept as it is)
                self.ns.kept_fresh.add(cid)
            else:
                self.keep(c)

    def save_later(self, row: dict[str, Any], new_pipe: bool = False, soon: bool = False) -> None:
        """Record `row` within STORE_DELAY (with the next immediate write, if sooner); `soon`:
        once the request at hand is answered (a new container's row: see keep)."""
        self.store.save_later(row, new_pipe)
        self._store_dirty.set()
        if soon and not STORE_DELAY_SET:
            self._store_soon.set()

    async def flush_store(self) -> None:
        """Forever: write the rows saved for later, a batch at a time, off any request."""
        while True:
            await self._store_dirty.wait()
            with trio.move_on_after(STORE_DELAY):
                await self._store_soon.wait()
            self._store_dirty, self._store_soon = trio.Event(), trio.Event()
            try:
                self.store.flush()
            except Exception:  # the rows stay pending and go with the next write
                log.exception("registry write failed; retried with the next one")

    # ---- reading ------------------------------------------------------------------------

    def describe(self, c: Container) -> ContainerStatus:
        """container_status: the public fields of `c`."""
        return ContainerStatus(
            id=c.id, name=c.name.decode("utf-8", "surrogateescape"), flags=c.flags,
            owner=c.owner, group=c.group, parent=c.parent, state=c.state.value,
            init_pid=c.init_pid, exit_status=c.exit_status,
            members=self.cgroups.procs(c.id) if c.state != State.DEAD else [],
            user_ns=bool(c.flags & CONTAINER_NEW_USER_NS), frozen=self.frozen(c))

    def frozen(self, c: Container) -> bool:
        """Whether the container is frozen now (a dead one never is)."""
        if c.state == State.DEAD:
            return False
        try:
            return self.cgroups.frozen(c.id)
        except OSError:
            return False  # its groups are going away

    def close(self) -> None:
        self.epoll.close()
        self.ns.close()
