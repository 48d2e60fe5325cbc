"""Root's first fork into the container it created enters what container_create said it
would (the plan) while its Fork request travels: these check that the service's word still
decides, and that the plan costs the caller nothing it can see."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

import pytest

import syscalls
from containerfs.api import mount_proc
from containerfs.cgroupfs import detect_layout
from syscalls import CONTAINER_NEW_FS_NS, CONTAINER_NEW_NET_NS, CONTAINER_NEW_PID_NS, client, protocol
from syscalls import replies
from syscalls.container import plans as kept_plans

from .conftest import child_result, hung_up, in_container

FLAGS = CONTAINER_NEW_PID_NS | CONTAINER_NEW_FS_NS | CONTAINER_NEW_NET_NS


def _children() -> set[int]:
    out: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            out.update(int(p) for p in f.read().split())
    return out


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def test_creator_fork_after_another_made_init_is_a_member(service: Any) -> None:
    cfd = syscalls.container_create("late", FLAGS)
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    helper = os.fork()
    if helper == 0:  # another process, holding the handle, forks first: its child is init
        code = 1
        try:
            os.close(r)
            os.close(go_w)
            init = syscalls.fork_into_container(cfd)
            if init == 0:
                os.read(go_r, 1)  # live until told
                os._exit(0)
            os.write(w, str(init).encode())
            code = 0 if child_result(init) == 0 else 2
        finally:
            os._exit(code)
    os.close(w)
    os.close(go_r)
    try:
        init = int(os.read(r, 16) or 0)
        assert init > 0, "the helper made no init"
        member, got = in_container(cfd, lambda: {"pid": os.getpid()})
        assert child_result(member) == 0
        assert got["pid"] not in (0, 1), "the creator's first fork made a second init"
        status = syscalls.container_status(cfd)
        assert status["init_pid"] == init and status["state"] == "running"
    finally:
        os.close(r)
        os.close(go_w)
        assert child_result(helper) == 0
    assert syscalls.container_wait(cfd) == 0
    os.close(cfd)


def test_creator_fork_into_killed_container_is_ecanceled_and_makes_nothing(
        service: Any) -> None:
    cfd = syscalls.container_create("killed", FLAGS)
    syscalls.container_kill(cfd)
    assert hung_up(cfd, 5)
    before = _children()
    with pytest.raises(OSError) as e:
        syscalls.fork_into_container(cfd)
    assert e.value.errno == errno.ECANCELED
    assert _children() == before, "a process was made for a refused fork"
    os.close(cfd)


def test_create_fork_close_leaves_no_fd(service: Any) -> None:
    syscalls.container_create("warm", FLAGS)  # any plan of an earlier test is let go
    before = _open_fds()
    cfd = syscalls.container_create("fds", FLAGS)
    pid, got = in_container(cfd, lambda: {"pid": os.getpid()})
    assert child_result(pid) == 0 and got["pid"] == 1
    assert syscalls.container_wait(cfd) == 0
    os.close(cfd)
    leftover = _open_fds() - before
    assert not leftover, f"fds left open: {[os.readlink(f'/proc/self/fd/{fd}') for fd in leftover]}"


def test_plan_fds_closed_and_reused_by_the_caller(service: Any) -> None:
    """A caller that closes every fd it does not know of (and opens others under those
    numbers) still forks right: the plan is checked before it is used."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        code = 1
        try:
            cfd = syscalls.container_create("closed", FLAGS)
            keep = {r, w, cfd, 0, 1, 2}
            for fd in _open_fds() - keep:
                try:
                    os.close(fd)
                except OSError:
                    pass
            decoys = [os.open("/", os.O_RDONLY) for _ in range(16)]
            inner, got = in_container(cfd, lambda: {"pid": os.getpid()})
            code = 0 if child_result(inner) == 0 and got["pid"] == 1 else 2
            for fd in decoys:
                os.fstat(fd)  # none of them was closed for the caller
        finally:
            os._exit(code)
    os.close(r)
    os.close(w)
    assert child_result(child) == 0


def test_signal_while_the_service_keeps_the_planned_fork_waiting(service: Any) -> None:
    """The planned fork waits for its reply with signals blocked only briefly: a signal
    whose handler raises during a long wait (another fork of init under way) interrupts it,
    and no process is made."""
    cfd = syscalls.container_create("waiting", FLAGS)
    r, w = os.pipe()
    helper = os.fork()
    if helper == 0:  # another fork of init, begun and given up 3 s later, unreported
        try:
            os.close(r)
            other = client.Connection()
            _reply, fds = other.call(protocol.Fork(), [cfd])
            os.write(w, b"1")
            time.sleep(3)
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.close(r)

    class Alarm(Exception):
        pass

    def on_alarm(_signum: int, _frame: Any) -> None:
        raise Alarm()

    old = signal.signal(signal.SIGALRM, on_alarm)
    before = _children()
    t = time.monotonic()
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(Alarm):
            syscalls.fork_into_container(cfd)
        waited = time.monotonic() - t
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert waited < 2, f"the signal waited {waited:.2f} s for the reply"
    assert _children() == before, "a process was made for an interrupted fork"
    assert child_result(helper) == 0  # the other fork gives up: the container is as it was
    pid, got = in_container(cfd, lambda: {"pid": os.getpid()})
    assert child_result(pid) == 0 and got["pid"] == 1
    assert syscalls.container_wait(cfd) == 0
    os.close(cfd)


def test_a_chrooted_creators_fork_stays_in_its_root(service: Any) -> None:
    """A root creator chrooted into a bind of / makes a container with a copy of its mount
    namespace: a process forked in stands in the copy of that bind, not at the copy's own
    root, though both show the same inode (a marker mount under the bind tells them apart)."""
    import json
    import tempfile
    from syscalls import linux
    if os.path.ismount("/mnt"):
        pytest.skip("/mnt is a mount point on this host: it cannot serve as the marker")
    where = tempfile.mkdtemp(prefix="cfs-chroot-")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        out: Any = None
        try:
            os.close(r)
            linux.unshare(linux.CLONE_NEWNS)  # our binds stay ours
            linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
            tree = syscalls.open_tree(syscalls.AT_FDCWD, "/", syscalls.OPEN_TREE_CLONE
                                      | syscalls.OPEN_TREE_CLOEXEC | linux.AT_RECURSIVE)
            syscalls.move_mount(tree, "", syscalls.AT_FDCWD, where,
                                syscalls.MOVE_MOUNT_F_EMPTY_PATH)
            fs = syscalls.fsopen("tmpfs", syscalls.FSOPEN_CLOEXEC)
            syscalls.fsconfig(fs, syscalls.FSCONFIG_CMD_CREATE)
            marker = syscalls.fsmount(fs, syscalls.FSMOUNT_CLOEXEC)
            syscalls.move_mount(marker, "", syscalls.AT_FDCWD, where + "/mnt",
                                syscalls.MOVE_MOUNT_F_EMPTY_PATH)
            os.chroot(where)
            os.chdir("/")
            cfd = syscalls.container_create("chrooted", CONTAINER_NEW_FS_NS
                                            | syscalls.CONTAINER_KILL_ON_CLOSE)
            child = syscalls.fork_into_container(cfd)
            if child == 0:
                os._exit(10 if os.path.ismount("/mnt") else 20)
            out = [os.path.ismount("/mnt"), child_result(child)]
        except BaseException as e:  # noqa: BLE001 - reported to the test
            out = repr(e)
        finally:
            os.write(w, json.dumps(out).encode())
            os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r) as f:
            got = json.loads(f.read())
        assert child_result(pid) == 0
        assert got == [True, 10], got  # the creator and its child both see the marker
    finally:
        os.rmdir(where)


def test_a_process_reported_after_its_container_died_is_killed(service: Any) -> None:
    """A member reported after its container died (one that joined the group after the
    kill, as a spawned process joins by a write, or one the kill could not end at once) is
    killed and its report refused with ECANCELED: a dead container has no living member.
    Here the member survives the kill frozen by a v1 freezer of the test's own."""
    import signal as _signal
    freezer = "/sys/fs/cgroup/freezer"
    if not os.path.isdir(freezer):
        pytest.skip(f"no v1 freezer hierarchy at {freezer}: nothing can outlive a kill")
    ice = os.path.join(freezer, f"cfs-test-ice-{os.getpid()}")
    cfd = syscalls.container_create("dying", 0)
    waiting: list[int] = []
    conn = client.Connection()
    fds: list[int] = []
    try:
        init = syscalls.fork_into_container(cfd)
        if init == 0:
            _signal.pause()
            os._exit(0)
        waiting.append(init)
        reply, fds = conn.call(protocol.Fork(), [cfd])
        assert reply.role == "member"
        late = os.fork()
        if late == 0:
            _signal.pause()
            os._exit(0)
        waiting.append(late)
        procs = os.open("cgroup.procs", os.O_WRONLY | os.O_CLOEXEC,
                        dir_fd=fds[reply.fds.index("cgroup")])
        try:
            os.write(procs, str(late).encode())  # in the container's group, as it joins
        finally:
            os.close(procs)
        os.mkdir(ice)
        with open(os.path.join(ice, "cgroup.procs"), "w") as f:
            f.write(str(late))
        with open(os.path.join(ice, "freezer.state"), "w") as f:
            f.write("FROZEN")
        os.kill(init, _signal.SIGKILL)  # init dies, the container with it; late stays
        assert hung_up(cfd, 10)
        pidfd = os.pidfd_open(late)
        try:
            with pytest.raises(OSError) as e:
                conn.call(protocol.Started(pid=late), [pidfd])
            assert e.value.errno == errno.ECANCELED
        finally:
            os.close(pidfd)
    finally:
        conn.close()
        for fd in fds:
            os.close(fd)
        if os.path.isdir(ice):
            with open(os.path.join(ice, "freezer.state"), "w") as f:
                f.write("THAWED")
        for pid in waiting:
            try:
                os.kill(pid, _signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
        if os.path.isdir(ice):
            os.rmdir(ice)
        os.close(cfd)


def _create_with_plan(name: str) -> tuple[client.Connection, int, list[int], list[str]]:
    """container_create by hand on a connection of our own, asking for a plan: (the
    connection, the handle, the plan's fds, their names)."""
    conn = client.Connection()
    reply, fds = conn.call(protocol.Create(name=name, flags=FLAGS, plan=1))
    assert reply.plan is not None and len(fds) == 1 + len(reply.plan.fds)
    return conn, fds[0], fds[1:], reply.plan.fds


def test_a_plan_that_holds_is_confirmed_without_fds(service: Any) -> None:
    """Fork(planned) on the create's connection: nothing changed since, so the service
    answers "as planned" and sends no fds (the caller enters the plan's)."""
    conn, cfd, plan_fds, _names = _create_with_plan("planned")
    try:
        reply, fds = conn.call(protocol.Fork(keep=1, planned=1), [cfd])
        assert reply.as_planned and fds == [] and reply.role == "init"
        conn.send(protocol.ForkFailed(errno=errno.EAGAIN))  # nothing made: back to created
        time.sleep(0.1)
        assert syscalls.container_status(cfd)["state"] == "created"
    finally:
        for fd in plan_fds + [cfd]:
            os.close(fd)
        conn.close()


def _cpu_in_v1() -> bool:
    """Whether this host's cpu controller is a v1 hierarchy (a hybrid host: a first cpu
    limit then makes a v1 group the fork joins)."""
    layout = detect_layout()
    return "cpu" not in layout.v2_controllers and any("cpu" in h.controllers
                                                      for h in layout.v1)


@pytest.mark.parametrize("change", ["caps", "seccomp", "kill", "cpu limit"])
def test_a_plan_gone_stale_is_never_confirmed(service: Any, change: str) -> None:
    """Whatever changes between create and the fork (confinement set from elsewhere, a
    kill, a first cpu limit) is in the grant, or the error comes: never "as planned" with a
    stale plan (a process would run unconfined). Confinement changes no fd of the plan: the
    grant then says "the plan's fds" (plan_fds, none sent) with the new confinement; a cpu
    limit adds a group to join: a full grant, fds and all."""
    conn, cfd, plan_fds, plan_names = _create_with_plan("stale")
    try:
        if change == "caps":
            syscalls.container_set_caps(cfd, 1 << 0)
        elif change == "seccomp":
            syscalls.container_set_seccomp(cfd, '{"defaultAction": "SCMP_ACT_ALLOW"}')
        elif change == "cpu limit":
            syscalls.container_set_limit(cfd, "cpu.max", "50000 100000")
        else:
            syscalls.container_kill(cfd)
            assert hung_up(cfd, 5)
        if change == "kill":
            with pytest.raises(OSError) as e:
                conn.call(protocol.Fork(keep=1, planned=1), [cfd])
            assert e.value.errno == errno.ECANCELED
            return
        reply, fds = conn.call(protocol.Fork(keep=1, planned=1), [cfd])
        try:
            assert not reply.as_planned
            if change == "cpu limit" and _cpu_in_v1():
                assert not reply.plan_fds and len(fds) == len(reply.fds) > len(plan_names)
                assert reply.fds.count("cgroup.v1") > plan_names.count("cgroup.v1")
            elif change == "cpu limit":  # (cgroup2 carries cpu: the group is the same one)
                assert reply.plan_fds and fds == [] and reply.fds == plan_names
            else:
                assert reply.plan_fds and fds == [] and reply.fds == plan_names
                if change == "caps":
                    assert reply.caps == 1
                else:
                    assert reply.seccomp
        finally:
            for fd in fds:
                os.close(fd)
        conn.send(protocol.ForkFailed(errno=errno.EAGAIN))
    finally:
        for fd in plan_fds + [cfd]:
            os.close(fd)
        conn.close()


@pytest.fixture
def grants(monkeypatch: Any) -> list[Any]:
    """Every ForkGrant this process receives from now on."""
    seen: list[Any] = []
    receive = client.Connection.receive

    def recording(self: client.Connection, cls: Any) -> Any:
        got = receive(self, cls)
        if cls is replies.ForkGrant:
            seen.append(got[0])
        return got
    monkeypatch.setattr(client.Connection, "receive", recording)
    return seen


def _plan_kept() -> bool:
    """Whether this process kept the create's plan (single-threaded root): its spawn is
    then answered with the plan's fds and the new reply (plan_fds), not a full grant."""
    if kept_plans.plan is None:
        print("no plan kept here (threads running): the full grant was taken")
    return kept_plans.plan is not None


def _spawned_output(cfd: int, argv: list[str]) -> bytes:
    """What `argv`, spawned into the container by container_spawn, wrote to its fd 3 (it
    exited 0)."""
    r, w = os.pipe()
    try:
        pid = syscalls.container_spawn(cfd, argv[0], argv,
                                       file_actions=[(os.POSIX_SPAWN_DUP2, w, 3)], pass_fds=[3])
        os.close(w)
        w = -1
        assert child_result(pid) == 0
        return os.read(r, 100)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_container_spawn_after_confinement_set_is_confined(service: Any,
                                                          grants: list[Any]) -> None:
    """The compiled spawn path, whose plan came with create: capabilities set after create
    (the plan is then stale) confine the process it makes."""
    cfd = syscalls.container_create("spawned", FLAGS)
    try:
        syscalls.container_set_caps(cfd, 1 << 0)
        kept = _plan_kept()
        out = _spawned_output(cfd, ["/bin/sh", "-c", "grep CapEff /proc/self/status >&3"])
        assert int(out.split()[1], 16) == 1
        assert [g.plan_fds for g in grants] == [True] or not kept
    finally:
        os.close(cfd)


def test_container_spawn_after_seccomp_set_is_filtered(service: Any, grants: list[Any]) -> None:
    """As above, for a seccomp profile set after create: the spawned process runs under it
    (its mkdir refused with the profile's errno)."""
    cfd = syscalls.container_create("spawned", FLAGS)
    where = tempfile.mkdtemp(prefix="cfs-seccomp-")  # (seen inside: a copy of our mounts)
    try:
        syscalls.container_set_seccomp(cfd, json.dumps({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO",
                          "errnoRet": errno.EROFS}]}))
        kept = _plan_kept()
        out = _spawned_output(cfd, [sys.executable, "-c", "import os, sys\ntry:\n"
                                    " os.mkdir(sys.argv[1])\nexcept OSError as e:\n"
                                    " os.write(3, str(e.errno).encode())",
                                    os.path.join(where, "x")])
        assert int(out or b"0") == errno.EROFS
        assert [g.plan_fds for g in grants] == [True] or not kept
    finally:
        os.close(cfd)
        shutil.rmtree(where, ignore_errors=True)


def test_container_spawn_after_a_proc_mount_gets_that_proc(service: Any,
                                                          grants: list[Any]) -> None:
    """A proc mounted before init (a placeholder), then container_spawn on the create's
    plan: init puts a proc of its own PID namespace there (it is PID 1 in it)."""
    cfd = syscalls.container_create("spawned", FLAGS)
    try:
        mount_proc(cfd)
        kept = _plan_kept()
        assert _spawned_output(cfd, ["/bin/sh", "-c", "exec readlink /proc/self >&3"]) == b"1\n"
        assert [g.plan_fds for g in grants] == [True] or not kept
    finally:
        os.close(cfd)
