"""Does the kernel's own request_key() upcall (/sbin/request-key) run on this host?

The kernel runs its usermode helper in the init namespaces; on some hosts the helper is
missing or cannot run, and request_key() of an unknown key fails with ENOKEY at once. The
interception of section 7 does not depend on it (seccomp traps the call before the kernel
searches), but what an *untrapped* request gets does: tests and docs ask here.
"""

from __future__ import annotations

import errno
import os
import select
import shutil

from syscalls import keys

HELPER = "/sbin/request-key"
CONFIG = ("/etc/request-key.conf", "/etc/request-key.d")


def _has_debug_rule() -> bool:
    paths = [CONFIG[0]]
    if os.path.isdir(CONFIG[1]):
        paths += [os.path.join(CONFIG[1], n) for n in sorted(os.listdir(CONFIG[1]))]
    for path in paths:
        try:
            with open(path) as f:
                for line in f:
                    fields = line.split()
                    if fields[:3] == ["create", "user", "debug:*"] and fields[3] == "*":
                        return True
        except (OSError, IndexError):
            continue
    return False


def probe_upcall(timeout: float = 10.0) -> str | None:
    """None if the upcall works (keyutils' `debug:*` rule answers a request); otherwise
    the probed reason why not."""
    if not os.path.exists(HELPER):
        return f"{HELPER} is not installed (keyutils)"
    if not _has_debug_rule() or shutil.which("keyctl") is None:
        return "no keyutils `create user debug:* *` rule to probe the upcall with"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a fresh session keyring: the probe key must not land in the caller's
        code = 3
        try:
            os.close(r)
            keys.join_session_keyring(None)
            serial = keys.request_key("user", f"debug:containerfs-probe-{os.getpid()}", "probe",
                                      keys.KEY_SPEC_SESSION_KEYRING)
            code = 0 if keys.read(serial) == b"Debug probe" else 2
        except OSError as e:
            code = 1 if e.errno == errno.ENOKEY else 2
        finally:
            os._exit(code)
    os.close(w)
    try:
        ready = select.select([r], [], [], timeout)[0]
    finally:
        os.close(r)
    if not ready:
        os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return None
    if code == 1:
        return f"request_key() got ENOKEY at once: the kernel could not run {HELPER}"
    return f"the upcall probe failed (exit {code})"
