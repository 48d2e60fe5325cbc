"""Owners of file descriptors: an fd kept by this process is closed exactly once, by whoever
owns it, and lent out as a plain int only for the length of a call.

The public calls still take and return ints, as the kernel's do; these owners are for the fds
the service and the call layer keep (a container's namespaces, its handle's write end, a
peer's pidfd...).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping


class Fd:
    """One fd: `fileno()` while open, `close()` once (again is a no-op), `detach()` to hand it
    on. A context manager that closes it."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int = -1) -> None:
        self._fd = fd

    def fileno(self) -> int:
        """The fd, lent: valid until this owner closes it (ValueError once closed)."""
        if self._fd < 0:
            raise ValueError("operation on a closed fd")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def detach(self) -> int:
        """Hand the fd on: the caller owns it now, and this owner holds none."""
        fd, self._fd = self.fileno(), -1
        return fd

    def dup(self) -> int:
        """A new fd for the same file (close-on-exec), owned by the caller."""
        return os.dup(self.fileno())

    def __enter__(self) -> Fd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Fd({self._fd})" if self._fd >= 0 else "Fd(closed)"


class FdMap(Mapping[str, int]):
    """Named fds owned together (a container's namespaces, say). Reading gives lent ints;
    `put` takes an fd (closing the one it replaces), `pop` hands one on, `close_all` closes
    what is left."""

    def __init__(self, fds: Mapping[str, int] | None = None) -> None:
        self._fds: dict[str, int] = dict(fds or {})

    def __getitem__(self, name: str) -> int:
        return self._fds[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fds)

    def __len__(self) -> int:
        return len(self._fds)

    def put(self, name: str, fd: int) -> None:
        """Own `fd` under `name`; the fd held there before is closed."""
        old = self._fds.get(name)
        self._fds[name] = fd
        if old is not None and old != fd:
            os.close(old)

    def pop(self, name: str) -> int:
        """Hand the fd under `name` on (KeyError if none): the caller owns it now."""
        return self._fds.pop(name)

    def dup(self, name: str) -> int:
        """A new fd for the file under `name`, owned by the caller."""
        return os.dup(self._fds[name])

    def close(self, name: str) -> None:
        fd = self._fds.pop(name, None)
        if fd is not None:
            os.close(fd)

    def close_all(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __repr__(self) -> str:
        return f"FdMap({self._fds})"
