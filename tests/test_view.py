"""The /containers FUSE view: the model alone (no mount), then the real mount of a service."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import signal
import stat
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

import syscalls
from containerfs.states import State
from containerfs.view import model as vm
from containerfs.view import readers
from containerfs.view.model import Model
from containerfs.view.nodes import Kind
from containerfs.view.readers import HOST_ID, Reader
from containerfs.view.render import parse_table
from syscalls import (
    CONTAINER_KILL_ON_CLOSE,
    CONTAINER_NEW_FS_NS,
    CONTAINER_NEW_NET_NS,
    CONTAINER_NEW_PID_NS,
)

from .conftest import OTHER_GID, OTHER_UID, ROOT, THIRD_UID, child_result, run_as, start_service

_libc = ctypes.CDLL(None)
HEADER = b"NAME                               ID USE FL OWNER GROUP\n"


def c_row(name: bytes, cid: int, use: int, fl: int, owner: int, group: int) -> bytes:
    """A row as C's printf formats it, the contract's own words."""
    buf = ctypes.create_string_buffer(256)
    _libc.snprintf(buf, 256, b"%-24s %12llu %3u %02lx %5d %5d\n", name, ctypes.c_ulonglong(cid),
                   ctypes.c_uint(use), ctypes.c_ulong(fl), ctypes.c_int(owner),
                   ctypes.c_int(group))
    return buf.value


def table(*rows: tuple[bytes, int, int, int, int, int]) -> bytes:
    return HEADER + b"".join(c_row(*r) for r in rows)


# ---- the model, without a mount ----------------------------------------------------------------

@dataclass(eq=False)
class FakeContainer:
    id: int
    name: bytes
    flags: int = 0
    owner: int = 0
    group: int = 0
    parent: int = HOST_ID
    state: State = State.CREATED
    handle_open: bool = True
    init_pid: int | None = None
    exit_status: int | None = None
    ns: dict[str, int] = field(default_factory=dict)
    new_ns: frozenset[str] = frozenset()
    caps: int | None = None
    seccomp: str | None = None


class FakeCgroups:
    def __init__(self) -> None:
        self.members: dict[int, list[int]] = {}
        self.where: dict[int, int] = {}

    def procs(self, cid: int) -> list[int]:
        return list(self.members.get(cid, []))

    def container_id_of(self, pid: int) -> int | None:
        return self.where.get(pid)

    def limits(self, cid: int) -> dict[str, str]:
        return {}

    def stats(self, cid: int) -> dict[str, int]:
        return {}

    def frozen(self, cid: int) -> bool:
        return False


class FakeService:
    def __init__(self) -> None:
        self.containers: dict[int, FakeContainer] = {}
        self.cgroups = FakeCgroups()
        self.killed: list[int] = []

    def add(self, c: FakeContainer) -> FakeContainer:
        self.containers[c.id] = c
        return c

    def kill(self, c: Any) -> None:
        self.killed.append(c.id)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_model() -> tuple[Model, FakeService, list[int], Clock]:
    svc = FakeService()
    invalidated: list[int] = []
    clock = Clock()

    async def invalidate(ino: int) -> None:
        invalidated.append(ino)
        await trio.lowlevel.checkpoint()

    return Model(svc, invalidate=invalidate, clock=clock), svc, invalidated, clock


ROOT_READER = Reader(pid=0, uid=0, gid=0)


def sample_service(svc: FakeService) -> None:
    svc.add(FakeContainer(2, b"plain", owner=0, group=0))
    svc.add(FakeContainer(3, b"running", owner=OTHER_UID, group=OTHER_GID, state=State.RUNNING,
                          init_pid=1000))
    svc.cgroups.members[3] = [1000, 1001]
    svc.add(FakeContainer(4, b"dead", state=State.DEAD, init_pid=1002, exit_status=256))
    svc.add(FakeContainer(5, b"koc", flags=CONTAINER_KILL_ON_CLOSE, handle_open=False))
    svc.add(FakeContainer(6, b"nested", parent=3, owner=OTHER_UID, group=OTHER_GID))
    svc.add(FakeContainer(7, b"x" * 23, owner=2**32 - 2, group=2**31 + 5))


def test_table_rows_are_cs_printf() -> None:
    model, svc, _, _ = make_model()
    sample_service(svc)
    assert model.render_table(ROOT_READER) == table(
        (b"<current>", 1, 6, 0x01, 0, 0),
        (b"plain", 2, 1, 0x00, 0, 0),
        (b"running", 3, 1 + 2 + 1, 0x01, OTHER_UID, OTHER_GID),  # handle, members, child
        (b"dead", 4, 1, 0x03, 0, 0),
        (b"koc", 5, 0, 0x04, 0, 0),
        (b"x" * 23, 7, 1, 0x00, -2, -(2**31) + 5),  # %d of a uid_t, as C prints it
    )


def test_table_relative_to_reader() -> None:
    model, svc, _, _ = make_model()
    sample_service(svc)
    # A non-root host reader lists only its own; one inside container 3 sees 3 and its child;
    # its user namespace maps OTHER_UID to 0, and root to nothing (the overflow id).
    other = Reader(pid=0, uid=OTHER_UID, gid=OTHER_GID)
    assert model.render_table(other) == table(
        (b"<current>", 1, 6, 0x01, 0, 0),
        (b"running", 3, 4, 0x01, OTHER_UID, OTHER_GID))
    inside = Reader(pid=0, uid=OTHER_UID, gid=OTHER_GID, cid=3,
                    uid_map=((0, OTHER_UID, 1),), gid_map=((0, OTHER_GID, 1),))
    assert model.render_table(inside) == table(
        (b"<current>", 3, 4, 0x01, 0, 0),
        (b"nested", 6, 1, 0x00, 0, 0))
    inside_root = Reader(pid=0, uid=0, gid=0, cid=3, uid_map=((0, OTHER_UID, 1),),
                         gid_map=((0, OTHER_GID, 1),))
    assert model.render_table(inside_root).endswith(c_row(b"nested", 6, 1, 0, 0, 0))
    assert c_row(b"<current>", 3, 4, 0x01, 0, 0) in model.render_table(inside_root)
    assert readers.map_id(0, ((0, OTHER_UID, 1),)) == 65534


@pytest.mark.parametrize("bad", [
    b"",
    b"NAME ID\n<current> 1 1 01 0 0\n",
    HEADER,
    HEADER + c_row(b"<current>", 1, 1, 1, 0, 0)[:-1],  # no final newline
    HEADER + c_row(b"plain", 2, 1, 0, 0, 0),  # no <current> first
    HEADER + c_row(b"<current>", 1, 1, 1, 0, 0) + b"plain 2 1 00 0 0\n",
])
def test_parse_table_rejects(bad: bytes) -> None:
    with pytest.raises(ValueError):
        parse_table(bad)


@pytest.mark.trio
async def test_cache_is_replaced_only_when_nothing_reads_it() -> None:
    model, svc, invalidated, _ = make_model()
    svc.add(FakeContainer(2, b"a"))
    ino = model.lookup(vm.ROOT_INO, b"containers", ROOT_READER).ino
    assert model.getattr(ino).size == 0  # nothing published yet
    first = await model.open(ino, os.O_RDONLY, ROOT_READER)
    assert (first.keep_cache, first.direct_io) and invalidated == [ino]
    text1 = model.read(first.fh, 0, 1 << 20)
    assert model.getattr(ino).size == len(text1) and parse_table(text1)[1][0] == b"a"
    # Unchanged: shared from the cache, no invalidation.
    again = await model.open(ino, os.O_RDONLY, ROOT_READER)
    assert again.keep_cache and invalidated == [ino]
    model.release(again.fh)
    # Changed while `first` is open: the new reader gets its own, current copy.
    svc.add(FakeContainer(3, b"b"))
    model.changed()
    own = await model.open(ino, os.O_RDONLY, ROOT_READER)
    assert own.direct_io and not own.keep_cache
    assert [r[0] for r in parse_table(model.read(own.fh, 0, 1 << 20))] == [b"<current>", b"a", b"b"]
    assert model.read(first.fh, 0, 1 << 20) == text1  # one open, one instant
    assert model.getattr(ino).size == len(text1)  # the kernel's copy is still the old one
    model.release(own.fh)
    model.release(first.fh)
    # Nothing reads the old text: the next open publishes the new one, after invalidating.
    later = await model.open(ino, os.O_RDONLY, ROOT_READER)
    assert later.keep_cache and invalidated == [ino, ino]
    assert model.getattr(ino).size == len(model.read(later.fh, 0, 1 << 20)) > len(text1)
    model.release(later.fh)
    assert model.open_files() == 0


@pytest.mark.trio
async def test_other_viewpoint_gets_own_inode_or_direct_io() -> None:
    model, svc, _, _ = make_model()
    sample_service(svc)
    host = model.lookup(vm.ROOT_INO, b"containers", ROOT_READER).ino
    inside = Reader(pid=0, uid=0, gid=0, cid=3)
    own = model.lookup(vm.ROOT_INO, b"containers", inside).ino
    assert own != host
    # A reader opening another viewpoint's inode (a dentry the kernel kept) reads its own table.
    f = await model.open(host, os.O_RDONLY, inside)
    assert f.direct_io
    assert parse_table(model.read(f.fh, 0, 1 << 20))[0][1] == 3


@pytest.mark.trio
async def test_members_are_counted_again_after_ttl() -> None:
    model, svc, _, clock = make_model()
    svc.add(FakeContainer(2, b"r", state=State.RUNNING, init_pid=10))
    svc.cgroups.members[2] = [10]
    assert parse_table(model.table(ROOT_READER))[1][2] == 2
    svc.cgroups.members[2] = [10, 11, 12]  # forks the service was not told about
    assert parse_table(model.table(ROOT_READER))[1][2] == 2
    clock.now += vm.MEMBERS_TTL
    assert parse_table(model.table(ROOT_READER))[1][2] == 4


@pytest.mark.trio
async def test_kill_file_checks_at_open() -> None:
    model, svc, _, _ = make_model()
    svc.add(FakeContainer(2, b"mine", owner=OTHER_UID, group=OTHER_GID))
    kill = model.lookup(model.lookup(vm.ROOT_INO, b"2", ROOT_READER).ino, b"kill",
                        ROOT_READER).ino
    owner = Reader(pid=0, uid=OTHER_UID, gid=OTHER_GID)
    for reader, flags, err in [(owner, os.O_RDONLY, errno.EACCES),
                               (owner, os.O_RDWR, errno.EACCES),
                               (Reader(pid=0, uid=THIRD_UID, gid=THIRD_UID), os.O_WRONLY,
                                errno.EACCES),
                               (Reader(pid=0, uid=OTHER_UID, gid=OTHER_GID, cid=2), os.O_WRONLY,
                                errno.EPERM)]:
        with pytest.raises(OSError) as info:
            await model.open(kill, flags, reader)
        assert info.value.errno == err
    f = await model.open(kill, os.O_WRONLY | os.O_TRUNC, owner)
    with pytest.raises(OSError) as info:
        model.write(f.fh, b"2\n")
    assert info.value.errno == errno.EINVAL and svc.killed == []
    assert model.write(f.fh, b"1\n") == 2 and svc.killed == [2]
    root = await model.open(kill, os.O_WRONLY, ROOT_READER)
    assert model.write(root.fh, b"1") == 1 and svc.killed == [2, 2]


@pytest.mark.trio
async def test_visibility_and_files() -> None:
    model, svc, _, _ = make_model()
    sample_service(svc)
    other = Reader(pid=0, uid=OTHER_UID, gid=OTHER_GID)
    listed = [n for n, _ in model.readdir(model.opendir(vm.ROOT_INO, other), 0)]
    assert listed == [b"containers", b"by-name", b"3", b"6"]
    names = [n for n, _ in model.readdir(model.opendir(vm.BYNAME_INO, other), 0)]
    assert names == [b"running", b"nested"]
    # Another user's container: its id is found, nothing in it may be read.
    d2 = model.lookup(vm.ROOT_INO, b"2", other)
    assert stat.S_ISDIR(d2.mode) and d2.uid == 0
    for call in (lambda: model.opendir(d2.ino, other),):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EACCES
    name2 = model.lookup(d2.ino, b"name", other).ino
    with pytest.raises(OSError) as info:
        await model.open(name2, os.O_RDONLY, other)
    assert info.value.errno == errno.EACCES
    # A reader inside 3 finds nothing outside its container.
    inside = Reader(pid=0, uid=0, gid=0, cid=3)
    with pytest.raises(OSError) as info:
        model.lookup(vm.ROOT_INO, b"2", inside)
    assert info.value.errno == errno.ENOENT
    # The dead container's files; exit_status only once dead.
    d4 = model.lookup(vm.ROOT_INO, b"4", ROOT_READER).ino
    files = [n for n, _ in model.readdir(model.opendir(d4, ROOT_READER), 0)]
    assert files == [b"name", b"state", b"init_pid", b"members", b"pids", b"flags", b"owner", b"group",
                     b"caps", b"seccomp", b"exit_status", b"ns", b"kill"]

    async def read(d: int, name: bytes, reader: Reader = ROOT_READER) -> bytes:
        f = await model.open(model.lookup(d, name, reader).ino, os.O_RDONLY, reader)
        try:
            return model.read(f.fh, 0, 4096)
        finally:
            model.release(f.fh)

    assert await read(d4, b"caps") == b"all\n" and await read(d4, b"seccomp") == b"none\n"

    assert await read(d4, b"state") == b"dead\n"
    assert await read(d4, b"exit_status") == b"256\n"
    assert await read(d4, b"members") == b""
    d5 = model.lookup(vm.ROOT_INO, b"5", ROOT_READER).ino
    assert await read(d5, b"flags") == b"0x100 KILL_ON_CLOSE\n"
    with pytest.raises(OSError) as info:
        model.lookup(d5, b"exit_status", ROOT_READER)
    assert info.value.errno == errno.ENOENT
    d6 = model.lookup(vm.ROOT_INO, b"6", ROOT_READER).ino
    mapped = Reader(pid=0, uid=OTHER_UID, gid=OTHER_GID, uid_map=((0, OTHER_UID, 1),),
                    gid_map=((0, OTHER_GID, 1),))
    assert await read(d6, b"owner", mapped) == b"0\n"
    assert await read(d6, b"owner") == b"%d\n" % OTHER_UID


def test_by_name_duplicates_and_removal() -> None:
    model, svc, _, _ = make_model()
    svc.add(FakeContainer(2, b"web"))
    svc.add(FakeContainer(3, b"web"))
    svc.add(FakeContainer(4, b".."))
    link = model.lookup(vm.BYNAME_INO, b"web", ROOT_READER)
    assert stat.S_ISLNK(link.mode) and model.readlink(link.ino, ROOT_READER) == b"../3"
    with pytest.raises(OSError):
        model.lookup(vm.BYNAME_INO, b"..x", ROOT_READER)
    d3 = model.lookup(vm.ROOT_INO, b"3", ROOT_READER).ino
    f3 = model.lookup(d3, b"state", ROOT_READER).ino
    del svc.containers[3]
    model.changed()
    assert model.readlink(link.ino, ROOT_READER) == b"../2"
    for ino in (d3, f3):
        with pytest.raises(OSError) as info:
            model.getattr(ino)
        assert info.value.errno == errno.ENOENT
    assert model.node(link.ino).kind is Kind.LINK


def test_pid_view_of_own_namespace() -> None:
    view = readers.PidView(os.getpid())
    assert view.translate(os.getpid()) == os.getpid() or view.level > 0


# ---- the real mount ----------------------------------------------------------------------------

def read_table(service: Any) -> bytes:
    with open(os.path.join(service.view, "containers"), "rb") as f:
        return f.read()


def vfile(service: Any, cid: int, name: str) -> str:
    with open(os.path.join(service.view, str(cid), name)) as f:
        return f.read()


def start_init(cfd: int) -> tuple[int, int]:
    """Fork an init that waits for a byte on a pipe and exits with it; (pid, write end)."""
    r, w = os.pipe()
    pid = syscalls.fork_into_container(cfd)
    if pid == 0:
        os.closerange(3, r)  # hold no other container's handle
        os.closerange(r + 1, 4096)
        code = os.read(r, 1)
        os._exit(code[0] if code else 0)
    os.close(r)
    return pid, w


def test_table_from_the_host(service: Any) -> None:
    plain = syscalls.container_create("plain", 0)
    koc = syscalls.container_create("kill-on-close", CONTAINER_KILL_ON_CLOSE)
    dead = syscalls.container_create("dead", CONTAINER_NEW_PID_NS)
    pid, w = start_init(dead)
    os.write(w, b"\x03")
    assert child_result(pid) == 3
    assert syscalls.container_wait(dead) == 3 << 8
    running = syscalls.container_create("running", CONTAINER_NEW_NET_NS)
    init, w2 = start_init(running)
    try:
        assert read_table(service) == table(
            (b"<current>", 1, 1 + 4, 0x01, 0, 0),
            (b"plain", 2, 1, 0x00, 0, 0),
            (b"kill-on-close", 3, 1, 0x04, 0, 0),
            (b"dead", 4, 1, 0x03, 0, 0),
            (b"running", 5, 1 + 1, 0x01, 0, 0))
        # The last handle of the kill-on-close container goes: it is gone on the next read.
        os.close(koc)
        deadline = time.monotonic() + 5
        while b"kill-on-close" in read_table(service) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [r[0] for r in parse_table(read_table(service))] == [
            b"<current>", b"plain", b"dead", b"running"]
        st = os.stat(os.path.join(service.view, "containers"))
        assert st.st_size == len(read_table(service)) and stat.S_IMODE(st.st_mode) == 0o444
    finally:
        os.close(w2)
        child_result(init)
        for fd in (plain, dead, running):
            os.close(fd)


def test_table_from_inside_a_container(service: Any) -> None:
    outer = syscalls.container_create("outer", CONTAINER_NEW_FS_NS | CONTAINER_NEW_PID_NS)
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = syscalls.fork_into_container(outer)
    if pid == 0:
        try:
            os.close(r)
            os.read(go_r, 1)  # once the service has recorded us as init
            inner = syscalls.container_create("inner", CONTAINER_KILL_ON_CLOSE)
            got = read_table(service)
            names = sorted(os.listdir(service.view))
            os.write(w, json.dumps([got.decode(), names, inner]).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.write(go_w, b"x")
    os.close(go_w)
    os.close(go_r)
    with os.fdopen(r) as f:
        got, names, _ = json.loads(f.read())
    assert child_result(pid) == 0
    # outer: its handle, its one member (the reader), its child; inner: its handle.
    assert got.encode() == table((b"<current>", 2, 3, 0x01, 0, 0),
                                 (b"inner", 3, 1, 0x04, 0, 0))
    assert names == ["2", "3", "by-name", "containers"]
    # The host's view meanwhile: outer only (inner is outer's child).
    assert [r[:2] for r in parse_table(read_table(service))] == [(b"<current>", 1),
                                                                 (b"outer", 2)]
    os.close(outer)


def test_table_in_a_user_namespace(service: Any) -> None:
    got = run_as(OTHER_UID, OTHER_GID, f"""
        import syscalls
        cfd = syscalls.container_create("userns", syscalls.CONTAINER_NEW_USER_NS
                                        | syscalls.CONTAINER_NEW_PID_NS)
        r, w = os.pipe()
        pid = syscalls.fork_into_container(cfd)
        if pid == 0:
            os.close(r)
            with open({os.path.join(service.view, "containers")!r}, "rb") as f:
                os.write(w, f.read())
            os._exit(0)
        os.close(w)
        inside = os.read(r, 4096).decode()
        os.waitpid(pid, 0)
        syscalls.container_wait(cfd)  # the service has seen the death
        with open({os.path.join(service.view, "containers")!r}, "rb") as f:
            outside = f.read().decode()
        return [inside, outside]
    """)
    inside, outside = (t.encode() for t in got)
    # Inside, the creator is root. USE: the handle, init (the reader), and for a moment the
    # intermediate that a non-root fork leaves in the group.
    use = parse_table(inside)[0][2]
    assert use in (2, 3)
    assert inside == table((b"<current>", 2, use, 0x01, 0, 0))
    # Outside, the same user sees its container and .init in host ids.
    assert outside == table((b"<current>", 1, 2, 0x01, 0, 0),
                            (b"userns", 2, 1, 0x03, OTHER_UID, OTHER_GID))


def test_files_through_a_life(service: Any) -> None:
    cfd = syscalls.container_create("life", CONTAINER_NEW_PID_NS | CONTAINER_NEW_NET_NS)
    cid = syscalls.container_status(cfd)["id"]
    d = os.path.join(service.view, str(cid))
    assert vfile(service, cid, "name") == "life\n"
    assert vfile(service, cid, "state") == "created\n"
    assert vfile(service, cid, "init_pid") == "0\n"
    assert vfile(service, cid, "members") == ""
    assert vfile(service, cid, "flags") == "0xc0 NEW_PID_NS NEW_NET_NS\n"
    assert (vfile(service, cid, "owner"), vfile(service, cid, "group")) == ("0\n", "0\n")
    assert "exit_status" not in os.listdir(d)
    assert "pid" not in os.listdir(os.path.join(d, "ns"))  # born with init
    assert vfile(service, cid, "ns/uts") == os.readlink("/proc/self/ns/uts") + "\n"
    assert vfile(service, cid, "ns/net") != os.readlink("/proc/self/ns/net") + "\n"
    assert os.readlink(os.path.join(service.view, "by-name", "life")) == f"../{cid}"
    assert os.path.samefile(os.path.join(service.view, "by-name", "life"), d)
    pid, w = start_init(cfd)
    assert vfile(service, cid, "state") == "running\n"
    assert vfile(service, cid, "init_pid") == f"{pid}\n"
    assert vfile(service, cid, "members") == f"{pid}\n"
    assert vfile(service, cid, "ns/pid") == os.readlink(f"/proc/{pid}/ns/pid") + "\n"
    assert vfile(service, cid, "ns/net") == os.readlink(f"/proc/{pid}/ns/net") + "\n"
    assert parse_table(read_table(service))[1][3] == 0x01
    os.write(w, b"\x07")
    assert child_result(pid) == 7
    assert syscalls.container_wait(cfd) == 7 << 8
    assert vfile(service, cid, "state") == "dead\n"
    assert vfile(service, cid, "exit_status") == f"{7 << 8}\n"
    assert vfile(service, cid, "members") == ""
    assert os.listdir(os.path.join(d, "ns")) == []
    assert parse_table(read_table(service))[1][3] == 0x03
    os.close(w)
    os.close(cfd)


def test_kill_file(service: Any) -> None:
    root_owned = syscalls.container_create("root-owned", CONTAINER_NEW_PID_NS)
    pid, w = start_init(root_owned)
    try:
        got = run_as(OTHER_UID, OTHER_GID, f"""
            import errno, syscalls
            view = {service.view!r}
            mine = syscalls.container_create("mine", syscalls.CONTAINER_NEW_USER_NS
                                             | syscalls.CONTAINER_NEW_PID_NS)
            r, w = os.pipe()
            pid = syscalls.fork_into_container(mine)
            if pid == 0:
                os.close(w)
                os.read(r, 1)
                os._exit(0)
            cid = syscalls.container_status(mine)["id"]
            errs = []
            for path, flags in [(view + "/2/kill", os.O_WRONLY), (view + "/2/name", os.O_RDONLY),
                                (view + f"/{{cid}}/kill", os.O_RDONLY)]:
                try:
                    os.close(os.open(path, flags))
                    errs.append(0)
                except OSError as e:
                    errs.append(e.errno)
            listed = sorted(os.listdir(view))
            table = open(view + "/containers").read()
            fd = os.open(view + f"/{{cid}}/kill", os.O_WRONLY)
            os.write(fd, b"1\\n")
            os.close(fd)
            _, status = os.waitpid(pid, 0)
            return [cid, status, syscalls.container_wait(mine), errs, listed, table]
        """)
        cid, status, waited, errs, listed, table_text = got
        assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
        assert waited == status
        assert errs == [errno.EACCES, errno.EACCES, errno.EACCES]
        assert listed == [str(cid), "by-name", "containers"]  # not root's container 2
        assert [r[:2] for r in parse_table(table_text.encode())] == [(b"<current>", 1),
                                                                     (b"mine", cid)]
        # The third user may not kill the first one's; root may kill anyone's.
        assert vfile(service, 2, "state") == "running\n"
        got = run_as(THIRD_UID, THIRD_UID, f"""
            try:
                os.open({service.view!r} + "/2/kill", os.O_WRONLY)
            except OSError as e:
                return e.errno
        """)
        assert got == errno.EACCES
        # A shell's `echo 1 > kill` (O_TRUNC) works for root.
        subprocess.run(["sh", "-c", f"echo 1 > {service.view}/2/kill"], check=True)
        assert child_result(pid) == -signal.SIGKILL
    finally:
        os.close(w)
        os.close(root_owned)


def test_concurrent_readers_see_whole_tables(service: Any) -> None:
    """Eight readers at once while containers come and go: every table is well formed."""
    program = textwrap.dedent(f"""
        import sys, time, json
        sys.path.insert(0, {str(ROOT)!r})
        from containerfs.view.render import parse_table
        path = {os.path.join(service.view, "containers")!r}
        seen, n, bad = set(), 0, []
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            with open(path, "rb") as f:
                text = f.read()
            n += 1
            try:
                rows = parse_table(text)
                ids = [r[1] for r in rows[1:]]
                assert ids == sorted(set(ids)), ids
                seen.add(len(rows))
            except Exception as e:
                bad.append(repr(e)[:200])
        print(json.dumps([n, sorted(seen), bad[:3], len(bad)]))
    """)
    readers = [subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE)
               for _ in range(8)]
    held: list[int] = []
    deadline = time.monotonic() + 3.0
    made = 0
    while time.monotonic() < deadline:
        fd = syscalls.container_create(f"churn-{made}", CONTAINER_KILL_ON_CLOSE)
        made += 1
        held.append(fd)
        # A container created is visible on the very next read.
        assert f"churn-{made - 1} ".encode() in read_table(service)
        if len(held) > 20:
            os.close(held.pop(0))
    for fd in held:
        os.close(fd)
    results = [json.loads(p.communicate(timeout=30)[0]) for p in readers]
    for n, sizes, bad, nbad in results:
        assert nbad == 0, bad
        assert n > 10 and len(sizes) > 1, (n, sizes)


def test_unmounted_on_stop_and_stale_mount_cleared_after_kill_9(service: Any) -> None:
    cfd = syscalls.container_create("survivor", 0)
    service.stop()
    assert not _mounted(service.view), "SIGTERM left the view mounted"
    again = start_service(Path(service.socket).parent, os.path.basename(service.cgroups.base))
    service.proc, service.log = again.proc, again.log
    assert b"survivor" in read_table(service)
    service.proc.send_signal(signal.SIGKILL)
    service.proc.wait()
    with pytest.raises(OSError) as info:
        os.stat(os.path.join(service.view, "containers"))
    assert info.value.errno == errno.ENOTCONN
    again = start_service(Path(service.socket).parent, os.path.basename(service.cgroups.base))
    service.proc, service.log = again.proc, again.log
    rows = parse_table(read_table(service))
    assert [r[0] for r in rows] == [b"<current>", b"survivor"]
    assert _mount_count(service.view) == 1, "the stale mount is still stacked under the new one"
    os.close(cfd)


def test_poll_reports_nothing_odd(service: Any) -> None:
    """The view's files are plain files to select/poll (always readable)."""
    with open(os.path.join(service.view, "containers"), "rb") as f:
        p = select.poll()
        p.register(f, select.POLLIN)
        assert p.poll(0)[0][1] & select.POLLIN


def _mounted(path: str) -> bool:
    return _mount_count(path) > 0


def _mount_count(path: str) -> int:
    with open("/proc/self/mountinfo") as f:
        return sum(1 for line in f if line.split(" ")[4] == path)
