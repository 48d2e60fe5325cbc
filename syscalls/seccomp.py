"""Seccomp filters compiled by libseccomp, and loaded with seccomp(2).

libseccomp (libseccomp.so.2, the library runc, crun, Podman and Docker use) is reached through
ctypes like every other C call of this layer. It is used only to compile: `compile_profile`
turns an OCI profile into the BPF program the kernel takes (plain bytes, so the service can
compile a profile once and a forked child loads it with one system call, no library call
after fork), and `load` installs it with our own seccomp(2) call, so the flags are ours to
pass: SECCOMP_FILTER_FLAG_NEW_LISTENER included.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from dataclasses import dataclass

from . import linux
from .caps import CAPABILITIES, bounding_set, check_mask
from .seccomp_profile import (ARCHITECTURES, FLAGS, Arg, Profile, Rule, abis, parse_profile,
                              selected_rules)

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
BPF_MAXINSNS = 4096  # the kernel refuses longer programs
_INSN = 8  # sizeof(struct sock_filter)

_ACTION_VALUES = {
    "SCMP_ACT_KILL": 0x00000000, "SCMP_ACT_KILL_THREAD": 0x00000000,
    "SCMP_ACT_KILL_PROCESS": 0x80000000, "SCMP_ACT_TRAP": 0x00030000,
    "SCMP_ACT_ERRNO": 0x00050000, "SCMP_ACT_TRACE": 0x7FF00000,
    "SCMP_ACT_LOG": 0x7FFC0000, "SCMP_ACT_ALLOW": 0x7FFF0000,
}
_OP_VALUES = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4,
              "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}
_SCMP_FLTATR_CTL_OPTIMIZE = 8  # libseccomp 2.5+: 2 = a binary tree of syscall numbers
_NR_SCMP_ERROR = -1


@dataclass(frozen=True)
class SeccompFilter:
    """A compiled filter: `program` is the struct sock_filter array the kernel takes,
    `flags` the SECCOMP_FILTER_FLAG_* the profile asked for, `skipped` the system call names
    that libseccomp does not know (their rules were left out, as runc leaves them)."""
    program: bytes
    flags: int = 0
    skipped: tuple[str, ...] = ()


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


@functools.cache
def _lib() -> ctypes.CDLL:
    """libseccomp, opened at first use (importing this module needs no library)."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        raise OSError(errno.EOPNOTSUPP, "libseccomp.so.2 is not installed (Debian: "
                      "libseccomp2); seccomp profiles cannot be compiled") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.restype = None
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_arch_native.restype = ctypes.c_uint32
    lib.seccomp_arch_native.argtypes = []
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_arch_add.restype = ctypes.c_int
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_attr_set.restype = ctypes.c_int
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name_arch.restype = ctypes.c_int
    lib.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
    lib.seccomp_rule_add_array.restype = ctypes.c_int
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    lib.seccomp_export_bpf.restype = ctypes.c_int
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def _arch_token(oci_name: str) -> int:
    """libseccomp's token for an OCI architecture name; 0 if this libseccomp lacks it."""
    return int(_lib().seccomp_arch_resolve_name(
        oci_name.removeprefix("SCMP_ARCH_").lower().encode()))


@functools.cache
def native_arch() -> str:
    """The OCI name of this process's own ABI (SCMP_ARCH_X86_64 here)."""
    native = int(_lib().seccomp_arch_native())
    for name in ARCHITECTURES:
        if _arch_token(name) == native:
            return name
    raise OSError(errno.EOPNOTSUPP, f"libseccomp's native architecture {native:#x} has no "
                  "OCI name")


def syscall_number(name: str, arch: str | None = None) -> int | None:
    """The number of system call `name` in ABI `arch` (an OCI name; default: ours), as
    libseccomp knows it; None if it does not (or the ABI has no such call)."""
    lib = _lib()
    if arch is None:
        nr = int(lib.seccomp_syscall_resolve_name(name.encode()))
    else:
        nr = int(lib.seccomp_syscall_resolve_name_arch(_arch_token(arch), name.encode()))
    return nr if nr >= 0 else None


def _action(name: str, errno_ret: int | None) -> int:
    value = _ACTION_VALUES[name]
    if name in ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE"):
        # runc's defaults: EPERM for ERRNO; for TRACE the number is the tracer's message, and
        # without a tracer the kernel fails the call with ENOSYS.
        value |= errno.EPERM if errno_ret is None else errno_ret
    return value


def _conditions(args: tuple[Arg, ...]) -> list[list[Arg]]:
    """The libseccomp rules for one entry: all its conditions ANDed in one rule, or, when
    two compare the same argument (which libseccomp refuses in one rule), one rule per
    condition (ORed), as runc does."""
    indexes = [a.index for a in args]
    if len(set(indexes)) == len(indexes):
        return [list(args)]
    return [[a] for a in args]


def _kernel_version() -> tuple[int, int]:
    parts = os.uname().release.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def _add_rule(ctx: int, rule: Rule, action: int, skipped: list[str]) -> None:
    lib = _lib()
    for name in rule.names:
        nr = int(lib.seccomp_syscall_resolve_name(name.encode()))
        if nr == _NR_SCMP_ERROR:
            skipped.append(name)
            continue
        for conds in _conditions(rule.args):
            array = (_ArgCmp * max(len(conds), 1))(
                *[_ArgCmp(a.index, _OP_VALUES[a.op], a.value, a.value_two) for a in conds])
            rc = int(lib.seccomp_rule_add_array(ctx, action, nr, len(conds), array))
            if rc < 0:
                raise OSError(errno.EINVAL, f'{rule.where}: libseccomp refused the rule for '
                              f'"{name}" ({os.strerror(-rc)})')


def compile_profile(profile: object, *, caps: int | None = None) -> SeccompFilter:
    """Compile an OCI seccomp profile (dict, JSON text or bytes, or a parsed Profile).

    `caps` is the bounding set the filtered process will have (None: this process's); it
    decides Docker-style `includes.caps`/`excludes.caps`. OSError(EINVAL) names the fault
    of a malformed profile; EOPNOTSUPP if libseccomp is missing. Nothing is installed."""
    parsed: Profile = parse_profile(profile)
    bounding = bounding_set() if caps is None else check_mask(caps)
    cap_names = frozenset(name for name, n in CAPABILITIES.items() if bounding >> n & 1)
    lib = _lib()
    native = native_arch()
    rules = selected_rules(parsed, native, cap_names, _kernel_version())
    default = _action(parsed.default_action, parsed.default_errno)
    ctx = lib.seccomp_init(default)
    if not ctx:
        raise OSError(errno.EINVAL, f"defaultAction: libseccomp refused "
                      f"{parsed.default_action} on this kernel")
    skipped: list[str] = []
    try:
        for arch in abis(parsed, native):
            token = _arch_token(arch)
            # An ABI this libseccomp does not know, or of the other byte order (EDOM), is
            # one no process here can call the kernel through: nothing to filter.
            rc = int(lib.seccomp_arch_add(ctx, token)) if token else -errno.EDOM
            if rc < 0 and rc not in (-errno.EEXIST, -errno.EDOM):
                raise OSError(errno.EINVAL, f"architectures: libseccomp refused {arch} "
                              f"({os.strerror(-rc)})")
        if len(rules) > 32:
            # Long allowlists: a binary search on the number instead of one comparison per
            # allowed call (runc does the same past 32 rules; not for none: 2.5.4 misbehaves).
            lib.seccomp_attr_set(ctx, _SCMP_FLTATR_CTL_OPTIMIZE, 2)
        for rule in rules:
            action = _action(rule.action, rule.errno_ret)
            if action != default:  # libseccomp refuses a rule that says what the default says
                _add_rule(ctx, rule, action, skipped)
        program = _export(ctx)
    finally:
        lib.seccomp_release(ctx)
    if len(program) // _INSN > BPF_MAXINSNS:
        raise OSError(errno.EINVAL, f"the profile compiles to {len(program) // _INSN} BPF "
                      f"instructions; the kernel takes at most {BPF_MAXINSNS}")
    flags = 0
    for name in parsed.flags:
        flags |= FLAGS[name]
    return SeccompFilter(program, flags, tuple(dict.fromkeys(skipped)))


def _export(ctx: int) -> bytes:
    """The BPF program of `ctx` (libseccomp 2.5 exports only to an fd: a memfd here)."""
    fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
    try:
        rc = int(_lib().seccomp_export_bpf(ctx, fd))
        if rc < 0:
            raise OSError(-rc, f"seccomp_export_bpf: {os.strerror(-rc)}")
        size = os.fstat(fd).st_size
        out = b""
        while len(out) < size:
            chunk = os.pread(fd, size - len(out), len(out))
            if not chunk:
                break
            out += chunk
        return out
    finally:
        os.close(fd)


def set_no_new_privs() -> None:
    """PR_SET_NO_NEW_PRIVS for the calling thread (and all it forks and execs): execve
    never grants privileges again (setuid bits and file capabilities are ignored)."""
    linux.prctl(PR_SET_NO_NEW_PRIVS, 1)


def load(filt: SeccompFilter | bytes, flags: int = 0) -> int:
    """Install a compiled filter on the calling thread, no_new_privs set first; return the
    listener fd when `flags` has SECCOMP_FILTER_FLAG_NEW_LISTENER, else 0.

    `flags` is added to the filter's own. Filters stack: every installed filter runs on every
    call and the strictest answer wins, whatever the order they were installed in."""
    if isinstance(filt, SeccompFilter):
        program, flags = filt.program, flags | filt.flags
    else:
        program = bytes(filt)
    count = len(program) // _INSN
    if not program or len(program) % _INSN or count > BPF_MAXINSNS:
        raise OSError(errno.EINVAL, f"not a BPF program: {len(program)} bytes")
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(count, ctypes.cast(buf, ctypes.c_void_p))
    # Without CAP_SYS_ADMIN the kernel refuses a filter unless no_new_privs is set; with it,
    # the contract wants it set anyway (a filtered process must not exec into privileges).
    set_no_new_privs()
    return linux.syscall("seccomp", ctypes.c_uint(SECCOMP_SET_MODE_FILTER), ctypes.c_uint(flags),
                         ctypes.byref(prog))
