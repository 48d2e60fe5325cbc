"""containerfs.trio: containers in a trio program.

`await wait(container)` sleeps until the container is dead (POLLHUP on the handle through
trio's own epoll, no thread); `await run_process(container, argv, ...)` mirrors
trio.run_process. (Absolute imports: `import trio` here and elsewhere in containerfs is the
trio package, never this module.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import trio

import syscalls

from .api import Container
from .spawn import ContainerPopen


def _fd(container: Container | int) -> int:
    return container if isinstance(container, int) else container.fd


async def wait(container: Container | int) -> int:
    """Wait, without a thread, until the container is dead; return init's wait status."""
    await trio.lowlevel.wait_readable(_fd(container))  # POLLHUP wakes readers
    return syscalls.container_wait(_fd(container))  # dead: returns at once


async def _wait_process(p: ContainerPopen) -> int:
    """Wait for process `p` (ours) through its pidfd, no thread; reap it."""
    pidfd = os.pidfd_open(p.pid)
    try:
        while p.poll() is None:
            await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    assert p.returncode is not None
    return p.returncode


async def _start(make: Callable[[], ContainerPopen]) -> ContainerPopen:
    """Run `make` (it blocks until the command runs) in a thread of its own that ends with it,
    not one of trio's cached workers: an idle thread left behind would make this process
    multi-threaded for seconds, and fork_into_container take its slow path. Shielded: a
    process made while a cancel came is killed by the caller's wait, never leaked."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    box: list[ContainerPopen | BaseException] = []

    def work() -> None:
        try:
            box.append(make())
        except BaseException as e:
            box.append(e)
        finally:
            token.run_sync_soon(done.set)

    thread = threading.Thread(target=work, name="containerfs-spawn", daemon=True)
    thread.start()
    with trio.CancelScope(shield=True):
        await done.wait()
    thread.join()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


async def _kill(p: ContainerPopen) -> None:
    p.kill()


async def run_process(container: Container, command: Any, *, stdin: Any = b"",
                      capture_stdout: bool = False, capture_stderr: bool = False,
                      check: bool = True,
                      deliver_cancel: Callable[[ContainerPopen], Awaitable[object]] | None = None,
                      task_status: Any = trio.TASK_STATUS_IGNORED,
                      **options: Any) -> subprocess.CompletedProcess[bytes]:
    """trio.run_process in the container: same arguments and result (the process given to
    task_status.started is a ContainerPopen). Cancelled, the process is killed (SIGKILL, or
    `deliver_cancel`) and waited for. Starting it runs in a short-lived thread of its own (the
    spawn blocks until the command runs); the rest is trio's epoll."""
    for name in ("stdout", "stderr"):
        if options.get(name) is not None and (capture_stdout if name == "stdout"
                                              else capture_stderr):
            raise ValueError(f"can't specify both {name} and capture_{name}")
    feed: bytes | None = None
    if isinstance(stdin, (bytes, bytearray, memoryview)):
        feed = bytes(stdin)
        options["stdin"] = subprocess.PIPE
    else:
        options["stdin"] = stdin
    if capture_stdout:
        options["stdout"] = subprocess.PIPE
    if capture_stderr:
        options["stderr"] = subprocess.PIPE
    p = await _start(lambda: container.popen(command, **options))
    out: dict[str, bytes] = {}

    async def feed_stdin(stream: trio.lowlevel.FdStream) -> None:
        async with stream:
            if feed:
                try:
                    await stream.send_all(feed)
                except trio.BrokenResourceError:
                    pass

    async def read(name: str, stream: trio.lowlevel.FdStream) -> None:
        chunks = []
        async with stream:
            while data := await stream.receive_some():
                chunks.append(data)
        out[name] = b"".join(chunks)

    def stream(f: Any) -> trio.lowlevel.FdStream:
        s = trio.lowlevel.FdStream(os.dup(f.fileno()))
        f.close()
        return s

    try:
        async with trio.open_nursery() as nursery:
            if p.stdin is not None:
                nursery.start_soon(feed_stdin, stream(p.stdin))
            if p.stdout is not None:
                nursery.start_soon(read, "stdout", stream(p.stdout))
            if p.stderr is not None:
                nursery.start_soon(read, "stderr", stream(p.stderr))
            task_status.started(p)
            try:
                await _wait_process(p)
            except trio.Cancelled:
                with trio.CancelScope(shield=True):
                    await (deliver_cancel or _kill)(p)
                    await _wait_process(p)
                raise
    finally:
        if p.returncode is None:  # an error of ours: never leave it running
            p.send_signal(signal.SIGKILL)
            p.wait()
        p.close_pty()
    assert p.returncode is not None
    stdout = out.get("stdout") if capture_stdout else None
    stderr = out.get("stderr") if capture_stderr else None
    if check and p.returncode:
        raise subprocess.CalledProcessError(p.returncode, p.args, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
