"""Confinement on the real kernel, without the service: a forked child (root) applies
capabilities and a seccomp profile and reports from inside what it can and cannot do.
Compiled programs are also run through a small BPF interpreter, for ABIs and arguments the
kernel cannot safely be asked about. Every child is killed and reaped, even when a test fails.
"""

from __future__ import annotations

import copy
import ctypes
import errno
import json
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from containerfs.confine import DEFAULT_CAPS, DEFAULT_SECCOMP, check_profile
from syscalls import caps, keys, seccomp, seccomp_notify
from syscalls.confine import apply_confinement
from syscalls.seccomp_profile import parse_profile

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="confinement tests fork as root")
if os.geteuid() != 0:
    print("skipping test_confine: not root")

NATIVE = seccomp.native_arch()
# struct seccomp_data's arch for each ABI (x32 shares x86_64's, its numbers carry a bit).
AUDIT_ARCH = {"SCMP_ARCH_X86_64": 0xC000003E, "SCMP_ARCH_X86": 0x40000003,
              "SCMP_ARCH_X32": 0xC000003E, "SCMP_ARCH_AARCH64": 0xC00000B7,
              "SCMP_ARCH_ARM": 0x40000028}
SUB_ARCH = {"SCMP_ARCH_X86_64": "SCMP_ARCH_X86", "SCMP_ARCH_AARCH64": "SCMP_ARCH_ARM"}
RET_ALLOW, RET_ERRNO, RET_KILL_THREAD = 0x7FFF0000, 0x00050000, 0x00000000
MISSING = "/containerfs-confine-test/no/such/path"
CLONE_NEWUSER = 0x10000000


# ---- helpers --------------------------------------------------------------------------

def in_child(work: Callable[[], Any], during: Callable[[int], None] | None = None,
             timeout: float = 60.0) -> tuple[Any, int]:
    """Run `work` in a forked child; return (its JSON result, or None if it died first;
    its wait status). `during(pid)` runs here meanwhile. The child never outlives this."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(r)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGSYS must not dump core
            try:
                out: dict[str, Any] = {"ok": work()}
            except BaseException as e:  # noqa: B036 - reported to the parent
                out = {"error": f"{type(e).__name__}: {e}", "errno": getattr(e, "errno", None)}
            data = json.dumps(out).encode()
            while data:
                data = data[os.write(w, data):]
        except BaseException:  # noqa: B036
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    status = -1
    try:
        if during is not None:
            during(pid)
        chunks = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "the child did not finish in time"
            if select.select([r], [], [], left)[0]:
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(r)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        status = os.waitpid(pid, 0)[1]
    if not chunks:
        return None, status
    out = json.loads(b"".join(chunks))
    assert "error" not in out, f"in the child: {out['error']}"
    return out["ok"], status


def status_fields() -> dict[str, str]:
    with open("/proc/self/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def raw_errno(name: str, *args: int | bytes | str | None) -> int:
    """Make system call `name` directly: 0 if it succeeded, else its errno."""
    nr = seccomp.syscall_number(name)
    assert nr is not None, name
    cargs = [ctypes.c_long(a) if isinstance(a, int) else
             ctypes.c_char_p(a.encode() if isinstance(a, str) else a) for a in args]
    res = _libc.syscall(ctypes.c_long(nr), *cargs)
    return 0 if res != -1 else ctypes.get_errno()


# Each call is harmless without any confinement (it fails on its arguments, or changes only
# the throwaway child), and the errno it gives then is not EPERM: so EPERM is the filter's.
REFUSED: list[tuple[str, tuple[int | str | bytes | None, ...]]] = [
    ("reboot", (0, 0, 0, None)),               # bad magic: EINVAL after the CAP_SYS_BOOT check
    ("kexec_load", (0, 0, None, 0x80)),         # an unknown flag
    ("init_module", (None, 0, b"")),             # an empty image
    ("finit_module", (-1, b"", 0)),
    ("delete_module", (b"containerfs_no_such_module", os.O_NONBLOCK)),
    ("mount", (None, MISSING, None, 0, None)),
    ("umount2", (MISSING, 0)),
    ("swapon", (MISSING, 0)),
    ("swapoff", (MISSING,)),
    ("bpf", (-1, None, 0)),
    ("perf_event_open", (None, 0, -1, -1, 0)),
    ("setns", (-1, 0)),
    ("open_by_handle_at", (-1, None, 0)),
    ("acct", (MISSING,)),
    ("pivot_root", (MISSING, MISSING)),
    ("socket", (40, socket.SOCK_STREAM, 0)),     # AF_VSOCK
    # Last: unconfined it succeeds, and the child then has no capability left in the
    # namespaces the calls above are checked against.
    ("unshare", (CLONE_NEWUSER,)),
]


def try_refused() -> dict[str, int]:
    out = {name: raw_errno(name, *args) for name, args in REFUSED}
    out["clone3"] = raw_errno("clone3", None, 0)  # EINVAL (no args) unless filtered
    return out


# ---- what the defaults do -------------------------------------------------------------

def test_default_caps_are_podmans_eleven() -> None:
    assert DEFAULT_CAPS == 0x800405FB
    assert caps.names_of(DEFAULT_CAPS) == [
        "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID",
        "CAP_SETUID", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_SETFCAP"]
    assert caps.mask_of(["chown", "CAP_KILL", " sys_chroot "]) == 1 | 1 << 5 | 1 << 18
    assert caps.mask_of(["ALL"]) == (1 << (caps.cap_last_cap() + 1)) - 1


def test_defaults_state_inside() -> None:
    def work() -> dict[str, str]:
        apply_confinement(DEFAULT_CAPS, DEFAULT_SECCOMP)
        return status_fields()

    st, _ = in_child(work)
    for field in ("CapBnd", "CapEff", "CapPrm"):
        assert int(st[field], 16) == DEFAULT_CAPS, field
    assert int(st["CapInh"], 16) & ~DEFAULT_CAPS == 0
    assert int(st["CapAmb"], 16) == 0
    assert (st["NoNewPrivs"], st["Seccomp"], st["Seccomp_filters"]) == ("1", "2", "1")


def test_default_profile_refuses_with_eperm() -> None:
    unconfined, _ = in_child(try_refused)
    filtered, _ = in_child(lambda: (apply_confinement(None, DEFAULT_SECCOMP), try_refused())[1])
    confined, _ = in_child(lambda: (apply_confinement(DEFAULT_CAPS, DEFAULT_SECCOMP),
                                    try_refused())[1])
    for name, _args in REFUSED:
        assert unconfined[name] != errno.EPERM, f"{name} gives EPERM even unconfined"
        assert filtered[name] == errno.EPERM, f"{name} under the filter alone"
        assert confined[name] == errno.EPERM, f"{name} under the defaults"
    # The C library falls back to clone on ENOSYS, never on EPERM.
    assert unconfined["clone3"] == errno.EINVAL
    assert filtered["clone3"] == confined["clone3"] == errno.ENOSYS


def test_default_profile_error_number_is_the_profiles() -> None:
    profile = copy.deepcopy(DEFAULT_SECCOMP)
    profile["defaultErrnoRet"] = errno.EOPNOTSUPP
    out, _ = in_child(lambda: (apply_confinement(None, profile), try_refused())[1])
    assert out["mount"] == out["reboot"] == errno.EOPNOTSUPP


def test_ordinary_programs_run_under_the_defaults(tmp_path: Path) -> None:
    script = ("import hashlib, json, threading, socket\n"
              "t = threading.Thread(target=lambda: None); t.start(); t.join()\n"
              "a, b = socket.socketpair(); a.sendall(b'x'); assert b.recv(1) == b'x'\n"
              "print(json.dumps(hashlib.sha256(b'abc').hexdigest()[:8]))\n")

    def work() -> dict[str, Any]:
        apply_confinement(DEFAULT_CAPS, DEFAULT_SECCOMP)
        out: dict[str, Any] = {}
        sh = subprocess.run(["/bin/sh", "-c", "echo hello world | tr a-z A-Z | wc -c"],
                            capture_output=True, text=True, timeout=30)
        out["sh"] = (sh.returncode, sh.stdout.strip(), sh.stderr)
        py = subprocess.run(["python3", "-c", script], capture_output=True, text=True, timeout=30)
        out["python3"] = (py.returncode, py.stdout.strip(), py.stderr)
        # Files: create, write, sync, rename, read, list, remove.
        path = tmp_path / "f"
        with open(path, "wb") as f:
            f.write(b"data" * 1000)
            os.fsync(f.fileno())
        os.rename(path, tmp_path / "g")
        out["file"] = ((tmp_path / "g").read_bytes() == b"data" * 1000,
                       os.listdir(tmp_path) == ["g"])
        os.unlink(tmp_path / "g")
        # Sockets: TCP and UDP on loopback, a unix pair.
        with socket.create_server(("127.0.0.1", 0)) as srv:
            with socket.create_connection(srv.getsockname(), timeout=10) as cli:
                conn, _ = srv.accept()
                with conn:
                    cli.sendall(b"ping")
                    out["tcp"] = conn.recv(4).decode()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u1, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u2:
            u1.bind(("127.0.0.1", 0))
            u2.sendto(b"dgram", u1.getsockname())
            out["udp"] = u1.recv(16).decode()
        # posix_spawn tries clone3 first (ENOSYS here), then clone; threads alike.
        pid = os.posix_spawn("/bin/true", ["true"], {})
        out["spawn"] = os.waitpid(pid, 0)[1]
        box: list[int] = []
        t = threading.Thread(target=lambda: box.append(os.getpid()))
        t.start()
        t.join()
        out["thread"] = box == [os.getpid()]
        return out

    out, _ = in_child(work)
    assert out["sh"] == [0, "12", ""]
    assert out["python3"] == [0, '"ba7816bf"', ""]
    assert out["file"] == [True, True]
    assert (out["tcp"], out["udp"], out["spawn"], out["thread"]) == ("ping", "dgram", 0, True)


def test_keyrings_work_under_the_defaults() -> None:
    def work() -> dict[str, Any]:
        apply_confinement(DEFAULT_CAPS, DEFAULT_SECCOMP)
        keys.join_session_keyring(None)  # an empty keyring of the child's own
        serial = keys.add_key("user", "containerfs-confine", b"payload",
                              keys.KEY_SPEC_SESSION_KEYRING)
        found = keys.request_key("user", "containerfs-confine")
        try:
            keys.request_key("user", "containerfs-confine-missing")  # no callout: no upcall
            missing = 0
        except OSError as e:
            missing = e.errno or 0
        return {"read": keys.read(serial).decode(), "found": found == serial,
                "missing": missing}

    out, _ = in_child(work)
    assert out == {"read": "payload", "found": True, "missing": errno.ENOKEY}


@pytest.mark.parametrize("trap_first", [True, False], ids=["trap-first", "profile-first"])
def test_request_key_trap_works_with_the_default_profile(trap_first: bool) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    seen: list[seccomp_notify.Notification] = []

    def work() -> dict[str, Any]:
        ours.close()
        if trap_first:
            listener = seccomp_notify.install_request_key_filter()
            apply_confinement(DEFAULT_CAPS, DEFAULT_SECCOMP)
        else:
            apply_confinement(DEFAULT_CAPS, DEFAULT_SECCOMP)
            listener = seccomp_notify.install_request_key_filter()
        socket.send_fds(theirs, [b"listener"], [listener])
        os.close(listener)
        try:
            keys.request_key("user", "containerfs-trapped", "callout")
            result = 0
        except OSError as e:
            result = e.errno or 0
        return {"errno": result, "filters": status_fields()["Seccomp_filters"]}

    def answer(_pid: int) -> None:
        theirs.close()
        _msg, fds, _flags, _addr = socket.recv_fds(ours, 64, 1)
        assert len(fds) == 1, "the child sent no listener"
        try:
            assert select.select([fds[0]], [], [], 30)[0], "no request_key() notification"
            notif = seccomp_notify.notif_recv(fds[0])
            assert notif is not None
            seen.append(notif)
            seccomp_notify.notif_send(fds[0], notif.id, error=errno.EKEYREJECTED)
        finally:
            os.close(fds[0])

    with ours, theirs:
        out, _ = in_child(work, during=answer)
    assert out == {"errno": errno.EKEYREJECTED, "filters": "2"}
    assert (seen[0].arch, seen[0].nr) == (AUDIT_ARCH[NATIVE], seccomp.syscall_number("request_key"))


def test_a_profile_refusing_request_key_switches_the_trap_off() -> None:
    """Filters stack and the strictest answer wins: ERRNO beats the trap's USER_NOTIF."""
    profile = {"defaultAction": "SCMP_ACT_ALLOW",
               "syscalls": [{"names": ["request_key"], "action": "SCMP_ACT_ERRNO",
                             "errnoRet": errno.EACCES}]}
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    held: list[int] = []

    def work() -> int:
        listener = seccomp_notify.install_request_key_filter()
        apply_confinement(None, profile)
        socket.send_fds(theirs, [b"listener"], [listener])
        try:
            keys.request_key("user", "containerfs-trapped", "callout")
            return 0
        except OSError as e:
            return e.errno or 0

    def receive(_pid: int) -> None:
        held.extend(socket.recv_fds(ours, 64, 1)[1])

    try:
        with ours, theirs:
            # Had the trap been asked, the child would wait for an answer: it would time out.
            out, _ = in_child(work, during=receive, timeout=20)
        assert out == errno.EACCES
        assert len(held) == 1
        # The child is gone (POLLHUP); a request it had made would still be there (POLLIN).
        poller = select.poll()
        poller.register(held[0], select.POLLIN)
        assert all(not ev & select.POLLIN for _fd, ev in poller.poll(0)), "the trap was asked"
    finally:
        for fd in held:
            os.close(fd)


# ---- custom profiles: actions, errno, arguments, names --------------------------------

def _getcwd_errno() -> int | str:
    try:
        os.getcwd()
        return "ok"
    except OSError as e:
        return e.errno or 0


def test_custom_profile_refuses_exactly_what_it_names(tmp_path: Path) -> None:
    profile = {"defaultAction": "SCMP_ACT_ALLOW",
               "syscalls": [{"names": ["getcwd"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
                            {"names": ["uname"], "action": "SCMP_ACT_ERRNO"}]}
    before = status_fields()

    def work() -> dict[str, Any]:
        apply_confinement(None, json.dumps(profile))
        try:
            os.uname()
            uname: int | str = "ok"
        except OSError as e:
            uname = e.errno or 0
        (tmp_path / "f").write_text("text")
        a, b = socket.socketpair()
        with a, b:
            a.sendall(b"x")
            pair = b.recv(1).decode()
        echo = subprocess.run(["/bin/echo", "hi"], capture_output=True, text=True, timeout=30)
        st = status_fields()
        return {"getcwd": _getcwd_errno(), "uname": uname, "pair": pair,
                "file": (tmp_path / "f").read_text(), "echo": echo.stdout.strip(),
                "CapEff": st["CapEff"], "CapBnd": st["CapBnd"], "NoNewPrivs": st["NoNewPrivs"],
                "Seccomp": st["Seccomp"]}

    out, _ = in_child(work)
    assert (out["getcwd"], out["uname"]) == (errno.EACCES, errno.EPERM)
    assert (out["pair"], out["file"], out["echo"]) == ("x", "text", "hi")
    # No mask: capabilities are left alone; a profile always comes with no_new_privs.
    assert (out["CapEff"], out["CapBnd"]) == (before["CapEff"], before["CapBnd"])
    assert (out["NoNewPrivs"], out["Seccomp"]) == ("1", "2")


@pytest.mark.parametrize(("action", "errno_ret", "expect"), [
    ("SCMP_ACT_ERRNO", None, errno.EPERM),
    ("SCMP_ACT_ERRNO", errno.ENOTDIR, errno.ENOTDIR),
    ("SCMP_ACT_TRACE", None, errno.ENOSYS),          # no tracer: the kernel says ENOSYS
    ("SCMP_ACT_LOG", None, "ok"),
    ("SCMP_ACT_TRAP", None, signal.SIGSYS),
    ("SCMP_ACT_KILL", None, signal.SIGSYS),
    ("SCMP_ACT_KILL_THREAD", None, signal.SIGSYS),
    ("SCMP_ACT_KILL_PROCESS", None, signal.SIGSYS),
])
def test_actions(action: str, errno_ret: int | None, expect: int | str) -> None:
    rule: dict[str, Any] = {"names": ["getcwd"], "action": action}
    if errno_ret is not None:
        rule["errnoRet"] = errno_ret
    profile = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [rule]}
    out, status = in_child(lambda: (apply_confinement(None, profile), _getcwd_errno())[1])
    if isinstance(expect, signal.Signals):
        assert out is None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == expect
    else:
        assert out == expect


PROBES = {"0": (0, 0), "1": (1, 0), "2": (2, 0), "0,self": (0, -1)}


@pytest.mark.parametrize(("args", "refused"), [
    ([{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}], {"1"}),
    ([{"index": 0, "value": 1, "op": "SCMP_CMP_NE"}], {"0", "0,self", "2"}),
    ([{"index": 0, "value": 1, "op": "SCMP_CMP_LT"}], {"0", "0,self"}),
    ([{"index": 0, "value": 1, "op": "SCMP_CMP_LE"}], {"0", "0,self", "1"}),
    ([{"index": 0, "value": 1, "op": "SCMP_CMP_GE"}], {"1", "2"}),
    ([{"index": 0, "value": 1, "op": "SCMP_CMP_GT"}], {"2"}),
    # (which & 2) == 0: `value` is the mask, `valueTwo` what the masked argument must be.
    ([{"index": 0, "value": 2, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}], {"0", "0,self", "1"}),
    # Two conditions on one argument: one rule each, either refuses (as runc does).
    ([{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}, {"index": 0, "value": 2, "op": "SCMP_CMP_EQ"}],
     {"0", "0,self", "2"}),
    # Conditions on different arguments: all must hold.
    ([{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}, {"index": 1, "value": 0, "op": "SCMP_CMP_EQ"}],
     {"0"}),
], ids=["EQ", "NE", "LT", "LE", "GE", "GT", "MASKED_EQ", "same-arg-OR", "two-args-AND"])
def test_argument_conditions(args: list[dict[str, Any]], refused: set[str]) -> None:
    # getpriority(which, who): PRIO_PROCESS, PRIO_PGRP, PRIO_USER with who 0 (ourselves), or
    # our pid: harmless reads that all succeed unfiltered.
    profile = {"defaultAction": "SCMP_ACT_ALLOW",
               "syscalls": [{"names": ["getpriority"], "action": "SCMP_ACT_ERRNO",
                             "errnoRet": errno.EACCES, "args": args}]}

    def work() -> list[str]:
        apply_confinement(None, profile)
        out = []
        for label, (which, who) in PROBES.items():
            try:
                os.getpriority(which, os.getpid() if who < 0 else who)
            except OSError as e:
                assert e.errno == errno.EACCES, (label, e)
                out.append(label)
        return sorted(out)

    out, _ = in_child(work)
    assert set(out) == refused


def test_unknown_names_are_skipped_and_the_old_name_form_works() -> None:
    profile = {"defaultAction": "SCMP_ACT_ALLOW",
               "syscalls": [{"names": ["containerfs_no_such_call", "getcwd"],
                             "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EACCES},
                            {"name": "uname", "action": "SCMP_ACT_ERRNO"}]}
    assert seccomp.compile_profile(profile).skipped == ("containerfs_no_such_call",)

    def work() -> list[int | str]:
        apply_confinement(None, profile)
        try:
            os.uname()
            uname: int | str = "ok"
        except OSError as e:
            uname = e.errno or 0
        return [_getcwd_errno(), uname]

    out, _ = in_child(work)
    assert out == [errno.EACCES, errno.EPERM]


def test_profile_forms_compile_alike() -> None:
    text = json.dumps(DEFAULT_SECCOMP)
    programs = {seccomp.compile_profile(p).program
                for p in (DEFAULT_SECCOMP, text, text.encode(), parse_profile(text))}
    assert len(programs) == 1
    # runc's default flag when a profile names none; an empty list means none.
    assert seccomp.compile_profile(DEFAULT_SECCOMP).flags == 1 << 2
    assert seccomp.compile_profile({**DEFAULT_SECCOMP, "flags": []}).flags == 0
    assert json.loads(check_profile(text)) == DEFAULT_SECCOMP


# ---- what compiled programs answer, for ABIs and flags not safe to try for real -------

def run_bpf(program: bytes, arch: int, nr: int, *args: int) -> int:
    """The return value of a classic-BPF seccomp program for one call: a small interpreter
    of the instructions libseccomp emits (loads, ALU, jumps, returns)."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    insns = [struct.unpack_from("<HBBI", program, i) for i in range(0, len(program), 8)]
    acc = idx = pc = 0
    mem = [0] * 16
    for _ in range(len(insns) + 1):  # classic BPF jumps only forward
        code, jt, jf, k = insns[pc]
        pc += 1
        cls, op, src = code & 0x07, code & 0xF0, code & 0x08
        operand = idx if src else k
        if cls == 0x00:  # LD: W|ABS, IMM, MEM
            mode = code & 0xE0
            acc = (struct.unpack_from("<I", data, k)[0] if mode == 0x20
                   else k if mode == 0x00 else mem[k])
        elif cls == 0x01:  # LDX: IMM, MEM
            idx = k if code & 0xE0 == 0x00 else mem[k]
        elif cls in (0x02, 0x03):  # ST, STX
            mem[k] = acc if cls == 0x02 else idx
        elif cls == 0x04:  # ALU
            acc = {0x00: acc + operand, 0x10: acc - operand, 0x40: acc | operand,
                   0x50: acc & operand, 0x60: acc << operand, 0x70: acc >> operand,
                   0xA0: acc ^ operand}[op] & 0xFFFFFFFF
        elif cls == 0x05:  # JMP
            if op == 0x00:
                pc += k
            else:
                taken = {0x10: acc == operand, 0x20: acc > operand, 0x30: acc >= operand,
                         0x40: acc & operand != 0}[op]
                pc += jt if taken else jf
        elif cls == 0x06:  # RET K or A
            return acc if code & 0x18 == 0x10 else k
        else:  # MISC: TAX, TXA
            if op == 0x00:
                idx = acc
            else:
                acc = idx
    raise AssertionError("the program did not return")


def answer(filt: seccomp.SeccompFilter, arch: str, name: str, *args: int) -> int:
    nr = seccomp.syscall_number(name, arch)
    assert nr is not None, (name, arch)
    return run_bpf(filt.program, AUDIT_ARCH[arch], nr, *args)


def test_interpreter_agrees_with_the_kernel_on_getcwd() -> None:
    """The interpreter is itself checked: the answers it gives are the ones the kernel gave
    in the tests above."""
    filt = seccomp.compile_profile({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["getcwd"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EACCES}]})
    assert answer(filt, NATIVE, "getcwd") == RET_ERRNO | errno.EACCES
    assert answer(filt, NATIVE, "getpid") == RET_ALLOW


@pytest.mark.skipif(NATIVE not in SUB_ARCH, reason=f"no second ABI known for {NATIVE}")
def test_architectures_are_honoured() -> None:
    sub = SUB_ARCH[NATIVE]
    base = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["getcwd"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EACCES}]}
    native_only = seccomp.compile_profile({**base, "architectures": [NATIVE]})
    both = seccomp.compile_profile({**base, "architectures": [NATIVE, sub]})
    assert answer(native_only, NATIVE, "getcwd") == RET_ERRNO | errno.EACCES
    # An ABI the profile does not name: libseccomp's bad-architecture action, kill.
    assert answer(native_only, sub, "getcwd") == RET_KILL_THREAD
    assert answer(both, sub, "getcwd") == RET_ERRNO | errno.EACCES
    assert answer(both, sub, "getpid") == RET_ALLOW
    # Docker's archMap: the native entry and its sub-architectures, nothing else.
    default = seccomp.compile_profile(DEFAULT_SECCOMP)
    assert answer(default, sub, "getpid") == RET_ALLOW
    assert answer(default, sub, "mount") == RET_ERRNO | errno.EPERM
    other = "SCMP_ARCH_AARCH64" if NATIVE == "SCMP_ARCH_X86_64" else "SCMP_ARCH_X86_64"
    assert answer(default, other, "getpid") == RET_KILL_THREAD
    if NATIVE == "SCMP_ARCH_X86_64":
        assert answer(native_only, "SCMP_ARCH_X32", "getcwd") == RET_KILL_THREAD
        assert answer(default, "SCMP_ARCH_X32", "getpid") == RET_ALLOW


@pytest.mark.parametrize(("name", "args", "allowed"), [
    ("clone", (signal.SIGCHLD,), True),
    ("clone", (0x3D0F00,), True),                        # pthread_create's flags
    ("clone", (CLONE_NEWUSER | signal.SIGCHLD,), False),
    ("clone", (0x40000000 | signal.SIGCHLD,), False),    # CLONE_NEWNET
    ("unshare", (0x400 | 0x200,), True),                 # CLONE_FILES | CLONE_FS
    ("unshare", (CLONE_NEWUSER,), False),
    ("unshare", (0x80,), False),                          # CLONE_NEWTIME
    ("personality", (0xFFFFFFFF,), True),
    ("personality", (0x0040000,), False),                 # ADDR_NO_RANDOMIZE
    ("socket", (socket.AF_INET,), True),
    ("socket", (38,), False),                             # AF_ALG
    ("socket", (40,), False),                             # AF_VSOCK
    ("keyctl", (), True),
    ("add_key", (), True),
    ("request_key", (), True),
    ("seccomp", (), True),
    ("ptrace", (), True),
    ("kexec_file_load", (), False),
    ("io_uring_setup", (), False),
    ("userfaultfd", (), False),
])
def test_default_profile_answers(name: str, args: tuple[int, ...], allowed: bool) -> None:
    got = answer(seccomp.compile_profile(DEFAULT_SECCOMP), NATIVE, name, *args)
    assert got == (RET_ALLOW if allowed else RET_ERRNO | errno.EPERM)


def test_docker_includes_follow_the_capabilities() -> None:
    profile = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["getpid"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["reboot"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_BOOT"]}},
        {"names": ["getcwd"], "action": "SCMP_ACT_ALLOW", "excludes": {"caps": ["CAP_SYS_BOOT"]}},
        {"names": ["gettid"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "99.0"}}]}
    boot = 1 << caps.CAPABILITIES["CAP_SYS_BOOT"]
    with_boot = seccomp.compile_profile(profile, caps=boot)
    without = seccomp.compile_profile(profile, caps=0)
    assert answer(with_boot, NATIVE, "reboot") == RET_ALLOW
    assert answer(with_boot, NATIVE, "getcwd") == RET_ERRNO | errno.EPERM
    assert answer(without, NATIVE, "reboot") == RET_ERRNO | errno.EPERM
    assert answer(without, NATIVE, "getcwd") == RET_ALLOW
    assert answer(without, NATIVE, "gettid") == RET_ERRNO | errno.EPERM


# ---- faults: malformed profiles, bad masks, and the step that failed ------------------

_OK_RULE = {"names": ["getcwd"], "action": "SCMP_ACT_ERRNO"}
_NOTIFY = "SCMP_ACT_NOTIFY is not supported: the user-notification listener"


def _rule(**fields: Any) -> dict[str, Any]:
    return {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{**_OK_RULE, **fields}]}


def _arg(**fields: Any) -> dict[str, Any]:
    return _rule(args=[{"index": 0, "value": 1, "op": "SCMP_CMP_EQ", **fields}])


MALFORMED: list[tuple[object, str]] = [
    ("not json", "profile: not valid JSON (Expecting value at line 1 column 1)"),
    (b"\xff{}", "profile: not UTF-8 text (invalid start byte at byte 0)"),
    ([], "profile: must be an object, not an array"),
    ({}, "defaultAction: missing"),
    ({"defaultaction": "SCMP_ACT_ALLOW"}, 'profile: unknown field "defaultaction"'),
    ({"defaultAction": "SCMP_ACT_FOO"}, 'defaultAction: unknown action "SCMP_ACT_FOO"'),
    ({"defaultAction": "SCMP_ACT_NOTIFY"}, f"defaultAction: {_NOTIFY}"),
    ({"defaultAction": 0}, "defaultAction: must be a string, not a number"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 4096},
     "defaultErrnoRet: 4096 is out of range (0 to 4095)"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": "1"},
     "defaultErrnoRet: must be an integer, not a string"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": "SCMP_ARCH_X86_64"},
     "architectures: must be an array, not a string"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_FOO"]},
     'architectures[0]: unknown architecture "SCMP_ARCH_FOO"'),
    ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86"],
      "archMap": [{"architecture": "SCMP_ARCH_X86_64"}]},
     'archMap: both "architectures" and "archMap" are given: use one'),
    ({"defaultAction": "SCMP_ACT_ALLOW", "archMap": [{"subArchitectures": []}]},
     "archMap[0].architecture: missing"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_FOO"]},
     'flags[0]: unknown flag "SECCOMP_FILTER_FLAG_FOO"'),
    ({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/agent.sock"},
     "listenerPath: a seccomp agent is not supported: the user-notification listener of a "
     "container's processes is containerfs's own (its request_key() trap)"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": {}},
     "syscalls: must be an array, not an object"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": ["read"]},
     "syscalls[0]: must be an object, not a string"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"action": "SCMP_ACT_ERRNO"}]},
     "syscalls[0].names: missing"),
    (_rule(names=[]), "syscalls[0].names: empty: name at least one system call"),
    (_rule(names=[1]), "syscalls[0].names[0]: must be a string, not a number"),
    (_rule(names=[""]), "syscalls[0].names[0]: empty system call name"),
    (_rule(name="uname"), 'syscalls[0]: both "name" and "names" are given: use one'),
    (_rule(nmaes=["uname"]), 'syscalls[0]: unknown field "nmaes"'),
    (_rule(action=None), "syscalls[0].action: must be a string, not null"),
    (_rule(action="SCMP_ACT_NOTIFY"), f"syscalls[0].action: {_NOTIFY}"),
    (_rule(errnoRet=-1), "syscalls[0].errnoRet: -1 is out of range (0 to 4095)"),
    (_rule(args={}), "syscalls[0].args: must be an array, not an object"),
    (_arg(index=6), "syscalls[0].args[0].index: 6 is out of range (0 to 5)"),
    (_arg(op="SCMP_CMP_FOO"), 'syscalls[0].args[0].op: unknown operator "SCMP_CMP_FOO"'),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [_OK_RULE] * 3 + [
        {**_OK_RULE, "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_FOO"}]}]},
     'syscalls[3].args[0].op: unknown operator "SCMP_CMP_FOO"'),
    (_rule(args=[{"index": 0, "value": 1}]), "syscalls[0].args[0].op: missing"),
    (_arg(value=1 << 64),
     "syscalls[0].args[0].value: 18446744073709551616 is out of range (0 to 18446744073709551615)"),
    (_arg(valueTwo=True), "syscalls[0].args[0].valueTwo: must be an integer, not a boolean"),
    (_arg(valu=1), 'syscalls[0].args[0]: unknown field "valu"'),
    (_rule(includes={"caps": ["CAP_FOO"]}),
     'syscalls[0].includes.caps[0]: unknown capability "CAP_FOO"'),
    (_rule(excludes={"minKernel": "4"}),
     'syscalls[0].excludes.minKernel: "4" is not a kernel version like "4.8"'),
]


@pytest.mark.parametrize(("profile", "message"), MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_profiles_name_the_fault(profile: object, message: str) -> None:
    for check in (parse_profile, seccomp.compile_profile, check_profile):
        with pytest.raises(OSError) as info:
            check(profile)
        assert info.value.errno == errno.EINVAL
        assert info.value.strerror.startswith(message), (check.__name__, info.value.strerror)


@pytest.mark.parametrize("mask", [
    1 << (caps.cap_last_cap() + 1), DEFAULT_CAPS | 1 << 63, 1 << 64, -1, True, "0x1", None, 1.0])
def test_bad_masks_are_einval(mask: object) -> None:
    with pytest.raises(OSError) as info:
        caps.check_mask(mask)
    assert info.value.errno == errno.EINVAL


def test_a_fault_changes_nothing() -> None:
    """Everything is checked before the first change: a bad mask with a good profile, or a
    good mask with a bad profile, leaves the child as it was."""
    bad_mask = 1 << (caps.cap_last_cap() + 1)
    bad_profile = {"defaultAction": "SCMP_ACT_FOO"}

    def work() -> list[Any]:
        out: list[Any] = []
        for mask, profile in ((bad_mask, DEFAULT_SECCOMP), (DEFAULT_CAPS, bad_profile)):
            try:
                apply_confinement(mask, profile)
                out.append("applied")
            except OSError as e:
                out.append(e.errno)
        st = status_fields()
        return out + [st["CapBnd"], st["CapEff"], st["NoNewPrivs"], st["Seccomp"]]

    before = status_fields()
    out, _ = in_child(work)
    assert out == [errno.EINVAL, errno.EINVAL, before["CapBnd"], before["CapEff"], "0", "0"]


@pytest.mark.parametrize(("mask", "profile"), [
    # Without CAP_SETPCAP in the mask: the bounding set must be lowered before capset.
    (DEFAULT_CAPS & ~(1 << 8), DEFAULT_SECCOMP),
    (0, DEFAULT_SECCOMP),
    # A profile that refuses the calls the capability steps make: the filter must come last.
    (DEFAULT_CAPS, {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["capset", "prctl"], "action": "SCMP_ACT_ERRNO"}]}),
], ids=["no-setpcap", "no-caps", "profile-refuses-capset"])
def test_the_order_lets_each_step_work(mask: int, profile: dict[str, Any]) -> None:
    def work() -> list[int]:
        apply_confinement(mask, profile)
        st = status_fields()
        return [int(st[f], 16) for f in ("CapBnd", "CapPrm", "CapEff", "CapAmb")]

    out, _ = in_child(work)
    assert out == [mask, mask, mask, 0]


def test_a_failed_step_is_named() -> None:
    """Without CAP_SETPCAP the bounding set cannot be lowered: the error says so."""
    def work() -> list[Any]:
        eff, perm, inh = caps.get_caps()
        setpcap = 1 << caps.CAPABILITIES["CAP_SETPCAP"]
        # CAP_SETPCAP stays permitted but leaves the effective set.
        caps._capset(eff & ~setpcap, perm, inh)
        try:
            apply_confinement(DEFAULT_CAPS, DEFAULT_SECCOMP)
            return ["applied"]
        except OSError as e:
            return [e.errno, e.strerror, status_fields()["Seccomp"]]

    out, _ = in_child(work)
    assert out[0] == errno.EPERM
    assert out[1].startswith("confinement: bounding set: dropping CAP_DAC_READ_SEARCH"), out[1]
    assert out[2] == "0"  # the filter, last, was never installed
