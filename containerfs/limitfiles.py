"""Limits and usage of a container's groups in v2 names and syntax, whatever the layout
(resources.ResourceGroups mixes this in; containerfs.limits translates for v1). A limit of a
lazy controller (containerfs.lazygroups) whose group the container has not got reads as its
default; setting one makes the group and moves the container's processes in."""

from __future__ import annotations

import errno
import logging
import os

from . import limits
from .lazygroups import LazyGroups

log = logging.getLogger("containerfs")


class LimitFiles(LazyGroups):
    """set_limit, get_limit, limits and stats, by container id."""

    v2_base: str | None
    _v1: dict[str, str]  # controller -> the base directory of its v1 hierarchy

    # Provided by ResourceGroups.
    def _where(self, controller: str) -> str | None:
        raise NotImplementedError

    # --- limits ---------------------------------------------------------------------
    def _v1_files(self, d: str, name: str) -> dict[str, str]:
        out = {}
        for f in limits.V1_FILES[name]:
            try:
                out[f] = self._read(os.path.join(d, f)).strip()
            except FileNotFoundError:
                pass
        return out

    def _check(self, cid: int, name: str) -> tuple[str, str, bool]:
        """(the base and the group's directory carrying limit `name`, whether it is cgroup2),
        after the checks that need no value: EINVAL unknown name, EOPNOTSUPP not available
        here. The directory may not exist yet (a lazy hierarchy's: _absent)."""
        base = self._where(limits.CONTROLLER[limits.check_name(name)])
        if base is None:
            raise OSError(errno.EOPNOTSUPP, f"{name}: the {limits.CONTROLLER[name]} controller "
                                            "is not available on this host")
        d, is_v2 = os.path.join(base, self._group(cid)), base == self.v2_base
        if not is_v2 and name in limits.V1_UNSUPPORTED:
            raise OSError(errno.EOPNOTSUPP, f"{name}: {limits.V1_UNSUPPORTED[name]}")
        if is_v2 and not os.path.exists(os.path.join(d, name)):  # memory.swap.max: no swap
            raise OSError(errno.EOPNOTSUPP, f"{name} is not available on this host")
        return base, d, is_v2

    def needs_groups(self, cid: int, name: str) -> bool:
        """Whether setting limit `name` makes groups and moves processes (then the caller
        should call set_limit from a worker thread)."""
        base = self._where(limits.CONTROLLER.get(name, ""))
        return base is not None and self._absent(cid, base)

    def set_limit(self, cid: int, name: str, value: str) -> None:
        """Set limit `name` (v2 name and syntax) at once. EINVAL unknown name or malformed
        value, EOPNOTSUPP not available on this host (checked before any write); a write the
        kernel refuses raises its errno, naming the file, with the files written so far
        restored."""
        base, d, is_v2 = self._check(cid, name)
        value = limits.normalise(name, value)
        with self._lock:  # the v1 translations read, then write several files
            if not self._absent(cid, base):
                self._write_limit(d, is_v2, name, value)
                return
            # The container's first limit of a lazy controller: its tree's groups, the limit,
            # then every process moved in (containerfs.lazygroups).
            tree, made = self._make_lazy(cid, base)
            try:
                self._write_limit(d, is_v2, name, value)
            except BaseException:
                self._unmake(made)
                raise
            self._register(tree, base)
        self._sweep(tree, base)

    def _write_limit(self, d: str, is_v2: bool, name: str, value: str) -> None:
        """Write a normalised limit into group `d` (with the lock held), restoring the v1
        files already written if the kernel refuses one."""
        if is_v2:
            self._write(os.path.join(d, name), value)
            return
        files = self._v1_files(d, name)
        old = {f: files[f] for f in files}
        writes = limits.to_v1(name, value, files)
        done: list[str] = []
        try:
            for f, v in writes:
                self._write(os.path.join(d, f), v)
                done.append(f)
        except OSError:
            for f in reversed(list(dict.fromkeys(done))):
                try:
                    self._write(os.path.join(d, f), old[f])
                except OSError as e:
                    log.error("could not restore %s: %s", os.path.join(d, f), e)
            raise

    def get_limit(self, cid: int, name: str) -> str:
        """Limit `name` as the kernel holds it now, in v2 syntax (memory rounded down to
        pages by the kernel). Errors as set_limit."""
        base, d, is_v2 = self._check(cid, name)
        if is_v2:
            return self._read(os.path.join(d, name)).strip()
        if self._absent(cid, base):
            return limits.DEFAULT[name]  # no group: nothing limits it
        return limits.from_v1(name, self._v1_files(d, name))

    def limits(self, cid: int) -> dict[str, str]:
        """Every limit available here whose value is not the default, in v2 syntax."""
        out = {}
        for name in limits.NAMES:
            try:
                value = self.get_limit(cid, name)
            except OSError as e:
                if e.errno == errno.EOPNOTSUPP:
                    continue
                raise
            if value != limits.DEFAULT[name]:
                out[name] = value
        return out

    def stats(self, cid: int) -> dict[str, int]:
        """Usage with v2 names and meanings, for the container and those nested in it; a
        stat whose controller or file this host lacks is left out."""
        out: dict[str, int] = {}
        for name, v2 in limits.V2_STATS.items():
            v1 = limits.V1_STATS.get(name)
            stat = v1 if v1 is not None and v1.controller in self._v1 else v2
            base = self._where(stat.controller) if stat is v2 else self._v1[stat.controller]
            if base is None:
                continue
            if self._absent(cid, base):
                out[name] = 0  # (cpu.nr_periods...: no group, never limited, never throttled)
                continue
            top = os.path.join(base, self._group(cid))
            dirs = [t for t, _, _ in os.walk(top)] if (
                stat is v1 and name in limits.V1_SUBTREE_SUMS) else [top]
            try:
                values = [limits.parse_stat(stat, self._read(os.path.join(d, stat.file)))
                          for d in dirs]
            except FileNotFoundError:
                continue
            if all(v is not None for v in values):
                out[name] = sum(v for v in values if v is not None)
        return out
