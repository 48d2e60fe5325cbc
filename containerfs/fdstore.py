"""The service's side of the keeper (containerfs.keeper): put, drop and get back held fds."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time

from syscalls import fdpass

from . import rundir


class FdStore:
    """Connects to the keeper at `<runtime_dir>/keeper.sock`, starting one if none answers."""

    def __init__(self, runtime_dir: str) -> None:
        self.path = os.path.join(runtime_dir, "keeper.sock")
        self.sock = self._connect() or self._spawn()
        self.data: dict[str, str] = {}  # what get_all found kept beside the fds, by key

    def _connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return None
        return sock

    def _spawn(self) -> socket.socket:
        # A session of its own: a signal to the service's process group must not reach it.
        # Its output goes to a file of its own: one that held the service's stdout or stderr
        # open would keep a pipe from `containerfs serve | ...` open long after the service.
        # It writes keeper.pid itself, once it holds the directory (rundir.KEEPER_LOCK).
        logpath = os.path.join(os.path.dirname(self.path), "keeper.log")
        with open(logpath, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "containerfs.keeper", "--socket", self.path],
                start_new_session=True, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                close_fds=True)
        deadline = time.monotonic() + 10
        while (sock := self._connect()) is None:
            # A keeper that found another one holding the directory leaves it to that one,
            # which may still be starting: wait for it to answer.
            gave_way = proc.poll() == rundir.KEEPER_BUSY_EXIT
            if (proc.poll() is not None and not gave_way) or time.monotonic() > deadline:
                raise OSError(errno.EIO, f"the keeper did not start at {self.path} (exit "
                                         f"{proc.poll()}); see {logpath}")
            time.sleep(0.005)
        return sock

    def put(self, key: str, fds: dict[str, int], data: str | None = None) -> None:
        """Hold `fds` (by name) and `data` under `key`, replacing what it held. Does not
        wait."""
        msg: dict[str, object] = {"op": "put", "key": key, "names": list(fds)}
        if data is not None:
            msg["data"] = data
        socket.send_fds(self.sock, [json.dumps(msg).encode()], list(fds.values()))

    def drop(self, key: str) -> None:
        self.sock.send(json.dumps({"op": "drop", "key": key}).encode())

    def get_all(self) -> dict[str, dict[str, int]]:
        """Copies of everything held, by key and name (the caller owns the fds); what was
        kept beside them in `data`."""
        self.sock.send(b'{"op": "get"}')
        out: dict[str, dict[str, int]] = {}
        while True:
            data, fds, _ = fdpass.recv_fds(self.sock, 65536, 64)
            msg = json.loads(data)
            if msg.get("end"):
                return out
            out[msg["key"]] = dict(zip(msg["names"], fds))
            if isinstance(msg.get("data"), str):
                self.data[msg["key"]] = msg["data"]

    def close(self) -> None:
        self.sock.close()
