"""The proposal's container test, keyring part, on our API: a manager and its container.

The manager makes a container, gives it a container keyring holding a sample key
(`foobar` = `wibble`), traps the `user` key requests made inside, and starts init, which runs
a shell command (by default the proposal's `keyctl request2 user foo bar @s`, then reads the
keys back). Each trapped request reaches the manager's handler, which instantiates the key;
a key found in the container keyring reaches nobody. Run as root with a service up.

    python examples/upcall_manager.py [--command 'keyctl request2 user x y @s']
"""

from __future__ import annotations

import argparse
import os
import select
import sys

import syscalls
from containerfs.keyring import Request, intercept
from syscalls import (
    CONTAINER_FD_CLOEXEC,
    CONTAINER_KILL_ON_CLOSE,
    CONTAINER_NEW_PID_NS,
    KEY_SPEC_PROCESS_KEYRING,
    keyctl_set_container_keyring,
    keys,
)

DEFAULT_COMMAND = (
    'id=$(keyctl request2 user foo bar @s) && echo "inside: foo = $(keyctl print $id)" && '
    'echo "inside: foobar = $(keyctl print $(keyctl request user foobar))"'
)


def handle(req: Request) -> None:
    """The manager's handler: answer every request with a key made from what was asked."""
    print(f"manager: request for {req.type} key {req.description!r} "
          f"(callout {req.callout_info!r}) from uid {req.uid}", flush=True)
    req.instantiate(f"answer to {req.description}: {req.callout_info}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--command", default=DEFAULT_COMMAND, help="shell command init runs")
    args = ap.parse_args()

    cfd = syscalls.container_create("foo-test", CONTAINER_NEW_PID_NS | CONTAINER_KILL_ON_CLOSE
                                    | CONTAINER_FD_CLOEXEC)
    # The container keyring, filled from outside (before or while the container runs).
    keyring = keys.add_key("keyring", "_container", None, KEY_SPEC_PROCESS_KEYRING)
    keyctl_set_container_keyring(cfd, keyring)
    keys.add_key("user", "foobar", b"wibble", keyring)

    with intercept(cfd, "user") as requests:
        pid = syscalls.fork_into_container(cfd)
        if pid == 0:  # init
            try:
                os.execvp("sh", ["sh", "-c", args.command])
            finally:
                os._exit(127)
        init = os.pidfd_open(pid)
        poller = select.poll()
        poller.register(requests.fileno(), select.POLLIN)
        poller.register(init, select.POLLIN)
        while True:
            ready = dict(poller.poll())
            if requests.fileno() in ready:
                try:
                    handle(requests.get(timeout=0))
                except EOFError:  # the container died: no more requests
                    break
            elif init in ready:
                break
        os.close(init)
    _, status = os.waitpid(pid, 0)
    keys.invalidate(keyring)
    os.close(cfd)
    code = os.waitstatus_to_exitcode(status)
    print(f"manager: init exited with {code}", flush=True)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
