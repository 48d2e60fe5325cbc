"""Confinement through the handle (contract section 11), on the real kernel: capabilities
and a seccomp profile set before init, applied to every process forked in; the defaults;
the request_key() trap under them; errors; the view; the command line. (The compiler and the
steps themselves: tests/test_confine.py.)"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import subprocess
from typing import Any

import pytest

import syscalls
from syscalls import CONTAINER_NEW_PID_NS, keys
from syscalls.caps import cap_last_cap

from containerfs.confine import DEFAULT_CAPS, DEFAULT_SECCOMP
from containerfs.keyring import intercept

from .conftest import OTHER_GID, OTHER_UID, child_result, held_init, in_container, run_as
from .test_cli import cli
from .test_keyring import Inside, ask

_libc = ctypes.CDLL(None, use_errno=True)
_NR = {"reboot": 169, "kexec_load": 246, "init_module": 175, "mount": 165, "swapon": 167,
       "unshare": 272, "getcwd": 79}


def _errno_of_syscall(name: str, *args: int) -> int:
    """The errno of a raw system call made with harmless arguments (0 if it succeeded)."""
    res = _libc.syscall(ctypes.c_long(_NR[name]), *[ctypes.c_long(a) for a in args])
    return ctypes.get_errno() if res < 0 else 0


def confined(flags: int = CONTAINER_NEW_PID_NS, caps: int | None = DEFAULT_CAPS,
             profile: Any = DEFAULT_SECCOMP) -> int:
    cfd = syscalls.container_create("confined", flags)
    if caps is not None:
        syscalls.container_set_caps(cfd, caps)
    if profile is not None:
        syscalls.container_set_seccomp(cfd, profile)
    return cfd


def status_fields() -> dict[str, str]:
    with open("/proc/self/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def _probe() -> dict[str, Any]:
    st = status_fields()
    refused = {
        "reboot": _errno_of_syscall("reboot", 0xfee1dead, 672274793, 0),  # CAD_OFF magic
        "kexec_load": _errno_of_syscall("kexec_load", 0, 0, 0, 0),
        "init_module": _errno_of_syscall("init_module", 0, 0, 0),
        "mount": _errno_of_syscall("mount", 0, 0, 0, 0, 0),
        "swapon": _errno_of_syscall("swapon", 0, 0),
        "unshare_user": _errno_of_syscall("unshare", 0x10000000),
    }
    ordinary = subprocess.run(["sh", "-c", "echo confined | tr a-z A-Z | cat"],
                              capture_output=True, text=True).stdout
    py = subprocess.run(["python3", "-c", "print(6 * 7)"], capture_output=True, text=True).stdout
    with open("/tmp/confined-probe", "w") as f:  # file I/O (the host's /tmp: no mount ns)
        f.write("x")
    os.unlink("/tmp/confined-probe")
    a, b = socket.socketpair()
    a.sendall(b"ping")
    sock_ok = b.recv(4) == b"ping"
    return {"CapBnd": st["CapBnd"], "CapEff": st["CapEff"], "NoNewPrivs": st["NoNewPrivs"],
            "Seccomp": st["Seccomp"], "refused": refused, "ordinary": ordinary,
            "python": py, "sockets": sock_ok}


def test_defaults_confine_root_inside(service: Any) -> None:
    cfd = confined()
    holder = Inside(cfd, lambda: status_fields()["Seccomp"], go=True)  # init, confined too
    try:
        pid, got = in_container(cfd, _probe)
        assert child_result(pid) == 0
        assert int(got["CapBnd"], 16) == DEFAULT_CAPS and int(got["CapEff"], 16) == DEFAULT_CAPS
        assert (got["NoNewPrivs"], got["Seccomp"]) == ("1", "2")
        assert got["refused"] == dict.fromkeys(got["refused"], errno.EPERM), got["refused"]
        assert (got["ordinary"], got["python"], got["sockets"]) == ("CONFINED\n", "42\n", True)
        # A member forked later runs under the same confinement.
        pid, again = in_container(cfd, status_fields)
        assert child_result(pid) == 0
        assert again["Seccomp"] == "2" and int(again["CapBnd"], 16) == DEFAULT_CAPS
    finally:
        holder.start()
        assert holder.result() == "2"
        os.close(cfd)


def test_request_key_interception_works_under_the_defaults(service: Any) -> None:
    cfd = confined()
    init = Inside(cfd, lambda: None, go=True)
    try:
        with intercept(cfd, "user") as requests:
            asker = Inside(cfd, ask("user", "confined-key", "info"))
            req = requests.get(timeout=10)
            assert (req.type, req.description) == ("user", "confined-key")
            req.instantiate(b"granted")
            assert asker.result()["payload"] == "granted"
    finally:
        init.start()
        init.result()
        os.close(cfd)


def test_a_custom_profile_refuses_what_it_names(service: Any) -> None:
    profile = {"defaultAction": "SCMP_ACT_ALLOW",
               "syscalls": [{"names": ["getcwd", "no_such_call"], "action": "SCMP_ACT_ERRNO",
                             "errnoRet": errno.EACCES}]}
    cfd = confined(caps=None, profile=json.dumps(profile))
    try:
        def probe() -> Any:
            try:
                os.getcwd()
                cwd = 0
            except OSError as e:
                cwd = e.errno
            return [cwd, _errno_of_syscall("unshare", 0), os.getpid() > 0, status_fields()["CapEff"]]
        pid, got = in_container(cfd, probe)
        assert child_result(pid) == 0
        assert got[:3] == [errno.EACCES, 0, True]
        assert got[3] == status_fields()["CapEff"]  # caps untouched: the caller's own
    finally:
        os.close(cfd)


@pytest.mark.parametrize("profile,fault", [
    ({"defaultAction": "SCMP_ACT_NOPE"}, "defaultAction"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": "getcwd",
                                                        "action": "SCMP_ACT_ERRNO"}]}, "names"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["getcwd"], "action":
      "SCMP_ACT_ERRNO", "args": [{"index": 9, "value": 0, "op": "SCMP_CMP_EQ"}]}]}, "index"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["getcwd"], "action":
      "SCMP_ACT_ERRNO", "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_FOO"}]}]}, "op"),
    ("{not json", "JSON"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "typo": 1}, "typo"),
])
def test_malformed_profiles_name_the_fault(service: Any, profile: Any, fault: str) -> None:
    cfd = syscalls.container_create("bad", 0)
    try:
        with pytest.raises(OSError) as info:
            syscalls.container_set_seccomp(cfd, profile)
        assert info.value.errno == errno.EINVAL
        assert fault in str(info.value), info.value
    finally:
        os.close(cfd)


def test_who_and_when(service: Any) -> None:
    cfd = syscalls.container_create("when", CONTAINER_NEW_PID_NS)
    try:
        with pytest.raises(OSError) as info:
            syscalls.container_set_caps(cfd, 1 << (cap_last_cap() + 1))
        assert info.value.errno == errno.EINVAL
        got = run_as(OTHER_UID, OTHER_GID, f"""
            import syscalls
            out = []
            for call in (lambda: syscalls.container_set_caps({cfd}, 0),
                         lambda: syscalls.container_set_seccomp({cfd}, '{{"defaultAction": "SCMP_ACT_ALLOW"}}')):
                try:
                    call()
                    out.append(0)
                except OSError as e:
                    out.append(e.errno)
            return out
        """, pass_fds=(cfd,))
        assert got == [errno.EPERM, errno.EPERM]
        init, w = held_init(cfd)
        pid, inside = in_container(cfd, lambda: _errno(syscalls.container_set_caps, cfd, 0))
        assert child_result(pid) == 0 and inside == errno.EPERM  # from inside
        with pytest.raises(OSError) as info:  # once init has started
            syscalls.container_set_seccomp(cfd, DEFAULT_SECCOMP)
        assert info.value.errno == errno.EBUSY
        os.close(w)
        assert child_result(init) == 0
        syscalls.container_wait(cfd)
        with pytest.raises(OSError) as info:
            syscalls.container_set_caps(cfd, 0)
        assert info.value.errno == errno.ECANCELED
    finally:
        os.close(cfd)


def _errno(fn: Any, *args: Any) -> int:
    try:
        fn(*args)
    except OSError as e:
        return e.errno or 0
    return 0


def test_an_unprivileged_owner_confines_its_user_namespace_container(service: Any) -> None:
    got = run_as(OTHER_UID, OTHER_GID, """
        import json, os, syscalls
        from containerfs.confine import DEFAULT_CAPS, DEFAULT_SECCOMP
        cfd = syscalls.container_create("mine", syscalls.CONTAINER_NEW_USER_NS
                                        | syscalls.CONTAINER_NEW_PID_NS)
        syscalls.container_set_caps(cfd, DEFAULT_CAPS)
        syscalls.container_set_seccomp(cfd, DEFAULT_SECCOMP)
        r, w = os.pipe()
        pid = syscalls.fork_into_container(cfd)
        if pid == 0:
            st = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
            os.write(w, json.dumps([st["CapEff"].strip(), st["Seccomp"].strip()]).encode())
            os._exit(0)
        os.close(w)
        data = os.read(r, 200)
        os.waitpid(pid, 0)
        return json.loads(data)
    """)
    assert int(got[0], 16) == DEFAULT_CAPS and got[1] == "2"


def test_view_shows_confinement(service: Any) -> None:
    cfd = confined(flags=0)
    try:
        d = os.path.join(service.view, str(syscalls.container_status(cfd)["id"]))
        caps = open(os.path.join(d, "caps")).read()
        assert caps.startswith(f"{DEFAULT_CAPS:#x} ") and "CAP_CHOWN" in caps
        assert "CAP_SYS_ADMIN" not in caps
        assert open(os.path.join(d, "seccomp")).read() == "filter\n"
    finally:
        os.close(cfd)


STATUS = "grep -E '^(CapBnd|NoNewPrivs|Seccomp):' /proc/self/status"


def _cli_status(*options: str) -> dict[str, str]:
    res = cli("run", "--pid", *options, "--", "sh", "-c", STATUS)
    assert res.returncode == 0, res.stderr
    return {k: v.strip() for k, _, v in (line.partition(":") for line in res.stdout.splitlines())}


def test_command_line_confines_by_default(service: Any) -> None:
    default = _cli_status()
    assert int(default["CapBnd"], 16) == DEFAULT_CAPS and default["Seccomp"] == "2"
    assert default["NoNewPrivs"] == "1"
    # (Seccomp says 2 for every process forked in: the request_key() trap is a filter too;
    # no_new_privs comes only with a profile.)
    privileged = _cli_status("--privileged")
    assert privileged["CapBnd"] == status_fields()["CapBnd"]  # the caller's own, all it has
    assert privileged["NoNewPrivs"] == "0"
    assert int(_cli_status("--cap-drop", "ALL")["CapBnd"], 16) == 0
    added = int(_cli_status("--cap-add", "NET_RAW", "--cap-drop", "CHOWN")["CapBnd"], 16)
    assert added == (DEFAULT_CAPS | 1 << 13) & ~1
    assert _cli_status("--seccomp", "unconfined")["NoNewPrivs"] == "0"
    res = cli("run", "--pid", "--", "hostname", "x")  # CAP_SYS_ADMIN confined away
    assert res.returncode != 0
    bad = cli("run", "--cap-add", "NOT_A_CAP", "--", "true")
    assert bad.returncode == 1 and "NOT_A_CAP" in bad.stderr


def test_request_key_is_allowed_by_the_default_profile(service: Any) -> None:
    """keyctl, add_key and request_key pass the default filter (the keyrings and their
    interception depend on them)."""
    cfd = confined()
    try:
        def probe() -> Any:
            ring = keys.add_key("keyring", "inner", None, keys.KEY_SPEC_SESSION_KEYRING)
            k = keys.add_key("user", "k", b"v", ring)
            try:
                keys.request_key("user", "missing-key")
                missing = 0
            except OSError as e:
                missing = e.errno
            return [keys.read(k).decode(), missing]
        pid, got = in_container(cfd, probe)
        assert child_result(pid) == 0
        assert got == ["v", errno.ENOKEY]
    finally:
        os.close(cfd)
