"""Container lifecycle: create + fork_into_container(/bin/true) + POLLHUP, against unshare(1).

Starts its own service in a temporary directory unless CONTAINERFS_SOCKET names a running one.
Run as `python -m bench.lifecycle`. Prints both medians, the ratio, and the throughput with two
creators at once; then, for scale, two plain-Python floors measured in the same process: a
fork + exec of /bin/true (what any fork semantics cost from this process), and a fork that
unshares the same namespaces, forks and execs (no service, no cgroup, no keyring).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import time
from collections.abc import Callable

from syscalls import linux

from ._service import running_service
from .peers import UNSHARE, one_containerfs

# The same container as bench/peers.py's, made the same way.
one_container = one_containerfs


def one_unshare() -> None:
    subprocess.run(UNSHARE, check=True)


def one_python_fork() -> None:
    pid = os.fork()
    if pid == 0:
        os.execv("/bin/true", ["/bin/true"])
    os.waitpid(pid, 0)


def one_python_unshare() -> None:
    pid = os.fork()
    if pid == 0:
        try:
            linux.unshare(linux.CLONE_NEWPID | linux.CLONE_NEWNS | linux.NS_FLAGS["uts"]
                           | linux.NS_FLAGS["ipc"] | linux.NS_FLAGS["net"])
            inner = os.fork()
            if inner == 0:
                os.execv("/bin/true", ["/bin/true"])
            os.waitpid(inner, 0)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _throughput_worker(n: int) -> None:
    for _ in range(n):
        one_container()


def throughput(creators: int, per_creator: int) -> float:
    t = time.perf_counter()
    procs = [multiprocessing.Process(target=_throughput_worker, args=(per_creator,))
             for _ in range(creators)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return creators * per_creator / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=200)
    args = ap.parse_args()
    with running_service():
        run(args.n)


def run(n: int) -> None:
    timed(one_container, 10)
    timed(one_unshare, 10)
    ours, theirs = [], []
    for _ in range(4):  # interleave, so drift in the machine hits both alike
        ours += timed(one_container, n // 4)
        theirs += timed(one_unshare, n // 4)
    mo, mu = statistics.median(ours), statistics.median(theirs)
    print(f"containerfs create+fork+POLLHUP  median {mo * 1e3:.2f} ms")
    print(f"unshare --fork --pid ... /bin/true median {mu * 1e3:.2f} ms")
    print(f"ratio containerfs/unshare: {mo / mu:.2f}x")
    print(f"throughput, 2 creators: {throughput(2, n // 4):.0f} containers/s")
    floors, theirs = [], []
    for fn in (one_python_fork, one_python_unshare):
        timed(fn, 5)
        floors.append(statistics.median(timed(fn, n // 2)))
        theirs += timed(one_unshare, n // 4)
    mu = statistics.median(theirs)
    print(f"floor, python fork+exec            median {floors[0] * 1e3:.2f} ms ({floors[0] / mu:.2f}x)")
    print(f"floor, python fork+unshare+fork+exec median {floors[1] * 1e3:.2f} ms "
          f"({floors[1] / mu:.2f}x)")


if __name__ == "__main__":
    main()
