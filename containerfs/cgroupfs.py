"""The host's cgroup filesystems: which hierarchies are mounted where, with which controllers,
and this process's own group in each (Layout, read once at start); and the few file operations
whose behaviour differs on cgroupfs from a plain directory (CgroupFS), which tests override to
emulate the kernel over a temporary tree."""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass

# The v1 controllers containerfs.resources uses.
V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids", "freezer")


def own_groups(path: str) -> dict[frozenset[str], str]:
    """{controllers of a hierarchy (empty for cgroup2): group} from a /proc/PID/cgroup file."""
    out: dict[frozenset[str], str] = {}
    with open(path) as f:
        for line in f:
            _, names, group = line.rstrip("\n").split(":", 2)
            out[frozenset(names.split(",")) if names else frozenset()] = group
    return out


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy: the `controllers` bound to it as /proc/PID/cgroup lists
    them (empty for cgroup2), its mount point, the group at the mount's root, and this
    process's own group in it (groups named as /proc/PID/cgroup names them)."""
    controllers: frozenset[str]
    mount: str
    root: str
    own: str

    def path(self, group: str) -> str:
        """The directory of `group`; ENOENT if it is outside the mount."""
        rel = os.path.relpath(group, self.root)
        if rel == os.pardir or rel.startswith(os.pardir + os.sep):
            raise OSError(errno.ENOENT, f"cgroup {group} is not under the mount {self.mount}")
        return os.path.normpath(os.path.join(self.mount, rel))


@dataclass(frozen=True)
class Layout:
    """The host's cgroup hierarchies: the cgroup2 one (if mounted) with the controllers its
    root offers, and the v1 ones that bind a controller this module uses."""
    v2: Hierarchy | None
    v2_controllers: frozenset[str]
    v1: tuple[Hierarchy, ...]

    def hierarchy_of(self, path: str) -> Hierarchy:
        """The hierarchy whose mount holds directory `path` (the deepest mount wins)."""
        found = [h for h in (*self.v1, *([self.v2] if self.v2 else []))
                 if path == h.mount or path.startswith(h.mount.rstrip(os.sep) + os.sep)]
        if not found:
            raise OSError(errno.ENOENT, f"{path} is in no cgroup hierarchy")
        return max(found, key=lambda h: len(h.mount))

    def groups_of(self, pid: int, dirs: list[str]) -> dict[str, str]:
        """{dir: the directory of the group `pid` is in, in the hierarchy of dir}."""
        now = own_groups(f"/proc/{pid}/cgroup")
        return {d: (h := self.hierarchy_of(d)).path(now[h.controllers]) for d in dirs}


def detect_layout(mountinfo: str = "/proc/self/mountinfo",
                  cgroup: str = "/proc/self/cgroup") -> Layout:
    """The layout as this process sees it (its mounts and its own groups)."""
    own = own_groups(cgroup)
    v2: list[Hierarchy] = []
    v1: dict[frozenset[str], Hierarchy] = {}
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            fields, (fstype, _, opts) = left.split(" "), right.split(" ", 2)
            root, mount = fields[3], fields[4].replace("\\040", " ")
            if fstype == "cgroup2":
                v2.append(Hierarchy(frozenset(), mount, root, own.get(frozenset(), "/")))
            elif fstype == "cgroup":
                # The hierarchy as /proc/self/cgroup names it (all its controllers, in any
                # order), if it binds one this module uses.
                for names, path in own.items():
                    if names & set(V1_CONTROLLERS) and names <= set(opts.split(",")) \
                            and names not in v1:
                        v1[names] = Hierarchy(names, mount, root, path)
    # As containerfs.cgroups does: /sys/fs/cgroup itself when it is the cgroup2 mount.
    v2.sort(key=lambda h: h.mount != "/sys/fs/cgroup")
    offered: frozenset[str] = frozenset()
    if v2:
        with open(os.path.join(v2[0].path(v2[0].root), "cgroup.controllers")) as f:
            offered = frozenset(f.read().split())
    return Layout(v2[0] if v2 else None, offered, tuple(v1.values()))


class CgroupFS:
    """Reads and writes of cgroup files, and making and removing groups."""

    def _read(self, path: str) -> str:
        """The file's text (cgroupfs files are small and read in one go)."""
        with open(path) as f:
            return f.read()

    def _write(self, path: str, data: str) -> None:
        """One write(2) of `data` (cgroupfs acts on each write). A write the kernel refuses
        raises its errno, naming the file and the value."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, data.encode())
            finally:
                os.close(fd)
        except OSError as e:
            raise OSError(e.errno, f"{e.strerror} (writing {data!r})", path) from None

    def _mkdir(self, path: str) -> None:
        os.mkdir(path, 0o755)

    def _rmdir(self, path: str) -> None:
        os.rmdir(path)

    def _remove_tree(self, path: str, deadline: float) -> list[str]:
        """rmdir `path` and the groups below it, deepest first, retrying busy ones (exiting
        processes still count) until `deadline`; the directories left."""
        try:  # most groups have none below them: no walk (a scandir of ~30 kernfs files)
            self._rmdir(path)
            return []
        except FileNotFoundError:
            return []
        except OSError:
            pass  # groups below, or busy: walk it
        left = []
        for top, _, _ in sorted(os.walk(path), key=lambda t: -t[0].count(os.sep)):
            while True:
                try:
                    self._rmdir(top)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                        left.append(top)
                        break
                    time.sleep(0.005)
        return left
