"""Podman drives the OCI runtime under test (OCI_RUNTIME; runc or ours) on a busybox root.

Each test asserts what a podman user sees: exit codes, output streams, state, limits taking
effect inside the container. The same tests run against runc (`OCI_RUNTIME=runc`), so they test
the runtime interface, not our code. Only the view test is ours alone.

Podman runs with its own storage, run and temp dirs under one temp dir (vfs driver, --rootfs),
`--network none` and its own cgroup parent; the module fixture removes every container, kills
anything left in that cgroup parent (every v1 hierarchy too), unmounts what podman left under
the temp dir and removes it. On this host podman needs `--cgroup-manager cgroupfs` and lowered
`--ulimit nofile/nproc` (no CAP_SYS_RESOURCE). What podman asks of a runtime:
/work/notes/podman-calls.md (recorded with a spy runtime).
"""

from __future__ import annotations

import os
import pty
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import oci_support
from .conftest import SKIP_REASON, ServiceUnderTest, start_service

CALL_TIMEOUT = 60  # s for one podman call: a hung runtime fails the test instead of hanging it
HIERARCHIES = Path("/sys/fs/cgroup")


def _probe() -> str | None:
    if SKIP_REASON:
        return SKIP_REASON
    if shutil.which("podman") is None:
        return "podman is not installed (apt-get install podman)"
    if oci_support.busybox() is None:
        return "no static busybox (apt-get install busybox-static)"
    rt = oci_support.runtime()
    if not os.access(rt, os.X_OK):
        return f"the runtime under test {rt} is not an executable (set OCI_RUNTIME)"
    try:
        subprocess.run(["podman", "--version"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"podman does not run: {e}"
    version = subprocess.run([rt, "--version"], capture_output=True, text=True, timeout=30)
    if version.returncode != 0 and "No module named 'containerfs.oci'" in version.stderr:
        # the default runtime (the venv's entry point) on a checkout without the runtime yet;
        # any other failure of the runtime is for the tests to show
        return f"{rt} cannot import containerfs.oci: not in this checkout (set OCI_RUNTIME)"
    return None


def _mount_points() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split(" ")[4] for line in f}


@dataclass
class Podman:
    """podman with isolated storage, the runtime under test, and the flags this host needs."""

    base: Path
    runtime: str
    socket: str | None  # the service's socket when the runtime is ours
    view: str | None  # the service's view mount when the runtime is ours
    cgroup_parent: str
    rootfs: Path
    shared_dir: Path  # bind-mounted at /shared into containers that use it

    def argv(self, *args: str) -> list[str]:
        b = self.base
        argv = ["podman", "--root", str(b / "root"), "--runroot", str(b / "runroot"),
                "--tmpdir", str(b / "tmp"), "--network-config-dir", str(b / "net"),
                "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs",
                "--events-backend", "file", "--runtime", self.runtime]
        if self.socket is not None:
            # podman strips the environment; this reaches every runtime call as --socket=PATH
            argv += ["--runtime-flag", f"socket={self.socket}"]
        return argv + list(args)

    def __call__(self, *args: str, input: str | None = None,
                 stdin: int | None = subprocess.DEVNULL,
                 timeout: float = CALL_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), capture_output=True, text=True, input=input,
                              stdin=stdin if input is None else None, timeout=timeout,
                              cwd=self.base)

    def ok(self, *args: str, **kw: object) -> str:
        """Run podman; fail the test with its stderr unless it exits 0. Returns stdout."""
        res = self(*args, **kw)  # type: ignore[arg-type]
        assert res.returncode == 0, \
            f"podman {' '.join(args)} exited {res.returncode}:\n{res.stderr}{res.stdout}"
        return res.stdout

    def run_flags(self, name: str | None = None) -> list[str]:
        """Flags for `podman run` on this host; the command comes after them."""
        flags = ["--network", "none", "--ulimit", "nofile=1024:1024",
                 "--ulimit", "nproc=1000:1000", "--cgroup-parent", self.cgroup_parent]
        if name is not None:
            flags += ["--name", name]
        return flags

    def run(self, *args: str, flags: tuple[str, ...] = (), stdin: int | None = subprocess.DEVNULL,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """`podman run --rm [flags] --rootfs ROOT args...` (--rootfs takes the rest as the command)."""
        return self("run", "--rm", *self.run_flags(), *flags, "--rootfs", str(self.rootfs),
                    *args, stdin=stdin, input=input)

    def detached(self, name: str, *args: str, flags: tuple[str, ...] = ()) -> str:
        """Start a detached container named `name`; returns its id."""
        out = self.ok("run", "-d", *self.run_flags(name), *flags, "--rootfs", str(self.rootfs),
                      *args)
        cid = out.strip().splitlines()[-1]
        assert re.fullmatch(r"[0-9a-f]{64}", cid), f"podman run -d printed {out!r}"
        return cid

    def remove(self, name: str) -> None:
        self("rm", "-f", "-t", "0", name)

    def status(self, name: str) -> str:
        return self.ok("inspect", "--format", "{{.State.Status}}", name).strip()

    def exit_code(self, name: str) -> int:
        return int(self.ok("inspect", "--format", "{{.State.ExitCode}}", name).strip())


def _runtime_is_containerfs(runtime: str) -> bool:
    """Ours, however it is reached (the venv's script or a wrapper): it says so in --version."""
    try:
        out = subprocess.run([runtime, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "containerfs" in out.lower()


def _clean_cgroup_parent(parent: str) -> list[str]:
    """Kill whatever is left in our cgroup parent (every hierarchy) and remove it, children
    first. Returns the directories that could not be removed."""
    left: list[str] = []
    dirs = [p for h in sorted(HIERARCHIES.iterdir()) if (p := h / parent.strip("/")).is_dir()]
    for top in dirs:
        for d in sorted(top.rglob("*"), key=lambda p: -len(p.parts)) + [top]:
            if not d.is_dir():
                continue
            for _ in range(50):
                try:
                    procs = (d / "cgroup.procs").read_text().split()
                except OSError:
                    procs = []
                for pid in procs:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
            else:
                left.append(str(d))
    return left


@pytest.fixture(scope="module")
def runtime_service() -> Iterator[ServiceUnderTest | None]:
    """When the runtime under test is ours: a containerfs service for the module (podman
    passes its socket with --runtime-flag). None for another runtime."""
    reason = _probe()
    if reason:
        print(f"skipping: {reason}")
        pytest.skip(reason)
    if not _runtime_is_containerfs(oci_support.runtime()):
        yield None
        return
    cgroup = f"cfs-test-{os.getpid()}-{time.monotonic_ns()}"
    where = Path(tempfile.mkdtemp(prefix="cfs-test-"))
    svc = start_service(where, cgroup)
    try:
        yield svc
        assert svc.alive(), f"the service died during the tests:\n{svc.log.read_text()}"
    finally:
        svc.cleanup()
        shutil.rmtree(where, ignore_errors=True)
        leftover = [base for base in svc.cgroups.bases() if os.path.exists(base)]
        assert not leftover, f"cgroups {leftover} were left behind"


@pytest.fixture(scope="module")
def podman(runtime_service: ServiceUnderTest | None) -> Iterator[Podman]:
    """podman in a temp dir, with the runtime under test; everything removed at the end."""
    mounts_before = _mount_points()
    run_containers_existed = os.path.exists("/run/containers")
    base = Path(tempfile.mkdtemp(prefix="cfs-podman-"))
    parent = f"/cfs-podman-{os.getpid()}-{time.monotonic_ns()}"
    pm = Podman(base=base, runtime=oci_support.runtime(),
                socket=runtime_service.socket if runtime_service else None,
                view=runtime_service.view if runtime_service else None,
                cgroup_parent=parent, rootfs=base / "rootfs", shared_dir=base / "shared")
    try:
        oci_support.make_rootfs(pm.rootfs)
        pm.shared_dir.mkdir()
        yield pm
    finally:
        problems = []
        res = pm("rm", "-a", "-f", "-t", "0")
        if res.returncode != 0:
            problems.append(f"podman rm -a -f failed: {res.stderr}")
        left = pm("ps", "-a", "-q")
        if left.stdout.strip():
            problems.append(f"containers left: {left.stdout.split()}")
        # Anything podman or the runtime left mounted under our dir (storage, shm, netns).
        for mnt in sorted(_mount_points() - mounts_before, key=len, reverse=True):
            if mnt.startswith(str(base)):
                subprocess.run(["umount", "-l", mnt], check=False)
        stray = _clean_cgroup_parent(parent)
        if stray:
            problems.append(f"cgroups could not be removed: {stray}")
        shutil.rmtree(base, ignore_errors=True)
        # podman 4.3 always makes /run/containers/networks (netavark's run dir, empty with
        # --network none) whatever its flags say: remove it if we made it.
        if not run_containers_existed:
            for d in ("/run/containers/networks", "/run/containers"):
                try:
                    os.rmdir(d)
                except OSError:
                    pass
        new_mounts = [m for m in _mount_points() - mounts_before if m.startswith(str(base))]
        if new_mounts:
            problems.append(f"mounts left: {new_mounts}")
        assert not problems, "; ".join(problems)


# Sleeps with the read builtin on a fifo, not usleep: no short-lived children, which podman top
# would race with (it lists /proc, then fails on a pid that has gone).
TICKER = ("mkfifo /dev/shm/tick; exec 3<>/dev/shm/tick; i=0; "
          "trap 'echo usr1 > /shared/$NAME.usr1' USR1; "
          "while :; do i=$((i+1)); echo $i > /shared/$NAME.ticks; read -t 0.02 x <&3; done")


@pytest.fixture(scope="module")
def ticker(podman: Podman) -> Iterator[str]:
    """One long-running detached container shared by the exec/ps/top/pause tests: its init
    (pid 1) counts in /shared/<name>.ticks every 20 ms. Each test leaves it running."""
    name = "cfs-ticker"
    podman.detached(name, "sh", "-c", TICKER,
                    flags=("-v", f"{podman.shared_dir}:/shared", "--env", f"NAME={name}"))
    try:
        yield name
    finally:
        podman.remove(name)


def ticks(podman: Podman, name: str) -> int:
    """The ticker's count, read on the host through the bind mount (works while paused)."""
    for _ in range(50):
        text = (podman.shared_dir / f"{name}.ticks").read_text().strip() \
            if (podman.shared_dir / f"{name}.ticks").exists() else ""
        if text.isdigit():
            return int(text)
        time.sleep(0.01)  # caught between truncate and write
    raise AssertionError(f"{name} never wrote a tick count")


def progresses(podman: Podman, name: str, during: float = 0.4) -> bool:
    before = ticks(podman, name)
    time.sleep(during)
    return ticks(podman, name) > before


# ---- run: exit codes and streams ----------------------------------------------------------

@pytest.mark.parametrize("script, code", [
    ("echo out; echo err >&2; exit 3", 3),
    ("echo out; echo err >&2", 0),
    ("echo out; echo err >&2; exit 255", 255),
])
def test_run_exit_code_and_separate_streams(podman: Podman, script: str, code: int) -> None:
    res = podman.run("sh", "-c", script)
    assert res.returncode == code, res.stderr
    assert res.stdout == "out\n"
    assert res.stderr == "err\n"


def test_run_stdin_reaches_the_program(podman: Podman) -> None:
    res = podman.run("sh", "-c", "read line; echo got:$line", flags=("-i",), stdin=None,
                     input="hello\n")
    assert (res.returncode, res.stdout) == (0, "got:hello\n"), res.stderr


def test_run_missing_program_is_127(podman: Podman) -> None:
    """Podman turns the runtime's "no such file or directory" into 127, as for runc."""
    res = podman.run("/no/such/program")
    assert res.returncode == 127, res.stderr
    assert "/no/such/program" in res.stderr


def test_create_init_start_split(podman: Podman) -> None:
    """`podman init` has the runtime create the container: its process exists but the program
    has not run; `start` runs it. A created container that never started can be removed."""
    name, never = "cfs-split", "cfs-never-started"
    marker = podman.shared_dir / "split.ran"
    flags = ["-v", f"{podman.shared_dir}:/shared"]
    try:
        for n in (name, never):
            podman.ok("create", *podman.run_flags(n), *flags, "--rootfs", str(podman.rootfs),
                      "sh", "-c", "echo ran > /shared/split.ran; exit 8")
            podman.ok("init", n)
            assert podman.status(n) == "initialized"  # podman's name for the runtime's created
            pid = int(podman.ok("inspect", "--format", "{{.State.Pid}}", n))
            assert pid > 0 and os.path.exists(f"/proc/{pid}"), f"no process after init: {pid}"
        time.sleep(0.2)
        assert not marker.exists(), "the program ran before start"
        res = podman("start", "--attach", name)
        assert res.returncode == 8, res.stderr
        assert marker.read_text() == "ran\n"
        podman.ok("rm", "-f", never)
        assert never not in podman.ok("ps", "-a", "--format", "{{.Names}}").split()
        assert not os.path.exists(f"/proc/{pid}") or \
            open(f"/proc/{pid}/stat").read().split()[2] == "Z", "the created process outlived rm"
    finally:
        podman.remove(name)
        podman.remove(never)


# ---- detached run, exec, ps, top ------------------------------------------------------------

def test_detached_run_wait_and_logs(podman: Podman) -> None:
    name = "cfs-detached"
    try:
        podman.detached(name, "sh", "-c", "echo started; sleep 0.5; echo done >&2; exit 6")
        assert podman.status(name) in ("running", "exited")
        assert podman.ok("wait", name).strip() == "6"
        assert podman.status(name) == "exited"
        assert podman.exit_code(name) == 6
        logs = podman("logs", name)
        assert logs.stdout == "started\n" and logs.stderr == "done\n", logs
    finally:
        podman.remove(name)
    assert name not in podman.ok("ps", "-a", "--format", "{{.Names}}").split()


def test_exec_runs_in_the_container(podman: Podman, ticker: str) -> None:
    res = podman("exec", ticker, "sh", "-c", "echo hi; echo oops >&2; exit 4")
    assert (res.returncode, res.stdout, res.stderr) == (4, "hi\n", "oops\n")
    # killed by a signal (it is not the init, so it can be): 128 + 9, as conmon reaps it
    assert podman("exec", ticker, "sh", "-c", "kill -KILL $$").returncode == 137
    missing = podman("exec", ticker, "/no/such/program")
    assert missing.returncode == 127, missing.stderr
    # it joined the container's pid namespace: pid 1 there is the ticker's shell
    init = podman.ok("exec", ticker, "cat", "/proc/1/cmdline").split("\0")
    assert init[:2] == ["sh", "-c"] and "ticks" in init[2], init
    # and its environment and identity come from the exec flags
    out = podman.ok("exec", "--user", "1000:1000", "--env", "A=b", "--workdir", "/tmp",
                    ticker, "sh", "-c", 'echo $(id -u):$(id -g) $A $(pwd)')
    assert out == "1000:1000 b /tmp\n"


def test_ps_and_top_show_the_running_container(podman: Podman, ticker: str) -> None:
    lines = podman.ok("ps", "--format", "{{.Names}} {{.Status}}").splitlines()
    assert any(line.startswith(f"{ticker} Up") for line in lines), lines
    top = podman.ok("top", ticker, "pid", "args")
    assert re.search(r"^\s*1\s+sh -c mkfifo", top, re.M), top


# ---- stop, kill, rm -------------------------------------------------------------------------

def test_stop_sends_term_then_rm(podman: Podman) -> None:
    name = "cfs-stop"
    try:
        podman.detached(name, "sh", "-c", "trap 'exit 5' TERM; while :; do usleep 20000; done")
        started = time.monotonic()
        podman.ok("stop", "-t", "20", name)
        # it took the SIGTERM (its trap's exit code), not the SIGKILL after the 20 s
        assert time.monotonic() - started < 15
        assert (podman.status(name), podman.exit_code(name)) == ("exited", 5)
        podman.ok("rm", name)
        assert name not in podman.ok("ps", "-a", "--format", "{{.Names}}").split()
    finally:
        podman.remove(name)


def test_stop_kills_a_container_ignoring_term(podman: Podman) -> None:
    name = "cfs-stubborn"
    try:
        # pid 1 ignores signals it has no handler for: only SIGKILL ends it
        podman.detached(name, "sh", "-c", "while :; do usleep 20000; done")
        podman.ok("stop", "-t", "1", name)
        assert (podman.status(name), podman.exit_code(name)) == ("exited", 137)
    finally:
        podman.remove(name)


def test_kill_delivers_the_signal(podman: Podman, ticker: str) -> None:
    marker = podman.shared_dir / f"{ticker}.usr1"
    marker.unlink(missing_ok=True)
    podman.ok("kill", "-s", "USR1", ticker)
    deadline = time.monotonic() + 5
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), "the ticker's USR1 trap did not run"
    assert podman.status(ticker) == "running"  # a handled signal does not end it
    name = "cfs-kill"
    try:
        podman.detached(name, "sleep", "1000")
        podman.ok("kill", name)  # SIGKILL by default
        assert podman.ok("wait", name).strip() == "137"
    finally:
        podman.remove(name)


# ---- pause and unpause ----------------------------------------------------------------------

def test_pause_stops_progress_and_unpause_resumes(podman: Podman, ticker: str) -> None:
    assert progresses(podman, ticker), "the ticker does not tick before the pause"
    podman.ok("pause", ticker)
    try:
        assert podman.status(ticker) == "paused"
        time.sleep(0.1)  # a write may be under way as the freeze lands
        assert not progresses(podman, ticker, 0.5), "the paused container still made progress"
        assert podman("exec", ticker, "true").returncode != 0  # podman refuses: it is paused
    finally:
        podman.ok("unpause", ticker)
    assert podman.status(ticker) == "running"
    assert progresses(podman, ticker), "the container did not resume"


# ---- limits and confinement -----------------------------------------------------------------

# The shell reads 48 MB into a variable: fine without a limit, over a 32 MB one (no swap here).
ALLOCATE = 'x=$(head -c 48000000 /dev/zero | tr "\\0" a); echo kept ${#x}'


def test_memory_limit_kills_an_allocation_over_it(podman: Podman) -> None:
    free = podman.run("sh", "-c", ALLOCATE)
    assert (free.returncode, free.stdout) == (0, "kept 48000000\n"), free.stderr
    limited = podman.run("sh", "-c", ALLOCATE, flags=("--memory", "32m"))
    assert limited.returncode == 137, (limited.returncode, limited.stdout, limited.stderr)
    assert limited.stdout == ""


# The init forks a shell that starts 60 sleeps, noting each (builtins only) until a fork fails.
FORK_BOMB = ('sh -c "for i in \\$(seq 60); do sleep 3 & echo \\$i >> /dev/shm/started; done" '
             '2>/dev/shm/err; n=0; while read l; do n=$((n+1)); done < /dev/shm/started; '
             'echo started=$n; while read l; do echo "$l"; done < /dev/shm/err')


def test_pids_limit_bounds_a_fork_bomb(podman: Podman) -> None:
    free = podman.run("sh", "-c", FORK_BOMB)
    assert free.stdout.splitlines()[0] == "started=60", free
    limited = podman.run("sh", "-c", FORK_BOMB, flags=("--pids-limit", "20"))
    lines = limited.stdout.splitlines()
    started = int(lines[0].removeprefix("started="))
    # 20 tasks in all: the init, the forking shell and at most 18 sleeps
    assert 1 <= started <= 18, limited
    assert any("fork" in line for line in lines[1:]), limited


def test_cap_drop_all_leaves_no_capabilities(podman: Podman) -> None:
    def caps(*flags: str) -> dict[str, int]:
        out = podman.run("grep", "^Cap", "/proc/self/status", flags=flags)
        assert out.returncode == 0, out.stderr
        return {k.strip(): int(v, 16) for k, v in
                (line.split(":") for line in out.stdout.splitlines())}
    default = caps()
    assert default["CapEff"] != 0 and default["CapBnd"] != 0  # so the test can fail
    dropped = caps("--cap-drop", "ALL")
    assert {k: dropped[k] for k in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb")} \
        == dict.fromkeys(("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"), 0)


@pytest.mark.parametrize("flags, script, expected", [
    (("--hostname", "cfs-host"), "hostname; cat /etc/hostname; echo", "cfs-host\ncfs-host\n"),
    (("--env", "FOO=bar baz", "--env", "EMPTY="), 'echo "$FOO|$EMPTY|${EMPTY+set}"',
     "bar baz||set\n"),
    (("--workdir", "/home/user"), "pwd", "/home/user\n"),
    (("--user", "1000:1000"), "id -u; id -g; id -G", "1000\n1000\n1000\n"),
    (("--user", "1000:1000", "--group-add", "2000"), "id -u; id -g; id -G",
     "1000\n1000\n1000 2000\n"),
    (("--user", "user"), "id -u; id -g; echo $HOME", "1000\n1000\n/home/user\n"),
])
def test_process_options(podman: Podman, flags: tuple[str, ...], script: str,
                         expected: str) -> None:
    res = podman.run("sh", "-c", script, flags=flags)
    assert (res.returncode, res.stdout) == (0, expected), res.stderr


# ---- terminals ------------------------------------------------------------------------------

def test_run_t_gives_a_terminal(podman: Podman) -> None:
    """-t without -i works with a stdin that is not a tty (podman does not need one)."""
    res = podman.run("sh", "-c", "tty; test -t 0 && test -t 1 && echo both; exit 6",
                     flags=("-t",))
    assert res.returncode == 6, res.stderr
    out = res.stdout.replace("\r\n", "\n")  # the tty turns \n into \r\n
    assert re.fullmatch(r"/dev/pts/\d+\nboth\n", out), res.stdout
    plain = podman.run("sh", "-c", "tty; test -t 0 || echo none")
    assert plain.stdout.endswith("none\n"), plain.stdout  # without -t: no terminal


def _through_pty(argv: list[str], send: bytes, timeout: float = CALL_TIMEOUT) -> tuple[int, str]:
    """Run `argv` with a pty we made as its stdio, type `send`, return (exit code, output)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                start_new_session=True)
    finally:
        os.close(slave)
    try:
        os.write(master, send)  # the line discipline keeps it until someone reads
        deadline = time.monotonic() + timeout
        out = oci_support.read_pty(master, timeout, idle=0.1,
                                   stop=lambda: proc.poll() is not None)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, out.decode(errors="replace").replace("\r\n", "\n")


def test_exec_t_and_it(podman: Podman, ticker: str) -> None:
    res = podman("exec", "-t", ticker, "sh", "-c", "tty; exit 7")
    assert res.returncode == 7, res.stderr
    assert re.fullmatch(r"/dev/pts/\d+\n", res.stdout.replace("\r\n", "\n")), res.stdout
    # -it needs a terminal on our side too: the input typed there reaches the program
    code, out = _through_pty(podman.argv("exec", "-it", ticker, "sh", "-c",
                                         "read line; echo got:$line; tty; exit 9"),
                             b"typed\n")
    assert code == 9, out
    assert "got:typed" in out and re.search(r"^/dev/pts/\d+$", out, re.M), out


# ---- ours only: a container object ----------------------------------------------------------

def _view_entries(view: str) -> dict[str, str]:
    """Container id directory -> its name, for the top-level containers in the view."""
    entries = {}
    for d in Path(view).iterdir():
        if d.name.isdigit():
            try:
                entries[d.name] = (d / "name").read_text().strip()
            except OSError:
                pass
    return entries


def test_container_is_listed_in_the_view_while_it_runs(podman: Podman) -> None:
    if podman.view is None:
        reason = (f"the runtime under test ({podman.runtime}) is not containerfs-oci: "
                  "only ours makes container objects")
        print(f"skipping: {reason}")
        pytest.skip(reason)
    name = "cfs-in-view"
    try:
        cid = podman.detached(name, "sleep", "1000",
                              flags=("--memory", "32m", "--pids-limit", "20"))
        listing = (Path(podman.view) / "containers").read_text()
        mine = [d for d, n in _view_entries(podman.view).items() if cid.startswith(n[:12])
                or n == cid or n == name]
        assert mine, f"{cid} is not in the view:\n{listing}\n{_view_entries(podman.view)}"
        d = Path(podman.view) / mine[0]
        assert (d / "state").read_text().strip() == "running"
        assert int((d / "init_pid").read_text()) == \
            int(podman.ok("inspect", "--format", "{{.State.Pid}}", name))
        assert (d / "limits" / "memory.max").read_text().strip() == str(32 * 2**20)
        assert (d / "limits" / "pids.max").read_text().strip() == "20"
        assert mine[0] in listing.split()  # the listing has its line too
        podman.ok("rm", "-f", "-t", "0", name)
        assert mine[0] not in _view_entries(podman.view) or \
            (d / "state").read_text().strip() == "dead"
    finally:
        podman.remove(name)
