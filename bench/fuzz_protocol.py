"""Fuzz the control socket's protocol against a live service.

A seeded generator makes random, truncated, oversized and wrongly typed messages for every op
in `protocol.REQUESTS`, with fds of every kind beside them (pipes, a regular file, a directory
O_PATH, a socket, an eventfd, a pidfd, /dev/null, a memfd). Two phases:

- blind: no container handle is ever sent, and every message has a defect, so every message
  must get an error reply or a closed connection (a one-way message: silence, then the reply
  to a probe sent after it on the same connection);
- with a handle: a real container's handle first, other fields well typed but random, so
  requests go deep into the service; any reply is fine, a hang or an internal error is not.

A crash is: the service gone, a reply saying "internal error", a traceback in its log, or no
answer within the timeout. The service's fd count and RSS are read at the start and the end.

Run as `python -m bench.fuzz_protocol [--messages N] [--seed S]` (root): it starts a service
of its own (no FUSE view) and prints the figures; exit status 1 if it found a crash or a leak.
tests/test_fuzz.py runs two thousand messages against the test's service.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import syscalls
from syscalls import CONTAINER_NEW_NET_NS, CONTAINER_NEW_PID_NS, client, fdpass, protocol

FD_KINDS = ("pipe_r", "pipe_w", "file", "dir_opath", "socket", "eventfd", "pidfd", "devnull",
            "memfd")
# Sent after a one-way message on the same connection: its own error reply shows that the
# one-way message was taken in silence, as it must be.
PROBE = b'{"op":"list","fuzz_probe":1}'
REPLY_TIMEOUT = 10.0
ONE_WAY = frozenset(op for op, cls in protocol.REQUESTS.items() if cls.one_way)
# Ops that a well-formed message without a handle could make succeed (a container made, a
# key request taken): in the blind phase they always carry a structural defect.
_NO_FD_OPS = frozenset(op for op, cls in protocol.REQUESTS.items() if cls.nfds == 0)

INTS = [0, 1, -1, 2, 7, 255, 4096, 2**31 - 1, 2**31, -2**31, 2**32, 2**63 - 1, 2**63, -2**63,
        2**64, 10**30, -10**30]
STRS = ["", "x", "user", "keyring", "*", ".", "..", "/", "a/b", "../../etc", "/proc/self/root",
        "x" * 23, "x" * 24, "x" * 300, "x" * 5000, "\udcff", "\udc80abc", "\u00e9", "\u65e5\u672c",
        "instantiate", "negate", "reject", "%x", " ", "a b", "\n", ".hidden", "tmp"]
BAD_TEXT = ["\ud800", "a\udbff", "\udfff\ud800", "a\0b", "\0", "tmp\0/etc"]
WRONG_VALUES: list[Any] = [1.5, True, False, None, [], [1], {}, {"a": 1}, "7", 7, 1e400,
                           [[[[[[[[[[]]]]]]]]]]]


class ServiceGone(Exception):
    """The service no longer accepts connections: the end of the run, and a finding."""


@dataclass
class Message:
    data: bytes
    fds: list[str]  # kinds, from FD_KINDS, or "handle"
    op: str  # the op it aims at ("" if none)
    defect: str  # what is wrong with it ("" in the handle phase)


@dataclass
class Findings:
    sent: int = 0
    replies: int = 0
    closed: int = 0
    silent: int = 0  # one-way messages answered by the probe's reply
    successes: int = 0  # non-error replies (handle phase only)
    crashes: list[str] = field(default_factory=list)
    ops: collections.Counter[str] = field(default_factory=collections.Counter)
    fd_kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    defects: collections.Counter[str] = field(default_factory=collections.Counter)

    def crash(self, what: str, msg: Message) -> None:
        self.crashes.append(f"{what}: op={msg.op} defect={msg.defect} fds={msg.fds} "
                            f"data={msg.data[:160]!r}")


class FdKit:
    """One open fd of each kind, kept for the run and sent as often as needed (the kernel
    gives the service its own copies)."""

    def __init__(self, where: str) -> None:
        self.fds: dict[str, int] = {}
        self._child: int = 0
        r, w = os.pipe2(os.O_CLOEXEC)
        self.fds["pipe_r"], self.fds["pipe_w"] = r, w
        path = os.path.join(where, "fuzz.file")
        with open(path, "wb") as f:
            f.write(b"data\n")
        self.fds["file"] = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        # A plain directory, not a mount's root: a move_mount fed with it must fail.
        os.makedirs(os.path.join(where, "fuzz.dir"), exist_ok=True)
        self.fds["dir_opath"] = os.open(os.path.join(where, "fuzz.dir"),
                                        os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._pair = (a, b)
        self.fds["socket"] = a.fileno()
        self.fds["eventfd"] = os.eventfd(0, os.EFD_CLOEXEC)
        self._child = os.fork()
        if self._child == 0:  # a live process to name; killed by close()
            try:
                os.read(r, 1)
            finally:
                os._exit(0)
        self.fds["pidfd"] = os.pidfd_open(self._child)
        self.fds["devnull"] = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        self.fds["memfd"] = os.memfd_create("fuzz", os.MFD_CLOEXEC)

    def close(self) -> None:
        for name, fd in self.fds.items():
            if name != "socket":
                os.close(fd)
        for s in self._pair:
            s.close()
        if self._child:
            os.kill(self._child, signal.SIGKILL)
            os.waitpid(self._child, 0)


class Generator:
    """Messages from a seeded random source: the same seed gives the same blind messages (the
    handle phase also follows the service's answers: ids, how far a fork gets)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.ops = sorted(protocol.REQUESTS)

    def _int(self) -> int:
        r = self.rng
        return r.choice(INTS) if r.random() < 0.6 else r.randint(-2**40, 2**40)

    def _str(self) -> str:
        r = self.rng
        if r.random() < 0.7:
            return r.choice(STRS)
        return "".join(chr(r.choice([r.randint(32, 126), r.randint(0xA0, 0xD7FF),
                                     r.randint(0xDC80, 0xDCFF), r.randint(0xE000, 0x10FFFF)]))
                       for _ in range(r.randint(1, 40)))

    def fields(self, cls: type[protocol.Request], ids: list[int]) -> dict[str, Any]:
        """Well-typed random values (optional fields sometimes left out)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING and self.rng.random() < 0.3:
                continue
            if str(f.type) == "str":
                out[f.name] = self._str()
            elif f.name == "id" and ids and self.rng.random() < 0.5:
                out[f.name] = self.rng.choice(ids)
            else:
                out[f.name] = self._int()
        return out

    def _fd_kinds(self, n: int) -> list[str]:
        return [self.rng.choice(FD_KINDS) for _ in range(n)]

    def blind(self) -> Message:
        """A message with at least one defect, and no handle among its fds."""
        r = self.rng
        op = r.choice(self.ops)
        cls = protocol.REQUESTS[op]
        body: dict[str, Any] = {"op": op, **self.fields(cls, [])}
        nfds = cls.nfds
        str_fields = [f.name for f in dataclasses.fields(cls) if str(f.type) == "str"]
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        defects = ["garbage", "truncated", "not_object", "oversized", "wrong_type",
                   "unknown_field", "unknown_op", "fd_count"]
        if str_fields:
            defects.append("bad_text")
        if required:
            defects.append("missing")
        if op not in _NO_FD_OPS:
            defects += ["fd_kind"] * 3  # right count, wrong kind: the service's deepest path
        defect = r.choice(defects)
        data: bytes | None = None
        if defect == "garbage":
            data = r.randbytes(r.randint(1, 200))
        elif defect == "truncated":
            whole = json.dumps(body).encode()
            data = whole[:r.randint(1, len(whole) - 1)]
        elif defect == "not_object":
            data = json.dumps(r.choice([[body], 1, "op", None, True, [], 1.5])).encode()
        elif defect == "oversized":
            body["pad"] = "x" * r.randint(protocol.MAX_MESSAGE, protocol.MAX_MESSAGE + 60000)
        elif defect == "wrong_type":
            names = [f.name for f in dataclasses.fields(cls)] or ["op"]
            name = r.choice(names)
            types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
            want: type = int if types.get(name) == "int" else str
            values = [v for v in WRONG_VALUES if type(v) is not want]
            body[name] = r.choice(values)
        elif defect == "unknown_field":
            body[r.choice(["extra", "fds", "pid_", "\udcff", "op2", "Op"])] = self._int()
        elif defect == "unknown_op":
            body["op"] = r.choice(["", "nope", "CREATE", "create ", "kill\0", 1, None, ["list"],
                                   {"op": "list"}, "\ud800", op + "x"])
        elif defect == "bad_text":
            body[r.choice(str_fields)] = r.choice(BAD_TEXT)
        elif defect == "missing":
            del body[r.choice(required)]
        elif defect == "fd_count":
            wrong = [n for n in range(protocol.MAX_FDS + 9) if n != nfds
                     and not (op == "kill" and n == 1)]
            nfds = r.choice(wrong)
        if data is None:
            data = json.dumps(body).encode()
        if defect == "fd_count" and op == "kill" and nfds == 0:
            nfds = 2
        return Message(data, self._fd_kinds(nfds), op, defect)

    def with_handle(self, ids: list[int]) -> Message:
        """A well-typed message; the first fd (where it takes fds) a real handle."""
        r = self.rng
        # Forks more often than the rest: what follows one on its connection goes deepest.
        op = "fork" if r.random() < 0.15 else r.choice(self.ops)
        cls = protocol.REQUESTS[op]
        nfds = cls.nfds if not (op == "kill" and r.random() < 0.5) else 1
        kinds = self._fd_kinds(nfds)
        if kinds and r.random() < 0.9:
            kinds[0] = "handle"
        body = {"op": op, **self.fields(cls, ids)}
        return Message(json.dumps(body).encode(), kinds, op, "")

    def after_fork(self, ids: list[int]) -> Message:
        """A message on a connection that has begun a fork: mostly its report or a listener."""
        r = self.rng
        op = r.choice(["started", "started_noreply", "fork_failed", "key_listener",
                       "key_listener", r.choice(self.ops)])
        cls = protocol.REQUESTS[op]
        kinds = self._fd_kinds(cls.nfds if r.random() < 0.9 else r.randint(0, 3))
        if kinds and op not in ("started", "started_noreply", "key_listener") and r.random() < 0.8:
            kinds[0] = "handle"
        body = {"op": op, **self.fields(cls, ids)}
        return Message(json.dumps(body).encode(), kinds, op, "after fork")


class Fuzzer:
    """Sends messages to the service at `socket_path` and judges every answer."""

    def __init__(self, socket_path: str, kit: FdKit, log: Path | None = None) -> None:
        self.path = socket_path
        self.kit = kit
        self.log = log
        self.found = Findings()
        self.handle = -1
        self.ids: list[int] = []  # the id of the container behind the handle
        self.containers_made = 0
        self._sock: socket.socket | None = None
        self.last: Message | None = None

    # ---- the container behind the handle phase --------------------------------------

    def fresh_container(self) -> None:
        """A container of our own to send the handle of (a new one once it is dead)."""
        self.drop_container()
        self.handle = syscalls.container_create("fuzz", CONTAINER_NEW_PID_NS | CONTAINER_NEW_NET_NS)
        self.ids = [syscalls.container_status(self.handle)["id"]]
        self.containers_made += 1

    def _remove(self, cid: int) -> None:
        """Kill a container a fuzzed create made (its handle, closed already, had the only
        reference): it is then removed like the others."""
        with contextlib.suppress(OSError):
            client.call(protocol.Kill(id=cid))
        self.containers_made += 1

    def drop_container(self) -> None:
        if self.handle >= 0:
            with contextlib.suppress(OSError):
                syscalls.container_kill(self.handle)
            os.close(self.handle)
            self.handle = -1

    # ---- sending and judging --------------------------------------------------------

    def _connection(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                sock.connect(self.path)
            except OSError as e:
                sock.close()
                raise ServiceGone(f"cannot connect to {self.path}: {e}") from None
            sock.settimeout(REPLY_TIMEOUT)
            self._sock = sock
        return self._sock

    def _hang_up(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def send(self, msg: Message, blind: bool, stay: bool = False) -> bool:
        """Send one message and judge what comes back. True if the connection is left open
        for more (only with `stay`, after a reply that keeps it: a fork begun, an error)."""
        f = self.found
        self.last = msg
        f.sent += 1
        f.ops[msg.op] += 1
        f.fd_kinds.update(msg.fds)
        f.defects[msg.defect] += 1
        fds = [self.handle if k == "handle" else self.kit.fds[k] for k in msg.fds]
        s = self._connection()
        try:
            if fds:
                socket.send_fds(s, [msg.data], fds)
            else:
                s.send(msg.data)
        except (BrokenPipeError, ConnectionResetError):
            # Dropped after our previous message (a reply we did not wait for): again, anew.
            self._hang_up()
            f.sent -= 1
            f.ops[msg.op] -= 1
            f.fd_kinds.subtract(msg.fds)
            f.defects[msg.defect] -= 1
            return self.send(msg, blind, stay=False)
        probed = msg.op in ONE_WAY
        if probed:
            with contextlib.suppress(OSError):  # it may have hung up already: that is fine
                s.send(PROBE)
        try:
            data, rfds, _ = fdpass.recv_fds(s, protocol.MAX_MESSAGE, protocol.MAX_FDS)
        except TimeoutError:
            f.crash(f"no answer in {REPLY_TIMEOUT} s", msg)
            self._hang_up()
            return False
        except ConnectionResetError:
            data, rfds = b"", []
        for fd in rfds:
            os.close(fd)
        if not data:
            f.closed += 1
            self._hang_up()
            return False
        f.replies += 1
        try:
            reply = protocol.decode_reply(data)
        except protocol.ProtocolError:
            f.crash("a reply that is not JSON", msg)
            self._hang_up()
            return False
        message = str(reply.get("message", ""))
        if "internal error" in message:
            f.crash(f"internal error ({message[:200]})", msg)
        elif "fuzz_probe" in message:
            f.silent += 1  # the one-way message was taken without a word, as it must be
        elif "errno" not in reply:
            if blind:
                f.crash(f"success without a handle: {str(reply)[:200]}", msg)
            else:
                f.successes += 1
            if msg.op == "create" and isinstance(reply.get("id"), int):
                self._remove(reply["id"])
        # After a probe, a success (a fork begun, a channel opened) or an error that drops
        # the connection, nothing more is read on it unless the caller asked to go on: the
        # next message gets a new connection, so every answer is attributable.
        if probed or message.startswith("bad request") or ("errno" not in reply and not stay):
            self._hang_up()
            return False
        return True

    def blind_phase(self, gen: Generator, n: int) -> None:
        for _ in range(n):
            self.send(gen.blind(), blind=True)

    def handle_phase(self, gen: Generator, n: int) -> None:
        sent = 0
        while sent < n:
            if self.handle < 0 or not _alive(self.handle):
                self.fresh_container()
            msg = gen.with_handle(self.ids)
            sent += 1
            if not self.send(msg, blind=False, stay=msg.op == "fork") or msg.op != "fork":
                continue
            # A fork begun on this connection: what a forking caller may send next (its
            # report, a seccomp listener, anything), until the connection is let go.
            for _ in range(gen.rng.randint(1, 3)):
                sent += 1
                if not self.send(gen.after_fork(self.ids), blind=False, stay=True):
                    break
            self._hang_up()
        self._hang_up()
        self.drop_container()

    def log_crashes(self, since: int) -> list[str]:
        """What the service logged with a traceback (or as an internal error) after byte
        `since`: the log line and the exception it ended with."""
        if self.log is None:
            return []
        lines = self.log.read_bytes()[since:].decode(errors="replace").splitlines()
        out = []
        for i, line in enumerate(lines):
            # A traceback chained to another ("During handling of...") is the same crash.
            chained = i > 1 and lines[i - 2].startswith("During handling")
            if "internal error" in line or line.startswith("Traceback") and not chained:
                said = lines[i - 1] if line.startswith("Traceback") and i else line
                end = next((x for x in lines[i + 1:] if x and not x.startswith(" ")), "")
                out.append(f"logged: {said.strip()} / {end.strip()}")
        return out


def _alive(handle: int) -> bool:
    import select
    p = select.poll()
    p.register(handle, select.POLLHUP)
    return not p.poll(0)


# ---- what the service holds --------------------------------------------------------------

def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_targets(pid: int) -> collections.Counter[str]:
    """What the service's fds refer to, counted: to name what a leak is made of."""
    out: collections.Counter[str] = collections.Counter()
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            out[os.readlink(f"/proc/{pid}/fd/{name}")] += 1
    return out


def leaked(before: collections.Counter[str], after: collections.Counter[str]) -> dict[str, int]:
    """Targets held more (or less) at the end, but "/": a removed container keeps its root
    (Service.gone, so that *at() calls on a handle still held work once it is dead), unless it
    never had one (CONTAINER_NEW_EMPTY_FS_NS without a root set)."""
    diff = after.copy()
    diff.subtract(before)
    # The pool's namespaces are replaced by fresh ones: same count, other inodes.
    kinds: collections.Counter[str] = collections.Counter()
    for target, n in diff.items():
        if target.startswith(("net:[", "uts:[", "ipc:[")):
            kinds[target.split(":")[0]] += n
        elif n and target != "/":
            kinds[target] += n
    return {k: n for k, n in kinds.items() if n}


def forget_idle_connections() -> None:
    """Close this process's idle connections to the service (syscalls keeps up to four for
    its next calls): the service's end of them is no leak."""
    with client._idle_lock:
        while client._idle:
            client._idle.pop().close()


def settled_fds(pid: int, want: int | None = None, timeout: float = 10.0,
                quiet: float = 0.5) -> int:
    """The service's fd count once it equals `want` (or, without one, once it has not
    changed for `quiet` s): its pool is refilled and dead containers are dealt with lazily."""
    deadline = time.monotonic() + timeout
    last, since = fd_count(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = fd_count(pid)
        if want is not None and now == want:
            return now
        if now != last:
            last, since = now, time.monotonic()
        elif want is None and time.monotonic() - since >= quiet:
            return now
    return last


def normal_use() -> None:
    """create, fork, kill: what a client does; raises if the service does not serve it."""
    cfd = syscalls.container_create("after", CONTAINER_NEW_PID_NS | CONTAINER_NEW_NET_NS)
    try:
        pid = syscalls.fork_into_container(cfd)
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        syscalls.container_kill(cfd)
        _, status = os.waitpid(pid, 0)
        if not os.WIFSIGNALED(status) or os.WTERMSIG(status) != signal.SIGKILL:
            raise AssertionError(f"init was not killed: status {status:#x}")
    finally:
        os.close(cfd)


# ---- a service of our own ----------------------------------------------------------------

@contextlib.contextmanager
def own_service(log_level: str = "info", keep: bool = False
                ) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """A fresh service (no FUSE view) in a temporary directory: (process, socket, log). With
    `keep`, the directory (its log, its registry) is left for a post-mortem."""
    from containerfs.cgroups import CgroupTree

    where = Path(tempfile.mkdtemp(prefix="cfs-fuzz-"))
    sock = str(where / "cfs.sock")
    log = where / "service.log"
    cgroup = f"cfs-fuzz-{os.getpid()}"
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "containerfs", "serve", "--socket", sock,
                             "--runtime-dir", str(where / "state"), "--cgroup", cgroup,
                             "--no-mount", "--log-level", log_level],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=root)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):  # it appears listening (rundir.listen_unix)
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not start:\n{log.read_text()}")
            time.sleep(0.02)
        old = os.environ.get("CONTAINERFS_SOCKET")
        os.environ["CONTAINERFS_SOCKET"] = sock
        try:
            yield proc, sock, log
        finally:
            if old is None:
                os.environ.pop("CONTAINERFS_SOCKET", None)
            else:
                os.environ["CONTAINERFS_SOCKET"] = old
    finally:
        if proc.poll() is not None:  # it died under us: its last words are the finding
            tail = log.read_text(errors="replace").splitlines()[-60:]
            print(f"the service exited with status {proc.returncode}; its log ends:",
                  *tail, sep="\n  ", file=sys.stderr)
        else:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
            os.kill(int((where / "state" / "keeper.pid").read_text()), signal.SIGKILL)
        CgroupTree(cgroup).remove_all()
        if keep:
            print(f"the service's directory is kept: {where}", file=sys.stderr)
        else:
            shutil.rmtree(where, ignore_errors=True)


@dataclass
class Run:
    """What a fuzz run found, and what the service held before and after it."""
    found: Findings
    seconds: float
    fds: tuple[int, int]
    rss_kib: tuple[int, int]
    containers: int  # made and removed meanwhile
    roots: int  # fds of "/" held more at the end: removed containers' roots (see leaked())
    leaks: dict[str, int]
    log_crashes: list[str]

    @property
    def crashes(self) -> list[str]:
        return self.found.crashes + self.log_crashes


def run(proc: subprocess.Popen[bytes], sock: str, log: Path, messages: int, seed: int,
        handle_share: float, progress: bool = False) -> Run:
    """Fuzz the service `proc` at `sock` with `messages` messages; a normal create, fork and
    kill before (what the service makes lazily is then made) and after (it still serves)."""
    gen = Generator(seed)
    with tempfile.TemporaryDirectory() as tmp:
        kit = FdKit(tmp)
        fuzz = Fuzzer(sock, kit, log)
        try:
            normal_use()
            forget_idle_connections()
            fds0 = settled_fds(proc.pid)
            targets0, rss0 = fd_targets(proc.pid), rss_kib(proc.pid)
            logged = len(log.read_bytes())
            t0 = time.monotonic()
            done = 0
            while done < messages and proc.poll() is None:
                n = min(1000, messages - done)
                with_handle = round(n * handle_share)
                try:
                    fuzz.blind_phase(gen, n - with_handle)
                    fuzz.handle_phase(gen, with_handle)
                except ServiceGone as e:
                    fuzz.found.crashes.append(f"{e} (after message {fuzz.found.sent}: "
                                              f"{fuzz.last!r})")
                    proc.wait(10)
                    break
                done += n
                if progress and done % 10000 < 1000:
                    print(f"  {fuzz.found.sent} messages, {time.monotonic() - t0:.0f} s, "
                          f"fds {fd_count(proc.pid)}, RSS {rss_kib(proc.pid)} KiB", flush=True)
            seconds = time.monotonic() - t0
            if proc.poll() is not None:
                fuzz.found.crashes.append(f"the service died (status {proc.returncode})")
                return Run(fuzz.found, seconds, (fds0, -1), (rss0, -1), 0, 0, {}, [])
            normal_use()
            forget_idle_connections()
            made = fuzz.containers_made + 1  # and normal_use's
            fds1 = settled_fds(proc.pid, quiet=1.0)
            targets1 = fd_targets(proc.pid)
            leaks = leaked(targets0, targets1)
            roots = targets1["/"] - targets0["/"]
            return Run(fuzz.found, seconds, (fds0, fds1), (rss0, rss_kib(proc.pid)), made, roots,
                       leaks,
                       fuzz.log_crashes(logged))
        finally:
            kit.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--handle-share", type=float, default=0.3,
                    help="the share of messages sent with a real handle (default %(default)s)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the service's directory (its log) afterwards")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("fuzz_protocol: run as root (it starts a service)", file=sys.stderr)
        return 1
    with own_service(args.log_level, args.keep) as (proc, sock, log):
        r = run(proc, sock, log, args.messages, args.seed, args.handle_share, progress=True)
    f = r.found
    print(f"messages: {f.sent} in {r.seconds:.1f} s ({f.sent / r.seconds:.0f}/s), seed {args.seed}")
    print(f"answers: {f.replies} replies ({f.successes} successes), {f.closed} closed, "
          f"{f.silent} one-way taken in silence")
    print(f"crashes: {len(r.crashes)}")
    kinds = collections.Counter(re.sub(r"\d+", "N", line)[:300] for line in r.crashes)
    for line, n in kinds.most_common(20):
        print(f"  {n} x {line}")
    print(f"service RSS: {r.rss_kib[0]} KiB at start, {r.rss_kib[1]} KiB at end")
    print(f"service fds: {r.fds[0]} at start, {r.fds[1]} at end: {r.roots} roots kept of the "
          f"{r.containers} containers removed meanwhile, and else {r.leaks or 'nothing'}")
    return 1 if r.crashes or r.leaks else 0


if __name__ == "__main__":
    sys.exit(main())
