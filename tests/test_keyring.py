"""Per-container keyrings and request_key() interception on the real kernel (section 7)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import mmap
import os
import platform
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import syscalls
from containerfs.cgroups import cgroup2_mount, process_cgroup
from containerfs.keyring import intercept, listen
from containerfs.keyring.upcall import probe_upcall
from syscalls import (
    CONTAINER_KILL_ON_CLOSE,
    CONTAINER_NEW_PID_NS,
    CONTAINER_NEW_USER_NS,
    KEY_SPEC_PROCESS_KEYRING,
    KEY_SPEC_SESSION_KEYRING,
    KEY_SPEC_USER_KEYRING,
    keyctl_container_intercept,
    keyctl_set_container_keyring,
    keys,
)

from .conftest import OTHER_GID, OTHER_UID, ROOT, child_json, child_result, run_as, users_handle
from .test_restart import restart

# A uid of its own: the quota tests fill its key quota (kernel.keys.maxkeys, 200 by default),
# which must not starve other tests that run as OTHER_UID.
KEY_UID = 4545

FLAGS = CONTAINER_NEW_PID_NS | CONTAINER_KILL_ON_CLOSE

UPCALL_REASON = probe_upcall() if os.geteuid() == 0 else "not root"


class Inside:
    """A process forked into the container running `fn`; its JSON result is read with a
    timeout, so a test fails instead of hanging."""

    def __init__(self, cfd: int, fn: Callable[[], Any], go: bool = False) -> None:
        r, w = os.pipe()
        self.go_r, self.go_w = os.pipe() if go else (-1, -1)
        self.pid = syscalls.fork_into_container(cfd)
        if self.pid == 0:
            code = 0
            try:
                os.close(r)
                if go:
                    os.close(self.go_w)
                    os.read(self.go_r, 1)
                out = fn()
            except BaseException as e:  # noqa: BLE001 - report it; never run on as the test
                out, code = {"exception": repr(e)}, 1
            try:
                os.write(w, json.dumps(out).encode())
            finally:
                os._exit(code)
        os.close(w)
        if go:
            os.close(self.go_r)
        self.r = r

    def start(self) -> None:
        os.write(self.go_w, b"g")
        os.close(self.go_w)

    def result(self, timeout: float = 15) -> Any:
        return child_json(self.pid, self.r, timeout, "process in the container")


def ask(key_type: str, desc: str, callout: str | None = "info",
        dest: int = KEY_SPEC_SESSION_KEYRING) -> Callable[[], Any]:
    """request_key() as a container process does it; what it got."""
    def fn() -> Any:
        t = time.monotonic()
        try:
            serial = keys.request_key(key_type, desc, callout, dest)
        except OSError as e:
            return {"errno": e.errno, "elapsed": time.monotonic() - t}
        _, uid, gid, perm, _ = keys.describe(serial)
        return {"serial": serial, "payload": keys.read(serial).decode("utf-8", "replace"),
                "uid": uid, "gid": gid, "perm": perm, "elapsed": time.monotonic() - t,
                "in_session": serial in keys.keyring_contents(KEY_SPEC_SESSION_KEYRING)}
    return fn


def session_info() -> dict[str, Any]:
    s = keys.get_keyring_id(KEY_SPEC_SESSION_KEYRING)
    _, uid, _, _, desc = keys.describe(s)
    return {"serial": s, "desc": desc, "uid": uid,
            "user_keyring": keys.get_keyring_id(KEY_SPEC_USER_KEYRING, True)}


def outside_fresh_session(fn: Callable[[], Any]) -> Any:
    """Run `fn` in a child of the test, in no container, with a new session keyring."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            keys.join_session_keyring(None)
            os.write(w, json.dumps(fn()).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    assert child_result(pid) == 0
    return json.loads(data)


def errno_of(fn: Callable[[], Any]) -> int | None:
    try:
        fn()
    except OSError as e:
        return e.errno
    return None


@pytest.fixture
def host_keys() -> Iterator[list[int]]:
    """Keys the test makes in its own keyrings, invalidated afterwards."""
    made: list[int] = []
    yield made
    for serial in made:
        try:
            keys.invalidate(serial)
        except OSError:
            pass


@contextlib.contextmanager
def running(name: str, flags: int = FLAGS) -> Iterator[int]:
    """A container whose init waits (so that other processes are members); its handle."""
    cfd = syscalls.container_create(name, flags)
    init = Inside(cfd, lambda: None, go=True)
    try:
        yield cfd
    finally:
        init.start()
        init.result()
        os.close(cfd)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# ---- session keyrings ---------------------------------------------------------------------

def test_each_container_has_its_own_session_keyring(service: Any, host_keys: list[int]) -> None:
    in_host_session = unique("host-session")
    in_host_process = unique("host-process")
    host_keys.append(keys.add_key("user", in_host_session, b"s", KEY_SPEC_SESSION_KEYRING))
    host_keys.append(keys.add_key("user", in_host_process, b"p", KEY_SPEC_PROCESS_KEYRING))
    host_session = keys.get_keyring_id(KEY_SPEC_SESSION_KEYRING)

    a = syscalls.container_create("a", FLAGS)
    b = syscalls.container_create("b", FLAGS | CONTAINER_NEW_USER_NS)
    a_id, b_id = syscalls.container_status(a)["id"], syscalls.container_status(b)["id"]

    def first() -> Any:
        keys.add_key("user", "mine", b"from a", KEY_SPEC_SESSION_KEYRING)
        return {**session_info(), "host": [errno_of(lambda d=d: keys.request_key("user", d))
                                           for d in (in_host_session, in_host_process)]}
    a_init = Inside(a, lambda: None, go=True)  # keeps the container up
    got_a = Inside(a, first).result()
    assert got_a["serial"] != host_session
    assert got_a["desc"].startswith(f"cfs.{a_id}.s.")
    assert got_a["host"] == [errno.ENOKEY, errno.ENOKEY]  # none of the creator's keyrings
    a_member = Inside(a, lambda: {**session_info(),
                                  "mine": keys.read(keys.request_key("user", "mine")).decode()})
    got_member = a_member.result()
    assert got_member["serial"] == got_a["serial"]  # members start in it too
    assert got_member["mine"] == "from a"

    def in_b() -> Any:
        out = session_info()
        out["mine"] = errno_of(lambda: keys.request_key("user", "mine"))
        out["search"] = errno_of(lambda: keys.search(KEY_SPEC_SESSION_KEYRING, "user", "mine"))
        # Knowing the other container's keyring name is no way in: names are per user
        # namespace, so joining makes a new keyring.
        out["joined"] = keys.join_session_keyring(got_a["desc"])
        return out
    got_b = Inside(b, in_b).result()
    assert got_b["desc"].startswith(f"cfs.{b_id}.s.")
    assert got_b["serial"] not in (got_a["serial"], host_session)
    assert got_b["mine"] == errno.ENOKEY and got_b["search"] == errno.ENOKEY
    assert got_b["joined"] != got_a["serial"]
    # With a user namespace even the per-uid user keyring is the container's own.
    assert got_b["user_keyring"] != keys.get_keyring_id(KEY_SPEC_USER_KEYRING, True)
    assert got_a["user_keyring"] == keys.get_keyring_id(KEY_SPEC_USER_KEYRING, True)
    a_init.start()
    a_init.result()
    os.close(a)
    os.close(b)


def test_root_joins_another_users_container_keyring(service: Any) -> None:
    cfd = users_handle(service, OTHER_UID, OTHER_GID)
    cid = syscalls.container_status(cfd)["id"]
    got = Inside(cfd, session_info).result()
    assert got["desc"].startswith(f"cfs.{cid}.s.")
    syscalls.container_kill(cfd)
    os.close(cfd)


def test_session_keyring_removed_with_container(service: Any) -> None:
    cfd = syscalls.container_create("gone", FLAGS)
    init = Inside(cfd, lambda: None, go=True)
    member = Inside(cfd, session_info)
    serial = member.result()["serial"]
    # Alive, it is there (root may not even describe it: only its possessors may).
    assert errno_of(lambda: keys.describe(serial)) == errno.EACCES
    init.start()
    assert init.result() is None
    deadline = time.monotonic() + 10
    while errno_of(lambda: keys.describe(serial)) != errno.ENOKEY:
        assert time.monotonic() < deadline, "the container's session keyring outlived it"
        time.sleep(0.02)
    os.close(cfd)


# ---- the container keyring -----------------------------------------------------------------

def test_container_keyring_found_after_own_keyrings(service: Any, host_keys: list[int]) -> None:
    ring = keys.add_key("keyring", "_container", None, KEY_SPEC_PROCESS_KEYRING)
    host_keys.append(ring)
    keys.add_key("user", "early", b"before init", ring)
    keys.add_key("user", "shadow", b"container", ring)
    cfd = syscalls.container_create("ck", FLAGS)
    keyctl_set_container_keyring(cfd, ring)
    # Once per container.
    other = keys.add_key("keyring", "_other", None, KEY_SPEC_PROCESS_KEYRING)
    host_keys.append(other)
    assert errno_of(lambda: keyctl_set_container_keyring(cfd, ring)) == errno.EBUSY
    assert errno_of(lambda: keyctl_set_container_keyring(cfd, other)) == errno.EBUSY

    def fn() -> Any:
        keys.add_key("user", "shadow", b"own", KEY_SPEC_SESSION_KEYRING)
        out = {d: keys.read(keys.request_key("user", d)).decode()
               for d in ("early", "late", "shadow")}
        # It hangs in the session keyring by a slot that members cannot change.
        slots = [k for k in keys.keyring_contents(KEY_SPEC_SESSION_KEYRING)
                 if keys.describe(k)[4].endswith(".ck")]
        out["unlink"] = [errno_of(lambda s=s: keys.unlink(ring, s)) for s in slots]
        return out
    init = Inside(cfd, fn, go=True)
    keys.add_key("user", "late", b"while running", ring)  # after init started
    init.start()
    assert init.result() == {"early": "before init", "late": "while running", "shadow": "own",
                             "unlink": [errno.EACCES]}
    # Dead, it has no keyrings at all.
    assert errno_of(lambda: keyctl_set_container_keyring(cfd, ring)) == errno.ECANCELED
    os.close(cfd)


def test_set_container_keyring_errors(service: Any, host_keys: list[int], tmp_path: Path) -> None:
    ring = keys.add_key("keyring", "_container", None, KEY_SPEC_PROCESS_KEYRING)
    key = keys.add_key("user", "not-a-ring", b"x", KEY_SPEC_PROCESS_KEYRING)
    host_keys += [ring, key]
    cfd = syscalls.container_create("e", FLAGS)
    r, w = os.pipe()
    closed = os.dup(cfd)
    os.close(closed)
    rows = [
        (closed, ring, errno.EBADF),
        (r, ring, errno.EINVAL),  # a pipe, but no container's handle
        (cfd, 0, errno.EINVAL),
        (cfd, 0x7FFFFFF0, errno.ENOKEY),
        (cfd, key, errno.ENOTDIR),
    ]
    for fd, keyring, err in rows:
        got = errno_of(lambda fd=fd, keyring=keyring: keyctl_set_container_keyring(fd, keyring))
        assert got == err, (fd, keyring)
    keyctl_set_container_keyring(cfd, ring)  # none of those used it up
    for fd in (r, w, cfd):
        os.close(fd)


def test_member_may_not_manage_keys(service: Any, host_keys: list[int]) -> None:
    ring = keys.add_key("keyring", "_container", None, KEY_SPEC_SESSION_KEYRING)
    host_keys.append(ring)
    cfd = syscalls.container_create("self", FLAGS)

    def fn() -> Any:
        own = keys.add_key("keyring", "own", None, KEY_SPEC_SESSION_KEYRING)
        return [errno_of(lambda: keyctl_set_container_keyring(cfd, own)),
                errno_of(lambda: keyctl_container_intercept(cfd, "user", 0, own)),
                errno_of(lambda: keyctl_container_intercept(cfd, None, 0, 0)),
                errno_of(lambda: intercept(cfd, "user"))]
    assert Inside(cfd, fn).result() == [errno.EPERM] * 4
    os.close(cfd)


# ---- interception --------------------------------------------------------------------------

def test_intercepted_request_instantiated(service: Any) -> None:
    with running("i") as cfd:
        with intercept(cfd, "user") as requests:
            asker = Inside(cfd, ask("user", "foo", "some callout"))
            req = requests.get(timeout=10)
            assert (req.operation, req.type, req.description, req.callout_info, req.uid,
                    req.gid) == ("create", "user", "foo", "some callout", 0, 0)
            assert req.pid == asker.pid
            serial = req.instantiate(b"the payload")
            got = asker.result()
        assert got["serial"] == serial and got["payload"] == "the payload"
        assert got["uid"] == 0 and got["in_session"]
        # The permissions the kernel gives a key it constructs (a user key: all for possessors,
        # view for its owner).
        assert got["perm"] == 0x3F010000
        # Now it exists: found without asking anyone.
        again = Inside(cfd, ask("user", "foo")).result()
        assert again["payload"] == "the payload"


def test_intercept_in_user_namespace_as_its_owner(service: Any) -> None:
    got = run_as(OTHER_UID, OTHER_GID, """
        import json, os, syscalls
        from syscalls import keys
        from containerfs.keyring import intercept
        cfd = syscalls.container_create("u", syscalls.CONTAINER_NEW_USER_NS
                                        | syscalls.CONTAINER_NEW_PID_NS
                                        | syscalls.CONTAINER_KILL_ON_CLOSE)
        r, w = os.pipe()
        with intercept(cfd, "user") as requests:
            pid = syscalls.fork_into_container(cfd)
            if pid == 0:
                try:
                    s = keys.request_key("user", "inside", "cb", keys.KEY_SPEC_SESSION_KEYRING)
                    out = [os.getuid(), keys.describe(s)[1], keys.read(s).decode()]
                except OSError as e:
                    out = [e.errno]
                os.write(w, json.dumps(out).encode())
                os._exit(0)
            os.close(w)
            req = requests.get(timeout=10)
            seen = [req.uid, req.gid]
            req.instantiate("for the owner")
            inside = json.loads(os.read(r, 1000))
        os.waitpid(pid, 0)
        return {"seen": seen, "inside": inside}
    """)
    # The manager sees the requester's ids as the host does; inside, it is root owning it.
    assert got == {"seen": [OTHER_UID, OTHER_GID], "inside": [0, 0, "for the owner"]}


def test_negate_and_its_timeout(service: Any) -> None:
    with running("n") as cfd, intercept(cfd, "user") as requests:
        first = Inside(cfd, ask("user", "nope"))
        requests.get(timeout=10).negate(timeout_s=30)
        assert first.result()["errno"] == errno.ENOKEY
        # Negated for 30 s: asked again, it fails at once and nobody is asked.
        second = Inside(cfd, ask("user", "nope")).result()
        assert second["errno"] == errno.ENOKEY
        with pytest.raises(TimeoutError):
            requests.get(timeout=0.3)
        third = Inside(cfd, ask("user", "rejected"))
        requests.get(timeout=10).reject(errno.EKEYREJECTED)
        assert third.result()["errno"] == errno.EKEYREJECTED


def test_unanswered_request_fails_after_the_timeout(service: Any) -> None:
    with running("t") as cfd:
        with intercept(cfd, "user", timeout=0.5) as requests:
            asker = Inside(cfd, ask("user", "slow"))
            req = requests.get(timeout=10)
            got = asker.result(timeout=10)
            assert got["errno"] == errno.ENOKEY and 0.4 < got["elapsed"] < 5
            assert errno_of(lambda: req.instantiate(b"too late")) == errno.ENOENT
        # A manager that goes away fails what waits for it at once, not after its timeout.
        with intercept(cfd, "user", timeout=60) as requests:
            waiting = Inside(cfd, ask("user", "orphan"))
            requests.get(timeout=10)
        got = waiting.result(timeout=30)
        assert got["errno"] == errno.ENOKEY and got["elapsed"] < 30


def test_untrapped_requests_are_untouched(service: Any) -> None:
    """Another type, a request without callout info, and a process outside the container
    all get what the kernel gives them. One moved out of the container that still carries its
    filter and its session keyring is the container's again once the kernel makes the
    request: where the upcall works, our request-key.d rule hands it to the creator."""
    with running("u", CONTAINER_KILL_ON_CLOSE) as cfd:  # no PID namespace: host pids
        expect_upcall = UPCALL_REASON is None
        print(f"kernel upcall: {'works' if expect_upcall else UPCALL_REASON}")

        def check(got: dict[str, Any], callout: str) -> None:
            if expect_upcall:  # keyutils' debug rule answered: the host's own request-key ran
                assert got.get("payload") == f"Debug {callout}", got
            else:
                assert got.get("errno") == errno.ENOKEY, got

        with intercept(cfd, "logon") as requests:
            check(Inside(cfd, ask("user", unique("debug:other-type"), "t")).result(), "t")
            assert Inside(cfd, ask("logon", "x:no-callout", None)).result()["errno"] == errno.ENOKEY

            # A process forked from a member, then moved out of the container's cgroup.
            r, w = os.pipe()
            go_r, go_w = os.pipe()
            desc = unique("x:moved-out")

            def member() -> Any:
                pid = os.fork()
                if pid == 0:
                    for fd in range(3, 256):  # nothing of the member's (its result pipe above all)
                        if fd not in (w, go_r):
                            try:
                                os.close(fd)
                            except OSError:
                                pass
                    os.read(go_r, 1)
                    os.write(w, json.dumps(ask("logon", desc, "m")()).encode())
                    os._exit(0)
                return pid
            moved = Inside(cfd, member).result()
            os.close(w)
            os.close(go_r)
            own = os.path.join(cgroup2_mount(), (process_cgroup(os.getpid()) or "/").lstrip("/"))
            with open(os.path.join(own, "cgroup.procs"), "w") as f:
                f.write(str(moved))
            os.write(go_w, b"g")
            if expect_upcall:
                # Out of reach of seccomp, but still in the container's session keyring: the
                # kernel's own upcall hands the request to the creator (tests/test_upcall.py).
                req = requests.get(timeout=20)
                assert (req.description, req.pid) == (desc, 0)
                req.negate()
            got = json.loads(os.read(r, 10000))
            os.close(r)
            os.close(go_w)
            assert got["errno"] in (errno.ENOKEY, errno.EKEYREJECTED)  # negated (or the host's rule)

            # A process outside (in a session keyring of its own, where the host's
            # request-key puts what it makes).
            outside = outside_fresh_session(ask("user", unique("debug:outside"), "o"))
            host = outside_fresh_session(ask("logon", unique("x:outside"), "o"))
            with pytest.raises(TimeoutError):
                requests.get(timeout=0.3)
        check(outside, "o")
        assert host.get("errno") in (errno.ENOKEY, errno.EKEYREJECTED)


def test_trap_errors_and_removal(service: Any, host_keys: list[int]) -> None:
    ring = keys.add_key("keyring", "upcall", None, KEY_SPEC_PROCESS_KEYRING)
    host_keys.append(ring)
    cfd = syscalls.container_create("e", FLAGS)
    with intercept(cfd, "user") as requests:
        assert errno_of(lambda: intercept(cfd, "user")) == errno.EEXIST
        assert errno_of(lambda: keyctl_container_intercept(cfd, "user", 0, ring)) == errno.EEXIST
        for key_type, ns_id, dest, err in [("logon", 1, ring, errno.EINVAL),
                                           (None, 0, ring, errno.EINVAL),
                                           ("", 0, ring, errno.EINVAL),
                                           ("x" * 32, 0, ring, errno.EINVAL),
                                           ("logon", 0, 0x7FFFFFF0, errno.ENOKEY)]:
            got = errno_of(lambda t=key_type, ns=ns_id, d=dest: keyctl_container_intercept(
                cfd, t, ns, d))
            assert got == err, (key_type, ns_id, dest)
        keyctl_container_intercept(cfd, "*", 0, ring)
        keyctl_container_intercept(cfd, "logon", 0, ring)
        assert keyctl_container_intercept(cfd, "*", 0, 0) == 1
        assert keyctl_container_intercept(cfd, "*", 0, 0) == 0
        assert keyctl_container_intercept(cfd, None, 0, 0) == 2  # logon, and the bound user
        with pytest.raises(EOFError):  # the bound trap went with it
            requests.get(timeout=5)
    # A trap made by intercept() goes when its Requests is closed.
    with intercept(cfd, "user"):
        pass
    assert keyctl_container_intercept(cfd, None, 0, 0) == 0
    os.close(cfd)


def test_records_in_dest_keyring_and_listen(service: Any, host_keys: list[int]) -> None:
    ring = keys.add_key("keyring", "upcall", None, KEY_SPEC_PROCESS_KEYRING)
    host_keys.append(ring)
    with running("r") as cfd:
        cid = syscalls.container_status(cfd)["id"]
        keyctl_container_intercept(cfd, "user", 0, ring, timeout=20)
        asker = Inside(cfd, ask("user", "recorded", "cb"))
        with listen(cfd) as requests:
            req = requests.get(timeout=10)
            (records,) = keys.keyring_contents(ring)
            assert keys.describe(records)[4] == f"cfs.{cid}.t.20000.user"
            (record,) = keys.keyring_contents(records)
            assert keys.describe(record)[4] == f"containerfs:{cid}:{req.rid}"
            assert json.loads(keys.read(record))["description"] == "recorded"
            req.instantiate(b"r")
        assert asker.result()["payload"] == "r"
        assert keys.keyring_contents(records) == []  # answered: its record is gone
        assert keyctl_container_intercept(cfd, "user", 0, 0) == 1
        deadline = time.monotonic() + 5
        while keys.keyring_contents(ring):  # the trap's record keyring went with it
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_requests_are_pollable_and_async_iterable(service: Any) -> None:
    with running("p") as cfd, intercept(cfd, "user") as requests:
        poller = select.poll()
        poller.register(requests.fileno(), select.POLLIN)
        assert poller.poll(200) == []  # nothing waits: not readable
        asker = Inside(cfd, ask("user", "polled"))
        assert poller.poll(10000) != []
        requests.get(timeout=0).instantiate(b"1")
        assert asker.result()["payload"] == "1"

        async def manager(n: int) -> list[str]:
            seen = []
            with trio.fail_after(20):
                async for req in requests:
                    seen.append(req.description)
                    req.instantiate(req.description.upper())
                    if len(seen) == n:
                        break
            return seen
        askers = [Inside(cfd, ask("user", f"async{i}")) for i in range(3)]
        assert sorted(trio.run(manager, 3)) == ["async0", "async1", "async2"]
        assert sorted(a.result()["payload"] for a in askers) == ["ASYNC0", "ASYNC1", "ASYNC2"]


@pytest.mark.skipif(platform.machine() != "x86_64", reason="int 0x80 is x86 only")
def test_32bit_request_key_is_trapped(service: Any) -> None:
    """A 64-bit process can make a 32-bit system call (int 0x80, where request_key is 287):
    the filter checks the ABI, so that call is trapped too."""
    if not _ia32_works():
        pytest.skip("no IA-32 emulation in this kernel (int 0x80 fails)")
    with running("32") as cfd, intercept(cfd, "user") as requests:
        asker = Inside(cfd, lambda: _request_key_int80("user", "thirty-two", "cb"))
        req = requests.get(timeout=10)
        assert (req.description, req.callout_info) == ("thirty-two", "cb")
        serial = req.instantiate(b"32")
        assert asker.result() == serial


def _int80(code_args: list[tuple[int, int]]) -> Callable[[], int]:
    """A function that makes one int 0x80 call with eax, ebx, ecx, edx, esi set."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    map_32bit = 0x40
    addr = libc.mmap(None, 4096, mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | map_32bit, -1, 0)
    code = b"\x53"  # push rbx
    for opcode, value in code_args:  # mov r32, imm32
        code += bytes([opcode]) + (value & 0xFFFFFFFF).to_bytes(4, "little")
    code += b"\xcd\x80\x5b\xc3"  # int 0x80; pop rbx; ret
    ctypes.memmove(addr + 2048, code, len(code))
    return ctypes.CFUNCTYPE(ctypes.c_int)(addr + 2048)


def _request_key_int80(key_type: str, desc: str, callout: str) -> int:
    libc = ctypes.CDLL(None)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    strings = libc.mmap(None, 4096, mmap.PROT_READ | mmap.PROT_WRITE,
                        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x40, -1, 0)
    addrs = []
    offset = 0
    for s in (key_type, desc, callout):
        data = s.encode() + b"\0"
        ctypes.memmove(strings + offset, data, len(data))
        addrs.append(strings + offset)
        offset += len(data)
    call = _int80([(0xB8, 287), (0xBB, addrs[0]), (0xB9, addrs[1]), (0xBA, addrs[2]),
                   (0xBE, KEY_SPEC_SESSION_KEYRING)])
    return int(call())


def _ia32_works() -> bool:
    pid = os.fork()
    if pid == 0:
        ok = _int80([(0xB8, 20)])() == os.getpid()  # getpid
        os._exit(0 if ok else 1)
    return child_result(pid) == 0


# ---- quota --------------------------------------------------------------------------------

def test_hundreds_of_containers_within_the_key_quota(service: Any) -> None:
    """Each container's keyring counts against its owner's quota (200 keys here) and is
    given back when the container goes: 300 containers one after another never run out."""
    got = run_as(KEY_UID, KEY_UID, """
        import os, select, syscalls
        for i in range(300):
            flags = syscalls.CONTAINER_KILL_ON_CLOSE | syscalls.CONTAINER_FD_CLOEXEC
            if i % 2:
                flags |= syscalls.CONTAINER_NEW_USER_NS | syscalls.CONTAINER_NEW_PID_NS
            cfd = syscalls.container_create("q", flags)
            pid = syscalls.fork_into_container(cfd)
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            p = select.poll()
            p.register(cfd, select.POLLHUP)
            p.poll(10000)
            os.close(cfd)
        return 300
    """, timeout=120)
    assert got == 300


def test_key_quota_exhaustion_is_eagain(service: Any) -> None:
    got = run_as(KEY_UID, KEY_UID, """
        import errno, syscalls
        from syscalls import keys
        keys.join_session_keyring(None)
        made = []
        while True:  # use up the quota in a keyring of our own
            try:
                made.append(keys.add_key("user", f"fill{len(made)}", b"x",
                                         keys.KEY_SPEC_SESSION_KEYRING))
            except OSError as e:
                assert e.errno == errno.EDQUOT, e
                break
        try:
            syscalls.container_create("full", 0)
            first = "created"
        except OSError as e:
            first = [e.errno, str(e)]
        keys.invalidate(made.pop())
        import time
        for _ in range(200):  # the garbage collector gives the quota back
            try:
                cfd = syscalls.container_create("room", syscalls.CONTAINER_KILL_ON_CLOSE)
                break
            except OSError:
                time.sleep(0.01)
        return {"first": first, "then": syscalls.container_status(cfd)["state"]}
    """)
    assert got["first"][0] == errno.EAGAIN and "key quota" in got["first"][1]
    assert got["then"] == "created"


# ---- restart -------------------------------------------------------------------------------

def test_interception_survives_a_service_crash(service: Any, host_keys: list[int]) -> None:
    ring = keys.add_key("keyring", "upcall", None, KEY_SPEC_PROCESS_KEYRING)
    host_keys.append(ring)
    cfd = syscalls.container_create("crash", FLAGS)
    init = Inside(cfd, ask("user", "by-init", "cb"), go=True)
    keyctl_container_intercept(cfd, "user", 0, ring, timeout=60)
    before = Inside(cfd, ask("user", "in-flight", "cb"))
    with listen(cfd) as requests:
        assert requests.get(timeout=10).description == "in-flight"
        restart(service, hard=True)
        with pytest.raises(EOFError):
            requests.get(timeout=5)
    got = before.result(timeout=20)  # failed by the new service, not left waiting 60 s
    assert got["errno"] == errno.ENOKEY and got["elapsed"] < 20
    with listen(cfd) as requests:
        after = Inside(cfd, ask("user", "new-member", "cb"))  # the trap came back
        requests.get(timeout=10).instantiate(b"new")
        assert after.result()["payload"] == "new"
        init.start()  # init's listener was kept by the keeper across the crash
        req = requests.get(timeout=10)
        assert req.description == "by-init"
        req.instantiate(b"after the crash")
        assert init.result()["payload"] == "after the crash"
    os.close(cfd)


# ---- the proposal's samples ------------------------------------------------------------------

def _example(name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], check=False,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_sample_upcall_manager(service: Any) -> None:
    """The proposal's flow: a manager traps `user` keys of its container; inside,
    `keyctl request2 user foo bar @s` is answered by the manager's handler."""
    res = _example("upcall_manager.py")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "manager: request for user key 'foo' (callout 'bar') from uid 0" in lines
    assert "inside: foo = answer to foo: bar" in lines
    assert "inside: foobar = wibble" in lines  # from the container keyring, nobody asked
    assert not any("request for user key 'foobar'" in line for line in lines)


def test_sample_key_grant(service: Any, host_keys: list[int]) -> None:
    ring = keys.add_key("keyring", "_container", None, KEY_SPEC_PROCESS_KEYRING)
    host_keys.append(ring)
    # Writable by its owner: the grant program is another process, without possession.
    keys.setperm(ring, 0x3F3F0000)
    key = keys.add_key("user", "granted", b"g", KEY_SPEC_PROCESS_KEYRING)
    host_keys.append(key)
    keys.setperm(key, 0x01310000)  # possessor: view; owner: view, link, setattr
    with running("grant") as cfd:
        keyctl_set_container_keyring(cfd, ring)
        keys.link(key, ring)
        # Found, but not searchable by them: the kernel's EACCES.
        assert Inside(cfd, ask("user", "granted", None)).result()["errno"] == errno.EACCES
        keys.unlink(key, ring)
        res = _example("key_grant.py", str(key), str(ring))
        assert res.returncode == 0, res.stderr
        assert Inside(cfd, ask("user", "granted", None)).result()["payload"] == "g"
