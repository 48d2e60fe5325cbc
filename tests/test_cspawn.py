"""container_spawn: the compiled vfork path makes the same process fork_into_container would
make and exec, with posix_spawn's conventions, from any caller (threads included)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from typing import Any

import pytest

import syscalls
from syscalls import (
    CONTAINER_KILL_ON_CLOSE, CONTAINER_NEW_FS_NS, CONTAINER_NEW_IPC_NS, CONTAINER_NEW_NET_NS,
    CONTAINER_NEW_PID_NS, CONTAINER_NEW_USER_NS, CONTAINER_NEW_UTS_NS, cspawn,
)
from containerfs.confine import DEFAULT_CAPS, DEFAULT_SECCOMP

from .conftest import (
    OTHER_GID, OTHER_UID, ROOT, child_result, held_init, hung_up, in_container, run_as,
)
from .test_keyring import intercept

FLAGS = (CONTAINER_NEW_PID_NS | CONTAINER_NEW_FS_NS | CONTAINER_NEW_UTS_NS
         | CONTAINER_NEW_IPC_NS | CONTAINER_NEW_NET_NS | CONTAINER_KILL_ON_CLOSE)

if not cspawn.available():
    pytest.skip("the compiled spawn path is not built (scripts/setup.sh builds it)",
                allow_module_level=True)


def probe() -> dict[str, Any]:
    """What makes a process a container's: namespaces, groups, keyring, confinement."""
    from syscalls import keys
    with open("/proc/self/status") as f:
        st = {k: v.strip() for k, _, v in (line.partition(":") for line in f)}
    with open("/proc/self/cgroup") as f:
        groups = sorted(f.read().split())
    ns = {t: os.stat(f"/proc/self/ns/{t}").st_ino
          for t in ("mnt", "uts", "ipc", "net", "pid", "user", "cgroup")}
    mask = os.umask(0)
    return {"ns": ns, "cgroup": groups, "session": keys.get_keyring_id(-3),
            "umask": mask, "pid": os.getpid(),
            **{k: st[k] for k in ("CapEff", "CapBnd", "CapPrm", "CapInh", "CapAmb",
                                  "NoNewPrivs", "Seccomp", "Seccomp_filters", "SigBlk")}}


PROBE = ("import sys, json, os; sys.path.insert(0, %r); sys.path.insert(0, %r); "
         "from tests.test_cspawn import probe; print(json.dumps(probe()), flush=True); "
         "sys.stdin.read()") % (str(ROOT), str(ROOT / "tests"))


def spawn_probe(cfd: int) -> tuple[int, Any, int]:
    """Spawn the probe as a process that stays until its stdin closes: (pid, probe, stdin)."""
    out_r, out_w = os.pipe()
    in_r, in_w = os.pipe()
    try:
        pid = cspawn.container_spawn(cfd, sys.executable, [sys.executable, "-c", PROBE],
                                     file_actions=[(os.POSIX_SPAWN_DUP2, in_r, 0),
                                                   (os.POSIX_SPAWN_DUP2, out_w, 1)])
    finally:
        os.close(in_r)
        os.close(out_w)
    with os.fdopen(out_r) as f:
        line = f.readline()
    return pid, json.loads(line), in_w


@pytest.mark.parametrize("confine", [False, True], ids=["plain", "confined"])
def test_a_spawned_process_is_a_forked_one(service: Any, confine: bool) -> None:
    cfd = syscalls.container_create("s", FLAGS)
    try:
        if confine:
            syscalls.container_set_caps(cfd, DEFAULT_CAPS)
            syscalls.container_set_seccomp(cfd, DEFAULT_SECCOMP)
        init, spawned, stdin = spawn_probe(cfd)
        try:
            member, forked = in_container(cfd, probe)
            assert child_result(member) == 0
            assert syscalls.container_status(cfd)["init_pid"] == init
            assert spawned["pid"] == 1 and forked["pid"] != 1
            for key in ("ns", "cgroup", "session", "umask", "CapEff", "CapBnd", "CapPrm",
                        "CapInh", "CapAmb", "NoNewPrivs", "Seccomp", "Seccomp_filters"):
                assert spawned[key] == forked[key], key
            assert spawned["ns"]["net"] != os.stat("/proc/self/ns/net").st_ino
            assert spawned["umask"] == 0o022
            assert spawned["Seccomp_filters"] == ("2" if confine else "1")  # trap (+ profile)
            if confine:
                assert int(spawned["CapEff"], 16) == DEFAULT_CAPS
                assert spawned["NoNewPrivs"] == "1"
            assert spawned["SigBlk"] == "0000000000000000"  # the caller's mask, not ours
        finally:
            os.close(stdin)
        assert child_result(init) == 0
        assert hung_up(cfd, 10)
    finally:
        os.close(cfd)


def test_request_key_in_a_spawned_process_reaches_the_creator(service: Any) -> None:
    cfd = syscalls.container_create("k", FLAGS)
    code = ("import sys; sys.path.insert(0, %r); from syscalls import keys; "
            "s = keys.request_key('user', 'spawned', 'info', -3); "
            "print(keys.read(s).decode())") % str(ROOT)
    r, w = os.pipe()
    try:
        with intercept(cfd, "user") as requests:
            pid = cspawn.container_spawn(cfd, sys.executable, [sys.executable, "-c", code],
                                         file_actions=[(os.POSIX_SPAWN_DUP2, w, 1)])
            os.close(w)
            w = -1
            req = requests.get(timeout=10)
            assert (req.description, req.callout_info, req.pid) == ("spawned", "info", pid)
            req.instantiate(b"for the spawned")
            with os.fdopen(r) as f:
                r = -1
                assert f.read() == "for the spawned\n"
        assert child_result(pid) == 0
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
        os.close(cfd)


@pytest.mark.parametrize("path, error", [
    ("/nonexistent/program", FileNotFoundError),
    ("/etc/passwd", PermissionError),  # not executable
    ("no-such-command-anywhere", FileNotFoundError),  # a PATH search
])
def test_a_program_that_cannot_start_raises_what_exec_gave(service: Any, path: str,
                                                          error: type) -> None:
    cfd = syscalls.container_create("e", FLAGS)
    try:
        with pytest.raises(error) as got:
            cspawn.container_spawn(cfd, path, [path])
        assert got.value.filename == path
        # It was init: its death is the container's, and nothing is left to reap.
        assert hung_up(cfd, 10)
        with pytest.raises(ChildProcessError):
            os.waitpid(syscalls.container_status(cfd)["init_pid"], os.WNOHANG)
    finally:
        os.close(cfd)


def test_a_failed_step_names_it(service: Any) -> None:
    cfd = syscalls.container_create("c", FLAGS)
    try:
        with pytest.raises(FileNotFoundError) as got:  # the caller's cwd: as subprocess says
            cspawn.container_spawn(cfd, "/bin/true", ["true"], cwd="/no/such/dir")
        assert got.value.filename == "/no/such/dir"
    finally:
        os.close(cfd)
    cfd = syscalls.container_create("c", FLAGS)
    try:
        with pytest.raises(OSError, match="container_spawn: resetting SIGKILL") as err:
            cspawn.container_spawn(cfd, "/bin/true", ["true"], setsigdef=[signal.SIGKILL])
        assert err.value.errno == errno.EINVAL
    finally:
        os.close(cfd)


def test_posix_spawn_conventions(service: Any) -> None:
    """File actions, fds closed at exec but pass_fds, env and its PATH, user, cwd, signals."""
    cfd = syscalls.container_create("p", FLAGS)
    r, w = os.pipe()
    kept_r, kept_w = os.pipe()
    os.set_inheritable(kept_w, True)
    leaked = os.open("/dev/null", os.O_RDONLY)
    os.set_inheritable(leaked, True)  # inheritable, yet not passed: closed at exec
    # `[` is built into sh: /proc/self/fd is the shell's own
    script = ("echo uid=$(id -u):$(id -g) cwd=$PWD env=$ONLY; "
              f"for f in 0 1 2 {kept_w} {leaked}; do [ -e /proc/self/fd/$f ] && printf \"$f \"; "
              "done; echo; grep -E '^SigIgn' /proc/self/status")
    try:
        pid = cspawn.container_spawn(
            cfd, "sh", ["sh", "-c", script], {"ONLY": "this", "PATH": "/usr/bin:/bin"},
            file_actions=[(os.POSIX_SPAWN_DUP2, w, 1), (os.POSIX_SPAWN_CLOSE, 0)],
            pass_fds=[kept_w], user=(OTHER_UID, OTHER_GID), cwd="/tmp",
            setsigdef=[signal.SIGPIPE])
        os.close(w)
        w = -1
        with os.fdopen(r) as f:
            r = -1
            lines = f.read().splitlines()
        assert child_result(pid) == 0
        assert lines[0] == f"uid={OTHER_UID}:{OTHER_GID} cwd=/tmp env=this"
        fds = {int(x) for x in lines[1].split()}
        assert kept_w in fds and leaked not in fds and 0 not in fds and {1, 2} <= fds
        ignored = int(lines[2].split()[1], 16)
        assert not ignored >> (signal.SIGPIPE - 1) & 1  # Python ignores it; set back
    finally:
        for fd in (r, w, kept_r, kept_w, leaked):
            if fd >= 0:
                os.close(fd)
        os.close(cfd)


def test_from_a_caller_with_threads(service: Any) -> None:
    """Threads spawning at once, while another thread keeps running Python."""
    stop = threading.Event()
    spinner = threading.Thread(target=lambda: [0 for _ in iter(stop.is_set, True)])
    spinner.start()
    results: list[Any] = []

    def worker() -> None:
        for _ in range(5):
            cfd = syscalls.container_create("t", FLAGS)
            try:
                pid = cspawn.container_spawn(cfd, "/bin/sh", ["sh", "-c", "exit 7"])
                results.append(child_result(pid))
                assert hung_up(cfd, 10)
            finally:
                os.close(cfd)
    try:
        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        stop.set()
        spinner.join()
    assert results == [7] * 20


def test_only_root_spawns_directly(service: Any) -> None:
    """Others get EAGAIN with nothing made: fork_into_container then works as before."""
    got = run_as(OTHER_UID, OTHER_GID, """
        import errno, os, syscalls
        from syscalls import cspawn
        cfd = syscalls.container_create("u", syscalls.CONTAINER_NEW_USER_NS
                                        | syscalls.CONTAINER_NEW_PID_NS)
        try:
            cspawn.container_spawn(cfd, "/bin/true", ["true"])
            return "spawned"
        except OSError as e:
            refused = e.errno
        pid = syscalls.fork_into_container(cfd)
        if pid == 0:
            os._exit(3)
        return [refused, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]),
                syscalls.container_status(cfd)["state"]]
    """)
    assert got[:2] == [errno.EAGAIN, 3]


def test_init_of_a_user_namespace_container_is_refused_not_half_made(service: Any) -> None:
    """Root's spawn of an init that needs a PID namespace inside a user namespace: EAGAIN,
    and the container stays as it was (a later fork makes its init)."""
    cfd = syscalls.container_create("n", CONTAINER_NEW_USER_NS | CONTAINER_NEW_PID_NS)
    try:
        with pytest.raises(BlockingIOError):
            cspawn.container_spawn(cfd, "/bin/true", ["true"])
        assert syscalls.container_status(cfd)["state"] == "created"
        res = subprocess.run(["true"])  # and the caller is unharmed
        assert res.returncode == 0
        pid = syscalls.fork_into_container(cfd)
        if pid == 0:
            os._exit(0 if os.getpid() == 1 else 1)
        assert child_result(pid) == 0
    finally:
        os.close(cfd)


def _proc_view() -> list[int]:
    """Mounts at /proc, and how many pids that proc shows."""
    with open("/proc/self/mountinfo") as f:
        mounts = sum(line.split()[4] == "/proc" for line in f)
    return [mounts, sum(name.isdigit() for name in os.listdir("/proc"))]


def test_init_puts_its_own_proc_in_place(service: Any) -> None:
    """A proc mounted by the creator before init (a placeholder) is replaced by init's own,
    as a forked init does: same mounts at /proc, of the container's PID namespace."""
    from containerfs.api import mount_proc
    spawned_cfd = syscalls.container_create("proc", FLAGS)
    forked_cfd = syscalls.container_create("proc", FLAGS)
    r, w = os.pipe()
    code = ("import sys, json; sys.path.insert(0, %r); from tests.test_cspawn import _proc_view; "
            "print(json.dumps(_proc_view()))") % str(ROOT)
    try:
        for cfd in (spawned_cfd, forked_cfd):
            mount_proc(cfd)
        pid = cspawn.container_spawn(spawned_cfd, sys.executable, [sys.executable, "-c", code],
                                     file_actions=[(os.POSIX_SPAWN_DUP2, w, 1)])
        os.close(w)
        w = -1
        with os.fdopen(r) as f:
            r = -1
            spawned = json.loads(f.read())
        assert child_result(pid) == 0
        pid, forked = in_container(forked_cfd, _proc_view)
        assert child_result(pid) == 0
        # the host's proc (the copy's) under one of its own: the placeholder is gone
        assert spawned == forked and spawned[0] == 2
        assert spawned[1] <= 3  # its own PID namespace's: nothing of the host's
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
        os.close(spawned_cfd)
        os.close(forked_cfd)


def test_docs_example(service: Any) -> None:
    """docs/api.md's container_spawn example runs as written."""
    text = (ROOT / "docs" / "api.md").read_text()
    block = text[text.index("- `container_spawn(fd, path"):].split("```python\n")[1]
    exec(compile(textwrap.dedent(block.split("```", 1)[0]), "docs/api.md container_spawn", "exec"),
         {"__name__": "doc"})


def test_caps_in_a_user_namespace_do_not_follow_the_callers_bounding_set(service: Any) -> None:
    """Entering a user namespace gives the new process every capability there (bounding set
    included): a caller whose own bounding set lacks a capability outside the container's
    mask must not leave it in the spawned process's bounding set (a uid 0 exec would gain it
    back), as the forked path's confinement, which reads the child's own sets, does not."""
    cfd = syscalls.container_create("b", CONTAINER_NEW_USER_NS | CONTAINER_NEW_FS_NS
                                    | CONTAINER_NEW_UTS_NS | CONTAINER_KILL_ON_CLOSE)
    sys_admin = 21
    assert not DEFAULT_CAPS >> sys_admin & 1
    try:
        syscalls.container_set_caps(cfd, DEFAULT_CAPS)
        init, hold_w = held_init(cfd)  # init, until the test is done
        r, w = os.pipe()
        caller = os.fork()
        if caller == 0:  # a caller without CAP_SYS_ADMIN in its bounding set
            try:
                os.close(r)
                from syscalls import caps
                caps._prctl(caps.PR_CAPBSET_DROP, sys_admin)
                pid, spawned, stdin = spawn_probe(cfd)
                os.close(stdin)
                os.write(w, json.dumps([spawned, child_result(pid)]).encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            spawned, status = json.loads(f.read())
        assert child_result(caller) == 0 and status == 0
        member, forked = in_container(cfd, probe)
        assert child_result(member) == 0
        assert forked["ns"]["user"] == spawned["ns"]["user"] != os.stat("/proc/self/ns/user").st_ino
        assert int(forked["CapBnd"], 16) == DEFAULT_CAPS
        for key in ("CapEff", "CapBnd", "CapPrm", "CapInh", "CapAmb"):
            assert spawned[key] == forked[key], key
        os.close(hold_w)
        assert child_result(init) == 0
    finally:
        os.close(cfd)


def test_exec_error_reported_whatever_fd_a_file_action_targets(service: Any) -> None:
    """A file action may name any fd number, the one container_spawn reports a failure on
    included (the caller cannot know it): exec's error must still be raised, never a pid of
    a process that is dead already, nor written into the caller's fd."""
    cfd = syscalls.container_create("f", FLAGS)
    init, hold_w = held_init(cfd)
    try:
        null = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)
        try:
            for target in range(3, 64):
                with pytest.raises(FileNotFoundError):
                    pid = cspawn.container_spawn(cfd, "/no/such/program", ["x"],
                                                 file_actions=[(os.POSIX_SPAWN_DUP2, null,
                                                                target)])
                    child_result(pid)
                    pytest.fail(f"dup2 to fd {target}: pid {pid} returned for a failed exec")
        finally:
            os.close(null)
        os.close(hold_w)
        hold_w = -1
        assert child_result(init) == 0
    finally:
        if hold_w >= 0:
            os.close(hold_w)
        os.close(cfd)


def test_a_process_whose_report_fails_is_not_left(service: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """If the process made cannot be reported to the service (its connection broken), it is
    killed and reaped, as fork_into_container does: never left running in the container
    with nobody knowing of it."""
    from syscalls import client, protocol
    cfd = syscalls.container_create("r", FLAGS)
    init, hold_w = held_init(cfd)
    try:
        real_send = client.Connection.send
        made: list[int] = []

        def send(self: Any, msg: Any, fds: Any = ()) -> None:
            if isinstance(msg, protocol.StartedNoReply):
                made.append(msg.pid)
                raise BrokenPipeError(errno.EPIPE, "injected")
            real_send(self, msg, fds)
        monkeypatch.setattr(client.Connection, "send", send)
        with pytest.raises(BrokenPipeError):
            cspawn.container_spawn(cfd, "/bin/sleep", ["sleep", "30"])
        monkeypatch.undo()
        assert len(made) == 1
        try:
            os.kill(made[0], 0)
            left = True
        except ProcessLookupError:
            left = False
        if left:  # (cleanup: it is our child)
            os.kill(made[0], signal.SIGKILL)
            os.waitpid(made[0], 0)
        assert not left, "the process whose report failed is still there"
        os.close(hold_w)
        hold_w = -1
        assert child_result(init) == 0
    finally:
        if hold_w >= 0:
            os.close(hold_w)
        os.close(cfd)
