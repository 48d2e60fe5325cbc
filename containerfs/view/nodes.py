"""The view's nodes (what each inode is) and the records the model keeps about them."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .readers import ViewKey


class Kind(enum.Enum):
    ROOT = "root"
    TABLE = "containers"  # a `containers` file: one inode per viewpoint
    BYNAME = "by-name"
    LINK = "link"  # by-name/<name>
    CDIR = "cdir"  # <id>/
    FILE = "file"  # <id>/<name>
    NSDIR = "nsdir"  # <id>/ns/
    LIMITSDIR = "limitsdir"  # <id>/limits/
    LIMIT = "limit"  # <id>/limits/<name>
    NS = "ns"  # <id>/ns/<type>
    KILL = "kill"  # <id>/kill


@dataclass(frozen=True)
class Node:
    kind: Kind
    cid: int = 0
    name: bytes = b""
    key: ViewKey | None = None


@dataclass
class Attr:
    """The attributes of one node, with how long the kernel may keep them and its name."""
    ino: int
    mode: int
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    entry_timeout: float = 0.0
    attr_timeout: float = 0.0


@dataclass
class Opened:
    fh: int
    direct_io: bool
    keep_cache: bool


@dataclass
class OpenFile:
    ino: int
    data: bytes
    cached: bool  # reads share the inode's page cache (and its published text)
    kill: int = 0  # a kill file opened for writing: the container's id


@dataclass
class Published:
    data: bytes
    mtime_ns: int


@dataclass
class Rendered:
    generation: int
    at: float
    data: bytes


# Per-container files in listing order; exit_status only once dead.
CFILES = (b"name", b"state", b"init_pid", b"members", b"pids", b"flags", b"owner", b"group",
          b"caps", b"seccomp", b"exit_status")
