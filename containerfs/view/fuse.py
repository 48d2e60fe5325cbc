"""The FUSE side of the view: a thin pyfuse3 adapter over `model.Model`, and the mount's life.

Every handler identifies the reader from the request (pid and credentials), asks the model and
turns its answer into pyfuse3's types. `fuse_errors` turns an OSError into the FUSE reply with
its errno; any other exception is a bug, logged, and answered EIO so the service lives on.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from ..service import Service
from .model import Model
from .nodes import Attr, Kind
from .readers import Reader

log = logging.getLogger("containerfs")

# allow_other: every user reads the view. No default_permissions: the model checks each
# request itself, against the reader's container and credentials.
MOUNT_OPTIONS = frozenset({"allow_other", "fsname=containerfs", "subtype=containerfs"})

T = TypeVar("T")
P = ParamSpec("P")


def fuse_errors(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Answer an OSError with its errno, and anything unexpected with EIO (and a log line)."""
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("view: %s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


def _entry(attr: Attr) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = attr.ino
    e.st_mode = attr.mode
    e.st_nlink = attr.nlink
    e.st_uid = attr.uid
    e.st_gid = attr.gid
    e.st_size = attr.size
    e.st_blksize = 4096
    e.st_blocks = (attr.size + 511) // 512
    e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = attr.mtime_ns
    e.entry_timeout = attr.entry_timeout
    e.attr_timeout = attr.attr_timeout
    return e


class ViewOperations(pyfuse3.Operations):
    """pyfuse3's request handlers, each a line or two over the model."""

    def __init__(self, model: Model) -> None:
        super().__init__()
        self.model = model

    def _reader(self, ctx: pyfuse3.RequestContext) -> Reader:
        return self.model.identify(ctx.pid, ctx.uid, ctx.gid)

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return _entry(self.model.lookup(parent_inode, name, self._reader(ctx)))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        pass  # inodes live as long as what they show; the kernel's counts do not matter

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return _entry(self.model.getattr(inode))

    @fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        # `echo 1 > kill` truncates first; nothing else may change.
        only_size = not (fields.update_mode or fields.update_uid or fields.update_gid
                         or fields.update_atime or fields.update_mtime)
        if not (only_size and fields.update_size and self.model.node(inode).kind is Kind.KILL):
            raise OSError(errno.EPERM, "the view's attributes cannot be changed")
        return _entry(self.model.getattr(inode))

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.model.readlink(inode, self._reader(ctx))

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return self.model.opendir(inode, self._reader(ctx))

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for i, (name, attr) in enumerate(self.model.readdir(fh, start_id), start_id + 1):
            if not pyfuse3.readdir_reply(token, name, _entry(attr), i):
                break

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        self.model.releasedir(fh)

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        opened = await self.model.open(inode, flags, self._reader(ctx))
        return pyfuse3.FileInfo(fh=opened.fh, direct_io=opened.direct_io,
                                keep_cache=opened.keep_cache)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.model.read(fh, off, size)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return self.model.write(fh, buf)

    async def flush(self, fh: int) -> None:
        # ENOSYS once tells the kernel never to send FLUSH again: close() needs no round trip.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @fuse_errors
    async def release(self, fh: int) -> None:
        self.model.release(fh)

    @fuse_errors
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        try:
            self.model.access(inode, mode, self._reader(ctx))
        except PermissionError:
            return False
        return True

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s

    async def _refuse(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EACCES)

    # Nothing can be made, removed or renamed in the view.
    mknod = mkdir = symlink = link = unlink = rmdir = rename = create = _refuse  # type: ignore[assignment]


async def _invalidate(ino: int) -> None:
    """Drop the kernel's pages and attributes of `ino`, from a worker thread: the call can
    wait for page locks held by reads that only this loop can answer."""
    try:
        await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino)
    except FileNotFoundError:
        pass  # the kernel has no such inode cached: nothing to drop
    except OSError as e:  # the connection is going away: nothing is cached any more
        log.warning("view: could not invalidate inode %d: %s", ino, e)


# ---- the mount --------------------------------------------------------------------------------

def _unescape(field: str) -> str:
    """A mountinfo path field: octal escapes (\\040 for a space) decoded."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounted_here(path: str) -> list[str]:
    """The filesystem types mounted at `path`, bottom first, from /proc/self/mountinfo."""
    path = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if _unescape(left.split(" ")[4]) == path:
                found.append(right.split(" ", 1)[0])
    return found


async def clear_stale_mount(path: str) -> None:
    """Make `path` a directory with no dead FUSE mount on it (one left by a killed service:
    "Transport endpoint is not connected"); refuse if a live view is mounted there."""
    for _ in range(16):
        try:
            os.stat(path)
        except FileNotFoundError:
            os.makedirs(path, mode=0o755, exist_ok=True)
            continue
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                raise
            log.info("view: clearing a stale mount at %s", path)
            await trio.run_process(["umount", "-l", path])
            continue
        if any(t == "fuse.containerfs" for t in mounted_here(path)):
            raise OSError(errno.EBUSY, f"a live containerfs view is mounted at {path}; stop "
                                       "its service or choose another --mount")
        return
    raise OSError(errno.EBUSY, f"{path} stayed unusable after clearing stale mounts")


async def serve_view(service: Service, mountpoint: str,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Mount the view at `mountpoint` and serve it until cancelled, then unmount it. A view
    that cannot be mounted is logged and left out: the service runs on without it."""
    model = Model(service, invalidate=_invalidate)
    try:
        await clear_stale_mount(mountpoint)
        pyfuse3.init(ViewOperations(model), mountpoint, set(MOUNT_OPTIONS))
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "mount" in str(e):
            pyfuse3.close(unmount=False)  # the session exists; only mounting failed
        log.error("view: cannot mount %s (%s); serving without the view", mountpoint, e)
        task_status.started()
        return
    service.on_change = model.changed
    log.info("view mounted at %s", mountpoint)
    task_status.started()
    try:
        await pyfuse3.main()
    except Exception:  # the view failing must not take the control socket down with it
        log.exception("view: serving %s failed; the service runs on without it", mountpoint)
    finally:
        service.on_change = None
        pyfuse3.close(unmount=True)
        log.info("view unmounted from %s", mountpoint)
