"""Process ids in context and nested containers (contract section 12), on the real kernel."""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
from collections.abc import Callable, Iterator
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

from .conftest import OTHER_GID, OTHER_UID, ROOT, child_result, hung_up, in_container, run_as
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


# ---- nested containers ----------------------------------------------------------------------

def containers_file(view: str) -> list[tuple[str, int]]:
    """(name, id) of each row of the view's containers file, <current> first."""
    with open(os.path.join(view, "containers")) as f:
        return [(line.split()[0], int(line.split()[1])) for line in f.read().splitlines()[1:]]


def test_three_levels_of_containers(service: Any) -> None:
    """A member of `outer` makes `inner` and forks its init: inner is outer's child at every
    level (listing, cgroup, PID namespace), and dies with it."""
    outer = container_create("outer", CONTAINER_NEW_PID_NS)
    outer_id = syscalls.container_status(outer)["id"]
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    init = fork_into_container(outer)
    if init == 0:
        try:
            os.close(r)
            ours.close()
            os.close(outer)
            inner = container_create("inner", CONTAINER_NEW_PID_NS)
            ir, iw = os.pipe()
            gc = fork_into_container(inner)
            if gc == 0:
                os.close(ir)
                os.write(iw, json.dumps(containers_file(service.view)).encode())
                os.close(iw)
                theirs.recv(1)  # until the test ends (or we are killed)
                os._exit(0)
            os.close(iw)
            with os.fdopen(ir) as f:
                seen_inner = json.loads(f.read())
            socket.send_fds(theirs, [json.dumps([gc, containers_file(service.view),
                                                 seen_inner]).encode()], [inner])
            theirs.recv(1)
        finally:
            os._exit(0)
    theirs.close()
    os.close(w)
    ours.settimeout(20)
    try:
        data, fds, _, _ = socket.recv_fds(ours, 65536, 1)
        inner = fds[0]
        gc_in_outer, seen_outer, seen_inner = json.loads(data)
        inner_id = syscalls.container_status(inner)["id"]
        # the containers file lists exactly each level's children
        host = containers_file(service.view)
        assert ("outer", outer_id) in host and inner_id not in [i for _, i in host]
        assert seen_outer == [["<current>", outer_id], ["inner", inner_id]]
        assert seen_inner == [["<current>", inner_id]]
        assert syscalls.container_status(inner)["parent"] == outer_id
        # outer's USE: our handle, its init, its child
        with open(os.path.join(service.view, "containers")) as f:
            use = {int(line.split()[1]): int(line.split()[2]) for line in f.read().splitlines()[1:]}
        assert use[outer_id] == 3
        # ls --tree: inner right under outer, indented
        res = cli("ls", "--tree")
        assert res.returncode == 0, res.stderr
        rows = [line for line in res.stdout.splitlines()[1:]]
        at = [line.split()[0] for line in rows].index(str(outer_id))
        assert rows[at + 1].split()[:2] == [str(inner_id), "inner"]
        assert rows[at + 1].index("inner") == rows[at].index("outer") + 2
        # pids at three levels, through handles, agreeing with NSpid
        gc_host = translate_pid(1, inner, -1)
        assert nspid(gc_host) == [gc_host, gc_in_outer, 1]
        assert translate_pid(1, inner, outer) == gc_in_outer
        assert translate_pid(gc_in_outer, outer, inner) == 1
        assert translate_pid(gc_host, -1, inner) == 1
        with pytest.raises(OSError) as info:
            translate_pid(1, outer, inner)  # outer's init is not visible in inner
        assert info.value.errno == errno.ESRCH
        assert container_pids(inner) == [(gc_host, 1)]
        # the cgroup of inner is inside outer's
        with open(f"/proc/{gc_host}/cgroup") as f:
            assert f"/c{outer_id}/c{inner_id}\n" in f.read().replace("/members\n", "\n")
        # killed with its parent: the child's handle held out here hangs up
        assert not hung_up(inner)
        syscalls.container_kill(outer)
        assert hung_up(inner, 10)
        assert syscalls.container_status(inner)["state"] == "dead"
        os.close(inner)
    finally:
        ours.close()
        os.close(outer)
        child_result(init)


def test_unprivileged_nested_user_namespace(service: Any) -> None:
    """A user's container holds a nested container whose user namespace's parent is the
    outer container's; asking for a namespace without NEW_USER_NS is EPERM there too."""
    out = run_as(OTHER_UID, OTHER_GID, """
        import errno, fcntl, json, os, syscalls
        from syscalls import CONTAINER_NEW_USER_NS as U, CONTAINER_NEW_PID_NS as P
        outer = syscalls.container_create("outer", U | P)
        r, w = os.pipe()
        pid = syscalls.fork_into_container(outer)
        if pid == 0:
            res = {"uid": os.getuid(), "own": os.stat("/proc/self/ns/user").st_ino}
            try:
                syscalls.container_create("bad", P)
            except OSError as e:
                res["no_user_ns"] = e.errno
            inner = syscalls.container_create("inner", U | P)
            ir, iw = os.pipe()
            hold_r, hold_w = os.pipe()
            gc = syscalls.fork_into_container(inner)
            if gc == 0:
                os.close(hold_w)
                os.write(iw, json.dumps([os.getuid(), os.getpid()]).encode())
                os.read(hold_r, 1)
                os._exit(0)
            os.close(iw)
            res["inner"] = json.loads(os.read(ir, 4096))
            # the grandchild's user namespace, by its pidfd; its parent, seen from here
            pidfd = os.pidfd_open(gc)
            userns = syscalls.linux.pidfd_namespace(pidfd, "user")
            parent = fcntl.ioctl(userns, 0xB702)  # NS_GET_PARENT
            res["inner"] += [os.fstat(userns).st_ino, os.fstat(parent).st_ino]
            os.close(hold_w)
            os.waitpid(gc, 0)
            os.write(w, json.dumps(res).encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            data = f.read()
        os.waitpid(pid, 0)
        return json.loads(data)
    """)
    assert out["uid"] == 0
    assert out["no_user_ns"] == errno.EPERM
    uid, pid, own, parent = out["inner"]
    assert uid == 0 and pid == 1
    assert own != out["own"] and parent == out["own"]


def in_outer_init(body: Callable[[int, dict[str, Any]], None]) -> dict[str, Any]:
    """Run `body(outer handle, results)` as the init of a fresh kill-on-close container (so
    that what it makes is nested), and return the results it filled in (an "error" entry
    if it raised)."""
    outer = container_create("outer", CONTAINER_NEW_PID_NS | CONTAINER_KILL_ON_CLOSE)
    r, w = os.pipe()
    init = fork_into_container(outer)
    if init == 0:
        res: dict[str, Any] = {}
        try:
            os.close(r)
            body(outer, res)
        except BaseException as e:
            res["error"] = repr(e)
        finally:
            os.write(w, json.dumps(res).encode())
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        got: dict[str, Any] = json.loads(f.read())
    child_result(init)
    os.close(outer)
    return got


def test_nested_container_works_and_cannot_manage_its_parent(service: Any) -> None:
    """From inside a nested container a process is inside the parent too: it may not kill
    the parent (EPERM); its parent's init, outside it, may limit it and open sockets in it."""
    def body(outer: int, res: dict[str, Any]) -> None:
        inner = container_create("inner", CONTAINER_NEW_PID_NS | syscalls.CONTAINER_NEW_NET_NS)
        syscalls.container_set_limit(inner, "pids.max", "20")
        res["limit"] = syscalls.container_get_limit(inner, "pids.max")
        s = syscalls.container_socket(inner, socket.AF_INET, socket.SOCK_STREAM, 0)
        os.close(s)
        d = syscalls.openat(inner, "etc", os.O_RDONLY | os.O_DIRECTORY)
        res["at"] = "passwd" in os.listdir(d)
        os.close(d)
        ir, iw = os.pipe()
        gc = fork_into_container(inner)
        if gc == 0:
            try:
                syscalls.container_kill(outer)
                os.write(iw, b"killed")
            except OSError as e:
                os.write(iw, str(e.errno).encode())
            os._exit(0)
        os.close(iw)
        res["kill_parent"] = os.read(ir, 64).decode()
        os.waitpid(gc, 0)

    res = in_outer_init(body)
    assert res == {"limit": "20", "at": True, "kill_parent": str(errno.EPERM)}


def test_nested_container_after_a_restart(service: Any) -> None:
    """After a hard restart the service knows a nested group again at once: a process of the
    nested container is its member (the view's <current>), not its parent's."""
    from .test_restart import restart

    outer = container_create("outer", CONTAINER_NEW_PID_NS)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    init = fork_into_container(outer)
    if init == 0:
        try:
            ours.close()
            inner = container_create("inner", CONTAINER_NEW_PID_NS)
            if fork_into_container(inner) == 0:
                theirs.recv(1)
                os._exit(0)
            socket.send_fds(theirs, [b"h"], [inner])
            theirs.recv(1)
        finally:
            os._exit(0)
    theirs.close()
    ours.settimeout(20)
    try:
        _, fds, _, _ = socket.recv_fds(ours, 16, 1)
        inner = fds[0]
        inner_id = syscalls.container_status(inner)["id"]
        restart(service, hard=True)
        member, seen = in_container(inner, lambda: containers_file(service.view))
        # reaped here: a zombie in outer's PID namespace would hold outer's init in its exit
        assert child_result(member) == 0
        assert seen[0] == ["<current>", inner_id]
        os.close(inner)
    finally:
        ours.close()
        syscalls.container_kill(outer)
        os.close(outer)
        child_result(init)


def test_keyrings_work_in_a_nested_container(service: Any) -> None:
    """request_key() in a nested container is trapped and answered by that container's
    manager (the parent's init), though the nested process's own trap listener was refused
    (EBUSY: the parent's filter has the one listener of the chain)."""
    from containerfs.keyring import intercept
    from syscalls import keys

    def body(outer: int, res: dict[str, Any]) -> None:
        inner = container_create("inner", CONTAINER_NEW_PID_NS)
        with intercept(inner, "user") as requests:
            ir, iw = os.pipe()
            gc = fork_into_container(inner)
            if gc == 0:
                try:
                    serial = keys.request_key("user", "nested-key", "info")
                    os.write(iw, keys.read(serial))
                except OSError as e:
                    os.write(iw, f"errno {e.errno}".encode())
                os._exit(0)
            os.close(iw)
            req = requests.get(timeout=10)
            res["asked"] = [req.type, req.description, req.container]
            res["inner"] = syscalls.container_status(inner)["id"]
            req.instantiate(b"from the parent")
            res["got"] = os.read(ir, 64).decode()
            os.waitpid(gc, 0)

    res = in_outer_init(body)
    assert "error" not in res, res
    assert res["asked"] == ["user", "nested-key", res["inner"]]
    assert res["got"] == "from the parent"
