"""container_socket against making a socket in a netns the way `ip netns exec` and pyroute2 do.

The other way: fork, setns(CLONE_NEWNET) in the child, socket(), send the fd back over
SCM_RIGHTS, wait for the child. Both run in the same process, interleaved, on one container with
a new network namespace. Also timed: socketns (no service round trip), plain socket(), and a
non-root owner's container_socket into its CONTAINER_NEW_USER_NS container (a forked helper).

Uses the service named by CONTAINERFS_SOCKET, or starts its own in a temporary directory.
Run as root: python -m bench.sockets [-n 2000]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import syscalls
from syscalls import CONTAINER_NEW_NET_NS, CONTAINER_NEW_USER_NS, linux, container_socket, socketns

ROOT = Path(__file__).resolve().parent.parent
SIOCGSKNS = 0x894C
NS_GET_USERNS = 0xB701
NOBODY = 65534


@contextmanager
def service() -> Iterator[None]:
    """The service in CONTAINERFS_SOCKET, or a private one for the length of the run."""
    if os.environ.get("CONTAINERFS_SOCKET"):
        yield
        return
    from containerfs.cgroups import CgroupTree

    where = Path(tempfile.mkdtemp(prefix="cfs-bench-"))
    where.chmod(0o755)  # the non-root run must reach the socket
    sock, cgroup = str(where / "cfs.sock"), f"cfs-bench-{os.getpid()}"
    log = where / "service.log"
    proc = subprocess.Popen([sys.executable, "-m", "containerfs", "serve", "--socket", sock,
                             "--runtime-dir", str(where / "state"), "--cgroup", cgroup,
                             "--no-mount", "--log-level", "warning"],
                            stdin=subprocess.DEVNULL, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 10
        while not _listening(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerfs service did not start:\n{log.read_text()}")
            time.sleep(0.02)
        os.environ["CONTAINERFS_SOCKET"] = sock
        yield
    finally:
        proc.terminate()
        proc.wait()
        try:  # the keeper outlives the service on purpose; this run ends it
            os.kill(int((where / "state" / "keeper.pid").read_text()), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
        CgroupTree(cgroup).remove_all()
        shutil.rmtree(where, ignore_errors=True)


def _listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
        try:
            probe.connect(path)
            return True
        except OSError:
            return False


def fork_setns_socket(netfd: int, userfd: int = -1) -> int:
    """The `ip netns exec`/pyroute2 way: a forked child enters, makes the socket, sends it.

    With `userfd`, the child enters that user namespace first (as `nsenter --user --net`).
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        pid = os.fork()
        if pid == 0:
            try:
                if userfd >= 0:
                    linux.setns(userfd, linux.CLONE_NEWUSER)
                linux.setns(netfd, linux.CLONE_NEWNET)
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socket.send_fds(theirs, [b"\0"], [s.fileno()])
            finally:
                os._exit(0)
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        os.waitpid(pid, 0)
    return fds[0]


def timed(fn: Callable[[], int], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fd = fn()
        out.append(time.perf_counter() - t)
        os.close(fd)
    return out


def unprivileged(n: int) -> dict[str, list[float]]:
    """A non-root owner's container_socket (the forked-helper path) against a fork that enters
    the user and network namespaces itself, interleaved, in a child running as nobody."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            cfd = syscalls.container_create("bench-user",
                                            CONTAINER_NEW_USER_NS | CONTAINER_NEW_NET_NS)
            holder = container_socket(cfd, socket.AF_INET, socket.SOCK_DGRAM, 0)
            netfd = fcntl.ioctl(holder, SIOCGSKNS)  # the owner may: CAP_NET_ADMIN in its userns
            userfd = fcntl.ioctl(netfd, NS_GET_USERNS)
            ways: dict[str, Callable[[], int]] = {
                "container_socket (non-root, userns)": lambda: container_socket(
                    cfd, socket.AF_INET, socket.SOCK_STREAM, 0),
                "fork+setns user,net+socket (non-root)": lambda: fork_setns_socket(netfd, userfd),
            }
            os.write(w, json.dumps(interleaved(ways, n)).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data) if data else {}


def interleaved(ways: dict[str, Callable[[], int]], n: int) -> dict[str, list[float]]:
    """Time each way n times, in four interleaved rounds so drift hits every way alike."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    for fn in ways.values():
        timed(fn, 20)  # warm up
    for _ in range(4):
        for name, fn in ways.items():
            times[name] += timed(fn, n // 4)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=2000)
    args = ap.parse_args()
    with service():
        cfd = syscalls.container_create("bench", CONTAINER_NEW_NET_NS)
        holder = container_socket(cfd, socket.AF_INET, socket.SOCK_DGRAM, 0)
        netfd = fcntl.ioctl(holder, SIOCGSKNS)  # the container's netns, for the other ways
        ways: dict[str, Callable[[], int]] = {
            "container_socket (root)": lambda: container_socket(
                cfd, socket.AF_INET, socket.SOCK_STREAM, 0),
            "fork+setns+socket+SCM_RIGHTS": lambda: fork_setns_socket(netfd),
            "socketns (root)": lambda: socketns(netfd, socket.AF_INET, socket.SOCK_STREAM, 0),
            "plain socket() in own netns": lambda: socket.socket().detach(),
        }
        times = interleaved(ways, args.n)
        user = unprivileged(args.n // 2)
        os.close(netfd)
        os.close(holder)
        os.close(cfd)
    med = {name: statistics.median(t) for name, t in times.items()}
    umed = {name: statistics.median(t) for name, t in user.items()}
    for name, m in {**med, **umed}.items():
        print(f"{name:40s} median {m * 1e6:8.1f} us")
    ratio = med["container_socket (root)"] / med["fork+setns+socket+SCM_RIGHTS"]
    print(f"ratio container_socket/fork+setns (root):     {ratio:.2f}x")
    if umed:
        ratio = (umed["container_socket (non-root, userns)"]
                 / umed["fork+setns user,net+socket (non-root)"])
        print(f"ratio container_socket/fork+setns (non-root): {ratio:.2f}x")


if __name__ == "__main__":
    main()
