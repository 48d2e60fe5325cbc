"""A proc mounted into a container before its init exists (issue 13): never the host's.

Each test builds the container, mounts proc from outside before init (the contract's section
4), and looks from inside, as the container's root would, on the real kernel. Every scenario
runs in a program of its own, as root or as an unprivileged owner (`run_as`), so that root's
fast fork path and the owner's user-namespace path are both taken. The containers die with
their handles (KILL_ON_CLOSE) when that program ends, whatever happened, and the `service`
fixture removes whatever is left.
"""

from __future__ import annotations

import errno
import textwrap
from typing import Any

import pytest

from .conftest import OTHER_GID, OTHER_UID, run_as

AS_ROOT = pytest.param((0, 0), id="root")
AS_OWNER = pytest.param((OTHER_UID, OTHER_GID), id="owner")

# Helpers for the programs below (they run as function bodies in a fresh interpreter).
PRELUDE = """
import errno, json, os, select
import syscalls as S
from syscalls import linux
from syscalls import (CONTAINER_KILL_ON_CLOSE, CONTAINER_NEW_EMPTY_FS_NS, CONTAINER_NEW_PID_NS,
                      CONTAINER_NEW_USER_NS, FSCONFIG_SET_CONTAINER, MOVE_MOUNT_T_CONTAINER_ROOT)

def container(pid_ns=True):
    # An empty-fs container rooted on a fresh tmpfs with an empty proc/ directory; root's
    # has no user namespace, an unprivileged owner's must have one.
    flags = (CONTAINER_NEW_EMPTY_FS_NS | CONTAINER_KILL_ON_CLOSE
             | (CONTAINER_NEW_PID_NS if pid_ns else 0)
             | (CONTAINER_NEW_USER_NS if os.getuid() else 0))
    cfd = S.container_create("procsec", flags)
    fs = S.fsopen("tmpfs", S.FSOPEN_CLOEXEC)
    S.fsconfig(fs, FSCONFIG_SET_CONTAINER, None, None, cfd)
    S.fsconfig(fs, S.FSCONFIG_CMD_CREATE)
    root = S.fsmount(fs, S.FSMOUNT_CLOEXEC)
    S.mount.close(fs)
    S.move_mount(root, "", cfd, "/", S.MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_CONTAINER_ROOT)
    S.mount.close(root)
    S.mkdirat(cfd, "proc", 0o555)
    return cfd

def make_proc(cfd, params=(), attrs=0):
    fs = S.fsopen("proc", S.FSOPEN_CLOEXEC)
    S.fsconfig(fs, FSCONFIG_SET_CONTAINER, None, None, cfd)
    for key, value in params:
        S.fsconfig(fs, S.FSCONFIG_SET_STRING, key, value)
    S.fsconfig(fs, S.FSCONFIG_CMD_CREATE)
    mfd = S.fsmount(fs, S.FSMOUNT_CLOEXEC, attrs)
    S.mount.close(fs)
    return mfd

def mount_proc(cfd, mfd, path="proc"):
    S.move_mount(mfd, "", cfd, path, S.MOVE_MOUNT_F_EMPTY_PATH)
    S.mount.close(mfd)

def listing(cfd, path="proc"):
    # What the owner sees there from outside, through the handle.
    fd = S.openat(cfd, path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return sorted(os.listdir(fd))
    finally:
        os.close(fd)

def mounts_at(path="/proc"):
    # The mounts at `path` in our own mount namespace, bottom first.
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ")
            fields, (fstype, source, superopts) = left.split(), right.split()
            if fields[4] == path:
                out.append({"id": int(fields[0]), "fstype": fstype, "source": source,
                            "opts": fields[5], "super": superopts})
    return out

def pids(path="/proc"):
    return sorted(int(p) for p in os.listdir(path) if p.isdigit())

def spawn(cfd, fn, hold=False):
    # fork_into_container; the child sends back fn()'s JSON (one line). With hold, it then
    # stays until released (an init that must outlive the members). Returns a handle.
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = S.fork_into_container(cfd)
    if pid == 0:
        try:
            os.close(r)
            os.close(go_w)
            try:
                out = fn()
            except OSError as e:
                out = {"failed": e.errno, "message": str(e)}
            os.write(w, json.dumps(out).encode() + b"\\n")
            if hold:
                os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(w)
    os.close(go_r)
    return pid, r, go_w

def receive(child):
    pid, r, _ = child
    poller = select.poll()
    poller.register(r, select.POLLIN)
    data = b""
    while not data.endswith(b"\\n"):
        if not poller.poll(10000):
            os.kill(pid, 9)
            raise TimeoutError(f"process {pid} in the container sent nothing")
        chunk = os.read(r, 65536)
        if not chunk:
            _, status = os.waitpid(pid, 0)
            raise EOFError(f"process {pid} in the container ended with {status:#x} "
                           "before it answered")
        data += chunk
    return json.loads(data)

def release(child):
    pid, r, go_w = child
    os.close(go_w)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)

def init_view():
    return {"pid": os.getpid(), "uid": os.getuid(), "pids": pids(),
            "self": os.readlink("/proc/self"), "mounts": mounts_at()}
"""


def scenario(ids: tuple[int, int], body: str) -> Any:
    """Run PRELUDE + `body` as uid/gid `ids`; return what the body returns."""
    return run_as(ids[0], ids[1], PRELUDE + textwrap.dedent(body), timeout=60)


def only_proc(mounts: list[dict[str, Any]]) -> dict[str, Any]:
    """The one mount at /proc, which must be a proc (not a placeholder, not two stacked)."""
    assert len(mounts) == 1, f"expected exactly one mount at /proc, got {mounts}"
    assert mounts[0]["fstype"] == "proc", mounts
    return mounts[0]


# ---- the attack: unmount the container's /proc and look under it -------------------------

@pytest.mark.parametrize("ids", [AS_ROOT, AS_OWNER])
def test_umount_proc_inside_uncovers_no_host_proc(service: Any, ids: tuple[int, int]) -> None:
    """Before init, the proc mounted from outside is an empty placeholder (never the host's
    proc); once init runs, exactly one mount sits at /proc, a proc of the container's PID
    namespace; its root unmounting it finds the empty directory of the container's root."""
    got = scenario(ids, """
        cfd = container()
        mount_proc(cfd, make_proc(cfd))
        before_init = listing(cfd)
        init = spawn(cfd, init_view, hold=True)
        init_saw = receive(init)

        def attack():
            mounts = mounts_at()
            linux.umount2("/proc", 0)
            under = sorted(os.listdir("/proc"))
            try:
                linux.umount2("/proc", linux.MNT_DETACH)
                again = 0
            except OSError as e:
                again = e.errno
            return {"uid": os.getuid(), "mounts": mounts, "under": under, "again": again}
        member = spawn(cfd, attack)
        attacker = receive(member)
        release(member)
        status = release(init)
        os.close(cfd)
        return {"before_init": before_init, "init": init_saw, "attacker": attacker,
                "status": status}
    """)
    # Before init: not a proc of any PID namespace (the host's would list its processes).
    assert got["before_init"] == []
    init = got["init"]
    assert init["pid"] == 1 and init["uid"] == 0 and init["self"] == "1"
    assert init["pids"] == [1], "init's /proc shows another PID namespace"
    mine = only_proc(init["mounts"])
    attacker = got["attacker"]
    assert attacker["uid"] == 0
    assert only_proc(attacker["mounts"])["id"] == mine["id"]
    assert attacker["under"] == [], "unmounting the container's /proc uncovered something"
    assert attacker["again"] == errno.EINVAL, "a second mount was stacked at /proc"
    assert got["status"] == 0


def test_owner_makes_proc_before_init(service: Any) -> None:
    """An unprivileged owner's proc made before init (FSCONFIG_SET_CONTAINER, then
    FSCONFIG_CMD_CREATE) works, and init sees itself as pid 1 in its own /proc."""
    got = scenario((OTHER_UID, OTHER_GID), """
        cfd = container()
        fs = S.fsopen("proc", S.FSOPEN_CLOEXEC)
        S.fsconfig(fs, FSCONFIG_SET_CONTAINER, None, None, cfd)
        try:
            S.fsconfig(fs, S.FSCONFIG_CMD_CREATE)
            created = 0
        except OSError as e:
            created = e.errno
        if created:
            return {"created": created}
        mount_proc(cfd, S.fsmount(fs, S.FSMOUNT_CLOEXEC))
        S.mount.close(fs)
        init = spawn(cfd, lambda: {**init_view(), "status": open("/proc/1/status").read()})
        saw = receive(init)
        status = release(init)
        os.close(cfd)
        return {"created": created, "init": saw, "status": status}
    """)
    assert got["created"] == 0, f"FSCONFIG_CMD_CREATE: {errno.errorcode[got['created']]}"
    init = got["init"]
    assert (init["pid"], init["uid"], init["pids"], init["self"]) == (1, 0, [1], "1")
    only_proc(init["mounts"])
    assert "\nUid:\t0\t0\t0\t0\n" in init["status"]
    assert got["status"] == 0


# ---- timing: members, and a proc attached once init exists --------------------------------

@pytest.mark.parametrize("ids", [AS_ROOT, AS_OWNER])
def test_member_forked_at_once_finds_init_proc(service: Any, ids: tuple[int, int]) -> None:
    """A member forked as soon as fork_into_container has returned init's pid finds init's
    procs in place (not placeholders) and mounts nothing of its own. Many procs, so that
    init's setup takes longer than a fork: fork_into_container returns once they are in place."""
    got = scenario(ids, """
        cfd = container()
        extra = [f"proc{i}" for i in range(24)]
        for path in extra:
            S.mkdirat(cfd, path, 0o555)
            mount_proc(cfd, make_proc(cfd), path)
        mount_proc(cfd, make_proc(cfd))
        init = spawn(cfd, init_view, hold=True)

        def member_view():
            return {"pid": os.getpid(), "pids": pids(), "mounts": mounts_at(),
                    "extra": [[m["fstype"] for m in mounts_at("/" + p)] for p in extra]}
        member = spawn(cfd, member_view)
        member_saw = receive(member)
        init_saw = receive(init)
        release(member)
        release(init)
        os.close(cfd)
        return {"init": init_saw, "member": member_saw}
    """)
    member, init = got["member"], got["init"]
    assert "failed" not in member, member
    assert member["pid"] != 1 and member["pids"] == [1, member["pid"]]
    assert member["extra"] == [["proc"]] * 24
    assert member["mounts"] == init["mounts"], "the member saw another mount at /proc"
    only_proc(member["mounts"])


@pytest.mark.parametrize("ids", [AS_ROOT, AS_OWNER])
def test_proc_made_before_init_mounted_after(service: Any, ids: tuple[int, int]) -> None:
    """A proc made before init but attached after init started (its PID namespace born in
    between) is a proc of that namespace, not a placeholder left for an init long gone."""
    got = scenario(ids, """
        cfd = container()
        early = make_proc(cfd)
        init = spawn(cfd, lambda: {"pid": os.getpid()}, hold=True)
        receive(init)
        mount_proc(cfd, early)
        outside = listing(cfd)
        member = spawn(cfd, lambda: {"pid": os.getpid(), "pids": pids(),
                                     "mounts": mounts_at()})
        member_saw = receive(member)
        release(member)
        release(init)
        os.close(cfd)
        return {"outside": outside, "member": member_saw}
    """)
    assert [p for p in got["outside"] if p.isdigit()] == ["1"]
    member = got["member"]
    assert member["pids"] == [1, member["pid"]]
    only_proc(member["mounts"])


def test_two_procs_at_one_path_give_one_proc(service: Any) -> None:
    """Two procs mounted at one path before init (one through a dup of its mount fd, one by
    another spelling of the path) leave one proc there, and no placeholder under it."""
    got = scenario((0, 0), """
        cfd = container()
        first = make_proc(cfd)
        again = os.dup(first)
        S.mount.close(first)
        mount_proc(cfd, again)
        mount_proc(cfd, make_proc(cfd), "./proc/")
        init = spawn(cfd, init_view)
        saw = receive(init)
        release(init)
        os.close(cfd)
        return saw
    """)
    assert got["pids"] == [1]
    only_proc(got["mounts"])


# ---- what the caller asked of its proc is kept --------------------------------------------

def test_parameters_and_attributes_survive(service: Any) -> None:
    """fsconfig parameters and fsmount attributes given to a proc before init are those of
    the proc init mounts; bad ones fail at once, with the kernel's errno, and change nothing."""
    got = scenario((0, 0), """
        cfd = container()
        fs = S.fsopen("proc", S.FSOPEN_CLOEXEC)
        S.fsconfig(fs, FSCONFIG_SET_CONTAINER, None, None, cfd)
        errs = {}
        for cmd, key, value in [(S.FSCONFIG_SET_STRING, "hidepid", "nonsense"),
                                (S.FSCONFIG_SET_STRING, "no-such-option", "1"),
                                (S.FSCONFIG_SET_STRING, "pidns", "/proc/1/ns/pid")]:
            try:
                S.fsconfig(fs, cmd, key, value)
                errs[key] = 0
            except OSError as e:
                errs[key] = e.errno
        S.fsconfig(fs, S.FSCONFIG_SET_STRING, "hidepid", "invisible")
        S.fsconfig(fs, S.FSCONFIG_SET_STRING, "subset", "pid")
        S.fsconfig(fs, S.FSCONFIG_CMD_CREATE)
        try:
            S.fsconfig(fs, S.FSCONFIG_SET_STRING, "hidepid", "off")  # too late, as for any fs
            errs["after_create"] = 0
        except OSError as e:
            errs["after_create"] = e.errno
        attrs = 0x1 | 0x2 | 0x4 | 0x8  # MOUNT_ATTR_RDONLY | NOSUID | NODEV | NOEXEC
        mount_proc(cfd, S.fsmount(fs, S.FSMOUNT_CLOEXEC, attrs))
        S.mount.close(fs)
        init = spawn(cfd, lambda: {**init_view(), "sys": os.path.exists("/proc/sys")})
        saw = receive(init)
        release(init)
        os.close(cfd)
        return {"errs": errs, "init": saw}
    """)
    assert got["errs"] == {"hidepid": errno.EINVAL, "no-such-option": errno.EINVAL,
                           "pidns": errno.EINVAL, "after_create": errno.EBUSY}
    init = got["init"]
    mine = only_proc(init["mounts"])
    assert set(mine["opts"].split(",")) >= {"ro", "nosuid", "nodev", "noexec"}
    assert set(mine["super"].split(",")) >= {"hidepid=invisible", "subset=pid"}
    assert init["pids"] == [1] and init["sys"] is False  # subset=pid: no /proc/sys


@pytest.mark.parametrize("ids", [AS_ROOT, AS_OWNER])
def test_callers_fd_never_makes_another_proc(service: Any, ids: tuple[int, int]) -> None:
    """The fd a caller holds for a proc made before init is never a proc context of another
    PID namespace, even used with raw system calls: what it makes is the empty placeholder.
    FSCONFIG_CMD_CREATE_EXCL through syscalls makes the placeholder as CMD_CREATE does."""
    got = scenario(ids, """
        cfd = container()
        fs = S.fsopen("proc", S.FSOPEN_CLOEXEC)
        S.fsconfig(fs, FSCONFIG_SET_CONTAINER, None, None, cfd)
        linux.fsconfig(fs, 8, None, None, 0)  # FSCONFIG_CMD_CREATE_EXCL, bypassing syscalls
        raw = S.fsmount(fs, S.FSMOUNT_CLOEXEC)
        d = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=raw)
        raw_listing = sorted(os.listdir(d))
        os.close(d)
        S.mount.close(raw)
        S.mount.close(fs)
        fs = S.fsopen("proc", S.FSOPEN_CLOEXEC)
        S.fsconfig(fs, FSCONFIG_SET_CONTAINER, None, None, cfd)
        S.fsconfig(fs, 8)
        mount_proc(cfd, S.fsmount(fs, S.FSMOUNT_CLOEXEC))
        S.mount.close(fs)
        init = spawn(cfd, init_view)
        saw = receive(init)
        release(init)
        os.close(cfd)
        return {"raw": raw_listing, "init": saw}
    """)
    assert got["raw"] == []
    assert got["init"]["pids"] == [1]
    only_proc(got["init"]["mounts"])


def test_pending_proc_goes_only_into_its_container(service: Any, tmp_path: Any) -> None:
    """A proc waiting for container A's PID namespace cannot be mounted elsewhere (another
    container, a host path): EINVAL, and nothing is mounted."""
    target = tmp_path / "target"
    target.mkdir()
    got = scenario((0, 0), f"""
        a, b = container(), container()
        mfd = make_proc(a)
        errs = []
        for to_dfd, path in [(b, "proc"), (S.AT_FDCWD, {str(target)!r})]:
            try:
                S.move_mount(mfd, "", to_dfd, path, S.MOVE_MOUNT_F_EMPTY_PATH)
                errs.append(0)
            except OSError as e:
                errs.append(e.errno)
        mount_proc(a, mfd)
        init = spawn(a, init_view)
        saw = receive(init)
        release(init)
        return {{"errs": errs, "b": listing(b), "a_init": saw,
                 "host": [m for m in open("/proc/self/mountinfo")
                          if m.split()[4] == {str(target)!r}]}}
    """)
    assert got["errs"] == [errno.EINVAL, errno.EINVAL]
    assert got["b"] == [] and got["host"] == []
    assert got["a_init"]["pids"] == [1]
    only_proc(got["a_init"]["mounts"])


# ---- containers without a PID namespace of their own -------------------------------------

def test_no_pid_ns_root_gets_its_creators_proc(service: Any) -> None:
    """Without NEW_PID_NS the container's PID namespace is its creator's, known from the
    start: the proc is that one at once (no placeholder), and the only mount there."""
    got = scenario((0, 0), """
        cfd = container(pid_ns=False)
        mount_proc(cfd, make_proc(cfd))
        outside = listing(cfd)
        init = spawn(cfd, lambda: {"pid": os.getpid(), "pids": pids(), "mounts": mounts_at()})
        saw = receive(init)
        release(init)
        os.close(cfd)
        return {"me": os.getpid(), "outside": outside, "init": saw}
    """)
    assert str(got["me"]) in got["outside"]
    init = got["init"]
    assert init["pid"] in init["pids"] and got["me"] in init["pids"]
    only_proc(init["mounts"])


def test_no_pid_ns_owner_may_not_mount_the_hosts_proc(service: Any) -> None:
    """An unprivileged owner's container without NEW_PID_NS is in the host's PID namespace,
    whose proc the owner may not mount (the kernel's rule): EPERM, and the fd is unchanged."""
    got = scenario((OTHER_UID, OTHER_GID), """
        cfd = container(pid_ns=False)
        fs = S.fsopen("proc", S.FSOPEN_CLOEXEC)
        try:
            S.fsconfig(fs, FSCONFIG_SET_CONTAINER, None, None, cfd)
            err = 0
        except OSError as e:
            err = e.errno
        return {"err": err, "outside": listing(cfd)}
    """)
    assert got == {"err": errno.EPERM, "outside": []}


def test_root_user_ns_container_makes_proc_before_init(service: Any) -> None:
    """Root's proc for a container with its own user namespace: FSCONFIG_SET_CONTAINER made
    the context in that user namespace but in root's mount namespace, which the kernel
    refuses (EPERM). With a copy of the creator's mounts (NEW_FS_NS) under it, the creator's
    own /proc stays beneath: that copy is what NEW_FS_NS asks for (see docs/limits.md)."""
    got = scenario((0, 0), """
        from syscalls import CONTAINER_NEW_FS_NS
        cfd = S.container_create("x", CONTAINER_NEW_FS_NS | CONTAINER_NEW_USER_NS
                                 | CONTAINER_NEW_PID_NS | CONTAINER_KILL_ON_CLOSE)
        copied = len(mounts_at())
        mount_proc(cfd, make_proc(cfd))
        init = spawn(cfd, init_view)
        saw = receive(init)
        release(init)
        os.close(cfd)
        return {"copied": copied, "init": saw}
    """)
    init = got["init"]
    assert (init["pid"], init["uid"], init["pids"], init["self"]) == (1, 0, [1], "1")
    assert len(init["mounts"]) == got["copied"] + 1  # one proc added, no placeholder left
    assert init["mounts"][-1]["fstype"] == "proc" and init["mounts"][-1]["source"] == "none"


def test_service_checks_what_init_will_be_given(service: Any) -> None:
    """The service checks the parameters and attributes a placeholder carries before it
    mounts anything: init must never be handed something it cannot apply."""
    got = scenario((0, 0), """
        from syscalls import protocol
        from syscalls.client import call
        cfd = container()
        mfd = make_proc(cfd)
        errs = []
        for params, attrs in [("not json", 0), ('[[1, "pidns", "/proc/1/ns/pid"]]', 0),
                              ('[[0, "ro", "x"]]', 0), ('[[true, "hidepid", "2"]]', 0),
                              ('[[5, "hidepid", "2"]]', 0), ("[]", 0x100000)]:
            try:
                call(protocol.MountAt(path="proc", proc=1, attrs=attrs, params=params),
                     [cfd, mfd])
                errs.append(0)
            except OSError as e:
                errs.append(e.errno)
        on = [linux.mount_id(S.openat(cfd, path, os.O_PATH)) for path in (".", "proc")]
        return {"errs": errs, "same_mount": on[0] == on[1]}
    """)
    assert got["errs"] == [errno.EINVAL] * 6
    assert got["same_mount"], "something was mounted at proc"
