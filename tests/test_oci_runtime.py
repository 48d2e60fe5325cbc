"""The OCI runtime driven directly, as containerd and CRI-O drive one: bundles through
create/start/state/kill/delete, run, exec, the console socket, pause, resources, errors.

The runtime under test is $OCI_RUNTIME (default ours): `OCI_RUNTIME=runc pytest ...` runs the
same tests against runc, so they test the interface, not our code. Tests only ours can pass
say why when skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .oci_support import Runtime, busybox, default_config, read_pty, runtime, runtime_is_ours


@pytest.fixture
def rt(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Runtime]:
    path = runtime()
    if busybox() is None:
        pytest.skip("no static busybox for the container's root: apt-get install busybox-static")
    if runtime_is_ours():
        svc = request.getfixturevalue("service")  # a fresh service, cleaned up after
        sock: str | None = svc.socket
    else:
        if os.geteuid() != 0:
            pytest.skip("not root: runc needs root here")
        if not os.path.exists(path):
            pytest.skip(f"OCI_RUNTIME {path} not found")
        sock = None
    r = Runtime(path, tmp_path / "state", sock, tmp_path)
    r.view = svc.view if sock else ""  # type: ignore[attr-defined]
    try:
        yield r
    finally:
        r.cleanup()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def wait_for_text(path: Path, text: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while True:
        data = path.read_text() if path.exists() else ""
        if text in data or time.monotonic() > deadline:
            return data
        time.sleep(0.05)


def create(rt: Runtime, cid: str, config: dict[str, Any], *extra: str) -> tuple[Path, Path]:
    """create `cid` from `config`; its stdout and stderr go to files (init keeps them open)."""
    b = rt.bundle(cid, config)
    out, err = rt.tmp / f"{cid}.out", rt.tmp / f"{cid}.err"
    with out.open("w") as o, err.open("w") as e:
        res = rt.call("create", "--bundle", str(b), *extra, cid, stdout=o, stderr=e)
    assert res.returncode == 0, err.read_text()
    return out, err


def run_detached(rt: Runtime, cid: str, config: dict[str, Any]) -> Path:
    """run --detach `cid`; its output goes to a file (returned), as init keeps it open."""
    b = rt.bundle(cid, config)
    out = rt.tmp / f"{cid}.out"
    with out.open("w") as o:
        res = rt.call("run", "--detach", "--bundle", str(b), cid, stdout=o,
                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, out.read_text()
    return out


def test_lifecycle_create_start_kill_delete(rt: Runtime) -> None:
    pid_file = rt.tmp / "pid"
    config = default_config(["sh", "-c", "echo ran; exec sleep 60"])
    config["annotations"] = {"org.example.test": "yes"}
    out, _err = create(rt, "life", config, "--pid-file", str(pid_file))
    st = rt.state("life")
    assert st["status"] == "created" and st["id"] == "life"
    assert st["ociVersion"].startswith("1.") and st["annotations"] == {"org.example.test": "yes"}
    assert st["rootfs"] == str(rt.tmp / "life" / "rootfs") and st["created"]
    pid = int(pid_file.read_text())
    assert st["pid"] == pid and alive(pid)
    time.sleep(0.2)
    assert "ran" not in out.read_text(), "the program ran before start"
    assert not os.readlink(f"/proc/{pid}/exe").endswith("busybox")  # still the runtime's
    assert st["bundle"] == str(rt.tmp / "life")

    assert rt.call("start", "life").returncode == 0
    assert "ran" in wait_for_text(out, "ran")
    st = rt.state("life")
    assert st["status"] == "running" and st["pid"] == pid
    assert os.readlink(f"/proc/{pid}/exe").endswith("busybox")
    again = rt.call("start", "life")
    assert again.returncode != 0

    assert rt.call("kill", "life", "KILL").returncode == 0
    assert rt.wait_status("life", "stopped")["status"] == "stopped"
    assert rt.call("delete", "life").returncode == 0
    gone = rt.call("state", "life")
    assert gone.returncode != 0 and "does not exist" in gone.stderr


def test_run_exit_code_and_streams(rt: Runtime) -> None:
    b = rt.bundle("runner", default_config(["sh", "-c", "echo out; echo err >&2; exit 3"]))
    res = rt.call("run", "--bundle", str(b), "runner")
    assert res.returncode == 3, res.stderr
    assert res.stdout == "out\n"
    assert res.stderr.strip().splitlines()[-1] == "err"
    assert rt.call("state", "runner").returncode != 0  # run deletes it when it ends


def test_missing_program_fails_at_create(rt: Runtime) -> None:
    b = rt.bundle("nothere", default_config(["/no/such/program"]))
    res = rt.call("create", "--bundle", str(b), "nothere", stdin=subprocess.DEVNULL)
    assert res.returncode != 0
    assert "no such file or directory" in res.stderr.lower()
    missing = rt.call("state", "nothere")
    assert missing.returncode != 0 or json.loads(missing.stdout)["status"] == "stopped"


def test_console_socket_terminal(rt: Runtime) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(rt.tmp / "console.sock")
    listener.bind(path)
    listener.listen(1)
    try:
        create(rt, "tty", default_config(["sh"], terminal=True), "--console-socket", path)
        listener.settimeout(10)
        conn, _ = listener.accept()
        with conn:
            name, fds, _flags, _addr = socket.recv_fds(conn, 4096, 1)
        assert len(fds) == 1 and name
        master = fds[0]
        try:
            assert os.isatty(master)
            assert rt.call("start", "tty").returncode == 0
            os.write(master, b"echo $((6*7)); tty; exit 5\n")
            text = read_pty(master, 10).decode(errors="replace")
            assert "42" in text and "/dev/pts/0" in text, text
        finally:
            os.close(master)
        assert rt.wait_status("tty", "stopped")["status"] == "stopped"
    finally:
        listener.close()


def test_exec_into_running(rt: Runtime) -> None:
    config = default_config(["sleep", "60"])
    config["process"]["env"].append("FROM_CONFIG=1")
    run_detached(rt, "ex", config)
    assert rt.state("ex")["status"] == "running"
    res = rt.call("exec", "ex", "sh", "-c", "echo $((1+2)); echo e >&2; exit 4")
    assert res.returncode == 4 and res.stdout == "3\n" and "e" in res.stderr
    # Without --process, the container's own process is the base (env), as runc's exec.
    res = rt.call("exec", "--env", "MORE=2", "--cwd", "/tmp", "ex", "sh", "-c",
                  "echo $FROM_CONFIG $MORE $(pwd)")
    assert res.stdout.split() == ["1", "2", "/tmp"], res.stderr
    proc = {"args": ["sh", "-c", "id -u; id -g; echo $GREETING; pwd"],
            "env": ["PATH=/bin", "GREETING=hi"], "cwd": "/tmp",
            "user": {"uid": 1000, "gid": 1000}}
    spec = rt.tmp / "process.json"
    spec.write_text(json.dumps(proc))
    pid_file = rt.tmp / "exec.pid"
    res = rt.call("exec", "--process", str(spec), "--pid-file", str(pid_file), "ex")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["1000", "1000", "hi", "/tmp"]
    assert int(pid_file.read_text()) > 0
    detached = rt.call("exec", "--detach", "ex", "sleep", "30", stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    assert detached.returncode == 0
    pids = json.loads(rt.call("ps", "--format", "json", "ex").stdout)
    assert rt.state("ex")["pid"] in pids and len(pids) == 2, pids
    assert rt.call("kill", "--all", "ex", "KILL").returncode == 0
    assert rt.wait_status("ex", "stopped")["status"] == "stopped"


def test_exec_tty_console_socket_detached(rt: Runtime) -> None:
    """Podman's `exec -t`: exec --process J --detach --tty --console-socket S --pid-file P."""
    run_detached(rt, "ext", default_config(["sleep", "60"]))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(rt.tmp / "exec-console.sock")
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(10)
    spec = rt.tmp / "exec-t.json"
    spec.write_text(json.dumps({"terminal": True, "args": ["sh", "-c", "tty; exit 6"],
                                "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}}))
    try:
        res = rt.call("exec", "--pid-file", str(rt.tmp / "ext.pid"), "--process", str(spec),
                      "--detach", "--tty", "--console-socket", path, "ext",
                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert res.returncode == 0, res.stderr
        conn, _ = listener.accept()
        with conn:
            _name, fds, _flags, _addr = socket.recv_fds(conn, 4096, 1)
    finally:
        listener.close()
    master = fds[0]
    try:
        data = read_pty(master, 60, idle=5, stop=lambda: True)
        assert b"/dev/pts/" in data, data
    finally:
        os.close(master)
    assert int((rt.tmp / "ext.pid").read_text()) > 0


def test_preserve_fds(rt: Runtime) -> None:
    """fd 3 reaches the program with --preserve-fds 1; fd 4, inherited too, does not."""
    b = rt.bundle("fds", default_config(["sh", "-c", "echo via3 >&3; echo via4 >&4 || "
                                                     "echo no4"]))
    r3, w3 = os.pipe()
    r4, w4 = os.pipe()

    def give() -> None:
        os.dup2(w3, 3)
        os.dup2(w4, 4)
    try:
        res = subprocess.run(rt.argv("run", "--preserve-fds", "1", "--bundle", str(b), "fds"),
                             preexec_fn=give, close_fds=False, capture_output=True, text=True,
                             timeout=30)
        rt.ids.append("fds")
        os.close(w3)
        os.close(w4)
        w3 = w4 = -1
        assert res.returncode == 0, res.stderr
        assert os.read(r3, 100) == b"via3\n"
        assert res.stdout.strip() == "no4"
    finally:
        for fd in (r3, r4, w3, w4):
            if fd >= 0:
                os.close(fd)


def test_pause_resume(rt: Runtime) -> None:
    run_detached(rt, "pz", default_config(["sleep", "60"]))
    assert rt.call("pause", "pz").returncode == 0
    assert rt.state("pz")["status"] == "paused"
    assert rt.call("resume", "pz").returncode == 0
    assert rt.state("pz")["status"] == "running"
    assert rt.call("resume", "pz").returncode != 0  # not paused
    refused = rt.call("delete", "pz")
    assert refused.returncode != 0 and "running" in refused.stderr
    assert rt.call("delete", "--force", "pz").returncode == 0
    assert rt.call("state", "pz").returncode != 0


def test_bad_config_json_error(rt: Runtime) -> None:
    config = default_config(["true"])
    config["process"]["cwd"] = "relative/dir"
    b = rt.bundle("bad", config)
    log = rt.tmp / "log.json"
    res = rt.call("create", "--bundle", str(b), "bad", log=log, log_format="json")
    assert res.returncode != 0
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    errors = [line for line in lines if line.get("level") == "error"]
    assert errors and all(e["msg"] and e["time"] for e in errors), lines
    assert rt.call("state", "bad").returncode != 0  # nothing was made


def test_identity_hostname_env_cwd_user(rt: Runtime) -> None:
    config = default_config(["sh", "-c", "hostname; echo $FOO; pwd; id -u; id -g; id -G; "
                                         "grep CapEff /proc/self/status; "
                                         "touch /x 2>/dev/null && echo root-writable; "
                                         "touch /tmp/y && echo tmp-writable; "
                                         "echo keys $(wc -c < /proc/keys); "
                                         "echo > /proc/sys/kernel/domainname 2>/dev/null "
                                         "|| echo proc-sys-readonly"])
    config["hostname"] = "box7"
    config["process"]["env"].append("FOO=bar baz")
    config["process"]["cwd"] = "/tmp"
    config["process"]["user"] = {"uid": 1000, "gid": 1000, "additionalGids": [2000, 3000]}
    b = rt.bundle("who", config)
    res = rt.call("run", "--bundle", str(b), "who")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[:5] == ["box7", "bar baz", "/tmp", "1000", "1000"], lines
    assert set(lines[5].split()) == {"1000", "2000", "3000"}
    assert lines[6].split()[1] == "0000000000000000"  # a non-root user keeps no capability
    assert lines[7:] == ["tmp-writable", "keys 0", "proc-sys-readonly"], lines


def test_resources_limits(rt: Runtime) -> None:
    # The inner shell dies at its first failed fork; its sleeps stay, under init.
    config = default_config(["sh", "-c", "sh -c 'for i in $(seq 40); do sleep 30 & done' "
                                         "2>/dev/null; echo started; exec sleep 60"])
    config["linux"]["resources"].update({"memory": {"limit": 64 * 1024 * 1024},
                                         "pids": {"limit": 20}})
    config["linux"]["cgroupsPath"] = f"/cfs-oci-test-{os.getpid()}-{time.monotonic_ns()}"
    out = run_detached(rt, "lim", config)
    wait_for_text(out, "started")
    pid = rt.state("lim")["pid"]
    procs = _in_pid_ns_of(pid)
    assert 10 <= len(procs) <= 20, f"{len(procs)} processes under pids.max 20"
    if runtime_is_ours():
        ctr = _service_row(pid)
        got = subprocess.run([_containerfs(), "limit", str(ctr["id"]), "memory.max"],
                             capture_output=True, text=True)
        assert got.stdout.strip() == str(64 * 1024 * 1024), got.stderr
    else:
        cg = f"/sys/fs/cgroup/memory{config['linux']['cgroupsPath']}/memory.limit_in_bytes"
        assert Path(cg).read_text().strip() == str(64 * 1024 * 1024)


def test_listed_by_service(rt: Runtime) -> None:
    if not runtime_is_ours():
        pytest.skip("containerfs objects: only our runtime's containers are in the service")
    run_detached(rt, "listed", default_config(["sleep", "60"]))
    pid = rt.state("listed")["pid"]
    row = _service_row(pid)
    assert row["name"] == "listed" and row["state"] == "running"
    ls = subprocess.run([_containerfs(), "ls"], capture_output=True, text=True)
    assert any(line.split()[1:2] == ["listed"] for line in ls.stdout.splitlines()), ls.stdout
    view = Path(rt.view) / "by-name" / "listed"  # type: ignore[attr-defined]
    assert (view / "init_pid").read_text().strip() == str(pid)
    assert "CAP_KILL" in (view / "caps").read_text()  # the config's bounding set
    assert rt.call("delete", "--force", "listed").returncode == 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(r["init_pid"] == pid and r["state"] != "dead"
                                              for r in _rows()):
        time.sleep(0.05)
    assert not any(r["init_pid"] == pid and r["state"] != "dead" for r in _rows())


def test_namespaces_joined_by_path(rt: Runtime) -> None:
    """A container given another's network and uts namespaces by path is in them."""
    config = default_config(["sleep", "60"])
    config["hostname"] = "first"
    run_detached(rt, "first", config)
    first = rt.state("first")["pid"]
    joiner = default_config(["sh", "-c", "hostname; cat /proc/net/dev | grep -c :"])
    joiner.pop("hostname")
    joiner["linux"]["namespaces"] = [
        {"type": "pid"}, {"type": "ipc"}, {"type": "mount"},
        {"type": "network", "path": f"/proc/{first}/ns/net"},
        {"type": "uts", "path": f"/proc/{first}/ns/uts"}]
    b = rt.bundle("joiner", joiner)
    res = rt.call("run", "--bundle", str(b), "joiner")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["first", "1"]  # its hostname, and only its lo


def test_hostile_symlink_stays_inside(rt: Runtime) -> None:
    """A mount destination through a symlink to a host path lands inside the root."""
    host_dir = rt.tmp / "host-target"
    host_dir.mkdir()
    config = default_config(["true"])
    config["root"]["readonly"] = False
    config["mounts"].append({"destination": "/evil/sub", "type": "tmpfs", "source": "tmpfs",
                             "options": ["size=1m"]})
    b = rt.tmp / "sym"
    from .oci_support import make_rootfs
    make_rootfs(b / "rootfs")
    (b / "rootfs" / "evil").symlink_to(host_dir)
    (b / "config.json").write_text(json.dumps(config))
    res = rt.call("run", "--bundle", str(b), "sym")
    assert res.returncode == 0, res.stderr
    assert list(host_dir.iterdir()) == []
    with open("/proc/self/mountinfo") as f:
        assert not any(str(host_dir) in line for line in f)


def _in_pid_ns_of(pid: int) -> list[int]:
    """The processes in the PID namespace of `pid`."""
    ns = os.readlink(f"/proc/{pid}/ns/pid")
    out = []
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and os.readlink(f"/proc/{p}/ns/pid") == ns and alive(int(p)):
                out.append(int(p))
        except OSError:
            pass  # gone meanwhile
    return out


def _containerfs() -> str:
    return shutil.which("containerfs") or str(Path(os.sys.executable).parent / "containerfs")


def _rows() -> list[dict[str, Any]]:
    import syscalls.container
    return syscalls.container.container_list()


def _service_row(pid: int) -> dict[str, Any]:
    rows = [r for r in _rows() if r["init_pid"] == pid]
    assert rows, f"no container with init {pid} in the service"
    return rows[0]


def test_masked_and_readonly_paths_hold_for_root(rt: Runtime) -> None:
    """linux.maskedPaths and readonlyPaths of the config, seen by root inside (who could read
    and write them otherwise): a masked file reads empty, a masked directory lists empty,
    a read-only path refuses a write with EROFS."""
    config = default_config(["sh", "-c", "echo keys $(wc -c < /proc/keys); "
                                         "echo acpi $(ls -A /proc/acpi 2>/dev/null | wc -l); "
                                         "echo x 2>&1 > /proc/sys/kernel/domainname || true"])
    b = rt.bundle("masked", config)
    res = rt.call("run", "--bundle", str(b), "masked")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[:2] == ["keys 0", "acpi 0"], res.stdout
    assert "Read-only file system" in res.stdout + res.stderr, (res.stdout, res.stderr)
