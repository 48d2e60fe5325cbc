"""Argument checks shared by the calls and the service, so both reject the same input alike."""

from __future__ import annotations

import errno

from .constants import (
    CONTAINER_ALL_FLAGS,
    CONTAINER_NAME_MAX,
    CONTAINER_NEW_EMPTY_FS_NS,
    CONTAINER_NEW_FS_NS,
    CONTAINER_NEW_USER_NS,
    CONTAINER_NS_FLAGS,
)


def container_name(name: object) -> bytes:
    """Return `name` as bytes, or raise OSError(EINVAL/ENAMETOOLONG) as container_create must."""
    if isinstance(name, str):
        try:
            raw = name.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise OSError(errno.EINVAL, "container name is not encodable as UTF-8") from None
    elif isinstance(name, bytes):
        raw = name
    else:
        raise OSError(errno.EINVAL, f"container name must be str or bytes, not {type(name).__name__}")
    if b"/" in raw or b"\0" in raw:
        raise OSError(errno.EINVAL, f"container name {raw!r} contains '/' or NUL")
    if len(raw) >= CONTAINER_NAME_MAX:
        raise OSError(errno.ENAMETOOLONG,
                    f"container name {raw!r} is {len(raw)} bytes; the limit is "
                    f"{CONTAINER_NAME_MAX - 1}")
    return raw


def create_flags(flags: object, uid: int) -> int:
    """Return `flags` if a caller with `uid` may create a container with them, else raise."""
    if not isinstance(flags, int) or isinstance(flags, bool) or flags < 0:
        raise OSError(errno.EINVAL, f"container flags must be a non-negative int, not {flags!r}")
    if flags & ~CONTAINER_ALL_FLAGS:
        raise OSError(errno.EINVAL, f"unknown container flag bits {flags & ~CONTAINER_ALL_FLAGS:#x}")
    if flags & CONTAINER_NEW_FS_NS and flags & CONTAINER_NEW_EMPTY_FS_NS:
        raise OSError(errno.EINVAL, "CONTAINER_NEW_FS_NS and CONTAINER_NEW_EMPTY_FS_NS exclude "
                                  "each other")
    # The kernel's rule for unshare(2): without CAP_SYS_ADMIN, any namespace needs a user one.
    if uid != 0 and flags & CONTAINER_NS_FLAGS and not flags & CONTAINER_NEW_USER_NS:
        raise OSError(errno.EPERM, "a caller without root must ask for CONTAINER_NEW_USER_NS "
                                 "to get other namespaces")
    return flags
