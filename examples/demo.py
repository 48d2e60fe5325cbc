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


def main() -> int:
    flags = (CONTAINER_NEW_PID_NS | CONTAINER_NEW_FS_NS | CONTAINER_NEW_UTS_NS
             | CONTAINER_NEW_IPC_NS | CONTAINER_NEW_NET_NS | CONTAINER_KILL_ON_CLOSE
             | CONTAINER_FD_CLOEXEC)
    cfd = syscalls.container_create("demo", flags)
    print(f"container_create('demo', {flags:#x}) -> fd {cfd}")
    subprocess.run([sys.executable, "-m", "containerfs", "ls"], check=True)

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
    subprocess.run([sys.executable, "-m", "containerfs", "ls"], check=True)
    os.close(w)

    poller = select.poll()
    poller.register(cfd, select.POLLHUP)
    events = poller.poll(10_000)
    print(f"poll(fd) -> {'POLLHUP: the container is dead' if events else 'timeout'}")
    _, status = os.waitpid(pid, 0)
    print(f"waitpid -> exit {os.waitstatus_to_exitcode(status)}; "
          f"container_wait -> exit {os.waitstatus_to_exitcode(syscalls.container_wait(cfd))}")
    os.close(cfd)
    subprocess.run([sys.executable, "-m", "containerfs", "ls"], check=True)
    return 0 if events else 1


if __name__ == "__main__":
    sys.exit(main())
