"""The keeper: a very small process that holds the service's fds across its crashes.

The service's write ends of the handles, its namespace fds and init pidfds must outlive the
service: if they closed with it, every holder would see a false death. The keeper does nothing
but keep fds by key and hand them all back to a (re)started service, like systemd's fd store.

Protocol (SOCK_SEQPACKET, root peers only; one JSON datagram each, fds beside it):
  {"op": "put", "key": K, "names": [...]} + fds   replace what K holds; no reply
  {"op": "drop", "key": K}                        close what K holds; no reply
  {"op": "get"}                                   one {"key", "names"} + fds per key, then {"end": true}
  {"op": "exit"}                                  close everything and exit
PUT and DROP have no reply, so the service never waits on the keeper: a datagram sent before
a crash is already in the keeper's socket and is still applied.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import struct
import sys

from syscalls import fdpass

MAX_FDS = 32
_UCRED = struct.Struct("3i")


class Keeper:
    def __init__(self, path: str) -> None:
        self.held: dict[str, tuple[list[str], list[int]]] = {}
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.listener.bind(path)
        os.chmod(path, 0o600)
        self.listener.listen(16)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ)

    def drop(self, key: str) -> None:
        _names, fds = self.held.pop(key, ([], []))
        for fd in fds:
            os.close(fd)

    def handle(self, conn: socket.socket) -> bool:
        """Serve one datagram; False when the connection is done."""
        try:
            data, fds, _ = fdpass.recv_fds(conn, 65536, MAX_FDS)
        except OSError:
            return False
        if not data:
            for fd in fds:
                os.close(fd)
            return False
        try:
            msg = json.loads(data)
            op = msg["op"]
            if op == "put":
                names = [str(n) for n in msg["names"]]
                if len(names) != len(fds):
                    raise ValueError("names and fds differ in number")
                self.drop(str(msg["key"]))
                self.held[str(msg["key"])] = (names, fds)
                fds = []
            elif op == "drop":
                self.drop(str(msg["key"]))
            elif op == "get":
                for key, (names, held) in self.held.items():
                    socket.send_fds(conn, [json.dumps({"key": key, "names": names}).encode()], held)
                conn.send(b'{"end": true}')
            elif op == "exit":
                for key in list(self.held):
                    self.drop(key)
                sys.exit(0)
        except (ValueError, KeyError, TypeError) as e:
            print(f"containerfs keeper: bad message dropped: {e}", file=sys.stderr)
            return False
        finally:
            for fd in fds:
                os.close(fd)
        return True

    def run(self) -> None:
        while True:
            for key, _ in self.sel.select():
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self.listener:
                    conn, _ = self.listener.accept()
                    _pid, uid, _gid = _UCRED.unpack(
                        conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
                    if uid != 0:
                        conn.close()
                        continue
                    self.sel.register(conn, selectors.EVENT_READ)
                elif not self.handle(sock):
                    self.sel.unregister(sock)
                    sock.close()


def main() -> None:
    ap = argparse.ArgumentParser(description="hold the containerfs service's fds")
    ap.add_argument("--socket", required=True)
    args = ap.parse_args()
    Keeper(args.socket).run()


if __name__ == "__main__":
    main()
