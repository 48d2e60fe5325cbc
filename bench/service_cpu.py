"""Where the service's CPU per container goes: cProfile or py-spy over the lifecycle loop.

`python -m bench.service_cpu [-n N] [--spy PATH-TO-py-spy] [--out DIR]` starts its own service
(under cProfile unless --spy is given: then plain, with py-spy attached to it for the loop),
runs N containers of bench.lifecycle's loop, then (with py-spy) measures one round trip
(container_status on a live container, 2000 times), and prints:
- the service's CPU per container (user and system, /proc/PID/stat) and per round trip;
- with cProfile: the functions of the service's main thread ranked by cumulative time per
  container (cProfile sees only the main thread: the namespace pool's worker threads show as
  the trio calls that wait for them; its overhead inflates every figure, compare ranks);
- with py-spy: inclusive samples per function over every thread, as ms per container
  (sampled at 1 kHz, so each sample is about 1 ms of CPU of one thread, idle samples left out).
The profile files stay in --out (default a new temporary directory).
"""

from __future__ import annotations

import argparse
import collections
import os
import pstats
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from typing import Any

import syscalls

from ._service import started_service
from .peers import FLAGS, TICK, one_containerfs

STATUS_FIELDS: dict[str, Any] = dict(id=7, name="bench", flags=0x3d8, owner=0, group=0, parent=1, state="running",
                     init_pid=1234, exit_status=None, members=[1234], user_ns=False)


def cpu(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def round_trips(pid: int, m: int) -> None:
    cfd = syscalls.container_create("rt", FLAGS)
    try:
        for _ in range(50):
            syscalls.container_status(cfd)
        times = []
        u0, s0 = cpu(pid)
        c0 = os.times()
        for _ in range(m):
            t = time.perf_counter()
            syscalls.container_status(cfd)
            times.append(time.perf_counter() - t)
        u1, s1 = cpu(pid)
        c1 = os.times()
    finally:
        os.close(cfd)
    print(f"round trip (container_status, {m}): wall median {statistics.median(times) * 1e6:.0f} us,"
          f" service CPU {(u1 - u0 + s1 - s0) / m * 1e6:.0f} us ({(s1 - s0) / m * 1e6:.0f} us system),"
          f" client CPU {(c1.user - c0.user + c1.system - c0.system) / m * 1e6:.0f} us")


def loop(pid: int, keeper: int | None, n: int) -> None:
    for _ in range(20):
        one_containerfs()
    time.sleep(0.5)
    u0, s0 = cpu(pid)
    k0 = sum(cpu(keeper)) if keeper else 0.0
    t = time.perf_counter()
    for _ in range(n):
        one_containerfs()
    wall = time.perf_counter() - t
    time.sleep(0.5)  # the death of the last ones, the pool's refill
    u1, s1 = cpu(pid)
    k1 = sum(cpu(keeper)) if keeper else 0.0
    print(f"{n} containers in {wall:.2f} s: service CPU {(u1 - u0 + s1 - s0) / n * 1e3:.2f} ms "
          f"per container (user {(u1 - u0) / n * 1e3:.2f}, system {(s1 - s0) / n * 1e3:.2f}); "
          f"keeper {(k1 - k0) / n * 1e3:.2f} ms")


def _echo_server(sock: socket.socket, kind: str) -> None:
    """Answer each datagram on `sock` until EOF: plain blocking calls, or trio's recvmsg and
    sendmsg as the service uses them (with the protocol's decode and encode for "trio+json")."""
    if kind == "plain":
        while True:
            data, _anc, _fl, _ = sock.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
            if not data:
                return
            sock.sendmsg([data])
        return
    import trio

    from syscalls import protocol, replies

    reply = protocol.encode(replies.ContainerStatus(**STATUS_FIELDS)) if kind == "trio+json" else b""

    async def serve() -> None:
        tsock = trio.socket.from_stdlib_socket(sock)
        while True:
            data, _anc, _fl, _ = await tsock.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
            if not data:
                return
            if kind == "trio+json":
                protocol.decode_request(data)
                data = protocol.encode(replies.ContainerStatus(**STATUS_FIELDS))
            await tsock.sendmsg([data or reply])
    trio.run(serve)


def echo_overhead(m: int) -> None:
    """Server CPU per request/reply pair of a bare echo server, plain and under trio."""
    from syscalls import protocol
    msg = protocol.encode(protocol.Status())
    for kind in ("plain", "trio", "trio+json"):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            a.close()
            try:
                _echo_server(b, kind)
            finally:
                os._exit(0)
        b.close()
        for _ in range(200):
            a.send(msg)
            a.recv(65536)
        u0, s0 = cpu(pid)
        t = time.perf_counter()
        for _ in range(m):
            a.send(msg)
            a.recv(65536)
        wall = time.perf_counter() - t
        u1, s1 = cpu(pid)
        a.close()
        os.waitpid(pid, 0)
        print(f"echo server, {kind:9}: {wall / m * 1e6:4.0f} us wall per round trip, server CPU "
              f"{(u1 - u0 + s1 - s0) / m * 1e6:4.0f} us ({(s1 - s0) / m * 1e6:.0f} us system)")


def show_cprofile(path: str, n: int, top: int) -> None:
    st = pstats.Stats(path)
    rows = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append((ct, tt, nc, f"{os.path.basename(file)}:{line}({func})"))
    print(f"\ncProfile, main thread, ms per container (of {n}): cumulative, own, calls/container")
    for ct, tt, nc, name in sorted(rows, reverse=True)[:top]:
        print(f"{ct / n * 1e3:8.3f} {tt / n * 1e3:8.3f} {nc / n:7.1f}  {name}")
    print("\nby own time:")
    for ct, tt, nc, name in sorted(rows, key=lambda r: -r[1])[:top]:
        print(f"{ct / n * 1e3:8.3f} {tt / n * 1e3:8.3f} {nc / n:7.1f}  {name}")


# Where a sample belongs: the first phase with a mark on its stack (a mark "a&b": frames
# matching a and b both there); "idle" is time py-spy counts though the thread waits (epoll, a worker
# thread's lock). Path: on the request's critical path, bg: in the background.
PHASES = [
    ("idle: epoll wait, worker waiting", ("EpollIOManager.get_events", "_thread_cache.py:211")),
    ("bg: namespace pool refill (worker thread)", ("NamespacePool.fill_once",)),
    ("path create: cgroup groups in every hierarchy", ("CgroupTree.create",)),
    ("path create: registry write (SQLite)", ("Store.save",)),
    ("path create: fds to the keeper (Registry.keep)", ("Connection._create&Registry.keep",)),
    ("path create: namespaces (pool take, mount ns copy)", ("Lifecycle._make_namespaces",)),
    ("path create: creator's namespaces from /proc", ("Peer.at_pid",)),
    ("path create: the fork plan", ("Forks.creator_plan",)),
    ("path create: keyring", ("create_session",)),
    ("path create: the rest", ("Connection._create",)),
    ("path fork: Fork (grant, fds to the keeper)", ("Connection._fork",)),
    ("path fork: Started (record init, fds to the keeper)", ("Connection._reported",)),
    ("path: other requests (keyring listener...)", ("Connection.dispatch",)),
    ("path: messages (receive, decode, encode, send)", ("Connection.run", "Admission._serve",
                                                       "_serve_connection")),
    ("bg: death (status, kill, keeper drop, keyring, fds)", ("Lifecycle.init_exited",
                                                             "Lifecycle._watch_init")),
    ("bg: cgroup removal", ("Lifecycle.remove_cgroup",)),
    ("bg: registry flush", ("Registry.flush_store",)),
    ("bg: pool filler task (thread hand-off)", ("Lifecycle.fill_pool",)),
    ("trio scheduler and the rest", ("",)),
]


def show_spy(path: str, n: int, top: int) -> None:
    """Per phase (PHASES), then inclusive and own samples per function, from py-spy's raw
    (collapsed) output."""
    incl: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    phases: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            c = int(count)
            total += c
            frames = stack.split(";")
            for fr in set(frames):
                incl[fr] += c
            own[frames[-1]] += c
            for name, marks in PHASES:
                look = frames[-1:] if name.startswith("idle") else frames
                if any(all(any(part in fr for fr in look) for part in m.split("&"))
                       for m in marks):
                    phases[name] += c
                    break
    busy = total - phases[PHASES[0][0]]
    print(f"\npy-spy, all threads: {total} samples, {busy} not idle ({busy / n:.2f} ms per "
          "container at 1 kHz)")
    for name, _ in PHASES:
        print(f"{phases[name] / n:7.3f} ms  {name}")
    print("\ninclusive ms/container, own ms/container, function")
    for fr, c in incl.most_common(top):
        print(f"{c / n:7.3f} {own[fr] / n:7.3f}  {fr[:150]}")


def show_perf(path: str, top: int) -> None:
    """The kernel's part of the service's CPU, by kernel function (own samples), and by the
    system call that led there (from the call chains)."""
    rep = subprocess.run(["perf", "report", "-i", path, "--stdio", "--no-children",
                          "--sort", "dso,sym", "-g", "none", "--percent-limit", "0.7"],
                         capture_output=True, text=True).stdout
    print("\nperf, the service process (all threads), own samples by function:")
    print("\n".join(line for line in rep.splitlines()
                    if line.strip() and not line.startswith("#"))[:6000])
    rep = subprocess.run(["perf", "report", "-i", path, "--stdio", "--children",
                          "--sort", "sym", "-g", "none", "--percent-limit", "1.5"],
                         capture_output=True, text=True).stdout
    print("\nperf, inclusive (children) by function, kernel and user:")
    print("\n".join(line for line in rep.splitlines()[:top + 12]
                    if line.strip() and not line.startswith("#")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=300)
    ap.add_argument("--spy", help="path of py-spy: sample with it instead of cProfile")
    ap.add_argument("--out", default=None)
    ap.add_argument("--top", type=int, default=45)
    ap.add_argument("--perf", action="store_true",
                    help="sample the service with perf (kernel and user) instead of cProfile")
    ap.add_argument("--view", action="store_true", help="with the FUSE view (in --out)")
    ap.add_argument("--echo", action="store_true", help="only the echo servers' overhead")
    args = ap.parse_args()
    if args.echo:
        echo_overhead(20000)
        return
    out = args.out or tempfile.mkdtemp(prefix="cfs-service-cpu-")
    os.makedirs(out, exist_ok=True)
    prof = os.path.join(out, "service.prof")
    view = os.path.join(out, "view") if args.view else ""
    if view:
        os.makedirs(view, exist_ok=True)
    with started_service(profile=None if args.spy or args.perf else prof, view=view) as svc:
        assert svc.pid is not None
        spy = None
        if args.spy:
            raw = os.path.join(out, "service.spy.txt")
            for _ in range(20):
                one_containerfs()
            spy = subprocess.Popen([args.spy, "record", "-p", str(svc.pid), "-r", "1000",
                                    "-f", "raw", "--threads", "-o", raw, "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # attached
        if args.perf:
            for _ in range(20):
                one_containerfs()
            spy = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "1999", "-g",
                                    "-p", str(svc.pid), "-o", os.path.join(out, "perf.data")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        if args.n:
            loop(svc.pid, svc.keeper_pid, args.n)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait()
        if spy is not None or not args.n:  # -n 0: profile round trips only
            round_trips(svc.pid, 2000)
    if args.perf:
        show_perf(os.path.join(out, "perf.data"), args.top)
    elif args.spy:
        show_spy(raw, args.n, args.top)
    else:
        # per container (the warm-up's too), or per round trip with -n 0
        show_cprofile(prof, args.n + 20 if args.n else 2050, args.top)
    print(f"\nprofiles in {out}")


if __name__ == "__main__":
    main()
