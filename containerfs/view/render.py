"""The text of the view's files: the proposal's `containers` table, byte for byte, and the
per-container files. Pure functions of a container record and a reader."""

from __future__ import annotations

from syscalls.constants import (
    CONTAINER_FD_CLOEXEC,
    CONTAINER_KILL_ON_CLOSE,
    CONTAINER_NEW_CGROUP_NS,
    CONTAINER_NEW_EMPTY_FS_NS,
    CONTAINER_NEW_FS_NS,
    CONTAINER_NEW_IPC_NS,
    CONTAINER_NEW_NET_NS,
    CONTAINER_NEW_PID_NS,
    CONTAINER_NEW_USER_NS,
    CONTAINER_NEW_UTS_NS,
)

import collections
import errno
import os
from collections.abc import Callable, Mapping

from syscalls import caps
from syscalls.nstypes import NAMES

from ..states import State
from .readers import HOST_ID, PidView, Reader, map_id, pid_pairs
from .records import CgroupsLike, ContainerLike

# The proposal's /proc/containers format (docs/api.md section 6), byte for byte.
HEADER = b"NAME                               ID USE FL OWNER GROUP\n"
ROW = b"%-24s %12d %3d %02x %5d %5d\n"
CURRENT = b"<current>"

FL_INIT_STARTED = 0x01
FL_DEAD = 0x02
FL_KILL_ON_CLOSE = 0x04
FL_FROZEN = 0x08

FLAG_NAMES = (
    (CONTAINER_NEW_FS_NS, "NEW_FS_NS"),
    (CONTAINER_NEW_EMPTY_FS_NS, "NEW_EMPTY_FS_NS"),
    (CONTAINER_NEW_CGROUP_NS, "NEW_CGROUP_NS"),
    (CONTAINER_NEW_UTS_NS, "NEW_UTS_NS"),
    (CONTAINER_NEW_IPC_NS, "NEW_IPC_NS"),
    (CONTAINER_NEW_USER_NS, "NEW_USER_NS"),
    (CONTAINER_NEW_PID_NS, "NEW_PID_NS"),
    (CONTAINER_NEW_NET_NS, "NEW_NET_NS"),
    (CONTAINER_KILL_ON_CLOSE, "KILL_ON_CLOSE"),
    (CONTAINER_FD_CLOEXEC, "FD_CLOEXEC"),
)

# Namespace types in the order /proc/PID/ns lists them (alphabetical).
NS_ORDER = tuple(sorted(NAMES))



def ns_types(c: ContainerLike) -> list[str]:
    """The namespaces a container's processes are in, while it has them."""
    out = []
    for t in NS_ORDER:
        if t not in c.ns:
            continue
        if t == "pid" and "pid" in c.new_ns and c.init_pid is None:
            continue  # born with init: what is held until then is the creator's
        out.append(t)
    return out


def fl(c: ContainerLike, frozen: bool = False) -> int:
    fl = 0
    # STARTING counts: a process made by fork_into_container may run (and read this) before
    # the service has its pid, but never before the service granted the fork.
    if c.init_pid is not None or c.state == State.STARTING:
        fl |= FL_INIT_STARTED
    if c.state == State.DEAD:
        fl |= FL_DEAD
    if c.flags & CONTAINER_KILL_ON_CLOSE:
        fl |= FL_KILL_ON_CLOSE
    if frozen:
        fl |= FL_FROZEN
    return fl


def c_int(v: int) -> int:
    """An id as C's %d prints a uid_t: as a signed 32-bit int."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def row(name: bytes, cid: int, use: int, fl: int, owner: int, group: int) -> bytes:
    return ROW % (name, cid, use, fl, c_int(owner), c_int(group))


def parse_table(text: bytes) -> list[tuple[bytes, int, int, int, int, int]]:
    """Parse a `containers` text (for tests and tools); ValueError if it is not well formed."""
    lines = text.split(b"\n")
    if not text.endswith(b"\n") or lines[0] + b"\n" != HEADER or len(lines) < 3:
        raise ValueError(f"not a containers table: {text[:80]!r}")
    rows = []
    for line in lines[1:-1]:
        if len(line) < 55 or line[24:25] != b" ":
            raise ValueError(f"bad row {line!r}")
        name = line[:24].rstrip(b" ")
        fields = line[25:].split()
        if len(fields) != 5:
            raise ValueError(f"bad row {line!r}")
        parsed = (name, int(fields[0]), int(fields[1]), int(fields[2], 16), int(fields[3]),
                  int(fields[4]))
        if row(*parsed) != line + b"\n":
            raise ValueError(f"row not in the table's format: {line!r}")
        rows.append(parsed)
    if rows[0][0] != CURRENT:
        raise ValueError("the first row is not <current>")
    return rows



def table(containers: Mapping[int, ContainerLike], reader: Reader,
          use_count: Callable[[ContainerLike, int], int],
          frozen: Callable[[ContainerLike], bool] = lambda c: False) -> bytes:
    """The reader's `containers` text: its own container, then the children it may see."""
    children = collections.Counter(c.parent for c in containers.values())
    cur = reader.cid
    if cur == HOST_ID:
        # `.init`: held by the host itself, started, owned by root.
        use, flags, owner, group = 1 + children[HOST_ID], FL_INIT_STARTED, 0, 0
    else:
        c = containers.get(cur)
        if c is None:
            raise OSError(errno.ENOENT, f"no container {cur}")
        use, flags, owner, group = use_count(c, children[c.id]), fl(c, frozen(c)), c.owner, c.group
    rows = [HEADER, row(CURRENT, cur, use, flags, map_id(owner, reader.uid_map),
                        map_id(group, reader.gid_map))]
    for c in containers.values():
        if c.parent == cur and (reader.is_root or c.owner == reader.uid):
            rows.append(row(c.name, c.id, use_count(c, children[c.id]), fl(c, frozen(c)),
                            map_id(c.owner, reader.uid_map), map_id(c.group, reader.gid_map)))
    return b"".join(rows)


def ns_file(c: ContainerLike, nstype: str) -> bytes:
    """<id>/ns/<type>: the namespace as /proc/PID/ns names it."""
    if nstype not in ns_types(c):
        raise OSError(errno.ENOENT, f"container {c.id} has no {nstype} namespace now")
    return b"%s:[%d]\n" % (nstype.encode(), os.fstat(c.ns[nstype]).st_ino)


def container_file(c: ContainerLike, name: bytes, reader: Reader,
                   procs: Callable[[int], list[int]]) -> bytes:
    """<id>/<name> as `reader` sees it (ids mapped, pids in its PID namespace)."""
    if name == b"name":
        return c.name + b"\n"
    if name == b"state":
        return c.state.value.encode() + b"\n"
    if name == b"owner":
        return b"%d\n" % map_id(c.owner, reader.uid_map)
    if name == b"group":
        return b"%d\n" % map_id(c.group, reader.gid_map)
    if name == b"flags":
        names = [n for bit, n in FLAG_NAMES if c.flags & bit]
        return (b"%#x" % c.flags) + b"".join(b" " + n.encode() for n in names) + b"\n"
    if name == b"caps":
        # The mask every process forked in is limited to, and its names; "all" if unlimited.
        if c.caps is None:
            return b"all\n"
        return (b"%#x " % c.caps) + ",".join(caps.names_of(c.caps)).encode() + b"\n"
    if name == b"seccomp":
        return b"filter\n" if c.seccomp is not None else b"none\n"
    if name == b"exit_status":
        if c.state != State.DEAD:
            raise OSError(errno.ENOENT, f"container {c.id} is not dead")
        return b"" if c.exit_status is None else b"%d\n" % c.exit_status
    pids = PidView(reader.pid)
    if name == b"init_pid":
        if c.init_pid is None:
            return b"0\n"
        seen = pids.translate(c.init_pid) if c.state != State.DEAD else (
            c.init_pid if pids.level == 0 else None)
        return b"%d\n" % (seen or 0)
    if name == b"members":
        members = procs(c.id) if c.state != State.DEAD else []
        seen_pids = (pids.translate(p) for p in members)
        return b"".join(b"%d\n" % p for p in seen_pids if p)
    if name == b"pids":
        # "INNER OUTER": the pid inside the container, then as the reader sees it.
        members = procs(c.id) if c.state != State.DEAD else []
        pairs = pid_pairs(c.ns, c.init_pid, members, pids)
        return b"".join(b"%d %d\n" % (inner, outer) for outer, inner in pairs)
    raise OSError(errno.ENOENT, f"no {name!r} in container {c.id}")


def resource_file(c: ContainerLike, name: bytes, cgroups: CgroupsLike) -> bytes:
    """<id>/stats (one "name value" line per stat, v2 names and meanings) or
    <id>/limits/<name> (its value, v2 syntax); ENOENT once dead or for a limit not set."""
    if c.state == State.DEAD:
        raise OSError(errno.ENOENT, f"container {c.id} is dead")
    if name == b"stats":
        stats = cgroups.stats(c.id)
        return b"".join(b"%s %d\n" % (k.encode(), v) for k, v in sorted(stats.items()))
    value = cgroups.limits(c.id).get(name.decode())
    if value is None:
        raise OSError(errno.ENOENT, f"container {c.id} has no {name!r} limit now")
    return value.encode() + b"\n"


def frozen(c: ContainerLike, cgroups: CgroupsLike) -> bool:
    """Whether a living container is frozen now (FL 0x08)."""
    if c.state == State.DEAD:
        return False
    try:
        return cgroups.frozen(c.id)
    except OSError:
        return False  # its groups are going away
