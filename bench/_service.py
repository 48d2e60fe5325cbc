"""A service for a benchmark: the one CONTAINERFS_SOCKET names, or a fresh one of our own."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator


@contextlib.contextmanager
def running_service() -> Iterator[str]:
    if os.environ.get("CONTAINERFS_SOCKET"):
        yield os.environ["CONTAINERFS_SOCKET"]
        return
    where = tempfile.mkdtemp(prefix="cfs-bench-")
    sock = os.path.join(where, "cfs.sock")
    proc = subprocess.Popen([sys.executable, "-m", "containerfs", "serve", "--socket", sock,
                             "--runtime-dir", os.path.join(where, "state"),
                             "--cgroup", f"cfs-bench-{os.getpid()}", "--log-level", "warning"])
    try:
        while True:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(sock)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("the service did not start") from None
                time.sleep(0.02)
            finally:
                probe.close()
        os.environ["CONTAINERFS_SOCKET"] = sock
        yield sock
    finally:
        os.environ.pop("CONTAINERFS_SOCKET", None)
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
            with open(os.path.join(where, "state", "keeper.pid")) as f:
                os.kill(int(f.read()), signal.SIGKILL)
        from containerfs.cgroups import CgroupTree
        CgroupTree(f"cfs-bench-{os.getpid()}").remove_all()
        shutil.rmtree(where, ignore_errors=True)
