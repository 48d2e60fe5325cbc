"""Making a container's namespaces, as its creator, in a short-lived helper process.

The helper is forked from the service, takes the creator's view (mount namespace and root) and
then the creator's credentials, unshares, opens /proc/self/ns/* and hands the fds back over a
socketpair before it exits: the namespaces live on as long as someone holds the fds. Because the
helper is the creator as far as the kernel can tell, the host's limits and bans on user
namespaces apply to the creator, never to the service.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from syscalls import linux, nsexec, nstypes
from syscalls.nsexec import step

# Namespace types in the order they are made; "pid" is read as pid_for_children.
NS_TYPES = nstypes.NAMES


@dataclass(frozen=True)
class Credentials:
    uid: int
    gid: int


def open_process_namespaces(pid: int) -> dict[str, int]:
    """Open fds of every namespace of `pid` and its root directory (key "root")."""
    fds: dict[str, int] = {}
    try:
        for nstype in NS_TYPES:
            name = "pid_for_children" if nstype == "pid" else nstype
            try:
                fds[nstype] = os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                if nstype != "pid":
                    raise
                # pid_for_children of a process that unshared its PID namespace but has no
                # child yet cannot be opened; its own PID namespace is the next best.
                fds[nstype] = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        fds["root"] = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except BaseException:
        close_all(fds)
        raise
    return fds


def close_all(fds: dict[str, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


def _write(path: str, data: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def _take_credentials(creds: Credentials) -> None:
    """Become the caller, in a helper process (never in the service itself)."""
    os.setgroups([])
    os.setresgid(creds.gid, creds.gid, creds.gid)
    os.setresuid(creds.uid, creds.uid, creds.uid)
    # Dropping root makes us undumpable, and /proc/self/*_map root's; take them back.
    linux.prctl(linux.PR_SET_DUMPABLE, 1)


def _helper(new: list[str], creator: Mapping[str, int], creds: Credentials,
            cgroup_procs: int | None, parent: socket.socket) -> list[int]:
    """In the forked helper: make the namespaces; return the fds to send (new..., root).

    `cgroup_procs` is an fd the service opened in its own mount namespace: once the helper
    stands in the creator's, a path could name whatever the creator mounted there."""
    if "cgroup" in new and cgroup_procs is not None:
        # A cgroup namespace is rooted where its creator stands: stand in the container's group.
        with step("joining the container's cgroup"):
            os.write(cgroup_procs, b"0")
    with step("entering the creator's mount namespace"):
        _enter_view(creator)  # copy the creator's view, not the service's
    flags = 0
    for nstype in new:
        flags |= linux.NS_FLAGS[nstype]
    if creds.uid != 0 or "user" in new:
        with step("taking the creator's credentials"):
            _take_credentials(creds)
    if "user" in new and not linux.same_file(creator["user"], "/proc/self/ns/user"):
        # A creator inside a container with a user namespace: the new one is made inside
        # that (a nested user namespace), joined first as the creator, so the kernel decides
        # (its owner, in the namespace above, has every capability in it; others EPERM).
        with step("entering the creator's user namespace"):
            linux.setns(creator["user"], linux.CLONE_NEWUSER)
    with step("unshare"):
        linux.unshare(flags)
    if "user" in new:
        # The maps are written from outside, by the service: mapping uid 0 (root's own)
        # needs CAP_SETFCAP in the parent namespace, which nothing inside has.
        parent.send(b"ask")
        if parent.recv(16) != b"ok":
            raise OSError(errno.EPERM, "the service could not write the id maps")
    out = [os.open(f"/proc/self/ns/{t}", os.O_RDONLY | os.O_CLOEXEC) for t in new]
    out.append(os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
    return out


def make_namespaces(new: list[str], creator: Mapping[str, int], creds: Credentials,
                    cgroup_procs: int | None = None) -> dict[str, int]:
    """Create namespaces of the types in `new` as `creds` would; return {type: fd, "root": fd}.

    Blocking: call it from a worker thread, never the event loop. The errors are those of
    unshare(2) for that caller (EPERM, ENOSPC, EINVAL...).
    """
    if creds.uid == 0 and "user" not in new and "cgroup" not in new:
        return make_in_thread(new, creator)
    return _make_in_helper(new, creator, creds, cgroup_procs)


def _enter_view(creator: Mapping[str, int]) -> None:
    """Stand in the creator's mount namespace, at its root."""
    linux.setns(creator["mnt"], linux.CLONE_NEWNS)
    os.fchdir(creator["root"])
    os.chroot(".")


def make_in_thread(new: list[str], creator: Mapping[str, int] | None) -> dict[str, int]:
    """Root's namespaces, made by the calling thread itself and left behind: no fork.

    Mount, UTS, IPC and network namespaces belong to a thread, not a process, so a thread can
    unshare them, open their fds and setns() back; only a user namespace needs a whole process.
    With `creator`, the copy of the mount namespace is of the creator's, and "root" is returned.
    """
    out: dict[str, int] = {}
    with nsexec.elsewhere(list(dict.fromkeys((["mnt"] if creator else []) + new))):
        try:
            if creator:
                _enter_view(creator)
            flags = 0
            for nstype in new:
                flags |= linux.NS_FLAGS[nstype]
            linux.unshare(flags)
            for nstype in new:
                out[nstype] = os.open(f"/proc/thread-self/ns/{nstype}", os.O_RDONLY | os.O_CLOEXEC)
            if creator:
                out["root"] = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except BaseException:
            close_all(out)
            raise
    return out


def pivot_into(mfd: int) -> dict[str, int]:
    """In a fresh mount namespace: make mount `mfd` the root and only mount; return its fds."""
    mnt = os.open("/proc/thread-self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)  # while /proc is here
    # Private first, so nothing done here propagates back to the namespace it was copied from.
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    linux.move_mount(mfd, "", linux.AT_FDCWD, "/", linux.MOVE_MOUNT_F_EMPTY_PATH)
    os.fchdir(mfd)
    linux.pivot_root(".", ".")  # the old root now sits on top of the new one...
    linux.umount2(".", linux.MNT_DETACH)  # ...and goes, with everything under it
    os.chdir("/")
    return {"mnt": mnt, "root": os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)}


def root_namespace(mfd: int, creator: Mapping[str, int], creds: Credentials,
                   userns: int | None) -> dict[str, int]:
    """A new mount namespace whose root, and only mount, is `mfd`: {"mnt", "root"} fds.

    Made as `creds` would: by root in a worker thread, or by a helper that takes the caller's
    credentials and enters the container's user namespace, so it owns the new namespace.
    Blocking: run it in a worker thread.
    """
    # Whose mount namespace is copied hardly matters: everything but `mfd` is detached.
    if userns is None:
        with nsexec.elsewhere(["mnt"]):
            linux.setns(creator["mnt"], linux.CLONE_NEWNS)
            linux.unshare(linux.CLONE_NEWNS)
            return pivot_into(mfd)

    def helper(_parent: socket.socket) -> list[int]:
        with step("entering the creator's mount namespace"):
            linux.setns(creator["mnt"], linux.CLONE_NEWNS)
        with step("taking the caller's credentials"):
            _take_credentials(creds)
        with step("entering the container's user namespace"):
            linux.setns(userns, linux.CLONE_NEWUSER)
        with step("unshare(CLONE_NEWNS)"):
            linux.unshare(linux.CLONE_NEWNS)
        with step("making the mount the root"):
            made = pivot_into(mfd)
        return [made["mnt"], made["root"]]

    return dict(zip(["mnt", "root"], nsexec.in_child(helper, 2)))


def mount_inside(mfd: int, mnt: int, root: int, unsafe_path: str, creds: Credentials,
                 userns: int | None) -> None:
    """Attach mount `mfd` at `unsafe_path`, resolved from `root` and never outside it."""

    if userns is None:
        with nsexec.elsewhere(["mnt"]):
            linux.setns(mnt, linux.CLONE_NEWNS)
            linux.attach_in_root(mfd, root, unsafe_path)
        return

    def helper(_parent: socket.socket) -> list[int]:
        with step("taking the caller's credentials"):
            _take_credentials(creds)
        with step("entering the container's user namespace"):
            linux.setns(userns, linux.CLONE_NEWUSER)
        with step("entering the container's mount namespace"):
            linux.setns(mnt, linux.CLONE_NEWNS)
        with step(f"attaching the mount at {unsafe_path!r}"):
            linux.attach_in_root(mfd, root, unsafe_path)
        return []

    nsexec.in_child(helper, 0)


class NamespacePool:
    """Fresh UTS, IPC and network namespaces made ahead of time, for root's containers.

    A new namespace of these kinds holds nothing of its maker (an empty hostname, no IPC
    objects, only a down `lo`), so one made a second ago is as good as one made now; making a
    network namespace is the costliest part of container_create, and this takes it off the path.
    """

    KINDS = ("uts", "ipc", "net")

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.free: dict[str, list[int]] = {t: [] for t in self.KINDS}

    def take(self, nstype: str) -> int | None:
        free = self.free.get(nstype)
        return free.pop() if free else None

    def missing(self) -> list[str]:
        return [t for t in self.KINDS if len(self.free[t]) < self.size]

    def add(self, made: Mapping[str, int]) -> None:
        """Take fresh namespaces (fds by type) into the pool."""
        for nstype, fd in made.items():
            self.free[nstype].append(fd)

    def fill_once(self) -> None:
        """Add one namespace of each kind that is short, made by this thread (blocking: run
        it in a thread; where the namespace maker cannot)."""
        kinds = self.missing()
        if kinds:
            self.add(make_in_thread(kinds, None))

    def close(self) -> None:
        for fds in self.free.values():
            for fd in fds:
                os.close(fd)
            fds.clear()


def ns_root(mnt: int) -> int:
    """The root of mount namespace `mnt` as setns(2) finds it (what a process that enters it
    stands in), as an O_PATH fd."""
    with nsexec.elsewhere(["mnt"]):
        linux.setns(mnt, linux.CLONE_NEWNS)
        return os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def is_ns_root(root: int, mnt: int) -> bool:
    """Whether `root` is ns_root(mnt): the same mount, device and inode."""
    here = ns_root(mnt)
    try:
        return linux.same_place(here, root)
    finally:
        os.close(here)


class MountCopies:
    """Copies of the service's own mount namespace made ahead of time, for root creators who
    stand in it (its namespace and its root): {"mnt", "root"} each, as make_in_thread gives.

    Unlike a UTS or network namespace, a copy can go stale: a mount made after it would be
    missing, where unshare at create time would have it. The service's /proc/self/mountinfo
    reports each change of its mount table once (POLLPRI); a copy made before the last change
    is never handed out."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self.free: list[tuple[int, dict[str, int]]] = []  # (generation, copy)
        self.generation = 0
        self._mountinfo = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        self._ours = {"mnt": os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC),
                      "root": os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)}
        # Whether our root is our mount namespace's (we are not chrooted): then a copy's
        # root is the one setns(2) into the copy finds, and nobody need check it per copy.
        self.root_derived = is_ns_root(self._ours["root"], self._ours["mnt"])

    def generation_now(self) -> int:
        """The generation of our mount table: one more for each change seen since."""
        poller = select.poll()
        poller.register(self._mountinfo, select.POLLPRI)
        if poller.poll(0):
            self.generation += 1
        return self.generation

    def take(self, creator: Mapping[str, int]) -> dict[str, int] | None:
        """A current copy for a creator standing where we stand (checked on the fds of its
        namespace and root, proven to be the peer's), or None (the caller copies)."""
        # The root compared by mount too: another mount of / (a read-only bind, say) has
        # its device and inode, and a copy's root would be ours, not a copy of that one.
        if not (linux.same_file(creator["mnt"], "/proc/self/ns/mnt")
                and linux.same_place(creator["root"], self._ours["root"])):
            return None
        now = self.generation_now()
        while self.free:
            made, copy = self.free.pop(0)
            if made == now:
                return copy
            close_all(copy)  # stale
        return None

    def missing(self) -> bool:
        return len(self.free) < self.size

    def add(self, generation: int, copy: dict[str, int]) -> None:
        """Take a copy made after generation() said `generation` (a change during the copy
        makes it stale)."""
        self.free.append((generation, copy))

    def fill_once(self) -> None:
        """Add one copy made by this thread (blocking: run it in a thread; where the
        namespace maker cannot)."""
        generation = self.generation_now()  # before the copy: a change during it: stale
        self.add(generation, make_in_thread(["mnt"], self._ours))

    def close(self) -> None:
        for _, copy in self.free:
            close_all(copy)
        self.free.clear()
        close_all(self._ours)
        if self._mountinfo >= 0:
            os.close(self._mountinfo)
            self._mountinfo = -1


def _make_in_helper(new: list[str], creator: Mapping[str, int], creds: Credentials,
                    cgroup_procs: int | None) -> dict[str, int]:
    """Anything with a user namespace (or as non-root): in a forked helper with the creds."""
    def write_maps(pid: int) -> None:
        if "user" in new and not linux.same_file(creator["user"], "/proc/self/ns/user"):
            _write_nested_maps(pid, creator["user"], creds)
            return
        if creds.uid != 0:
            _write(f"/proc/{pid}/setgroups", "deny")  # the kernel's rule for the unprivileged
        _write(f"/proc/{pid}/uid_map", f"0 {creds.uid} 1\n")
        _write(f"/proc/{pid}/gid_map", f"0 {creds.gid} 1\n")

    try:
        fds = nsexec.in_child(lambda sock: _helper(new, creator, creds, cgroup_procs, sock),
                              len(new) + 1, write_maps)
    except OSError as e:
        raise OSError(e.errno, f"making namespaces {'+'.join(new)}: {e.strerror}") from None
    return dict(zip([*new, "root"], fds))


def _write_nested_maps(pid: int, parent_userns: int, creds: Credentials) -> None:
    """The id maps of a user namespace made inside `parent_userns`: only a process of that
    namespace (or of the new one) may write them, so a writer forked from the service joins
    it (with every capability there) and maps the creator's ids, as that namespace sees them
    (/proc/PID/status shows the reader's view), to 0."""
    def writer(_sock: socket.socket) -> list[int]:
        with step("entering the parent user namespace"):
            linux.setns(parent_userns, linux.CLONE_NEWUSER)
        ids: dict[str, str] = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("Uid:", "Gid:")):
                    ids[line[:3]] = line.split()[2]  # the effective id
        with step("writing the id maps"):
            if creds.uid != 0:
                _write(f"/proc/{pid}/setgroups", "deny")
            _write(f"/proc/{pid}/uid_map", f"0 {ids['Uid']} 1\n")
            _write(f"/proc/{pid}/gid_map", f"0 {ids['Gid']} 1\n")
        return []

    nsexec.in_child(writer, 0)
