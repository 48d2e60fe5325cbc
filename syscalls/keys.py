"""Kernel keys: add_key, request_key, keyctl, handing the request_key() trap to the service,
and the proposal's two keyring calls (contract section 7). The trap itself (seccomp user
notification) is in `seccomp_notify`.

The raw wrappers raise `OSError(errno, strerror)` exactly as the kernel answers. The container
calls (`keyctl_set_container_keyring`, `keyctl_container_intercept`) do in the caller's own
process every step that needs the caller's key permissions (linking the caller's keyrings), and
ask the service only for what the kernel would have done itself.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from typing import Any

from . import linux, protocol, replies
from .client import Connection, call
from .handle import check_handle
from .replies import ForkGrant
from .seccomp_notify import install_request_key_filter

# Special keyring ids (linux/keyctl.h).
KEY_SPEC_THREAD_KEYRING = -1
KEY_SPEC_PROCESS_KEYRING = -2
KEY_SPEC_SESSION_KEYRING = -3
KEY_SPEC_USER_KEYRING = -4
KEY_SPEC_USER_SESSION_KEYRING = -5
KEY_SPEC_REQKEY_AUTH_KEY = -7  # the authorisation key of the key under construction

KEYCTL_GET_KEYRING_ID = 0
KEYCTL_JOIN_SESSION_KEYRING = 1
KEYCTL_REVOKE = 3
KEYCTL_CHOWN = 4
KEYCTL_SETPERM = 5
KEYCTL_DESCRIBE = 6
KEYCTL_CLEAR = 7
KEYCTL_LINK = 8
KEYCTL_UNLINK = 9
KEYCTL_SEARCH = 10
KEYCTL_READ = 11
KEYCTL_INSTANTIATE = 12
KEYCTL_NEGATE = 13
KEYCTL_ASSUME_AUTHORITY = 16
KEYCTL_REJECT = 19
KEYCTL_INVALIDATE = 21

# Permission bits: one byte each for possessor, user, group and other.
KEY_VIEW, KEY_READ, KEY_WRITE, KEY_SEARCH, KEY_LINK, KEY_SETATTR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
KEY_ALL = 0x3F
KEY_POS_SHIFT, KEY_USR_SHIFT, KEY_GRP_SHIFT, KEY_OTH_SHIFT = 24, 16, 8, 0

# The longest type name the kernel takes (char type[32], NUL included), the longest
# description and callout string request_key() copies in.
KEY_TYPE_MAX = 31
KEY_DESC_MAX = 4095
CALLOUT_MAX = 4095

DEFAULT_INTERCEPT_TIMEOUT = 10.0  # seconds an intercepted request waits for an answer


def _arg(value: Any) -> Any:
    """A keyctl argument: ints as C longs (the kernel truncates serials to int32)."""
    if isinstance(value, int):
        return ctypes.c_long(value)
    return value


def keyctl(op: int, *args: Any) -> int:
    """keyctl(2) with up to four arguments (ints, bytes or ctypes buffers)."""
    return linux.syscall("keyctl", ctypes.c_int(op), *(_arg(a) for a in args))


def add_key(key_type: str, description: str, payload: bytes | None, keyring: int) -> int:
    """add_key(2): create or update a key in `keyring`; return its serial."""
    return linux.syscall("add_key", _encode(key_type), _encode(description), payload,
                          ctypes.c_size_t(len(payload) if payload is not None else 0),
                          ctypes.c_int(keyring))


def request_key(key_type: str, description: str, callout_info: str | bytes | None = None,
                dest_keyring: int = 0) -> int:
    """request_key(2): find (or have constructed) a key; return its serial."""
    callout = _encode(callout_info) if callout_info is not None else None
    return linux.syscall("request_key", _encode(key_type), _encode(description), callout,
                          ctypes.c_int(dest_keyring))


def _encode(s: str | bytes) -> bytes:
    return s if isinstance(s, bytes) else s.encode("utf-8", "surrogateescape")


def get_keyring_id(keyring: int, create: bool = False) -> int:
    """The serial of `keyring` (resolving the special ids); ENOKEY if it does not exist."""
    return keyctl(KEYCTL_GET_KEYRING_ID, keyring, int(create))


def join_session_keyring(name: str | None) -> int:
    """Join (or create) the named session keyring; None makes a new anonymous one."""
    return keyctl(KEYCTL_JOIN_SESSION_KEYRING, _encode(name) if name is not None else None)


def describe(key: int) -> tuple[str, int, int, int, str]:
    """(type, uid, gid, perm, description) of `key`."""
    buf = ctypes.create_string_buffer(KEY_DESC_MAX + 128)
    keyctl(KEYCTL_DESCRIBE, key, buf, ctypes.sizeof(buf))
    ktype, uid, gid, perm, desc = buf.value.decode("utf-8", "surrogateescape").split(";", 4)
    return ktype, int(uid), int(gid), int(perm, 16), desc


def read(key: int) -> bytes:
    """The payload of `key` (for a keyring: its links, as native 32-bit serials)."""
    size = 256
    while True:
        buf = ctypes.create_string_buffer(size)
        n = keyctl(KEYCTL_READ, key, buf, size)
        if n <= size:
            return buf.raw[:n]
        size = n


def keyring_contents(keyring: int) -> list[int]:
    data = read(keyring)
    return list(struct.unpack(f"={len(data) // 4}i", data))


def search(keyring: int, key_type: str, description: str, dest_keyring: int = 0) -> int:
    """KEYCTL_SEARCH: find a key in `keyring` (recursively); ENOKEY when there is none."""
    return keyctl(KEYCTL_SEARCH, keyring, _encode(key_type), _encode(description), dest_keyring)


def link(key: int, keyring: int) -> None:
    keyctl(KEYCTL_LINK, key, keyring)


def unlink(key: int, keyring: int) -> None:
    keyctl(KEYCTL_UNLINK, key, keyring)


def setperm(key: int, perm: int) -> None:
    keyctl(KEYCTL_SETPERM, key, perm)


def chown(key: int, uid: int, gid: int) -> None:
    keyctl(KEYCTL_CHOWN, key, uid, gid)


def invalidate(key: int) -> None:
    keyctl(KEYCTL_INVALIDATE, key)


# ---- constructing a key (what a request-key handler does) -------------------------------

def assume_authority(key: int) -> None:
    """KEYCTL_ASSUME_AUTHORITY: act for the kernel on key `key` under construction (the
    calling thread must possess its authorisation key; 0 gives the authority up)."""
    keyctl(KEYCTL_ASSUME_AUTHORITY, key)


def instantiate(key: int, payload: bytes, keyring: int = 0) -> None:
    """KEYCTL_INSTANTIATE: give the key under construction its payload (and link it into
    `keyring` too, unless 0); its requester's request_key() then returns it."""
    keyctl(KEYCTL_INSTANTIATE, key, payload, len(payload), keyring)


def negate(key: int, timeout_s: int, keyring: int = 0) -> None:
    """KEYCTL_NEGATE: the key under construction becomes a negative key (ENOKEY) for
    `timeout_s` seconds."""
    keyctl(KEYCTL_NEGATE, key, timeout_s, keyring)


def reject(key: int, timeout_s: int, error: int, keyring: int = 0) -> None:
    """KEYCTL_REJECT: like negate, but requesters get `error`."""
    keyctl(KEYCTL_REJECT, key, timeout_s, error, keyring)


def setfsuid(uid: int) -> int:
    """setfsuid(2) for the calling thread; returns the previous fsuid."""
    return linux.syscall("setfsuid", ctypes.c_int(uid))


def check_type(key_type: str) -> None:
    """EINVAL for a key type name the kernel would not take, or one that is not UTF-8 text
    (every type the kernel knows is plain ASCII; a trap's type is written as text in the
    request-key.d rule file)."""
    try:
        raw = key_type.encode() if isinstance(key_type, str) else b""
    except UnicodeEncodeError:
        raw = b""
    if not raw or b"\0" in raw or len(raw) > KEY_TYPE_MAX:
        raise OSError(errno.EINVAL, f"invalid key type name {key_type!r}")


# ---- entering a container's keyring (fork_into_container) ------------------------------

def join_container_keyring(reply: ForkGrant) -> None:
    """Make the container's session keyring (named in the service's Fork reply) the calling
    process's own.

    Called by fork_into_container before the process enters the container's user namespace
    (keyring names are looked up in the caller's user namespace). The keyring belongs to the
    container's owner and grants only its owner search (the right to join it): root forking
    into another user's container joins with that user's fsuid, for this one call.
    """
    info = reply.keyring
    if not info:
        return
    name, serial, owner = str(info["name"]), int(info["serial"]), int(info["owner"])
    switch = os.geteuid() == 0 and owner != 0
    old = setfsuid(owner) if switch else -1
    try:
        joined = join_session_keyring(name)
    finally:
        if switch:
            setfsuid(old)
    if joined != serial:
        # Another user namespace than the service's: the name made a new, private keyring.
        # Keep it (nothing of the caller's is in it) and reach the container's through it.
        try:
            link(serial, joined)
        except OSError:
            pass


def enter_container(conn: Connection, reply: ForkGrant, *, join: bool) -> None:
    """In a process just forked into a container, before the caller's code runs in it: join
    the container's session keyring (`join`: the intermediate did it otherwise), then trap
    request_key() and hand the listener to the service over the fork's open connection."""
    if not reply.keyring:
        return
    if join:
        try:
            join_container_keyring(reply)
        except OSError as e:
            # Never run on in the caller's keyrings: a fresh, empty session keyring at least.
            try:
                join_session_keyring(None)
            except OSError:
                os.write(2, f"fork_into_container: joining the container's keyring: {e}\n"
                         .encode())
                os._exit(127)
    trap_request_key(conn)


def trap_request_key(conn: Connection) -> None:
    """In a process just forked into a container: trap its request_key() calls and hand the
    listener to the service over `conn`, the fork's still-open connection.

    A filter with a listener already in the chain (a container forked from inside another)
    gives EBUSY: the outer listener, held by the same service, traps this process already.
    No error may stop the child: without a listener a trapped call fails with ENOSYS, never
    hangs."""
    try:
        fd = install_request_key_filter()
    except OSError:
        return
    try:
        conn.send(protocol.KeyListener(), [fd])
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- the proposal's calls -------------------------------------------------------------

def _probe_keyring(keyring: int, need: str) -> int:
    """Resolve `keyring` (special ids too) and check, in this process, the permission the
    call needs: "search" (KEYCTL_SEARCH of a name nobody uses) or "write" (linking the keyring
    into itself, which the kernel refuses as a cycle only after checking write and link)."""
    if not isinstance(keyring, int) or isinstance(keyring, bool) or keyring == 0:
        raise OSError(errno.EINVAL, f"invalid keyring {keyring!r}")
    serial = get_keyring_id(keyring)
    if need == "search":
        try:
            search(serial, "keyring", "containerfs:probe\x01")
        except OSError as e:
            if e.errno != errno.ENOKEY:  # searched, and nothing found: search is allowed
                raise
    else:
        try:
            link(serial, serial)
        except OSError as e:
            if e.errno != errno.EDEADLK:
                raise
        else:  # pragma: no cover - the kernel never links a keyring into itself
            unlink(serial, serial)
    return serial


def keyctl_set_container_keyring(cfd: int, keyring: int) -> None:
    """Attach `keyring` to the container: request_key() inside finds its keys after the
    process's own keyrings. Once per container (EBUSY); members may not (EPERM)."""
    check_handle(cfd)
    serial = _probe_keyring(keyring, "search")
    with Connection() as conn:
        reply, _ = conn.call(protocol.KeyringStage(), [cfd])
        # The link is made here, with the caller's permission to link its keyring; the service
        # then takes it from the staging keyring it gave us, and nothing else.
        link(serial, reply.stage)
        conn.call(protocol.KeyringAttach(keyring=serial), [cfd])


def _link_records(conn: Connection, cfd: int, key_type: str, record_ring: int,
                  dest: int) -> None:
    try:
        link(record_ring, dest)
    except BaseException:
        conn.call(protocol.KeyUnintercept(type=key_type), [cfd])
        raise


def keyctl_container_intercept(cfd: int, key_type: str | None, ns_id: int, dest_keyring: int,
                               *, timeout: float = DEFAULT_INTERCEPT_TIMEOUT) -> int:
    """Trap request_key() calls made in the container for keys of `key_type` ("*": any) that
    are not found; or, with `dest_keyring` 0, remove the trap (every trap for None) and return
    how many were removed.

    A trapped request waits for an answer from `containerfs.keyring.listen()` (or
    `intercept()`), at most `timeout` seconds (then ENOKEY). A record of each waiting request is
    linked, inside a keyring of the service's, into `dest_keyring`, which the caller must be
    able to write. EEXIST for a second trap of one type; EINVAL for a non-zero `ns_id`.
    """
    check_handle(cfd)
    if ns_id != 0:
        raise OSError(errno.EINVAL, "ns_id must be 0: namespace filters are not supported")
    if dest_keyring == 0:
        if key_type is not None:
            check_type(key_type)
        reply: replies.Removed = call(protocol.KeyUnintercept(
            type=key_type if key_type is not None else "", all=int(key_type is None)), [cfd])[0]
        return reply.removed
    if key_type is None:
        raise OSError(errno.EINVAL, "a trap needs a key type (\"*\" for any)")
    check_type(key_type)
    if not timeout > 0:
        raise OSError(errno.EINVAL, "the answer timeout must be positive")
    dest = _probe_keyring(dest_keyring, "write")
    with Connection() as conn:
        trap: replies.Intercepting = conn.call(protocol.KeyIntercept(
            type=key_type, dest=dest, timeout_ms=max(1, round(timeout * 1000)), bind=0), [cfd])[0]
        _link_records(conn, cfd, key_type, trap.record_keyring, dest)
    return 0


def open_intercept(cfd: int, key_type: str | None, *, timeout: float = DEFAULT_INTERCEPT_TIMEOUT,
                   dest_keyring: int = 0) -> Connection:
    """A connection that receives the container's trapped requests (our extension).

    With `key_type`, a trap for it is added and lives as long as the connection; without,
    the connection receives the requests of the traps keyctl_container_intercept() added.
    The connection's socket is readable while a request waits; see containerfs.keyring.
    """
    check_handle(cfd)
    if key_type is not None:
        check_type(key_type)
    if not timeout > 0:
        raise OSError(errno.EINVAL, "the answer timeout must be positive")
    dest = _probe_keyring(dest_keyring, "write") if dest_keyring else 0
    conn = Connection()
    try:
        if key_type is None:
            conn.call(protocol.KeyListen(), [cfd])
        else:
            reply, _ = conn.call(protocol.KeyIntercept(
                type=key_type, dest=dest, timeout_ms=max(1, round(timeout * 1000)), bind=1),
                [cfd])
            if dest:
                # The trap is this connection's: closing it on failure removes it.
                link(reply.record_keyring, dest)
    except BaseException:
        conn.close()
        raise
    return conn
