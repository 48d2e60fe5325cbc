"""The `containerfs` command line: serve, run, ls, status, kill.

Exit codes: a command's own exit code where one runs (`run` passes init's through, 128+N for a
signal), 1 for an error the command reports, 2 for bad usage (argparse).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import syscalls
from syscalls import _client, protocol

NAMESPACE_OPTIONS = {
    "mount": syscalls.CONTAINER_NEW_FS_NS,
    "uts": syscalls.CONTAINER_NEW_UTS_NS,
    "ipc": syscalls.CONTAINER_NEW_IPC_NS,
    "net": syscalls.CONTAINER_NEW_NET_NS,
    "pid": syscalls.CONTAINER_NEW_PID_NS,
    "user": syscalls.CONTAINER_NEW_USER_NS,
    "cgroupns": syscalls.CONTAINER_NEW_CGROUP_NS,
}


def _serve(args: argparse.Namespace) -> int:
    import trio

    from .daemon import Config, serve

    logging.basicConfig(level=args.log_level.upper(), format="containerfs: %(message)s")
    if os.geteuid() != 0:
        print("containerfs serve: must run as root (it plays the kernel's part)", file=sys.stderr)
        return 1
    trio.run(serve, Config(socket=args.socket or _client.socket_path(),
                           runtime_dir=args.runtime_dir, cgroup=args.cgroup))
    return 0


def _run(args: argparse.Namespace) -> int:
    flags = syscalls.CONTAINER_KILL_ON_CLOSE | syscalls.CONTAINER_FD_CLOEXEC
    for option, bit in NAMESPACE_OPTIONS.items():
        if getattr(args, option) or args.all:
            flags |= bit
    if args.all and os.geteuid() != 0:
        flags &= ~syscalls.CONTAINER_NEW_CGROUP_NS  # keep the user namespace rule simple
    if not args.command:
        print("containerfs run: no command given", file=sys.stderr)
        return 2
    cfd = syscalls.container_create(args.name, flags)
    pid = syscalls.fork_into_container(cfd)
    if pid == 0:
        try:
            os.execvp(args.command[0], args.command)
        except OSError as e:
            print(f"containerfs run: {args.command[0]}: {e.strerror}", file=sys.stderr)
        os._exit(127)
    _, status = os.waitpid(pid, 0)
    os.close(cfd)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _ls(args: argparse.Namespace) -> int:
    reply, _ = _client.call(protocol.List())
    print(f"{'ID':>6} {'NAME':<24} {'STATE':<8} {'INIT':>7} {'OWNER':>5} FLAGS")
    for row in reply["containers"]:
        print(f"{row['id']:>6} {row['name']:<24} {row['state']:<8} {row['init_pid'] or '-':>7} "
              f"{row['owner']:>5} {row['flags']:#05x}")
    return 0


def _kill(args: argparse.Namespace) -> int:
    _client.call(protocol.Kill(id=args.id))
    return 0


def _status(args: argparse.Namespace) -> int:
    reply, _ = _client.call(protocol.List())
    for row in reply["containers"]:
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
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=_serve)
    r = sub.add_parser("run", help="run a command as init of a new container")
    r.add_argument("--name", default="run")
    r.add_argument("--all", action="store_true", help="every namespace")
    for option in NAMESPACE_OPTIONS:
        r.add_argument(f"--{option}", action="store_true", help=f"new {option} namespace")
    r.add_argument("command", nargs=argparse.REMAINDER)
    r.set_defaults(func=_run)
    sub.add_parser("ls", help="list your containers").set_defaults(func=_ls)
    k = sub.add_parser("kill", help="kill a container by id")
    k.add_argument("id", type=int)
    k.set_defaults(func=_kill)
    st = sub.add_parser("status", help="show one container")
    st.add_argument("id", type=int)
    st.set_defaults(func=_status)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except OSError as e:
        print(f"containerfs {args.cmd}: {e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
