"""The service's replies and events on the wire: frozen dataclasses, decoded and checked field
by field without I/O, like the requests (protocol.py). A reply is a JSON object; which class it
is follows from the request it answers (`Request.answer`), or from the exchange it belongs to.

An error is its own reply: exactly {"errno", "message"}, whatever was asked.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar, Union

R = TypeVar("R", bound="Reply")


class ProtocolError(ValueError):
    """The bytes are not a message of this protocol."""


@dataclasses.dataclass(frozen=True)
class Reply:
    """A reply with nothing to say but "done" (fds may come beside it)."""


@dataclasses.dataclass(frozen=True)
class ErrorReply(Reply):
    errno: int
    message: str


@dataclasses.dataclass(frozen=True)
class ForkGrant(Reply):
    """What a forking process enters, in order (`fds` names the fds beside the reply), and
    what the new process does first."""
    role: str  # "init" or "member"
    fds: list[str]
    id: int
    new_pid_ns: bool = False
    # Procs init puts in place of placeholders: {"path", "mnt_id", "params", "attrs"}.
    proc_paths: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # The container's session keyring: {"name", "serial", "owner"}; None without one.
    keyring: dict[str, Any] | None = None
    # Confinement the new process applies last: a capability mask (None: unchanged), a
    # seccomp program (base64 of struct sock_filter[]; "" for none) and its filter flags.
    caps: int | None = None
    seccomp: str = ""
    seccomp_flags: int = 0
    # The plan create sent holds, fds and all (Fork.planned): then nothing else is filled in
    # and no fds come.
    as_planned: bool = False
    # The plan's fds hold, the rest of it is this reply (a proc placeholder mounted since,
    # say): `fds` names the plan's, and none come.
    plan_fds: bool = False


@dataclasses.dataclass(frozen=True)
class Created(Reply):
    """container_create: the handle comes beside it (then the plan's fds, if any)."""
    id: int
    plan: ForkGrant | None = None


@dataclasses.dataclass(frozen=True)
class Reported(Reply):
    pid: int


@dataclasses.dataclass(frozen=True)
class ContainerStatus(Reply):
    id: int
    name: str
    flags: int
    owner: int
    group: int
    parent: int
    state: str
    init_pid: int | None
    exit_status: int | None
    members: list[int]
    user_ns: bool
    frozen: bool = False


@dataclasses.dataclass(frozen=True)
class LimitValue(Reply):
    value: str


@dataclasses.dataclass(frozen=True)
class Usage(Reply):
    """container_stats: {name: value} with cgroup v2 names and meanings."""
    stats: dict[str, int]


@dataclasses.dataclass(frozen=True)
class ContainerList(Reply):
    containers: list[ContainerStatus]
    more: bool = False  # a page: ask again with `after` the last id


@dataclasses.dataclass(frozen=True)
class NamespaceFds(Reply):
    """Namespace fds lent beside the reply, named in order; `pid_pending`: the PID namespace
    is not born yet (no init)."""
    fds: list[str]
    pid_pending: bool = False


@dataclasses.dataclass(frozen=True)
class PidList(Reply):
    """container_pids: [pid as the caller sees it, pid inside the container], init first."""
    pids: list[list[int]]


@dataclasses.dataclass(frozen=True)
class Mounted(Reply):
    """MountAt: `pid_born` says a proc placeholder was not mounted, init being born."""
    pid_born: bool = False


@dataclasses.dataclass(frozen=True)
class Staged(Reply):
    stage: int


@dataclasses.dataclass(frozen=True)
class Intercepting(Reply):
    record_keyring: int


@dataclasses.dataclass(frozen=True)
class Removed(Reply):
    removed: int


@dataclasses.dataclass(frozen=True)
class Instantiated(Reply):
    serial: int = 0  # 0: the answer was not an instantiate


@dataclasses.dataclass(frozen=True)
class KeyRequest(Reply):
    """An event on a manager's channel: a request_key() that waits for its answer."""
    event: str  # "request"
    rid: int
    container: int
    operation: str
    type: str
    description: str
    callout_info: str
    uid: int
    gid: int
    pid: int


@dataclasses.dataclass(frozen=True)
class UpcallReply(Reply):
    """To our request-key handler: the host's business (`host`), queued for `queued` ms, or
    an answer (`action` instantiate with `payload`, or reject with `reject_errno` for
    `timeout_ms`)."""
    host: bool = False
    queued: int = 0
    action: str = ""
    payload: str = ""
    reject_errno: int = 0
    timeout_ms: int = 0


# ---- encoding and decoding ----------------------------------------------------------------

def to_json(msg: Reply) -> dict[str, Any]:
    """The JSON object of a reply (shares its dicts and leaves with `msg`: read, never
    change it)."""
    body: dict[str, Any] = plain(msg)
    return body


def plain(value: Any) -> Any:
    """Dataclasses (nested in lists too) as dicts, everything else as it is: what
    dataclasses.asdict gives for JSON, without its deep copy of every value (a fifth of
    the service's encoding time)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def encode(msg: Reply) -> bytes:
    return json.dumps(to_json(msg), separators=(",", ":")).encode()


def decode(data: bytes, cls: type[R]) -> R | ErrorReply:
    """Decode a datagram as a `cls` (or the error reply it is); ProtocolError if it is not."""
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"not JSON: {e}") from None
    if isinstance(body, dict) and body.keys() == {"errno", "message"}:
        return _build(ErrorReply, body)
    return _build(cls, body)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The resolved field types of `cls` (annotations are strings here), once per class."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _build(cls: type[R], body: Any) -> R:
    if not isinstance(body, dict):
        raise ProtocolError(f"{cls.__name__}: not a JSON object")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name not in body:
            if (field.default is dataclasses.MISSING
                    and field.default_factory is dataclasses.MISSING):
                raise ProtocolError(f"{cls.__name__}: missing field {field.name}")
            continue
        kwargs[field.name] = _check(body[field.name], hints[field.name],
                                    f"{cls.__name__}.{field.name}")
    extra = body.keys() - kwargs.keys()
    if extra:
        raise ProtocolError(f"{cls.__name__}: unknown fields {sorted(extra)}")
    return cls(**kwargs)


def _check(value: Any, tp: Any, where: str) -> Any:
    """`value` if it is of type `tp` (nested replies built); ProtocolError otherwise."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _check(value, inner, where)
    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError(f"{where} must be a list")
        (item,) = typing.get_args(tp)
        return [_check(v, item, f"{where}[]") for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where} must be an object")
        _keys, item = typing.get_args(tp)
        return {k: _check(v, item, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Reply):
        return _build(tp, value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ProtocolError(f"{where} must be {getattr(tp, '__name__', tp)}")
