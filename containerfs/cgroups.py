"""One cgroup2 group per container, under a base group of the service's own.

Works on pure cgroup2 hosts (/sys/fs/cgroup) and on hybrid ones (/sys/fs/cgroup/unified), where
the v2 hierarchy has no controllers but still gives cgroup.procs, cgroup.kill and cgroup.events.
"""

from __future__ import annotations

import errno
import os
import signal
import time

from syscalls import linux


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


class CgroupTree:
    """The service's base group `<cgroup2>/<name>` and one child group per container."""

    def __init__(self, name: str) -> None:
        self.mount = cgroup2_mount()
        self.base = os.path.join(self.mount, name)
        os.makedirs(self.base, exist_ok=True)
        # What container (or None) each group, by id, belongs to. A group's id (its inode
        # number) is never given to another group, so an answer once found stays true.
        self._owner_of_group: dict[int, int | None] = {}

    def path(self, cid: int) -> str:
        return os.path.join(self.base, f"c{cid}")

    def create(self, cid: int) -> str:
        path = self.path(cid)
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            # Left by a service whose registry was lost: reuse it only if it is empty.
            if not self.try_remove(cid):
                raise
            os.mkdir(path, 0o755)
        self._owner_of_group[os.stat(path).st_ino] = cid
        return path

    def open(self, cid: int) -> int:
        """An fd of the group's directory, for clone3(CLONE_INTO_CGROUP)."""
        return os.open(self.path(cid), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def move(self, cid: int, pid: int) -> None:
        """Put process `pid` into the container's group (the service's job for non-root)."""
        with open(os.path.join(self.path(cid), "cgroup.procs"), "w") as f:
            f.write(str(pid))

    def move_to(self, path: str, pid: int) -> None:
        """Put process `pid` into the group at `path` (as /proc/PID/cgroup names it)."""
        with open(os.path.join(self.mount, path.lstrip("/"), "cgroup.procs"), "w") as f:
            f.write(str(pid))

    def container_id_of(self, pid: int) -> int | None:
        """The id of the container whose group (or a group below it) holds `pid`, if any."""
        path = process_cgroup(pid)
        prefix = "/" + os.path.relpath(self.base, self.mount) + "/c"
        if path is None or not path.startswith(prefix):
            return None
        head = path[len(prefix):].split("/", 1)[0]
        return int(head) if head.isdigit() else None

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

    def procs(self, cid: int) -> list[int]:
        try:
            with open(os.path.join(self.path(cid), "cgroup.procs")) as f:
                return [int(x) for x in f.read().split()]
        except FileNotFoundError:
            return []

    def kill(self, cid: int) -> None:
        """SIGKILL every process in the group (cgroup.kill, or each pid on older kernels)."""
        try:
            with open(os.path.join(self.path(cid), "cgroup.kill"), "w") as f:
                f.write("1")
            return
        except FileNotFoundError:
            if not os.path.isdir(self.path(cid)):
                return
        for pid in self.procs(cid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def try_remove(self, cid: int) -> bool:
        """Remove the group if it is empty; True once it is gone."""
        try:
            os.rmdir(self.path(cid))
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno == errno.EBUSY:
                return False
            raise
        return True

    def remove_all(self, timeout: float = 5.0) -> None:
        """Kill and remove every container group and the base (for tests and teardown)."""
        deadline = time.monotonic() + timeout
        for entry in os.listdir(self.base):
            if entry.startswith("c") and entry[1:].isdigit():
                cid = int(entry[1:])
                self.kill(cid)
                while not self.try_remove(cid) and time.monotonic() < deadline:
                    time.sleep(0.005)
        try:
            os.rmdir(self.base)
        except OSError:
            pass
