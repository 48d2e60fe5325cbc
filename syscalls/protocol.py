"""The wire protocol between `syscalls` and the service: plain data, no I/O.

One message is one SOCK_SEQPACKET datagram holding a JSON object; fds travel beside it as
SCM_RIGHTS. A request names its `op`; each op is a frozen dataclass whose fields are checked on
decode, so a malformed datagram becomes a ProtocolError, never a crash.

Every str field becomes a C string (a name, a path, a key type or description) or is a
keyword, so a decoded one is promised to hold no NUL and to encode as UTF-8 with
surrogateescape: bytes that are not UTF-8 travel as the lone surrogates U+DC80..U+DCFF, which
give back those bytes; any other lone surrogate (JSON "\ud800") names no bytes at all.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

from . import replies
from .replies import ProtocolError as ProtocolError  # one error for requests and replies
from .replies import Reply

MAX_MESSAGE = 65536
MAX_FDS = 16


@dataclasses.dataclass(frozen=True)
class Request:
    op: ClassVar[str] = ""
    # How many fds must come with the request.
    nfds: ClassVar[int] = 0
    # Sent without waiting: the service never replies, not even with an error.
    one_way: ClassVar[bool] = False
    # The reply it gets (replies.py), unless an error.
    answer: ClassVar[type[Reply]] = Reply


@dataclasses.dataclass(frozen=True)
class Create(Request):
    """container_create(name, flags). Reply: handle fd, id. With `plan` (root only), also
    what the first fork will be told to enter ("plan", a Fork reply for init, and its fds
    after the handle's), so that fork can make the process before its reply is back."""
    op: ClassVar[str] = "create"
    answer: ClassVar[type[Reply]] = replies.Created
    name: str  # UTF-8 with surrogateescape, so any bytes survive JSON
    flags: int
    plan: int = 0


@dataclasses.dataclass(frozen=True)
class Fork(Request):
    """Sent by fork_into_container's intermediate with the handle. Reply: role, ns fds.
    `keep`: the report will be one way (StartedNoReply), so the service must keep this
    connection where a crash cannot lose it. `planned`: the caller holds the plan create
    sent on this connection, and takes ForkGrant.as_planned to mean "that one" (and
    ForkGrant.plan_fds "its fds, with this reply")."""
    op: ClassVar[str] = "fork"
    answer: ClassVar[type[Reply]] = replies.ForkGrant
    nfds: ClassVar[int] = 1
    keep: int = 0
    planned: int = 0


@dataclasses.dataclass(frozen=True)
class Started(Request):
    """The process was made; its pidfd comes along. Reply: its pid, once recorded."""
    op: ClassVar[str] = "started"
    answer: ClassVar[type[Reply]] = replies.Reported
    nfds: ClassVar[int] = 1
    pid: int


@dataclasses.dataclass(frozen=True)
class StartedNoReply(Started):
    """Started, one way: the caller goes on at once. Safe against a crash of the service
    because the service hands the fork's connection to the keeper before it replies to Fork,
    so this message waits in that socket for a restarted service."""
    op: ClassVar[str] = "started_noreply"
    one_way: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class ForkFailed(Request):
    """The process could not be made; `errno` says why. One way: no reply."""
    op: ClassVar[str] = "fork_failed"
    one_way: ClassVar[bool] = True
    errno: int


@dataclasses.dataclass(frozen=True)
class Status(Request):
    """The container behind the handle. Reply: its public fields."""
    op: ClassVar[str] = "status"
    answer: ClassVar[type[Reply]] = replies.ContainerStatus
    nfds: ClassVar[int] = 1


@dataclasses.dataclass(frozen=True)
class Kill(Request):
    """Kill a container, named by handle (nfds=1) or by id (owner or root only)."""
    op: ClassVar[str] = "kill"
    id: int = 0


@dataclasses.dataclass(frozen=True)
class List(Request):
    """The containers the caller may see, with ids above `after`, a page at a time. Reply:
    rows, and `more` if there are more after the last."""
    op: ClassVar[str] = "list"
    answer: ClassVar[type[Reply]] = replies.ContainerList
    after: int = 0


@dataclasses.dataclass(frozen=True)
class NetNs(Request):
    """container_socket: the container's network (and own user) namespace. Reply: ns fds."""
    op: ClassVar[str] = "netns"
    answer: ClassVar[type[Reply]] = replies.NamespaceFds
    nfds: ClassVar[int] = 1


@dataclasses.dataclass(frozen=True)
class Root(Request):
    """The container's root directory, an O_PATH fd, for *at() calls. Reply: the fd."""
    op: ClassVar[str] = "root"
    nfds: ClassVar[int] = 1


@dataclasses.dataclass(frozen=True)
class SetRoot(Request):
    """move_mount(..., MOVE_MOUNT_T_CONTAINER_ROOT): fds are the handle and the mount."""
    op: ClassVar[str] = "set_root"
    nfds: ClassVar[int] = 2


@dataclasses.dataclass(frozen=True)
class MountAt(Request):
    """move_mount into the container at `path` (from its root); fds: handle, mount.

    `proc`: the mount is a placeholder (an empty read-only tmpfs) for a proc of the
    container's PID namespace, which init makes as it starts, with the fsconfig parameters
    `params` (JSON: [[cmd, key, value or null], ...], cmd FSCONFIG_SET_FLAG or _STRING) and
    the fsmount attributes `attrs`, and puts in the placeholder's stead. Reply: {"pid_born":
    1}, and nothing mounted, if init exists already (the caller then makes the proc now)."""
    op: ClassVar[str] = "mount_at"
    answer: ClassVar[type[Reply]] = replies.Mounted
    nfds: ClassVar[int] = 2
    path: str
    proc: int = 0
    attrs: int = 0
    params: str = "[]"


@dataclasses.dataclass(frozen=True)
class FsNamespaces(Request):
    """FSCONFIG_SET_CONTAINER: the user, network and PID namespaces a superblock belongs in."""
    op: ClassVar[str] = "fs_namespaces"
    answer: ClassVar[type[Reply]] = replies.NamespaceFds
    nfds: ClassVar[int] = 1


@dataclasses.dataclass(frozen=True)
class Open(Request):
    """A new handle for container `id` (its owner or root only: the command line's way in)."""
    op: ClassVar[str] = "open"
    id: int


# ---- resource control (section 10) ----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SetLimit(Request):
    """container_set_limit: limit `name` (cgroup v2 name) to `value` (v2 syntax)."""
    op: ClassVar[str] = "set_limit"
    nfds: ClassVar[int] = 1
    name: str
    value: str


@dataclasses.dataclass(frozen=True)
class GetLimit(Request):
    """container_get_limit. Reply: the value in v2 syntax."""
    op: ClassVar[str] = "get_limit"
    nfds: ClassVar[int] = 1
    answer: ClassVar[type[Reply]] = replies.LimitValue
    name: str


@dataclasses.dataclass(frozen=True)
class Stats(Request):
    """container_stats. Reply: usage with v2 names and meanings."""
    op: ClassVar[str] = "stats"
    nfds: ClassVar[int] = 1
    answer: ClassVar[type[Reply]] = replies.Usage


@dataclasses.dataclass(frozen=True)
class Freeze(Request):
    """container_freeze (`frozen` 1) or container_thaw (0); a freeze is answered once every
    member is frozen."""
    op: ClassVar[str] = "freeze"
    nfds: ClassVar[int] = 1
    frozen: int


# ---- confinement (section 11) -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SetCaps(Request):
    """container_set_caps: the capability mask of every process forked in."""
    op: ClassVar[str] = "set_caps"
    nfds: ClassVar[int] = 1
    caps: int


@dataclasses.dataclass(frozen=True)
class SetSeccomp(Request):
    """container_set_seccomp: an OCI seccomp profile, as JSON text."""
    op: ClassVar[str] = "set_seccomp"
    nfds: ClassVar[int] = 1
    profile: str


# ---- process ids in context (section 12) -------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PidNs(Request):
    """translate_pid: the container's PID namespace (any holder). Reply: one ns fd, "pid";
    ESRCH if it has none yet (NEW_PID_NS before init) or is dead."""
    op: ClassVar[str] = "pidns"
    answer: ClassVar[type[Reply]] = replies.NamespaceFds
    nfds: ClassVar[int] = 1


@dataclasses.dataclass(frozen=True)
class Pids(Request):
    """container_pids: the living processes as [pid as the caller sees it, pid inside]."""
    op: ClassVar[str] = "pids"
    answer: ClassVar[type[Reply]] = replies.PidList
    nfds: ClassVar[int] = 1


REQUESTS: dict[str, type[Request]] = {
    cls.op: cls for cls in (Create, Fork, Started, StartedNoReply, ForkFailed, Status, Kill,
                             List, NetNs)
}
REQUESTS.update({cls.op: cls for cls in (Root, SetRoot, MountAt, FsNamespaces, Open)})
REQUESTS.update({cls.op: cls for cls in (SetLimit, GetLimit, Stats, Freeze)})
REQUESTS.update({cls.op: cls for cls in (SetCaps, SetSeccomp)})
REQUESTS.update({cls.op: cls for cls in (PidNs, Pids)})
# ---- keyrings (section 7) --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class KeyListener(Request):
    """A process forked into a container hands over its request_key() seccomp listener.
    One way: sent beside a fork's own messages, so it must never get a reply."""
    op: ClassVar[str] = "key_listener"
    nfds: ClassVar[int] = 1
    one_way: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class KeyringStage(Request):
    """keyctl_set_container_keyring, step 1. Reply: `stage`, a keyring the caller may link
    its keyring into (the link is made with the caller's own permissions)."""
    op: ClassVar[str] = "keyring_stage"
    answer: ClassVar[type[Reply]] = replies.Staged
    nfds: ClassVar[int] = 1


@dataclasses.dataclass(frozen=True)
class KeyringAttach(Request):
    """keyctl_set_container_keyring, step 2: attach `keyring`, linked into the stage."""
    op: ClassVar[str] = "keyring_attach"
    nfds: ClassVar[int] = 1
    keyring: int


@dataclasses.dataclass(frozen=True)
class KeyIntercept(Request):
    """Add a trap for `type`. Reply: `record_keyring` (0 without `dest`). With `bind`, the
    trap lives as long as this connection, which then carries {"event": "request"} messages
    and nothing else."""
    op: ClassVar[str] = "key_intercept"
    answer: ClassVar[type[Reply]] = replies.Intercepting
    nfds: ClassVar[int] = 1
    type: str
    dest: int = 0
    timeout_ms: int = 10000
    bind: int = 0


@dataclasses.dataclass(frozen=True)
class KeyUnintercept(Request):
    """Remove the trap for `type` (every trap with `all`). Reply: `removed`."""
    op: ClassVar[str] = "key_unintercept"
    answer: ClassVar[type[Reply]] = replies.Removed
    nfds: ClassVar[int] = 1
    type: str = ""
    all: int = 0


@dataclasses.dataclass(frozen=True)
class KeyListen(Request):
    """Make this connection carry the requests of the container's unbound traps."""
    op: ClassVar[str] = "key_listen"
    nfds: ClassVar[int] = 1


@dataclasses.dataclass(frozen=True)
class KeyAnswer(Request):
    """Answer request `rid`: `action` instantiate (base64 `payload`), negate or reject
    (`errno`); `timeout_ms` caches a negation. Reply: `serial` for instantiate."""
    op: ClassVar[str] = "key_answer"
    answer: ClassVar[type[Reply]] = replies.Instantiated
    nfds: ClassVar[int] = 1
    rid: int
    action: str
    payload: str = ""
    errno: int = 0
    timeout_ms: int = 0


KEY_REQUESTS: tuple[type[Request], ...] = (
    KeyListener, KeyringStage, KeyringAttach, KeyIntercept, KeyUnintercept, KeyListen, KeyAnswer)
REQUESTS.update({cls.op: cls for cls in KEY_REQUESTS})
_FIELD_TYPES: dict[str, type] = {"int": int, "str": str}


def encode(msg: Request | Reply) -> bytes:
    """Encode a request or a reply (replies.py) as one datagram."""
    if isinstance(msg, Request):
        body = {"op": msg.op, **replies.plain(msg)}
    else:
        body = replies.to_json(msg)
    data = json.dumps(body, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return data


def _load(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError("message is not a JSON object")
    return body


def decode_request(data: bytes) -> Request:
    """Decode and check one request datagram; raise ProtocolError if it is not one."""
    body = _load(data)
    op = body.pop("op", None)
    cls = REQUESTS.get(op) if isinstance(op, str) else None
    if cls is None:
        raise ProtocolError("unknown or missing op")
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        want = _FIELD_TYPES[str(field.type)]
        if field.name not in body:
            if field.default is dataclasses.MISSING:
                raise ProtocolError(f"{cls.op}: missing field {field.name}")
            continue
        value = body.pop(field.name)
        if type(value) is not want:
            raise ProtocolError(f"{cls.op}: field {field.name} must be {want.__name__}")
        if isinstance(value, str):
            _check_text(cls.op, field.name, value)
        kwargs[field.name] = value
    if body:
        raise ProtocolError(f"{cls.op}: unknown fields {sorted(body)}")
    return cls(**kwargs)


def _check_text(op: str, name: str, value: str) -> None:
    """ProtocolError unless `value` can become a C string (see the module's docstring)."""
    try:
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:
        raise ProtocolError(f"{op}: field {name} holds a lone surrogate at index {e.start}, "
                            "which stands for no bytes; send UTF-8 text (other bytes as "
                            "surrogateescape escapes them)") from None
    if "\0" in value:
        raise ProtocolError(f"{op}: field {name} holds a NUL at index {value.index(chr(0))}, "
                            "which a C string cannot")


def decode_reply(data: bytes) -> dict[str, Any]:
    """A reply datagram as its raw JSON object, for tests and tools that speak the protocol
    by hand (programs decode typed replies: replies.decode)."""
    return _load(data)


def error_reply(err: int, message: str) -> replies.ErrorReply:
    return replies.ErrorReply(err, message)


# ---- the kernel's own key requests (the request-key.d rule's handler) --------------------

@dataclasses.dataclass(frozen=True)
class KeyUpcall(Request):
    """From the handler our request-key.d rule names (root, in no container): the kernel
    constructs key `key` for a process whose session keyring is `session`.

    Reply: {"host": 1} (not a container's trapped request: the host's rules answer it), an
    answer at once, or {"queued": timeout_ms} and, later on the same connection, the answer:
    {"action": "instantiate", "payload": base64} or {"action": "reject", "errno": n,
    "timeout_ms": t}. After an instantiate the handler sends KeyUpcallDone."""
    op: ClassVar[str] = "key_upcall"
    answer: ClassVar[type[Reply]] = replies.UpcallReply
    key: int
    type: str
    description: str
    callout_info: str
    uid: int
    gid: int
    session: int


@dataclasses.dataclass(frozen=True)
class KeyUpcallDone(Request):
    """The handler instantiated the key (`errno` 0) or could not (the kernel's errno).
    Only valid on a KeyUpcall's connection, after its instantiate answer."""
    op: ClassVar[str] = "key_upcall_done"
    errno: int


KEY_REQUESTS = KEY_REQUESTS + (KeyUpcall, KeyUpcallDone)
REQUESTS.update({cls.op: cls for cls in (KeyUpcall, KeyUpcallDone)})
