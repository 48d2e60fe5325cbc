"""Process ids in context and nested containers (contract section 12), on the real kernel."""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import syscalls
from syscalls import (
    CONTAINER_KILL_ON_CLOSE,
    CONTAINER_NEW_PID_NS,
    container_create,
    container_pids,
    fork_into_container,
    linux,
    pids,
    translate_pid,
)

from .conftest import ROOT, child_result, hung_up
from .test_cli import cli


def nspid(pid: int) -> list[int]:
    """The NSpid line of `pid` (from the caller's PID namespace down to its own)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no NSpid for {pid}")


class Levels:
    """A container with a PID namespace whose init made a PID namespace of its own with one
    process in it: three levels (the host, the container, the grandchild's namespace)."""

    def __init__(self, flags: int = CONTAINER_NEW_PID_NS) -> None:
        self.cfd = container_create("levels", flags | CONTAINER_KILL_ON_CLOSE)
        r, self.stop = os.pipe()
        rep_r, rep_w = os.pipe()
        self.init = fork_into_container(self.cfd)
        if self.init == 0:
            try:
                os.close(self.stop)
                os.close(rep_r)
                member = os.fork()
                if member == 0:
                    os.close(rep_w)
                    os.read(r, 1)
                    os._exit(0)
                linux.unshare(linux.CLONE_NEWPID)
                gc = os.fork()
                if gc == 0:
                    os.close(rep_w)
                    os.read(r, 1)
                    os._exit(0)
                os.write(rep_w, json.dumps([os.getpid(), member, gc]).encode())
                os.close(rep_w)
                os.read(r, 1)
            finally:
                os._exit(0)
        os.close(r)
        os.close(rep_w)
        with os.fdopen(rep_r) as f:
            self.inside = json.loads(f.read())  # init, member, grandchild as init sees them
        self.gc_host = next(p for p in self.children_of(self.init)
                            if len(nspid(p)) == 3)
        self.member_host = next(p for p in self.children_of(self.init) if p != self.gc_host)

    @staticmethod
    def children_of(pid: int) -> list[int]:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]

    def close(self) -> None:
        os.close(self.stop)
        os.close(self.cfd)
        child_result(self.init)


@pytest.fixture
def levels(service: Any) -> Iterator[Levels]:
    lv = Levels()
    try:
        yield lv
    finally:
        lv.close()


@pytest.fixture(params=["ioctl", "nspid"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of translating: the 6.11 ioctls and the NSpid fallback of older kernels."""
    monkeypatch.setattr(pids, "use_ioctls", request.param == "ioctl")
    return str(request.param)


def open_ns(pid: int) -> int:
    return os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)


def test_translate_three_levels_agrees_with_nspid(levels: Levels, way: str) -> None:
    assert levels.inside == [1, 2, 3]
    gc_ns, c_ns = open_ns(levels.gc_host), open_ns(levels.init)
    try:
        host, mid, low = nspid(levels.gc_host)
        assert low == 1 and mid == 3
        for src, pid in ((-1, host), (levels.cfd, mid), (c_ns, mid), (gc_ns, low)):
            assert translate_pid(pid, src, -1) == host
            assert translate_pid(pid, src, levels.cfd) == mid
            assert translate_pid(pid, src, c_ns) == mid
            assert translate_pid(pid, src, gc_ns) == low
        # init and the member, both ways between host and container
        assert translate_pid(1, levels.cfd, -1) == levels.init
        assert translate_pid(levels.init, -1, levels.cfd) == 1
        assert translate_pid(levels.member_host, -1, levels.cfd) == nspid(levels.member_host)[1]
        # not visible below: ESRCH
        for args in ((levels.init, -1, gc_ns), (1, levels.cfd, gc_ns), (os.getpid(), -1, levels.cfd)):
            with pytest.raises(OSError) as info:
                translate_pid(*args)
            assert info.value.errno == errno.ESRCH, args
    finally:
        os.close(gc_ns)
        os.close(c_ns)


def test_translate_from_inside_the_container(levels: Levels) -> None:
    """A member sees its own level: the grandchild's namespace below, the host not at all."""
    gc_ns, host_ns = open_ns(levels.gc_host), open_ns(os.getpid())
    r, w = os.pipe()
    pid = fork_into_container(levels.cfd)
    if pid == 0:
        out: list[Any] = []
        try:
            out.append(translate_pid(1, gc_ns, -1))
            out.append(translate_pid(3, -1, gc_ns))
            out.append(translate_pid(1, levels.cfd, -1))
            for args in ((1, host_ns, -1), (1, -1, host_ns)):
                try:
                    out.append(translate_pid(*args))
                except OSError as e:
                    out.append(e.errno)
        finally:
            os.write(w, json.dumps(out).encode())
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = json.loads(f.read())
    assert child_result(pid) == 0
    os.close(gc_ns)
    os.close(host_ns)
    # the host's pid 1 is not visible from the container
    # up into a namespace above its own: the kernel answers to whoever holds the fd
    assert out == [3, 1, 1, errno.ESRCH, levels.init]


def test_translate_bad_arguments(levels: Levels) -> None:
    r, w = os.pipe()
    os.close(w)
    net = os.open("/proc/self/ns/net", os.O_RDONLY)
    reg = os.open(os.path.join(ROOT, "pyproject.toml"), os.O_RDONLY)
    try:
        cases = [((1, 98765, -1), errno.EBADF), ((1, -1, 98765), errno.EBADF),
                 ((1, net, -1), errno.EINVAL), ((1, -1, reg), errno.EINVAL),
                 ((1, r, -1), errno.EINVAL),  # a pipe the service does not know
                 ((4194305, -1, -1), errno.ESRCH), ((0, -1, -1), errno.ESRCH),
                 ((-5, levels.cfd, -1), errno.ESRCH)]
        for args, expected in cases:
            with pytest.raises(OSError) as info:
                translate_pid(*args)
            assert info.value.errno == expected, args
        assert translate_pid(os.getpid(), -1, -1) == os.getpid()
    finally:
        for fd in (r, net, reg):
            os.close(fd)


def test_pid_namespace_of_a_container_without_init(service: Any) -> None:
    """Before init, a NEW_PID_NS container has no PID namespace (ESRCH); without NEW_PID_NS
    its namespace is its creator's; dead, ESRCH."""
    fresh = container_create("fresh", CONTAINER_NEW_PID_NS)
    shared = container_create("shared", 0)
    try:
        with pytest.raises(OSError) as info:
            translate_pid(1, fresh, -1)
        assert info.value.errno == errno.ESRCH
        assert translate_pid(os.getpid(), -1, shared) == os.getpid()
        assert container_pids(fresh) == []
        syscalls.container_kill(fresh)
        assert hung_up(fresh, 5)
        with pytest.raises(OSError) as info:
            translate_pid(1, fresh, -1)
        assert info.value.errno == errno.ESRCH
    finally:
        os.close(fresh)
        os.close(shared)


def test_container_pids_and_the_view(levels: Levels, service: Any) -> None:
    # The container's own processes: init first; the grandchild's namespace is the
    # container's too (it is in the same cgroup), seen at the container's level.
    listed = container_pids(levels.cfd)
    assert listed[0] == (levels.init, 1)
    assert sorted(listed) == sorted([(levels.init, 1), (levels.member_host, 2),
                                     (levels.gc_host, 3)])
    for outer, inner in listed:
        assert nspid(outer)[:2] == [outer, inner]
    cid = syscalls.container_status(levels.cfd)["id"]
    with open(os.path.join(service.view, str(cid), "pids")) as f:
        rows = [tuple(int(x) for x in line.split()) for line in f.read().splitlines()]
    assert rows == [(inner, outer) for outer, inner in listed]
    # From inside, outer and inner agree
    r, w = os.pipe()
    pid = fork_into_container(levels.cfd)
    if pid == 0:
        try:
            got = container_pids(levels.cfd)
            with open(os.path.join(service.view, str(cid), "pids")) as f:
                seen = f.read()
            os.write(w, json.dumps([got, seen]).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        got, seen = json.loads(f.read())
    me = nspid(pid)[1]
    assert child_result(pid) == 0
    assert got[0] == [1, 1]
    assert sorted(map(tuple, got)) == sorted([(1, 1), (2, 2), (3, 3), (me, me)])
    assert seen.splitlines()[0] == "1 1"


def test_ps(levels: Levels) -> None:
    cid = syscalls.container_status(levels.cfd)["id"]
    res = cli("ps", str(cid))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["PID", "HOSTPID", "COMMAND"]
    rows = [line.split(None, 2) for line in lines[1:]]
    assert [(int(o), int(i)) for i, o, _ in rows] == container_pids(levels.cfd)
    assert rows[0][:2] == ["1", str(levels.init)]
    assert "pytest" in rows[0][2] or sys.executable in rows[0][2]
