"""What the container's init (or an exec'd process) does inside, in runc's order.

`setup_init` runs as fork_into_container's `before_confinement` hook: the process stands in
the container (its namespaces, its root as `/`, its cgroup) with the runtime's privileges,
and does what needs them: mounts in config order, devices, sysctls, masked and read-only
paths, the hostname, a read-only root, the terminal, rlimits, and last the change of user
(capabilities kept across it, as runc's finalizeNamespace does). The container's own
confinement (capabilities, seccomp, no_new_privs: set through the service) applies when it
returns. `final.finish` then runs under that confinement: the process's capability sets, umask, cwd,
controlling terminal, the program looked up, "ready" told to the runtime, and for init the
wait for `start` before execve.

Every path inside is resolved from the root with openat2(RESOLVE_IN_ROOT), and mounts are
attached to the resolved fd (move_mount with T_EMPTY_PATH), never to a path string: a symlink
planted in the rootfs or a shared volume cannot make a mount land outside the container
(the runc CVE-2021-30465 class). Everything this module calls is imported up front: once in
the container's root no module can be loaded.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import resource
import socket
import stat
import struct
from collections.abc import Iterator
from typing import Any

from syscalls import caps as capset
from syscalls import linux

from .config import Bundle, Process
from .mountopts import MOUNT_ATTR_RDONLY, MountSpec

O_PATH = os.O_PATH | os.O_CLOEXEC
_IN_ROOT = linux.RESOLVE_IN_ROOT | linux.RESOLVE_NO_MAGICLINKS
TIOCSPTLCK = 0x40045431
TIOCGPTN = 0x80045430
TIOCGPTPEER = 0x5441
TIOCSCTTY = 0x540E
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
# runc's default devices (major, minor), made in a /dev that is a fresh tmpfs.
DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8),
           "urandom": (1, 9), "tty": (5, 0)}
DEV_LINKS = {"ptmx": "pts/ptmx", "fd": "/proc/self/fd", "stdin": "/proc/self/fd/0",
             "stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2"}


class Channel:
    """The child's end of the runtime's socketpair: JSON messages, fds beside them."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, msg: dict[str, Any], fds: list[int] | None = None) -> None:
        data = json.dumps(msg).encode()
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.send(data)

    def fail(self, message: str) -> None:
        """Tell the runtime why, and end this process (it must never run the program)."""
        try:
            self.send({"error": message})
        finally:
            os._exit(1)


class Inside:
    """The process's view of its own root: resolving, making mount points, mounting."""

    def __init__(self, host_proc: int = -1) -> None:
        self.root = os.open("/", O_PATH | os.O_DIRECTORY)
        self.host_proc = host_proc  # the runtime's /proc (-1: none), not the image's

    def open(self, unsafe_path: str, flags: int = O_PATH) -> int:
        rel = unsafe_path.lstrip("/") or "."
        return linux.openat2(self.root, rel, flags | os.O_CLOEXEC,
                             0o644 if flags & os.O_CREAT else 0, _IN_ROOT)

    def mkdir_p(self, unsafe_path: str, mode: int = 0o755) -> None:
        """Make the missing directories of `unsafe_path`, its symlinks followed inside the
        root (as runc's securejoin does): a link to "/host/dir" makes <root>/host/dir. What
        is mounted later is attached to an fd resolved in the root, so a link swapped in
        meanwhile cannot move it out."""
        todo = [p for p in unsafe_path.split("/") if p]
        done: list[str] = []
        hops = 0
        while todo:
            part = todo.pop(0)
            if part == ".":
                continue
            if part == "..":
                if done:
                    done.pop()
                continue
            parent = self.open("/" + "/".join(done), O_PATH | os.O_DIRECTORY)
            try:
                try:
                    st = os.stat(part, dir_fd=parent, follow_symlinks=False)
                except FileNotFoundError:
                    try:
                        os.mkdir(part, mode, dir_fd=parent)
                    except FileExistsError:
                        pass
                    done.append(part)
                    continue
                if stat.S_ISLNK(st.st_mode):
                    hops += 1
                    if hops > 40:
                        raise OSError(errno.ELOOP, f"too many symlinks in {unsafe_path}")
                    target = os.readlink(part, dir_fd=parent)
                    if target.startswith("/"):
                        done = []
                    todo = [p for p in target.split("/") if p] + todo
                    continue
                done.append(part)
            finally:
                os.close(parent)

    def mount_point(self, unsafe_path: str, is_dir: bool) -> int:
        """An O_PATH fd of the mount point, made if missing (a directory, or an empty file
        for a file's bind), as runc makes them in the rootfs."""
        try:
            return self.open(unsafe_path)
        except FileNotFoundError:
            pass
        if is_dir:
            self.mkdir_p(unsafe_path)
        else:
            head, _, name = unsafe_path.rstrip("/").rpartition("/")
            self.mkdir_p(head)
            parent = self.open(head or "/", O_PATH | os.O_DIRECTORY)
            try:
                os.close(os.open(name, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW,
                                 0o644, dir_fd=parent))
            finally:
                os.close(parent)
        return self.open(unsafe_path)

    def attach(self, mnt: int, target: int) -> None:
        linux.move_mount(mnt, "", target, "",
                         linux.MOVE_MOUNT_F_EMPTY_PATH | linux.MOVE_MOUNT_T_EMPTY_PATH)

    def write(self, unsafe_path: str, value: str) -> None:
        fd = self.open(unsafe_path, os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)


def _new_fs(fstype: str, params: list[tuple[str, str | None]], attrs: int) -> int:
    fs = linux.fsopen(fstype, linux.FSOPEN_CLOEXEC)
    try:
        for key, value in params:
            try:
                if value is None:
                    linux.fsconfig(fs, FSCONFIG_SET_FLAG, key, None, 0)
                else:
                    linux.fsconfig(fs, FSCONFIG_SET_STRING, key, value, 0)
            except OSError as e:
                e.strerror = f"option {key}{'' if value is None else '=' + value}: {e.strerror}"
                raise
        linux.fsconfig(fs, linux.FSCONFIG_CMD_CREATE, None, None, 0)
        return linux.fsmount(fs, linux.FSMOUNT_CLOEXEC, attrs)
    finally:
        os.close(fs)


def _own_cgroup(attrs: int, host_proc: int) -> int:
    """The container's own cgroup2 directory (never the host's whole tree: without a cgroup
    namespace a fresh cgroup2 shows every group's name), or an empty read-only tmpfs where
    that cannot be had. Limits live in the v1 hierarchies on a hybrid host anyway. Our cgroup
    is read from the runtime's /proc (`host_proc`): the path /proc/self/cgroup is the image's
    file until a procfs is mounted there, and it could say "0::/"."""
    try:
        if host_proc < 0:
            raise OSError(errno.ENOENT, "no /proc of the runtime's")
        with open(os.open("self/cgroup", os.O_RDONLY | os.O_CLOEXEC, dir_fd=host_proc)) as f:
            own = next(line.split(":", 2)[2].strip() for line in f if line.startswith("0::"))
        whole = _new_fs("cgroup2", [], attrs)
        try:
            return linux.open_tree(whole, own.lstrip("/") or ".", 0x1 | os.O_CLOEXEC
                                   | linux.AT_RECURSIVE)
        finally:
            os.close(whole)
    except (OSError, StopIteration):
        return _new_fs("tmpfs", [], attrs | MOUNT_ATTR_RDONLY)


def mount_one(ins: Inside, m: MountSpec, tree: int) -> None:
    """One config mount at its destination: `tree` is the bind's detached mount (made
    outside, where its source is), -1 for a filesystem made here, in our namespaces."""
    if m.type == "bind":
        is_dir = stat.S_ISDIR(os.fstat(tree).st_mode)
        mnt = tree
    else:
        is_dir = True
        mnt = _own_cgroup(m.attrs, ins.host_proc) if m.type in ("cgroup", "cgroup2") else \
            _new_fs(m.type, m.params, m.attrs)
    try:
        target = ins.mount_point(m.destination, is_dir)
        if m.type in ("proc", "sysfs"):
            # As runc: never through a symlink, whose target the image (or a shared volume)
            # chooses; masks and read-only paths under /proc must land on this procfs.
            os.close(target)
            try:
                target = linux.openat2(ins.root, m.destination.lstrip("/") or ".",
                                       O_PATH | os.O_DIRECTORY, 0,
                                       _IN_ROOT | linux.RESOLVE_NO_SYMLINKS)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                raise OSError(e.errno, f"filesystem {m.type!r} must be mounted on an ordinary "
                                       f"directory, not through a symlink") from None
        try:
            ins.attach(mnt, target)
        finally:
            os.close(target)
    finally:
        if mnt != tree:
            os.close(mnt)


def make_devices(ins: Inside, b: Bundle) -> None:
    """runc's default devices and links in a /dev that is a fresh tmpfs, and linux.devices."""
    dev_tmpfs = any(m.destination.rstrip("/") == "/dev" and m.type == "tmpfs" for m in b.mounts)
    old = os.umask(0)
    try:
        if dev_tmpfs:
            dev = ins.open("/dev", O_PATH | os.O_DIRECTORY)
            try:
                for name, (major, minor) in DEVICES.items():
                    try:
                        os.mknod(name, stat.S_IFCHR | 0o666, os.makedev(major, minor),
                                 dir_fd=dev)
                    except FileExistsError:
                        pass
                for name, target in DEV_LINKS.items():
                    try:
                        os.symlink(target, name, dir_fd=dev)
                    except FileExistsError:
                        pass
            finally:
                os.close(dev)
        for d in b.devices:
            kind = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK,
                    "p": stat.S_IFIFO}[d["type"]]
            head, _, name = d["path"].rstrip("/").rpartition("/")
            ins.mkdir_p(head)
            parent = ins.open(head or "/", O_PATH | os.O_DIRECTORY)
            try:
                try:
                    os.unlink(name, dir_fd=parent)
                except FileNotFoundError:
                    pass
                os.mknod(name, kind | (int(d.get("fileMode") or 0o666) & 0o7777),
                         os.makedev(int(d.get("major", 0)), int(d.get("minor", 0))),
                         dir_fd=parent)
                os.chown(name, int(d.get("uid", 0)), int(d.get("gid", 0)), dir_fd=parent,
                         follow_symlinks=False)
            finally:
                os.close(parent)
    finally:
        os.umask(old)


def _existing(ins: Inside, paths: list[str]) -> Iterator[int]:
    """An fd of each of `paths` inside that exists (closed once the loop moves on)."""
    for p in paths:
        try:
            target = ins.open(p)
        except (FileNotFoundError, NotADirectoryError):
            continue
        try:
            yield target
        finally:
            os.close(target)


def mask_paths(ins: Inside, masked: list[str]) -> None:
    """A read-only empty tmpfs on each masked directory, /dev/null bound on each file."""
    for target in _existing(ins, masked):
        if stat.S_ISDIR(os.fstat(target).st_mode):
            mnt = _new_fs("tmpfs", [], MOUNT_ATTR_RDONLY)
        else:
            null = ins.open("/dev/null")
            try:
                mnt = linux.open_tree(null, "", 0x1 | os.O_CLOEXEC | linux.AT_EMPTY_PATH)
            finally:
                os.close(null)
        try:
            ins.attach(mnt, target)
        finally:
            os.close(mnt)


def readonly_paths(ins: Inside, paths: list[str]) -> None:
    """Each path bound read-only onto itself (its submounts too)."""
    for target in _existing(ins, paths):
        tree = linux.open_tree(target, "", 0x1 | os.O_CLOEXEC | linux.AT_EMPTY_PATH
                               | linux.AT_RECURSIVE)
        try:
            linux.mount_setattr(tree, "", linux.AT_EMPTY_PATH | linux.AT_RECURSIVE,
                                MOUNT_ATTR_RDONLY)
            ins.attach(tree, target)
        finally:
            os.close(tree)


def open_terminal(ins: Inside, chan: Channel) -> int:
    """A pty of the container's devpts: its master goes to the runtime (for the console
    socket), the slave (returned) becomes the process's terminal."""
    try:
        master = ins.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY)
    except OSError as e:
        raise OSError(e.errno, f"process.terminal: opening /dev/ptmx in the container (mount "
                               f"a devpts at /dev/pts): {e.strerror}") from None
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        number = struct.unpack("I", fcntl.ioctl(master, TIOCGPTN, b"\0" * 4))[0]
        slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        chan.send({"pty": f"/dev/pts/{number}"}, [master])
    finally:
        os.close(master)
    return int(slave)


def set_user(p: Process) -> None:
    """Groups, gid and uid, keeping the permitted capabilities (the container's mask then
    limits them; `finish` sets the process's own sets)."""
    os.setgroups(p.groups)
    os.setresgid(p.gid, p.gid, p.gid)
    if p.uid != os.getuid():
        linux.prctl(PR_SET_KEEPCAPS, 1)
        os.setresuid(p.uid, p.uid, p.uid)
        linux.prctl(PR_SET_KEEPCAPS, 0)
        _eff, perm, inh = capset.get_caps()
        capset.set_sets(perm, perm, inh)  # effective back, for the confinement's steps


def setup_init(b: Bundle, trees: list[int], chan: Channel, state: dict[str, Any]) -> None:
    """The hook of the container's init (see the module's docstring); `trees` holds each
    mount's detached bind (-1 for the others). On failure, the runtime is told and we exit."""
    step = "setting up"
    try:
        ins = Inside(state.pop("host_proc", -1))
        for m, tree in zip(b.mounts, trees):
            step = f"{m.where} ({m.type} at {m.destination})"
            mount_one(ins, m, tree)
        if ins.host_proc >= 0:  # never into the program (a host /proc is a way out)
            os.close(ins.host_proc)
            ins.host_proc = -1
        step = "devices"
        make_devices(ins, b)
        for key, value in b.sysctl.items():
            step = f"linux.sysctl.{key}"
            ins.write("/proc/sys/" + key.replace(".", "/"), value)
        if b.hostname is not None:
            step = "hostname"
            socket.sethostname(b.hostname)
        if b.domainname is not None:
            step = "domainname"
            ins.write("/proc/sys/kernel/domainname", b.domainname)
        step = "linux.maskedPaths"
        mask_paths(ins, b.masked)
        step = "linux.readonlyPaths"
        readonly_paths(ins, b.readonly_paths)
        step = "process.cwd"
        ins.mkdir_p(b.process.cwd)
        if b.readonly:
            step = "root.readonly"
            linux.mount_setattr(ins.root, "", linux.AT_EMPTY_PATH, MOUNT_ATTR_RDONLY)
        setup_process(b.process, chan, state, ins)
    except OSError as e:
        chan.fail(f"{step}: {e.strerror or e}")
    except Exception as e:  # never run the program half set up
        chan.fail(f"{step}: {e!r}")


def setup_process(p: Process, chan: Channel, state: dict[str, Any],
                  ins: Inside | None = None) -> None:
    """The part init and exec'd processes share, before confinement: terminal, rlimits,
    oom score, user."""
    ins = ins or Inside()
    if p.terminal:
        state["tty"] = open_terminal(ins, chan)
    for num, soft, hard in p.rlimits:
        try:
            resource.setrlimit(num, (soft, hard))
        except (OSError, ValueError) as e:
            raise OSError(getattr(e, "errno", None) or errno.EPERM,
                          f"process.rlimits: setting resource {num} to {soft}:{hard}: "
                          f"{getattr(e, 'strerror', None) or e}") from None
    if p.oom_score_adj is not None:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(p.oom_score_adj))
    set_user(p)
    os.close(ins.root)


def setup_exec(p: Process, chan: Channel, state: dict[str, Any]) -> None:
    """The hook of an exec'd process."""
    try:
        setup_process(p, chan, state)
    except OSError as e:
        chan.fail(f"exec: {e.strerror or e}")
    except Exception as e:
        chan.fail(f"exec: {e!r}")
