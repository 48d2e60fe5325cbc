"""The /containers view as plain data: its inodes, who is reading, and the text of each file.

Nothing here knows about FUSE: `containerfs.view.fuse` adapts this model to pyfuse3, and the unit
tests drive it directly. Errors are raised as `OSError(errno, message)`; the adapter turns them
into FUSE replies.

Two promises shape the `containers` file (docs/view.md says more):
- it is relative to the reader, so each viewpoint (reader's container, uid filter, id maps) gets
  an inode of its own, and a page cache of its own;
- repeated reads come from the kernel's page cache, yet every open sees a table from one instant
  and the present one: an inode's cached text (its "published" text) changes only at an open,
  when no open file still reads the old text, and only after the kernel has dropped the old
  pages and size. Opens that cannot share the cache read their own copy with direct I/O.
"""

from __future__ import annotations

import collections
import errno
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio


from ..states import State
from .readers import HOST_ID, Reader, Readers, ViewKey
from .records import ContainerLike, ServiceLike
from . import render
from .nodes import CFILES, Attr, Kind, Node, OpenFile, Opened, Published, Rendered


ROOT_INO = 1
BYNAME_INO = 2

# Timeouts the kernel is given. `containers` keeps its size and pages until this model says
# otherwise (see `_open_table`); its directory entry is re-checked each second so that a reader
# from another container soon gets its own inode. Everything else is looked up afresh.
TABLE_ENTRY_TIMEOUT = 1.0
TABLE_ATTR_TIMEOUT = 3600.0
STATIC_TIMEOUT = 3600.0
DIR_ATTR_TIMEOUT = 1.0

# Members are counted from the cgroup, which changes without telling the service; a table is
# re-rendered at most this long after its last rendering when nothing else changed.
MEMBERS_TTL = 1.0

async def _no_invalidate(ino: int) -> None:
    return None


@dataclass
class Model:
    """The view's state: inode numbers, open files, published texts. Runs in the trio loop."""
    service: ServiceLike
    # Drops the kernel's cached pages and attributes of an inode (run in a worker thread by
    # the FUSE adapter); a no-op for tests without a mount.
    invalidate: Callable[[int], Awaitable[None]] = _no_invalidate
    clock: Callable[[], float] = time.monotonic
    generation: int = 0
    started_ns: int = field(default_factory=time.time_ns)
    _node_of: dict[int, Node] = field(default_factory=dict)
    _ino_of: dict[Node, int] = field(default_factory=dict)
    _by_cid: dict[int, list[Node]] = field(default_factory=dict)  # per-container nodes
    _next_ino: int = 16
    _next_fh: int = 1
    _files: dict[int, OpenFile] = field(default_factory=dict)
    _dirs: dict[int, list[tuple[bytes, Attr]]] = field(default_factory=dict)
    _published: dict[int, Published] = field(default_factory=dict)
    _rendered: dict[ViewKey, Rendered] = field(default_factory=dict)
    _cached_opens: collections.Counter[int] = field(default_factory=collections.Counter)
    _switching: dict[int, trio.Event] = field(default_factory=dict)
    _members: dict[int, int] = field(default_factory=dict)
    _members_at: tuple[int, float] = (-1, 0.0)
    _readers: Readers = field(init=False)

    def __post_init__(self) -> None:
        self._readers = Readers(self.service.cgroups)
        self._node_of[ROOT_INO] = Node(Kind.ROOT)
        self._node_of[BYNAME_INO] = Node(Kind.BYNAME)
        self._ino_of[Node(Kind.ROOT)] = ROOT_INO
        self._ino_of[Node(Kind.BYNAME)] = BYNAME_INO

    # ---- the service's hook and readers -----------------------------------------------------

    def changed(self) -> None:
        """The service changed something a reader could see: tables are rendered afresh at
        their next open (and the kernel's copy replaced then), removed containers forgotten."""
        self.generation += 1
        # Only the containers a reader looked at (a set difference would walk them all).
        live = self.service.containers
        gone = [cid for cid in self._by_cid if cid not in live]
        if gone:
            # Inode numbers are never reused: a kernel that still asks about one gets ENOENT.
            # (Viewpoint inodes stay: one may still be open, and there are few.)
            for cid in gone:
                for node in self._by_cid.pop(cid):
                    del self._node_of[self._ino_of.pop(node)]
            for key in [k for k in self._rendered if k[0] in gone]:
                del self._rendered[key]

    def identify(self, pid: int, uid: int, gid: int) -> Reader:
        """The reader making a request, from the pid and credentials FUSE gives."""
        return self._readers.identify(pid, uid, gid)

    # ---- visibility -------------------------------------------------------------------------

    def _in_world(self, reader: Reader, c: ContainerLike) -> bool:
        """Whether `c` is the reader's container or below it (everything is, for the host)."""
        if reader.cid == HOST_ID:
            return True
        containers = self.service.containers
        seen = 0
        cur: ContainerLike | None = c
        while cur is not None and seen <= len(containers):
            if cur.id == reader.cid:
                return True
            cur = containers.get(cur.parent) if cur.parent != HOST_ID else None
            seen += 1
        return False

    def _listed(self, reader: Reader, c: ContainerLike) -> bool:
        """Whether the reader sees `c` listed: in its world, and its own (root: all)."""
        return (reader.is_root or c.owner == reader.uid) and self._in_world(reader, c)

    def _container(self, cid: int, reader: Reader | None = None) -> ContainerLike:
        c = self.service.containers.get(cid)
        if c is None or (reader is not None and not self._in_world(reader, c)):
            raise OSError(errno.ENOENT, f"no container {cid}")
        return c

    def _check_reader(self, reader: Reader, c: ContainerLike) -> None:
        if not (reader.is_root or c.owner == reader.uid):
            raise OSError(errno.EACCES, f"container {c.id} belongs to uid {c.owner}")

    # ---- inodes and attributes --------------------------------------------------------------

    def _ino(self, node: Node) -> int:
        ino = self._ino_of.get(node)
        if ino is None:
            ino = self._next_ino
            self._next_ino += 1
            self._ino_of[node] = ino
            self._node_of[ino] = node
            if node.cid and node.kind is not Kind.TABLE:
                self._by_cid.setdefault(node.cid, []).append(node)
        return ino

    def node(self, ino: int) -> Node:
        node = self._node_of.get(ino)
        if node is None:
            raise OSError(errno.ENOENT, f"inode {ino} is gone")
        return node

    def table_ino(self, reader: Reader) -> int:
        return self._ino(Node(Kind.TABLE, reader.cid, key=reader.key()))

    def getattr(self, ino: int) -> Attr:
        node = self.node(ino)
        if node.kind is Kind.ROOT:
            return Attr(ino, stat.S_IFDIR | 0o555, nlink=3, mtime_ns=self.started_ns,
                        entry_timeout=STATIC_TIMEOUT, attr_timeout=DIR_ATTR_TIMEOUT)
        if node.kind is Kind.BYNAME:
            return Attr(ino, stat.S_IFDIR | 0o555, nlink=2, mtime_ns=self.started_ns,
                        entry_timeout=STATIC_TIMEOUT, attr_timeout=DIR_ATTR_TIMEOUT)
        if node.kind is Kind.TABLE:
            pub = self._published.get(ino)
            # The size is always that of the published text, the one the kernel may cache.
            return Attr(ino, stat.S_IFREG | 0o444, size=len(pub.data) if pub else 0,
                        mtime_ns=pub.mtime_ns if pub else self.started_ns,
                        entry_timeout=TABLE_ENTRY_TIMEOUT, attr_timeout=TABLE_ATTR_TIMEOUT)
        if node.kind is Kind.LINK:
            target = self._link_target(node.name, None)
            return Attr(ino, stat.S_IFLNK | 0o777, size=len(target), mtime_ns=self.started_ns)
        c = self._container(node.cid)
        base = Attr(ino, 0, uid=c.owner, gid=c.group, mtime_ns=self.started_ns)
        if node.kind is Kind.CDIR:
            base.mode, base.nlink = stat.S_IFDIR | 0o500, 3
        elif node.kind in (Kind.NSDIR, Kind.LIMITSDIR):
            base.mode, base.nlink = stat.S_IFDIR | 0o500, 2
        elif node.kind is Kind.KILL:
            base.mode = stat.S_IFREG | 0o200
        else:
            if node.kind is Kind.FILE and node.name == b"exit_status" and c.state != State.DEAD:
                raise OSError(errno.ENOENT, f"container {c.id} is not dead")
            base.mode = stat.S_IFREG | 0o400  # size 0, like /proc: read with direct I/O
        return base

    # ---- directories ------------------------------------------------------------------------

    def _entries(self, ino: int, reader: Reader) -> list[tuple[bytes, Node]]:
        node = self.node(ino)
        containers = self.service.containers
        if node.kind is Kind.ROOT:
            out = [(b"containers", Node(Kind.TABLE, reader.cid, key=reader.key())),
                   (b"by-name", Node(Kind.BYNAME))]
            out += [(str(c.id).encode(), Node(Kind.CDIR, c.id)) for c in containers.values()
                    if self._listed(reader, c)]
            return out
        if node.kind is Kind.BYNAME:
            return [(name, Node(Kind.LINK, name=name)) for name in self._names(reader)]
        if node.kind is Kind.CDIR:
            c = self._container(node.cid, reader)
            out = [(n, Node(Kind.FILE, c.id, n)) for n in CFILES
                   if n != b"exit_status" or c.state == State.DEAD]
            if c.state != State.DEAD:  # the groups, and what they say, go at death
                out += [(b"stats", Node(Kind.FILE, c.id, b"stats")),
                        (b"limits", Node(Kind.LIMITSDIR, c.id))]
            return out + [(b"ns", Node(Kind.NSDIR, c.id)), (b"kill", Node(Kind.KILL, c.id))]
        if node.kind is Kind.NSDIR:
            c = self._container(node.cid, reader)
            return [(t.encode(), Node(Kind.NS, c.id, t.encode())) for t in render.ns_types(c)]
        if node.kind is Kind.LIMITSDIR:
            c = self._container(node.cid, reader)
            names = self.service.cgroups.limits(c.id) if c.state != State.DEAD else {}
            return [(n.encode(), Node(Kind.LIMIT, c.id, n.encode())) for n in names]
        raise OSError(errno.ENOTDIR, "not a directory")

    def lookup(self, parent: int, name: bytes, reader: Reader) -> Attr:
        pnode = self.node(parent)
        if name == b".":
            return self.getattr(parent)
        if name == b"..":
            if pnode.kind in (Kind.ROOT, Kind.BYNAME, Kind.CDIR):
                return self.getattr(ROOT_INO)
            return self.getattr(self._ino(Node(Kind.CDIR, pnode.cid)))
        if pnode.kind is Kind.ROOT:
            if name == b"containers":
                return self.getattr(self.table_ino(reader))
            if name == b"by-name":
                return self.getattr(BYNAME_INO)
            if not name.isdigit() or name.startswith(b"0"):
                raise OSError(errno.ENOENT, f"no {name!r} in the view")
            # An id is found by anyone whose world holds it; its contents are the owner's.
            c = self._container(int(name), reader)
            return self.getattr(self._ino(Node(Kind.CDIR, c.id)))
        if pnode.kind is Kind.BYNAME:
            self._link_target(name, reader)
            return self.getattr(self._ino(Node(Kind.LINK, name=name)))
        for entry, node in self._entries(parent, reader):
            if entry == name:
                return self.getattr(self._ino(node))
        raise OSError(errno.ENOENT, f"no {name!r} in the view")

    def opendir(self, ino: int, reader: Reader) -> int:
        """Open a directory: its listing is taken now, so one listing is of one instant."""
        node = self.node(ino)
        if node.kind in (Kind.CDIR, Kind.NSDIR, Kind.LIMITSDIR):
            self._check_reader(reader, self._container(node.cid, reader))
        entries = [(name, self.getattr(self._ino(n))) for name, n in self._entries(ino, reader)]
        fh = self._fh()
        self._dirs[fh] = entries
        return fh

    def readdir(self, fh: int, start: int) -> list[tuple[bytes, Attr]]:
        return self._dirs[fh][start:]

    def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    def _names(self, reader: Reader) -> dict[bytes, int]:
        """by-name: each name the reader sees, to the newest container of that name."""
        out: dict[bytes, int] = {}
        for c in self.service.containers.values():
            if c.name not in (b"", b".", b"..") and self._listed(reader, c):
                out[c.name] = c.id
        return out

    def _link_target(self, name: bytes, reader: Reader | None) -> bytes:
        if reader is None:  # getattr: any holder of the name (the size is informative only)
            ids = [c.id for c in self.service.containers.values() if c.name == name]
        else:
            ids = [cid for n, cid in self._names(reader).items() if n == name]
        if not ids:
            raise OSError(errno.ENOENT, f"no container named {name!r}")
        return b"../%d" % ids[-1]

    def readlink(self, ino: int, reader: Reader) -> bytes:
        node = self.node(ino)
        if node.kind is not Kind.LINK:
            raise OSError(errno.EINVAL, "not a symbolic link")
        return self._link_target(node.name, reader)

    # ---- access checks (access(2); opens check for themselves) ------------------------------

    def access(self, ino: int, mode: int, reader: Reader) -> None:
        node = self.node(ino)
        if node.kind in (Kind.ROOT, Kind.BYNAME, Kind.TABLE, Kind.LINK):
            if mode & os.W_OK and node.kind is not Kind.LINK:
                raise OSError(errno.EACCES, "the view is read-only")
            if node.kind is Kind.TABLE and mode & os.X_OK:
                raise OSError(errno.EACCES, "not executable")
            return
        c = self._container(node.cid, reader)
        if mode == os.F_OK:
            return
        self._check_reader(reader, c)
        if node.kind is Kind.KILL:
            if mode & (os.R_OK | os.X_OK):
                raise OSError(errno.EACCES, "kill is write-only")
        elif mode & os.W_OK or (mode & os.X_OK and node.kind in (Kind.FILE, Kind.NS)):
            raise OSError(errno.EACCES, "read-only")

    # ---- files ------------------------------------------------------------------------------

    def _fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _open_file(self, ino: int, data: bytes, cached: bool, kill: int = 0) -> Opened:
        fh = self._fh()
        self._files[fh] = OpenFile(ino, data, cached, kill)
        if cached:
            self._cached_opens[ino] += 1
        return Opened(fh, direct_io=not cached, keep_cache=cached)

    async def open(self, ino: int, flags: int, reader: Reader) -> Opened:
        node = self.node(ino)
        accmode = flags & os.O_ACCMODE
        if node.kind in (Kind.ROOT, Kind.BYNAME, Kind.CDIR, Kind.NSDIR, Kind.LIMITSDIR):
            raise OSError(errno.EISDIR, "a directory")
        if node.kind is Kind.KILL:
            c = self._container(node.cid, reader)
            if accmode != os.O_WRONLY:
                raise OSError(errno.EACCES, f"{c.id}/kill is write-only")
            self._check_reader(reader, c)
            if reader.cid == c.id:
                raise OSError(errno.EPERM, f"a member of container {c.id} may not kill it")
            return self._open_file(ino, b"", cached=False, kill=c.id)
        if accmode != os.O_RDONLY:
            raise OSError(errno.EACCES, "the view is read-only")
        if node.kind is Kind.TABLE:
            return await self._open_table(ino, node, reader)
        if node.kind is Kind.LINK:
            raise OSError(errno.ELOOP, "a symbolic link")
        c = self._container(node.cid, reader)
        self._check_reader(reader, c)
        return self._open_file(ino, self.render_file(c, node, reader), cached=False)

    async def _open_table(self, ino: int, node: Node, reader: Reader) -> Opened:
        if node.key != reader.key():
            # The kernel kept another viewpoint's entry (a reader from elsewhere looked it up
            # within the entry timeout): this reader gets its own table, uncached.
            return self._open_file(ino, self.table(reader), cached=False)
        while (switching := self._switching.get(ino)) is not None:
            await switching.wait()
        data = self.table(reader)
        pub = self._published.get(ino)
        if pub is None or pub.data != data:
            if self._cached_opens[ino]:
                # Open files still read the old text through the page cache: this one reads
                # the new text on its own until they are closed.
                return self._open_file(ino, data, cached=False)
            # Nothing reads the old text: publish the new one, and make the kernel drop the
            # old pages and size before anyone may use the cache again.
            done = self._switching[ino] = trio.Event()
            self._published[ino] = Published(data, max(time.time_ns(),
                                                         pub.mtime_ns + 1 if pub else 0))
            try:
                await self.invalidate(ino)
            finally:
                del self._switching[ino]
                done.set()
        return self._open_file(ino, self._published[ino].data, cached=True)

    def read(self, fh: int, off: int, size: int) -> bytes:
        f = self._files.get(fh)
        if f is None:
            raise OSError(errno.EBADF, "no such open file")
        if f.kill:
            raise OSError(errno.EBADF, "kill is write-only")
        return f.data[off:off + size]

    def write(self, fh: int, data: bytes) -> int:
        f = self._files.get(fh)
        if f is None or not f.kill:
            raise OSError(errno.EBADF, "not open for writing")
        if data.strip() != b"1":
            raise OSError(errno.EINVAL, "write 1 to kill the container")
        c = self.service.containers.get(f.kill)
        if c is None:
            raise OSError(errno.ESRCH, f"container {f.kill} is gone")
        # Authorised at open, as the kernel does for its control files: the fd is the right.
        self.service.kill(c)
        return len(data)

    def release(self, fh: int) -> None:
        f = self._files.pop(fh, None)
        if f is not None and f.cached:
            self._cached_opens[f.ino] -= 1
            if not self._cached_opens[f.ino]:
                del self._cached_opens[f.ino]

    def open_files(self) -> int:
        return len(self._files) + len(self._dirs)

    # ---- rendering --------------------------------------------------------------------------

    def table(self, reader: Reader) -> bytes:
        """The reader's `containers` text, as of now (rendered again only when needed)."""
        key = reader.key()
        now = self.clock()
        got = self._rendered.get(key)
        if got is not None and got.generation == self.generation and now - got.at < MEMBERS_TTL:
            return got.data
        data = self.render_table(reader)
        self._rendered[key] = Rendered(self.generation, now, data)
        return data

    def _member_count(self, c: ContainerLike) -> int:
        if c.state not in (State.RUNNING, State.STARTING):
            return 0
        now = self.clock()
        if self._members_at[0] != self.generation or now - self._members_at[1] >= MEMBERS_TTL:
            self._members.clear()
            self._members_at = (self.generation, now)
        n = self._members.get(c.id)
        if n is None:
            n = self._members[c.id] = len(self.service.cgroups.procs(c.id))
        return n

    def use_count(self, c: ContainerLike, children: int) -> int:
        """References that hold `c`: its open handle, its living members, its children."""
        return int(c.handle_open) + self._member_count(c) + children

    def render_table(self, reader: Reader) -> bytes:
        return render.table(self.service.containers, reader, self.use_count,
                            lambda c: render.frozen(c, self.service.cgroups))

    def render_file(self, c: ContainerLike, node: Node, reader: Reader) -> bytes:
        if node.kind is Kind.NS:
            return render.ns_file(c, node.name.decode())
        if node.kind is Kind.LIMIT or node.name == b"stats":
            return render.resource_file(c, node.name, self.service.cgroups)
        return render.container_file(c, node.name, reader, self.service.cgroups.procs)
