"""Resource control without the service: containerfs.limits as tables, containerfs.resources on
the real kernel of this host (groups made by the class, real processes put in them), and the
cgroup2 path over a fake cgroupfs tree (no cgroup2 tree with controllers can be made on a
hybrid host). Every test removes its groups in every hierarchy and kills its processes.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from containerfs import limits
from containerfs.cgroupfs import Hierarchy, Layout, detect_layout
from containerfs.resources import MEMBERS, ResourceGroups

M = 1 << 20
_names = itertools.count()


# --- limits.py: pure tables ------------------------------------------------------------------

@pytest.mark.parametrize("name,value,canonical", [
    ("cpu.max", "20000 100000", "20000 100000"),
    ("cpu.max", " max\t100000\n", "max 100000"),
    ("cpu.max", "max", "max"),
    ("cpu.max", "50000", "50000"),
    ("cpu.max", f"{limits.QUOTA_MAX} 1000000", f"{limits.QUOTA_MAX} 1000000"),
    ("cpu.weight", "1", "1"),
    ("cpu.weight", "10000\n", "10000"),
    ("memory.max", "64M", str(64 * M)),
    ("memory.max", "64m", str(64 * M)),
    ("memory.high", "1G", str(1 << 30)),
    ("memory.swap.max", "0", "0"),
    ("memory.swap.max", "12K", "12288"),
    ("memory.max", "max", "max"),
    ("memory.max", str((1 << 63) - 1), str((1 << 63) - 1)),
    ("pids.max", "0", "0"),
    ("pids.max", "4194304", "4194304"),
    ("pids.max", "max", "max"),
    ("cpuset.cpus", "", ""),
    ("cpuset.cpus", "3,1,0-1", "0-1,3"),
    ("cpuset.cpus", "0-7:2/4", "0-1,4-5"),
    ("cpuset.mems", "0", "0"),
])
def test_normalise(name: str, value: str, canonical: str) -> None:
    assert limits.normalise(name, value) == canonical


# Every malformed value and unknown name: EINVAL, with a message that names the limit.
EINVAL_ROWS = [
    ("cpu.maxx", "1"), ("", "1"), ("memory.low", "1M"), ("cpu.max ", "max"),
    ("cpu.max", ""), ("cpu.max", "20000 100000 5"), ("cpu.max", "999 100000"),
    ("cpu.max", "max 999"), ("cpu.max", "max 1000001"), ("cpu.max", "1e5 100000"),
    ("cpu.max", "-1 100000"), ("cpu.max", f"{1 << 44} 100000"), ("cpu.max", "max max"),
    ("cpu.weight", "0"), ("cpu.weight", "10001"), ("cpu.weight", "max"), ("cpu.weight", "1.5"),
    ("cpu.weight", "\u0661"),  # an Arabic-Indic one: str.isdigit() would take it
    ("memory.max", "-1"), ("memory.max", "64X"), ("memory.max", "1.5G"), ("memory.max", "1E"),
    ("memory.max", str(1 << 63)), ("memory.max", ""), ("memory.max", "64 M"),
    ("memory.swap.max", "lots"), ("memory.high", "max1"),
    ("pids.max", "-1"), ("pids.max", "4194305"), ("pids.max", "ten"), ("pids.max", ""),
    ("cpuset.cpus", "0-"), ("cpuset.cpus", "3-1"), ("cpuset.cpus", "a"), ("cpuset.mems", "0,,1"),
    ("cpuset.cpus", "0-70000"), ("cpuset.cpus", "0-7:0/4"), ("cpuset.cpus", "0-7:5/4"),
]


@pytest.mark.parametrize("name,value", EINVAL_ROWS)
def test_normalise_einval(name: str, value: str) -> None:
    with pytest.raises(OSError) as e:
        limits.normalise(name, value)
    assert e.value.errno == errno.EINVAL
    assert repr(name) in str(e.value) or f"{name}:" in str(e.value)


def test_normalise_rejects_non_strings() -> None:
    with pytest.raises(OSError) as e:
        limits.normalise("pids.max", 5)  # type: ignore[arg-type]
    assert e.value.errno == errno.EINVAL


def test_weight_shares_kernel_conversion() -> None:
    assert limits.weight_to_shares(100) == 1024 and limits.shares_to_weight(1024) == 100
    assert limits.weight_to_shares(1) == 10 and limits.weight_to_shares(10000) == 102400
    assert limits.shares_to_weight(2) == 1 and limits.shares_to_weight(262144) == 10000
    for w in range(1, 10001):  # every weight survives the round trip through v1
        assert limits.shares_to_weight(limits.weight_to_shares(w)) == w


UNLIMITED = "9223372036854771712"  # what v1 reads back for -1 with 4 KiB pages
MEM0 = {"memory.limit_in_bytes": UNLIMITED, "memory.memsw.limit_in_bytes": UNLIMITED}
MEM64_SW16 = {"memory.limit_in_bytes": str(64 * M), "memory.memsw.limit_in_bytes": str(80 * M)}
CPU0 = {"cpu.cfs_quota_us": "-1", "cpu.cfs_period_us": "100000"}
CPU20 = {"cpu.cfs_quota_us": "20000", "cpu.cfs_period_us": "100000"}


@pytest.mark.parametrize("name,value,files,writes", [
    ("cpu.max", "20000 100000", CPU0, [("cpu.cfs_quota_us", "20000")]),
    ("cpu.max", "20000", CPU0, [("cpu.cfs_quota_us", "20000")]),
    ("cpu.max", "max", CPU20, [("cpu.cfs_quota_us", "-1")]),
    ("cpu.max", "max 100000", CPU0, []),
    # A new period with a quota set: unlimited first (valid under any parent), then both.
    ("cpu.max", "5000 10000", CPU20, [("cpu.cfs_quota_us", "-1"), ("cpu.cfs_period_us", "10000"),
                                      ("cpu.cfs_quota_us", "5000")]),
    ("cpu.max", "max 10000", CPU20, [("cpu.cfs_quota_us", "-1"),
                                     ("cpu.cfs_period_us", "10000")]),
    ("cpu.weight", "50", {}, [("cpu.shares", "512")]),
    ("pids.max", "max", {}, [("pids.max", "max")]),
    ("cpuset.cpus", "1", {"cpuset.cpus": "0-1", "../cpuset.cpus": "0-1"}, [("cpuset.cpus", "1")]),
    ("cpuset.cpus", "", {"cpuset.cpus": "1", "../cpuset.cpus": "0-1\n"}, [("cpuset.cpus", "0-1")]),
    ("memory.max", str(64 * M), MEM0, [("memory.limit_in_bytes", str(64 * M))]),
    ("memory.max", "max", MEM0, [("memory.limit_in_bytes", "-1")]),
    ("memory.max", str(64 * M), {"memory.limit_in_bytes": UNLIMITED},
     [("memory.limit_in_bytes", str(64 * M))]),
    # memsw = memory + swap, and must stay >= memory at every moment: up memsw-first,
    # down memory-first, keeping swap = 16M.
    ("memory.max", str(128 * M), MEM64_SW16, [("memory.memsw.limit_in_bytes", str(144 * M)),
                                              ("memory.limit_in_bytes", str(128 * M))]),
    ("memory.max", str(32 * M), MEM64_SW16, [("memory.limit_in_bytes", str(32 * M)),
                                             ("memory.memsw.limit_in_bytes", str(48 * M))]),
    ("memory.swap.max", "0", MEM64_SW16, [("memory.memsw.limit_in_bytes", str(64 * M))]),
    ("memory.swap.max", "max", MEM64_SW16, [("memory.memsw.limit_in_bytes", "-1")]),
    ("memory.swap.max", "max", MEM0, [("memory.memsw.limit_in_bytes", "-1")]),
])
def test_to_v1(name: str, value: str, files: dict[str, str],
               writes: list[tuple[str, str]]) -> None:
    assert limits.to_v1(name, value, files) == writes


@pytest.mark.parametrize("name,value,files", [
    ("memory.high", str(64 * M), MEM0),
    ("memory.swap.max", str(16 * M), MEM0),  # no memory.max to add the swap to
    ("memory.swap.max", "0", {"memory.limit_in_bytes": str(64 * M)}),  # no swap accounting
    ("memory.max", "max", MEM64_SW16),  # would leave the swap limit without a base
])
def test_to_v1_eopnotsupp(name: str, value: str, files: dict[str, str]) -> None:
    with pytest.raises(OSError) as e:
        limits.to_v1(name, value, files)
    assert e.value.errno == errno.EOPNOTSUPP and name in str(e.value)


@pytest.mark.parametrize("name,files,value", [
    ("cpu.max", CPU0, "max 100000"),
    ("cpu.max", CPU20, "20000 100000"),
    ("cpu.weight", {"cpu.shares": "1024"}, "100"),
    ("cpu.weight", {"cpu.shares": "2"}, "1"),
    ("memory.max", MEM0, "max"),
    ("memory.max", {"memory.limit_in_bytes": "9223372036854710272"}, "max"),  # 64 KiB pages
    ("memory.max", MEM64_SW16, str(64 * M)),
    ("memory.swap.max", MEM64_SW16, str(16 * M)),
    ("memory.swap.max", MEM0, "max"),
    ("memory.swap.max", {"memory.limit_in_bytes": UNLIMITED,
                         "memory.memsw.limit_in_bytes": str(8 * M)}, str(8 * M)),
    ("pids.max", {"pids.max": "max\n"}, "max"),
    ("cpuset.cpus", {"cpuset.cpus": "0-1\n", "../cpuset.cpus": "0-1\n"}, ""),
    ("cpuset.cpus", {"cpuset.cpus": "1\n", "../cpuset.cpus": "0-1\n"}, "1"),
])
def test_from_v1(name: str, files: dict[str, str], value: str) -> None:
    assert limits.from_v1(name, files) == value


def test_parse_stat() -> None:
    assert limits.parse_stat(limits.V1_STATS["cpu.usage_usec"], "1234567\n") == 1234
    text = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"
    assert limits.parse_stat(limits.V1_STATS["memory.events.oom_kill"], text) == 3
    assert limits.parse_stat(limits.V2_STATS["memory.events.oom_kill"], "low 0\n") is None
    assert set(limits.V1_STATS) <= set(limits.V2_STATS)


# --- the real kernel -------------------------------------------------------------------------

def _probe() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    layout = detect_layout()
    if layout.v2 is None and not layout.v1:
        return "no cgroup hierarchy is mounted"
    return None


SKIP = _probe()
kernel = pytest.mark.skipif(SKIP is not None, reason=f"kernel tests: {SKIP}")
HYBRID = SKIP is None and bool(detect_layout().v1)
hybrid = pytest.mark.skipif(not HYBRID, reason="needs cgroup v1 hierarchies (a hybrid host)")


def _groups(request: pytest.FixtureRequest, **kw: object) -> ResourceGroups:
    """A ResourceGroups with a base name of its own, removed (with its processes) at the end
    in every hierarchy; the teardown fails if anything is left."""
    rg = ResourceGroups(f"restest-{os.getpid()}-{next(_names)}", **kw)  # type: ignore[arg-type]

    def cleanup() -> None:
        left = rg.remove_all()
        assert not left, f"cgroups left behind: {left}"
    request.addfinalizer(cleanup)
    return rg


@pytest.fixture
def groups(request: pytest.FixtureRequest) -> ResourceGroups:
    return _groups(request)


@dataclasses.dataclass
class Child:
    pid: int
    pidfd: int
    go: int  # write end of the pipe the child waits on before it runs

    def release(self) -> None:
        os.write(self.go, b"x")

    def wait(self, timeout: float = 5.0) -> int:
        """Its wait status (reaped), once it has exited; TimeoutError if not in time."""
        if not select.select([self.pidfd], [], [], timeout)[0]:
            raise TimeoutError(f"child {self.pid} still running after {timeout}s")
        _, status = os.waitpid(self.pid, 0)
        self.pid = -1
        return status

    def cpu(self) -> float:
        """Its CPU time in seconds, from /proc/PID/stat (utime + stime)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def children() -> Iterator[Callable[[Callable[[], None]], Child]]:
    """fork(run): a child that waits until released, then calls run() and exits 0 (1 if run
    raised). Every child is killed and reaped at the end."""
    made: list[Child] = []

    def fork(run: Callable[[], None]) -> Child:
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(w)
                os.read(r, 1)
                run()
                code = 0
            finally:
                os._exit(code)
        os.close(r)
        child = Child(pid, os.pidfd_open(pid), w)
        made.append(child)
        return child

    yield fork
    for c in made:
        if c.pid > 0:
            signal.pidfd_send_signal(c.pidfd, signal.SIGKILL)
            os.waitpid(c.pid, 0)
        os.close(c.pidfd)
        os.close(c.go)


def all_groups(groups: ResourceGroups, cid: int) -> None:
    """Make the container's groups in the lazy hierarchies too (cpu, cpuset: made by a first
    limit of theirs, containerfs.lazygroups), by setting their limits to the defaults."""
    used = groups.controllers()
    for name in ("cpu.weight", "cpuset.cpus"):
        if limits.CONTROLLER[name] in used:
            groups.set_limit(cid, name, limits.DEFAULT[name])


def busy() -> None:
    while True:
        pass


def python(code: str) -> Callable[[], None]:
    return lambda: os.execv(sys.executable, [sys.executable, "-S", "-c", code])


def signalled(status: int) -> int | None:
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else None


@kernel
def test_cpu_max_demo(groups: ResourceGroups, children: Callable[..., Child],
                      capsys: pytest.CaptureFixture[str]) -> None:
    """The seeds' demo: cpu.max "20000 100000" holds a busy loop to about 20% of a CPU, next
    to the same loop unlimited, measured from each process's own CPU time."""
    groups.create(2)
    groups.create(3)
    groups.set_limit(2, "cpu.max", "20000 100000")
    assert groups.get_limit(2, "cpu.max") == "20000 100000"
    assert groups.limits(2) == {"cpu.max": "20000 100000"} and groups.limits(3) == {}
    held, free = children(busy), children(busy)
    groups.place(2, held.pidfd, held.pid, v2=True)
    groups.place(3, free.pidfd, free.pid, v2=True)
    held.release()
    free.release()
    time.sleep(0.2)
    t0, h0, f0, u0 = time.monotonic(), held.cpu(), free.cpu(), groups.stats(2)["cpu.usage_usec"]
    time.sleep(1.5)
    t1, h1, f1, s1 = time.monotonic(), held.cpu(), free.cpu(), groups.stats(2)
    limited, unlimited = (h1 - h0) / (t1 - t0), (f1 - f0) / (t1 - t0)
    with capsys.disabled():
        print(f"\ncpu.max 20000 100000: limited {limited:.1%}, unlimited {unlimited:.1%} "
              f"of a CPU over {t1 - t0:.2f} s")
    assert 0.05 < limited < 0.35
    assert unlimited > 2 * limited
    # The group's own accounting agrees with the process's (ticks are 10 ms).
    assert abs((s1["cpu.usage_usec"] - u0) / 1e6 - (h1 - h0)) < 0.1
    assert s1["cpu.nr_throttled"] > 0


@kernel
def test_memory_max_oom(groups: ResourceGroups, children: Callable[..., Child]) -> None:
    """Under memory.max 48M (no swap), 8 MiB works and 256 MiB is OOM-killed, counted."""
    groups.create(2)
    groups.set_limit(2, "memory.max", "48M")
    try:
        groups.set_limit(2, "memory.swap.max", "0")  # else the overflow could go to swap
    except OSError as e:
        if e.errno != errno.EOPNOTSUPP:
            raise
    assert groups.get_limit(2, "memory.max") == str(48 * M)
    assert groups.stats(2)["memory.events.oom_kill"] == 0
    for size, killed in ((8, False), (256, True)):
        child = children(python(f"b = b'x' * ({size} << 20)"))
        groups.place(2, child.pidfd, child.pid, v2=True)
        child.release()
        status = child.wait()
        assert signalled(status) == (signal.SIGKILL if killed else None), (size, status)
        if not killed:
            assert os.waitstatus_to_exitcode(status) == 0
    stats = groups.stats(2)
    assert stats["memory.events.oom_kill"] >= 1
    assert 8 * M <= stats["memory.peak"] <= 48 * M


@kernel
def test_pids_max_fork_eagain(groups: ResourceGroups, children: Callable[..., Child]) -> None:
    """pids.max 3: the process and two children, then fork fails with EAGAIN."""
    groups.create(2)
    groups.set_limit(2, "pids.max", "3")

    def forks() -> None:
        r, w = os.pipe()
        for n in range(5):
            try:
                if os.fork() == 0:
                    os.close(w)
                    os.read(r, 1)  # until the parent exits
                    os._exit(0)
            except OSError as e:
                os._exit(10 + n if e.errno == errno.EAGAIN else 99)
        os._exit(50)
    child = children(forks)
    groups.place(2, child.pidfd, child.pid, v2=True)
    child.release()
    assert os.waitstatus_to_exitcode(child.wait()) == 12
    assert groups.stats(2)["pids.events.max"] >= 1


def _freezable(request: pytest.FixtureRequest) -> ResourceGroups:
    if request.param == "v1":
        layout = detect_layout()
        if not any("freezer" in h.controllers for h in layout.v1):
            pytest.skip("no v1 freezer hierarchy")
        # As on a host with no cgroup2 at all: the v1 freezer does the freezing.
        return _groups(request, layout=dataclasses.replace(layout, v2=None))
    if detect_layout().v2 is None:
        pytest.skip("no cgroup2 hierarchy")
    return _groups(request)


freezable = pytest.fixture(params=["v2", "v1"])(_freezable)


@kernel
def test_freeze_thaw(freezable: ResourceGroups, children: Callable[..., Child]) -> None:
    """freeze() returns with the process stopped (its CPU time stands still); thaw() lets it
    run again."""
    rg = freezable
    rg.create(2)
    child = children(busy)
    rg.place(2, child.pidfd, child.pid, v2=True)
    child.release()
    time.sleep(0.1)
    assert not rg.frozen(2)
    rg.freeze(2)
    assert rg.frozen(2)
    c0 = child.cpu()
    time.sleep(0.3)
    assert child.cpu() == c0
    rg.thaw(2)
    assert not rg.frozen(2)
    time.sleep(0.3)
    assert child.cpu() > c0 + 0.1


@kernel
def test_frozen_can_be_killed(freezable: ResourceGroups, children: Callable[..., Child],
                              request: pytest.FixtureRequest) -> None:
    """A frozen container's processes die of kill(). On cgroup2 a plain SIGKILL is enough;
    the v1 freezer holds a SIGKILL until thawed (why kill() thaws after signalling)."""
    rg = freezable
    rg.create(2)
    child = children(busy)
    rg.place(2, child.pidfd, child.pid, v2=True)
    child.release()
    rg.freeze(2)
    signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
    if request.node.callspec.params["freezable"] == "v1":
        with pytest.raises(TimeoutError):
            child.wait(0.2)
        rg.kill(2)
    assert signalled(child.wait(2.0)) == signal.SIGKILL


@kernel
def test_kill_reaches_nested(freezable: ResourceGroups, children: Callable[..., Child]) -> None:
    """kill() reaches a nested container's running processes (v2: cgroup.kill; v1 only:
    freeze, signal each through a pidfd, thaw)."""
    groups = freezable
    groups.create(2)
    groups.create(5, parent=2)
    inner = children(busy)
    groups.place(5, inner.pidfd, inner.pid, v2=True)
    assert groups.procs(5) == [inner.pid] and groups.procs(2) == []
    groups.kill(2)
    assert signalled(inner.wait(2.0)) == signal.SIGKILL
    assert groups.remove(2) == []


@kernel
def test_nested_inside_parent(groups: ResourceGroups, children: Callable[..., Child]) -> None:
    """A nested container's groups are inside its parent's in every hierarchy, so the
    parent's memory.max bounds it. The kill counts in both (v2's memory.events counts a
    kill in the victim's group and every ancestor; v1 counts it in the victim's only)."""
    groups.create(2)
    groups.create(5, parent=2)
    all_groups(groups, 5)  # (the nested container's lazy groups make its parent's too)
    for base in groups._bases():
        assert os.path.isdir(os.path.join(base, "c2", "c5")), base
    groups.set_limit(2, "memory.max", "32M")
    assert groups.limits(5) == {}
    child = children(python("b = b'x' * (128 << 20)"))
    groups.place(5, child.pidfd, child.pid, v2=True)
    child.release()
    assert signalled(child.wait()) == signal.SIGKILL
    assert groups.stats(2)["memory.events.oom_kill"] == 1
    assert groups.stats(5)["memory.events.oom_kill"] == 1
    assert groups.stats(5)["memory.events.max"] == 0  # the limit hit was the parent's
    assert groups.remove(2) == []
    for base in groups._bases():
        assert not os.path.exists(os.path.join(base, "c2"))


def _clone_into(groups: ResourceGroups, cid: int, joins: list[int]) -> tuple[int, int, int]:
    """A child cloned into the container's cgroup2 group (CLONE_INTO_CGROUP) that writes "0"
    to each fd of `joins`, then waits on a pipe: (pid, pidfd, the pipe's write end)."""
    from syscalls import linux
    cg = groups.clone_into_fd(cid)
    assert cg is not None
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        pid, pidfd = linux.clone3_fork(0, signal.SIGCHLD, cg)
        if pid == 0:
            try:
                os.close(w)
                for fd in joins:
                    os.write(fd, b"0")
                os.read(r, 1)
            finally:
                os._exit(0)
    finally:
        os.close(cg)
        os.close(r)
    return pid, pidfd, w


def _in_all_groups(pid: int, groups: ResourceGroups) -> bool:
    with open(f"/proc/{pid}/cgroup") as f:
        return f.read().count("/c2\n") == len(groups._bases())


@kernel
@hybrid
def test_clone_into_then_v1(groups: ResourceGroups) -> None:
    """How the service puts a new process in every group before it runs: born in the cgroup2
    group by CLONE_INTO_CGROUP, then into the v1 groups by place(v2=False) (the service) or
    by writing "0" to open_procs() fds itself (a root caller)."""
    if detect_layout().v2 is None:
        pytest.skip("no cgroup2 hierarchy")
    groups.create(2)
    all_groups(groups, 2)
    joins = groups.open_procs(2)
    assert len(joins) == len(groups._bases()) - 1
    made = []
    try:
        made.append(_clone_into(groups, 2, []))
        made.append(_clone_into(groups, 2, joins))
        pid, pidfd, _ = made[0]
        assert not _in_all_groups(pid, groups)
        assert groups.place(2, pidfd, pid) and _in_all_groups(pid, groups)
        pid, pidfd, _ = made[1]
        for _ in range(100):  # it joins by itself, as soon as it runs
            if _in_all_groups(pid, groups):
                break
            time.sleep(0.01)
        assert _in_all_groups(pid, groups)
        assert sorted(groups.procs(2)) == sorted(p for p, _, _ in made)
    finally:
        for fd in joins:
            os.close(fd)
        for _, pidfd, w in made:  # the second child holds a copy of the first's pipe
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.close(w)
        for pid, pidfd, _ in made:
            os.waitpid(pid, 0)
            os.close(pidfd)


@kernel
def test_place_unplace(groups: ResourceGroups, children: Callable[..., Child]) -> None:
    groups.create(2)
    all_groups(groups, 2)
    child = children(busy)
    with open(f"/proc/{child.pid}/cgroup") as f:
        before = f.read()
    origin = groups.place(2, child.pidfd, child.pid, v2=True)
    assert len(origin) == len(groups._bases())
    with open(f"/proc/{child.pid}/cgroup") as f:
        assert f.read().count("/c2\n") == len(origin)
    assert groups.procs(2) == [child.pid]
    groups.unplace(origin, child.pidfd, child.pid)
    with open(f"/proc/{child.pid}/cgroup") as f:
        assert f.read() == before
    # A reaped process is never acted on by its number.
    signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
    child.wait()
    with pytest.raises(ProcessLookupError):
        groups.place(2, child.pidfd, os.getpid())
    assert groups.procs(2) == []


@kernel
@hybrid
def test_v1_translation(groups: ResourceGroups) -> None:
    """Limits in v2 syntax land in the v1 files as the table says, read back in v2 syntax,
    in one group whose state carries from row to row (memory + swap interact)."""
    groups.create(2)
    rows: list[tuple[str, str, dict[str, str], str]] = [
        ("cpu.max", "50000 200000", {"cpu.cfs_quota_us": "50000", "cpu.cfs_period_us": "200000"},
         "50000 200000"),
        ("cpu.max", "max", {"cpu.cfs_quota_us": "-1", "cpu.cfs_period_us": "200000"},
         "max 200000"),
        ("cpu.weight", "50", {"cpu.shares": "512"}, "50"),
        ("memory.max", "64M", {"memory.limit_in_bytes": str(64 * M)}, str(64 * M)),
        ("memory.swap.max", "16M", {"memory.memsw.limit_in_bytes": str(80 * M)}, str(16 * M)),
        ("memory.max", "32M", {"memory.limit_in_bytes": str(32 * M),
                               "memory.memsw.limit_in_bytes": str(48 * M)}, str(32 * M)),
        ("memory.max", "128M", {"memory.limit_in_bytes": str(128 * M),
                                "memory.memsw.limit_in_bytes": str(144 * M)}, str(128 * M)),
        ("memory.swap.max", "max", {"memory.memsw.limit_in_bytes": UNLIMITED}, "max"),
        ("memory.max", "max", {"memory.limit_in_bytes": UNLIMITED}, "max"),
        ("pids.max", "100", {"pids.max": "100"}, "100"),
        ("cpuset.cpus", "0", {"cpuset.cpus": "0"}, "0"),
        ("cpuset.cpus", "", {}, ""),
    ]
    for name, value, files, back in rows:
        groups.set_limit(2, name, value)
        d = groups._dir(2, limits.CONTROLLER[name])
        for f, v in files.items():
            assert Path(d, f).read_text().strip() == v, (name, value, f)
        assert groups.get_limit(2, name) == back, (name, value)
    assert groups.get_limit(2, "cpuset.cpus") == ""
    assert Path(groups._dir(2, "cpuset"), "cpuset.cpus").read_text() == \
        Path(groups._dir(2, "cpuset"), "..", "cpuset.cpus").read_text()
    assert groups.limits(2) == {"cpu.max": "max 200000", "cpu.weight": "50", "pids.max": "100"}


@kernel
@hybrid
def test_v1_kernel_refusal_restores(groups: ResourceGroups) -> None:
    """A write the kernel refuses gives its errno and names the file; what was written
    before it is restored. (v1 refuses a child CFS ratio above its parent's; v2 would not.)"""
    groups.create(2)
    groups.create(5, parent=2)
    groups.set_limit(2, "cpu.max", "20000 100000")
    with pytest.raises(OSError) as e:
        groups.set_limit(5, "cpu.max", "50000 50000")
    assert e.value.errno == errno.EINVAL and e.value.filename.endswith("cpu.cfs_quota_us")
    assert groups.get_limit(5, "cpu.max") == "max 100000"
    groups.set_limit(5, "cpu.max", "10000 100000")
    assert groups.get_limit(5, "cpu.max") == "10000 100000"


@kernel
@pytest.mark.parametrize("name,value", EINVAL_ROWS[:12] + [("cpu.weight", "0"),
                         ("memory.max", "64X"), ("pids.max", "-1"), ("cpuset.cpus", "3-1")])
def test_set_limit_einval(groups: ResourceGroups, name: str, value: str) -> None:
    groups.create(2)
    with pytest.raises(OSError) as e:
        groups.set_limit(2, name, value)
    assert e.value.errno == errno.EINVAL
    assert groups.limits(2) == {}


@kernel
@hybrid
@pytest.mark.parametrize("name,value,controllers,before,readable", [
    ("memory.high", "64M", None, [], False),  # v1 has no memory.high
    ("memory.high", "not a size", None, [], False),  # availability is checked first
    ("memory.swap.max", "16M", None, [], True),  # v1: needs memory.max first
    ("memory.max", "max", None, [("memory.max", "64M"), ("memory.swap.max", "16M")], True),
    # The controller is not available (here: not used by this ResourceGroups).
    ("pids.max", "10", {"memory", "cpu"}, [], False),
    ("cpu.max", "max 100000", {"memory"}, [], False),
    ("cpu.weight", "100", {"memory"}, [], False),
    ("cpuset.cpus", "0", {"memory"}, [], False),
    ("cpuset.mems", "0", {"memory"}, [], False),
    ("memory.max", "1M", {"pids"}, [], False),
    ("memory.swap.max", "max", {"pids"}, [], False),
])
def test_set_limit_eopnotsupp(request: pytest.FixtureRequest, name: str, value: str,
                              controllers: set[str] | None, before: list[tuple[str, str]],
                              readable: bool) -> None:
    rg = _groups(request, controllers=controllers)
    rg.create(2)
    for n, v in before:
        rg.set_limit(2, n, v)
    was = rg.limits(2)
    with pytest.raises(OSError) as e:
        rg.set_limit(2, name, value)
    assert e.value.errno == errno.EOPNOTSUPP and name in str(e.value)
    assert rg.limits(2) == was
    if not readable:
        with pytest.raises(OSError) as e:
            rg.get_limit(2, name)
        assert e.value.errno == errno.EOPNOTSUPP and name in str(e.value)


@kernel
def test_get_limit_unknown(groups: ResourceGroups) -> None:
    groups.create(2)
    with pytest.raises(OSError) as e:
        groups.get_limit(2, "memory.low")
    assert e.value.errno == errno.EINVAL


@kernel
@hybrid
def test_freeze_eopnotsupp_without_freezer(request: pytest.FixtureRequest) -> None:
    layout = dataclasses.replace(detect_layout(), v2=None)
    rg = _groups(request, layout=layout, controllers={"memory"})
    rg.create(2)
    with pytest.raises(OSError) as e:
        rg.freeze(2)
    assert e.value.errno == errno.EOPNOTSUPP
    assert not rg.frozen(2)


@kernel
def test_remove_reports_busy(groups: ResourceGroups, children: Callable[..., Child]) -> None:
    groups.create(2)
    child = children(busy)
    groups.place(2, child.pidfd, child.pid, v2=True)
    left = groups.remove(2, timeout=0.05)
    assert left and all("/c2" in p for p in left)
    groups.kill(2)
    child.wait()
    assert groups.remove(2) == []


# --- the cgroup2 path, over a fake cgroupfs ----------------------------------------------------

V2_FILES = {
    "": {"cgroup.procs": "", "cgroup.freeze": "0", "cgroup.events": "populated 0\nfrozen 0\n",
         "cgroup.kill": "", "cgroup.subtree_control": "",
         "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n"},
    "cpu": {"cpu.max": "max 100000", "cpu.weight": "100"},
    "memory": {"memory.max": "max", "memory.high": "max", "memory.swap.max": "max",
               "memory.current": "0", "memory.peak": "0", "memory.swap.current": "0",
               "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n"},
    "pids": {"pids.max": "max", "pids.current": "0", "pids.events": "max 0\n"},
    "cpuset": {"cpuset.cpus": "", "cpuset.mems": ""},
}


class FakeV2(ResourceGroups):
    """ResourceGroups over plain files, with the kernel rules that matter emulated: files
    appear per enabled controller, no process in a group that passes controllers on, no
    controller a parent does not offer, no rmdir of a busy group, cgroup.freeze reported in
    cgroup.events."""
    stuck = False  # freezing never completes
    no_swap = False
    refuse: frozenset[str] = frozenset()  # controllers the root will not enable

    def _mkdir(self, path: str) -> None:
        os.mkdir(path)
        self._add_files(Path(path), ["", *self._offered(Path(path))])

    def _offered(self, d: Path) -> list[str]:
        """Controllers `d` may enable: the root's, or those its parent passes on."""
        if d == Path(self.layout.v2.mount):  # type: ignore[union-attr]
            return (d / "cgroup.controllers").read_text().split()
        return (d.parent / "cgroup.subtree_control").read_text().split()

    def _add_files(self, d: Path, controllers: list[str]) -> None:
        for ctl in controllers:
            for f, v in V2_FILES[ctl].items():
                if not (self.no_swap and f == "memory.swap.max") and not (d / f).exists():
                    (d / f).write_text(v + "\n" if v else "")

    def _rmdir(self, path: str) -> None:
        if any(p.is_dir() for p in Path(path).iterdir()) or \
                Path(path, "cgroup.procs").read_text().strip():
            raise OSError(errno.EBUSY, "busy", path)
        for p in Path(path).iterdir():
            p.unlink()
        os.rmdir(path)

    def _write(self, path: str, data: str) -> None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(errno.ENOENT, "no such file", path)
        if p.name == "cgroup.subtree_control":
            have = set(p.read_text().split())
            for token in data.split():
                ctl = token[1:]
                if ctl not in self._offered(p.parent) or ctl in self.refuse:
                    raise OSError(errno.EINVAL, "not offered", path)
                if Path(p.parent, "cgroup.procs").read_text().strip() and \
                        p.parent != Path(self.layout.v2.mount):  # type: ignore[union-attr]
                    raise OSError(errno.EBUSY, "no internal processes", path)
                have.add(ctl)
                for child in p.parent.iterdir():  # the controller's files appear below
                    if child.is_dir():
                        self._add_files(child, [ctl])
            p.write_text(" ".join(sorted(have)))
        elif p.name == "cgroup.procs":
            if Path(p.parent, "cgroup.subtree_control").read_text().strip():
                raise OSError(errno.EBUSY, "no internal processes", path)
            p.write_text(p.read_text() + data + "\n")
        elif p.name == "cgroup.freeze":
            p.write_text(data + "\n")
            if not self.stuck:
                Path(p.parent, "cgroup.events").write_text(f"populated 0\nfrozen {data}\n")
        elif p.name == "cpu.max" and len(data.split()) == 1:  # the kernel keeps the period
            p.write_text(f"{data} {p.read_text().split()[1]}\n")
        else:
            p.write_text(data + "\n")


@pytest.fixture
def fake(tmp_path: Path) -> Callable[..., FakeV2]:
    def make(offered: str = "cpu cpuset memory pids", **attrs: object) -> FakeV2:
        mount = tmp_path / "cgroup"
        mount.mkdir()
        for f, v in V2_FILES[""].items():
            (mount / f).write_text(v)
        (mount / "cgroup.controllers").write_text(offered)
        layout = Layout(Hierarchy(frozenset(), str(mount), "/", "/"), frozenset(offered.split()),
                        ())
        rg = FakeV2("test", layout=layout)
        for k, v in attrs.items():
            setattr(rg, k, v)
        return rg
    return make


def test_detect_layout(tmp_path: Path) -> None:
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "cgroup.controllers").write_text("hugetlb\n")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        f"31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
        f"32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        f"35 31 0:32 /outer /mnt/memory rw - cgroup cgroup rw,memory\n"
        f"36 31 0:33 / /sys/fs/cgroup/net_cls rw - cgroup cgroup rw,net_cls\n"
        f"41 31 0:38 / {tmp_path}/v2 rw - cgroup2 cgroup2 rw\n")
    cgroup = tmp_path / "cgroup"
    cgroup.write_text("9:net_cls:/\n4:memory:/outer/svc\n1:cpuacct,cpu:/svc\n0::/svc\n")
    layout = detect_layout(str(mountinfo), str(cgroup))
    assert layout.v2 == Hierarchy(frozenset(), f"{tmp_path}/v2", "/", "/svc")
    assert layout.v2_controllers == {"hugetlb"}
    by = {h.controllers: h for h in layout.v1}
    assert set(by) == {frozenset({"cpu", "cpuacct"}), frozenset({"memory"})}
    assert by[frozenset({"memory"})].path("/outer/svc") == "/mnt/memory/svc"
    assert by[frozenset({"cpu", "cpuacct"})].path("/svc") == "/sys/fs/cgroup/cpu,cpuacct/svc"


def test_v2_create_enables_controllers(fake: Callable[..., FakeV2], tmp_path: Path) -> None:
    rg = fake()
    rg.create(2)
    root, base = tmp_path / "cgroup", tmp_path / "cgroup" / "test"
    want = "cpu cpuset memory pids"
    assert (root / "cgroup.subtree_control").read_text() == want
    assert (base / "cgroup.subtree_control").read_text() == want
    assert (base / "c2" / "cgroup.subtree_control").read_text() == want
    assert rg.controllers() == dict.fromkeys(want.split(), "v2")
    fd = rg.clone_into_fd(2)
    assert fd is not None
    try:
        assert os.path.samestat(os.fstat(fd), os.stat(base / "c2" / MEMBERS))
    finally:
        os.close(fd)
    assert rg.open_procs(2) == []  # nothing to join outside cgroup2


def test_v2_limits(fake: Callable[..., FakeV2], tmp_path: Path) -> None:
    rg = fake()
    rg.create(2)
    group = tmp_path / "cgroup" / "test" / "c2"
    assert rg.limits(2) == {}
    for name, value, written in [("cpu.max", "20000 100000", "20000 100000"),
                                 ("cpu.max", "50000", "50000 100000"),
                                 ("cpu.weight", "50", "50"), ("memory.max", "64M", str(64 * M)),
                                 ("memory.high", "48M", str(48 * M)),
                                 ("memory.swap.max", "0", "0"), ("pids.max", "10", "10"),
                                 ("cpuset.cpus", "1,0", "0-1"), ("cpuset.mems", "0", "0")]:
        rg.set_limit(2, name, value)
        assert (group / name).read_text().strip() == written
        assert rg.get_limit(2, name) == written
    assert rg.limits(2) == {"cpu.max": "50000 100000", "cpu.weight": "50",
                            "memory.max": str(64 * M), "memory.high": str(48 * M),
                            "memory.swap.max": "0", "pids.max": "10", "cpuset.cpus": "0-1",
                            "cpuset.mems": "0"}
    with pytest.raises(OSError) as e:
        rg.set_limit(2, "memory.max", "lots")
    assert e.value.errno == errno.EINVAL and (group / "memory.max").read_text().strip() == \
        str(64 * M)


def test_v2_eopnotsupp(fake: Callable[..., FakeV2]) -> None:
    rg = fake("cpu memory pids", no_swap=True)
    rg.create(2)
    for name in ("cpuset.cpus", "cpuset.mems", "memory.swap.max"):
        with pytest.raises(OSError) as e:
            rg.set_limit(2, name, "0")
        assert e.value.errno == errno.EOPNOTSUPP, name
    assert "cpuset.cpus" not in rg.limits(2)


def test_v2_controller_refused(fake: Callable[..., FakeV2]) -> None:
    rg = fake(refuse=frozenset({"cpuset"}))
    rg.create(2)
    assert set(rg.controllers()) == {"cpu", "memory", "pids"}
    with pytest.raises(OSError) as e:
        rg.set_limit(2, "cpuset.cpus", "0")
    assert e.value.errno == errno.EOPNOTSUPP


def test_v2_nested(fake: Callable[..., FakeV2], tmp_path: Path) -> None:
    rg = fake()
    rg.create(2)
    rg.create(5, parent=2)
    base = tmp_path / "cgroup" / "test"
    assert (base / "c2" / "c5" / MEMBERS).is_dir()
    assert (base / "c2" / "c5" / "cpu.max").exists()
    rg._rel.clear()  # as after a restart of the service: found again by walking
    rg.set_limit(5, "pids.max", "7")
    assert (base / "c2" / "c5" / "pids.max").read_text().strip() == "7"
    assert rg.remove(2) == [] and not (base / "c2").exists()


def test_v2_stats(fake: Callable[..., FakeV2], tmp_path: Path) -> None:
    rg = fake()
    rg.create(2)
    g = tmp_path / "cgroup" / "test" / "c2"
    (g / "cpu.stat").write_text("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n"
                                "nr_periods 9\nnr_throttled 4\nthrottled_usec 77\n")
    (g / "memory.current").write_text("4096\n")
    (g / "memory.peak").write_text("8192\n")
    (g / "memory.events").write_text("low 0\nhigh 1\nmax 2\noom 3\noom_kill 4\n")
    (g / "pids.current").write_text("5\n")
    assert rg.stats(2) == {
        "cpu.usage_usec": 1500, "cpu.user_usec": 1000, "cpu.system_usec": 500,
        "cpu.nr_periods": 9, "cpu.nr_throttled": 4, "cpu.throttled_usec": 77,
        "memory.current": 4096, "memory.peak": 8192, "memory.swap.current": 0,
        "memory.events.max": 2, "memory.events.oom": 3, "memory.events.oom_kill": 4,
        "pids.current": 5, "pids.events.max": 0}


def test_v2_freeze(fake: Callable[..., FakeV2], tmp_path: Path) -> None:
    rg = fake()
    rg.create(2)
    g = tmp_path / "cgroup" / "test" / "c2"
    rg.freeze(2)
    assert rg.frozen(2) and (g / "cgroup.freeze").read_text().strip() == "1"
    rg.thaw(2)
    assert not rg.frozen(2)
    rg.stuck = True
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        rg.freeze(2, timeout=0.2)
    assert e.value.errno == errno.ETIMEDOUT and time.monotonic() - t0 < 1.0
    assert not rg.frozen(2)  # thawed again: no half-done freeze


def test_v2_place_and_remove(fake: Callable[..., FakeV2], tmp_path: Path) -> None:
    rg = fake()
    rg.create(2)
    members = tmp_path / "cgroup" / "test" / "c2" / MEMBERS
    pidfd = os.pidfd_open(os.getpid())
    try:
        origin = rg.place(2, pidfd, os.getpid(), v2=True)
        assert rg.procs(2) == [os.getpid()]
        assert origin == {str(members): str(tmp_path / "cgroup")}  # our "0::/" in the fake
        with pytest.raises(OSError) as e:  # the group itself passes controllers on
            rg._write(str(members.parent / "cgroup.procs"), "1")
        assert e.value.errno == errno.EBUSY
        assert rg.remove(2, timeout=0.05) == [str(members), str(members.parent)]
        rg.kill(2)
        assert (members.parent / "cgroup.kill").read_text() == "1\n"
        members.joinpath("cgroup.procs").write_text("")
        assert rg.remove(2) == []
    finally:
        os.close(pidfd)
