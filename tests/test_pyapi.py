"""The Python API (contract section 13): Container, run and popen in a container, side by side
with subprocess on the host; starting failures; threads; roots, read-only, hostname."""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import syscalls
from containerfs import Container
from syscalls import (
    CONTAINER_NEW_IPC_NS, CONTAINER_NEW_NET_NS, CONTAINER_NEW_PID_NS, CONTAINER_NEW_UTS_NS,
)

ROOT = Path(__file__).resolve().parent.parent
PID = CONTAINER_NEW_PID_NS


def both(args: list[str], **kw: Any) -> tuple[Any, Any]:
    """The same run on the host (subprocess.run) and in a fresh container (its result or the
    exception each raised)."""
    def attempt(fn: Any) -> Any:
        try:
            return fn(args, **kw)
        except (OSError, subprocess.SubprocessError, ValueError, TypeError) as e:
            return e
    host = attempt(subprocess.run)
    with Container("eq", PID) as c:
        inside = attempt(c.run)
    return host, inside


def same(a: Any, b: Any) -> None:
    if isinstance(a, BaseException):
        assert type(a) is type(b), (a, b)
        if isinstance(a, OSError):
            assert (a.errno, a.filename) == (b.errno, b.filename), (a, b)
        if isinstance(a, subprocess.CalledProcessError):
            assert (a.returncode, a.cmd, a.output, a.stderr) == (
                b.returncode, b.cmd, b.output, b.stderr)
        if isinstance(a, subprocess.TimeoutExpired):
            assert a.cmd == b.cmd and abs(a.timeout - b.timeout) < 0.1
        return
    assert isinstance(b, subprocess.CompletedProcess), b
    assert (a.args, a.returncode, a.stdout, a.stderr) == (b.args, b.returncode, b.stdout, b.stderr)


SH = "/bin/sh"
EQUIVALENCE = [
    # (id, args, kwargs): each documented argument, run on the host and inside
    ("returncode", [SH, "-c", "exit 3"], {}),
    ("capture_output", [SH, "-c", "echo out; echo err >&2"], {"capture_output": True}),
    ("text", [SH, "-c", "echo été"], {"capture_output": True, "text": True}),
    ("input", ["cat"], {"input": b"hello\n", "capture_output": True}),
    ("input_text", ["cat"], {"input": "hé\n", "capture_output": True, "text": True}),
    ("stderr_stdout", [SH, "-c", "echo a; echo b >&2"],
     {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}),
    ("devnull", [SH, "-c", "echo a; echo b >&2; cat"],
     {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE}),
    ("env", [SH, "-c", "echo $FOO; echo $HOME"],
     {"env": {"FOO": "bar", "PATH": "/usr/bin:/bin"}, "capture_output": True}),
    ("cwd", ["pwd"], {"cwd": "/usr/lib", "capture_output": True}),
    ("shell", "echo $((6*7))", {"shell": True, "capture_output": True}),
    ("check_ok", ["true"], {"check": True}),
    ("check_fail", [SH, "-c", "echo x; exit 4"], {"check": True, "capture_output": True}),
    ("timeout", ["sleep", "5"], {"timeout": 0.3}),
    # (a signal's -N: with a member, test_popen_kill_and_send_signal; init ignores signals
    # it has no handler for, the kernel's rule for any PID-namespace init)
    ("not_found", ["/nonexistent/prog"], {}),
    ("not_found_path", ["no-such-program-xyz"], {}),
    ("not_executable", ["/etc/passwd"], {}),
    ("is_dir", ["/usr"], {}),
    ("bad_cwd", ["true"], {"cwd": "/nonexistent-dir"}),
    ("cwd_not_dir", ["true"], {"cwd": "/etc/passwd"}),
    ("input_and_stdin", ["cat"], {"input": b"x", "stdin": subprocess.DEVNULL}),
    ("encoding", [SH, "-c", "printf 'caf\\303\\251\\r\\n'"],
     {"capture_output": True, "encoding": "latin-1", "errors": "strict"}),
    ("universal_newlines", [SH, "-c", "printf 'a\\r\\nb'"],
     {"stdout": subprocess.PIPE, "universal_newlines": True}),
    ("bufsize", ["cat"], {"input": b"x" * 100000, "capture_output": True, "bufsize": 0}),
    ("executable", ["ignored-name", "-c", "echo $0"],
     {"executable": "/bin/sh", "capture_output": True}),
]


@pytest.fixture(params=["cspawn", "server", "helper"])
def spawn_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every way a process is made: root's compiled path (container_spawn), the spawn
    server, and a helper of its own."""
    from containerfs import spawn
    monkeypatch.setattr(spawn, "USE_CSPAWN", request.param == "cspawn")
    monkeypatch.setattr(spawn, "USE_SERVER", request.param != "helper")
    return str(request.param)


@pytest.mark.parametrize("args,kw", [(a, k) for _, a, k in EQUIVALENCE],
                         ids=[i for i, _, _ in EQUIVALENCE])
def test_run_is_subprocess_run(service: Any, spawn_path: str, args: Any,
                               kw: dict[str, Any]) -> None:
    host, inside = both(args, **kw)
    same(host, inside)


def keep_alive(c: Container) -> Any:
    """An init that lives until the container is killed, so later runs are members."""
    return c.popen(["sleep", "60"])


def test_file_and_fd_redirection(service: Any) -> None:
    with tempfile.TemporaryFile() as f, Container("f", PID) as c:
        init = keep_alive(c)
        c.run(["echo", "to a file"], stdout=f)
        c.run([SH, "-c", "echo to an fd >&2"], stderr=f.fileno())
        f.seek(0)
        assert f.read() == b"to a file\nto an fd\n"
        f.seek(0)
        r = c.run(["wc", "-l"], stdin=f, capture_output=True)  # a file as stdin
        assert r.stdout.strip() == b"2"
    assert init.wait(5) == -signal.SIGKILL


def test_user_inside(service: Any, spawn_path: str) -> None:
    with Container("u", PID) as c:
        init = keep_alive(c)
        r = c.run([SH, "-c", "id -u; id -g"], user=(1234, 5678), capture_output=True, text=True)
        assert r.stdout.split() == ["1234", "5678"]
        # a step that fails names itself: an unprivileged process cannot become root again
        with pytest.raises(PermissionError) as e:
            c.run(["true"], user=(1234, 5678), cwd="/root")
        assert e.value.filename == "/root"
    assert init.wait(5) == -signal.SIGKILL


def test_first_process_is_init_and_caller_is_parent(service: Any, spawn_path: str) -> None:
    with Container("init", PID) as c:
        p = c.popen([SH, "-c", "echo $$; read x; exit 7"], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE)
        assert p.stdout is not None
        assert p.stdout.readline() == b"1\n"
        with open(f"/proc/{p.pid}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()
        assert p.poll() is None
        p.communicate(b"\n")
        assert p.returncode == 7
        assert os.waitstatus_to_exitcode(c.wait()) == 7


def test_popen_kill_and_send_signal(service: Any) -> None:
    with Container("k", PID) as c:
        init = c.popen(["sleep", "30"])
        member = c.popen(["sleep", "30"])
        member.send_signal(signal.SIGTERM)
        assert member.wait(5) == -signal.SIGTERM
        init.kill()
        assert init.wait(5) == -signal.SIGKILL


def test_run_does_not_fork_the_caller(service: Any, spawn_path: str) -> None:
    """No copy of this process is made: a fork (os.fork, or fork_into_container's clone3)
    runs the before-fork hooks here; posix_spawn runs none."""
    with Container("nofork", PID) as c:
        seen: list[str] = []
        os.register_at_fork(before=lambda: seen.append("fork"))
        c.run(["true"])
        assert seen == []
        # the check can fail: a fork of ours is seen
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        assert seen == ["fork"]


def test_context_manager_kills(service: Any) -> None:
    with Container("cm", PID) as c:
        p = c.popen(["sleep", "60"])
        fd = os.dup(c.fd)
    try:
        assert p.wait(5) == -signal.SIGKILL
        poller = select.poll()
        poller.register(fd, select.POLLHUP)
        assert poller.poll(5000), "the container outlived its with block"
        assert syscalls.container_status(fd)["state"] == "dead"
    finally:
        os.close(fd)


def test_eight_threads(service: Any, spawn_path: str) -> None:
    results: list[Any] = [None] * 8

    def work(i: int) -> None:
        with Container(f"t{i}", PID | CONTAINER_NEW_UTS_NS, hostname=f"host{i}") as c:
            results[i] = c.run([SH, "-c", "echo $$ $(hostname)"], capture_output=True,
                               text=True, check=True).stdout

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [f"1 host{i}\n" for i in range(8)]


def test_root_readonly_hostname(service: Any) -> None:
    with Container("rooted", PID | CONTAINER_NEW_IPC_NS | CONTAINER_NEW_NET_NS, root="/",
                   readonly=True, hostname="boxed") as c:
        r = c.run([SH, "-c", "hostname; ls /proc | grep '^[0-9]*$' | tr '\\n' ' '; "
                   "touch /tmp/x 2>&1 || echo refused"], capture_output=True, text=True)
        lines = r.stdout.splitlines()
        assert lines[0] == "boxed"
        assert lines[1].split()[0] == "1"  # its own proc: init is 1
        assert "Read-only file system" in r.stdout and lines[-1] == "refused"
    assert os.uname().nodename != "boxed"
    with tempfile.TemporaryDirectory() as d, Container("rw", PID, root=d) as c:
        assert os.path.isdir(os.path.join(d, "proc"))  # made for the container's proc
        with pytest.raises(FileNotFoundError):  # an empty root has no programs
            c.run(["/bin/true"])


def test_fork_sets_hostname_before_child_code(service: Any) -> None:
    with Container("forked", PID, hostname="early") as c:
        r, w = os.pipe()
        pid = c.fork()
        if pid == 0:
            os.write(w, os.uname().nodename.encode())
            os._exit(0)
        os.close(w)
        assert os.read(r, 100) == b"early"
        os.close(r)
        os.waitpid(pid, 0)


def test_limits_stats_freeze(service: Any) -> None:
    with Container("lim", PID) as c:
        c.set_limit("pids.max", "10")
        assert c.get_limit("pids.max") == "10"
        p = c.popen(["sleep", "30"])
        assert c.stats()["pids.current"] >= 1
        c.freeze()
        assert c.status()["frozen"]
        c.thaw()
        c.kill()
        assert p.wait(5) == -signal.SIGKILL
        assert os.WTERMSIG(c.wait()) == signal.SIGKILL
        assert c.id >= 2 and c.name == "lim"


def test_cli_run_root(service: Any) -> None:
    r = subprocess.run([sys.executable, "-m", "containerfs", "run", "--pid", "--root", "/",
                        "--readonly", "--hostname", "clibox", "--", "sh", "-c",
                        "hostname; echo $$; touch /x 2>/dev/null || echo ro"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["clibox", "1", "ro"]
    assert syscalls  # the package is importable beside containerfs


# ---- trio -------------------------------------------------------------------------------------

def test_trio_fifty_containers_waited_at_once(service: Any) -> None:
    import trio

    import containerfs.trio as ctrio

    containers = [Container(f"w{i}", PID) for i in range(50)]
    try:
        procs = [c.popen([SH, "-c", f"sleep 0.5; exit {i % 7}"]) for i, c in
                 enumerate(containers)]
        got: dict[int, int] = {}

        async def one(i: int, c: Container) -> None:
            got[i] = os.waitstatus_to_exitcode(await ctrio.wait(c))

        async def main() -> None:
            with trio.fail_after(30):
                async with trio.open_nursery() as n:
                    for i, c in enumerate(containers):
                        n.start_soon(one, i, c)

        threads_before = threading.active_count()
        trio.run(main)
        assert got == {i: i % 7 for i in range(50)}
        assert threading.active_count() == threads_before
        for p in procs:
            p.wait()
    finally:
        for c in containers:
            c.close()


def test_trio_run_process(service: Any) -> None:
    import trio

    import containerfs.trio as ctrio

    async def main() -> None:
        with Container("tr", PID) as c:
            init = c.popen(["sleep", "60"])
            r = await ctrio.run_process(c, ["sh", "-c", "cat; echo err >&2"], stdin=b"in\n",
                                        capture_stdout=True, capture_stderr=True)
            assert (r.returncode, r.stdout, r.stderr) == (0, b"in\n", b"err\n")
            with pytest.raises(subprocess.CalledProcessError) as e:
                await ctrio.run_process(c, ["sh", "-c", "exit 5"])
            assert e.value.returncode == 5
            r = await ctrio.run_process(c, ["sh", "-c", "exit 6"], check=False)
            assert r.returncode == 6 and r.stdout is None
            with pytest.raises(FileNotFoundError):
                await ctrio.run_process(c, ["/no/such"])
            with trio.move_on_after(0.3) as scope:
                await ctrio.run_process(c, ["sleep", "30"])
            assert scope.cancelled_caught
            assert init.poll() is None
        assert init.wait(5) == -signal.SIGKILL

    trio.run(main)
    # no thread left behind (a cached worker would keep this process multi-threaded)
    assert len(os.listdir("/proc/self/task")) == 1


# ---- terminals -------------------------------------------------------------------------------

def read_until(fd: int, want: bytes, timeout: float = 10) -> bytes:
    import time
    data = b""
    deadline = time.monotonic() + timeout
    while want not in data:
        left = deadline - time.monotonic()
        assert left > 0, f"never saw {want!r} in {data!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                chunk = b""
            assert chunk, f"terminal closed before {want!r}: {data!r}"
            data += chunk
    return data


def test_pty_follows_resize(service: Any, spawn_path: str) -> None:
    with Container("tty", PID) as c:
        p = c.popen([SH, "-c", "trap 'echo winch $(stty size)' WINCH; tty; echo ready; "
                     "while :; do sleep 0.05; done"], pty=True)
        assert p.stdin is None and p.pty >= 0
        out = read_until(p.pty, b"ready")
        assert b"/dev/pts/" in out  # a terminal is its stdin, stdout and stderr
        p.resize(40, 100)
        read_until(p.pty, b"winch 40 100")
        p.resize(25, 81)
        read_until(p.pty, b"winch 25 81")
        p.kill()
        p.wait(5)
        p.close_pty()
    with pytest.raises(ValueError):
        c2 = Container("tty2", PID)
        try:
            c2.popen(["true"]).resize(1, 1)
        finally:
            c2.close()


def test_cli_run_t_follows_tmux_resize(service: Any) -> None:
    import shutil
    import time
    if shutil.which("tmux") is None:
        pytest.skip("no tmux")
    session = f"cfs-test-{os.getpid()}"
    with tempfile.TemporaryDirectory() as d:
        log = os.path.join(d, "out")  # the container shares our mount namespace
        inner = (f"trap 'stty size >> {log}' WINCH; stty size >> {log}; "
                 "while :; do sleep 0.05; done")
        cmd = (f"env PYTHONPATH={ROOT} CONTAINERFS_SOCKET={service.socket} {sys.executable} "
               f"-m containerfs run -t --pid --privileged -- /bin/sh -c \"{inner}\"")
        subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "24",
                        cmd], check=True, cwd=ROOT)
        try:
            deadline = time.monotonic() + 20
            while not (os.path.exists(log) and open(log).read().strip()):
                assert time.monotonic() < deadline, "the command never started"
                time.sleep(0.05)
            subprocess.run(["tmux", "resize-window", "-t", session, "-x", "120", "-y", "33"],
                           check=True)
            while "33 120" not in open(log).read():
                assert time.monotonic() < deadline, open(log).read()
                time.sleep(0.05)
            assert open(log).read().split("\n")[0] == "24 80"
        finally:
            subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


# ---- the documentation's examples --------------------------------------------------------------

def docs_examples() -> list[str]:
    text = (ROOT / "docs" / "api.md").read_text()
    section = text[text.index("## The Python API for programs"):]
    blocks = section.split("```python\n")[1:]
    return [b.split("```", 1)[0] for b in blocks]


def test_docs_examples(service: Any) -> None:
    examples = docs_examples()
    assert len(examples) >= 4
    for i, code in enumerate(examples):
        try:
            exec(compile(code, f"docs/api.md example {i + 1}", "exec"), {"__name__": "doc"})
        except BaseException as e:
            raise AssertionError(f"docs/api.md example {i + 1} failed: {e!r}") from e


def test_unprivileged_owner(service: Any) -> None:
    """A non-root owner's container (user namespace): a helper per process, with
    CLONE_PARENT from the helper; hostname set from outside in the user namespace."""
    from tests.conftest import OTHER_GID, OTHER_UID, run_as
    got = run_as(OTHER_UID, OTHER_GID, """
        import subprocess
        from containerfs import Container
        from syscalls import CONTAINER_NEW_USER_NS, CONTAINER_NEW_PID_NS
        out = {}
        with Container("mine", CONTAINER_NEW_USER_NS | CONTAINER_NEW_PID_NS,
                       hostname="owned") as c:
            init = c.popen(["sh", "-c", "read x"], stdin=subprocess.PIPE)
            r = c.run(["sh", "-c", "echo $$ $(id -u) $(hostname)"], capture_output=True,
                      text=True)
            out["stdout"] = r.stdout
            with open(f"/proc/{init.pid}/stat") as f:
                out["parent_is_me"] = int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()
            try:
                c.run(["/no/such"])
            except FileNotFoundError as e:
                out["enoent"] = e.filename
            out["as0"] = c.run(["id", "-u"], user=(0, 0), capture_output=True).stdout.decode()
            try:
                c.run(["true"], user=(5, 5))  # no such gid in its user namespace
            except OSError as e:
                out["setgid"] = [e.errno, str(e)]
            init.communicate(b"\\n")
            out["init"] = init.returncode
        return out
    """)
    assert got == {"stdout": "2 0 owned\n", "parent_is_me": True, "enoent": "/no/such",
                   "init": 0, "as0": "0\n",
                   "setgid": [errno.EINVAL, "[Errno 22] setgid: Invalid argument"]}


def test_refused_arguments(service: Any) -> None:
    with Container("refused", PID) as c:
        for kw in ({"preexec_fn": lambda: None}, {"pass_fds": (0,)}, {"close_fds": False},
                   {"user": "root"}, {"umask": 0}):
            with pytest.raises(TypeError):
                c.popen(["true"], **kw)
        assert c.run(["true"], close_fds=True).returncode == 0
        # the first run was init and has exited: the container is dead, and says why
        with pytest.raises(OSError) as e:
            c.run(["true"])
        assert e.value.errno == errno.ECANCELED and "fork_into_container" in str(e.value)


def test_root_with_user_namespace(service: Any, spawn_path: str) -> None:
    """A user namespace to enter: the server's copy (or a helper) is the intermediate; the
    process is still our child, uid 0 inside."""
    with Container("userns", PID | syscalls.CONTAINER_NEW_USER_NS) as c:
        p = c.popen([SH, "-c", "echo $$ $(id -u); read x"], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE)
        assert p.stdout is not None
        assert p.stdout.readline() == b"1 0\n"
        with open(f"/proc/{p.pid}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()
        p.communicate(b"\n")
        assert p.returncode == 0


def test_forked_caller_gets_its_own_server(service: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """After os.fork, the child's processes are still its own children."""
    from containerfs import spawn
    monkeypatch.setattr(spawn, "USE_CSPAWN", False)
    with Container("forkedcaller", PID) as c:
        init = c.popen(["sleep", "60"])  # starts this process's server
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                p = c.popen(["sh", "-c", "exit 9"])
                os.write(w, str(p.wait(10)).encode())
            finally:
                os._exit(0)
        os.close(w)
        assert os.read(r, 10) == b"9"
        os.close(r)
        os.waitpid(pid, 0)
        assert init.poll() is None


def test_root_without_pid_namespace(service: Any) -> None:
    """Without NEW_PID_NS the proc shows the creator's PID namespace (ours included)."""
    with Container("nopid", CONTAINER_NEW_NET_NS, root="/", readonly=True) as c:
        r = c.run([SH, "-c", f"test -d /proc/{os.getpid()} && echo mine; cat /proc/net/dev"],
                  capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == "mine"
        assert [ln.split(":")[0].strip() for ln in lines[3:]] == ["lo"]  # its own network


def test_unused_and_failed_containers_are_not_left(service: Any) -> None:
    c = Container("unused", PID)
    fd = os.dup(c.fd)
    c.close()
    c.close()  # once
    assert syscalls.container_status(fd)["state"] == "dead"
    os.close(fd)
    before = {row["id"] for row in syscalls.container.container_list()
              if row["state"] != "dead"}
    with pytest.raises(FileNotFoundError) as e:
        Container("badroot", PID, root="/no/such/dir")
    assert "binding /no/such/dir as the root" in str(e.value)
    after = {row["id"] for row in syscalls.container.container_list() if row["state"] != "dead"}
    assert after == before


def test_spawn_server_dead_is_replaced(service: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from containerfs import spawn
    monkeypatch.setattr(spawn, "USE_CSPAWN", False)
    with Container("srv", PID) as c:
        init = c.popen(["sleep", "60"])
        old = spawn._server.pid
        os.kill(old, signal.SIGKILL)
        os.waitpid(old, 0)
        assert c.run(["true"]).returncode == 0  # a new server, and nothing made twice
        assert spawn._server.pid != old
        assert init.poll() is None


def test_no_plan_pins_the_container(service: Any) -> None:
    """This process never forks into a container it runs commands in: the plan of that fork
    (fds of its namespaces) is not kept once the first command runs, nor after close."""
    from syscalls.container import plans
    with Container("plan", PID | CONTAINER_NEW_NET_NS) as c:
        if plans.plan is None:
            pytest.skip("no plan kept here (threads running)")
        c.run(["true"])
        assert plans.plan is None
    c = Container("plan2", PID)
    assert plans.plan is not None
    c.close()
    assert plans.plan is None


def test_pids_in_context(service: Any) -> None:
    """Container.pids(): each living process as (pid here, pid inside), init first."""
    with Container("pids", PID) as c:
        init = c.popen(["sleep", "30"])
        member = c.popen(["sleep", "30"])
        try:
            got = c.pids()
            assert got[0] == (init.pid, 1)
            assert sorted(got[1:]) == [(member.pid, got[1][1])] and got[1][1] > 1
        finally:
            member.kill()
            member.wait()
            init.kill()
            init.wait()


def test_leaving_after_init_exited_leaves_no_member(service: Any) -> None:
    """A run whose init left a member behind: leaving the block (which asks no kill once
    init is reaped here) still leaves nothing running; the container is dead."""
    from .conftest import pid_alive
    with Container("leftover") as c:  # no PID namespace: $! is the member's pid here
        r = c.run(["sh", "-c", "sleep 100 & echo $!"], capture_output=True, text=True)
        members = [int(r.stdout)]
        fd = os.dup(c.fd)
    try:
        assert syscalls.container_wait(fd) == 0
        assert syscalls.container_status(fd)["state"] == "dead"
        deadline = time.monotonic() + 5
        while any(pid_alive(p) for p in members) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not any(pid_alive(p) for p in members)
    finally:
        os.close(fd)
