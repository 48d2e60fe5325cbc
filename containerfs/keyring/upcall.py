"""The kernel's own request_key() upcall (/sbin/request-key): does it run here, and the
request-key.d rule that hands the kernel's requests for trapped types to the service.

The kernel runs its usermode helper in the init namespaces; on some hosts the helper is
missing or cannot run, and request_key() of an unknown key fails with ENOKEY at once. The
seccomp interception of section 7 does not depend on it (it traps the call before the kernel
searches), but two things do: what an *untrapped* request gets, and the requests the kernel
makes itself in a container process's name (a network filesystem's, say), which only the
upcall sees. `Rules` is the service's rule file for those; `upcall_handler` is what it runs.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import select
import shutil
import sys
from collections.abc import Iterable

from syscalls import keys

log = logging.getLogger("containerfs")

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


# ---- the request-key.d rule ----------------------------------------------------------------

RULES_DIR = "/etc/request-key.d"
RULES_DIR_ENV = "CONTAINERFS_REQUEST_KEY_DIR"  # tests may point the rule file elsewhere
RULE_PREFIX = "containerfs-"
HANDLER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "upcall_handler.py")
# What request-key substitutes for the handler: the key under construction, what was asked,
# the key's owner (the requester's fsuid/fsgid) and the requester's three keyrings.
MACROS = ("%k", "%t", "%d", "%c", "%u", "%g", "%T", "%P", "%S")


def rules_path(runtime_dir: str, rules_dir: str | None = None) -> str:
    """The rule file of the service whose state is in `runtime_dir`: one per service, so
    that two services (test runs beside a real one) never overwrite each other's."""
    where = rules_dir or os.environ.get(RULES_DIR_ENV) or RULES_DIR
    tag = hashlib.sha256(os.path.abspath(runtime_dir).encode()).hexdigest()[:16]
    return os.path.join(where, f"{RULE_PREFIX}{tag}.conf")


def _usable(word: str) -> bool:
    # request-key splits a line at white space and reads a leading '%' as a macro.
    return bool(word) and not any(c.isspace() for c in word) and not word.startswith("%")


class Rules:
    """One service's rule file: `create <type> * *` per trapped type, naming our handler.

    Written atomically (temporary file, then rename); absent when nothing is trapped. Rule
    files of services whose runtime directory is gone are removed on start."""

    def __init__(self, runtime_dir: str, rules_dir: str | None = None) -> None:
        self.runtime_dir = os.path.abspath(runtime_dir)
        self.path = rules_path(runtime_dir, rules_dir)
        self.socket = ""  # the control socket the handler asks (the daemon sets it)
        self._content: str | None = None
        self._sweep_stale()

    def _header(self) -> str:
        return f"# containerfs runtime={self.runtime_dir} socket={self.socket}\n"

    def _sweep_stale(self) -> None:
        where = os.path.dirname(self.path)
        try:
            names = os.listdir(where)
        except OSError:
            return
        for name in names:
            if not (name.startswith(RULE_PREFIX) and name.endswith(".conf")):
                continue
            path = os.path.join(where, name)
            try:
                with open(path) as f:
                    head = f.readline().split()
            except OSError:
                continue
            runtime = next((w[8:] for w in head if w.startswith("runtime=")), "")
            # Ours is made right by the first write(), from the traps recovered.
            if (path != self.path and head[:2] == ["#", "containerfs"] and runtime
                    and not os.path.isdir(runtime)):
                self._remove(path)

    def write(self, key_types: Iterable[str]) -> None:
        """Make the file say exactly `key_types` ("*": any type); no types, no file."""
        types = sorted({t for t in key_types if _usable(t) and (t == "*" or "*" not in t)
                        and not t.startswith(".")})  # the kernel constructs no "." keys
        command = [sys.executable, "-I", HANDLER, self.socket, self.path]
        if types and not all(_usable(w) for w in command):
            log.warning("no request-key.d rule: a path has white space in it (%s)", command)
            types = []
        if not types:
            if self._content is not None or os.path.exists(self.path):
                self._remove(self.path)
            self._content = None
            return
        line = " ".join(command + list(MACROS))
        content = self._header() + "".join(f"create {t} * * {line}\n" for t in types)
        if content == self._content:
            return
        tmp = os.path.join(os.path.dirname(self.path), f".{os.path.basename(self.path)}.tmp")
        # request-key reads only *.conf names that do not start with a dot: the temporary
        # file is never read half written.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(content)
            os.rename(tmp, self.path)
        except BaseException:
            self._remove(tmp)
            raise
        self._content = content

    def remove(self) -> None:
        """The service stops: its rule goes (a restarted service writes it again)."""
        self._remove(self.path)
        self._content = None

    @staticmethod
    def _remove(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("could not remove the request-key rule %s: %s", path, e)
