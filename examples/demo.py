"""The mission at a glance: make a container, list it, run something in it, see it die by poll()."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys

import syscalls
from syscalls import (
    CONTAINER_FD_CLOEXEC, CONTAINER_KILL_ON_CLOSE, CONTAINER_NEW_FS_NS, CONTAINER_NEW_IPC_NS,
    CONTAINER_NEW_NET_NS, CONTAINER_NEW_PID_NS, CONTAINER_NEW_UTS_NS,
)


VIEW = os.environ.get("CONTAINERFS_VIEW", "/run/containerfs")


def show_view() -> None:
    """The proposal's /proc/containers, as the service's FUSE view serves it."""
    path = os.path.join(VIEW, "containers")
    try:
        with open(path) as f:
            print(f"$ cat {path}\n" + f.read(), end="")
    except OSError as e:
        print(f"(no view at {path}: {e.strerror}; `containerfs ls` instead)")
        subprocess.run([sys.executable, "-m", "containerfs", "ls"], check=True)


def main() -> int:
    flags = (CONTAINER_NEW_PID_NS | CONTAINER_NEW_FS_NS | CONTAINER_NEW_UTS_NS
             | CONTAINER_NEW_IPC_NS | CONTAINER_NEW_NET_NS | CONTAINER_KILL_ON_CLOSE
             | CONTAINER_FD_CLOEXEC)
    cfd = syscalls.container_create("demo", flags)
    print(f"container_create('demo', {flags:#x}) -> fd {cfd}")
    show_view()

    r, w = os.pipe()
    pid = syscalls.fork_into_container(cfd)
    if pid == 0:  # init of the container
        os.close(w)
        socket.sethostname("demo")
        os.read(r, 1)  # wait for the go-ahead, so `ls` shows it running
        os.execvp("sh", ["sh", "-c", "echo \"  inside: pid $$, hostname $(hostname), "
                                     "links $(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ')\"; exit 3"])
    os.close(r)
    print(f"fork_into_container(fd) -> pid {pid}")
    show_view()
    os.close(w)

    poller = select.poll()
    poller.register(cfd, select.POLLHUP)
    events = poller.poll(10_000)
    print(f"poll(fd) -> {'POLLHUP: the container is dead' if events else 'timeout'}")
    _, status = os.waitpid(pid, 0)
    print(f"waitpid -> exit {os.waitstatus_to_exitcode(status)}; "
          f"container_wait -> exit {os.waitstatus_to_exitcode(syscalls.container_wait(cfd))}")
    show_view()
    os.close(cfd)
    return 0 if events else 1


if __name__ == "__main__":
    sys.exit(main())
