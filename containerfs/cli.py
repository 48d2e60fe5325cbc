"""The `containerfs` command line: serve, run, exec, ls, status, kill, keys, limit, freeze,
thaw, stats.

Exit codes: a command's own exit code where one runs (`run` passes init's through, 128+N for a
signal), 1 for an error the command reports, 2 for bad usage (argparse).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import syscalls
from syscalls import client, protocol
from syscalls.nstypes import NAMESPACES

from . import api

NAMESPACE_OPTIONS = {t.option: t.container_flag for t in NAMESPACES}


def _serve(args: argparse.Namespace) -> int:
    import trio

    from .daemon import Config, serve

    logging.basicConfig(level=args.log_level.upper(), format="containerfs: %(message)s")
    if os.geteuid() != 0:
        print("containerfs serve: must run as root (it plays the kernel's part)", file=sys.stderr)
        return 1
    trio.run(serve, Config(socket=args.socket or client.socket_path(),
                           runtime_dir=args.runtime_dir, cgroup=args.cgroup,
                           mount=args.mount))
    return 0


def _run(args: argparse.Namespace) -> int:
    flags = syscalls.CONTAINER_FD_CLOEXEC
    if not args.keep:
        flags |= syscalls.CONTAINER_KILL_ON_CLOSE
    for option, bit in NAMESPACE_OPTIONS.items():
        if getattr(args, option) or args.all:
            flags |= bit
    if args.readonly and not args.root:
        print("containerfs run: --readonly needs --root DIR", file=sys.stderr)
        return 2
    if args.root:
        flags = (flags & ~syscalls.CONTAINER_NEW_FS_NS) | syscalls.CONTAINER_NEW_EMPTY_FS_NS
    if args.hostname is not None:
        flags |= syscalls.CONTAINER_NEW_UTS_NS
    if args.all and os.geteuid() != 0:
        flags &= ~syscalls.CONTAINER_NEW_CGROUP_NS  # keep the user namespace rule simple
    if not args.command:
        print("containerfs run: no command given", file=sys.stderr)
        return 2
    if not flags & syscalls.CONTAINER_NEW_USER_NS:
        print("containerfs run: warning: without --user the container shares the host's uids, "
              "and so the per-uid user keyring (@u) and uid limits", file=sys.stderr)
    confinement = _run_confinement(args, flags)  # checked before anything is made
    cfd = syscalls.container_create(args.name, flags)
    try:  # before the first fork: init is born under them
        if args.root:
            api.set_root(cfd, args.root, args.readonly)
        for name, value in _run_limits(args):
            syscalls.container_set_limit(cfd, name, value)
        caps, profile = confinement
        if caps is not None:
            syscalls.container_set_caps(cfd, caps)
        if profile is not None:
            syscalls.container_set_seccomp(cfd, profile)
    except BaseException:
        os.close(cfd)
        raise
    if args.keep:
        print(f"container {syscalls.container_status(cfd)['id']}", file=sys.stderr)
    return _exec_in(cfd, args.command, args.tty, "run", args.hostname)


CPU_PERIOD_US = 100000  # the kernel's default cpu.max period


def _run_confinement(args: argparse.Namespace, flags: int) -> tuple[int | None, Any]:
    """(capability mask, seccomp profile) for `run`: Podman's defaults unless --privileged,
    adjusted by --cap-add/--cap-drop and --seccomp FILE|unconfined."""
    from syscalls import caps as capset

    from .confine import DEFAULT_CAPS, DEFAULT_SECCOMP

    if args.privileged:
        return None, None
    mask = DEFAULT_CAPS
    for name in args.cap_add:
        mask |= capset.mask_of([name])
    for name in args.cap_drop:
        mask &= ~capset.mask_of([name])
    if os.geteuid() != 0 and not flags & syscalls.CONTAINER_NEW_USER_NS:
        # Without a user namespace of its own a process of another user has no capability
        # to give up but its bounding set, which it cannot change: no_new_privs (with the
        # filter) is what keeps it from gaining any.
        caps: int | None = None
    else:
        caps = mask
    if args.seccomp == "unconfined":
        return caps, None
    if args.seccomp:
        with open(args.seccomp, "rb") as f:
            return caps, f.read()
    return caps, DEFAULT_SECCOMP


def _run_limits(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The limits `run --cpus/--memory/--pids` asks for, as (v2 name, v2 value)."""
    out = []
    if args.cpus is not None:
        if not args.cpus > 0:
            raise OSError(errno.EINVAL, f"--cpus {args.cpus}: must be more than 0")
        out.append(("cpu.max", f"{max(1000, round(args.cpus * CPU_PERIOD_US))} {CPU_PERIOD_US}"))
    if args.memory is not None:
        out.append(("memory.max", args.memory))
    if args.pids is not None:
        out.append(("pids.max", args.pids))
    return out


def _exec_in(cfd: int, command: list[str], tty: bool, verb: str,
             hostname: str | None = None) -> int:
    """Run `command` in the container; return its exit code (128+N for signal N). With
    `hostname`, set from outside while the new process waits (its own caps may not allow it)."""
    master = -1
    if tty:
        master, slave = os.openpty()
    go_r, go_w = os.pipe2(os.O_CLOEXEC) if hostname is not None else (-1, -1)
    pid = syscalls.fork_into_container(cfd)
    if pid == 0:
        try:
            if go_r >= 0:
                os.close(go_w)
                while os.read(go_r, 64):
                    pass
                os.close(go_r)
            if tty:
                os.close(master)
                os.login_tty(slave)
            os.execvp(command[0], command)
        except OSError as e:
            print(f"containerfs {verb}: {command[0]}: {e.strerror}", file=sys.stderr)
        os._exit(127)
    if hostname is not None:
        os.close(go_r)
        try:
            api.set_hostname(pid, hostname)
        except OSError:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        finally:
            os.close(go_w)
    if tty:
        os.close(slave)
        _relay(master)
    _, status = os.waitpid(pid, 0)
    os.close(cfd)  # only now: with kill-on-close, this last close ends the container
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _relay(master: int) -> None:
    """Copy our stdin to the terminal and its output to our stdout until it closes; our
    window size goes to the terminal now and on every SIGWINCH (the inside gets its own)."""
    import select
    import termios
    import tty as ttymod

    saved = termios.tcgetattr(0) if os.isatty(0) else None

    def follow_window(_sig: int = 0, _frame: Any = None) -> None:
        import fcntl
        try:
            size = fcntl.ioctl(0, termios.TIOCGWINSZ, b"\0" * 8)
            fcntl.ioctl(master, termios.TIOCSWINSZ, size)
        except OSError:
            pass  # stdin is no terminal, or the inside's is gone

    old_winch = None
    if saved is not None:
        ttymod.setraw(0)
        follow_window()
        old_winch = signal.signal(signal.SIGWINCH, follow_window)
    fds = [master, 0]
    try:
        while master in fds:
            for fd in select.select(fds, [], [])[0]:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: the terminal's last user is gone
                    data = b""
                if fd == master:
                    if not data:
                        fds.remove(master)
                    else:
                        os.write(1, data)
                elif data:
                    os.write(master, data)
                else:
                    fds.remove(0)
    finally:
        if old_winch is not None:
            signal.signal(signal.SIGWINCH, old_winch)
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
        os.close(master)


def _open(cid: int) -> int:
    _reply, fds = client.call(protocol.Open(id=cid))
    return fds[0]


def _exec(args: argparse.Namespace) -> int:
    if not args.command:
        print("containerfs exec: no command given", file=sys.stderr)
        return 2
    return _exec_in(_open(args.id), args.command, args.tty, "exec")


def _keys(args: argparse.Namespace) -> int:
    """The container keyring this command line attaches (one per container, kept in @u)."""
    from syscalls import keys

    cfd = _open(args.id)
    try:
        # Ids are a registry's, and every service has its own: the name also holds the
        # handle's inode, which is this container's alone while it lives.
        name = f"containerfs.cli.{args.id}.{os.fstat(cfd).st_ino}"
        try:
            ring = keys.search(keys.KEY_SPEC_USER_KEYRING, "keyring", name)
        except OSError:
            ring = 0
        if args.action == "add" and not ring:
            ring = keys.add_key("keyring", name, None, keys.KEY_SPEC_USER_KEYRING)
            try:
                keys.keyctl_set_container_keyring(cfd, ring)
            except OSError:
                keys.unlink(ring, keys.KEY_SPEC_USER_KEYRING)
                raise
    finally:
        os.close(cfd)
    if args.action == "add":
        print(keys.add_key(args.type, args.description, args.data.encode(), ring))
        return 0
    if not ring:
        return 0  # nothing attached by this command line: no keys to show
    for key in keys.keyring_contents(ring):
        ktype, uid, gid, perm, desc = keys.describe(key)
        print(f"{key:>10} {ktype:<10} {uid:>5} {gid:>5} {perm:08x} {desc}")
    return 0


def _ls(args: argparse.Namespace) -> int:
    print(f"{'ID':>6} {'NAME':<24} {'STATE':<8} {'INIT':>7} {'OWNER':>5} FLAGS")
    rows = syscalls.container.container_list()
    depth: dict[int, int] = {}
    if args.tree:  # each container under its parent (one you may see), indented by level
        ids = {row["id"] for row in rows}
        kids: dict[int, list[dict[str, Any]]] = {}
        for row in rows:
            kids.setdefault(row["parent"] if row["parent"] in ids else 0, []).append(row)
        rows = []

        def walk(parent: int, level: int) -> None:
            for row in kids.get(parent, []):
                rows.append(row)
                depth[row["id"]] = level
                walk(row["id"], level + 1)
        walk(0, 0)
    for row in rows:
        name = "  " * depth.get(row["id"], 0) + row["name"]
        print(f"{row['id']:>6} {name:<24} {row['state']:<8} {row['init_pid'] or '-':>7} "
              f"{row['owner']:>5} {row['flags']:#05x}")
    return 0


def _ps(args: argparse.Namespace) -> int:
    cfd = _open(args.id)
    try:
        listed = syscalls.container_pids(cfd)
    finally:
        os.close(cfd)
    print(f"{'PID':>7} {'HOSTPID':>7} COMMAND")  # HOSTPID: as this command line sees it
    for outer, inner in listed:
        try:
            with open(f"/proc/{outer}/cmdline", "rb") as f:
                argv = f.read().rstrip(b"\0").replace(b"\0", b" ")
        except OSError:
            argv = b"?"  # exited meanwhile
        print(f"{inner:>7} {outer:>7} {argv.decode(errors='replace')}")
    return 0


def _limit(args: argparse.Namespace) -> int:
    cfd = _open(args.id)
    try:
        if args.value is None:
            print(syscalls.container_get_limit(cfd, args.name))
        else:
            syscalls.container_set_limit(cfd, args.name, args.value)
    finally:
        os.close(cfd)
    return 0


def _freeze(args: argparse.Namespace) -> int:
    cfd = _open(args.id)
    try:
        (syscalls.container_freeze if args.cmd == "freeze" else syscalls.container_thaw)(cfd)
    finally:
        os.close(cfd)
    return 0


def _stats(args: argparse.Namespace) -> int:
    """Usage once, or (--watch) refreshed every interval like top, with the CPU share of the
    last interval, until interrupted or the container dies."""
    import time

    cfd = _open(args.id)
    try:
        if not args.watch:
            for name, value in sorted(syscalls.container_stats(cfd).items()):
                print(f"{name} {value}")
            return 0
        last: tuple[float, int] | None = None
        try:
            while True:
                stats, now = syscalls.container_stats(cfd), time.monotonic()
                usage = stats.get("cpu.usage_usec", 0)
                cpu = (f"{(usage - last[1]) / ((now - last[0]) * 1e6) * 100:6.1f}%"
                       if last else "     -")
                last = (now, usage)
                sys.stdout.write("\x1b[H\x1b[2J" if sys.stdout.isatty() else "\n")
                print(f"container {args.id}  cpu {cpu}  "
                      f"memory {_human(stats.get('memory.current', 0))} "
                      f"(peak {_human(stats.get('memory.peak', 0))})  "
                      f"pids {stats.get('pids.current', 0)}  "
                      f"oom kills {stats.get('memory.events.oom_kill', 0)}")
                for name, value in sorted(stats.items()):
                    print(f"  {name:<24} {value}")
                sys.stdout.flush()
                time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0
        except OSError as e:
            if e.errno == errno.ECANCELED:  # it died: the watch is over
                print(f"containerfs stats: container {args.id} is dead", file=sys.stderr)
                return 0
            raise
    finally:
        os.close(cfd)


def _human(n: int) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _kill(args: argparse.Namespace) -> int:
    client.call(protocol.Kill(id=args.id))
    return 0


def _status(args: argparse.Namespace) -> int:
    for row in syscalls.container.container_list():
        if row["id"] == args.id:
            for key, value in row.items():
                print(f"{key}: {value}")
            return 0
    print(f"containerfs status: no container {args.id} (or not yours)", file=sys.stderr)
    return 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="containerfs", description="containers as kernel-like objects")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the service in the foreground")
    s.add_argument("--socket", help="control socket (default $CONTAINERFS_SOCKET or "
                                    f"{syscalls.constants.DEFAULT_SOCKET})")
    s.add_argument("--runtime-dir", default="/run/containerfs.d", help="state directory")
    s.add_argument("--cgroup", default="containerfs", help="base cgroup name under cgroup2")
    s.add_argument("--mount", default="/run/containerfs",
                   help="where to mount the FUSE view ('' for none; default %(default)s)")
    s.add_argument("--no-mount", dest="mount", action="store_const", const="",
                   help="serve without the FUSE view")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=_serve)
    r = sub.add_parser("run", help="run a command as init of a new container")
    r.add_argument("--name", default="run")
    r.add_argument("--all", action="store_true", help="every namespace")
    for option in NAMESPACE_OPTIONS:
        r.add_argument(f"--{option}", action="store_true", help=f"new {option} namespace")
    r.add_argument("--keep", action="store_true",
                   help="keep the container after this command exits (no kill-on-close)")
    r.add_argument("-t", "--tty", action="store_true", help="give the command a terminal")
    r.add_argument("--root", metavar="DIR",
                   help="a bind of DIR as the root (an empty mount namespace), with its own /proc")
    r.add_argument("--readonly", action="store_true", help="the --root tree read-only")
    r.add_argument("--hostname", metavar="NAME", help="its hostname (a new UTS namespace)")
    r.add_argument("--cpus", type=float, help="CPUs it may use (cpu.max), e.g. 0.2")
    r.add_argument("--memory", help="memory limit (memory.max), e.g. 64M")
    r.add_argument("--pids", help="how many processes at most (pids.max)")
    r.add_argument("--privileged", action="store_true",
                   help="no confinement: every capability, no seccomp filter")
    r.add_argument("--cap-add", action="append", default=[], metavar="CAP",
                   help="keep this capability too (e.g. NET_RAW, or ALL)")
    r.add_argument("--cap-drop", action="append", default=[], metavar="CAP",
                   help="drop this capability (e.g. CHOWN, or ALL)")
    r.add_argument("--seccomp", metavar="FILE|unconfined",
                   help="an OCI seccomp profile instead of the default one")
    r.add_argument("command", nargs=argparse.REMAINDER)
    r.set_defaults(func=_run)
    e = sub.add_parser("exec", help="run a command in a running container, by id")
    e.add_argument("id", type=int)
    e.add_argument("-t", "--tty", action="store_true", help="give the command a terminal")
    e.add_argument("command", nargs=argparse.REMAINDER)
    e.set_defaults(func=_exec)
    ls = sub.add_parser("ls", help="list your containers")
    ls.add_argument("--tree", action="store_true", help="nested containers under their parent")
    ls.set_defaults(func=_ls)
    ps = sub.add_parser("ps", help="a container's processes: pid inside, pid here, command")
    ps.add_argument("id", type=int)
    ps.set_defaults(func=_ps)
    ks = sub.add_parser("keys", help="keys given to a container (its container keyring)")
    ks.add_argument("id", type=int)
    kss = ks.add_subparsers(dest="action", required=True)
    kss.add_parser("list", help="keys given to it by `keys ID add`")
    ka = kss.add_parser("add", help="give it a key, found by request_key() inside")
    ka.add_argument("type")
    ka.add_argument("description")
    ka.add_argument("data")
    ks.set_defaults(func=_keys)
    k = sub.add_parser("kill", help="kill a container by id")
    k.add_argument("id", type=int)
    k.set_defaults(func=_kill)
    lim = sub.add_parser("limit", help="show or set a limit (cgroup v2 names and syntax)")
    lim.add_argument("id", type=int)
    lim.add_argument("name", help="cpu.max, cpu.weight, memory.max, memory.high, "
                                  "memory.swap.max, pids.max, cpuset.cpus, cpuset.mems")
    lim.add_argument("value", nargs="?", help="the new value; without it, show the limit")
    lim.set_defaults(func=_limit)
    for verb, what in (("freeze", "stop every process of a container"),
                       ("thaw", "let a frozen container run again")):
        fz = sub.add_parser(verb, help=what)
        fz.add_argument("id", type=int)
        fz.set_defaults(func=_freeze)
    sts = sub.add_parser("stats", help="a container's usage (cgroup v2 names)")
    sts.add_argument("id", type=int)
    sts.add_argument("--watch", action="store_true", help="refresh like top until ^C")
    sts.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    sts.set_defaults(func=_stats)
    st = sub.add_parser("status", help="show one container")
    st.add_argument("id", type=int)
    st.set_defaults(func=_status)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "command", None) and args.command[0] == "--":
        args.command = args.command[1:]
    try:
        return int(args.func(args))
    except OSError as e:
        print(f"containerfs {args.cmd}: {e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
