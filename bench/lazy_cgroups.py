"""Two services side by side, interleaved in one run: the cost of a container's cgroups before
and after a change (issue 18: groups in the v1 cpu/cpuacct/cpuset hierarchies only when a
limit needs them, cpuset clone_children, rmdir before walking).

Each service runs from its own checkout (`--before`, default /work/main; `--after`, default
this one); the client is this checkout's. Rounds of K containers on each in turn, the work of
bench/peers.py's `containerfs` tool (create with PID+mount+UTS+IPC+net, fork_into_container,
exec /bin/true, POLLHUP). Prints per service: the median wall time, the service's and the
keeper's CPU per container (utime+stime from /proc/PID/stat), and the time the new process
spends joining its v1 groups (childsetup.join_groups: one write of "0" per group lent, timed
in the child). Root only: `python -m bench.lazy_cgroups [-n N] [-k K]`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from syscalls import childsetup

from ._service import wait_for
from .peers import one_containerfs, proc_cpu

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Svc:
    name: str
    tree: str
    socket: str
    pid: int
    keeper: int | None
    times: list[float] = field(default_factory=list)
    joins: list[int] = field(default_factory=list)  # ns per new process
    service_cpu: float = 0.0
    keeper_cpu: float = 0.0
    count: int = 0


@contextmanager
def service(name: str, tree: str) -> Iterator[Svc]:
    where = tempfile.mkdtemp(prefix=f"cfs-lazybench-{name}-")
    sock, state = os.path.join(where, "cfs.sock"), os.path.join(where, "state")
    cgroup = f"cfs-lazybench-{name}-{os.getpid()}"
    env = {**os.environ, "PYTHONPATH": tree}
    proc = subprocess.Popen([sys.executable, "-m", "containerfs", "serve", "--socket", sock,
                             "--runtime-dir", state, "--mount", "", "--cgroup", cgroup,
                             "--log-level", "warning"], cwd=tree, env=env)
    try:
        wait_for(sock, proc, f"the {name} service")
        with open(os.path.join(state, "keeper.pid")) as f:
            keeper = int(f.read())
        yield Svc(name, tree, sock, proc.pid, keeper)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        try:
            with open(os.path.join(state, "keeper.pid")) as f:
                os.kill(int(f.read()), signal.SIGKILL)
        except (OSError, ValueError):
            pass
        # Removed by that tree's own code: it knows its own hierarchies.
        subprocess.run([sys.executable, "-c", "import sys; from containerfs.cgroups import "
                        "CgroupTree; sys.exit(bool(CgroupTree(sys.argv[1]).remove_all()))",
                        cgroup], cwd=tree, env=env, check=False)
        shutil.rmtree(where, ignore_errors=True)


def timed_joins(pipe_w: int) -> None:
    """Make every new process time its childsetup.join_groups and write the ns to `pipe_w`."""
    real = childsetup.join_groups

    def join_groups(reply, fds):  # type: ignore[no-untyped-def]
        t = time.perf_counter_ns()
        real(reply, fds)
        os.write(pipe_w, struct.pack("q", time.perf_counter_ns() - t))
    childsetup.join_groups = join_groups


def round_of(svc: Svc, k: int, pipe_r: int) -> None:
    os.environ["CONTAINERFS_SOCKET"] = svc.socket
    s0, k0 = proc_cpu(svc.pid, svc.keeper), proc_cpu(svc.keeper)
    for _ in range(k):
        t = time.perf_counter()
        one_containerfs()
        svc.times.append(time.perf_counter() - t)
        svc.joins.append(struct.unpack("q", os.read(pipe_r, 8))[0])
    svc.service_cpu += proc_cpu(svc.pid, svc.keeper) - s0
    svc.keeper_cpu += proc_cpu(svc.keeper) - k0
    svc.count += k


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=200, help="containers per service")
    ap.add_argument("-k", type=int, default=10, help="containers per service per round")
    ap.add_argument("--before", default="/work/main")
    ap.add_argument("--after", default=HERE)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench.lazy_cgroups: run as root")
    pipe_r, pipe_w = os.pipe()
    timed_joins(pipe_w)
    load = os.getloadavg()[0]
    with service("before", args.before) as before, service("after", args.after) as after:
        both = [before, after]
        for svc in both:  # warm up
            round_of(svc, 5, pipe_r)
            svc.times.clear()
            svc.joins.clear()
            svc.service_cpu = svc.keeper_cpu = 0.0
            svc.count = 0
        for _ in range(max(1, args.n // args.k)):
            for svc in both:
                round_of(svc, args.k, pipe_r)
    print(f"{args.n} containers each, rounds of {args.k}, load {load:.1f} -> "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'service':8} {'median':>9} {'service CPU':>12} {'keeper CPU':>11} "
          f"{'join median':>12} {'join p90':>9}")
    for svc in both:
        p90 = statistics.quantiles(svc.joins, n=10)[-1]
        print(f"{svc.name:8} {statistics.median(svc.times) * 1e3:7.2f}ms "
              f"{svc.service_cpu / svc.count * 1e3:10.2f}ms {svc.keeper_cpu / svc.count * 1e3:9.2f}ms "
              f"{statistics.median(svc.joins) / 1e3:10.0f}us {p90 / 1e3:7.0f}us")


if __name__ == "__main__":
    main()
