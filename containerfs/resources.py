"""The groups that carry each container's limits, in every cgroup hierarchy the host uses.

One `ResourceGroups` hides the layout from the service. On a pure cgroup2 host a container has
one group (`<v2>/<name>/c<ID>`) carrying the controllers, with its own processes in a leaf
`members` under it (cgroup2 lets no group both hold processes and pass controllers to
children, and nested containers are its children). On a hybrid host the cgroup2 group holds
the processes (kill, events, freeze) and a group per v1 hierarchy, under the service's own
group there (so the host's accounting of the service covers them), carries the limits. Limits
are read and written in v2 syntax either way (containerfs.limits translates).

Writes are small, but moving a process (cgroup.procs) can stall ~16 ms and freeze() waits:
the service calls place, freeze and remove from a worker thread.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Collection
from typing import NoReturn


from .process import pidfd_pid
from .cgroupfs import V1_CONTROLLERS, Hierarchy, Layout, detect_layout
from .lazygroups import LAZY_CONTROLLERS
from .limitfiles import LimitFiles

log = logging.getLogger("containerfs")

V2_CONTROLLERS = ("cpu", "cpuset", "memory", "pids")
MEMBERS = "members"  # the leaf of a v2 group with controllers that holds its own processes


# Where a process was before place(): {group directory written: the directory it came from}.
Origin = dict[str, str]


class ResourceGroups(LimitFiles):
    """A container's groups in every hierarchy used, named by container id."""

    def __init__(self, name: str = "containerfs", *, layout: Layout | None = None,
                 controllers: Collection[str] | None = None, v2_base: str | None = None,
                 freeze_timeout: float = 5.0) -> None:
        """`name`: the base group made in each hierarchy (in v1, under the service's own
        group; in cgroup2, at the root unless `v2_base` says where, as containerfs.cgroups
        does). `controllers`: those to use (default all this module knows)."""
        self.layout = layout if layout is not None else detect_layout()
        want = frozenset(V1_CONTROLLERS if controllers is None else controllers)
        self.freeze_timeout = freeze_timeout
        self._lock = threading.RLock()
        self._ready = False
        self._cpuset_clones = False  # the cpuset base copies its sets into new children
        self._rel: dict[int, str] = {}  # container id -> its group's path under each base
        v2 = self.layout.v2
        self.v2_base = (v2_base or os.path.join(v2.path(v2.root), name)) if v2 else None
        # Controllers used through cgroup2; the rest through v1 (each controller is bound to
        # one hierarchy at a time). v2 freezes with cgroup.freeze, whose members can still
        # be killed: the v1 freezer is used only where there is no cgroup2 group.
        self._v2_ctl = frozenset(c for c in V2_CONTROLLERS
                                 if c in want and c in self.layout.v2_controllers) if v2 else \
            frozenset()
        self._v1: dict[str, str] = {}  # controller -> the base directory of its hierarchy
        self._hier: dict[str, Hierarchy] = {}  # base directory -> its hierarchy
        lazy = set()
        for h in self.layout.v1:
            use = {c for c in h.controllers & want if c not in self._v2_ctl}
            # Where a cgroup2 group holds the processes, its core cpu.stat gives the CPU
            # usage (no cpuacct), and its cgroup.freeze freezes (no v1 freezer); and the
            # groups of cpu and cpuset are made only when needed (containerfs.lazygroups).
            use -= {"freezer", "cpuacct"} if v2 else set()
            if use:
                base = os.path.join(h.path(h.own), name)
                self._hier[base] = h
                self._v1.update(dict.fromkeys(use, base))
                if v2 and use <= LAZY_CONTROLLERS:
                    lazy.add(base)
        self._lazy = frozenset(lazy)
        self._has = {}

    # --- layout ---------------------------------------------------------------------
    def _bases(self) -> list[str]:
        """Every base directory in use, cgroup2's first."""
        return ([self.v2_base] if self.v2_base else []) + list(self._hier)

    def _where(self, controller: str) -> str | None:
        """The base directory that carries `controller` ("": core cgroup2 files), or None."""
        if controller == "" or controller in self._v2_ctl:
            return self.v2_base
        return self._v1.get(controller)

    def _group(self, cid: int) -> str:
        """The container's group path under each base ("c5", or "c2/c5" nested)."""
        rel = self._rel.get(cid)
        if rel is None:  # made by an earlier service: find it
            bases = self._bases()
            rel = self._find(bases[0], f"c{cid}") if bases else None
            if rel is None:
                raise OSError(errno.ENOENT, f"container {cid} has no cgroup")
            self._rel[cid] = rel
        return rel

    def adopt(self, cid: int, parent: int | None) -> None:
        """After a restart: know the group of container `cid` again, inside `parent`'s if
        that is known (so a nested member is told apart from its parent's at once), and
        which lazy hierarchies it has a group in."""
        known = self._rel.get(parent) if parent is not None else None
        rel = f"c{cid}" if known is None else os.path.join(known, f"c{cid}")
        bases = self._bases()
        if bases and os.path.isdir(os.path.join(bases[0], rel)):
            self._rel[cid] = rel
            self._has.pop(cid, None)
            self._lazy_of(cid)

    def _v1_bases(self, cid: int) -> list[str]:
        """The v1 bases where the container has a group (every eager one, and the lazy ones
        made for it), in the order of _bases()."""
        has = self._lazy_of(cid) if self._lazy else frozenset()
        return [b for b in self._hier if b not in self._lazy or b in has]

    def _find(self, base: str, leaf: str) -> str | None:
        for top, dirs, _ in os.walk(base):
            if leaf in dirs:
                return os.path.relpath(os.path.join(top, leaf), base)
            dirs[:] = [d for d in dirs if d != MEMBERS]
        return None

    def _dir(self, cid: int, controller: str) -> str:
        base = self._where(controller)
        if base is None:
            what = f"the {controller} controller" if controller else "a cgroup2 hierarchy"
            raise OSError(errno.EOPNOTSUPP, f"{what} is not available on this host")
        return os.path.join(base, self._group(cid))

    def _members_dir(self, cid: int) -> str:
        """Where the container's own processes live."""
        if self.v2_base is None:
            return os.path.join(next(iter(self._hier)), self._group(cid))
        d = os.path.join(self.v2_base, self._group(cid))
        return os.path.join(d, MEMBERS) if self._v2_ctl else d

    def controllers(self) -> dict[str, str]:
        """{controller: "v2" or "v1"} for each controller in use (for docs and the view)."""
        out = {c: "v2" for c in self._v2_ctl}
        out.update(dict.fromkeys(self._v1, "v1"))
        return out

    # --- groups ---------------------------------------------------------------------
    def _ensure_bases(self) -> None:
        if self._ready:
            return
        for base in self._bases():
            try:
                self._mkdir(base)
            except FileExistsError:
                pass
        if self._v2_ctl:
            self._enable_v2()
        for base, h in self._hier.items():
            if "cpuset" in h.controllers:
                self._copy_cpuset(base)
                # v1 then gives each new group below a copy of its parent's CPUs and memory
                # nodes itself (and the flag, so nested groups too): no copy per container.
                # Writing cpuset.cpus checked every sibling and rebuilt the scheduling
                # domains (2/3 of a create at 6,000 containers).
                try:
                    self._write(os.path.join(base, "cgroup.clone_children"), "1")
                    self._cpuset_clones = True
                except OSError as e:
                    log.info("cpuset groups get a copy of their parent's sets: %s", e)
        self._ready = True

    def _enable_v2(self) -> None:
        """Enable the controllers from the cgroup2 root down to the base's children; a
        controller that cannot be enabled (a busy parent) is not used."""
        assert self.v2_base is not None and self.layout.v2 is not None
        root = self.layout.v2.path(self.layout.v2.root)
        chain = [root]
        for part in os.path.relpath(self.v2_base, root).split(os.sep):
            chain.append(os.path.join(chain[-1], part))
        enabled = set()
        for c in self._v2_ctl:
            try:
                for d in chain:
                    if c not in self._read(os.path.join(d, "cgroup.subtree_control")).split():
                        self._write(os.path.join(d, "cgroup.subtree_control"), f"+{c}")
                enabled.add(c)
            except OSError as e:
                log.warning("cgroup2 controller %s not used: %s", c, e)
        self._v2_ctl = frozenset(enabled)

    def _copy_cpuset(self, path: str) -> None:
        # A new v1 cpuset group starts with no CPUs and no memory nodes, and no process can
        # join it until it has some: give it its parent's.
        for f in ("cpuset.cpus", "cpuset.mems"):
            if not self._read(os.path.join(path, f)).strip():
                self._write(os.path.join(path, f), self._read(os.path.join(path, "..", f)))

    def _new_group(self, base: str, path: str) -> None:
        """mkdir one group (FileExistsError if there), ready for processes."""
        self._mkdir(path)
        if base == self.v2_base and self._v2_ctl:
            self._write(os.path.join(path, "cgroup.subtree_control"),
                        " ".join(f"+{c}" for c in sorted(self._v2_ctl)))
            self._mkdir(os.path.join(path, MEMBERS))
        elif not self._cpuset_clones and base in self._hier and \
                "cpuset" in self._hier[base].controllers:
            self._copy_cpuset(path)

    def create(self, cid: int, parent: int | None = None) -> None:
        """Make the container's group in every hierarchy used but the lazy ones (inside
        `parent`'s groups for a nested container; in the lazy ones too where the parent has
        a group), with no limit set. A group left by an earlier service is replaced if empty
        (EEXIST if in use). On failure nothing is left made."""
        with self._lock:
            self._ensure_bases()
        if parent is None:
            self._make(cid, f"c{cid}", frozenset())
            return
        with self._lock:  # a lazy group being made for the parent's tree is made for it too
            has = self._lazy_of(parent) if self._lazy else frozenset()
            self._make(cid, os.path.join(self._group(parent), f"c{cid}"), has)

    def _make(self, cid: int, rel: str, lazy: frozenset[str]) -> None:
        made: list[str] = []
        try:
            for base in self._bases():
                if base in self._lazy and base not in lazy:
                    continue
                path = os.path.join(base, rel)
                try:
                    self._new_group(base, path)
                except FileExistsError:
                    if self._remove_tree(path, time.monotonic()):
                        raise OSError(errno.EEXIST, f"cgroup {path} exists and is in use") \
                            from None
                    self._new_group(base, path)
                made.append(path)
        except BaseException:
            self._unmake(made)
            raise
        self._rel[cid] = rel
        self._has[cid] = lazy

    def remove(self, cid: int, timeout: float = 1.0) -> list[str]:
        """Remove the container's groups (and any left below them) in every hierarchy,
        retrying busy ones for `timeout` seconds; the paths still there (empty when done)."""
        try:
            rel = self._group(cid)
        except FileNotFoundError:
            return []
        with self._lock:  # not while a lazy group is being made for it
            return self._remove(cid, rel, timeout)

    def _remove(self, cid: int, rel: str, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        bases = ([self.v2_base] if self.v2_base else []) + self._v1_bases(cid)
        left = [p for base in bases
                for p in self._remove_tree(os.path.join(base, rel), deadline)]
        if not left:
            self._rel.pop(cid, None)
            self._has.pop(cid, None)
        return left

    def remove_all(self, timeout: float = 2.0) -> list[str]:
        """Kill every container's processes, remove every group and the bases (teardown and
        tests); the paths left."""
        for base in self._bases():
            for entry in os.listdir(base) if os.path.isdir(base) else []:
                if entry.startswith("c") and entry[1:].isdigit():
                    self._rel[int(entry[1:])] = entry
                    self.kill(int(entry[1:]))
        deadline = time.monotonic() + timeout
        left = [p for base in self._bases() for p in self._remove_tree(base, deadline)]
        self._rel.clear()
        self._has.clear()
        self._ready = False
        return left

    # --- processes ------------------------------------------------------------------
    def clone_into_fd(self, cid: int) -> int | None:
        """An fd of the cgroup2 directory for clone3(CLONE_INTO_CGROUP), or None when there
        is no cgroup2 group; the caller closes it. A process cloned into it still needs
        place(..., v2=False) for the v1 groups (a no-op on pure cgroup2)."""
        if self.v2_base is None:
            return None
        return os.open(self._members_dir(cid), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def v1_groups(self, cid: int) -> tuple[str, ...]:
        """The v1 groups open_procs opens, as paths (nothing opened)."""
        rel = self._group(cid)
        return tuple(os.path.join(base, rel) for base in self._v1_bases(cid))

    def open_procs(self, cid: int) -> list[int]:
        """Write fds of each v1 group's cgroup.procs: a process writing "0" to each joins the
        groups itself, before it runs anything else. Only for root callers: v1 checks a
        write against the opener's credentials, so such an fd moves any process."""
        rel = self._group(cid)
        return [os.open(os.path.join(base, rel, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
                for base in self._v1_bases(cid)]

    def place(self, cid: int, pidfd: int, pid: int, *, v2: bool = False,
              lazy: dict[str, str] | None = None) -> Origin:
        """Move the process behind `pidfd` (whose pid is `pid`) into the container's v1 groups
        (and its cgroup2 group with `v2`), acting on the pid only while the pidfd shows it
        unreaped before and after (ESRCH otherwise, after moving it back). Returns where it
        was, for unplace(). `lazy`, if given, gets {base: its group} for each lazy hierarchy
        the container has no group in yet (see lazy_return)."""
        rel = self._group(cid)
        targets = [os.path.join(b, rel) for b in self._v1_bases(cid)]
        if v2 and self.v2_base is not None:
            targets.insert(0, self._members_dir(cid))
        missing = [b for b in self._lazy if lazy is not None and self._absent(cid, b)]
        if not targets and not missing:
            return {}
        self._check_alive(pidfd, pid)
        origin = self.layout.groups_of(pid, targets + missing)
        self._check_alive(pidfd, pid)  # the groups read were that process's
        if lazy is not None:
            lazy.update({b: origin.pop(b) for b in missing})
        self._move(pidfd, pid, origin)
        return origin

    def unplace(self, origin: Origin, pidfd: int, pid: int) -> None:
        """Move the process back where place() found it (same pidfd checks)."""
        self._check_alive(pidfd, pid)
        self._move(pidfd, pid, {back: there for there, back in origin.items()})

    def _move(self, pidfd: int, pid: int, moves: dict[str, str]) -> None:
        """Write `pid` into each key's cgroup.procs; if a write fails or the process turns
        out reaped, write it back to the values' (as at_pid's undo) and raise."""
        done: list[str] = []
        try:
            for d in moves:
                self._write(os.path.join(d, "cgroup.procs"), str(pid))
                done.append(d)
            self._check_alive(pidfd, pid)
        except BaseException:
            for d in reversed(done):
                try:
                    self._write(os.path.join(moves[d], "cgroup.procs"), str(pid))
                except OSError as e:
                    log.error("could not move pid %d back to %s: %s", pid, moves[d], e)
            raise

    def _check_alive(self, pidfd: int, pid: int) -> None:
        # (a peer's pidfd, one of ours, or a report's checked when it came: Forks.finish)
        if pidfd_pid(pidfd, checked=True) != pid:
            raise ProcessLookupError(errno.ESRCH, f"process {pid} has exited")

    def procs(self, cid: int) -> list[int]:
        """The pids of the container's own processes (not those of nested containers)."""
        try:
            return [int(p) for p in self._read(
                os.path.join(self._members_dir(cid), "cgroup.procs")).split()]
        except FileNotFoundError:
            return []

    def kill(self, cid: int) -> None:
        """SIGKILL every process of the container and of those nested in it, frozen or not.
        Returns without waiting for them to exit."""
        try:
            rel = self._group(cid)
        except FileNotFoundError:
            return
        if self.v2_base is not None:
            try:
                self._write(os.path.join(self.v2_base, rel, "cgroup.kill"), "1")
                return
            except FileNotFoundError:
                pass  # before Linux 5.14: signal each process
        freezer = self.v2_base is None and "freezer" in self._v1
        if freezer:
            # Frozen, no member forks between the listing and the signals. A task frozen by
            # the v1 freezer acts on SIGKILL only once thawed (checked on 6.18).
            try:
                self.freeze(cid, timeout=1.0)
            except OSError as e:
                log.warning("killing container %d unfrozen: %s", cid, e)
        for d, _, _ in os.walk(os.path.join(next(iter(self._hier)), rel)):
            procs = os.path.join(d, "cgroup.procs")
            # Signalled through pidfds taken while listed (a pidfd never changes process):
            # a pid recycled since the listing is never hit.
            pidfds = {}
            for n in map(int, self._read(procs).split()):
                try:
                    pidfds[n] = os.pidfd_open(n)
                except ProcessLookupError:
                    pass
            listed = {int(p) for p in self._read(procs).split()}
            for pid, fd in pidfds.items():
                try:
                    if pid in listed:
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                finally:
                    os.close(fd)
        if freezer:
            self.thaw(cid)

    # --- freezing -------------------------------------------------------------------
    def freeze(self, cid: int, timeout: float | None = None) -> None:
        """Stop every process of the container (and of those nested in it); returns once all
        are frozen. ETIMEDOUT after `timeout` (default freeze_timeout) with the container
        thawed again; EOPNOTSUPP without a cgroup2 group or a v1 freezer."""
        deadline = time.monotonic() + (self.freeze_timeout if timeout is None else timeout)
        if self.v2_base is not None:
            d = self._dir(cid, "")
            fd = os.open(os.path.join(d, "cgroup.events"), os.O_RDONLY | os.O_CLOEXEC)
            try:
                self._write(os.path.join(d, "cgroup.freeze"), "1")
                poller = select.poll()
                poller.register(fd, select.POLLPRI)
                # The kernel notifies cgroup.events (POLLPRI) when "frozen" changes; a read
                # rearms the notification, and the wait is in slices in case one is missed.
                while "frozen 1" not in os.pread(fd, 4096, 0).decode().splitlines():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._freeze_failed(cid, d)
                    poller.poll(int(min(left, 0.05) * 1000) + 1)
            finally:
                os.close(fd)
            return
        d = self._dir(cid, "freezer")
        self._write(os.path.join(d, "freezer.state"), "FROZEN")
        pause = 0.001  # the v1 freezer gives no notification: poll, backing off
        while self._read(os.path.join(d, "freezer.state")).strip() != "FROZEN":
            if time.monotonic() >= deadline:
                self._freeze_failed(cid, d)
            time.sleep(pause)
            pause = min(pause * 2, 0.02)

    def _freeze_failed(self, cid: int, d: str) -> NoReturn:
        self.thaw(cid)
        raise OSError(errno.ETIMEDOUT, f"container {cid} did not freeze in time (a process "
                                       f"may be in an uninterruptible sleep); it was thawed",
                      d)

    def thaw(self, cid: int) -> None:
        """Let every process of the container run again (nested containers frozen by
        themselves stay frozen)."""
        if self.v2_base is not None:
            self._write(os.path.join(self._dir(cid, ""), "cgroup.freeze"), "0")
        else:
            self._write(os.path.join(self._dir(cid, "freezer"), "freezer.state"), "THAWED")

    def frozen(self, cid: int) -> bool:
        """Whether the container itself was frozen (freeze() and no thaw() since); a container
        inside a frozen one is stopped but not reported here."""
        if self.v2_base is not None:
            return self._read(os.path.join(self._dir(cid, ""), "cgroup.freeze")).strip() == "1"
        return "freezer" in self._v1 and self._read(os.path.join(
            self._dir(cid, "freezer"), "freezer.self_freezing")).strip() == "1"
