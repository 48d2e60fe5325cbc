"""containerfs against its peers, interleaved in one run: the same container, made by each.

The work, for every tool: a new container with PID, mount, UTS, IPC and network namespaces;
/bin/true run in it as PID 1; wait until it is gone.

- `containerfs`: container_create + fork_into_container + exec /bin/true + POLLHUP on the
  handle (what bench/lifecycle.py times). The service also gives it a cgroup in every
  hierarchy, a session keyring and a seccomp filter; no /proc of its own is mounted.
- `containerfs+proc`: the same, plus a fresh proc mounted at /proc of the container before the
  fork (fsopen, FSCONFIG_SET_CONTAINER, fsmount, move_mount on the handle), as the others do.
- `bwrap`: `bwrap --unshare-pid --unshare-net --unshare-ipc --unshare-uts --dev-bind / /
  --proc /proc --as-pid-1 /bin/true`. bwrap always makes a new mount namespace (it pivots into a
  tmpfs and binds / there, then remounts each of the ~20 submounts); --as-pid-1 runs /bin/true
  as PID 1 (without it bwrap stays as PID 1 and forks the command). No cgroup, no keyring.
- `unshare`: `unshare --fork --pid --mount --uts --ipc --net --mount-proc /bin/true` (the
  mount namespace made private recursively, proc mounted over /proc). No cgroup, no keyring.
- `lxc`: `lxc-start -F` of a container made once in a temporary lxcpath: its root a directory
  with /usr bound read-only (and the host's /bin, /lib... symlinks into it), proc mounted,
  `lxc.net.0.type = empty` (a network namespace with only lo), `lxc.init.cmd = /bin/true`.
  lxc also makes a cgroup namespace and a cgroup in every hierarchy.

Rounds of K of each tool in turn, so the machine's drift hits all alike. Prints medians, each
ratio to containerfs, the throughput of two creators at once for a fixed time (three
slices of each tool, interleaved too), and CPU per
container: the service's and the keeper's (utime+stime from /proc/PID/stat, over the
containerfs rounds and over the whole run) and the client's (os.times(): this process and
its reaped children). Run as root: `python -m bench.peers [-n N] [-k K] [-t SECONDS]`. A tool
that is not installed is named with how to get it (scripts/bench-setup.sh installs them all)
and left out.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import multiprocessing
import os
import select
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import syscalls
from containerfs.api import mount_proc
from syscalls import (
    CONTAINER_FD_CLOEXEC, CONTAINER_KILL_ON_CLOSE, CONTAINER_NEW_FS_NS, CONTAINER_NEW_IPC_NS,
    CONTAINER_NEW_NET_NS, CONTAINER_NEW_PID_NS, CONTAINER_NEW_UTS_NS,
)

from ._service import ServiceInfo, started_service

FLAGS = (CONTAINER_NEW_PID_NS | CONTAINER_NEW_FS_NS | CONTAINER_NEW_UTS_NS | CONTAINER_NEW_IPC_NS
         | CONTAINER_NEW_NET_NS | CONTAINER_KILL_ON_CLOSE | CONTAINER_FD_CLOEXEC)
BWRAP = ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
         "--dev-bind", "/", "/", "--proc", "/proc", "--as-pid-1", "/bin/true"]
UNSHARE = ["unshare", "--fork", "--pid", "--mount", "--uts", "--ipc", "--net", "--mount-proc",
           "/bin/true"]
INSTALL = {"bwrap": "apt-get install bubblewrap", "unshare": "apt-get install util-linux",
           "lxc-start": "apt-get install lxc"}
TICK = os.sysconf("SC_CLK_TCK")


def one_containerfs(proc: bool = False, spawn: bool = False) -> None:
    """create, (a fresh /proc,) /bin/true as init by fork_into_container + exec or (`spawn`)
    by container_spawn (compiled, vfork), POLLHUP on the handle."""
    cfd = syscalls.container_create("bench", FLAGS)
    try:
        if proc:
            mount_proc(cfd)
        if spawn:
            pid = syscalls.container_spawn(cfd, "/bin/true", ["/bin/true"])
        else:
            pid = syscalls.fork_into_container(cfd)
            if pid == 0:
                os.execv("/bin/true", ["/bin/true"])
        p = select.poll()
        p.register(cfd, select.POLLHUP)
        p.poll()
        os.waitpid(pid, 0)
    finally:
        os.close(cfd)


def run_quiet(argv: list[str]) -> None:
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)


@dataclass
class Lxc:
    """Containers `names` in a temporary lxcpath, each running /bin/true over a host-bound /usr."""
    path: str
    names: list[str]

    def argv(self, i: int = 0) -> list[str]:
        return ["lxc-start", "-P", self.path, "-n", self.names[i], "-F"]


@contextlib.contextmanager
def lxc_containers(count: int) -> Iterator[Lxc]:
    path = tempfile.mkdtemp(prefix="cfs-peers-lxc-")
    # Unique on the machine: lxc names its cgroups (lxc.payload.NAME) after the container.
    names = [f"cfspeers{os.getpid()}-{i}" for i in range(count)]
    # lxc leaves an empty group lxc.pivot in every hierarchy (its monitor moves there at
    # the end): removed afterwards if this run made it.
    pivots = [p for p in glob.glob("/sys/fs/cgroup/*/") + ["/sys/fs/cgroup/"]
              if os.path.isfile(os.path.join(p, "cgroup.procs"))
              and not os.path.exists(os.path.join(p, "lxc.pivot"))]
    try:
        for name in names:
            rootfs = os.path.join(path, name, "rootfs")
            for d in ("usr", "proc", "dev", "sys", "tmp", "etc"):
                os.makedirs(os.path.join(rootfs, d))
            for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
                if os.path.islink(f"/{top}"):  # Debian 12's merged /usr
                    os.symlink(os.readlink(f"/{top}"), os.path.join(rootfs, top))
            with open(os.path.join(path, name, "config"), "w") as f:
                f.write(f"lxc.uts.name = {name}\n"
                        f"lxc.rootfs.path = dir:{rootfs}\n"
                        "lxc.mount.entry = /usr usr none bind,ro 0 0\n"
                        "lxc.mount.auto = proc:rw\n"
                        "lxc.net.0.type = empty\n"
                        "lxc.apparmor.profile = unconfined\n"
                        "lxc.init.cmd = /bin/true\n"
                        "lxc.tty.max = 0\nlxc.pty.max = 0\nlxc.console.path = none\n"
                        f"lxc.log.file = {os.path.join(path, name + '.log')}\n"
                        "lxc.log.level = ERROR\n")
        yield Lxc(path, names)
    finally:
        shutil.rmtree(path, ignore_errors=True)
        for p in pivots:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(p, "lxc.pivot"))


@dataclass
class Tool:
    name: str
    one: Callable[[], None]
    argv: Callable[[int], list[str]] | None = None  # per creator, for the throughput
    times: list[float] = field(default_factory=list)
    client_cpu: float = 0.0  # this process and its reaped children, over its rounds
    service_cpu: float = 0.0
    keeper_cpu: float = 0.0
    rate: float = 0.0


def stat_times(pid: int) -> tuple[float, float]:
    """utime and stime of process `pid` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def proc_cpu(pid: int | None, but: int | None = None) -> float:
    """utime + stime of process `pid` (all its threads) and of its children living now but
    `but` (the service's namespace maker: the service's work done in another process; not
    its keeper, counted apart), in seconds; 0 if unknown."""
    if pid is None:
        return 0.0
    total = sum(stat_times(pid))
    children: set[int] = set()
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with contextlib.suppress(OSError), open(path) as f:
            children.update(int(c) for c in f.read().split())
    for child in children - {but}:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += sum(stat_times(child))
    return total


def proc_stime(pid: int | None) -> float:
    return 0.0 if pid is None else stat_times(pid)[1]


def client_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def round_of(tool: Tool, k: int, svc: ServiceInfo) -> None:
    c0, s0, k0 = client_cpu(), proc_cpu(svc.pid, svc.keeper_pid), proc_cpu(svc.keeper_pid)
    for _ in range(k):
        t = time.perf_counter()
        tool.one()
        tool.times.append(time.perf_counter() - t)
    tool.client_cpu += client_cpu() - c0
    tool.service_cpu += proc_cpu(svc.pid, svc.keeper_pid) - s0
    tool.keeper_cpu += proc_cpu(svc.keeper_pid) - k0


def _creator(tool: Tool, i: int, deadline: float, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    done = 0
    argv = tool.argv(i) if tool.argv else None
    while time.monotonic() < deadline:
        if argv:
            run_quiet(argv)
        else:
            tool.one()
        done += 1
    out.put(done)


def throughput(tool: Tool, seconds: float, creators: int = 2) -> tuple[int, float]:
    """Containers made by `creators` processes at once in about `seconds`: (count, time)."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    deadline = time.monotonic() + seconds
    t = time.monotonic()
    procs = [ctx.Process(target=_creator, args=(tool, i, deadline, out)) for i in range(creators)]
    for p in procs:
        p.start()
    total = sum(out.get() for _ in procs)
    for p in procs:
        p.join()
    return total, time.monotonic() - t


def _same_argv(argv: list[str], _creator: int) -> list[str]:
    return argv


def available_tools(lxc: Lxc | None) -> list[Tool]:
    tools = [Tool("containerfs", one_containerfs),
             Tool("containerfs+proc", lambda: one_containerfs(proc=True))]
    if syscalls.cspawn.available():
        tools[1:1] = [Tool("containerfs spawn", lambda: one_containerfs(spawn=True)),
                      Tool("containerfs spawn+proc", lambda: one_containerfs(True, True))]
    else:
        print("containerfs spawn: the compiled path is not built (scripts/setup.sh): left out")
    for binary, name, argv in (("bwrap", "bwrap", BWRAP), ("unshare", "unshare", UNSHARE)):
        if shutil.which(binary) is None:
            print(f"missing: {binary} ({INSTALL[binary]}, or scripts/bench-setup.sh): left out")
            continue
        try:
            run_quiet(argv)
        except (OSError, subprocess.CalledProcessError) as e:
            print(f"{name} does not run here ({e}): left out")
            continue
        tools.append(Tool(name, functools.partial(run_quiet, argv),
                          functools.partial(_same_argv, argv)))
    if lxc is not None:
        try:
            subprocess.run(lxc.argv(0), check=True, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True)
            tools.append(Tool("lxc", lambda: run_quiet(lxc.argv(0)), lxc.argv))
        except subprocess.CalledProcessError as e:
            with contextlib.suppress(OSError):
                with open(os.path.join(lxc.path, lxc.names[0] + ".log")) as f:
                    e.stderr = (e.stderr or "") + f.read()
            print(f"lxc-start does not run here: {e.stderr.strip()[-500:]}: left out")
    return tools


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=200, help="containers per tool (default 200)")
    ap.add_argument("-k", type=int, default=10, help="containers per tool per round")
    ap.add_argument("-t", type=float, default=6.0,
                    help="seconds of two creators per tool (in three interleaved slices)")
    ap.add_argument("--only", default="",
                    help="the tools to run, by name, comma-separated (default all): for "
                         "example 'containerfs spawn,bwrap'")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench.peers: run as root (every tool here makes namespaces)")
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    have_lxc = shutil.which("lxc-start") is not None and (not only or "lxc" in only)
    if not have_lxc and (not only or "lxc" in only):
        print(f"missing: lxc-start ({INSTALL['lxc-start']}, or scripts/bench-setup.sh): left out")
    with started_service() as svc, \
            (lxc_containers(2) if have_lxc else contextlib.nullcontext()) as lxc:
        tools = available_tools(lxc)
        unknown = set(only) - {t.name for t in tools}
        if unknown:
            raise SystemExit(f"bench.peers: no tool {', '.join(sorted(unknown))} here; "
                             f"there are: {', '.join(t.name for t in tools)}")
        run([t for t in tools if not only or t.name in only], svc, args.n, args.k, args.t)


def run(tools: list[Tool], svc: ServiceInfo, n: int, k: int, seconds: float) -> None:
    load = os.getloadavg()[0]
    for tool in tools:  # warm up: caches, the service's pool
        for _ in range(5):
            tool.one()
    s0, k0, st0 = proc_cpu(svc.pid, svc.keeper_pid), proc_cpu(svc.keeper_pid), proc_stime(svc.pid)
    for _ in range(max(1, n // k)):
        for tool in tools:
            round_of(tool, k, svc)
    s_all, k_all = proc_cpu(svc.pid, svc.keeper_pid) - s0, proc_cpu(svc.keeper_pid) - k0
    st_all = proc_stime(svc.pid) - st0
    done = {t.name: [0, 0.0] for t in tools}
    for _ in range(3):  # interleaved too: three slices of each
        for tool in tools:
            count, took = throughput(tool, seconds / 3)
            done[tool.name][0] += count
            done[tool.name][1] += took
    for tool in tools:
        tool.rate = done[tool.name][0] / done[tool.name][1]
    ours = tools[0]
    base = statistics.median(ours.times)
    print(f"\n{len(ours.times)} of each, rounds of {k}, interleaved; throughput: 2 creators, "
          f"{seconds:.0f} s each in 3 slices; load average at start: {load:.2f}")
    print(f"{'tool':18} {'median':>9} {'p90':>9} {'vs containerfs':>15} {'2 creators':>11} "
          f"{'client CPU':>11} {'all CPU':>9}")
    for tool in tools:
        m = statistics.median(tool.times)
        p90 = statistics.quantiles(tool.times, n=10)[-1]
        c = len(tool.times)
        every = tool.client_cpu + (tool.service_cpu + tool.keeper_cpu
                                   if tool.name.startswith("containerfs") else 0.0)
        print(f"{tool.name:18} {m * 1e3:7.2f}ms {p90 * 1e3:7.2f}ms {m / base:14.2f}x "
              f"{tool.rate:9.0f}/s {tool.client_cpu / c * 1e3:9.2f}ms {every / c * 1e3:7.2f}ms")
    print("(client CPU: this process and its children, the tool's own process included; all "
          "CPU: for containerfs, the service's and keeper's added)")
    by = {t.name: t for t in tools}
    if "bwrap" in by:
        b = by["bwrap"]
        for t in tools:
            if t.name.startswith("containerfs"):
                print(f"{t.name} / bwrap: median "
                      f"{statistics.median(t.times) / statistics.median(b.times):.2f}x "
                      f"(target <= 1.0), throughput {t.rate / b.rate:.2f}x (target >= 1.0)")
    count = sum(len(t.times) for t in tools if t.name.startswith("containerfs"))
    for t in tools[:2]:
        c = len(t.times)
        print(f"{t.name}: service CPU {t.service_cpu / c * 1e3:.2f} ms/container over its rounds "
              f"(target <= 1.5), keeper {t.keeper_cpu / c * 1e3:.2f} ms, client "
              f"{t.client_cpu / c * 1e3:.2f} ms")
    spill = sum(t.service_cpu for t in tools if not t.name.startswith("containerfs"))
    print(f"service CPU during the other tools' rounds (containerfs's background work spilling "
          f"over): {spill * 1e3:.0f} ms in all")
    print(f"service CPU over the whole timed run / containerfs containers ({count}): "
          f"{s_all / count * 1e3:.2f} ms ({st_all / count * 1e3:.2f} ms of it system time), "
          f"keeper {k_all / count * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
