"""The runtime's state directory (`--root`/ID) and the container's status, as runc keeps them.

`state.json` holds what lets a later command check that it still names the same container
and process: the containerfs id (and the service's socket), init's pid and its start time
(field 22 of /proc/PID/stat). A command acts on init only through a pidfd whose process has
that start time, and on the container only through a handle whose init is that pid: never on
a pid number alone. `exec.fifo` exists from create until start (its presence is "created").
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import re
import select
import shutil
import stat
from dataclasses import asdict, dataclass, field
from typing import Any

import syscalls
from syscalls import client, protocol

from .config import OciError

DEFAULT_ROOT = "/run/containerfs-oci"
OCI_VERSION = "1.0.2"
_ID = re.compile(r"[\w+\-.]+", re.ASCII)  # runc's (Go's \w is ASCII; fullmatch: no "\n")


def check_id(cid: str) -> str:
    if not cid or not _ID.fullmatch(cid) or cid in (".", ".."):
        raise OciError(f"invalid container id {cid!r}: letters, digits, _ + - . only")
    return cid


@dataclass
class State:
    id: str
    cfs_id: int
    pid: int
    pid_start: int
    bundle: str
    rootfs: str
    created: str
    socket: str
    annotations: dict[str, str] = field(default_factory=dict)
    hooks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    owner: str = ""


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def dir_of(root: str, cid: str) -> str:
    return os.path.join(root, check_id(cid))


def make_dir(root: str, cid: str) -> str:
    """The container's state directory, made now: OciError if the id is taken."""
    os.makedirs(root, mode=0o711, exist_ok=True)
    path = dir_of(root, cid)
    try:
        os.mkdir(path, 0o711)
    except FileExistsError:
        raise OciError(f"container with id exists: {cid}") from None
    return path


def save(root: str, st: State) -> None:
    path = os.path.join(dir_of(root, st.id), "state.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(asdict(st), f)
    os.rename(tmp, path)


def load(root: str, cid: str) -> State:
    """The state of container `cid`; OciError("container does not exist") if none."""
    try:
        with open(os.path.join(dir_of(root, cid), "state.json")) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise OciError("container does not exist") from None
    return State(**data)


def remove(root: str, cid: str) -> None:
    shutil.rmtree(dir_of(root, cid), ignore_errors=True)


def fifo_path(root: str, cid: str) -> str:
    return os.path.join(dir_of(root, cid), "exec.fifo")


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return int(data[data.rindex(b")") + 2:].split()[19])


def init_pidfd(st: State) -> int | None:
    """A pidfd of the container's init if it is still that process (and not a zombie), else
    None. The start time is read after the pidfd is opened: a recycled pid cannot pass."""
    try:
        fd = os.pidfd_open(st.pid)
    except OSError:
        return None
    if start_time(st.pid) != st.pid_start or _zombie(st.pid):
        os.close(fd)
        return None
    return fd


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return True
    return data[data.rindex(b")") + 2:].split()[0] in (b"Z", b"X")


def use_socket(st: State | None, explicit: str | None) -> None:
    """Talk to the service named by --socket, else the one the container was made with."""
    chosen = explicit or (st.socket if st else None)
    if chosen:
        os.environ["CONTAINERFS_SOCKET"] = chosen


def open_handle(st: State) -> tuple[int, dict[str, Any]] | None:
    """A handle of the container and its status if it is still this state's (its init is
    our init), else None (dead, removed, or another service's container of the same id)."""
    try:
        reply, fds = client.call(protocol.Open(id=st.cfs_id))
    except OSError as e:
        if e.errno in (errno.ESRCH, errno.ECANCELED, errno.ENOENT):
            return None
        raise
    cfd = fds[0]
    try:
        status = syscalls.container_status(cfd)
    except OSError:
        os.close(cfd)
        return None
    if status.get("init_pid") != st.pid or status.get("state") == "dead":
        os.close(cfd)
        return None
    return cfd, status


def status_of(root: str, st: State) -> tuple[str, int | None]:
    """(runc status, a handle if the container lives). created/running/paused/stopped."""
    if start_time(st.pid) != st.pid_start or _zombie(st.pid):
        return "stopped", None
    opened = open_handle(st)
    if opened is None:
        return "stopped", None
    cfd, status = opened
    if select.select([cfd], [], [], 0)[0]:  # POLLHUP: dead meanwhile
        os.close(cfd)
        return "stopped", None
    if status.get("frozen"):
        return "paused", cfd
    try:
        created = stat.S_ISFIFO(os.stat(fifo_path(root, st.id)).st_mode)
    except FileNotFoundError:
        created = False
    return ("created" if created else "running"), cfd


def oci_state(st: State, status: str) -> dict[str, Any]:
    """The runtime-spec state JSON, with runc's extra fields (rootfs, created, owner)."""
    return {"ociVersion": OCI_VERSION, "id": st.id,
            "pid": st.pid if status != "stopped" else 0, "status": status,
            "bundle": st.bundle, "rootfs": st.rootfs, "created": st.created,
            "owner": st.owner, "annotations": st.annotations}
