"""OCI runtime tests' common parts: which runtime is under test, a busybox root, a config.json.

The runtime's path comes from OCI_RUNTIME (default: our containerfs-oci), so the same tests can
be run against runc (`OCI_RUNTIME=runc`) to show they test the interface, not our code.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The checkout's own venv, else the one running the tests (a worktree shares main's venv; the
# entry point imports from PYTHONPATH, so it runs the code under test).
OURS = str(next((p for p in (ROOT / ".venv" / "bin" / "containerfs-oci",
                             Path(sys.executable).parent / "containerfs-oci") if p.exists()),
                ROOT / ".venv" / "bin" / "containerfs-oci"))


def runtime() -> str:
    """The OCI runtime under test: $OCI_RUNTIME (a name on PATH or a path), else ours."""
    name = os.environ.get("OCI_RUNTIME", OURS)
    found = shutil.which(name)
    return found if found else name


def runtime_is_ours() -> bool:
    return os.path.realpath(runtime()) == os.path.realpath(OURS)


def busybox() -> str | None:
    """A statically linked busybox (Debian's busybox-static), or None."""
    path = shutil.which("busybox")
    if path is None:
        return None
    out = subprocess.run(["file", "-L", path], capture_output=True, text=True).stdout \
        if shutil.which("file") else "statically linked"
    return path if "statically linked" in out or "static-pie" in out else None


def make_rootfs(dest: Path) -> Path:
    """Fill `dest` with a minimal busybox root: /bin/<applet> links, /etc/passwd and group."""
    bb = busybox()
    if bb is None:
        raise RuntimeError("no static busybox: apt-get install busybox-static")
    for d in ("bin", "dev", "proc", "sys", "tmp", "etc", "root", "home/user"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(bb, dest / "bin" / "busybox")
    applets = subprocess.run([bb, "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        link = dest / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    (dest / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n")
    (dest / "etc" / "group").write_text("root:x:0:\nuser:x:1000:\nextra:x:2000:user\n")
    (dest / "tmp").chmod(0o1777)
    return dest


def default_config(args: list[str], *, terminal: bool = False) -> dict[str, Any]:
    """A config.json like `runc spec`'s (root, not rootless), running `args`."""
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "TERM=xterm"],
            "cwd": "/",
            "capabilities": {k: list(caps) for k in
                             ("bounding", "effective", "permitted", "ambient")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "oci-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777"]},
        ],
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug",
                            "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"],
        },
    }


class Runtime:
    """Drives one OCI runtime as an engine does: its own state directory (--root), and for
    ours the test's service (--socket; runc rejects unknown global flags, so only ours gets
    it). Remembers every container it made: `cleanup()` deletes them all (--force)."""

    def __init__(self, path: str, root: Path, socket: str | None, tmp: Path) -> None:
        self.path = path
        self.root = root
        self.socket = socket
        self.tmp = tmp
        self.ids: list[str] = []

    def argv(self, *args: str, log: Path | None = None, log_format: str | None = None
             ) -> list[str]:
        out = [self.path, "--root", str(self.root)]
        if self.socket:
            out += ["--socket", self.socket]
        if log is not None:
            out += ["--log", str(log)]
        if log_format is not None:
            out += ["--log-format", log_format]
        return out + list(args)

    def call(self, *args: str, timeout: float = 30, **kw: Any
             ) -> subprocess.CompletedProcess[str]:
        """Run a command to its end (output captured unless stdout/stderr are given)."""
        for cmd in ("create", "run"):
            if cmd in args:
                self.ids.append(args[-1])
        if "stdout" not in kw and "stderr" not in kw:
            kw["capture_output"] = True
        return subprocess.run(self.argv(*args, log=kw.pop("log", None),
                                        log_format=kw.pop("log_format", None)),
                              text=True, timeout=timeout, **kw)

    def bundle(self, name: str, config: dict[str, Any]) -> Path:
        """A bundle directory with a fresh busybox root and `config` as config.json."""
        b = self.tmp / name
        make_rootfs(b / "rootfs")
        (b / "config.json").write_text(json.dumps(config))
        return b

    def state(self, cid: str) -> dict[str, Any]:
        res = self.call("state", cid)
        assert res.returncode == 0, res.stderr
        data: dict[str, Any] = json.loads(res.stdout)
        return data

    def wait_status(self, cid: str, status: str, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            st = self.state(cid)
            if st["status"] == status or time.monotonic() > deadline:
                return st
            time.sleep(0.05)

    def cleanup(self) -> None:
        for cid in self.ids:
            subprocess.run(self.argv("delete", "--force", cid), capture_output=True, timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)


def read_pty(master: int, timeout: float, idle: float = 0.5,
             stop: Callable[[], bool] = lambda: False) -> bytes:
    """What a pty's master reads until its other side is gone (EIO or end of file), `timeout`
    s have passed, or `stop()` says so after `idle` s with nothing to read."""
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not select.select([master], [], [], idle)[0]:
            if stop():
                break
            continue
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: every slave end is closed
            break
        if not chunk:
            break
        data += chunk
    return data
