"""Making a container's namespaces, as its creator, in a short-lived helper process.

The helper is forked from the service, takes the creator's view (mount namespace and root) and
then the creator's credentials, unshares, opens /proc/self/ns/* and hands the fds back over a
socketpair before it exits: the namespaces live on as long as someone holds the fds. Because the
helper is the creator as far as the kernel can tell, the host's limits and bans on user
namespaces apply to the creator, never to the service.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from dataclasses import dataclass

from syscalls import _linux, fdpass

# Namespace types in the order /proc/PID/ns names them; "pid" is read as pid_for_children.
NS_TYPES = ("user", "mnt", "uts", "ipc", "net", "cgroup", "pid")


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


def _helper(new: list[str], creator: dict[str, int], creds: Credentials,
            cgroup_procs: str | None) -> list[int]:
    """In the forked helper: make the namespaces; return the fds to send (new..., root)."""
    # Copy the creator's view, not the service's: its mount namespace and its root.
    _linux.setns(creator["mnt"], _linux.CLONE_NEWNS)
    os.fchdir(creator["root"])
    os.chroot(".")
    if "cgroup" in new and cgroup_procs:
        # A cgroup namespace is rooted where its creator stands: stand in the container's group.
        _write(cgroup_procs, "0")
    flags = 0
    for nstype in new:
        flags |= _linux.NS_FLAGS[nstype]
    if creds.uid != 0 or "user" in new:
        os.setgroups([])
        os.setresgid(creds.gid, creds.gid, creds.gid)
        os.setresuid(creds.uid, creds.uid, creds.uid)
        # Dropping root makes us undumpable, and /proc/self/*_map root's; take them back.
        _linux.prctl(_linux.PR_SET_DUMPABLE, 1)
    _linux.unshare(flags)
    if "user" in new:
        if creds.uid != 0:
            _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"0 {creds.uid} 1\n")
        _write("/proc/self/gid_map", f"0 {creds.gid} 1\n")
    out = [os.open(f"/proc/self/ns/{t}", os.O_RDONLY | os.O_CLOEXEC) for t in new]
    out.append(os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
    return out


def make_namespaces(new: list[str], creator: dict[str, int], creds: Credentials,
                    cgroup_procs: str | None = None) -> dict[str, int]:
    """Create namespaces of the types in `new` as `creds` would; return {type: fd, "root": fd}.

    Blocking: call it from a worker thread, never the event loop. The errors are those of
    unshare(2) for that caller (EPERM, ENOSPC, EINVAL...).
    """
    if creds.uid == 0 and "user" not in new and "cgroup" not in new:
        return make_in_thread(new, creator)
    return _make_in_helper(new, creator, creds, cgroup_procs)


def make_in_thread(new: list[str], creator: dict[str, int] | None) -> dict[str, int]:
    """Root's namespaces, made by the calling thread itself and left behind: no fork.

    Mount, UTS, IPC and network namespaces belong to a thread, not a process, so a thread can
    unshare them, open their fds and setns() back; only a user namespace needs a whole process.
    With `creator`, the copy of the mount namespace is of the creator's, and "root" is returned.
    """
    restore = list(dict.fromkeys((["mnt"] if creator else []) + new))
    saved = {t: os.open(f"/proc/thread-self/ns/{t}", os.O_RDONLY | os.O_CLOEXEC) for t in restore}
    saved_root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    out: dict[str, int] = {}
    try:
        if creator:
            # A thread shares its root and cwd with the others until it unshares them; then
            # it can take the creator's mount namespace and root without moving the others.
            _linux.unshare(_linux.CLONE_FS)
            _linux.setns(creator["mnt"], _linux.CLONE_NEWNS)
            os.fchdir(creator["root"])
            os.chroot(".")
        flags = 0
        for nstype in new:
            flags |= _linux.NS_FLAGS[nstype]
        _linux.unshare(flags)
        for nstype in new:
            out[nstype] = os.open(f"/proc/thread-self/ns/{nstype}", os.O_RDONLY | os.O_CLOEXEC)
        if creator:
            out["root"] = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except BaseException:
        close_all(out)
        raise
    finally:
        try:
            for nstype, fd in saved.items():
                _linux.setns(fd, _linux.NS_FLAGS[nstype])
            if creator:
                os.fchdir(saved_root)
                os.chroot(".")
                os.chdir("/")
        except OSError:
            # A thread left in a container's namespaces would do its next job there.
            os._exit(70)
        finally:
            close_all(saved)
            os.close(saved_root)
    return out


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

    def fill_once(self) -> None:
        """Add one namespace of each kind that is short (blocking: run it in a thread)."""
        kinds = self.missing()
        if kinds:
            for nstype, fd in make_in_thread(kinds, None).items():
                self.free[nstype].append(fd)

    def close(self) -> None:
        for fds in self.free.values():
            for fd in fds:
                os.close(fd)
            fds.clear()


def _make_in_helper(new: list[str], creator: dict[str, int], creds: Credentials,
                    cgroup_procs: str | None) -> dict[str, int]:
    """Anything with a user namespace (or as non-root): in a forked helper with the creds."""
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with parent_sock, child_sock:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                parent_sock.close()
                fds = _helper(new, creator, creds, cgroup_procs)
                socket.send_fds(child_sock, [b"{}"], fds)
            except OSError as e:
                child_sock.send(json.dumps({"errno": e.errno or errno.EIO,
                                            "message": e.strerror or str(e)}).encode())
            except BaseException:
                code = 1
            os._exit(code)
        child_sock.close()
        try:
            data, fds, _flags = fdpass.recv_fds(parent_sock, 4096, len(new) + 1)
        finally:
            os.waitpid(pid, 0)
    reply = json.loads(data) if data else {"errno": errno.EIO, "message": "helper died"}
    if "errno" in reply:
        for fd in fds:
            os.close(fd)
        raise OSError(reply["errno"], f"making namespaces {'+'.join(new)}: {reply['message']}")
    return dict(zip([*new, "root"], fds))
