"""Reads per second of the view's `containers` file against a /proc file of similar size.

Starts a private service (own socket, state, cgroup and mount), lists N containers (default
1000) in it, then reads `containers` in a loop the way cat(1) does (open, read to EOF, close)
and, in the same run and alternating with it, a /proc file whose size is closest to the table's.
Also compares a small table (a few containers) with a small /proc file. Needs root.

    .venv/bin/python bench/view.py [--containers 1000] [--seconds 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import syscalls
from containerfs.cgroups import CgroupTree

PROC_CANDIDATES = ("/proc/self/status", "/proc/self/maps", "/proc/self/mountinfo",
                   "/proc/zoneinfo", "/proc/crypto", "/proc/self/smaps", "/proc/slabinfo",
                   "/proc/timer_list", "/proc/{service}/smaps")


def read_once(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        n = 0
        while chunk := os.read(fd, 131072):
            n += len(chunk)
        return n
    finally:
        os.close(fd)


def rate(path: str, seconds: float) -> float:
    """Reads per second of `path`, whole, for about `seconds`."""
    n, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(50):
            read_once(path)
        n += 50
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


def compare(table: str, proc: str, seconds: float, rounds: int) -> tuple[float, float]:
    """Median reads/s of each, measured in alternation so both see the same machine."""
    a, b = [], []
    for _ in range(rounds):
        a.append(rate(table, seconds))
        b.append(rate(proc, seconds))
    return statistics.median(a), statistics.median(b)


def closest_proc(size: int, service_pid: int) -> tuple[str, int]:
    best: tuple[int, str, int] | None = None
    for pattern in PROC_CANDIDATES:
        path = pattern.format(service=service_pid)
        try:
            n = read_once(path)
        except OSError:
            continue
        if best is None or abs(n - size) < best[0]:
            best = (abs(n - size), path, n)
    assert best is not None
    return best[1], best[2]


class PrivateService:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cfs-bench-"))
        self.dir.chmod(0o755)
        self.socket = str(self.dir / "cfs.sock")
        self.view = str(self.dir / "view")
        self.runtime = str(self.dir / "state")
        self.cgroup = f"cfs-bench-{os.getpid()}"
        with open(self.dir / "service.log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "containerfs", "serve", "--socket", self.socket,
                 "--runtime-dir", self.runtime, "--cgroup", self.cgroup, "--mount", self.view,
                 "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 10
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                s.connect(self.socket)
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((self.dir / "service.log").read_text()) from None
                time.sleep(0.02)
            finally:
                s.close()
        os.environ["CONTAINERFS_SOCKET"] = self.socket

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        try:
            with open(os.path.join(self.runtime, "keeper.pid")) as f:
                os.kill(int(f.read()), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
        subprocess.run(["umount", "-l", self.view], stderr=subprocess.DEVNULL, check=False)
        CgroupTree(self.cgroup).remove_all()
        shutil.rmtree(self.dir, ignore_errors=True)


def cpu_busy(interval: float = 0.5) -> float:
    """The fraction of the machine's CPU time that was not idle over `interval` seconds."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # idle + iowait
    total0, idle0 = sample()
    time.sleep(interval)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def settle(limit: float = 30.0) -> float:
    """Wait until the machine is quiet (the kernel and the service finish work that creating
    containers left behind), so both files are measured on an idle machine."""
    deadline = time.monotonic() + limit
    while (busy := cpu_busy()) > 0.10 and time.monotonic() < deadline:
        pass
    return busy


def make_containers(n: int) -> None:
    for i in range(n):
        # Without kill-on-close a container stays listed after its handle is closed.
        os.close(syscalls.container_create(f"bench-{i}", 0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--containers", type=int, default=1000)
    ap.add_argument("--small", type=int, default=5, help="containers in the small table")
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/view.py: run as root (it starts a private service)", file=sys.stderr)
        return 1
    svc = PrivateService()
    try:
        table = os.path.join(svc.view, "containers")
        results = []
        made = 0
        for n in (args.small, args.containers):
            start = time.perf_counter()
            make_containers(n - made)
            made = n
            created = time.perf_counter() - start
            settle()
            size = read_once(table)
            with open(table, "rb") as f:
                rows = f.read().count(b"\n") - 2
            assert rows == n, f"the table lists {rows} containers, not {n}"
            proc, proc_size = closest_proc(size, svc.proc.pid)
            view_rate, proc_rate = compare(table, proc, args.seconds, args.rounds)
            results.append((n, size, view_rate, proc, proc_size, proc_rate, created))
        print(f"{'containers':>10} {'bytes':>7} {'view reads/s':>13} {'/proc file':<24} "
              f"{'bytes':>7} {'/proc reads/s':>14} {'ratio':>6}")
        for n, size, vr, proc, psize, pr, _ in results:
            name = proc.replace(f"/proc/{svc.proc.pid}/", "/proc/<service>/")
            print(f"{n:>10} {size:>7} {vr:>13.0f} {name:<24} {psize:>7} {pr:>14.0f} "
                  f"{vr / pr:>6.2f}")
        print(f"(reads: open, read to EOF, close, like cat; median of {args.rounds} rounds of "
              f"{args.seconds:g} s each, alternating; {os.cpu_count()} CPUs)")
    finally:
        svc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
