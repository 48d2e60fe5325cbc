"""The fd owners (no service needed): closed once, lent as ints, handed on with detach/pop."""

from __future__ import annotations

import os

import pytest

from syscalls.fd import Fd, FdMap


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_fd_closes_once_and_refuses_use_after() -> None:
    r, w = os.pipe()
    os.close(w)
    owner = Fd(r)
    assert owner.fileno() == r and not owner.closed
    owner.close()
    owner.close()  # a second close is a no-op, never a close of whatever reused the number
    assert owner.closed and not _is_open(r)
    with pytest.raises(ValueError):
        owner.fileno()


def test_fd_detach_hands_it_on() -> None:
    r, w = os.pipe()
    os.close(w)
    with Fd(r) as owner:
        fd = owner.detach()
    assert fd == r and _is_open(r)  # leaving the block closed nothing
    os.close(r)


def test_fdmap_put_pop_close_all() -> None:
    a, b, c = os.pipe(), os.pipe(), os.pipe()
    fds = FdMap({"a": a[0]})
    fds.put("a", b[0])  # replaces: the old one is closed
    assert fds["a"] == b[0] and not _is_open(a[0])
    fds.put("c", c[0])
    copy = fds.dup("c")
    taken = fds.pop("c")
    assert taken == c[0] and "c" not in fds and _is_open(taken)
    fds.close_all()
    assert len(fds) == 0 and not _is_open(b[0])
    for fd in (a[1], b[1], c[1], taken, copy):
        os.close(fd)
