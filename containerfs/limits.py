"""The limits and stats of section 10 as data: names, validation, v2 normalisation, and the
translation to and from cgroup v1 files. Pure: no I/O (containerfs.resources does the I/O).

Every function here that rejects a value raises OSError(EINVAL) (or EOPNOTSUPP for what a v1
host cannot express) with a message that names the limit and the fault.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Mapping
from dataclasses import dataclass

# The controller each limit needs: EOPNOTSUPP when the host does not offer it.
CONTROLLER: dict[str, str] = {
    "cpu.max": "cpu",
    "cpu.weight": "cpu",
    "memory.max": "memory",
    "memory.high": "memory",
    "memory.swap.max": "memory",
    "pids.max": "pids",
    "cpuset.cpus": "cpuset",
    "cpuset.mems": "cpuset",
}
NAMES = tuple(CONTROLLER)
# What each limit reads as when never set (v2 syntax): the limits "set" are the others.
DEFAULT: dict[str, str] = {
    "cpu.max": "max 100000", "cpu.weight": "100", "memory.max": "max", "memory.high": "max",
    "memory.swap.max": "max", "pids.max": "max", "cpuset.cpus": "", "cpuset.mems": "",
}

# Kernel bounds, as the v1 and v2 files of Linux 6.18 enforce them (checked here): a CFS period
# of 1 ms to 1 s, a quota of 1 ms to 2^44-1 us; cpu.weight 1-10000; pids.max up to PID_MAX_LIMIT.
PERIOD_MIN, PERIOD_MAX = 1000, 1_000_000
QUOTA_MIN, QUOTA_MAX = 1000, (1 << 44) - 1
WEIGHT_MIN, WEIGHT_MAX = 1, 10000
SHARES_MIN, SHARES_MAX = 2, 262144
PIDS_MAX = 4194304
BYTES_MAX = (1 << 63) - 1  # larger values wrap in the kernel's parser (simple_strtoull)
# v1 reads an unlimited memory counter back as LONG_MAX rounded down to a page: anything this
# large is "max", whatever the page size (up to 64 KiB).
V1_UNLIMITED = BYTES_MAX - 0xFFFF
CPU_LIST_MAX = 1 << 16  # no machine has more CPUs or memory nodes; bounds the expansion

# Limits a v1 host cannot give, and why (EOPNOTSUPP there).
V1_UNSUPPORTED: dict[str, str] = {
    # v1's memory.soft_limit_in_bytes only orders reclaim under global pressure; it neither
    # throttles nor reclaims at the threshold as memory.high does (runc maps the soft limit to
    # v2's memory.low, not memory.high). Writing it would promise what the host does not do.
    "memory.high": "cgroup v1 has no equivalent of memory.high (its soft limit is closer to "
                   "memory.low); set memory.max instead",
}

_DIGITS = re.compile(r"[0-9]+")
_BYTES = re.compile(r"([0-9]+)([KMGTkmgt]?)")
_SUFFIX = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}
_RANGE = re.compile(r"([0-9]+)(?:-([0-9]+)(?::([0-9]+)/([0-9]+))?)?")


def _invalid(name: str, value: str, why: str) -> OSError:
    return OSError(errno.EINVAL, f"{name}: {value!r} is not valid: {why}")


def _unsupported(name: str, why: str) -> OSError:
    return OSError(errno.EOPNOTSUPP, f"{name}: {why}")


def check_name(name: str) -> str:
    """`name` if it is a limit of the contract; EINVAL otherwise."""
    if name not in CONTROLLER:
        raise OSError(errno.EINVAL, f"{name!r} is not a limit; known: {', '.join(NAMES)}")
    return name


def _int(name: str, value: str, text: str, low: int, high: int) -> int:
    if not _DIGITS.fullmatch(text):
        raise _invalid(name, value, f"{text!r} is not a decimal number")
    n = int(text)
    if not low <= n <= high:
        raise _invalid(name, value, f"{n} is outside {low}-{high}")
    return n


def parse_bytes(name: str, value: str) -> int | None:
    """Bytes (a K/M/G/T suffix multiplies by 1024^n) or None for "max"; EINVAL otherwise."""
    text = value.strip()
    if text == "max":
        return None
    m = _BYTES.fullmatch(text)
    if m is None:
        raise _invalid(name, value, "expected a number of bytes (K, M, G suffixes accepted) "
                                    "or 'max'")
    n = int(m.group(1)) << _SUFFIX[m.group(2).lower()]
    if n > BYTES_MAX:
        raise _invalid(name, value, "more than 2^63-1 bytes; write 'max' for no limit")
    return n


def parse_cpu_max(value: str) -> tuple[int | None, int | None]:
    """(quota or None for "max", period or None when not given); EINVAL otherwise."""
    parts = value.split()
    if len(parts) not in (1, 2):
        raise _invalid("cpu.max", value, "expected 'QUOTA PERIOD' or 'max PERIOD' "
                                         "(microseconds)")
    quota = None if parts[0] == "max" else _int("cpu.max", value, parts[0], QUOTA_MIN, QUOTA_MAX)
    period = _int("cpu.max", value, parts[1], PERIOD_MIN, PERIOD_MAX) if len(parts) == 2 else None
    return quota, period


def parse_list(name: str, value: str) -> frozenset[int]:
    """The numbers of a kernel list ("0-3,5", "0-7:2/4" strides, "" for none); EINVAL else."""
    text = value.strip()
    out: set[int] = set()
    for item in text.split(",") if text else []:
        m = _RANGE.fullmatch(item.strip())
        if m is None:
            raise _invalid(name, value, f"{item!r} is not N, N-M or N-M:USED/GROUP")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        used, group = (int(m.group(3)), int(m.group(4))) if m.group(3) is not None else (1, 1)
        if last < first or last >= CPU_LIST_MAX or not 0 < used <= group:
            raise _invalid(name, value, f"{item!r} is not a valid range")
        out.update(n for n in range(first, last + 1) if (n - first) % group < used)
    return frozenset(out)


def format_list(numbers: frozenset[int]) -> str:
    """The kernel's own spelling of a list: ascending ranges, "0-2,5"."""
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and runs[-1][1] == n - 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def normalise(name: str, value: str) -> str:
    """`value` of limit `name` in canonical v2 syntax (bytes as plain numbers, lists as
    ranges, cpu.max with its period if one was given); EINVAL for anything malformed."""
    check_name(name)
    if not isinstance(value, str):
        raise OSError(errno.EINVAL, f"{name}: the value must be a string, not "
                                    f"{type(value).__name__}")
    if name == "cpu.max":
        quota, period = parse_cpu_max(value)
        head = "max" if quota is None else str(quota)
        return head if period is None else f"{head} {period}"
    if name == "cpu.weight":
        return str(_int(name, value, value.strip(), WEIGHT_MIN, WEIGHT_MAX))
    if name.startswith("memory."):
        n = parse_bytes(name, value)
        return "max" if n is None else str(n)
    if name == "pids.max":
        text = value.strip()
        return "max" if text == "max" else str(_int(name, value, text, 0, PIDS_MAX))
    return format_list(parse_list(name, value))


# cpu.weight <-> cpu.shares: the kernel's own conversion (sched_weight_from_cgroup and
# sched_weight_to_cgroup: shares = weight * 1024 / 100, rounded to the closest), which systemd
# uses too (cgroup_cpu_weight_to_shares): the defaults 100 and 1024 match and every weight
# survives the round trip. runc's linear map of shares 2-262144 onto weights 1-10000 is for the
# other direction (a v1 config on a v2 host) and turns the default 1024 into 39.
def weight_to_shares(weight: int) -> int:
    return max(SHARES_MIN, min(SHARES_MAX, (weight * 1024 + 50) // 100))


def shares_to_weight(shares: int) -> int:
    return max(WEIGHT_MIN, min(WEIGHT_MAX, (shares * 100 + 512) // 1024))


# The v1 files each limit is read from, in its controller's hierarchy ("../F": the parent
# group's F). containerfs.resources reads them (a file that is missing is left out) and hands
# them to to_v1 / from_v1.
V1_FILES: dict[str, tuple[str, ...]] = {
    "cpu.max": ("cpu.cfs_quota_us", "cpu.cfs_period_us"),
    "cpu.weight": ("cpu.shares",),
    "memory.max": ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"),
    "memory.high": (),
    "memory.swap.max": ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"),
    "pids.max": ("pids.max",),
    "cpuset.cpus": ("cpuset.cpus", "../cpuset.cpus"),
    "cpuset.mems": ("cpuset.mems", "../cpuset.mems"),
}
_MEM, _MEMSW = "memory.limit_in_bytes", "memory.memsw.limit_in_bytes"
_NO_MEMSW = ("this host does not account swap per cgroup (no memory.memsw.* files: "
             "boot with swapaccount=1)")


def _v1_bytes(files: Mapping[str, str], f: str) -> int | None:
    n = int(files[f])
    return None if n >= V1_UNLIMITED else n


def to_v1(name: str, value: str, files: Mapping[str, str]) -> list[tuple[str, str]]:
    """The v1 writes, in order, that give limit `name` the (normalised) v2 `value`, given the
    current contents of its V1_FILES. Each intermediate state is one the kernel accepts; on a
    failed write, restoring the files already written in reverse order is valid too.
    EOPNOTSUPP for what v1 cannot express."""
    if name in V1_UNSUPPORTED:
        raise _unsupported(name, V1_UNSUPPORTED[name])
    if name == "cpu.max":
        quota, period = parse_cpu_max(value)
        q_now, p_now = int(files["cpu.cfs_quota_us"]), int(files["cpu.cfs_period_us"])
        q_new, p_new = -1 if quota is None else quota, p_now if period is None else period
        writes = []
        if p_new != p_now:
            # Each v1 write is checked with the other file's current value and against the
            # parent's quota/period ratio; an unlimited quota passes under any parent.
            if q_now != -1:
                writes.append(("cpu.cfs_quota_us", "-1"))
                q_now = -1
            writes.append(("cpu.cfs_period_us", str(p_new)))
        if q_new != q_now:
            writes.append(("cpu.cfs_quota_us", str(q_new)))
        return writes
    if name == "cpu.weight":
        return [("cpu.shares", str(weight_to_shares(int(value))))]
    if name == "pids.max":
        return [("pids.max", value)]
    if name in ("cpuset.cpus", "cpuset.mems"):
        # v2's "" follows the parent; a v1 group must hold a non-empty set of its own (no
        # process can join an empty cpuset), so it gets a copy of the parent's.
        return [(name, value or files["../" + name].strip())]
    memsw = _v1_bytes(files, _MEMSW) if _MEMSW in files else None
    mem = _v1_bytes(files, _MEM)
    if name == "memory.swap.max":
        # memsw limits memory + swap together: swap.max S is memsw = memory.max + S.
        if _MEMSW not in files:
            raise _unsupported(name, _NO_MEMSW)
        swap = parse_bytes(name, value)
        if swap is None:
            return [(_MEMSW, "-1")]
        if mem is None:
            raise _unsupported(name, "on this host (cgroup v1) swap is limited through "
                                     "memory+swap, so memory.swap.max needs memory.max set first")
        return [(_MEMSW, str(min(mem + swap, BYTES_MAX)))]
    new = parse_bytes(name, value)  # memory.max
    if memsw is None:
        return [(_MEM, "-1" if new is None else str(new))]
    if new is None or mem is None:
        raise _unsupported(name, "on this host (cgroup v1) a memory.swap.max limit needs "
                                 "memory.max: set memory.swap.max to max first")
    # Keep swap = memsw - mem; the kernel wants memsw >= mem at every moment, so raise memsw
    # first when growing and lower it last when shrinking.
    new_memsw = str(min(new + (memsw - mem), BYTES_MAX))
    if new > mem:
        return [(_MEMSW, new_memsw), (_MEM, str(new))]
    return [(_MEM, str(new)), (_MEMSW, new_memsw)]


def from_v1(name: str, files: Mapping[str, str]) -> str:
    """Limit `name` in v2 syntax from the contents of its V1_FILES. EOPNOTSUPP for limits a v1
    host does not have."""
    if name in V1_UNSUPPORTED:
        raise _unsupported(name, V1_UNSUPPORTED[name])
    if name == "cpu.max":
        quota = int(files["cpu.cfs_quota_us"])
        return f"{'max' if quota < 0 else quota} {int(files['cpu.cfs_period_us'])}"
    if name == "cpu.weight":
        return str(shares_to_weight(int(files["cpu.shares"])))
    if name == "pids.max":
        return files["pids.max"].strip()
    if name in ("cpuset.cpus", "cpuset.mems"):
        own = parse_list(name, files[name])
        # Equal to the parent's: the copy made at creation (or a reset), shown as v2 shows
        # a set that follows the parent.
        return "" if own == parse_list(name, files["../" + name]) else format_list(own)
    mem = _v1_bytes(files, _MEM)
    if name == "memory.max":
        return "max" if mem is None else str(mem)
    if _MEMSW not in files:
        raise _unsupported(name, _NO_MEMSW)
    memsw = _v1_bytes(files, _MEMSW)
    if memsw is None:
        return "max"
    # memsw set without a memory limit (not by us): memory + swap <= memsw bounds the swap.
    return str(memsw if mem is None else memsw - mem)


@dataclass(frozen=True)
class Stat:
    """Where one stat is read: `file` of `controller`'s group ("" for a file every v2 group
    has), the line `key` of it (or the whole file), divided by `divisor`."""
    controller: str
    file: str
    key: str | None = None
    divisor: int = 1


# Stats, with v2 meanings, by source. cpu.stat's usage lines are core v2 files: every v2 group
# has them, with or without the cpu controller.
V2_STATS: dict[str, Stat] = {
    "cpu.usage_usec": Stat("", "cpu.stat", "usage_usec"),
    "cpu.user_usec": Stat("", "cpu.stat", "user_usec"),
    "cpu.system_usec": Stat("", "cpu.stat", "system_usec"),
    "cpu.nr_periods": Stat("cpu", "cpu.stat", "nr_periods"),
    "cpu.nr_throttled": Stat("cpu", "cpu.stat", "nr_throttled"),
    "cpu.throttled_usec": Stat("cpu", "cpu.stat", "throttled_usec"),
    "memory.current": Stat("memory", "memory.current"),
    "memory.peak": Stat("memory", "memory.peak"),
    "memory.swap.current": Stat("memory", "memory.swap.current"),
    "memory.events.max": Stat("memory", "memory.events", "max"),
    "memory.events.oom": Stat("memory", "memory.events", "oom"),
    "memory.events.oom_kill": Stat("memory", "memory.events", "oom_kill"),
    "pids.current": Stat("pids", "pids.current"),
    "pids.events.max": Stat("pids", "pids.events", "max"),
}
V1_STATS: dict[str, Stat] = {
    "cpu.usage_usec": Stat("cpuacct", "cpuacct.usage", None, 1000),
    "cpu.user_usec": Stat("cpuacct", "cpuacct.usage_user", None, 1000),
    "cpu.system_usec": Stat("cpuacct", "cpuacct.usage_sys", None, 1000),
    "cpu.nr_periods": Stat("cpu", "cpu.stat", "nr_periods"),
    "cpu.nr_throttled": Stat("cpu", "cpu.stat", "nr_throttled"),
    "cpu.throttled_usec": Stat("cpu", "cpu.stat", "throttled_time", 1000),
    "memory.current": Stat("memory", "memory.usage_in_bytes"),
    "memory.peak": Stat("memory", "memory.max_usage_in_bytes"),
    # failcnt counts the charges refused at the limit: the same event as v2's "max".
    "memory.events.max": Stat("memory", "memory.failcnt"),
    # v1 counts a kill only in the killed process's own group (checked on 6.18: a nested
    # group's process killed at its parent's limit counts in the nested group); v2 counts it
    # there and in every ancestor. containerfs.resources sums it over the container's
    # subtree (V1_SUBTREE_SUMS), which gives the v2 number.
    "memory.events.oom_kill": Stat("memory", "memory.oom_control", "oom_kill"),
    "pids.current": Stat("pids", "pids.current"),
    "pids.events.max": Stat("pids", "pids.events", "max"),
}
V1_SUBTREE_SUMS = frozenset({"memory.events.oom_kill"})


def parse_stat(stat: Stat, text: str) -> int | None:
    """The value of `stat` in the text of its file; None if the key is absent."""
    if stat.key is None:
        return int(text.split()[0]) // stat.divisor
    for line in text.splitlines():
        key, _, rest = line.partition(" ")
        if key == stat.key:
            return int(rest.split()[0]) // stat.divisor
    return None
