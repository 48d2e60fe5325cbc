"""One container's namespaces as the service sees them: a read-only Mapping by type that
lends fds from the store that holds them (containerfs/nsstore.py), with no fd of its own."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Protocol


class Store(Protocol):
    """What a ContainerNs asks of the store that holds its namespaces (nsstore.NsStore)."""

    def lend(self, ns: ContainerNs, name: str) -> int: ...

    def put(self, ns: ContainerNs, fds: dict[str, int]) -> None: ...

    def release(self, ns: ContainerNs) -> None: ...


class ContainerNs(Mapping[str, int]):
    """One container's namespaces by type, and "root": a read-only Mapping that lends fds
    (valid until the caller's next await), `dup` for an fd of one's own, `put` to replace
    one, `close_all` to let all go. Holds no fd itself."""

    __slots__ = ("_store", "cid", "ids", "root")

    def __init__(self, store: Store | None, cid: int, ids: dict[str, int] | None = None,
                 root: str | None = None) -> None:
        self._store = store
        self.cid = cid
        self.ids: dict[str, int] = ids if ids is not None else {}  # type -> namespace inode
        self.root = root  # None (no root yet), nsstore.DERIVED or nsstore.HELD

    def __getitem__(self, name: str) -> int:
        if name not in self or self._store is None:
            raise KeyError(name)
        return self._store.lend(self, name)

    def __contains__(self, name: object) -> bool:
        return name in self.ids or (name == "root" and self.root is not None)

    def __iter__(self) -> Iterator[str]:
        yield from self.ids
        if self.root is not None:
            yield "root"

    def __len__(self) -> int:
        return len(self.ids) + (self.root is not None)

    def ino(self, name: str) -> int:
        """The namespace's inode number (what /proc/PID/ns shows), with no fd opened."""
        return self.ids[name]

    def dup(self, name: str) -> int:
        """A new fd for `name`, owned by the caller."""
        return os.dup(self[name])

    def put(self, name: str, fd: int) -> None:
        """Hold `fd` (taken) as `name`, in place of what was held there."""
        assert self._store is not None
        self._store.put(self, {name: fd})

    def close_all(self) -> None:
        """Let every namespace and the root go (what no other container uses is unmounted)."""
        if self._store is not None:
            self._store.release(self)

    def __repr__(self) -> str:
        return f"ContainerNs({self.cid}, {self.ids}, root={self.root})"
