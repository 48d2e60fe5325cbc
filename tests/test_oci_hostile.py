"""Hostile or malformed input to the OCI runtime, as runc takes it: sysctls that would change
the host, malformed hooks, container ids runc refuses. Each must fail with an error in runc's
log format and leave nothing behind (no state directory, no living container). Runs against
runc too (OCI_RUNTIME=runc)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .oci_support import Runtime, default_config, make_rootfs, runtime_is_ours
from . import test_oci_runtime

rt = test_oci_runtime.rt  # the same runtime fixture (ours with a fresh service, or runc)


def refused(rt: Runtime, cid: str, config: dict[str, Any], *, bundle_name: str = "") -> str:
    """`create` of `config` fails with one JSON log error, and nothing is left: returns it."""
    b = rt.bundle(bundle_name or cid, config)
    log = rt.tmp / f"{bundle_name or cid}.log"
    err_path = rt.tmp / f"{bundle_name or cid}.err"
    with err_path.open("w") as err:  # a file: a wrongly made init would hold a pipe open
        res = rt.call("create", "--bundle", str(b), cid, log=log, log_format="json",
                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    stderr = err_path.read_text()
    assert res.returncode == 1, stderr
    assert "Traceback" not in stderr, stderr
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    errors = [line["msg"] for line in lines if line.get("level") == "error"]
    assert errors, (lines, stderr)
    left = list(rt.root.iterdir()) if rt.root.exists() else []
    assert left == [], left
    return str(errors[-1])


def test_host_sysctl_refused(rt: Runtime) -> None:
    """A sysctl of no namespace the container has (vm.*, or net.* without a network
    namespace) would change the host: refused, as runc refuses it. The value given is the
    host's own, so a runtime that wrongly writes it changes nothing."""
    for key in ("vm.overcommit_ratio", "net.ipv4.ip_forward"):
        current = Path("/proc/sys/" + key.replace(".", "/")).read_text().strip()
        config = default_config(["true"])
        config["linux"]["namespaces"] = [ns for ns in config["linux"]["namespaces"]
                                         if ns["type"] != "network"]
        config["linux"]["sysctl"] = {key: current}
        msg = refused(rt, "sysctl", config, bundle_name=key.split(".")[0])
        assert key in msg, msg


def test_namespaced_sysctl_allowed(rt: Runtime) -> None:
    """net.* in the container's own network namespace, kernel.shmmni in its ipc one."""
    config = default_config(["sh", "-c", "cat /proc/sys/net/ipv4/ip_forward "
                                         "/proc/sys/kernel/shmmni"])
    config["linux"]["sysctl"] = {"net.ipv4.ip_forward": "1", "kernel.shmmni": "1234"}
    b = rt.bundle("nssysctl", config)
    res = rt.call("run", "--bundle", str(b), "nssysctl", stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["1", "1234"]


@pytest.mark.parametrize("hook", [{"path": "/bin/true", "timeout": "5"},
                                  {"path": "/bin/true", "args": "true"},
                                  {"path": "/bin/true", "env": [1]}])
def test_malformed_hook_refused(rt: Runtime, hook: dict[str, Any]) -> None:
    config = default_config(["true"])
    config["hooks"] = {"createRuntime": [hook]}
    msg = refused(rt, "hooked", config)
    assert "hooks.createRuntime[0]" in msg or "hook" in msg.lower(), msg


@pytest.mark.parametrize("cid", ["nl\n", "caf\u00e9"])
def test_id_outside_runc_alphabet_refused(rt: Runtime, cid: str) -> None:
    """runc's ids are ASCII letters, digits and _ + - . (no trailing newline either)."""
    msg = refused(rt, cid, default_config(["true"]), bundle_name="badid")
    assert "id" in msg, msg


@pytest.mark.parametrize("fs", ["proc", "sysfs"])
def test_proc_sysfs_through_symlink_refused(rt: Runtime, fs: str) -> None:
    """An image whose /proc (or /sys) is a symlink must not get its procfs mounted where the
    link points: masks and read-only paths named under /proc would then resolve through a
    link the image (or a shared volume) controls (runc's CVE-2019-19921 class). runc
    refuses: "filesystem must be mounted on ordinary directory"."""
    config = default_config(["true"])
    dest = "/proc" if fs == "proc" else "/sys"
    assert any(m["destination"] == dest and m["type"] == fs for m in config["mounts"])
    b = rt.tmp / f"link-{fs}"
    make_rootfs(b / "rootfs")
    (b / "rootfs" / dest.lstrip("/")).rmdir()
    (b / "rootfs" / "elsewhere").mkdir()
    (b / "rootfs" / dest.lstrip("/")).symlink_to("/elsewhere")
    (b / "config.json").write_text(json.dumps(config))
    log = rt.tmp / f"link-{fs}.log"
    err_path = rt.tmp / f"link-{fs}.err"
    with err_path.open("w") as err:
        res = rt.call("create", "--bundle", str(b), f"link-{fs}", log=log, log_format="json",
                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    assert res.returncode == 1, err_path.read_text()
    assert "ordinary directory" in log.read_text(), log.read_text()
    assert not (rt.root / f"link-{fs}").exists()
    with open("/proc/self/mountinfo") as f:
        assert not any(str(b / "rootfs" / "elsewhere") in line for line in f)


def test_cgroup_mount_not_told_by_image(rt: Runtime) -> None:
    """The cgroup mount shows the container's own cgroup2 directory, found from the kernel's
    /proc: an image with no procfs mounted over its /proc, whose /proc/self/cgroup file says
    "0::/", must not get the host's whole cgroup2 tree (every group's name, writable files)."""
    if not runtime_is_ours():
        pytest.skip("the container's own cgroup2 directory at a cgroup mount: ours only "
                    "(runc mounts the v1 hierarchies on a hybrid host)")
    host = {p.name for p in Path("/sys/fs/cgroup/unified").iterdir() if p.is_dir()}
    if not host:
        pytest.skip("no group in the host's cgroup2 tree to tell apart")
    config = default_config(["ls", "-a", "/sys/fs/cgroup"])
    config["mounts"] = [m for m in config["mounts"] if m["type"] != "proc"]
    config["mounts"].append({"destination": "/sys/fs/cgroup", "type": "cgroup",
                             "source": "cgroup", "options": ["nosuid", "noexec", "nodev"]})
    config["linux"]["maskedPaths"] = config["linux"]["readonlyPaths"] = []
    b = rt.tmp / "fakeproc"
    make_rootfs(b / "rootfs")
    (b / "rootfs" / "proc" / "self").mkdir()
    (b / "rootfs" / "proc" / "self" / "cgroup").write_text("0::/\n")
    (b / "config.json").write_text(json.dumps(config))
    res = rt.call("run", "--bundle", str(b), "fakeproc", stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    shown = set(res.stdout.split())
    assert "cgroup.procs" in shown or shown <= {".", ".."}, shown
    assert not shown & host, f"the host's cgroup2 groups shown: {sorted(shown & host)}"


def _openable_disk() -> Path | None:
    """A block device of the host that this (host) process can open for reading."""
    for p in sorted(Path("/sys/block").iterdir()):
        dev = Path("/dev") / p.name
        try:
            os.close(os.open(dev, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            continue
        return dev
    return None


def test_image_device_node_unusable(rt: Runtime) -> None:
    """A block device node shipped in the image (here one of the host's disks) must not
    open in the container: runc's device cgroup refuses it, and ours makes no device usable
    but those of the /dev tmpfs. Only read, never written."""
    disk = _openable_disk()
    if disk is None:
        pytest.skip("no block device the host can open, to name from the image")
    config = default_config(["sh", "-c", "dd if=/hostdisk of=/dev/null bs=512 count=1 "
                                         "2>/dev/null && echo opened || echo refused"])
    b = rt.tmp / "devnode"
    make_rootfs(b / "rootfs")
    os.mknod(b / "rootfs" / "hostdisk", stat.S_IFBLK | 0o600, os.stat(disk).st_rdev)
    (b / "config.json").write_text(json.dumps(config))
    res = rt.call("run", "--bundle", str(b), "devnode", stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "refused", f"the image's node of {disk} opened"


def test_failed_hook_leaves_no_pid_file(rt: Runtime) -> None:
    """A createRuntime hook that fails fails create, and leaves nothing: no state, no living
    container, and no pid file naming a dead (soon reused) pid."""
    config = default_config(["sleep", "60"])
    config["hooks"] = {"createRuntime": [{"path": "/bin/false"}]}
    pid_file = rt.tmp / "hooked.pid"
    b = rt.bundle("hookfail", config)
    err_path = rt.tmp / "hookfail.err"
    with err_path.open("w") as err:
        res = rt.call("create", "--bundle", str(b), "--pid-file", str(pid_file), "hookfail",
                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    assert res.returncode == 1, err_path.read_text()
    assert not pid_file.exists(), f"pid file left naming {pid_file.read_text()}"
    assert not (rt.root / "hookfail").exists()
