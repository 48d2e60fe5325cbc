"""container_spawn's set-up as data: the ordered steps a new process runs between its clone
and its exec, and the compiled runner (cspawn.c, built by `python -m syscalls.build_cspawn`).

The order is that of fork_into_container's child (syscalls/container.py, childsetup.py,
keys.py, confine.py), so a spawned process ends up exactly as a forked one that execs:
  1. the container's session keyring, joined before any user namespace is entered (keyring
     names are looked up in the caller's user namespace);
  2. the container's namespaces (its user namespace first: it owns the rest), then its root;
  3. its cgroup2 group and its v1 groups (before anything of the caller's runs);
  4. the request_key() trap, its listener handed to the service on the fork's connection;
  5. umask 022;
  6. confinement, in runc's order (confine.py): no_new_privs, bounding set, capset, ambient
     set, the seccomp filter;
  7. the caller's own steps (file actions, session, ids, cwd, signals), then exec.
Its PID namespace is the one thing the parent does (setns/unshare of pid_for_children
affects children only): see syscalls/cspawn.py.
"""

from __future__ import annotations

import base64
import errno
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import caps as _caps
from . import linux, protocol
from .replies import ForkGrant
from .seccomp_notify import REQUEST_KEY_PROGRAM, SECCOMP_FILTER_FLAG_NEW_LISTENER

# The op numbers of cspawn.c's enum, in its order.
OPS: dict[str, int] = {name: n for n, name in enumerate((
    "setns", "fchdir", "chroot", "chdir", "write", "setfsuid", "keyjoin", "trap", "sendfd",
    "umask", "prctl", "capset", "seccomp", "dup2", "cloexec_from", "keep", "close", "setsid",
    "ioctl", "setgroups", "setgid", "setuid", "exec", "sigdfl", "sigmask", "fsopen", "fsconfig",
    "fsmount", "proc_place"), start=1)}

PR_SET_NO_NEW_PRIVS = 38


@dataclass(frozen=True)
class Step:
    """One step: `what` names it in an error ("joining the cgroup", "exec"); `ignore` is an
    errno that does not fail it (-1: every error does)."""
    op: str
    what: str
    a: int = 0
    b: int = 0
    data: bytes | None = None
    ignore: int = -1




def enters_userns(reply: ForkGrant, fds: Sequence[int]) -> bool:
    """Whether the grant's user namespace is another than this thread's."""
    return "ns:user" in reply.fds and not linux.same_file(
        fds[reply.fds.index("ns:user")], "/proc/thread-self/ns/user")


def eligible(reply: ForkGrant, fds: Sequence[int]) -> bool:
    """Whether the compiled path can make this process: not in a container with a user
    namespace of its own when it is init with a new PID namespace (only a process inside
    that user namespace can make one) or with procs to put in place (the kernel mounts a
    proc there only through a copy of a mount namespace where one is fully visible, which
    childsetup.py makes)."""
    return not ((reply.new_pid_ns or reply.proc_paths) and enters_userns(reply, fds))


def entry_steps(reply: ForkGrant, fds: Sequence[int], conn: int,
                cgroup_procs: int) -> list[Step]:
    """Steps 1-6 for the Fork grant `reply` with its `fds`; `conn` is the fork's connection,
    `cgroup_procs` an fd of the cgroup2 group's cgroup.procs (or -1)."""
    steps: list[Step] = []
    if reply.keyring:
        owner, serial = int(reply.keyring["owner"]), int(reply.keyring["serial"])
        # The keyring grants only its owner search (the right to join): root joins another
        # user's as that user, for this one call (keys.join_container_keyring).
        switch = os.geteuid() == 0 and owner != 0
        if switch:
            steps.append(Step("setfsuid", "joining the keyring", owner))
        steps.append(Step("keyjoin", "joining the keyring", serial,
                          data=str(reply.keyring["name"]).encode() + b"\0"))
        if switch:
            steps.append(Step("setfsuid", "joining the keyring", os.geteuid()))
    for name, fd in zip(reply.fds, fds):
        kind, _, nstype = name.partition(":")
        if kind == "ns" and nstype != "pid":
            if not linux.same_file(fd, f"/proc/thread-self/ns/{nstype}"):
                steps.append(Step("setns", f"entering its {nstype} namespace", fd,
                                  linux.NS_FLAGS[nstype]))
        elif kind == "root":
            steps += [Step("fchdir", "entering its root", fd),
                      Step("chroot", "entering its root", data=b".\0"),
                      Step("chdir", "entering its root", data=b"/\0")]
    if cgroup_procs >= 0:
        steps.append(Step("write", "joining its cgroup", cgroup_procs, data=b"0"))
    steps += [Step("write", "joining its cgroup v1 groups", fd, data=b"0")
              for name, fd in zip(reply.fds, fds) if name == "cgroup.v1"]
    if reply.keyring:
        # No error may stop the process here (keys.trap_request_key): without a listener a
        # trapped call fails with ENOSYS, never hangs; EBUSY is an outer trap in force.
        steps += [Step("trap", "trapping request_key", SECCOMP_FILTER_FLAG_NEW_LISTENER,
                       data=REQUEST_KEY_PROGRAM, ignore=errno.EBUSY),
                  Step("sendfd", "handing over the request_key listener", conn,
                       data=protocol.encode(protocol.KeyListener()), ignore=errno.EPIPE)]
    steps.append(Step("umask", "umask", 0o022))
    return steps + proc_steps(reply) + confinement_steps(reply, enters_userns(reply, fds))


def proc_steps(reply: ForkGrant) -> list[Step]:
    """Init's own procs in the place of the placeholders its creator mounted (as
    childsetup.child_setup does): made in its new PID namespace, then put in place."""
    steps: list[Step] = []
    ids = b"".join(int(e["mnt_id"]).to_bytes(8, "little") for e in reply.proc_paths)
    for entry in reply.proc_paths:
        what = f"mounting proc at {entry['path']}"
        steps.append(Step("fsopen", what, data=b"proc\0"))
        for cmd, key, value in entry["params"]:
            steps.append(Step("fsconfig", what, cmd, int(value is not None),
                              data=key.encode() + b"\0"
                              + (value.encode() + b"\0" if value is not None else b"")))
        path = entry["path"].encode() + b"\0"
        steps += [Step("fsmount", what, int(entry["attrs"])),
                  Step("proc_place", what, b=len(path), data=path + ids)]
    return steps


def confinement_steps(reply: ForkGrant, in_userns: bool = False) -> list[Step]:
    """Step 6, computed here from the capabilities the child will have by then: this
    thread's (it is cloned from this thread, as root), or with `in_userns` (it enters
    another user namespace) every capability there, as setns(2) gives them (bounding set
    included: the caller's own bounding set says nothing about the child's then)."""
    steps: list[Step] = []
    if reply.seccomp:
        steps.append(Step("prctl", "confinement: no_new_privs", PR_SET_NO_NEW_PRIVS, 1))
    if reply.caps is not None:
        mask = reply.caps
        every = (1 << (_caps.cap_last_cap() + 1)) - 1
        bounding = every if in_userns else _caps.bounding_set()
        steps += [Step("prctl", f"confinement: bounding set: dropping {_caps.name_of(n)}",
                       _caps.PR_CAPBSET_DROP, n)
                  for n in range(_caps.cap_last_cap() + 1)
                  if not mask >> n & 1 and bounding >> n & 1]
        # (setns into a user namespace: effective and permitted full, inheritable empty)
        effective, permitted, inheritable = (every, every, 0) if in_userns else _caps.get_caps()
        steps.append(Step("capset", "confinement: permitted, effective and inheritable sets",
                          data=_caps.capset_data(effective & mask, permitted & mask,
                                                 inheritable & mask)))
        steps.append(Step("prctl", "confinement: ambient set", _caps.PR_CAP_AMBIENT,
                          _caps.PR_CAP_AMBIENT_CLEAR_ALL, ignore=errno.EINVAL))
    if reply.seccomp:
        steps.append(Step("seccomp", "confinement: seccomp filter", reply.seccomp_flags,
                          data=base64.b64decode(reply.seccomp)))
    return steps


def caller_steps(path: bytes, env_path: bytes | None, *,
                 file_actions: Sequence[tuple[Any, ...]] = (), pass_fds: Sequence[int] = (),
                 close_fds: bool = True, setsid: bool = False, ctty: bool = False,
                 user: tuple[int, int] | None = None, groups: Sequence[int] | None = None,
                 cwd: bytes | None = None, sigdef: Sequence[int] = (),
                 sigmask: Sequence[int] | None = None, in_userns: bool = False) -> list[Step]:
    """Step 7: dup2/close file actions, fds closed at exec (all above 2 but `pass_fds`, with
    `close_fds`), a new session (and fd 0 its controlling terminal with `ctty`), ids, cwd,
    signals back to default and the mask (`sigmask`, else the caller's), then exec: `path` if it has a slash,
    else each directory of `env_path` (the command's PATH) in turn, as execvpe does."""
    steps: list[Step] = []
    for action in file_actions:
        if action[0] == os.POSIX_SPAWN_DUP2:
            steps.append(Step("dup2", f"dup2({action[1]}, {action[2]})", action[1], action[2]))
        elif action[0] == os.POSIX_SPAWN_CLOSE:
            steps.append(Step("close", f"close({action[1]})", action[1], ignore=errno.EBADF))
        else:
            raise OSError(errno.EINVAL, f"container_spawn: unsupported file action {action!r}")
    if close_fds:
        steps.append(Step("cloexec_from", "closing fds", 3))
        steps += [Step("keep", f"keeping fd {fd}", fd) for fd in pass_fds]
    if setsid:
        steps.append(Step("setsid", "setsid"))
    if ctty:
        import termios
        steps.append(Step("ioctl", "TIOCSCTTY", 0, termios.TIOCSCTTY))
    if user is not None:
        uid, gid = user
        # Denied to everyone in a user namespace an unprivileged owner made: nothing to drop.
        steps += [Step("setgroups", "setgroups", data=_gids(groups or []),
                       ignore=errno.EPERM if in_userns and not groups else -1),
                  Step("setgid", "setgid", gid), Step("setuid", "setuid", uid)]
    if cwd is not None:
        steps.append(Step("chdir", "chdir", data=cwd + b"\0"))
    steps += [Step("sigdfl", f"resetting {signal.Signals(sig).name}", sig) for sig in sigdef]
    # b=1: the caller's own mask, known only once it has blocked every signal (see cspawn.py).
    steps.append(Step("sigmask", "setting the signal mask",
                      sum(1 << (sig - 1) for sig in sigmask or ()), b=int(sigmask is None)))
    if b"/" in path:
        return steps + [Step("exec", "exec", data=path + b"\0")]
    dirs = (env_path if env_path is not None else os.defpath.encode()).split(b":")
    return steps + [Step("exec", "exec", data=os.path.join(d or b".", path) + b"\0")
                    for d in dirs]


def _gids(gids: Sequence[int]) -> bytes:
    return b"".join(int(g).to_bytes(4, "little") for g in gids)
