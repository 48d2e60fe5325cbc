"""The short-lived child and thread helpers (no service needed): fds come back, errors come
back with their errno and the step that failed, nothing is left behind."""

from __future__ import annotations

import errno
import os
import socket

import pytest

from syscalls import nsexec
from syscalls.nsexec import step


def test_child_hands_back_its_fds() -> None:
    def work(_parent: socket.socket) -> list[int]:
        r, w = os.pipe()
        os.write(w, b"from the child")
        os.close(w)
        return [r]

    (r,) = nsexec.in_child(work, 1)
    try:
        assert os.read(r, 64) == b"from the child"
    finally:
        os.close(r)


def test_child_error_names_its_step() -> None:
    def work(_parent: socket.socket) -> list[int]:
        with step("opening the missing file"):
            os.open("/nonexistent/file", os.O_RDONLY)
        return []

    with pytest.raises(OSError) as info:
        nsexec.in_child(work, 0)
    assert info.value.errno == errno.ENOENT
    assert info.value.strerror.startswith("opening the missing file: ")


def test_child_may_ask_the_parent() -> None:
    asked: list[int] = []

    def work(parent: socket.socket) -> list[int]:
        parent.send(b"ask")
        if parent.recv(16) != b"ok":
            raise OSError(errno.EPERM, "refused")
        return []

    assert nsexec.in_child(work, 0, asked.append) == []
    assert len(asked) == 1 and asked[0] > 0


def test_a_step_names_an_error_once() -> None:
    with pytest.raises(OSError) as info:
        with step("outer"):
            with step("inner"):
                raise OSError(errno.EACCES, "denied")
    assert info.value.strerror == "inner: denied"


def test_thread_elsewhere_comes_back() -> None:
    before = os.readlink("/proc/thread-self/ns/uts")
    with nsexec.elsewhere(["uts"]):
        from syscalls import linux
        linux.unshare(linux.CLONE_NEWUTS)  # needs root; the suite runs as root
        assert os.readlink("/proc/thread-self/ns/uts") != before
    assert os.readlink("/proc/thread-self/ns/uts") == before
