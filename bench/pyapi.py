"""Container(...).run(["/bin/true"]) in a fresh container (PID, mount, UTS, IPC, net) from a
process holding 200 MB, against `unshare --fork --pid --mount --uts --ipc --net --mount-proc
/bin/true` started by the same process, in one run; prints the median of each and the ratio.

    python -m bench.pyapi [ROUNDS]     (root; starts a service unless CONTAINERFS_SOCKET is set)
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from containerfs import Container, spawn
from syscalls import (
    CONTAINER_NEW_FS_NS, CONTAINER_NEW_IPC_NS, CONTAINER_NEW_NET_NS, CONTAINER_NEW_PID_NS,
    CONTAINER_NEW_UTS_NS,
)

from ._service import running_service

FLAGS = (CONTAINER_NEW_PID_NS | CONTAINER_NEW_FS_NS | CONTAINER_NEW_UTS_NS
         | CONTAINER_NEW_IPC_NS | CONTAINER_NEW_NET_NS)
UNSHARE = ["unshare", "--fork", "--pid", "--mount", "--uts", "--ipc", "--net", "--mount-proc",
           "/bin/true"]


def ours() -> float:
    t = time.perf_counter()
    with Container("bench", FLAGS) as c:
        c.run(["/bin/true"], check=True)
    return time.perf_counter() - t


def theirs() -> float:
    t = time.perf_counter()
    subprocess.run(UNSHARE, check=True)
    return time.perf_counter() - t


def main(rounds: int) -> None:
    ballast = bytearray(200 << 20)
    for i in range(0, len(ballast), 4096):  # touched: really held
        ballast[i] = 1
    with running_service():
        ours(), theirs()  # warm up
        a: list[float] = []
        b: list[float] = []
        c: list[float] = []
        d: list[float] = []
        for _ in range(rounds):  # interleaved: all see the same machine
            a.append(ours())  # root: container_spawn, in this process
            b.append(theirs())
            spawn.USE_CSPAWN = False  # the spawn server (root, where container_spawn cannot)
            d.append(ours())
            spawn.USE_SERVER = False  # a helper per process (what a non-root caller gets)
            c.append(ours())
            spawn.USE_SERVER = spawn.USE_CSPAWN = True
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"Container.run(/bin/true): median {ma * 1e3:.1f} ms, p90 "
          f"{sorted(a)[int(rounds * 0.9)] * 1e3:.1f} ms")
    print(f"unshare ... /bin/true:    median {mb * 1e3:.1f} ms, p90 "
          f"{sorted(b)[int(rounds * 0.9)] * 1e3:.1f} ms")
    for label, times in (("through the spawn server", d), ("with a helper per process", c)):
        print(f"{label}: median {statistics.median(times) * 1e3:.1f} ms, "
              f"{statistics.median(times) / mb:.2f}x")
    print(f"ratio: {ma / mb:.2f}x (held {len(ballast) >> 20} MB, {rounds} rounds)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
