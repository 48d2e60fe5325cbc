"""Fixtures: a fresh service per test (own socket, state and cgroup), and running as other users.

Kernel tests need root, cgroup2 and user namespaces; without them they are skipped, and the
probed reason is printed.
"""

from __future__ import annotations

import json
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import syscalls

from containerfs.cgroups import CgroupTree, cgroup2_mount

ROOT = Path(__file__).resolve().parent.parent
# An unprivileged uid and gid with no other meaning on the machine.
OTHER_UID = 4242
OTHER_GID = 4242
THIRD_UID = 4343


def _probe() -> str | None:
    if os.geteuid() != 0:
        return "not root: the service and the kernel tests need root"
    try:
        cgroup2_mount()
    except OSError as e:
        return f"no cgroup2 hierarchy: {e}"
    return None


SKIP_REASON = _probe()


def pytest_report_header(config: pytest.Config) -> str:
    return f"containerfs kernel tests: {'skipped: ' + SKIP_REASON if SKIP_REASON else 'enabled'}"


@dataclass
class ServiceUnderTest:
    socket: str
    runtime_dir: str
    cgroups: CgroupTree
    proc: subprocess.Popen[bytes]
    log: Path
    view: str = ""  # where this service mounts its FUSE view

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def unmount_view(self) -> None:
        """Detach the view if it is still mounted (a killed service leaves it behind)."""
        for _ in range(8):
            if not self.view or not view_mounted(self.view):
                return
            subprocess.run(["umount", "-l", self.view], check=False)
        raise AssertionError(f"could not unmount the view at {self.view}")

    def cleanup(self) -> None:
        """Stop the service and its keeper, unmount the view, kill and remove the cgroups."""
        self.stop()
        self.unmount_view()
        self.stop_keeper()
        self.cgroups.remove_all()

    def stop_keeper(self) -> None:
        """The keeper outlives the service on purpose; tests end it themselves."""
        try:
            with open(os.path.join(self.runtime_dir, "keeper.pid")) as f:
                os.kill(int(f.read()), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass


def start_service(tmp: Path, cgroup: str, nofile: int | None = None) -> ServiceUnderTest:
    """Start a service in `tmp`; with `nofile`, under that fd limit (soft and hard)."""
    tmp.chmod(0o755)  # other users must reach the socket
    sock = str(tmp / "cfs.sock")
    log = tmp / "service.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "containerfs", "serve", "--socket", sock,
         "--runtime-dir", str(tmp / "state"), "--cgroup", cgroup, "--log-level", "debug",
         "--mount", str(tmp / "view")],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT,
        preexec_fn=None if nofile is None else
        lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))
    svc = ServiceUnderTest(sock, str(tmp / "state"), CgroupTree(cgroup), proc, log,
                           view=str(tmp / "view"))
    deadline = time.monotonic() + 10
    while True:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(sock)
            return svc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                text = log.read_text()
                svc.cleanup()  # a service that failed to start leaves nothing behind either
                raise RuntimeError(f"service did not start: {text}") from None
            time.sleep(0.02)
        finally:
            probe.close()


def view_mounted(path: str) -> bool:
    """Whether anything is mounted at `path` (per /proc/self/mountinfo)."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == path for line in f)


def fresh_service(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
                  nofile: int | None = None) -> Iterator[ServiceUnderTest]:
    """A fresh service for one test (under an fd limit of `nofile`, if given); everything it
    made is killed and removed afterwards."""
    if SKIP_REASON:
        print(f"skipping: {SKIP_REASON}")
        pytest.skip(SKIP_REASON)
    cgroup = f"cfs-test-{os.getpid()}-{time.monotonic_ns()}"
    # Not under tmp_path: pytest's base directory is private to root, and other users must
    # reach the socket.
    where = Path(tempfile.mkdtemp(prefix="cfs-test-"))
    request.addfinalizer(lambda: shutil.rmtree(where, ignore_errors=True))
    svc = start_service(where, cgroup, nofile)
    monkeypatch.setenv("CONTAINERFS_SOCKET", svc.socket)
    try:
        yield svc
        assert svc.alive(), f"the service died during the test:\n{svc.log.read_text()}"
    finally:
        svc.cleanup()
        leftover = [base for base in svc.cgroups.bases() if os.path.exists(base)]
        assert not leftover, f"cgroups {leftover} were left behind"


@pytest.fixture
def service(request: pytest.FixtureRequest,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[ServiceUnderTest]:
    """A fresh service for one test."""
    yield from fresh_service(request, monkeypatch)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that start a service are marked `service`: `pytest -m "not service"` runs the
    fast tier, which needs none."""
    for item in items:
        if any("service" in name for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.service)


# ---- raw clients and what the service holds --------------------------------------------------

def raw(service: ServiceUnderTest) -> socket.socket:
    """A connection to the service that speaks the protocol by hand (5 s timeout)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(service.socket)
    s.settimeout(5)
    return s


def service_holds(service: ServiceUnderTest, fd: int) -> int:
    """How many of the service's fds refer to the same file as our `fd`."""
    return service_holds_link(service, os.readlink(f"/proc/self/fd/{fd}"))


def service_holds_link(service: ServiceUnderTest, target: str) -> int:
    """How many of the service's fds /proc names `target` ("anon_inode:[eventfd]"...)."""
    base = f"/proc/{service.proc.pid}/fd"
    count = 0
    for name in os.listdir(base):
        try:
            count += os.readlink(f"{base}/{name}") == target
        except FileNotFoundError:
            pass
    return count


def still_serves() -> None:
    """The service still makes containers (for root)."""
    fd = syscalls.container_create("after", 0)
    assert syscalls.container_status(fd)["state"] == "created"
    os.close(fd)


def tmpfs() -> int:
    """A detached mount of a fresh tmpfs (a root for an empty-fs container)."""
    fs = syscalls.fsopen("tmpfs", syscalls.FSOPEN_CLOEXEC)
    try:
        syscalls.fsconfig(fs, syscalls.FSCONFIG_CMD_CREATE)
        return syscalls.fsmount(fs, syscalls.FSMOUNT_CLOEXEC)
    finally:
        os.close(fs)


def run_as(uid: int, gid: int, code: str, *, pass_fds: tuple[int, ...] = (),
           timeout: float = 20) -> Any:
    """Run `code` (a function body that returns a JSON-able value) as another user."""
    program = ("import json, os, sys\nsys.path.insert(0, %r)\ndef main():\n%s\n"
               "print(json.dumps(main()))\n") % (str(ROOT), textwrap.indent(textwrap.dedent(code), "    "))
    res = subprocess.run([sys.executable, "-c", program], user=uid, group=gid, extra_groups=[],
                         capture_output=True, text=True, pass_fds=pass_fds, timeout=timeout,
                         cwd="/")
    if res.returncode != 0:
        raise AssertionError(f"program as uid {uid} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def child_result(pid: int) -> int:
    """waitpid `pid` and return its exit code (-N for a signal)."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def users_handle(service: ServiceUnderTest, uid: int, gid: int) -> int:
    """A handle of a user-namespace (and PID namespace) container that `uid` made and sent us
    over SCM_RIGHTS: another user's container, in our hands."""
    path = str(Path(service.socket).parent / f"handle-{uid}.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        listener.bind(path)
        os.chmod(path, 0o777)
        run_as(uid, gid, f"""
            import socket, syscalls
            cfd = syscalls.container_create("u", syscalls.CONTAINER_NEW_USER_NS
                                            | syscalls.CONTAINER_NEW_PID_NS)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.sendmsg([b"h"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                cfd.to_bytes(4, "little"))], 0, {path!r})
            return 0
        """)
        _, fds, _, _ = socket.recv_fds(listener, 16, 1)
    finally:
        listener.close()
        os.unlink(path)
    return fds[0]


def held_init(cfd: int) -> tuple[int, int]:
    """Fork the container's init, which waits until the returned fd is closed, then exits
    0: (pid, fd)."""
    hold_r, hold_w = os.pipe()
    init = syscalls.fork_into_container(cfd)
    if init == 0:
        os.close(hold_w)
        os.read(hold_r, 1)
        os._exit(0)
    os.close(hold_r)
    return init, hold_w


def in_container(cfd: int, fn: Callable[[], Any]) -> tuple[int, Any]:
    """Fork into the container, run `fn` there; return (pid, what fn returned)."""
    r, w = os.pipe()
    pid = syscalls.fork_into_container(cfd)
    if pid == 0:
        try:
            os.close(r)
            os.write(w, json.dumps(fn()).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    return pid, json.loads(data) if data else None


def hung_up(fd: int, timeout: float = 0) -> bool:
    """Whether the handle reports POLLHUP within `timeout` s; anything else it reports fails."""
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLHUP)
    events = p.poll(timeout * 1000)
    assert all(ev & ~(select.POLLHUP) == 0 for _, ev in events), f"unexpected events {events}"
    return bool(events)


def child_json(pid: int, r: int, timeout: float, what: str) -> Any:
    """The JSON that child `pid` wrote to pipe `r` before exiting 0; kill it and fail if it
    wrote nothing within `timeout` s (a test fails instead of hanging)."""
    poller = select.poll()
    poller.register(r, select.POLLIN)
    if not poller.poll(timeout * 1000):
        os.kill(pid, 9)
        child_result(pid)
        raise AssertionError(f"{what} {pid} hung")
    with os.fdopen(r, "rb") as f:
        data = f.read()
    assert child_result(pid) == 0, data
    return json.loads(data)
