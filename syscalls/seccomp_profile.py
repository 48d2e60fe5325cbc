"""OCI seccomp profiles, parsed and checked without side effects.

The format is the one runc takes in config.json (`defaultAction`, `defaultErrnoRet`,
`architectures`, `flags`, `syscalls: [{names, action, errnoRet, args}]`), with what Docker and
Podman add in their profile files (`archMap`, `comment`, `name`, `includes`/`excludes`), so a
profile written for any of them loads as it is. Every fault is OSError(EINVAL) whose message
names the field, e.g. `syscalls[3].args[0].op: unknown operator "SCMP_CMP_FOO"`: the service
checks a profile when it is set, long before a child compiles it, and the caller must be told
what to fix. Compiling is syscalls/seccomp.py's work; this module only reads.
"""

from __future__ import annotations

import errno
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .caps import CAPABILITIES

# Actions as runc names them. SCMP_ACT_KILL is libseccomp's old name for KILL_THREAD.
ACTIONS = ("SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_TRAP",
           "SCMP_ACT_ERRNO", "SCMP_ACT_TRACE", "SCMP_ACT_ALLOW", "SCMP_ACT_LOG")
# Actions whose 16 bits of data errnoRet sets (an errno; a tracer's message for TRACE).
ACTIONS_WITH_ERRNO = ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE")
# The kernel allows one listener per filter chain, and ours traps request_key() in every
# container process: a second one could not be installed, and no agent would be there to
# answer it anyway.
_NOTIFY_REFUSED = ("not supported: the user-notification listener of a container's "
                   "processes is containerfs's own (its request_key() trap)")

OPERATORS = ("SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE",
             "SCMP_CMP_GT", "SCMP_CMP_MASKED_EQ")

# OCI architecture names and Docker's names for the same ABIs (what `includes.arches` and
# `excludes.arches` compare against: Go's names, as Docker prints them).
ARCHITECTURES: dict[str, str] = {
    "SCMP_ARCH_X86": "x86", "SCMP_ARCH_X86_64": "amd64", "SCMP_ARCH_X32": "x32",
    "SCMP_ARCH_ARM": "arm", "SCMP_ARCH_AARCH64": "arm64",
    "SCMP_ARCH_MIPS": "mips", "SCMP_ARCH_MIPS64": "mips64", "SCMP_ARCH_MIPS64N32": "mips64n32",
    "SCMP_ARCH_MIPSEL": "mipsle", "SCMP_ARCH_MIPSEL64": "mipsel64",
    "SCMP_ARCH_MIPSEL64N32": "mips3l64n32",
    "SCMP_ARCH_PPC": "ppc", "SCMP_ARCH_PPC64": "ppc64", "SCMP_ARCH_PPC64LE": "ppc64le",
    "SCMP_ARCH_S390": "s390", "SCMP_ARCH_S390X": "s390x", "SCMP_ARCH_RISCV64": "riscv64",
    "SCMP_ARCH_LOONGARCH64": "loong64",
}

# seccomp(2) filter flags a profile may ask for. TSYNC is accepted and ignored, as runc does:
# the process a profile is loaded in has one thread.
FLAGS: dict[str, int] = {
    "SECCOMP_FILTER_FLAG_TSYNC": 0,
    "SECCOMP_FILTER_FLAG_LOG": 1 << 1,
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 1 << 2,
}
# runc's default when a profile names no flags at all: a filtered process is not slowed by
# the speculative-store-bypass mitigation the kernel would otherwise force on it.
DEFAULT_FLAGS: tuple[str, ...] = ("SECCOMP_FILTER_FLAG_SPEC_ALLOW",)

ERRNO_MAX = 4095  # the kernel caps SECCOMP_RET_ERRNO's data there
ARGS_MAX = 6
_U64_MAX = (1 << 64) - 1

_TOP_FIELDS = frozenset({"defaultAction", "defaultErrnoRet", "architectures", "archMap",
                         "flags", "syscalls", "listenerPath", "listenerMetadata", "comment"})
_RULE_FIELDS = frozenset({"names", "name", "action", "errnoRet", "args", "comment",
                          "includes", "excludes"})
_ARG_FIELDS = frozenset({"index", "value", "valueTwo", "op"})
_COND_FIELDS = frozenset({"arches", "caps", "minKernel"})


@dataclass(frozen=True)
class Arg:
    """One argument condition: `op` compares argument `index` with `value` (for
    SCMP_CMP_MASKED_EQ: `(arg & value) == value_two`)."""
    index: int
    op: str
    value: int
    value_two: int


@dataclass(frozen=True)
class When:
    """Docker's `includes`/`excludes`: native ABIs (Docker's names), capabilities in the
    container's bounding set, a kernel version (major, minor)."""
    arches: tuple[str, ...] = ()
    caps: tuple[str, ...] = ()
    min_kernel: tuple[int, int] | None = None


@dataclass(frozen=True)
class Rule:
    """One entry of `syscalls`; `where` is its place in the profile, for messages."""
    where: str
    names: tuple[str, ...]
    action: str
    errno_ret: int | None
    args: tuple[Arg, ...]
    includes: When = When()
    excludes: When = When()


@dataclass(frozen=True)
class Profile:
    """A checked profile. `flags` are the seccomp(2) flag names to load it with."""
    default_action: str
    default_errno: int | None
    architectures: tuple[str, ...]
    arch_map: tuple[tuple[str, tuple[str, ...]], ...]
    flags: tuple[str, ...]
    rules: tuple[Rule, ...]


def _fail(where: str, what: str) -> OSError:
    return OSError(errno.EINVAL, f"{where}: {what}" if where else what)


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
               int: "a number", float: "a number", type(None): "null"}


def _type_name(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _fields(obj: object, where: str, allowed: frozenset[str]) -> Mapping[str, object]:
    if not isinstance(obj, Mapping):
        raise _fail(where or "profile", f"must be an object, not {_type_name(obj)}")
    for key in obj:
        if key not in allowed:
            # A misspelt field would silently change what is refused: never guess.
            raise _fail(where or "profile", f'unknown field "{key}"')
    return obj


def _str(obj: object, where: str) -> str:
    if not isinstance(obj, str):
        raise _fail(where, f"must be a string, not {_type_name(obj)}")
    return obj


def _list(obj: object, where: str) -> Sequence[object]:
    if not isinstance(obj, list):
        raise _fail(where, f"must be an array, not {_type_name(obj)}")
    return obj


def _opt_list(fields: Mapping[str, object], key: str, where: str) -> Sequence[object]:
    """An optional array: absent or null is empty (Go's JSON decoders read null so)."""
    value = fields.get(key)
    return [] if value is None else _list(value, where)


def _opt_object(fields: Mapping[str, object], key: str) -> object:
    value = fields.get(key)
    return {} if value is None else value


def _uint(obj: object, where: str, limit: int) -> int:
    if not isinstance(obj, int) or isinstance(obj, bool):
        raise _fail(where, f"must be an integer, not {_type_name(obj)}")
    if not 0 <= obj <= limit:
        raise _fail(where, f"{obj} is out of range (0 to {limit})")
    return obj


def _action(obj: object, where: str) -> str:
    name = _str(obj, where)
    if name == "SCMP_ACT_NOTIFY":
        raise _fail(where, f"SCMP_ACT_NOTIFY is {_NOTIFY_REFUSED}")
    if name not in ACTIONS:
        raise _fail(where, f'unknown action "{name}"')
    return name


def _arch(obj: object, where: str) -> str:
    name = _str(obj, where)
    if name not in ARCHITECTURES:
        raise _fail(where, f'unknown architecture "{name}"')
    return name


def _when(obj: object, where: str) -> When:
    fields = _fields(obj, where, _COND_FIELDS)
    arches = tuple(_str(a, f"{where}.arches[{i}]")
                   for i, a in enumerate(_opt_list(fields, "arches", f"{where}.arches")))
    caps = []
    for i, c in enumerate(_opt_list(fields, "caps", f"{where}.caps")):
        name = _str(c, f"{where}.caps[{i}]")
        if name not in CAPABILITIES:
            raise _fail(f"{where}.caps[{i}]", f'unknown capability "{name}"')
        caps.append(name)
    min_kernel = None
    if fields.get("minKernel") is not None:
        raw = _str(fields["minKernel"], f"{where}.minKernel")
        match = re.fullmatch(r"(\d+)\.(\d+)", raw)
        if match is None:
            raise _fail(f"{where}.minKernel", f'"{raw}" is not a kernel version like "4.8"')
        min_kernel = (int(match[1]), int(match[2]))
    return When(arches, tuple(caps), min_kernel)


def _arg(obj: object, where: str) -> Arg:
    fields = _fields(obj, where, _ARG_FIELDS)
    for key in ("index", "op"):
        if key not in fields:
            raise _fail(f"{where}.{key}", "missing")
    index = _uint(fields["index"], f"{where}.index", ARGS_MAX - 1)
    op = _str(fields["op"], f"{where}.op")
    if op not in OPERATORS:
        raise _fail(f"{where}.op", f'unknown operator "{op}"')
    value = _uint(fields.get("value", 0), f"{where}.value", _U64_MAX)
    value_two = _uint(fields.get("valueTwo", 0), f"{where}.valueTwo", _U64_MAX)
    return Arg(index, op, value, value_two)


def _rule(obj: object, where: str) -> Rule:
    fields = _fields(obj, where, _RULE_FIELDS)
    if "name" in fields and "names" in fields:
        raise _fail(where, 'both "name" and "names" are given: use one')
    if "name" in fields:
        names: tuple[str, ...] = (_str(fields["name"], f"{where}.name"),)
    elif "names" in fields:
        raw = _list(fields["names"], f"{where}.names")
        names = tuple(_str(n, f"{where}.names[{i}]") for i, n in enumerate(raw))
    else:
        raise _fail(f"{where}.names", "missing")
    if not names:
        raise _fail(f"{where}.names", "empty: name at least one system call")
    for i, name in enumerate(names):
        if not name:
            raise _fail(f"{where}.names[{i}]", "empty system call name")
    if "action" not in fields:
        raise _fail(f"{where}.action", "missing")
    action = _action(fields["action"], f"{where}.action")
    errno_ret = None
    if fields.get("errnoRet") is not None:
        errno_ret = _uint(fields["errnoRet"], f"{where}.errnoRet", ERRNO_MAX)
    args = tuple(_arg(a, f"{where}.args[{i}]")
                 for i, a in enumerate(_opt_list(fields, "args", f"{where}.args")))
    includes = _when(_opt_object(fields, "includes"), f"{where}.includes")
    excludes = _when(_opt_object(fields, "excludes"), f"{where}.excludes")
    return Rule(where, names, action, errno_ret, args, includes, excludes)


def _load(profile: object) -> object:
    if isinstance(profile, (bytes, bytearray, memoryview)):
        try:
            profile = bytes(profile).decode("utf-8")
        except UnicodeDecodeError as e:
            raise _fail("profile", f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    if isinstance(profile, str):
        try:
            return json.loads(profile)
        except json.JSONDecodeError as e:
            raise _fail("profile", f"not valid JSON ({e.msg} at line {e.lineno} column "
                                   f"{e.colno})") from None
    return profile


def parse_profile(profile: object) -> Profile:
    """Check `profile` (a dict, JSON text or bytes, or a Profile) and return it parsed.

    OSError(EINVAL) names the first fault. Names of system calls are not looked up here:
    names nobody knows are skipped when the profile is compiled, as runc does."""
    if isinstance(profile, Profile):
        return profile
    fields = _fields(_load(profile), "", _TOP_FIELDS)
    if "defaultAction" not in fields:
        raise _fail("defaultAction", "missing")
    default_action = _action(fields["defaultAction"], "defaultAction")
    default_errno = None
    if fields.get("defaultErrnoRet") is not None:
        default_errno = _uint(fields["defaultErrnoRet"], "defaultErrnoRet", ERRNO_MAX)
    if fields.get("architectures") and fields.get("archMap"):
        raise _fail("archMap", 'both "architectures" and "archMap" are given: use one')
    architectures = tuple(
        _arch(a, f"architectures[{i}]")
        for i, a in enumerate(_opt_list(fields, "architectures", "architectures")))
    arch_map = []
    for i, entry in enumerate(_opt_list(fields, "archMap", "archMap")):
        where = f"archMap[{i}]"
        entry_fields = _fields(entry, where, frozenset({"architecture", "subArchitectures"}))
        if "architecture" not in entry_fields:
            raise _fail(f"{where}.architecture", "missing")
        subs = _opt_list(entry_fields, "subArchitectures", f"{where}.subArchitectures")
        arch_map.append((_arch(entry_fields["architecture"], f"{where}.architecture"),
                         tuple(_arch(s, f"{where}.subArchitectures[{j}]")
                               for j, s in enumerate(subs))))
    flags = DEFAULT_FLAGS
    if fields.get("flags") is not None:
        flags = tuple(_str(f, f"flags[{i}]") for i, f in enumerate(_list(fields["flags"], "flags")))
        for i, flag in enumerate(flags):
            if flag == "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV":
                raise _fail(f"flags[{i}]", f"{flag} applies to a listener's filter, which is "
                            f"{_NOTIFY_REFUSED.removeprefix('not supported: ')}")
            if flag not in FLAGS:
                raise _fail(f"flags[{i}]", f'unknown flag "{flag}"')
    if fields.get("listenerPath"):
        raise _fail("listenerPath", f"a seccomp agent is {_NOTIFY_REFUSED}")
    rules = tuple(_rule(r, f"syscalls[{i}]")
                  for i, r in enumerate(_opt_list(fields, "syscalls", "syscalls")))
    return Profile(default_action, default_errno, architectures, tuple(arch_map), flags, rules)


def selected_rules(profile: Profile, native: str, caps: frozenset[str] | None,
                   kernel: tuple[int, int]) -> list[Rule]:
    """The rules that apply under Docker's `includes`/`excludes`, on native ABI `native`
    (an OCI name), with bounding set `caps` (names; None: every capability) and kernel
    version `kernel`: a rule is dropped when anything it excludes holds, or anything it
    includes does not."""
    arch = ARCHITECTURES.get(native, "")

    def has(name: str) -> bool:
        return caps is None or name in caps

    out = []
    for rule in profile.rules:
        ex, inc = rule.excludes, rule.includes
        if (arch in ex.arches or any(has(c) for c in ex.caps)
                or (ex.min_kernel is not None and kernel >= ex.min_kernel)):
            continue
        if ((inc.arches and arch not in inc.arches) or not all(has(c) for c in inc.caps)
                or (inc.min_kernel is not None and kernel < inc.min_kernel)):
            continue
        out.append(rule)
    return out


def abis(profile: Profile, native: str) -> tuple[str, ...]:
    """The ABIs (OCI names) the filter covers besides `native`, which it always covers: the
    profile's `architectures`, or its `archMap` entry for `native` and that entry's
    sub-architectures, as Docker reads it."""
    if profile.architectures:
        return tuple(a for a in profile.architectures if a != native)
    for arch, subs in profile.arch_map:
        if arch == native:
            return tuple(s for s in subs if s != native)
    return ()
