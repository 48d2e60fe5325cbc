"""config.json read and checked whole, before any side effect: a `Bundle` of plain values.

Every fault is an `OciError` whose message names the field (`mounts[3].options: ...`), so an
engine shows the user what to fix. Nothing here touches the system but reading the bundle
and the seccomp profile's compilation (which installs nothing).
"""

from __future__ import annotations

import json
import os
import resource
from dataclasses import dataclass, field
from typing import Any

import syscalls
from syscalls import caps as capset

from .mountopts import MountSpec, parse_mount


class OciError(Exception):
    """A fault the runtime reports (one line, lower case) and exits non-zero for."""


NAMESPACE_FLAGS: dict[str, int] = {
    "pid": syscalls.CONTAINER_NEW_PID_NS,
    "network": syscalls.CONTAINER_NEW_NET_NS,
    "ipc": syscalls.CONTAINER_NEW_IPC_NS,
    "uts": syscalls.CONTAINER_NEW_UTS_NS,
    "mount": 0,  # always a new, empty one (the root is a bind of root.path)
    "cgroup": syscalls.CONTAINER_NEW_CGROUP_NS,
    "user": syscalls.CONTAINER_NEW_USER_NS,
}
# The /proc/PID/ns name of each type a path may join (setns before container_create: a type
# not asked for is the creator's, so the container takes the joined one).
JOINABLE = {"network": "net", "ipc": "ipc", "uts": "uts", "cgroup": "cgroup", "pid": "pid"}
CAP_SETS = ("bounding", "effective", "permitted", "inheritable", "ambient")


@dataclass
class Process:
    args: list[str]
    env: list[str]
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    groups: list[int] = field(default_factory=list)
    umask: int | None = None
    terminal: bool = False
    rlimits: list[tuple[int, int, int]] = field(default_factory=list)
    caps: dict[str, int] | None = None  # set name -> mask; None: capabilities left alone
    no_new_privs: bool = False
    oom_score_adj: int | None = None


@dataclass
class Bundle:
    path: str
    rootfs: str
    readonly: bool
    process: Process
    hostname: str | None = None
    domainname: str | None = None
    mounts: list[MountSpec] = field(default_factory=list)
    flags: int = 0
    joins: list[tuple[str, str]] = field(default_factory=list)  # (ns name, path)
    limits: list[tuple[str, str]] = field(default_factory=list)
    swap: str | None = None  # memory.swap.max, best effort
    seccomp: dict[str, Any] | None = None
    masked: list[str] = field(default_factory=list)
    readonly_paths: list[str] = field(default_factory=list)
    sysctl: dict[str, str] = field(default_factory=dict)
    devices: list[dict[str, Any]] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)
    hooks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def _type(where: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    if isinstance(value, bool) and kind in (int, (int,)):
        raise OciError(f"{where}: a number, not {json.dumps(value)}")
    if not isinstance(value, kind):
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise OciError(f"{where}: must be {name}, not {type(value).__name__}")
    return value


def _strings(where: str, value: Any) -> list[str]:
    _type(where, value, list)
    for i, item in enumerate(value):
        _type(f"{where}[{i}]", item, str)
    return list(value)


def load_bundle(bundle: str) -> Bundle:
    """Read `bundle`/config.json and check all of it."""
    path = os.path.abspath(bundle)
    try:
        with open(os.path.join(path, "config.json"), "rb") as f:
            raw = f.read()
    except OSError as e:
        raise OciError(f"open {os.path.join(path, 'config.json')}: "
                       f"{(e.strerror or str(e)).lower()}") from None
    try:
        spec = json.loads(raw)
    except ValueError as e:
        raise OciError(f"config.json: not valid JSON: {e}") from None
    return parse_config(_type("config.json", spec, dict), path)


def parse_config(spec: dict[str, Any], path: str) -> Bundle:
    """A checked Bundle from a parsed config.json of the bundle at `path`."""
    _type("ociVersion", spec.get("ociVersion", ""), str)
    root = _type("root", spec.get("root"), dict)
    root_path = _type("root.path", root.get("path"), str)
    rootfs = os.path.normpath(os.path.join(path, root_path))
    if not os.path.isdir(rootfs):
        raise OciError(f"root.path: {rootfs} is not a directory")
    readonly = _type("root.readonly", root.get("readonly", False), bool)
    process = parse_process(_type("process", spec.get("process"), dict), "process")
    linux = _type("linux", spec.get("linux", {}), dict)
    b = Bundle(path=path, rootfs=rootfs, readonly=readonly, process=process)
    b.annotations = {str(k): str(v) for k, v in
                     _type("annotations", spec.get("annotations", {}), dict).items()}
    b.hooks = _type("hooks", spec.get("hooks", {}), dict)
    for name, hooks in b.hooks.items():
        for i, hook in enumerate(_type(f"hooks.{name}", hooks, list)):
            w = f"hooks.{name}[{i}]"
            _type(f"{w}.path", _type(w, hook, dict).get("path"), str)
            for key in ("args", "env"):
                if hook.get(key) is not None:
                    _strings(f"{w}.{key}", hook[key])
            if hook.get("timeout") is not None and _type(f"{w}.timeout", hook["timeout"],
                                                         int) <= 0:
                raise OciError(f"{w}.timeout: must be a positive number of seconds")
    _namespaces(b, _type("linux.namespaces", linux.get("namespaces", []), list))
    for key in ("hostname", "domainname"):
        if key in spec:
            value = _type(key, spec[key], str)
            if value and not (b.flags & syscalls.CONTAINER_NEW_UTS_NS
                              or any(t == "uts" for t, _p in b.joins)):
                raise OciError(f"{key}: cannot be set without a private uts namespace "
                               "(add {\"type\": \"uts\"} to linux.namespaces)")
            setattr(b, key, value)
    for i, m in enumerate(_type("mounts", spec.get("mounts", []), list)):
        b.mounts.append(parse_mount(f"mounts[{i}]", _type(f"mounts[{i}]", m, dict), path,
                                    OciError))
    _resources(b, _type("linux.resources", linux.get("resources", {}), dict))
    if linux.get("seccomp") is not None:
        b.seccomp = _type("linux.seccomp", linux["seccomp"], dict)
        try:  # its structure checked now; the service compiles it (before init exists)
            from syscalls.seccomp_profile import parse_profile
            parse_profile(_seccomp_for_service(b.seccomp))
        except OSError as e:
            raise OciError(f"linux.seccomp: {e.strerror or e}") from None
    b.masked = _paths("linux.maskedPaths", linux.get("maskedPaths", []))
    b.readonly_paths = _paths("linux.readonlyPaths", linux.get("readonlyPaths", []))
    b.sysctl = {str(k): str(_type(f"linux.sysctl.{k}", v, str)) for k, v in
                _type("linux.sysctl", linux.get("sysctl") or {}, dict).items()}
    for k in b.sysctl:
        if "/" in k.replace(".", "") or ".." in k.split("."):
            raise OciError(f"linux.sysctl.{k}: not a sysctl name")
        _check_sysctl(b, k)
    for i, dev in enumerate(_type("linux.devices", linux.get("devices") or [], list)):
        d = _type(f"linux.devices[{i}]", dev, dict)
        _type(f"linux.devices[{i}].path", d.get("path"), str)
        if d.get("type") not in ("c", "b", "u", "p"):
            raise OciError(f"linux.devices[{i}].type: one of c, b, u, p")
        b.devices.append(d)
    for key in ("uidMappings", "gidMappings"):
        if linux.get(key):
            raise OciError(f"linux.{key}: not supported: a user namespace maps only its "
                           "creator (containerfs's CONTAINER_NEW_USER_NS); run rootful "
                           "without a user namespace")
    return b


def _namespaces(b: Bundle, entries: list[Any]) -> None:
    seen = set()
    for i, ns in enumerate(entries):
        where = f"linux.namespaces[{i}]"
        kind = _type(f"{where}.type", _type(where, ns, dict).get("type"), str)
        if kind not in NAMESPACE_FLAGS:
            raise OciError(f"{where}.type: {kind!r} not supported (one of "
                           f"{', '.join(NAMESPACE_FLAGS)})")
        if kind in seen:
            raise OciError(f"{where}.type: {kind} namespace given twice")
        seen.add(kind)
        path = ns.get("path")
        if path:
            _type(f"{where}.path", path, str)
            if kind not in JOINABLE:
                raise OciError(f"{where}.path: joining a {kind} namespace is not supported")
            if not os.path.exists(path):
                raise OciError(f"{where}.path: {path}: no such file or directory")
            b.joins.append((JOINABLE[kind], path))
        else:
            if kind == "user":
                raise OciError(f"{where}: a user namespace is not supported by "
                               "containerfs-oci (uid/gid mappings)")
            b.flags |= NAMESPACE_FLAGS[kind]


# The sysctls of an ipc namespace (the rest of kernel.* and vm.*, fs.* are the host's).
_IPC_SYSCTLS = {"kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem",
                "kernel.shmall", "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced"}


def _own_ns(b: Bundle, kind: str) -> bool:
    """Whether the container has a namespace of `kind` (a JOINABLE name) that is not the
    runtime's: a new one, or one joined by path that is not ours."""
    if b.flags & NAMESPACE_FLAGS[kind]:
        return True
    for name, path in b.joins:
        if name == JOINABLE[kind]:
            try:
                theirs, ours = os.stat(path), os.stat(f"/proc/self/ns/{name}")
            except OSError:
                return True  # checked when joined
            return (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino)
    return False


def _check_sysctl(b: Bundle, key: str) -> None:
    """runc's rule: a sysctl is written only in a namespace of the container's own, never the
    host's (vm.*, kernel.core_pattern... are the whole machine's)."""
    if key in _IPC_SYSCTLS or key.startswith("fs.mqueue."):
        if not _own_ns(b, "ipc"):
            raise OciError(f"linux.sysctl.{key}: not allowed in the host's ipc namespace "
                           "(add {\"type\": \"ipc\"} to linux.namespaces)")
        return
    if key.startswith("net."):
        if not _own_ns(b, "network"):
            raise OciError(f"linux.sysctl.{key}: not allowed in the host's network namespace "
                           "(add {\"type\": \"network\"} to linux.namespaces)")
        return
    if key == "kernel.domainname" and _own_ns(b, "uts"):
        return
    if key == "kernel.hostname":
        raise OciError(f"linux.sysctl.{key}: not allowed: use the hostname field")
    raise OciError(f"linux.sysctl.{key}: not in a namespace of the container's own (it would "
                   "change the host); only net.*, ipc and kernel.domainname sysctls are allowed")


def _paths(where: str, value: Any) -> list[str]:
    out = _strings(where, value)
    for i, p in enumerate(out):
        if not p.startswith("/"):
            raise OciError(f"{where}[{i}]: {p!r} is not an absolute path")
    return out


def parse_process(p: dict[str, Any], where: str) -> Process:
    """A checked Process from config.json's `process` (or exec's --process JSON)."""
    args = _strings(f"{where}.args", p.get("args"))
    if not args:
        raise OciError(f"{where}.args: must not be empty")
    proc = Process(args=args, env=_strings(f"{where}.env", p.get("env", [])))
    proc.cwd = _type(f"{where}.cwd", p.get("cwd", "/"), str)
    if not proc.cwd.startswith("/"):
        raise OciError(f"{where}.cwd: {proc.cwd!r} is not an absolute path")
    proc.terminal = _type(f"{where}.terminal", p.get("terminal", False), bool)
    user = _type(f"{where}.user", p.get("user", {}), dict)
    proc.uid = _type(f"{where}.user.uid", user.get("uid", 0), int)
    proc.gid = _type(f"{where}.user.gid", user.get("gid", 0), int)
    for i, g in enumerate(_type(f"{where}.user.additionalGids",
                                user.get("additionalGids") or [], list)):
        proc.groups.append(_type(f"{where}.user.additionalGids[{i}]", g, int))
    if user.get("umask") is not None:
        proc.umask = _type(f"{where}.user.umask", user["umask"], int) & 0o777
    for i, r in enumerate(_type(f"{where}.rlimits", p.get("rlimits") or [], list)):
        w = f"{where}.rlimits[{i}]"
        name = _type(f"{w}.type", _type(w, r, dict).get("type"), str)
        num = getattr(resource, name, None)
        if not name.startswith("RLIMIT_") or not isinstance(num, int):
            raise OciError(f"{w}.type: unknown resource {name!r}")
        soft = _type(f"{w}.soft", r.get("soft"), int)
        hard = _type(f"{w}.hard", r.get("hard"), int)
        proc.rlimits.append((num, _rlim(soft), _rlim(hard)))
    if p.get("capabilities") is not None:
        caps = _type(f"{where}.capabilities", p["capabilities"], dict)
        proc.caps = {}
        for name in CAP_SETS:
            names = _strings(f"{where}.capabilities.{name}", caps.get(name) or [])
            try:
                proc.caps[name] = capset.mask_of(names) & capset.all_caps()
            except OSError as e:
                raise OciError(f"{where}.capabilities.{name}: {e.strerror or e}") from None
    proc.no_new_privs = _type(f"{where}.noNewPrivileges", p.get("noNewPrivileges", False),
                              bool)
    if p.get("oomScoreAdj") is not None:
        proc.oom_score_adj = _type(f"{where}.oomScoreAdj", p["oomScoreAdj"], int)
    return proc


def _rlim(v: int) -> int:
    return resource.RLIM_INFINITY if v < 0 or v >= 2**64 - 1 else v


def _resources(b: Bundle, res: dict[str, Any]) -> None:
    """linux.resources as (cgroup v2 name, v2 value) pairs for container_set_limit."""
    mem = _type("linux.resources.memory", res.get("memory") or {}, dict)
    limit = mem.get("limit")
    if limit is not None:
        _type("linux.resources.memory.limit", limit, int)
        b.limits.append(("memory.max", "max" if limit < 0 else str(limit)))
    swap = mem.get("swap")
    if swap is not None:
        _type("linux.resources.memory.swap", swap, int)
        # OCI's swap is memory+swap (v1 memsw); v2's memory.swap.max is the swap alone.
        b.swap = "max" if swap < 0 else str(max(0, swap - (limit or 0))) if limit else None
    cpu = _type("linux.resources.cpu", res.get("cpu") or {}, dict)
    quota, period = cpu.get("quota"), cpu.get("period")
    if quota is not None or period is not None:
        q = _type("linux.resources.cpu.quota", quota if quota is not None else -1, int)
        per = _type("linux.resources.cpu.period", period or 100000, int)
        b.limits.append(("cpu.max", f"{'max' if q <= 0 else q} {per}"))
    if cpu.get("shares"):
        shares = _type("linux.resources.cpu.shares", cpu["shares"], int)
        b.limits.append(("cpu.weight", str(1 + ((max(2, min(shares, 262144)) - 2) * 9999)
                                           // 262142)))
    for key, name in (("cpus", "cpuset.cpus"), ("mems", "cpuset.mems")):
        if cpu.get(key):
            b.limits.append((name, _type(f"linux.resources.cpu.{key}", cpu[key], str)))
    pids = _type("linux.resources.pids", res.get("pids") or {}, dict)
    if pids.get("limit") is not None:
        n = _type("linux.resources.pids.limit", pids["limit"], int)
        b.limits.append(("pids.max", "max" if n <= 0 else str(n)))


def _seccomp_for_service(profile: dict[str, Any]) -> dict[str, Any]:
    """The profile as container_set_seccomp takes it (runc's listener fields dropped: our
    listener is the service's own)."""
    return {k: v for k, v in profile.items() if k not in ("listenerPath", "listenerMetadata")}


seccomp_for_service = _seccomp_for_service
