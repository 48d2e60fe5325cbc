"""Requests the kernel itself makes (not a request_key() call of the process), on the real
kernel and the real upcall: /sbin/request-key, our rule in /etc/request-key.d, our handler.

A process outside seccomp that joined a container's session keyring makes them for real: its
request_key() is the kernel's own, the kernel's search fails, and the kernel runs its upcall,
as it would for a network filesystem's request in a container process's name.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from containerfs.keyring import intercept, listen
from containerfs.keyring.upcall import HANDLER, MACROS, rules_path
from syscalls import (
    KEY_SPEC_PROCESS_KEYRING,
    KEY_SPEC_SESSION_KEYRING,
    keyctl_container_intercept,
    keys,
)

from .conftest import child_json
from .test_keyring import UPCALL_REASON, Inside, ask, outside_fresh_session, running, session_info
from .test_restart import restart


@pytest.fixture
def upcall() -> None:
    if UPCALL_REASON is not None:
        print(f"skipping: {UPCALL_REASON}")
        pytest.skip(UPCALL_REASON)


@pytest.fixture
def rules_left() -> Iterator[list[Path]]:
    """Rule files that must be gone once the service has stopped: set up before the service
    fixture, so checked (and removed, should a failing test leave one) after it."""
    paths: list[Path] = []
    yield paths
    leaked = [path for path in paths if path.exists()]
    for path in leaked:
        path.unlink()
    assert not leaked, f"rule files outlived their service: {leaked}"


@pytest.fixture
def rule_file(rules_left: list[Path], service: Any, upcall: None) -> Path:
    """This service's rule file (tests name this fixture before `service`)."""
    path = Path(rules_path(service.runtime_dir))
    rules_left.append(path)
    assert not path.exists()
    return path


@pytest.fixture
def host_rule() -> Iterator[str]:
    """A host rule of our own, less specific than the service's (any type), for one callout
    string nobody else uses: `/bin/cat` answers with the callout. Its callout."""
    callout = f"cfs-host-{uuid.uuid4().hex}"
    path = Path(f"/etc/request-key.d/cfs-test-{callout}.conf")
    path.write_text(f"create * * {callout} |/bin/cat\n")
    try:
        yield callout
    finally:
        path.unlink()


class Outside:
    """A child of the test in no container and under no seccomp filter, in the session
    keyring named `session` (None: a new one of its own), running `fn`; its JSON result is
    read with a timeout."""

    def __init__(self, session: str | None, fn: Callable[[], Any]) -> None:
        r, w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.close(r)
                keys.join_session_keyring(session)
                os.write(w, json.dumps(fn()).encode())
            finally:
                os._exit(0)
        os.close(w)
        self.r = r

    def result(self, timeout: float = 30) -> Any:
        return child_json(self.pid, self.r, timeout, "requester")


def session_name(cfd: int) -> str:
    """The name a process joins the container's session keyring by."""
    return str(Inside(cfd, session_info).result()["desc"])


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def no_request(requests: Any) -> None:
    with pytest.raises(TimeoutError):
        requests.get(timeout=0.3)


def wait_for(what: Callable[[], bool], message: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, message
        time.sleep(0.02)


def rule_types(path: Path) -> list[str]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# containerfs runtime=")
    return [line.split()[1] for line in lines[1:]]


def test_kernel_request_reaches_the_creator(rule_file: Path, service: Any) -> None:
    with running("k") as cfd:
        name = session_name(cfd)
        with intercept(cfd, "user") as requests:
            # Installed before intercept() returned: one line, naming our handler.
            (line,) = rule_file.read_text().splitlines()[1:]
            assert line.split() == ["create", "user", "*", "*", sys.executable, "-I", HANDLER,
                                    service.socket, str(rule_file), *MACROS]

            desc = unique("nfs")
            asker = Outside(name, ask("user", desc, "made by the kernel"))
            req = requests.get(timeout=20)
            assert (req.type, req.description, req.callout_info, req.uid, req.gid,
                    req.pid) == ("user", desc, "made by the kernel", 0, 0, 0)
            serial = req.instantiate(b"from the creator")
            got = asker.result()
            assert got["serial"] == serial and got["payload"] == "from the creator"
            assert got["in_session"] and got["uid"] == 0
            # Constructed by the kernel: the permissions it gives such a key.
            assert got["perm"] == 0x3F010000
            # Made: found by the kernel's search, nobody is asked.
            assert Outside(name, ask("user", desc)).result()["payload"] == "from the creator"
            no_request(requests)

            # negate(): ENOKEY, and (no timeout) nothing that lingers: asked again, the
            # creator is asked again.
            desc = unique("negated")
            asker = Outside(name, ask("user", desc, "n"))
            requests.get(timeout=20).negate()
            assert asker.result()["errno"] == errno.ENOKEY
            asker = Outside(name, ask("user", desc, "n"))
            requests.get(timeout=20).instantiate(b"second time")
            assert asker.result()["payload"] == "second time"

            # reject() with a timeout: the kernel's own negative key answers later requests.
            desc = unique("rejected")
            asker = Outside(name, ask("user", desc, "r"))
            requests.get(timeout=20).reject(errno.EKEYREJECTED, timeout_s=30)
            assert asker.result()["errno"] == errno.EKEYREJECTED
            again = Outside(name, ask("user", desc, "r")).result()
            assert again["errno"] == errno.EKEYREJECTED and again["elapsed"] < 5
            no_request(requests)

            # The kernel's errno reaches the creator: a user key's payload cannot be empty.
            asker = Outside(name, ask("user", unique("empty"), "e"))
            req = requests.get(timeout=20)
            with pytest.raises(OSError) as failed:
                req.instantiate(b"")
            assert failed.value.errno == errno.EINVAL
            assert asker.result()["errno"] == errno.EINVAL

            # A host rule more specific than ours wins: keyutils' `debug:*` rule answers.
            got = Outside(name, ask("user", unique("debug:spec"), "c")).result()
            assert got["payload"] == "Debug c"
            no_request(requests)
        assert not rule_file.exists()  # the trap went, and its rule with it


def test_unanswered_kernel_request_fails(rule_file: Path, service: Any) -> None:
    with running("t") as cfd:
        name = session_name(cfd)
        with intercept(cfd, "user", timeout=0.5) as requests:
            asker = Outside(name, ask("user", unique("slow"), "s"))
            req = requests.get(timeout=20)
            got = asker.result()
            assert got["errno"] == errno.ENOKEY and got["elapsed"] < 10
            with pytest.raises(OSError) as late:
                req.instantiate(b"too late")
            assert late.value.errno == errno.ENOENT
        # A manager that goes away fails what waits for it at once, not after the timeout.
        with intercept(cfd, "user", timeout=60) as requests:
            asker = Outside(name, ask("user", unique("orphan"), "o"))
            requests.get(timeout=20)
        got = asker.result()
        assert got["errno"] == errno.ENOKEY and got["elapsed"] < 30


def test_others_requests_get_the_host_rules(rule_file: Path, service: Any,
                                            host_rule: str) -> None:
    """Requests our rule catches that are no container's trapped ones are handed to the
    host's rules (here: host_rule's /bin/cat, which only that re-dispatch can reach, since
    our rule is more specific); the creators never see them."""
    with running("a") as a, running("b") as b:
        a_name, b_name = session_name(a), session_name(b)
        with intercept(a, "user") as requests_a, intercept(b, "logon") as requests_b:
            assert rule_types(rule_file) == ["logon", "user"]
            # In B's session keyring, a type only A traps.
            got = Outside(b_name, ask("user", unique("b"), host_rule)).result()
            assert got["payload"] == host_rule
            # In a session keyring of the host's.
            got = Outside(None, ask("user", unique("host"), host_rule)).result()
            assert got["payload"] == host_rule
            got = outside_fresh_session(ask("user", unique("debug:host"), "h"))
            assert got["payload"] == "Debug h"
            # In A's session keyring, a type only B traps (a logon key: made, unreadable).
            desc = "x:" + unique("a")
            got = Outside(a_name, lambda: keys.describe(keys.request_key(
                "logon", desc, host_rule, KEY_SPEC_SESSION_KEYRING))[4]).result()
            assert got == desc
            no_request(requests_a)
            no_request(requests_b)
            assert rule_types(rule_file) == ["logon", "user"]
        assert rule_types(rule_file) == []


def test_rule_follows_the_traps_and_the_service(rule_file: Path, service: Any,
                                                host_rule: str) -> None:
    ring = keys.add_key("keyring", "records", None, KEY_SPEC_PROCESS_KEYRING)
    try:
        rule_follows(rule_file, service, host_rule, ring)
    finally:
        keys.invalidate(ring)


def rule_follows(rule_file: Path, service: Any, host_rule: str, ring: int) -> None:
    with running("r") as cfd:
        name = session_name(cfd)
        keyctl_container_intercept(cfd, "user", 0, ring)
        assert rule_types(rule_file) == ["user"]

        # Killed, the service leaves its rule; the handler finds no service and hands the
        # request to the host's rules.
        service.proc.kill()
        service.proc.wait()
        assert rule_types(rule_file) == ["user"]
        got = Outside(name, ask("user", unique("down"), host_rule)).result()
        assert got["payload"] == host_rule

        # Restarted, the lasting trap comes back, and so does its rule.
        restart(service, hard=False)
        wait_for(lambda: rule_types(rule_file) == ["user"], "the rule did not come back")
        with listen(cfd) as requests:
            asker = Outside(name, ask("user", unique("again"), "a"))
            requests.get(timeout=20).instantiate(b"after the restart")
            assert asker.result()["payload"] == "after the restart"

        assert keyctl_container_intercept(cfd, "user", 0, 0) == 1
        assert not rule_file.exists()
        keyctl_container_intercept(cfd, "*", 0, ring)
        assert rule_types(rule_file) == ["*"]
        desc = "x:" + unique("any")

        def logon() -> Any:  # a logon key: made, but nobody may read it
            return keys.describe(keys.request_key("logon", desc, "l",
                                                  KEY_SPEC_SESSION_KEYRING))[4]
        with listen(cfd) as requests:
            asker = Outside(name, logon)
            req = requests.get(timeout=20)
            assert (req.type, req.description) == ("logon", desc)
            req.instantiate(b"secret")
            assert asker.result() == desc

        # Stopped, the service takes its rule with it.
        service.stop()
        assert not rule_file.exists()
        restart(service, hard=False)
        wait_for(lambda: rule_types(rule_file) == ["*"], "the rule did not come back")
    # The container is dead: no trap is left anywhere, and no rule.
    wait_for(lambda: not rule_file.exists(), "the rule outlived the container's traps")


def test_only_root_outside_containers_may_hand_over_requests(service: Any) -> None:
    """A process in a container cannot make up a kernel request for the creator."""
    from syscalls import protocol
    from syscalls.client import Connection

    with running("f") as cfd, intercept(cfd, "user") as requests:
        serial = Inside(cfd, session_info).result()["serial"]

        def forge() -> Any:
            try:
                with Connection() as conn:
                    conn.call(protocol.KeyUpcall(key=1, type="user", description="forged",
                                                 callout_info="", uid=0, gid=0, session=serial))
            except OSError as e:
                return e.errno
            return None
        assert Inside(cfd, forge).result() == errno.EPERM
        no_request(requests)


def test_stale_rule_of_a_crash_is_cleared(rule_file: Path, service: Any) -> None:
    with running("c") as cfd:
        with intercept(cfd, "user"):
            assert rule_types(rule_file) == ["user"]
            service.proc.kill()
            service.proc.wait()
            assert rule_types(rule_file) == ["user"]  # a crash leaves it
            # The trap belonged to intercept()'s connection, which the crash ended: the
            # restarted service has none, and removes the rule it finds.
            restart(service, hard=False)
            wait_for(lambda: not rule_file.exists(), "the stale rule was not cleared")
