"""request_key() round trips in a container: intercepted (the creator answers) against found.

Run as root with a service up (CONTAINERFS_SOCKET names it). In one run, a process inside a
container whose `user` keys are trapped times, per call:
- intercepted: a key nobody has; the service queues it, the manager (this process, a plain
  blocking loop) instantiates it, the kernel hands it over;
- found (trapped type): the key is in the container's session keyring; the service looks,
  sees it there, and lets the kernel carry on;
- found (no callout): request_key() without callout info, which the service lets through
  at once (nothing could be constructed);
and, for scale, the same found request from a process in no container (the kernel alone).
Prints the medians and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import syscalls
from containerfs.keyring import intercept
from syscalls import CONTAINER_KILL_ON_CLOSE, CONTAINER_NEW_PID_NS, KEY_SPEC_SESSION_KEYRING, keys


def _timed(n: int, call: object) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        call(i)  # type: ignore[operator]
        out.append(time.perf_counter() - t)
    return out


def inside(n: int, w: int) -> None:
    """The requester, in the container."""
    keys.add_key("user", "present", b"here", KEY_SPEC_SESSION_KEYRING)
    warm = 20
    got = {
        "intercepted": _timed(n + warm, lambda i: keys.request_key(
            "user", f"new{i}", "cb", KEY_SPEC_SESSION_KEYRING))[warm:],
        "found": _timed(n + warm, lambda i: keys.request_key(
            "user", "present", "cb", KEY_SPEC_SESSION_KEYRING))[warm:],
        "found, no callout": _timed(n + warm, lambda i: keys.request_key(
            "user", "present", None, KEY_SPEC_SESSION_KEYRING))[warm:],
    }
    os.write(w, json.dumps(got).encode())


def outside(n: int) -> list[float]:
    """The same found request in a process of no container (a fresh session keyring)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            keys.join_session_keyring(None)
            keys.add_key("user", "present", b"here", KEY_SPEC_SESSION_KEYRING)
            times = _timed(n + 20, lambda i: keys.request_key(
                "user", "present", "cb", KEY_SPEC_SESSION_KEYRING))[20:]
            os.write(w, json.dumps(times).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    os.waitpid(pid, 0)
    return list(json.loads(data))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=500)
    args = ap.parse_args()
    cfd = syscalls.container_create("bench-keys", CONTAINER_NEW_PID_NS | CONTAINER_KILL_ON_CLOSE)
    r, w = os.pipe()
    with intercept(cfd, "user", timeout=30) as requests:
        pid = syscalls.fork_into_container(cfd)
        if pid == 0:
            try:
                os.close(r)
                inside(args.n, w)
            finally:
                os._exit(0)
        os.close(w)
        for _ in range(args.n + 20):
            requests.get(timeout=30).instantiate(b"answer")
        with os.fdopen(r) as f:
            got = json.loads(f.read())
        os.waitpid(pid, 0)
    os.close(cfd)
    got["found, no container"] = outside(args.n)
    med = {k: statistics.median(v) for k, v in got.items()}
    for name, value in med.items():
        print(f"request_key {name:<20} median {value * 1e6:8.1f} us")
    print(f"ratio intercepted/found: {med['intercepted'] / med['found']:.1f}x")
    print(f"ratio found in a container/found in no container: "
          f"{med['found'] / med['found, no container']:.1f}x")


if __name__ == "__main__":
    main()
