"""config.json `mounts` entries: their options split into mount attributes (MOUNT_ATTR_*),
filesystem parameters (fsconfig keys) and bind flags, checked without side effects."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR__ATIME = 0x70
MOUNT_ATTR_RELATIME = 0x0
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR_STRICTATIME = 0x20
MOUNT_ATTR_NODIRATIME = 0x80

# option -> (attribute set, attribute cleared)
_ATTRS: dict[str, tuple[int, int]] = {
    "ro": (MOUNT_ATTR_RDONLY, 0), "rw": (0, MOUNT_ATTR_RDONLY),
    "nosuid": (MOUNT_ATTR_NOSUID, 0), "suid": (0, MOUNT_ATTR_NOSUID),
    "nodev": (MOUNT_ATTR_NODEV, 0), "dev": (0, MOUNT_ATTR_NODEV),
    "noexec": (MOUNT_ATTR_NOEXEC, 0), "exec": (0, MOUNT_ATTR_NOEXEC),
    "nodiratime": (MOUNT_ATTR_NODIRATIME, 0), "diratime": (0, MOUNT_ATTR_NODIRATIME),
    "noatime": (MOUNT_ATTR_NOATIME, MOUNT_ATTR__ATIME),
    "relatime": (MOUNT_ATTR_RELATIME, MOUNT_ATTR__ATIME),
    "strictatime": (MOUNT_ATTR_STRICTATIME, MOUNT_ATTR__ATIME),
}
# Options with no meaning here: propagation (every mount of a container's empty mount
# namespace is private), and flags of mount(8) or of engines (SELinux relabelling...).
_IGNORED = {"private", "rprivate", "shared", "rshared", "slave", "rslave", "unbindable",
            "runbindable", "defaults", "sync", "async", "dirsync", "mand", "nomand",
            "remount", "loud", "silent", "lazytime", "nolazytime", "iversion", "noiversion",
            "z", "Z", "U", "copy", "nocopy", "notmpcopyup", "norelatime", "nostrictatime",
            "nosymfollow", "symfollow", "atime"}
FILESYSTEMS = ("proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "bind")


@dataclass
class MountSpec:
    where: str  # "mounts[3]", for messages
    destination: str
    type: str  # "bind" or a filesystem type
    source: str
    recursive: bool = False
    attr_set: int = 0
    attr_clr: int = 0
    params: list[tuple[str, str | None]] = field(default_factory=list)
    tmpcopyup: bool = False

    @property
    def attrs(self) -> int:
        """fsmount's attr_flags: the set attributes (the access-time mode included)."""
        return self.attr_set


def parse_mount(where: str, m: dict[str, Any], bundle: str, error: type[Exception]) -> MountSpec:
    """One `mounts` entry, checked; `error` is the exception type to raise (naming `where`)."""
    dest = m.get("destination")
    if not isinstance(dest, str) or not dest.startswith("/"):
        raise error(f"{where}.destination: an absolute path inside the container, not "
                    f"{dest!r}")
    options = m.get("options") or []
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise error(f"{where}.options: a list of strings")
    fstype = m.get("type") or ""
    if not isinstance(fstype, str):
        raise error(f"{where}.type: a string")
    source = m.get("source") or ""
    if not isinstance(source, str):
        raise error(f"{where}.source: a string")
    is_bind = fstype in ("bind", "none", "") or "bind" in options or "rbind" in options
    if is_bind:
        if not source:
            raise error(f"{where}.source: a bind mount needs a source")
        source = os.path.normpath(os.path.join(bundle, source))
        if not os.path.exists(source):
            raise error(f"{where}.source: {source}: no such file or directory")
        fstype = "bind"
    elif fstype not in FILESYSTEMS:
        raise error(f"{where}.type: {fstype!r} not supported (one of "
                    f"{', '.join(FILESYSTEMS)})")
    spec = MountSpec(where, dest, fstype, source)
    for opt in options:
        if opt in ("bind", "rbind"):
            spec.recursive = spec.recursive or opt == "rbind"
        elif opt in _ATTRS:
            add, clear = _ATTRS[opt]
            if clear == MOUNT_ATTR__ATIME:  # one access-time mode: the last one given
                spec.attr_set = (spec.attr_set & ~MOUNT_ATTR__ATIME) | add
                spec.attr_clr |= MOUNT_ATTR__ATIME
            elif add:
                spec.attr_set |= add
            else:
                spec.attr_set &= ~clear
        elif opt in _IGNORED:
            pass
        elif opt == "tmpcopyup":
            spec.tmpcopyup = True
        elif opt in ("idmap", "ridmap") or opt.startswith(("idmap=", "ridmap=")):
            raise error(f"{where}.options: {opt!r} (id-mapped mounts) not supported")
        elif is_bind:
            raise error(f"{where}.options: {opt!r} means nothing for a bind mount")
        else:
            key, eq, value = opt.partition("=")
            spec.params.append((key, value if eq else None))
    return spec
