"""Kernel keys: add_key, request_key, keyctl, the seccomp trap on request_key, and the
proposal's two keyring calls (contract section 7).

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
from dataclasses import dataclass
from typing import Any

from . import _linux, protocol
from . import container as _container  # a cycle: used at call time only
from ._client import Connection, call

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
    return _linux.syscall("keyctl", ctypes.c_int(op), *(_arg(a) for a in args))


def add_key(key_type: str, description: str, payload: bytes | None, keyring: int) -> int:
    """add_key(2): create or update a key in `keyring`; return its serial."""
    return _linux.syscall("add_key", _encode(key_type), _encode(description), payload,
                          ctypes.c_size_t(len(payload) if payload is not None else 0),
                          ctypes.c_int(keyring))


def request_key(key_type: str, description: str, callout_info: str | bytes | None = None,
                dest_keyring: int = 0) -> int:
    """request_key(2): find (or have constructed) a key; return its serial."""
    callout = _encode(callout_info) if callout_info is not None else None
    return _linux.syscall("request_key", _encode(key_type), _encode(description), callout,
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
    return _linux.syscall("setfsuid", ctypes.c_int(uid))


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

def join_container_keyring(reply: dict[str, Any]) -> None:
    """Make the container's session keyring (named in the service's Fork reply) the calling
    process's own.

    Called by fork_into_container before the process enters the container's user namespace
    (keyring names are looked up in the caller's user namespace). The keyring belongs to the
    container's owner and grants only its owner search (the right to join it): root forking
    into another user's container joins with that user's fsuid, for this one call.
    """
    info = reply.get("keyring")
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


def enter_container(conn: Connection, reply: dict[str, Any], *, join: bool) -> None:
    """In a process just forked into a container, before the caller's code runs in it: join
    the container's session keyring (`join`: the intermediate did it otherwise), then trap
    request_key() and hand the listener to the service over the fork's open connection."""
    if not reply.get("keyring"):
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


# ---- seccomp: trapping request_key() --------------------------------------------------

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
PR_SET_NO_NEW_PRIVS = 38

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_AARCH64 = 0xC00000B7
AUDIT_ARCH_ARM = 0x40000028
_X32_SYSCALL_BIT = 0x40000000

# request_key's number in every ABI a process on these machines can call it through. A 64-bit
# process can still make a 32-bit call (int 0x80 on x86_64), so every entry is in every filter.
REQUEST_KEY_NRS: dict[int, tuple[int, ...]] = {
    AUDIT_ARCH_X86_64: (249, _X32_SYSCALL_BIT | 249),
    AUDIT_ARCH_I386: (287,),
    AUDIT_ARCH_AARCH64: (218,),
    AUDIT_ARCH_ARM: (310,),
}

_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_RET_K = 0x06
_DATA_NR, _DATA_ARCH = 0, 4  # offsets in struct seccomp_data


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def request_key_filter() -> list[tuple[int, int, int, int]]:
    """The BPF program: USER_NOTIF for request_key in any known ABI, ALLOW for the rest."""
    prog: list[tuple[int, int, int, int]] = [(_BPF_LD_W_ABS, 0, 0, _DATA_ARCH)]
    jumps: list[tuple[int, int]] = []  # (index, which) of jumps to the USER_NOTIF return
    for arch, nrs in REQUEST_KEY_NRS.items():
        block_len = 1 + len(nrs) + 1  # load nr, compare each, return allow
        prog.append((_BPF_JEQ_K, 0, block_len, arch))  # not this arch: skip its block
        prog.append((_BPF_LD_W_ABS, 0, 0, _DATA_NR))
        for nr in nrs:
            jumps.append((len(prog), 0))
            prog.append((_BPF_JEQ_K, 0, 0, nr))
        prog.append((_BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    prog.append((_BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))  # an ABI not listed
    notif = len(prog)
    prog.append((_BPF_RET_K, 0, 0, SECCOMP_RET_USER_NOTIF))
    for index, _ in jumps:
        code, _jt, jf, k = prog[index]
        prog[index] = (code, notif - index - 1, jf, k)
    return prog


_FILTER = (_SockFilter * len(request_key_filter()))(*(
    _SockFilter(code, jt, jf, k) for code, jt, jf, k in request_key_filter()))
_FPROG = _SockFprog(len(_FILTER), ctypes.cast(_FILTER, ctypes.POINTER(_SockFilter)))


def install_request_key_filter() -> int:
    """Trap this thread's (and its future children's) request_key(); return the listener fd.

    Installing a filter needs CAP_SYS_ADMIN in the current user namespace or no_new_privs: a
    process without the capability gets no_new_privs set first (setuid programs it runs
    afterwards no longer gain privileges). EBUSY: a filter with a listener is already installed.
    """
    def install() -> int:
        return _linux.syscall("seccomp", ctypes.c_uint(SECCOMP_SET_MODE_FILTER),
                              ctypes.c_uint(SECCOMP_FILTER_FLAG_NEW_LISTENER),
                              ctypes.byref(_FPROG))
    try:
        return install()
    except PermissionError:
        _linux.prctl(PR_SET_NO_NEW_PRIVS, 1)
        return install()


class SeccompData(ctypes.Structure):
    _fields_ = [("nr", ctypes.c_int), ("arch", ctypes.c_uint32),
                ("instruction_pointer", ctypes.c_uint64), ("args", ctypes.c_uint64 * 6)]


class _SeccompNotif(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("pid", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("data", SeccompData)]


class _SeccompNotifResp(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("val", ctypes.c_int64), ("error", ctypes.c_int32),
                ("flags", ctypes.c_uint32)]


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (ord("!") << 8) | nr


SECCOMP_IOCTL_NOTIF_RECV = _iowr(0, ctypes.sizeof(_SeccompNotif))
SECCOMP_IOCTL_NOTIF_SEND = _iowr(1, ctypes.sizeof(_SeccompNotifResp))
SECCOMP_IOCTL_NOTIF_ID_VALID = (1 << 30) | (8 << 16) | (ord("!") << 8) | 2


@dataclass(frozen=True)
class Notification:
    """One trapped system call: its cookie, the caller's pid (as the listener's holder sees
    it), the ABI and the raw arguments."""
    id: int
    pid: int
    arch: int
    nr: int
    args: tuple[int, ...]


def _ioctl(fd: int, request: int, arg: Any) -> int:
    while True:
        res = _linux._libc.ioctl(ctypes.c_int(fd), ctypes.c_ulong(request), arg)
        if res >= 0:
            return int(res)
        err = ctypes.get_errno()
        if err != errno.EINTR:
            _linux._raise(err, "ioctl(seccomp listener)")


def is_listener(fd: int) -> bool:
    """Whether `fd` is a seccomp listener (EBADF if it is no open fd)."""
    return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:seccomp notify"


def notif_recv(listener: int) -> Notification | None:
    """The next trapped call (call when the listener is readable); None if it vanished."""
    n = _SeccompNotif()
    try:
        _ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, ctypes.byref(n))
    except FileNotFoundError:  # the caller was killed between poll and receive
        return None
    return Notification(n.id, n.pid, n.data.arch, n.data.nr, tuple(n.data.args))


def notif_id_valid(listener: int, notif_id: int) -> bool:
    """Whether the trapped call is still waiting (its process alive, its pid not reused)."""
    cookie = ctypes.c_uint64(notif_id)
    try:
        _ioctl(listener, SECCOMP_IOCTL_NOTIF_ID_VALID, ctypes.byref(cookie))
    except FileNotFoundError:
        return False
    return True


def notif_send(listener: int, notif_id: int, *, val: int = 0, error: int = 0,
               continue_: bool = False) -> bool:
    """Answer a trapped call: a return value, -errno, or let the kernel carry on with it.

    False if the call is no longer waiting (its process died)."""
    resp = _SeccompNotifResp(notif_id, val, -error if error else 0,
                             SECCOMP_USER_NOTIF_FLAG_CONTINUE if continue_ else 0)
    try:
        _ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, ctypes.byref(resp))
    except (FileNotFoundError, ProcessLookupError):
        return False
    return True


def read_cstring(mem_fd: int, addr: int, limit: int) -> bytes | None:
    """The NUL-terminated string at `addr` in the process whose /proc/PID/mem is `mem_fd`.

    None if it is longer than `limit` bytes; OSError (EFAULT, EIO) if it cannot be read.
    """
    out = b""
    page = os.sysconf("SC_PAGE_SIZE")
    while len(out) <= limit:
        chunk_len = page - (addr % page)  # never read across a page that may not exist
        try:
            chunk = os.pread(mem_fd, chunk_len, addr)
        except OSError as e:
            raise OSError(errno.EFAULT, f"unreadable string at {addr:#x}") from e
        if not chunk:
            raise OSError(errno.EFAULT, f"unreadable string at {addr:#x}")
        end = chunk.find(b"\0")
        if end >= 0:
            out += chunk[:end]
            return out if len(out) <= limit else None
        out += chunk
        addr += len(chunk)
    return None


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
    _container.check_handle(cfd)
    serial = _probe_keyring(keyring, "search")
    with Connection() as conn:
        reply, _ = conn.call(protocol.KeyringStage(), [cfd])
        # The link is made here, with the caller's permission to link its keyring; the service
        # then takes it from the staging keyring it gave us, and nothing else.
        link(serial, int(reply["stage"]))
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
    _container.check_handle(cfd)
    if ns_id != 0:
        raise OSError(errno.EINVAL, "ns_id must be 0: namespace filters are not supported")
    if dest_keyring == 0:
        if key_type is not None:
            check_type(key_type)
        reply, _ = call(protocol.KeyUnintercept(
            type=key_type if key_type is not None else "", all=int(key_type is None)), [cfd])
        return int(reply["removed"])
    if key_type is None:
        raise OSError(errno.EINVAL, "a trap needs a key type (\"*\" for any)")
    check_type(key_type)
    if not timeout > 0:
        raise OSError(errno.EINVAL, "the answer timeout must be positive")
    dest = _probe_keyring(dest_keyring, "write")
    with Connection() as conn:
        reply, _ = conn.call(protocol.KeyIntercept(
            type=key_type, dest=dest, timeout_ms=max(1, round(timeout * 1000)), bind=0), [cfd])
        _link_records(conn, cfd, key_type, int(reply["record_keyring"]), dest)
    return 0


def open_intercept(cfd: int, key_type: str | None, *, timeout: float = DEFAULT_INTERCEPT_TIMEOUT,
                   dest_keyring: int = 0) -> Connection:
    """A connection that receives the container's trapped requests (our extension).

    With `key_type`, a trap for it is added and lives as long as the connection; without,
    the connection receives the requests of the traps keyctl_container_intercept() added.
    The connection's socket is readable while a request waits; see containerfs.keyring.
    """
    _container.check_handle(cfd)
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
                link(int(reply["record_keyring"]), dest)
    except BaseException:
        conn.close()
        raise
    return conn
