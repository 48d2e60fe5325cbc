"""Groups made only when a container needs them: on a hybrid host, a container's group in the
v1 cpu and cpuset hierarchies is made on the first limit of that controller, and its
processes are moved in then (resources.ResourceGroups mixes this in).

Why: every group costs a mkdir and an rmdir (~45 us of kernel CPU each in these hierarchies),
and every new process a write of "0" to its cgroup.procs (the cpu hierarchy's: ~0.33 ms on
the critical path of each fork). A container that sets no CPU limit needs neither: its usage
is read from cgroup2's core cpu.stat, which every cgroup2 group has without controllers.

The rules (docs/resources.md, "Groups made when needed"):
- A container has a group in a lazy hierarchy, or none; so do all the containers of its tree
  (its top-level ancestor and everything nested in it): making one makes the whole tree's,
  parents first, and a container nested later in such a tree gets the group at creation.
  Otherwise a nested container's processes could sit outside its parent's group there, and
  escape a limit set on the parent later (v1 cannot move a group under another).
- Moving in: every process listed in a container's cgroup2 group (and in groups below it that
  are no container's) and not yet in its new group is moved by pid, checked against a pidfd
  before and after (ResourceGroups._move); one that exits meanwhile is skipped. Passes repeat
  until one moves nothing (a process forked by one not yet moved is caught by the next); if
  that does not settle, the tree is frozen through cgroup2 for a last pass.
- A fork granted before the group existed was lent only the groups of that time: when it is
  reported (`complete`), the new process is checked and moved in, and the container swept
  again in a worker thread (`sweep_owed`).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time

from .cgroupfs import CgroupFS, Layout

log = logging.getLogger("containerfs")

# Controllers whose v1 group is made only once one of their limits is set. cpuacct is not used
# at all where cgroup2 is mounted (resources.ResourceGroups): cpu.stat gives the usage.
LAZY_CONTROLLERS = frozenset({"cpu", "cpuset"})
SETTLE_PASSES = 8  # sweeps before the tree is frozen for the last one


class LazyGroups(CgroupFS):
    """The bookkeeping of lazy groups: which lazy hierarchies (base directories) each
    container has a group in, making them, and moving processes in."""

    layout: Layout
    v2_base: str | None
    _rel: dict[int, str]
    _lock: threading.RLock
    _lazy: frozenset[str]  # base directories of the lazy hierarchies
    _has: dict[int, frozenset[str]]  # container id -> the lazy bases it has a group in

    # Provided by ResourceGroups.
    def _group(self, cid: int) -> str:
        raise NotImplementedError

    def _move(self, pidfd: int, pid: int, moves: dict[str, str]) -> None:
        raise NotImplementedError

    def _new_group(self, base: str, path: str) -> None:
        raise NotImplementedError

    def _check_alive(self, pidfd: int, pid: int) -> None:
        raise NotImplementedError

    def _absent(self, cid: int, base: str) -> bool:
        """Whether `base` is a lazy hierarchy where the container has no group (yet)."""
        return base in self._lazy and base not in self._lazy_of(cid)

    # --- which groups a container has ---------------------------------------------------
    def _lazy_of(self, cid: int) -> frozenset[str]:
        """The lazy bases where container `cid` has a group (looked up on disk once for a
        container made by an earlier service)."""
        has = self._has.get(cid)
        if has is None:
            rel = self._group(cid)
            has = frozenset(b for b in self._lazy if os.path.isdir(os.path.join(b, rel)))
            self._has[cid] = has
        return has

    def _tree(self, cid: int) -> list[int]:
        """The containers of `cid`'s tree known here (its top-level ancestor and all nested
        in it), parents first."""
        top = self._group(cid).split(os.sep, 1)[0]
        # (a copy: the event loop adds and removes containers while a worker thread is here)
        known = [(x, rel) for x, rel in list(self._rel.items())
                 if rel == top or rel.startswith(top + os.sep)]
        return [x for x, _ in sorted(known, key=lambda e: e[1].count(os.sep))]

    # --- making them --------------------------------------------------------------------
    def _make_lazy(self, cid: int, base: str) -> tuple[list[int], list[str]]:
        """Make the group in `base` of every container of `cid`'s tree that lacks one, parents
        first (call with the lock held): (the tree, the directories made). Nothing is
        registered yet (see _register); on failure nothing made is left."""
        tree = self._tree(cid)
        made: list[str] = []
        try:
            for x in tree:
                path = os.path.join(base, self._rel[x])
                try:
                    self._new_group(base, path)
                except FileExistsError:
                    continue  # (made by an earlier service, or by a failed sweep's caller)
                made.append(path)
        except BaseException:
            self._unmake(made)
            raise
        return tree, made

    def _unmake(self, made: list[str]) -> None:
        for path in reversed(made):
            self._remove_tree(path, time.monotonic())

    def _register(self, tree: list[int], base: str) -> None:
        """From now on forks of the tree's containers are lent the group in `base`."""
        for x in tree:
            self._has[x] = self._lazy_of(x) | {base}

    # --- moving processes in ------------------------------------------------------------
    def _own_procs(self, cid: int, theirs: set[str] | None = None) -> list[int]:
        """The pids in the container's cgroup2 group and in groups below it that are no
        container's (a member may make some); `theirs`: every container's cgroup2 group,
        if the caller has it."""
        assert self.v2_base is not None
        top = os.path.join(self.v2_base, self._group(cid))
        if theirs is None:
            theirs = {os.path.join(self.v2_base, rel) for rel in list(self._rel.values())}
        theirs = theirs - {top}
        pids: list[int] = []
        for d, dirs, _ in os.walk(top):
            dirs[:] = [n for n in dirs if os.path.join(d, n) not in theirs]
            try:
                pids += map(int, self._read(os.path.join(d, "cgroup.procs")).split())
            except FileNotFoundError:
                pass
        return pids

    def _move_missing(self, cid: int, base: str) -> int:
        """One pass: move each process of the container not yet in its group in `base` there;
        how many were moved."""
        assert self.v2_base is not None
        rel = self._group(cid)
        src, dst = os.path.join(self.v2_base, rel), os.path.join(base, rel)
        there = set(map(int, self._read(os.path.join(dst, "cgroup.procs")).split()))
        moved = 0
        for pid in self._own_procs(cid):
            if pid in there:
                continue
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue  # exited
            try:
                # Its groups read while the pidfd shows it unreaped: the pid was still that
                # process's, a member of the container (not a process that took the number).
                self._check_alive(pidfd, pid)
                now = self.layout.groups_of(pid, [src, dst])
                self._check_alive(pidfd, pid)
                if now[src] != src and not now[src].startswith(src + os.sep):
                    continue
                if now[dst] != dst:
                    self._move(pidfd, pid, {dst: now[dst]})
                    moved += 1
            except (FileNotFoundError, ProcessLookupError, KeyError):
                pass  # exited meanwhile
            finally:
                os.close(pidfd)
        return moved

    def _sweep(self, tree: list[int], base: str) -> None:
        """Move every process of the tree's containers into their groups in `base`."""
        for x in tree:
            try:
                for _ in range(SETTLE_PASSES):
                    if not self._move_missing(x, base):
                        break
                else:
                    self._frozen_pass(x, base)
            except FileNotFoundError:
                pass  # the container is gone (its groups removed): nothing left to move

    def _frozen_pass(self, cid: int, base: str) -> None:
        """A last pass with the container frozen (nothing forks meanwhile), unless someone
        froze it already (then nothing runs anyway)."""
        assert self.v2_base is not None
        freeze = os.path.join(self.v2_base, self._group(cid), "cgroup.freeze")
        was = self._read(freeze).strip() == "1"
        if not was:
            self._write(freeze, "1")
            time.sleep(0.05)  # running tasks stop at their next entry into the kernel
        try:
            while self._move_missing(cid, base):
                pass
        finally:
            if not was:
                self._write(freeze, "0")

    # --- after a restart ----------------------------------------------------------------
    def settle_adopted(self, live: set[int]) -> None:
        """After every container was adopted (ids in `live`): finish what a service killed in set_limit's
        first limit left half done, which no later set_limit would (it finds the group and
        only writes the limit). The groups of a tree made parents first: a container whose
        parent has a group that it lacks gets its own; then every process of a container
        with lazy groups not yet in them is moved in (_sweep: nothing to move, usually)."""
        with self._lock:
            by_rel = {r: x for x, r in self._rel.items()}
            for cid in self._tree_order(live):
                rel = self._rel[cid]
                above = by_rel.get(os.path.dirname(rel))
                missing = (self._lazy_of(above) - self._lazy_of(cid)) if above is not None \
                    else frozenset()
                for base in missing:
                    try:
                        self._new_group(base, os.path.join(base, rel))
                    except FileExistsError:
                        pass
                    except OSError as e:  # (the service starts all the same)
                        log.warning("container %d: its group in %s not made: %s", cid, base, e)
                        continue
                    self._has[cid] = self._lazy_of(cid) | {base}
        if self.v2_base is None:
            return
        theirs = {os.path.join(self.v2_base, rel) for rel in self._rel.values()}
        for cid in self._tree_order(live):
            has = self._lazy_of(cid)
            if not has:
                continue
            try:
                own = set(self._own_procs(cid, theirs))
                for base in has:
                    there = self._read(os.path.join(base, self._rel[cid], "cgroup.procs"))
                    if own - set(map(int, there.split())):
                        self._sweep([cid], base)
            except OSError as e:  # (gone meanwhile, say: the service starts all the same)
                log.warning("container %d: its processes not moved into its groups: %s", cid, e)

    def _tree_order(self, among: set[int]) -> list[int]:
        """The known containers of `among`, parents first."""
        return [x for x, _ in sorted(self._rel.items(), key=lambda e: e[1].count(os.sep))
                if x in among]

    # --- a fork granted before ----------------------------------------------------------
    def complete(self, cid: int, pidfd: int, pid: int) -> list[str]:
        """A new process of container `cid` was reported: if the container has lazy groups,
        make sure the process is in them (a fork granted before a group was made was not lent
        it). Returns the lazy hierarchies where it was not: the container is owed a sweep
        there (sweep_owed: its children may have been missed too), which can take a frozen
        pass of 50 ms, so not here on the event loop. ESRCH if it was reaped meanwhile."""
        has = self._lazy_of(cid)
        if not has:
            return []
        rel = self._group(cid)
        want = {b: os.path.join(b, rel) for b in has}
        try:
            now = self.layout.groups_of(pid, list(want.values()))
        except FileNotFoundError:  # (its /proc entry: reaped)
            raise ProcessLookupError(errno.ESRCH, f"process {pid} was reaped") from None
        self._check_alive(pidfd, pid)  # the groups read were that process's
        owed = [b for b, d in want.items() if now[d] != d]
        if owed:
            self._move(pidfd, pid, {want[b]: now[want[b]] for b in owed})
        return owed

    def sweep_owed(self, cid: int, bases: list[str]) -> None:
        """The sweep complete() found owed (blocking: run it in a thread)."""
        with self._lock:
            for base in bases:
                self._sweep([cid], base)

    def lazy_return(self, cid: int, lazy: dict[str, str]) -> dict[str, str]:
        """For unplace(): {group: group} for each entry of `lazy` (filled by place()) whose
        hierarchy the container has a group in by now. A process placed in the container
        for a while (a non-root fork's intermediate) may have been moved there with the
        container's processes meanwhile; writing it into its own group again moves it back.
        Empty (no write at all) in the usual case."""
        try:
            has = self._lazy_of(cid)
        except FileNotFoundError:
            has = frozenset(lazy)  # the container is gone: put it back wherever it was
        return {g: g for b, g in lazy.items() if b in has}
