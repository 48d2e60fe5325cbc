"""Groups made only when needed (containerfs.lazygroups) on this hybrid host: a container
without CPU limits has no cpu, cpuacct or cpuset group and its processes join only memory and
pids (and cgroup2); a first cpu.max moves every process in and holds; a fork granted before
the limit ends in the group; nested containers stay inside their parent's; a restarted service
finds the groups again."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

import syscalls
from containerfs.cgroupfs import detect_layout
from containerfs.resources import ResourceGroups
from syscalls import CONTAINER_NEW_PID_NS, linux

from .conftest import child_result, hung_up
from .test_resources import Child, busy, children, groups, kernel  # noqa: F401 - fixtures
from .test_restart import restart


def _probe() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    layout = detect_layout()
    if layout.v2 is None or not any("cpu" in h.controllers for h in layout.v1):
        return "needs a hybrid host (cgroup2 plus a v1 cpu hierarchy)"
    return None


SKIP = _probe()
hybrid = pytest.mark.skipif(SKIP is not None, reason=f"lazy groups: {SKIP}")
pytestmark = hybrid

LIMIT = "20000 100000"


def cgroups_of(pid: int) -> dict[str, str]:
    """{controller (\"\" for cgroup2): the group of `pid`} from /proc/PID/cgroup."""
    out: dict[str, str] = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, names, group = line.rstrip("\n").split(":", 2)
            for name in names.split(",") if names else [""]:
                out[name] = group
    return out


def in_group(pid: int, controller: str, base: str, cid: int) -> bool:
    """Whether `pid` is in container `cid`'s own group of `controller` (base `base`)."""
    return cgroups_of(pid).get(controller, "").endswith(f"/{base}/c{cid}")


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total


def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def start_busy(cfd: int, workers: int) -> int:
    """Fork init into the container: it forks `workers` busy loops and loops itself."""
    init = syscalls.fork_into_container(cfd)
    if init == 0:
        for _ in range(workers):
            if os.fork() == 0:
                busy()
        busy()
    return init


def test_no_limits_no_cpu_groups(service: Any) -> None:
    """A container that sets no CPU limit has no group in the cpu, cpuacct or cpuset
    hierarchies; its processes are in its cgroup2, memory and pids groups only; its CPU
    limits read as the defaults and its usage comes from cgroup2."""
    base = os.path.basename(service.cgroups.base)
    cfd = syscalls.container_create("plain", CONTAINER_NEW_PID_NS)
    try:
        cid = syscalls.container_status(cfd)["id"]
        r, w = os.pipe()
        init = syscalls.fork_into_container(cfd)
        if init == 0:  # (it joins its v1 groups itself, before it runs this)
            os.write(w, b"x")
            time.sleep(60)
            os._exit(0)
        os.close(w)
        os.read(r, 1)
        os.close(r)
        groups = cgroups_of(init)
        for ctl in ("", "memory", "pids"):
            assert groups[ctl].endswith(f"/{base}/c{cid}"), (ctl, groups)
        for ctl in ("cpu", "cpuacct", "cpuset"):
            assert f"/{base}" not in groups.get(ctl, ""), (ctl, groups)
        for h in detect_layout().v1:
            if h.controllers & {"cpu", "cpuacct", "cpuset"} and not \
                    h.controllers & {"memory", "pids"}:
                assert not os.path.exists(os.path.join(h.path(h.own), base, f"c{cid}")), h
        assert syscalls.container_get_limit(cfd, "cpu.max") == "max 100000"
        assert syscalls.container_get_limit(cfd, "cpu.weight") == "100"
        assert syscalls.container_get_limit(cfd, "cpuset.cpus") == ""
        assert os.listdir(os.path.join(service.view, str(cid), "limits")) == []
        stats = syscalls.container_stats(cfd)
        assert stats["cpu.nr_throttled"] == 0 and "cpu.usage_usec" in stats
        assert stats["pids.current"] == 1 and stats["memory.current"] > 0
        syscalls.container_kill(cfd)
        assert child_result(init) == -signal.SIGKILL
    finally:
        os.close(cfd)


def test_cpu_max_on_running_container_moves_all(service: Any) -> None:
    """cpu.max set on a running container with several busy processes: every one of them is
    moved into the new cpu group (checked in /proc/PID/cgroup), and together they get about
    20% of a CPU, beside the same four loops unlimited in another container."""
    base = os.path.basename(service.cgroups.base)
    held = syscalls.container_create("held", CONTAINER_NEW_PID_NS)
    free = syscalls.container_create("free", CONTAINER_NEW_PID_NS)
    inits = []
    try:
        cid = syscalls.container_status(held)["id"]
        inits = [start_busy(held, 3), start_busy(free, 3)]
        free_id = syscalls.container_status(free)["id"]
        assert wait_for(lambda: len(service.cgroups.procs(cid)) == 4)
        assert wait_for(lambda: len(service.cgroups.procs(free_id)) == 4)
        pids, others = service.cgroups.procs(cid), service.cgroups.procs(free_id)
        assert not any(in_group(p, "cpu", base, cid) for p in pids)
        syscalls.container_set_limit(held, "cpu.max", LIMIT)
        assert syscalls.container_get_limit(held, "cpu.max") == LIMIT
        for p in pids:
            assert in_group(p, "cpu", base, cid), (p, cgroups_of(p))
            assert not in_group(p, "cpuset", base, cid)  # only what was asked for
        time.sleep(0.2)
        tick = os.sysconf("SC_CLK_TCK")
        t0, h0, f0 = time.monotonic(), cpu_ticks(pids), cpu_ticks(others)
        time.sleep(1.5)
        t1, h1, f1 = time.monotonic(), cpu_ticks(pids), cpu_ticks(others)
        limited, unlimited = (h1 - h0) / tick / (t1 - t0), (f1 - f0) / tick / (t1 - t0)
        print(f"cpu.max {LIMIT} set on 4 running loops: together {limited:.1%}, "
              f"4 unlimited {unlimited:.1%} of a CPU")
        assert 0.05 < limited < 0.35
        assert unlimited > 2 * limited
        assert syscalls.container_stats(held)["cpu.nr_throttled"] > 0
    finally:
        for cfd in (held, free):
            syscalls.container_kill(cfd)
        for init in inits:
            assert child_result(init) == -signal.SIGKILL
        for cfd in (held, free):
            assert hung_up(cfd, 5)
            os.close(cfd)


def test_fork_racing_cpu_max_lands_in_group(service: Any) -> None:
    """A fork granted before the container's first cpu.max, cloned after the limit was set
    and its processes moved: it was not lent the cpu group, and is placed there when it
    reports (a child it forked at once too)."""
    base = os.path.basename(service.cgroups.base)
    cfd = syscalls.container_create("race", CONTAINER_NEW_PID_NS)
    ask_r, ask_w = os.pipe()
    done_r, done_w = os.pipe()
    helper = os.fork()
    if helper == 0:  # sets the limit when asked, from outside the container
        code = 1
        try:
            os.read(ask_r, 1)
            syscalls.container_set_limit(cfd, "cpu.max", LIMIT)
            code = 0
        finally:
            os.write(done_w, bytes([code]))
            os._exit(code)
    real = linux.clone3_fork

    def clone_after_limit(*args: Any) -> Any:
        # The grant was read (without the cpu group); the limit is set before the clone.
        os.write(ask_w, b"x")
        assert os.read(done_r, 1) == b"\0"
        return real(*args)

    pids: list[int] = []
    try:
        cid = syscalls.container_status(cfd)["id"]
        r, w = os.pipe()
        linux.clone3_fork = clone_after_limit  # type: ignore[assignment]
        try:
            init = syscalls.fork_into_container(cfd)
            if init == 0:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                os.write(w, b"x")
                time.sleep(60)
                os._exit(0)
        finally:
            linux.clone3_fork = real  # type: ignore[assignment]
        os.close(w)
        os.read(r, 1)
        os.close(r)
        assert child_result(helper) == 0
        helper = 0
        assert wait_for(lambda: len(service.cgroups.procs(cid)) == 2)
        pids = service.cgroups.procs(cid)
        assert wait_for(lambda: all(in_group(p, "cpu", base, cid) for p in pids)), \
            {p: cgroups_of(p) for p in pids}
        assert syscalls.container_get_limit(cfd, "cpu.max") == LIMIT
        syscalls.container_kill(cfd)
        assert child_result(init) == -signal.SIGKILL
    finally:
        if helper:
            os.kill(helper, signal.SIGKILL)
            os.waitpid(helper, 0)
        for fd in (ask_r, ask_w, done_r, done_w):
            os.close(fd)
        os.close(cfd)


def test_restart_keeps_lazy_groups(service: Any) -> None:
    """After a restart the service knows which lazy groups a container has: the limit reads
    back, a new member joins the cpu group, and the group goes with the container."""
    base = os.path.basename(service.cgroups.base)
    cfd = syscalls.container_create("kept", CONTAINER_NEW_PID_NS)
    try:
        cid = syscalls.container_status(cfd)["id"]
        init = syscalls.fork_into_container(cfd)
        if init == 0:
            time.sleep(60)
            os._exit(0)
        syscalls.container_set_limit(cfd, "cpu.max", LIMIT)
        assert wait_for(lambda: in_group(init, "cpu", base, cid))
        cpu_dir = os.path.join(service.cgroups._v1["cpu"], f"c{cid}")
        assert os.path.isdir(cpu_dir)
        restart(service, hard=True)
        assert syscalls.container_get_limit(cfd, "cpu.max") == LIMIT
        r, w = os.pipe()
        member = syscalls.fork_into_container(cfd)
        if member == 0:
            os.close(r)
            os.write(w, b"x")
            time.sleep(60)
            os._exit(0)
        os.close(w)
        os.read(r, 1)
        os.close(r)
        assert in_group(member, "cpu", base, cid), cgroups_of(member)
        assert in_group(member, "memory", base, cid)
        syscalls.container_kill(cfd)
        # (the member first: init, dying, waits until every process of its PID namespace
        # is reaped, and the member's parent is this process too)
        assert child_result(member) == -signal.SIGKILL
        assert child_result(init) == -signal.SIGKILL
        assert wait_for(lambda: not os.path.exists(cpu_dir))
    finally:
        os.close(cfd)


@kernel
def test_nested_lazy_groups(groups: ResourceGroups,  # noqa: F811 - the fixture
                            children: Callable[..., Child]) -> None:  # noqa: F811
    """A first cpu limit on a nested container makes its parent's group there too (and a
    sibling's), and moves the processes of all three; a container nested later gets the
    group at creation; a container of another tree stays without."""
    groups.create(2)
    groups.create(5, parent=2)
    groups.create(6, parent=2)
    groups.create(9)
    procs = {cid: children(busy) for cid in (2, 5, 6, 9)}
    for cid, child in procs.items():
        groups.place(cid, child.pidfd, child.pid, v2=True)
    cpu = groups._v1["cpu"]
    assert not os.path.exists(os.path.join(cpu, "c2"))
    groups.set_limit(5, "cpu.max", LIMIT)
    for cid, rel in ((2, "c2"), (5, "c2/c5"), (6, "c2/c6")):
        assert cgroups_of(procs[cid].pid)["cpu"].endswith(rel), cid
        assert os.path.isdir(os.path.join(cpu, rel))
    assert groups.get_limit(5, "cpu.max") == LIMIT and groups.get_limit(2, "cpu.max") == \
        "max 100000"
    assert not os.path.exists(os.path.join(cpu, "c9"))
    groups.create(7, parent=5)
    assert os.path.isdir(os.path.join(cpu, "c2/c5/c7"))
    assert len(groups.open_procs(7)) == len(groups.open_procs(9)) + 1
    for fd in groups.open_procs(7) + groups.open_procs(9):
        os.close(fd)
    # The parent has its own group there now: a limit of its own (v1 wants it at least the
    # nested ones').
    groups.set_limit(2, "cpu.max", "40000 100000")
    assert groups.remove(9, timeout=0.05)  # busy still
    groups.kill(2)
    groups.kill(9)
    for child in procs.values():
        child.wait()
    assert groups.remove(2) == [] and not os.path.exists(os.path.join(cpu, "c2"))
    assert groups.remove(9) == []


def test_kill_9_while_a_first_limit_moves_processes_in(service: Any) -> None:
    """A service killed while making a container's first cpu group (after its mkdir, before
    every process was moved in) leaves a group that a restarted service finds: the
    container's processes must end up in it, or a limit set on it later never holds them."""
    from pathlib import Path

    from .conftest import start_service
    base = os.path.basename(service.cgroups.base)
    cfd = syscalls.container_create("half", CONTAINER_NEW_PID_NS)
    try:
        cid = syscalls.container_status(cfd)["id"]
        init = syscalls.fork_into_container(cfd)
        if init == 0:
            time.sleep(60)
            os._exit(0)
        assert wait_for(lambda: in_group(init, "memory", base, cid))
        service.proc.send_signal(signal.SIGKILL)
        service.proc.wait()
        # What the killed service had done of set_limit: the group made, nobody moved yet.
        cpu_dir = os.path.join(service.cgroups._v1["cpu"], f"c{cid}")
        os.mkdir(cpu_dir)
        again = start_service(Path(service.socket).parent, base)
        service.proc, service.log = again.proc, again.log
        syscalls.container_set_limit(cfd, "cpu.max", LIMIT)
        assert syscalls.container_get_limit(cfd, "cpu.max") == LIMIT
        assert wait_for(lambda: in_group(init, "cpu", base, cid)), cgroups_of(init)
        syscalls.container_kill(cfd)
        assert child_result(init) == -signal.SIGKILL
        assert wait_for(lambda: not os.path.exists(cpu_dir))
    finally:
        os.close(cfd)


@kernel
def test_restart_completes_a_tree_left_half_made(groups: ResourceGroups,  # noqa: F811
                                                 children: Callable[..., Child]) -> None:  # noqa: F811
    """A service killed while making a tree's first cpu groups (the parent's made, the
    nested one's not, nobody moved): the next one makes the missing group and moves every
    process in, so a limit on the parent holds the nested container's processes too."""
    groups.create(2)
    groups.create(5, parent=2)
    procs = {cid: children(busy) for cid in (2, 5)}
    for cid, child in procs.items():
        groups.place(cid, child.pidfd, child.pid, v2=True)
    cpu = groups._v1["cpu"]
    os.mkdir(os.path.join(cpu, "c2"))  # what the killed service had done
    assert groups.v2_base is not None
    again = ResourceGroups(os.path.basename(groups.v2_base), layout=groups.layout)
    again.adopt(2, None)
    again.adopt(5, 2)
    again.settle_adopted({2, 5})
    for cid, rel in ((2, "c2"), (5, "c2/c5")):
        assert cgroups_of(procs[cid].pid)["cpu"].endswith(rel), cid
    again.kill(2)
    for child in procs.values():
        child.wait()
    assert again.remove(2) == []


@kernel
def test_complete_of_a_process_reaped_meanwhile_is_esrch(groups: ResourceGroups,  # noqa: F811
                                                         children: Callable[..., Child]  # noqa: F811
                                                         ) -> None:
    """complete() on a process reaped since its report (a fast init whose caller reaps it
    at once) raises ProcessLookupError, which Forks.finish takes as "nothing to limit";
    any other error would undo the record of a process that was made."""
    groups.create(2)
    groups.set_limit(2, "cpu.max", LIMIT)  # the container has its cpu group
    child = children(lambda: None)
    groups.place(2, child.pidfd, child.pid, v2=True)
    pid = child.pid
    child.release()
    child.wait()
    with pytest.raises(ProcessLookupError):
        groups.complete(2, child.pidfd, pid)
    assert groups.remove(2) == []


def test_complete_moves_the_process_and_owes_the_sweep(groups: ResourceGroups,  # noqa: F811
                                                        children: Callable[..., Child]  # noqa: F811
                                                        ) -> None:
    """A process reported into a container whose cpu group was made after its fork was
    granted: complete() moves it at once and says which hierarchy the container is owed a
    sweep in; sweep_owed (in a worker thread, never on the event loop: a sweep may freeze
    the container for 50 ms) moves the others that sit outside, its children say."""
    groups.create(2)
    groups.set_limit(2, "cpu.max", LIMIT)  # the cpu group exists from now on
    assert groups.v2_base is not None
    v2_procs = os.path.join(groups.v2_base, groups._group(2), "cgroup.procs")
    reported, other = children(busy), children(busy)
    for child in (reported, other):  # in the container, as a fork granted before would be
        with open(v2_procs, "w") as f:
            f.write(str(child.pid))
        assert not cgroups_of(child.pid)["cpu"].endswith("/c2")
    owed = groups.complete(2, reported.pidfd, reported.pid)
    assert owed == [groups._v1["cpu"]]
    assert cgroups_of(reported.pid)["cpu"].endswith("/c2")
    assert not cgroups_of(other.pid)["cpu"].endswith("/c2")  # the sweep's, not complete's
    groups.sweep_owed(2, owed)
    assert cgroups_of(other.pid)["cpu"].endswith("/c2")
    assert groups.complete(2, other.pidfd, other.pid) == []  # nothing owed once in
    groups.kill(2)
    for child in (reported, other):
        child.wait()
    assert groups.remove(2) == []
