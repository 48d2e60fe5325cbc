"""Who reads the view: a reader's identity, how its user namespace maps ids, and how it sees
pids (its PID namespace). Plain data and /proc reads; nothing here knows about FUSE."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Mapping
from dataclasses import dataclass

from syscalls.pids import pid_in

from .records import CgroupsLike

HOST_ID = 1  # `.init`: the host itself, never a listed container
OVERFLOW_ID = 65534  # what an id with no mapping in the reader's user namespace shows as

_NS_GET_PARENT = 0xB702  # _IO(0xb7, 0x2): the parent of a PID (or user) namespace

# A user namespace's id map: (first id inside, first id outside, count) per line.
IdMap = tuple[tuple[int, int, int], ...]
# What a `containers` table depends on: the reader's container, whose containers it lists
# (None: all, for root) and how it sees uids and gids (None: as the host does).
ViewKey = tuple[int, int | None, IdMap | None, IdMap | None]


def map_id(host_id: int, idmap: IdMap | None) -> int:
    """`host_id` as a process with `idmap` sees it; the overflow id if it has no mapping."""
    if idmap is None:
        return host_id
    for inside, outside, count in idmap:
        if outside <= host_id < outside + count:
            return inside + host_id - outside
    return OVERFLOW_ID


def parse_id_map(text: str) -> IdMap:
    """Parse /proc/PID/uid_map (or gid_map) as read from the service's user namespace."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 3:
            out.append((int(fields[0]), int(fields[1]), int(fields[2])))
    return tuple(out)


@dataclass(frozen=True)
class Reader:
    """Who makes a request: the process (pid as the service sees it), its fs credentials as
    the mount sees them (host ids), its container and how its user namespace maps ids."""
    pid: int
    uid: int
    gid: int
    cid: int = HOST_ID
    uid_map: IdMap | None = None
    gid_map: IdMap | None = None

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def key(self) -> ViewKey:
        return (self.cid, None if self.is_root else self.uid, self.uid_map, self.gid_map)


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def _nspid(pid: int) -> list[int] | None:
    """The NSpid line of /proc/PID/status: the pid in each PID namespace, outermost first."""
    try:
        for line in read_text(f"/proc/{pid}/status").splitlines():
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class PidView:
    """Translates host pids into the PID namespace of one reader, as /proc would show them."""

    def __init__(self, reader_pid: int) -> None:
        self.level = 0
        self.pidns = 0
        if reader_pid > 0:
            nspid = _nspid(reader_pid)
            if nspid is None:
                raise OSError(errno.ESRCH, f"reader {reader_pid} is gone")
            self.level = len(nspid) - 1
            if self.level:
                self.pidns = os.stat(f"/proc/{reader_pid}/ns/pid").st_ino

    def translate(self, pid: int) -> int | None:
        """`pid` as the reader sees it, or None if it is not in the reader's PID namespace."""
        if self.level == 0:
            return pid
        nspid = _nspid(pid)
        if nspid is None or len(nspid) <= self.level:
            return None
        # The process is deep enough; check that the namespace at the reader's level is the
        # reader's own, by walking up from the process's namespace.
        try:
            fd = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError):
            return None
        try:
            for _ in range(len(nspid) - 1 - self.level):
                parent = fcntl.ioctl(fd, _NS_GET_PARENT)
                os.close(fd)
                fd = parent
            return nspid[self.level] if os.fstat(fd).st_ino == self.pidns else None
        except OSError:
            return None
        finally:
            os.close(fd)


def pid_pairs(ns: Mapping[str, int], init_pid: int | None, members: list[int],
              view: PidView) -> list[tuple[int, int]]:
    """The `members` (host pids) as (pid as the view's reader sees it, pid in the container's
    PID namespace `ns["pid"]`), init first; those the reader cannot see, or gone, left out."""
    if "pid" not in ns:
        return []  # NEW_PID_NS before init: no process yet
    pairs = []
    for p in sorted(members, key=lambda p: p != init_pid):
        outer = view.translate(p)
        try:
            inner = pid_in(ns["pid"], p)
        except OSError:
            continue  # exited meanwhile
        if outer:
            pairs.append((outer, inner))
    return pairs


class Readers:
    """Tells who a reader is: its container (from its cgroup) and its user namespace's maps."""

    def __init__(self, cgroups: CgroupsLike) -> None:
        self.cgroups = cgroups
        self._own_userns = os.stat("/proc/self/ns/user").st_ino
        base, mount = getattr(cgroups, "base", None), getattr(cgroups, "mount", None)
        # The cgroup path prefix of container groups ("/<base>/c"), to find a reader's
        # container from /proc/PID/cgroup without the general helper's cost on every open.
        self._cg_prefix = (b"\n0::/" + os.path.relpath(base, mount).encode() + b"/c"
                           if isinstance(base, str) and isinstance(mount, str) else None)

    def identify(self, pid: int, uid: int, gid: int) -> Reader:
        """The reader making a request, from the pid and credentials FUSE gives."""
        if pid <= 0:  # not in the service's PID namespace: it sees what the host sees
            return Reader(pid, uid, gid)
        cid = self.container_id_of(pid)
        uid_map = gid_map = None
        if os.stat(f"/proc/{pid}/ns/user").st_ino != self._own_userns:
            uid_map = parse_id_map(read_text(f"/proc/{pid}/uid_map"))
            gid_map = parse_id_map(read_text(f"/proc/{pid}/gid_map"))
        return Reader(pid, uid, gid, HOST_ID if cid is None else cid, uid_map, gid_map)

    def container_id_of(self, pid: int) -> int | None:
        if self._cg_prefix is None:
            return self.cgroups.container_id_of(pid)
        fd = os.open(f"/proc/{pid}/cgroup", os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = b"\n" + os.read(fd, 65536)
        finally:
            os.close(fd)
        at = data.find(self._cg_prefix)
        if at < 0:
            return None
        at += len(self._cg_prefix)
        end = at
        while end < len(data) and data[end:end + 1].isdigit():
            end += 1
        if end == at or data[end:end + 1] not in (b"/", b"\n", b""):
            return None
        if data[end:end + 2] == b"/c":
            return self.cgroups.container_id_of(pid)  # perhaps nested: the deepest one
        return int(data[at:end])
