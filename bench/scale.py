"""Scale: one service holding many idle containers at once (issue 18).

Starts its own service in a temporary directory (its FUSE view there too) and creates N idle
containers (mount, PID, UTS, IPC namespaces; no init forked) through the public API. Each
handle is closed at once (no CONTAINER_KILL_ON_CLOSE, so the container stays, held by the
service alone): this process has the same fd limit as the service and must not hold N fds.
Prints, per block of 1,000, the create rate, the service's CPU per container (its namespace
maker's included), its RSS and fds (/proc/PID/status, /proc/PID/fd) and its keeper's; then forks into the oldest container (its namespaces re-opened
from where they are held), kills them all through the owner's Open and Kill requests, and
prints the fds left in service and keeper against the start.

Run as root: `python -m bench.scale [--count 10000]`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import syscalls
import syscalls.container
from syscalls import (
    CONTAINER_NEW_FS_NS, CONTAINER_NEW_IPC_NS, CONTAINER_NEW_PID_NS, CONTAINER_NEW_UTS_NS,
    client, protocol,
)

from .peers import proc_cpu

FLAGS = CONTAINER_NEW_FS_NS | CONTAINER_NEW_PID_NS | CONTAINER_NEW_UTS_NS | CONTAINER_NEW_IPC_NS
BLOCK = 1000


class Service:
    """A service of our own: its pid, its keeper's, and what to remove afterwards."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.sock = os.path.join(where, "cfs.sock")
        self.state = os.path.join(where, "state")
        self.cgroup = f"cfs-scale-{os.getpid()}"
        self.log = open(os.path.join(where, "service.log"), "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "containerfs", "serve", "--socket", self.sock,
             "--runtime-dir", self.state, "--cgroup", self.cgroup, "--log-level", "warning",
             "--mount", os.path.join(where, "view")],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(self.sock)
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the service did not start; see "
                                       f"{where}/service.log") from None
                time.sleep(0.02)
            finally:
                probe.close()
        with open(os.path.join(self.state, "keeper.pid")) as f:
            self.keeper = int(f.read())

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.keeper, signal.SIGKILL)  # the keeper we recorded, ours alone
        subprocess.run(["umount", "-l", os.path.join(self.where, "view")],
                       stderr=subprocess.DEVNULL, check=False)
        from containerfs.cgroups import CgroupTree
        CgroupTree(self.cgroup).remove_all()
        self.log.close()


@contextlib.contextmanager
def own_service() -> Iterator[Service]:
    where = tempfile.mkdtemp(prefix="cfs-scale-")
    svc = Service(where)
    os.environ["CONTAINERFS_SOCKET"] = svc.sock
    try:
        yield svc
    finally:
        os.environ.pop("CONTAINERFS_SOCKET", None)
        svc.stop()
        shutil.rmtree(where, ignore_errors=True)


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def snapshot(svc: Service) -> str:
    return (f"service {rss_mb(svc.proc.pid):6.1f} MB RSS {fds(svc.proc.pid):6d} fds; "
            f"keeper {rss_mb(svc.keeper):5.1f} MB {fds(svc.keeper):6d} fds")


def kill_all(ids: list[int]) -> None:
    """Kill each container through the owner's way in: Open (a new handle), Kill, close."""
    for cid in ids:
        try:
            _reply, got = client.call(protocol.Open(id=cid))
        except OSError:
            continue  # gone already
        try:
            syscalls.container_kill(got[0])
        finally:
            for fd in got:
                os.close(fd)


def settle(pid: int, timeout: float = 30) -> int:
    """The process's fd count once it stops falling (deaths are dealt with in the background)."""
    last, deadline = fds(pid), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = fds(pid)
        if now >= last:
            return now
        last = now
    return last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=10000)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"fd limit {hard}; {args.count} idle containers (mount, PID, UTS, IPC namespaces)")
    with own_service() as svc:
        time.sleep(0.5)  # the namespace pool fills
        start_svc, start_keeper = fds(svc.proc.pid), fds(svc.keeper)
        print(f"{'start':>14}: {snapshot(svc)}")
        made = 0
        error = None
        while made < args.count and error is None:
            cpu0, t0 = proc_cpu(svc.proc.pid, svc.keeper), time.perf_counter()
            n = 0
            for _ in range(min(BLOCK, args.count - made)):
                try:
                    fd = syscalls.container_create("idle", FLAGS)
                except OSError as e:
                    error = e
                    break
                os.close(fd)
                n += 1
            dt = time.perf_counter() - t0
            cpu = proc_cpu(svc.proc.pid, svc.keeper) - cpu0
            made += n
            if n:
                print(f"{made - n:>6}-{made:<6}: {n / dt:6.0f}/s, service CPU "
                      f"{cpu / n * 1000:.2f} ms each; {snapshot(svc)}")
        if error is not None:
            print(f"create stopped at {made}: {error}")
        ids = sorted(row["id"] for row in syscalls.container.container_list())
        print(f"held at once: {len(ids)} containers")
        if ids:  # the oldest container's namespaces are re-opened from where they are held
            _reply, got = client.call(protocol.Open(id=ids[0]))
            t0 = time.perf_counter()
            pid = syscalls.fork_into_container(got[0])
            if pid == 0:
                os._exit(0 if os.path.exists("/proc/self") else 1)
            _, status = os.waitpid(pid, 0)
            print(f"fork into the oldest container: {(time.perf_counter() - t0) * 1000:.1f} ms,"
                  f" exit status {status}")
            for fd in got:
                os.close(fd)
        t0 = time.perf_counter()
        kill_all(ids)
        print(f"killed {len(ids)} in {time.perf_counter() - t0:.1f} s")
        left_svc, left_keeper = settle(svc.proc.pid), settle(svc.keeper)
        print(f"{'after':>14}: {snapshot(svc)}")
        print(f"fds left: service {left_svc - start_svc:+d}, keeper {left_keeper - start_keeper:+d}"
              f" (bound: +100 each)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


if __name__ == "__main__":
    main()
