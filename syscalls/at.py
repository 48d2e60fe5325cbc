"""The *at() calls, accepting a container handle as their directory fd.

With an ordinary fd (or AT_FDCWD) each is the kernel's call, errno for errno. With a container
handle, a relative path is resolved from the container's root and never leaves it: openat2's
RESOLVE_IN_ROOT (`..` at the root stays there; symlinks resolve as if the root were `/`) with
RESOLVE_NO_MAGICLINKS. A call that acts on a final entry (unlink, rename, symlink, mkdir...)
gets the entry's parent resolved that way and acts on the name inside it, so a final symlink
is never followed out. An absolute path ignores the fd; an empty one gives EINVAL. Every call
runs in the caller's own process, with its own credentials: the service only lends an O_PATH
fd of the root, once per container (cached).
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import threading
from collections.abc import Iterator
from typing import Any
from contextlib import contextmanager

from . import linux, protocol
from .client import call

AT_FDCWD = linux.AT_FDCWD
AT_EMPTY_PATH = linux.AT_EMPTY_PATH
AT_SYMLINK_NOFOLLOW = 0x100
AT_REMOVEDIR = 0x200
AT_SYMLINK_FOLLOW = 0x400
AT_EACCESS = 0x200
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = linux.RESOLVE_NO_MAGICLINKS
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = linux.RESOLVE_IN_ROOT
_CONFINED = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS

# Handle (pipe dev, ino) -> O_PATH fd of the container's root. Pipe inode numbers are not
# reused while a handle is open, and a root never changes once set.
_roots: dict[tuple[int, int], int] = {}
# The handle fd numbers each root was asked for through: once none of them is that handle
# any more, the caller has closed it, and the root goes (it pins the container's filesystem;
# kept, a program that went through many containers kept an fd for each).
_asked_by: dict[tuple[int, int], set[int]] = {}
_lock = threading.Lock()
_PRUNE_ABOVE = 8  # roots kept before a new one makes us look for handles closed since


def _prune() -> None:
    """Close the roots whose handles the caller has closed (no fd asked through is that
    pipe any more). A root is never closed while one of its handles is open, so a call
    that got it through an open handle keeps a valid fd."""
    for key in list(_roots):
        alive = set()
        for fd in _asked_by.get(key, ()):
            try:
                st = os.fstat(fd)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == key:
                alive.add(fd)
        if alive:
            _asked_by[key] = alive
        else:
            _asked_by.pop(key, None)
            os.close(_roots.pop(key))


def container_root(fd: int) -> int | None:
    """The root of the container behind handle `fd`, or None if `fd` is no FIFO at all.

    EBADF for a closed fd; ENOTDIR for a FIFO that is not a handle (the kernel's answer for a
    non-directory); ENOENT for an empty-fs container with no root yet. The fd is lent: valid
    while `fd` stays open.
    """
    st = os.fstat(fd)
    if not stat.S_ISFIFO(st.st_mode):
        return None
    key = (st.st_dev, st.st_ino)
    with _lock:
        root = _roots.get(key)
        if root is not None:
            _asked_by.setdefault(key, set()).add(fd)
    if root is None:
        try:
            _reply, fds = call(protocol.Root(), [fd])
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise OSError(errno.ENOTDIR, f"fd {fd} is neither a directory nor a container "
                                             "handle") from None
            raise
        if not fds:
            raise OSError(errno.ENOENT, "the container has no root filesystem yet")
        with _lock:
            if len(_roots) >= _PRUNE_ABOVE:
                _prune()
            if key in _roots:  # fetched by another thread meanwhile
                os.close(fds[0])
            else:
                _roots[key] = fds[0]
            _asked_by.setdefault(key, set()).add(fd)
            root = _roots[key]
    return root


def _root_for(dirfd: int, path: str) -> int | None:
    """The container root to resolve `path` in, or None when the kernel's own call applies."""
    if dirfd == AT_FDCWD or path.startswith("/"):
        return None
    root = container_root(dirfd)
    if root is not None and not path:
        raise OSError(errno.EINVAL, "an empty path with a container handle")
    return root


def _dir(dirfd: int) -> int | None:
    return None if dirfd == AT_FDCWD else dirfd


@contextmanager
def _resolved(root: int, unsafe_path: str, flags: int = 0) -> Iterator[int]:
    """An O_PATH fd of `unsafe_path` inside `root` (its final symlink followed, inside)."""
    fd = linux.openat2(root, unsafe_path, os.O_PATH | os.O_CLOEXEC | flags, resolve=_CONFINED)
    try:
        yield fd
    finally:
        os.close(fd)


@contextmanager
def _parent(root: int, unsafe_path: str) -> Iterator[tuple[int, str]]:
    """(fd of the parent directory inside `root`, final name) for calls that act on an entry."""
    head, _, name = unsafe_path.rstrip("/").rpartition("/")
    if not name:
        name = "."
    with _resolved(root, head or ".", os.O_DIRECTORY) as parent:
        yield parent, name


def _proc(fd: int) -> str:
    """A path naming our own O_PATH fd, for calls that take no fd."""
    return f"/proc/self/fd/{fd}"


def _dots(name: str) -> bool:
    return name in (".", "..")


def resolve_in_container(dirfd: int, path: str, empty_path: int = 0) -> int | None:
    """An O_PATH fd of `path` in the container behind `dirfd`, or None if not a handle."""
    if empty_path and not path:
        if dirfd != AT_FDCWD and container_root(dirfd) is not None:
            raise OSError(errno.EINVAL, "an empty path with a container handle")
        return None
    root = _root_for(dirfd, path)
    if root is None:
        return None
    return linux.openat2(root, path, os.O_PATH | os.O_CLOEXEC, resolve=_CONFINED)


def openat(dirfd: int, path: str, flags: int, mode: int = 0o777) -> int:
    root = _root_for(dirfd, path)
    if root is None:
        return os.open(path, flags, mode, dir_fd=_dir(dirfd))
    # openat2 wants mode 0 unless a file may be made (O_TMPFILE includes O_DIRECTORY's bit).
    creates = flags & os.O_CREAT or flags & os.O_TMPFILE == os.O_TMPFILE
    return linux.openat2(root, path, flags, mode & 0o7777 if creates else 0, resolve=_CONFINED)


def openat2(dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = 0) -> int:
    root = _root_for(dirfd, path)
    if root is None:
        return linux.openat2(dirfd, path, flags, mode, resolve)
    return linux.openat2(root, path, flags, mode, resolve | _CONFINED)


def mkdirat(dirfd: int, path: str, mode: int = 0o777) -> None:
    root = _root_for(dirfd, path)
    if root is None:
        return os.mkdir(path, mode, dir_fd=_dir(dirfd))
    with _parent(root, path) as (parent, name):
        os.mkdir(name, mode, dir_fd=parent)


def mknodat(dirfd: int, path: str, mode: int = 0o600, device: int = 0) -> None:
    root = _root_for(dirfd, path)
    if root is None:
        return os.mknod(path, mode, device, dir_fd=_dir(dirfd))
    with _parent(root, path) as (parent, name):
        os.mknod(name, mode, device, dir_fd=parent)


def fstatat(dirfd: int, path: str, flags: int = 0) -> os.stat_result:
    nofollow = bool(flags & AT_SYMLINK_NOFOLLOW)
    root = _root_for(dirfd, path)
    if root is None:
        if flags & AT_EMPTY_PATH and not path:
            return os.stat(dirfd)
        return os.stat(path, dir_fd=_dir(dirfd), follow_symlinks=not nofollow)
    with _parent(root, path) as (parent, name):
        if nofollow and not _dots(name):
            return os.stat(name, dir_fd=parent, follow_symlinks=False)
    with _resolved(root, path) as fd:
        return os.stat(fd)


STATX_BASIC_STATS = 0x7FF
_STATX = struct.Struct("=IIQIIIHxxQQQ")  # mask, blksize, attributes, nlink, uid, gid, mode,
#                                          ino, size, blocks


def statx(dirfd: int, path: str, flags: int = 0, mask: int = STATX_BASIC_STATS) -> dict[str, int]:
    """statx(2): the basic fields as a dict (mask, nlink, uid, gid, mode, ino, size...)."""
    root = _root_for(dirfd, path)
    if root is None:
        raw = linux.statx(dirfd, path, flags, mask)
    elif flags & AT_SYMLINK_NOFOLLOW:
        with _parent(root, path) as (parent, name):
            if _dots(name):
                with _resolved(root, path) as fd:
                    raw = linux.statx(fd, "", flags | AT_EMPTY_PATH, mask)
            else:
                raw = linux.statx(parent, name, flags, mask)
    else:
        with _resolved(root, path) as fd:
            raw = linux.statx(fd, "", flags | AT_EMPTY_PATH, mask)
    names = ("mask", "blksize", "attributes", "nlink", "uid", "gid", "mode", "ino", "size",
             "blocks")
    return dict(zip(names, _STATX.unpack_from(raw)))


def unlinkat(dirfd: int, path: str, flags: int = 0) -> None:
    root = _root_for(dirfd, path)
    remove = os.rmdir if flags & AT_REMOVEDIR else os.unlink
    if root is None:
        return remove(path, dir_fd=_dir(dirfd))
    with _parent(root, path) as (parent, name):
        remove(name, dir_fd=parent)


def renameat2(olddirfd: int, oldpath: str, newdirfd: int, newpath: str, flags: int = 0) -> None:
    old_root, new_root = _root_for(olddirfd, oldpath), _root_for(newdirfd, newpath)
    if old_root is None and new_root is None:
        return linux.renameat2(olddirfd, oldpath, newdirfd, newpath, flags)
    with _maybe_parent(old_root, olddirfd, oldpath) as (odir, oname):
        with _maybe_parent(new_root, newdirfd, newpath) as (ndir, nname):
            linux.renameat2(odir, oname, ndir, nname, flags)


@contextmanager
def _maybe_parent(root: int | None, dirfd: int, path: str) -> Iterator[tuple[int, str]]:
    if root is None:
        yield dirfd, path
    else:
        with _parent(root, path) as found:
            yield found


def linkat(olddirfd: int, oldpath: str, newdirfd: int, newpath: str, flags: int = 0) -> None:
    follow = bool(flags & AT_SYMLINK_FOLLOW)
    old_root, new_root = _root_for(olddirfd, oldpath), _root_for(newdirfd, newpath)
    if old_root is None and new_root is None:
        return os.link(oldpath, newpath, src_dir_fd=_dir(olddirfd), dst_dir_fd=_dir(newdirfd),
                       follow_symlinks=follow)
    with _maybe_parent(new_root, newdirfd, newpath) as (ndir, nname):
        ndir_arg = _dir(ndir)
        if old_root is None:
            return os.link(oldpath, nname, src_dir_fd=_dir(olddirfd), dst_dir_fd=ndir_arg,
                           follow_symlinks=follow)
        if follow:
            with _resolved(old_root, oldpath) as fd:  # the magic link names our own fd
                return os.link(_proc(fd), nname, dst_dir_fd=ndir_arg, follow_symlinks=True)
        with _parent(old_root, oldpath) as (odir, oname):
            os.link(oname, nname, src_dir_fd=odir, dst_dir_fd=ndir_arg, follow_symlinks=False)


def symlinkat(target: str, newdirfd: int, linkpath: str) -> None:
    root = _root_for(newdirfd, linkpath)
    if root is None:
        return os.symlink(target, linkpath, dir_fd=_dir(newdirfd))
    with _parent(root, linkpath) as (parent, name):
        os.symlink(target, name, dir_fd=parent)


def readlinkat(dirfd: int, path: str) -> str:
    root = _root_for(dirfd, path)
    if root is None:
        return os.readlink(path, dir_fd=_dir(dirfd))
    with _parent(root, path) as (parent, name):
        if not _dots(name):
            return os.readlink(name, dir_fd=parent)
    raise OSError(errno.EINVAL, f"{path}: not a symbolic link")  # a directory, like the kernel


def fchmodat(dirfd: int, path: str, mode: int, flags: int = 0) -> None:
    if flags & AT_SYMLINK_NOFOLLOW:
        raise OSError(errno.EOPNOTSUPP, "fchmodat: AT_SYMLINK_NOFOLLOW is not supported")
    root = _root_for(dirfd, path)
    if root is None:
        return os.chmod(path, mode, dir_fd=_dir(dirfd))
    with _resolved(root, path) as fd:
        os.chmod(_proc(fd), mode)


def fchownat(dirfd: int, path: str, uid: int, gid: int, flags: int = 0) -> None:
    nofollow = bool(flags & AT_SYMLINK_NOFOLLOW)
    root = _root_for(dirfd, path)
    if root is None:
        return os.chown(path, uid, gid, dir_fd=_dir(dirfd), follow_symlinks=not nofollow)
    with _parent(root, path) as (parent, name):
        if nofollow and not _dots(name):
            return os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)
    with _resolved(root, path) as fd:
        os.chown(_proc(fd), uid, gid)


def faccessat(dirfd: int, path: str, mode: int, flags: int = 0) -> bool:
    """True if allowed, False otherwise, as os.access answers (a bad handle still raises)."""
    nofollow = bool(flags & AT_SYMLINK_NOFOLLOW)
    effective = bool(flags & AT_EACCESS)
    root = _root_for(dirfd, path)
    if root is None:
        return os.access(path, mode, dir_fd=_dir(dirfd), effective_ids=effective,
                         follow_symlinks=not nofollow)
    try:
        with _parent(root, path) as (parent, name):
            if nofollow and not _dots(name):
                return os.access(name, mode, dir_fd=parent, effective_ids=effective,
                                 follow_symlinks=False)
        with _resolved(root, path) as fd:
            return os.access(_proc(fd), mode, effective_ids=effective)
    except OSError:
        return False


def _utime(path: str, ns: tuple[int, int] | None, **kw: Any) -> None:
    if ns is None:
        os.utime(path, **kw)
    else:
        os.utime(path, ns=ns, **kw)


def utimensat(dirfd: int, path: str, ns: tuple[int, int] | None = None, flags: int = 0) -> None:
    """Set atime and mtime (ns since the epoch); None sets both to now."""
    nofollow = bool(flags & AT_SYMLINK_NOFOLLOW)
    root = _root_for(dirfd, path)
    if root is None:
        return _utime(path, ns, dir_fd=_dir(dirfd), follow_symlinks=not nofollow)
    with _parent(root, path) as (parent, name):
        if nofollow and not _dots(name):
            return _utime(name, ns, dir_fd=parent, follow_symlinks=False)
    with _resolved(root, path) as fd:
        _utime(_proc(fd), ns)
