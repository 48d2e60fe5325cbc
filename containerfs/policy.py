"""Who may do what to a container: the access rules in one place (docs/security.md's table).

Every check raises OSError(EPERM) naming the container and the act, before any side effect.
Membership ("not from inside") is asked of the caller's pidfd, never of a pid number.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from .process import Peer
from .record import Container
from .states import State


class Policy:
    def __init__(self, member_of: Callable[[Peer], int | None],
                 parent_of: Callable[[int], int | None] = lambda cid: None) -> None:
        self.member_of = member_of  # the container a peer's process is in (ESRCH if gone)
        self.parent_of = parent_of  # a container's parent container (None: the host)

    def inside(self, peer: Peer, c: Container) -> bool:
        """Whether the peer is a member of `c` or of a container nested in it: a process of
        a nested container is inside its parent too, and may not manage it."""
        cid = self.member_of(peer)
        for _ in range(64):  # a bound against a loop in bad records
            if cid is None:
                return False
            if cid == c.id:
                return True
            cid = self.parent_of(cid)
        return False

    def owner(self, peer: Peer, c: Container, what: str) -> None:
        """Root or the container's owner."""
        if peer.uid != 0 and peer.uid != c.owner:
            raise OSError(errno.EPERM, f"container {c.id} belongs to uid {c.owner}; "
                                       f"uid {peer.uid} may not {what} it")

    def manager(self, peer: Peer, c: Container, what: str) -> None:
        """Owner or root, and not from inside the container itself."""
        self.owner(peer, c, what)
        if c.state != State.DEAD and self.inside(peer, c):
            raise OSError(errno.EPERM, f"a member of container {c.id} may not {what} it")

    def mounter(self, peer: Peer, c: Container, what: str) -> None:
        """Root, or the owner of the container's own user namespace; never a member."""
        self.manager(peer, c, what)
        if peer.uid != 0 and "user" not in c.new_ns:
            raise OSError(errno.EPERM, f"only root may {what} container {c.id}: it has no "
                                       "user namespace of its own")

    def enterer(self, peer: Peer, c: Container, what: str) -> None:
        """Whoever could enter the container's namespaces: root, the owner, or a member."""
        if peer.uid in (0, c.owner):
            return
        if c.state != State.DEAD and self.member_of(peer) == c.id:
            return
        self.owner(peer, c, what)  # raises EPERM
