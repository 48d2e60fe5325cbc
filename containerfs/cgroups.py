"""The service's cgroups: every container's groups in each hierarchy the host uses (limits,
freeze, kill: resources.ResourceGroups), and which container a process is in.

A container's processes live in its cgroup2 group (on a hybrid host, the controller-less
`unified` tree; on a pure cgroup2 host, the `members` leaf of a group with the controllers),
so a process's container is read from its cgroup2 path, or known at once from the group id a
pidfd gives.
"""

from __future__ import annotations

import errno
import os

from syscalls import linux

from .resources import ResourceGroups


def cgroup2_mount() -> str:
    """The mount point of the cgroup2 hierarchy, preferring /sys/fs/cgroup itself."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                found.append(left.split(" ")[4])
    if not found:
        raise OSError(errno.ENODEV, "no cgroup2 hierarchy is mounted; mount one at "
                                    "/sys/fs/cgroup/unified")
    return "/sys/fs/cgroup" if "/sys/fs/cgroup" in found else found[0]


def process_cgroup(pid: int) -> str | None:
    """The cgroup2 path of `pid` as the host sees it (the '0::' line), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].rstrip("\n")
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class CgroupTree(ResourceGroups):
    """The groups of every container under a base `name`, and the container of a process."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        if self.v2_base is None or self.layout.v2 is None:
            raise OSError(errno.ENODEV, "no cgroup2 hierarchy is mounted; mount one at "
                                        "/sys/fs/cgroup/unified")
        self.mount = self.layout.v2.path(self.layout.v2.root)
        self.base = self.v2_base
        # What container (or None) each cgroup2 group, by id, belongs to. A group's id (its
        # inode number) is never given to another group, so an answer once found stays true.
        self._owner_of_group: dict[int, int | None] = {}

    def create(self, cid: int, parent: int | None = None) -> None:
        super().create(cid, parent)
        self._owner_of_group[os.stat(self.path(cid)).st_ino] = cid

    def path(self, cid: int) -> str:
        """The group that holds the container's own processes (its cgroup.procs); where it
        would be, for a container that has none."""
        try:
            return self._members_dir(cid)
        except FileNotFoundError:
            return os.path.join(self.base, f"c{cid}")

    def open(self, cid: int) -> int:
        """An fd of that group, for clone3(CLONE_INTO_CGROUP)."""
        fd = self.clone_into_fd(cid)
        assert fd is not None  # a cgroup2 group exists (checked at start)
        return fd

    def try_remove(self, cid: int) -> bool:
        """Remove the container's groups in every hierarchy if they are empty; True once
        they are all gone (never waits)."""
        return not self.remove(cid, timeout=0)

    def container_id_of(self, pid: int) -> int | None:
        """The id of the container whose group (or a group below it) holds `pid`, if any."""
        path = process_cgroup(pid)
        prefix = "/" + os.path.relpath(self.base, self.mount) + "/c"
        if path is None or not path.startswith(prefix):
            return None
        # Nested groups (c2/c5/...): the deepest container group on the path, following
        # only groups the service made there (a c<N> a member made is not a container's).
        cid: int | None = None
        rel = ""
        for part in ("c" + path[len(prefix):]).split("/"):
            if not (part.startswith("c") and part[1:].isdigit()):
                break
            rel = os.path.join(rel, part) if rel else part
            known = self._rel.get(int(part[1:]))
            if cid is not None and known != rel:
                break  # not made by the service here (or by an earlier one: unknown)
            cid = int(part[1:])
        return cid

    def container_id_of_pidfd(self, pidfd: int, pid: int) -> int | None:
        """container_id_of for the process behind `pidfd` (its pid is `pid`): one ioctl,
        and a look under /proc only for a group not met before."""
        info = linux.pidfd_info(pidfd)
        if info is not None and info.pid <= 0:
            return None  # reaped: its pid may be another process's by now
        if info is None or not info.cgroup_id:
            return self.container_id_of(pid)
        if info.cgroup_id in self._owner_of_group:
            return self._owner_of_group[info.cgroup_id]
        cid = self.container_id_of(pid)
        again = linux.pidfd_info(pidfd)
        if again is not None and again.pid == info.pid and again.cgroup_id == info.cgroup_id:
            # Still in that group after the look (so the path read was that group's).
            if len(self._owner_of_group) >= 4096:
                self._owner_of_group.clear()
            self._owner_of_group[info.cgroup_id] = cid
        return cid

    def contains(self, cid: int, pid: int) -> bool:
        """Whether `pid` is in the container's group or below it."""
        return self.container_id_of(pid) == cid

    def bases(self) -> list[str]:
        """The base group in every hierarchy (for checks that nothing is left behind)."""
        return self._bases()
