"""What the keyring service needs of the container service, handed to it as plain callables,
and what it needs of a client connection: so that this package imports neither the service
nor the control socket (no cycle), and can be driven by tests with fakes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from ..process import Peer
from ..record import Container


class Client(Protocol):
    """The connection a keyring request came on."""
    peer: Peer
    sock: trio.socket.SocketType
    fork_container: Container | None  # the container this connection forked into, if any
    listener_taken: bool  # its forked process's seccomp listener was handed over


@dataclass(frozen=True)
class Hooks:
    runtime_dir: str  # where the registry and the request-key.d rules live
    nursery: trio.Nursery  # for tasks that outlive a request
    keep: Callable[[str, dict[str, int]], None]  # the keeper holds these fds under a key
    let_go: Callable[[str], None]  # ...and no longer
    lookup: Callable[[int], Container]  # the container behind a handle (EINVAL if none)
    live: Callable[[int], Container | None]  # a listed container by id
    check_manager: Callable[[Peer, Container, str], None]  # EPERM unless it may manage
    member_of: Callable[[Peer], int | None]  # the container a peer is in (ESRCH if gone)
    container_id_of: Callable[[int], int | None]  # the container a pid is in
