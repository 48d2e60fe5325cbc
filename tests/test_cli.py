"""The command line, through real subprocesses: output, errors and exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import pytest

import syscalls
from syscalls import CONTAINER_NEW_PID_NS

from .conftest import OTHER_UID, child_result, pid_alive


def cli(*args: str, input: str | None = None, env: dict[str, str] | None = None,
        user: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "containerfs", *args], capture_output=True,
                          text=True, input=input, timeout=30, env=env or os.environ.copy(),
                          user=user, group=user, extra_groups=[] if user else None, cwd="/")


@pytest.mark.parametrize("sub", ["serve", "run", "exec", "ls", "ps", "kill", "status", "keys"])
def test_help(sub: str) -> None:
    res = cli(sub, "--help")
    assert res.returncode == 0 and "usage: containerfs" in res.stdout


def test_usage_errors_exit_2(service: Any) -> None:
    assert cli().returncode == 2
    assert cli("run").returncode == 2
    assert cli("kill", "notanumber").returncode == 2


def test_no_service(tmp_path: Any) -> None:
    env = {**os.environ, "CONTAINERFS_SOCKET": str(tmp_path / "none.sock")}
    res = cli("ls", env=env)
    assert res.returncode == 1
    assert "containerfs serve" in res.stderr


def test_run_passes_exit_codes(service: Any) -> None:
    assert cli("run", "--all", "--", "sh", "-c", "exit 3").returncode == 3
    assert cli("run", "--", "sh", "-c", "kill -9 $$").returncode == 137
    # Setting the hostname needs CAP_SYS_ADMIN, which `run` confines away unless --privileged.
    res = cli("run", "--privileged", "--pid", "--uts", "--", "sh", "-c",
              "echo $$; hostname x && hostname")
    assert (res.returncode, res.stdout.split()) == (0, ["1", "x"])
    res = cli("run", "--", "/nonexistent/command")
    assert res.returncode == 127 and "/nonexistent/command" in res.stderr


def test_run_as_user_with_user_namespace(service: Any) -> None:
    res = cli("run", "--user", "--pid", "--net", "--", "sh", "-c", "id -u; echo $$", user=OTHER_UID)
    assert (res.returncode, res.stdout.split()) == (0, ["0", "1"]), res.stderr
    res = cli("run", "--pid", "--", "true", user=OTHER_UID)
    assert res.returncode == 1 and "CONTAINER_NEW_USER_NS" in res.stderr


@pytest.fixture
def running(service: Any) -> Any:
    cfd = syscalls.container_create("target", CONTAINER_NEW_PID_NS)
    r, w = os.pipe()
    init = syscalls.fork_into_container(cfd)
    if init == 0:
        os.close(w)
        os.close(cfd)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    cid = syscalls.container_status(cfd)["id"]
    yield cid, init, cfd
    os.close(w)
    child_result(init)
    os.close(cfd)


def test_exec_ls_status(running: Any) -> None:
    cid, init, _cfd = running
    res = cli("exec", str(cid), "--", "sh", "-c", "echo $$; exit 4")
    assert res.returncode == 4
    assert int(res.stdout) not in (0, 1)  # a member, not init
    res = cli("exec", str(cid), "--", "cat", input="through stdin\n")
    assert (res.returncode, res.stdout) == (0, "through stdin\n")
    res = cli("exec", "-t", str(cid), "--", "sh", "-c", "test -t 0 && test -t 1 && echo tty")
    assert res.returncode == 0 and "tty" in res.stdout
    listing = cli("ls").stdout.splitlines()
    assert listing[0].split()[:3] == ["ID", "NAME", "STATE"]
    assert any(line.split()[:3] == [str(cid), "target", "running"] for line in listing[1:])
    status = cli("status", str(cid))
    assert status.returncode == 0 and "state: running" in status.stdout
    assert f"init_pid: {init}" in status.stdout


def test_other_users_see_and_touch_nothing(running: Any) -> None:
    cid, init, _cfd = running
    for args in (("exec", str(cid), "--", "true"), ("kill", str(cid)), ("status", str(cid))):
        res = cli(*args, user=OTHER_UID)
        assert res.returncode == 1, args
    assert str(cid) not in cli("ls", user=OTHER_UID).stdout.split()
    assert pid_alive(init)


def test_kill(running: Any) -> None:
    cid, init, cfd = running
    assert cli("kill", "999999").returncode == 1
    assert cli("kill", str(cid)).returncode == 0
    deadline = time.monotonic() + 5
    while pid_alive(init) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not pid_alive(init)
    assert syscalls.container_status(cfd)["state"] == "dead"
    assert cli("exec", str(cid), "--", "true").returncode == 1


def test_keys_add_and_list(running: Any) -> None:
    from syscalls import keys
    cid, _init, cfd = running
    # A keyring of another container with the same id (another service's, or an older
    # scheme's name) is not this one's.
    decoys = [keys.add_key("keyring", name, None, keys.KEY_SPEC_USER_KEYRING)
              for name in (f"containerfs.cli.{cid}", f"containerfs.cli.{cid}.0")]
    ours = f"containerfs.cli.{cid}.{os.fstat(cfd).st_ino}"
    try:
        for ring in decoys:
            keys.add_key("user", "decoy-key", b"no", ring)
        assert cli("keys", str(cid), "list").stdout == ""
        res = cli("keys", str(cid), "add", "user", "cli-test-key", "sesame")
        assert res.returncode == 0 and int(res.stdout) > 0
        listing = cli("keys", str(cid), "list").stdout.split()
        assert "cli-test-key" in listing and "user" in listing and "decoy-key" not in listing
        assert keys.search(keys.KEY_SPEC_USER_KEYRING, "keyring", ours) not in decoys
        # request_key() inside the container finds it (keyutils' own command line)
        res = cli("exec", str(cid), "--", "sh", "-c",
                  "keyctl print $(keyctl request user cli-test-key)")
        assert (res.returncode, res.stdout.strip()) == (0, "sesame"), res.stderr
        assert cli("keys", "999999", "add", "user", "x", "y").returncode == 1
    finally:
        for ring in decoys:
            keys.unlink(ring, keys.KEY_SPEC_USER_KEYRING)
        try:
            keys.unlink(keys.search(keys.KEY_SPEC_USER_KEYRING, "keyring", ours),
                        keys.KEY_SPEC_USER_KEYRING)
        except OSError:
            pass


def test_run_warns_when_sharing_host_uids(service: Any) -> None:
    assert "shares the host's uids" in cli("run", "--pid", "--", "true").stderr
    assert "shares" not in cli("run", "--user", "--pid", "--", "true").stderr
