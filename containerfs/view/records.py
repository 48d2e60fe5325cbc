"""What the view needs of the service: the shape of a container record and of the service,
as protocols, so that the view depends on no module of the service."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from ..states import State


class ContainerLike(Protocol):
    id: int
    name: bytes
    flags: int
    owner: int
    group: int
    parent: int
    state: State
    handle_open: bool
    init_pid: int | None
    exit_status: int | None
    new_ns: frozenset[str]
    caps: int | None
    seccomp: str | None

    @property
    def ns(self) -> Mapping[str, int]: ...  # read only: the view never changes it


class CgroupsLike(Protocol):
    def procs(self, cid: int) -> list[int]: ...
    def container_id_of(self, pid: int) -> int | None: ...
    def limits(self, cid: int) -> dict[str, str]: ...  # the limits set (v2 names, syntax)
    def stats(self, cid: int) -> dict[str, int]: ...
    def frozen(self, cid: int) -> bool: ...


class ServiceLike(Protocol):
    @property
    def containers(self) -> Mapping[int, ContainerLike]: ...
    @property
    def cgroups(self) -> CgroupsLike: ...
    def kill(self, c: Any) -> None: ...  # one of `containers`
