"""Resource control through the handle (contract section 10), on the real kernel of this
hybrid host: the seeds' cpu.max demo, memory and OOM, pids, freeze and thaw, every errno, the
view and the command line. (The layouts themselves: tests/test_resources.py.)"""

from __future__ import annotations

import errno
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

import syscalls
from syscalls import CONTAINER_NEW_PID_NS, CONTAINER_NEW_USER_NS

from .conftest import OTHER_GID, OTHER_UID, child_result, hung_up, in_container, run_as
from .test_cli import cli


def errno_of(fn: Any, *args: Any) -> int:
    with pytest.raises(OSError) as info:
        fn(*args)
    return int(info.value.errno or 0)


def start(cfd: int, body: str, *, timeout: float = 30) -> tuple[int, Any]:
    """Fork init running `body` (Python, which may set `result`), as a child that reports
    `result` as JSON on a pipe; (init's pid, a function returning that result)."""
    r, w = os.pipe()
    pid = syscalls.fork_into_container(cfd)
    if pid == 0:
        os.close(r)
        scope: dict[str, Any] = {"result": None}
        try:
            exec(body, scope)  # noqa: S102 - test code, run in the container's init
            os.write(w, json.dumps(scope["result"]).encode())
            os._exit(0)
        except BaseException as e:
            os.write(w, json.dumps({"error": repr(e)}).encode())
            os._exit(1)
    os.close(w)

    def result() -> Any:
        p = select.poll()
        p.register(r, select.POLLIN | select.POLLHUP)
        if not p.poll(timeout * 1000):
            os.kill(pid, signal.SIGKILL)
        with os.fdopen(r, "rb") as f:
            data = f.read()
        assert child_result(pid) == 0, data
        return json.loads(data)

    return pid, result


BUSY = """
import os, time
t0, c0 = time.monotonic(), os.times()
while time.monotonic() - t0 < 1.5:
    pass
c1 = os.times()
result = (c1.user + c1.system - c0.user - c0.system) / (time.monotonic() - t0)
"""


def test_seeds_cpu_max_demo(service: Any) -> None:
    """`echo "20000 100000" > cpu.max` holds a CPU hog to about 20%: measured from its own
    CPU time, beside the same loop unlimited, at the same time."""
    limited = syscalls.container_create("hog", CONTAINER_NEW_PID_NS)
    free = syscalls.container_create("free", CONTAINER_NEW_PID_NS)
    try:
        syscalls.container_set_limit(limited, "cpu.max", "20000 100000")  # before init
        assert syscalls.container_get_limit(limited, "cpu.max") == "20000 100000"
        _, got_limited = start(limited, BUSY)
        _, got_free = start(free, BUSY)
        share, free_share = got_limited(), got_free()
        assert 0.05 < share < 0.35, share
        assert free_share > 2 * share, (share, free_share)
    finally:
        os.close(limited)
        os.close(free)


def test_memory_limit_oom_kills_and_is_counted(service: Any) -> None:
    cfd = syscalls.container_create("mem", CONTAINER_NEW_PID_NS)
    r, w = os.pipe()
    try:
        syscalls.container_set_limit(cfd, "memory.max", "48M")
        assert syscalls.container_get_limit(cfd, "memory.max") == str(48 << 20)
        init = syscalls.fork_into_container(cfd)
        if init == 0:
            def alloc(n: int) -> int:
                pid = os.fork()
                if pid == 0:
                    b = bytearray(n)
                    for i in range(0, n, 4096):
                        b[i] = 1
                    os._exit(0)
                return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            os.write(w, json.dumps([alloc(8 << 20), alloc(256 << 20)]).encode())
            time.sleep(60)  # alive while the test reads the stats; killed then
            os._exit(0)
        os.close(w)
        w = -1
        assert json.loads(os.read(r, 100)) == [0, -signal.SIGKILL]
        stats = syscalls.container_stats(cfd)
        assert stats["memory.events.oom_kill"] >= 1
        assert stats["memory.peak"] >= 8 << 20
        syscalls.container_kill(cfd)
        assert child_result(init) == -signal.SIGKILL
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
        os.close(cfd)


def test_pids_max_set_before_init_makes_forks_fail(service: Any) -> None:
    cfd = syscalls.container_create("pids", CONTAINER_NEW_PID_NS)
    try:
        syscalls.container_set_limit(cfd, "pids.max", "3")
        _, result = start(cfd, """
import os, errno
made, err = [], 0
for _ in range(5):
    try:
        pid = os.fork()
    except OSError as e:
        err = e.errno
        break
    if pid == 0:
        os.read(os.open("/dev/null", os.O_RDONLY), 1)
        import time; time.sleep(5)
        os._exit(0)
    made.append(pid)
for pid in made:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
result = [len(made), err]
""")
        assert result() == [2, errno.EAGAIN]  # init and two children: three
    finally:
        os.close(cfd)


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_freeze_stops_thaw_resumes_and_frozen_can_be_killed(service: Any) -> None:
    cfd = syscalls.container_create("ice", CONTAINER_NEW_PID_NS)
    try:
        init = syscalls.fork_into_container(cfd)
        if init == 0:
            while True:
                pass
        time.sleep(0.2)
        syscalls.container_freeze(cfd)
        assert syscalls.container_status(cfd)["frozen"] is True
        table = open(os.path.join(service.view, "containers")).read()
        row = [line for line in table.splitlines()
               if line.split()[1] == str(syscalls.container_status(cfd)["id"])]
        assert int(row[0].split()[3], 16) & 0x08, table
        before = _cpu_ticks(init)
        time.sleep(0.5)
        assert _cpu_ticks(init) == before, "a frozen process ran"
        syscalls.container_thaw(cfd)
        assert syscalls.container_status(cfd)["frozen"] is False
        time.sleep(0.5)
        assert _cpu_ticks(init) > before, "a thawed process did not run"
        syscalls.container_freeze(cfd)
        syscalls.container_kill(cfd)  # frozen, and still killed
        assert hung_up(cfd, 5)
        assert child_result(init) == -signal.SIGKILL
    finally:
        os.close(cfd)


@pytest.mark.parametrize("name,value,err", [
    ("cpu.nope", "1", errno.EINVAL),
    ("cpu.max", "fast", errno.EINVAL),
    ("cpu.max", "20000 100", errno.EINVAL),
    ("cpu.weight", "0", errno.EINVAL),
    ("memory.max", "-1", errno.EINVAL),
    ("memory.max", "12Q", errno.EINVAL),
    ("pids.max", "many", errno.EINVAL),
    ("cpuset.cpus", "a-b", errno.EINVAL),
    ("memory.high", "64M", errno.EOPNOTSUPP),  # v1 has no equivalent (docs/resources.md)
])
def test_limit_errors(service: Any, name: str, value: str, err: int) -> None:
    cfd = syscalls.container_create("bad", 0)
    try:
        assert errno_of(syscalls.container_set_limit, cfd, name, value) == err
        assert syscalls.container_get_limit(cfd, "pids.max") == "max"  # nothing written
    finally:
        os.close(cfd)


def test_who_may_limit(service: Any) -> None:
    cfd = syscalls.container_create("who", CONTAINER_NEW_PID_NS)
    try:
        # Another user holding the handle may read, not set.
        got = run_as(OTHER_UID, OTHER_GID, f"""
            import errno, syscalls
            out = [syscalls.container_get_limit({cfd}, "pids.max")]
            for call in (lambda: syscalls.container_set_limit({cfd}, "pids.max", "5"),
                         lambda: syscalls.container_freeze({cfd})):
                try:
                    call()
                    out.append(0)
                except OSError as e:
                    out.append(e.errno)
            out.append(sorted(syscalls.container_stats({cfd})))
            return out
        """, pass_fds=(cfd,))
        assert got[:3] == ["max", errno.EPERM, errno.EPERM]
        assert {"cpu.usage_usec", "memory.current", "memory.peak", "memory.events.oom_kill",
                "pids.current"} <= set(got[3])
        # A member may not limit its own container.
        pid, inside = in_container(cfd, lambda: errno_of(
            syscalls.container_set_limit, cfd, "pids.max", "5"))
        assert inside == errno.EPERM
        assert child_result(pid) == 0
        # A dead container: ECANCELED.
        syscalls.container_wait(cfd)
        assert errno_of(syscalls.container_set_limit, cfd, "pids.max", "5") == errno.ECANCELED
        assert errno_of(syscalls.container_stats, cfd) == errno.ECANCELED
    finally:
        os.close(cfd)


def test_owner_without_root_limits_its_own_container(service: Any) -> None:
    got = run_as(OTHER_UID, OTHER_GID, """
        import os, syscalls
        cfd = syscalls.container_create("mine", syscalls.CONTAINER_NEW_USER_NS
                                        | syscalls.CONTAINER_NEW_PID_NS)
        syscalls.container_set_limit(cfd, "pids.max", "10")
        syscalls.container_set_limit(cfd, "memory.max", "64M")
        got = [syscalls.container_get_limit(cfd, "pids.max"),
               syscalls.container_get_limit(cfd, "memory.max")]
        pid = syscalls.fork_into_container(cfd)
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        return got
    """)
    assert got == ["10", str(64 << 20)]


def test_view_shows_limits_and_stats(service: Any) -> None:
    cfd = syscalls.container_create("seen", CONTAINER_NEW_PID_NS)
    try:
        syscalls.container_set_limit(cfd, "pids.max", "7")
        syscalls.container_set_limit(cfd, "cpu.max", "50000 100000")
        cid = syscalls.container_status(cfd)["id"]
        d = os.path.join(service.view, str(cid))
        assert sorted(os.listdir(os.path.join(d, "limits"))) == ["cpu.max", "pids.max"]
        assert open(os.path.join(d, "limits", "pids.max")).read() == "7\n"
        stats = dict(line.split() for line in open(os.path.join(d, "stats")).read().splitlines())
        assert "cpu.usage_usec" in stats and "pids.current" in stats
    finally:
        os.close(cfd)


def test_command_line_limits(service: Any) -> None:
    run = subprocess.Popen([sys.executable, "-m", "containerfs", "run", "--keep", "--pid",
                            "--pids", "7", "--memory", "64M", "--cpus", "0.5", "--",
                            "sleep", "60"], stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        assert run.stderr is not None
        line = run.stderr.readline()
        while line and not line.startswith("container "):
            line = run.stderr.readline()
        m = re.match(r"container (\d+)", line)
        assert m, line
        cid = m.group(1)
        assert cli("limit", cid, "pids.max").stdout == "7\n"
        assert cli("limit", cid, "cpu.max").stdout == "50000 100000\n"
        assert cli("limit", cid, "memory.max").stdout == f"{64 << 20}\n"
        assert cli("limit", cid, "pids.max", "9").returncode == 0
        assert cli("limit", cid, "pids.max").stdout == "9\n"
        bad = cli("limit", cid, "pids.max", "lots")
        assert bad.returncode == 1 and "pids.max" in bad.stderr
        assert cli("freeze", cid).returncode == 0
        assert "frozen: True" in cli("status", cid).stdout
        assert cli("thaw", cid).returncode == 0
        stats = dict(line.split() for line in cli("stats", cid).stdout.splitlines())
        assert int(stats["pids.current"]) >= 1
        assert cli("kill", cid).returncode == 0
        assert run.wait(10) == 137
    finally:
        run.kill()
        run.wait()


def test_nonroot_creators_group_is_not_the_service_root(service: Any) -> None:
    """A user's container's v1 groups sit under the service's own group in each hierarchy
    (the host's accounting of the service covers them), never at a hierarchy's root."""
    cfd = syscalls.container_create("where", CONTAINER_NEW_USER_NS)
    try:
        cid = syscalls.container_status(cfd)["id"]
        # The cpu and cpuset groups are made by a first limit of theirs (lazygroups).
        syscalls.container_set_limit(cfd, "cpu.weight", "100")
        syscalls.container_set_limit(cfd, "cpuset.cpus", "")
        for base in service.cgroups.bases():
            assert os.path.isdir(os.path.join(base, f"c{cid}")), base
        own_memory = [line for line in open("/proc/self/cgroup").read().splitlines()
                      if ":memory:" in line]
        if own_memory:
            group = own_memory[0].split(":", 2)[2]
            assert any(b.startswith(os.path.join("/sys/fs/cgroup/memory", group.lstrip("/")))
                       for b in service.cgroups.bases())
    finally:
        os.close(cfd)
