"""Every container's namespaces, held without an fd each.

An fd per namespace and container capped a service at about 2,200 containers under a 20,000
fd limit (and its keeper with it). Here a namespace is held by an nsfs bind mount (as
`ip netns` holds a network namespace) in a mount namespace of the service's own, the
*holder*: made once, its only mount a private tmpfs, never entered by any container and
never copied into one (a container's mount namespace is a copy of its creator's, and binds
in the host's would be copied into every one made after them). The service reaches the
tmpfs through one O_PATH fd of its root and opens a bind with openat(), from its own mount
namespace; only making and removing a bind needs a thread standing in the holder
(`nsexec.elsewhere`): move_mount and umount act only in the caller's mount namespace.

Layout of the tmpfs (it is also what a restarted service reads back):
    <type>.<ino>.<tag>   a bind of that namespace, one per namespace whoever uses it (the tag
                         makes the name unique: one being unmounted is never re-bound)
    c<id>/<type>         a symlink to ../<type>.<ino>.<tag>: which namespaces <id> has
    c<id>/root           a symlink to "derived" (the root of its mount namespace, as
                         setns(2) finds it) or "held" (an fd the keeper holds: a creator's
                         chroot, say)

What cannot be bound is held by an fd, once per namespace, the keeper a copy under
`ns.<type>.<ino>`: the kernel binds a mount namespace only if younger than the holder
(`mnt_ns_loop`, ELOOP). So are the service's own (the host's), for its life: they were
bound and unbound again with each container.

A new namespace is bound once it has lived `BIND_DELAY` (*fresh* until then: held by its
fd, the keeper a copy in its container's entry): a create-run-exit container never costs a
bind and an unbind. Its bind's name is chosen at once: the c<id> links never change. Where
binding fails, the namespace stays fresh and is tried again a second later; while some wait
for room under fs.mount-max, new namespaces are refused (EAGAIN, naming the sysctl).

Open fds are cached (least recently used first out, `CACHE_SIZE`): a new namespace's fd
stays open (fresh, then cached once bound), so its first forks re-open nothing. A lent fd
(`ns[name]`) stays open for the rest of the caller's synchronous step; across an await,
take a `dup()`.

Unmounting waits for an RCU grace period (about 0.7 ms here), so binds no container uses any
more are unmounted by a worker thread (`unbind_forever`), off the event loop.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import trio

from syscalls.fd import Fd
from syscalls.nstypes import NAMES

from . import namespaces, nsholder
from .containerns import ContainerNs
from .fdstore import FdStore

log = logging.getLogger("containerfs")

HOLDER_KEY = "nsholder"  # the keeper's key of the holder's fds ("mnt", "root")
HELD_PREFIX = "ns."  # keeper keys of namespaces held by fd: ns.<type>.<ino>
CACHE_SIZE = 256  # open fds kept for recently used namespaces and roots
# Seconds a new namespace lives on its fd before it is bound (the environment's
# CONTAINERFS_BIND_DELAY, for tests that catch one fresh).
BIND_DELAY = float(os.environ.get("CONTAINERFS_BIND_DELAY", "0.1"))
FRESH_MAX = 1024  # fresh namespaces past which they are bound at once (the fds they cost)
DERIVED, HELD = "derived", "held"  # what c<id>/root says


class Fresh(NamedTuple):
    """A namespace not bound yet: its bind's name, its fd, since when (time.monotonic())."""
    name: str
    fd: int
    since: float


class NsStore:
    """The holder, the binds in it, the namespaces held by fd, and the cache of open fds.
    Used from the service's event-loop thread only."""

    def __init__(self, fdstore: FdStore, cache_size: int = CACHE_SIZE) -> None:
        self.fdstore = fdstore
        self.cache_size = cache_size
        self.mnt = Fd()  # the holder's mount namespace
        self.dir = Fd()  # O_PATH fd of its tmpfs root
        self.refs: collections.Counter[tuple[str, int]] = collections.Counter()
        self.names: dict[tuple[str, int], str] = {}  # (type, ino) -> its bind's name
        self._tags = itertools.count()
        self._boot = os.urandom(3).hex()
        self._doomed: list[str] = []  # binds to unmount (unbind_forever)
        self._doomed_added = trio.Event()
        self.by_fd: dict[tuple[str, int], int] = {}  # namespaces that cannot be bound
        self.roots: dict[int, int] = {}  # container id -> its root, where "held"
        # (type, ino) or ("root", id) -> an open fd, least recently used first.
        self.cache: collections.OrderedDict[tuple[str, int], int] = collections.OrderedDict()
        # (type, ino) -> not bound yet (BIND_DELAY), oldest first.
        self.fresh: dict[tuple[str, int], Fresh] = {}
        self.full = False  # some fresh ones wait for room under fs.mount-max
        self._fresh_added = trio.Event()
        self.kept_fresh: set[int] = set()  # containers whose keeper entry has fresh copies
        # Told the ids of kept_fresh once bound: their keeper entries let the copies go.
        self.on_bound: Callable[[set[int]], None] | None = None
        self.close_ns: Callable[[str, int], None] = lambda _type, fd: os.close(fd)  # (type, fd)

    # ---- the holder ---------------------------------------------------------------------

    def start(self, held: dict[str, dict[str, int]]) -> None:
        """Take the holder and the namespaces held by fd out of what the keeper kept
        (`held`), or make a new holder. Before any container is adopted or created."""
        kept = held.pop(HOLDER_KEY, {})
        if "mnt" in kept and "root" in kept:
            self.mnt, self.dir = Fd(kept.pop("mnt")), Fd(kept.pop("root"))
        else:
            self._make_holder()
        for fd in kept.values():
            os.close(fd)
        for key in [k for k in held if k.startswith(HELD_PREFIX)]:
            fds = held.pop(key)
            _, nstype, ino = key.split(".", 2)
            self.by_fd[(nstype, int(ino))] = fds.pop("ns")
            for fd in fds.values():
                os.close(fd)
        self._pin_own()

    def _pin_own(self) -> None:
        """Hold the service's own namespaces by fd for as long as it runs (one reference
        never given back): containers made from the host share them."""
        for nstype in NAMES:
            try:
                fd = os.open(f"/proc/self/ns/{nstype}{'_for_children' * (nstype == 'pid')}",
                             os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # a type this kernel lacks
            key = (nstype, os.fstat(fd).st_ino)
            if key in self.by_fd:  # (kept across a restart)
                os.close(fd)
            else:
                self._hold_by_fd(key, fd)
            self.refs[key] += 1

    def _hold_by_fd(self, key: tuple[str, int], fd: int) -> None:
        """Hold namespace `key` by `fd` (taken), the keeper a copy (ns.<type>.<ino>)."""
        self.by_fd[key] = fd
        self.fdstore.put(f"{HELD_PREFIX}{key[0]}.{key[1]}", {"ns": fd})

    def _make_holder(self) -> None:
        mnt, root = nsholder.make_holder()
        self.mnt, self.dir = Fd(mnt), Fd(root)
        self.fdstore.put(HOLDER_KEY, {"mnt": mnt, "root": root})

    def close(self) -> None:
        """Close the service's fds (at its stop): the keeper's copies keep everything."""
        for fd in [*self.cache.values(), *self.by_fd.values(), *self.roots.values(),
                   *(f.fd for f in self.fresh.values())]:
            os.close(fd)
        self.fresh.clear()
        self.cache.clear()
        self.by_fd.clear()
        self.roots.clear()
        self.mnt.close()
        self.dir.close()

    # ---- holding --------------------------------------------------------------------------

    def hold(self, cid: int, fds: dict[str, int], root_derived: bool | None = None) -> ContainerNs:
        """Hold container `cid`'s namespaces and root (`fds`, taken: {type: fd, "root": fd};
        `root_derived` as for put)."""
        ns = ContainerNs(self, cid)
        os.mkdir(f"c{cid}", 0o700, dir_fd=self.dir.fileno())
        try:
            self.put(ns, fds, root_derived)
        except BaseException:
            self.release(ns)
            raise
        return ns

    def put(self, ns: ContainerNs, fds: dict[str, int], root_derived: bool | None = None) -> None:
        """Hold `fds` (taken) for `ns`, replacing what it held under those names. A new
        namespace is fresh (bound after BIND_DELAY, by bind_forever). `root_derived`: whether
        the root is the one setns(2) into the mount namespace finds, if known (else checked)."""
        fds = dict(fds)
        root = fds.pop("root", None)
        try:
            keys = {t: (t, os.fstat(fd).st_ino) for t, fd in fds.items()}
            if self.full and self.fresh and any(
                    k not in self.names and k not in self.fresh and k not in self.by_fd
                    for k in keys.values()):
                raise nsholder.mount_max_error()
            derived = bool(root_derived)
            if root is not None and root_derived is None:  # (the new one, or the one held)
                mnt = fds["mnt"] if "mnt" in fds else self.lend(ns, "mnt")
                derived = namespaces.is_ns_root(root, mnt)
        except BaseException:
            for fd in [*fds.values(), *([root] if root is not None else [])]:
                os.close(fd)
            raise
        d = f"c{ns.cid}"
        for t, key in keys.items():
            old = ns.ids.get(t)
            self.refs[key] += 1
            ns.ids[t] = key[1]
            fd = fds.pop(t)
            if key in self.names:
                target = self.names[key]
            elif key in self.fresh:
                target = self.fresh[key].name
            elif key in self.by_fd:
                target = f"{t}.{key[1]}"
            else:
                target = self._bind_name(key)
                self.fresh[key] = Fresh(target, fd, time.monotonic())
                self._fresh_added.set()
                fd = -1
            nsholder.replace_link(f"../{target}", f"{d}/{t}", self.dir.fileno(), new=old is None)
            if fd >= 0:
                if key in self.cache or key in self.by_fd or key in self.fresh:
                    os.close(fd)  # (the open one may be lent right now)
                else:
                    self._cache(key, fd)
            if old is not None:
                self._unref((t, old))
        if root is not None:
            self._forget_root(ns.cid)
            new_root, ns.root = ns.root is None, DERIVED if derived else HELD
            if derived:
                self._cache(("root", ns.cid), root)
            else:
                self.roots[ns.cid] = root
            nsholder.replace_link(ns.root, f"{d}/root", self.dir.fileno(), new=new_root)

    def _bind_name(self, key: tuple[str, int]) -> str:
        """A name no bind ever had (one being unmounted is never bound again)."""
        return f"{key[0]}.{key[1]}.{self._boot}{next(self._tags)}"

    def keep_fds(self, ns: ContainerNs) -> dict[str, int]:
        """What the keeper must hold for `ns` beside the handle: its root, if held by fd,
        and its fresh namespaces (`ns:<type>`, until they are bound: see on_bound)."""
        fds = {"root": self.roots[ns.cid]} if ns.cid in self.roots else {}
        for t, ino in ns.ids.items():
            fresh = self.fresh.get((t, ino))
            if fresh is not None:
                fds[f"ns:{t}"] = fresh.fd
        if len(fds) > (ns.cid in self.roots):
            self.kept_fresh.add(ns.cid)
        else:
            self.kept_fresh.discard(ns.cid)
        return fds

    async def bind_forever(self) -> None:
        """Forever: bind each namespace once it has been fresh for BIND_DELAY (all at once
        past FRESH_MAX), a batch at a time in a worker thread, then tell on_bound whose
        keeper copies can go. What could not be bound (no fd to spare, fs.mount-max
        reached) stays fresh and is tried again a second later."""
        while True:
            self._fresh_added = trio.Event()
            if not self.fresh:
                await self._fresh_added.wait()
                continue
            wait = next(iter(self.fresh.values())).since + BIND_DELAY - time.monotonic()
            if wait > 0 and len(self.fresh) < FRESH_MAX:  # the oldest is still young
                with trio.move_on_after(wait):
                    await self._fresh_added.wait()
                continue
            if not await self._bind_due():
                await trio.sleep(1)

    async def _bind_due(self) -> bool:
        """Bind the fresh namespaces that are due (bind_forever); False if some of them
        could not be."""
        due = time.monotonic() - BIND_DELAY if len(self.fresh) < FRESH_MAX else float("inf")
        batch: list[tuple[tuple[str, int], str, int]] = []
        failed = False
        for key, f in self.fresh.items():
            if f.since > due:
                break  # (oldest first)
            try:
                batch.append((key, f.name, os.dup(f.fd)))  # (ours may be let go meanwhile)
            except OSError as e:  # out of fds: the rest wait until some are free
                log.warning("namespaces not bound (%s); again in 1 s", e)
                failed = True
                break
        tried = 0
        refused: set[int] = set()
        if batch:
            try:
                refused, tried = await trio.to_thread.run_sync(
                    nsholder.bind, self.mnt.fileno(), [(n, fd) for _k, n, fd in batch])
            except OSError as e:
                log.warning("namespaces not bound (%s); again in 1 s", e)
                failed = True
            else:
                self.full = tried < len(batch)
                if self.full:
                    log.warning("%d namespaces not bound: %s", len(batch) - tried,
                                nsholder.mount_max_error().strerror)
        for i, (key, name, fd) in enumerate(batch):
            os.close(fd)
            if i >= tried:
                continue  # still fresh
            if key not in self.fresh or self.fresh[key].name != name:  # let go meanwhile
                if i not in refused:
                    self._doom([name])
                continue
            own = self.fresh.pop(key).fd
            if i in refused:  # (a mount namespace older than the holder)
                self._hold_by_fd(key, own)
            else:
                self.names[key] = name
                self._cache(key, own)
        if tried:
            done, self.kept_fresh = self.kept_fresh, set()
            if self.on_bound is not None:
                self.on_bound(done)
        return not failed and tried == len(batch)

    def has_fresh(self, ns: ContainerNs) -> bool:
        """Whether some namespace of `ns` is not bound yet."""
        return any((t, ino) in self.fresh for t, ino in ns.ids.items())

    def release(self, ns: ContainerNs) -> None:
        """Let `ns` go: its entries, and every namespace no other container uses."""
        d = f"c{ns.cid}"
        dirfd = self.dir.fileno()
        for t in list(ns.ids):
            nsholder.unlink(f"{d}/{t}", dirfd)
        nsholder.unlink(f"{d}/root", dirfd)
        try:
            os.rmdir(d, dir_fd=dirfd)
        except FileNotFoundError:
            pass
        self._forget_root(ns.cid)
        for t, ino in ns.ids.items():
            self._unref((t, ino))
        ns.ids = {}
        ns.root = None

    def _unref(self, key: tuple[str, int]) -> None:
        """One user fewer; unbound (or closed) when none is left."""
        self.refs[key] -= 1
        if self.refs[key] > 0:
            return
        del self.refs[key]
        fd = self.cache.pop(key, None)
        if fd is not None:
            self.close_ns(key[0], fd)
        fresh = self.fresh.pop(key, None)
        if fresh is not None:
            self.close_ns(key[0], fresh.fd)
        held = self.by_fd.pop(key, None)
        if held is not None:
            self.close_ns(key[0], held)
            self.fdstore.drop(f"{HELD_PREFIX}{key[0]}.{key[1]}")
        name = self.names.pop(key, None)
        if name is not None:
            self._doom([name])

    def _doom(self, names: list[str]) -> None:
        self._doomed += names
        self._doomed_added.set()

    async def unbind_forever(self) -> None:
        """Forever: unmount the binds no container uses any more, in a worker thread (an
        unmount waits for an RCU grace period). Their names are never used again, so a
        namespace bound anew meanwhile is not touched."""
        while True:
            await self._doomed_added.wait()
            self._doomed_added = trio.Event()
            names, self._doomed = self._doomed, []
            await trio.to_thread.run_sync(nsholder.unbind_all, self.mnt.fileno(), names)
            self.full = False  # (room for as many)

    def pending_unbinds(self) -> int:
        return len(self._doomed)

    def _forget_root(self, cid: int) -> None:
        fd = self.cache.pop(("root", cid), None)
        if fd is not None:
            os.close(fd)
        held = self.roots.pop(cid, None)
        if held is not None:
            os.close(held)

    # ---- opening ------------------------------------------------------------------------

    def lend(self, ns: ContainerNs, name: str) -> int:
        """An fd of `ns`'s `name`, lent: open until this store's next step that may evict
        (the caller's synchronous step at least, if it lends fewer than CACHE_SIZE)."""
        if name == "root":
            held = self.roots.get(ns.cid)
            if held is not None:
                return held
            key = ("root", ns.cid)
        else:
            key = (name, ns.ids[name])
            fd = self.by_fd.get(key)
            if fd is not None:
                return fd
            if key in self.fresh:
                return self.fresh[key].fd
        fd = self.cache.get(key)
        if fd is not None:
            self.cache.move_to_end(key)
            return fd
        if name == "root":
            fd = namespaces.ns_root(self.lend(ns, "mnt"))
        else:
            fd = os.open(self.names[key], os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.dir.fileno())
        self._cache(key, fd)
        return fd

    def _cache(self, key: tuple[str, int], fd: int) -> None:
        """Keep `fd` (taken) open for `key`, closing the least recently used past the bound."""
        old = self.cache.pop(key, None)
        if old is not None and old != fd:
            os.close(old)
        self.cache[key] = fd
        while len(self.cache) > self.cache_size:
            _, out = self.cache.popitem(last=False)
            os.close(out)

    # ---- after a restart ----------------------------------------------------------------

    def recorded(self, cid: int) -> bool:
        """Whether the holder records container `cid` (a previous service's)."""
        return nsholder.exists(f"c{cid}", self.dir.fileno())

    def adopt(self, cid: int, root: int | None, fresh: dict[str, int]) -> ContainerNs | None:
        """The namespaces of container `cid` as a previous service left them (`root`: the
        keeper's fd of a held root, taken; `fresh`: its copies of namespaces not bound yet,
        by type: those used are popped); None if none are recorded."""
        d = f"c{cid}"
        dirfd = self.dir.fileno()
        try:
            names = nsholder.listdir(d, dirfd)
        except FileNotFoundError:
            if root is not None:
                os.close(root)
            return None
        ns = ContainerNs(self, cid)
        for name in names:
            target = os.readlink(f"{d}/{name}", dir_fd=dirfd)
            if name == "root":
                ns.root = target if target in (DERIVED, HELD) else None
                continue
            bound = target.removeprefix("../")
            key = nsholder.key(bound)
            if key is None or key[0] != name:
                log.warning("container %d: stray entry %s -> %s ignored", cid, name, target)
                continue
            if key not in self.by_fd and key not in self.fresh:
                if nsholder.bound_at(bound, key[1], dirfd):
                    self.names[key] = bound
                else:  # not bound yet: the keeper's copy, if it is that namespace
                    fd = fresh.pop(name, -1)
                    if fd < 0 or os.fstat(fd).st_ino != key[1]:
                        if fd >= 0:
                            os.close(fd)
                        log.warning("container %d: its %s namespace was lost", cid, name)
                        continue
                    self.fresh[key] = Fresh(bound, fd, time.monotonic())
                    self._fresh_added.set()
            ns.ids[name] = key[1]
            self.refs[key] += 1
        if ns.root == HELD:
            if root is None:
                log.warning("container %d: its root was lost", cid)
                ns.root = None
            else:
                self.roots[cid] = root
                root = None
        if root is not None:
            os.close(root)
        return ns

    def sweep(self, live: set[int]) -> None:
        """After adoption: remove what no adopted container (ids in `live`) uses."""
        dirfd = self.dir.fileno()
        gone = []
        for name in nsholder.listdir(".", dirfd):
            if name.startswith("c") and name[1:].isdigit():
                if int(name[1:]) not in live:
                    for entry in nsholder.listdir(name, dirfd):
                        nsholder.unlink(f"{name}/{entry}", dirfd)
                    os.rmdir(name, dir_fd=dirfd)
                continue
            key = nsholder.key(name)
            if key is None or self.names.get(key) != name:
                gone.append(name)
        for key in [k for k in self.by_fd if not self.refs[k]]:
            os.close(self.by_fd.pop(key))
            self.fdstore.drop(f"{HELD_PREFIX}{key[0]}.{key[1]}")
        self._doom(gone)

    def stats(self) -> dict[str, int]:
        """How much is held: namespaces bound, held by fd, roots held, fds cached."""
        return {"bound": len(self.names), "by_fd": len(self.by_fd), "roots": len(self.roots),
                "cached": len(self.cache), "fresh": len(self.fresh),
                "to_unmount": len(self._doomed)}
