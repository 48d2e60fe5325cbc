"""The `containerfs-oci` command line: runc's (global flags, then a command, its flags, the
container id, then the command's arguments). Flags runc takes that mean nothing here are
accepted and ignored. Exit status 0, or 1 with the error logged in runc's format; `run` and
`exec` in the foreground exit with the process's status (128+N for a signal)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from . import VERSION, commands, outside, state
from .config import OciError, Process, load_bundle, parse_process
from .log import Log

SPEC_VERSION = "1.0.2"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise OciError(message)


def _create_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", "-b", default=".")
    p.add_argument("--console-socket")
    p.add_argument("--pid-file")
    p.add_argument("--pidfd-socket")
    p.add_argument("--preserve-fds", type=int, default=0)
    for flag in ("--no-pivot", "--no-new-keyring"):
        p.add_argument(flag, action="store_true")
    p.add_argument("id")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="containerfs-oci", description="an OCI runtime whose containers are "
                "containerfs container objects (runc's command line)")
    p.add_argument("--version", "-v", action="store_true")
    p.add_argument("--root", default=state.DEFAULT_ROOT, help="state directory")
    p.add_argument("--log", default="", help="log file (default: stderr)")
    p.add_argument("--log-format", default="text", choices=["text", "json"])
    p.add_argument("--socket", help="the containerfs service's control socket")
    for flag in ("--debug", "--systemd-cgroup", "--no-pivot"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rootless", help=argparse.SUPPRESS)
    p.add_argument("--criu", help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="cmd")
    _create_flags(sub.add_parser("create", help="create a container (init waits for start)"))
    r = sub.add_parser("run", help="create and start a container")
    _create_flags(r)
    r.add_argument("--detach", "-d", action="store_true")
    r.add_argument("--keep", action="store_true")
    r.add_argument("--no-subreaper", action="store_true")
    for name in ("start", "state", "pause", "resume"):
        sub.add_parser(name).add_argument("id")
    k = sub.add_parser("kill", help="send a signal to init (default SIGTERM)")
    k.add_argument("--all", "-a", action="store_true")
    k.add_argument("id")
    k.add_argument("signal", nargs="?", default="SIGTERM")
    d = sub.add_parser("delete", help="remove a stopped (or, with --force, any) container")
    d.add_argument("--force", "-f", action="store_true")
    d.add_argument("id")
    ps = sub.add_parser("ps", help="the container's processes")
    ps.add_argument("--format", "-f", default="table")
    ps.add_argument("id")
    ps.add_argument("ps_args", nargs=argparse.REMAINDER)
    e = sub.add_parser("exec", help="run a process in a running container")
    e.add_argument("--console-socket")
    e.add_argument("--pidfd-socket")
    e.add_argument("--cwd")
    e.add_argument("--env", "-e", action="append", default=[])
    e.add_argument("--tty", "-t", action="store_true")
    e.add_argument("--user", "-u")
    e.add_argument("--additional-gids", "-g", action="append", default=[], type=int)
    e.add_argument("--process", "-p")
    e.add_argument("--detach", "-d", action="store_true")
    e.add_argument("--pid-file")
    e.add_argument("--process-label")
    e.add_argument("--apparmor")
    e.add_argument("--no-new-privs", action="store_true")
    e.add_argument("--cap", "-c", action="append", default=[])
    e.add_argument("--preserve-fds", type=int, default=0)
    e.add_argument("--ignore-paused", action="store_true")
    e.add_argument("--cgroup")
    e.add_argument("id")
    e.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("features", help="what this runtime supports (JSON)")
    return p


def _exec_process(args: argparse.Namespace, root: str) -> Process:
    """The process to exec: --process JSON, or the arguments and flags (runc's defaults:
    the container's env and user are not inherited, cwd /)."""
    if args.process:
        try:
            with open(args.process) as f:
                spec = json.load(f)
        except (OSError, ValueError) as e:
            raise OciError(f"--process {args.process}: {e}") from None
        if not isinstance(spec, dict):
            raise OciError(f"--process {args.process}: not a JSON object")
        proc = parse_process(spec, "process")
        if args.tty:
            proc.terminal = True
        return proc
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise OciError("exec: no command given (args after the container id, or --process)")
    # As runc: the container's own process (config.json) is the base, the flags change it.
    base = load_bundle(state.load(root, args.id).bundle).process
    base.args = command
    base.terminal = args.tty
    base.env = base.env + args.env
    if args.cwd:
        base.cwd = args.cwd
    if args.user:
        uid, _, gid = args.user.partition(":")
        try:
            base.uid, base.gid = int(uid), int(gid or 0)
        except ValueError:
            raise OciError(f"exec --user {args.user}: UID[:GID] as numbers") from None
        base.groups = list(args.additional_gids)
    elif args.additional_gids:
        base.groups = list(args.additional_gids)
    if args.no_new_privs:
        base.no_new_privs = True
    if args.cap:
        from syscalls import caps as capset
        try:
            extra = capset.mask_of([c if c.startswith("CAP_") else f"CAP_{c}" for c in args.cap])
        except OSError as e:
            raise OciError(f"exec --cap: {e.strerror}") from None
        base.caps = {k: v | extra for k, v in (base.caps or {}).items()} if base.caps else None
    return base


def features() -> dict[str, object]:
    from syscalls import caps as capset

    from .mountopts import _ATTRS, _IGNORED
    return {
        "ociVersionMin": "1.0.0", "ociVersionMax": "1.1.0",
        "hooks": ["prestart", "createRuntime", "poststart", "poststop"],
        "mountOptions": sorted(set(_ATTRS) | _IGNORED | {"bind", "rbind"}),
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts"],
            "capabilities": capset.names_of(capset.all_caps()),
            "cgroup": {"v1": True, "v2": True, "systemd": False, "systemdUser": False},
            "seccomp": {"enabled": True, "actions": ["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO",
                                                     "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS",
                                                     "SCMP_ACT_KILL_THREAD", "SCMP_ACT_LOG",
                                                     "SCMP_ACT_TRAP", "SCMP_ACT_TRACE"],
                        "operators": ["SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT",
                                      "SCMP_CMP_LE", "SCMP_CMP_LT", "SCMP_CMP_MASKED_EQ",
                                      "SCMP_CMP_NE"]},
            "apparmor": {"enabled": False}, "selinux": {"enabled": False},
        },
        "annotations": {"io.github.containerfs.runtime": "containerfs-oci"},
    }


def _dispatch(args: argparse.Namespace) -> int:
    root, sock = args.root, args.socket
    if sock:
        os.environ["CONTAINERFS_SOCKET"] = sock
    cmd = args.cmd
    if cmd in ("create", "run"):
        detach = cmd == "create" or args.detach
        st, made = outside.create(root, args.id, args.bundle, pid_file=args.pid_file,
                                  console_socket=args.console_socket,
                                  preserve_fds=args.preserve_fds, detach=detach,
                                  socket_path=sock, pidfd_socket=args.pidfd_socket)
        if cmd == "create":
            return 0
        try:
            commands.start(root, args.id, sock)
        except BaseException:
            commands.delete(root, args.id, True, sock)
            raise
        if detach:
            return 0
        try:
            return commands.wait_for(made)
        finally:
            if not args.keep:
                commands.delete(root, args.id, True, sock)
    if cmd == "start":
        commands.start(root, args.id, sock)
    elif cmd == "state":
        print(json.dumps(commands.show_state(root, args.id, sock), indent=2))
    elif cmd == "kill":
        commands.kill(root, args.id, commands.parse_signal(args.signal), args.all, sock)
    elif cmd == "delete":
        commands.delete(root, args.id, args.force, sock)
    elif cmd in ("pause", "resume"):
        commands.pause(root, args.id, cmd == "resume", sock)
    elif cmd == "ps":
        ps_args = args.ps_args[1:] if args.ps_args[:1] == ["--"] else args.ps_args
        print(commands.ps(root, args.id, args.format, ps_args, sock))
    elif cmd == "exec":
        return commands.exec_process(
            root, args.id, _exec_process(args, root), detach=args.detach,
            pid_file=args.pid_file, console_socket=args.console_socket,
            preserve_fds=args.preserve_fds, socket_path=sock, pidfd_socket=args.pidfd_socket)
    elif cmd == "features":
        print(json.dumps(features(), indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    log = Log(None, "text")
    try:
        args = parser().parse_args(argv)
        log = Log(args.log, args.log_format)
        if args.version:
            print(f"containerfs-oci version {VERSION}\nspec: {SPEC_VERSION}")
            return 0
        if not args.cmd:
            raise OciError("no command given (create, start, state, kill, delete, run, exec, "
                           "pause, resume, ps, features)")
        return _dispatch(args)
    except OciError as e:
        log.error(str(e))
    except OSError as e:
        log.error(e.strerror or str(e) if not e.filename else f"{e.filename}: {e.strerror}")
    except KeyboardInterrupt:
        log.error("interrupted")
    except Exception as e:  # a fault of ours still reaches the engine in runc's log format
        log.error(f"internal error: {type(e).__name__}: {e}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
