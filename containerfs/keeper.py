"""The keeper: a very small process that holds the service's fds across its crashes.

The service's write ends of the handles, its namespace fds and init pidfds must outlive the
service: if they closed with it, every holder would see a false death. The keeper does nothing
but keep fds by key and hand them all back to a (re)started service, like systemd's fd store.

Protocol (SOCK_SEQPACKET, root peers only; one JSON datagram each, fds beside it):
  {"op": "put", "key": K, "names": [...], "data": D} + fds
                                                  replace what K holds (D, a string, optional);
                                                  no reply
  {"op": "drop", "key": K}                        close what K holds; no reply
  {"op": "get"}                                   one {"key", "names"[, "data"]} + fds per key,
                                                  then {"end": true}
  {"op": "exit"}                                  close everything and exit
PUT and DROP have no reply, so the service never waits on the keeper: a datagram sent before
a crash is already in the keeper's socket and is still applied, and applied before any GET
that comes later from a new service (a GET first takes what waits on every other connection).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import select
import selectors
import socket
import struct
import sys

from syscalls import fdpass

from . import rundir

MAX_FDS = 32
_UCRED = struct.Struct("3i")


class Keeper:
    def __init__(self, path: str) -> None:
        """Serve at `path`; EBUSY (before the socket is touched) if another keeper serves
        its directory: it would take the path, and the fds held so far would be lost."""
        self.held: dict[str, tuple[list[str], list[int]]] = {}
        self.data: dict[str, str] = {}  # what a put carried beside its fds, by key
        self.lock = rundir.hold(os.path.dirname(path) or ".", rundir.KEEPER_LOCK, "keeper",
                                "it holds that directory's containers; start no keeper "
                                "by hand (containerfs serve starts one when none answers)")
        self.listener, _ = rundir.listen_unix(path, 0o600, 16)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ)

    def drop(self, key: str) -> None:
        _names, fds = self.held.pop(key, ([], []))
        self.data.pop(key, None)
        for fd in fds:
            os.close(fd)

    def handle(self, conn: socket.socket, nested: bool = False) -> bool:
        """Serve one datagram; False when the connection is done."""
        try:
            data, fds, _ = fdpass.recv_fds(conn, 65536, MAX_FDS)
        except OSError as e:
            if e.errno == errno.EMSGSIZE:
                # Its fds could not all be taken (out of fds): that one message is lost,
                # the service's connection is not.
                print(f"containerfs keeper: message dropped: {e.strerror}", file=sys.stderr)
                return True
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
                data = msg.get("data")
                if data is not None and not isinstance(data, str):
                    raise ValueError("data is not a string")
                self.drop(str(msg["key"]))
                self.held[str(msg["key"])] = (names, fds)
                if data is not None:
                    self.data[str(msg["key"])] = data
                fds = []
            elif op == "drop":
                self.drop(str(msg["key"]))
            elif op == "get":
                if not nested:
                    self._drain_others(conn)
                for key, (names, held) in self.held.items():
                    entry: dict[str, object] = {"key": key, "names": names}
                    if key in self.data:
                        entry["data"] = self.data[key]
                    socket.send_fds(conn, [json.dumps(entry).encode()], held)
                conn.send(b'{"end": true}')
            elif op == "exit":
                for key in list(self.held):
                    self.drop(key)
                sys.exit(0)
        except (ValueError, KeyError, TypeError) as e:
            # Only root may connect: a bad message is a bug to report, not a reason to
            # stop keeping what that connection sends next.
            print(f"containerfs keeper: bad message dropped: {e}", file=sys.stderr)
        finally:
            for fd in fds:
                os.close(fd)
        return True

    def _drain_others(self, conn: socket.socket) -> None:
        """Apply every datagram already waiting on the other connections: what a service sent
        before it crashed must count before its successor is told what is held."""
        for key in list(self.sel.get_map().values()):
            sock = key.fileobj
            if sock is self.listener or sock is conn:
                continue
            assert isinstance(sock, socket.socket)
            while _readable(sock):
                if not self.handle(sock, nested=True):
                    self._forget(sock)
                    break

    def _forget(self, sock: socket.socket) -> None:
        self.sel.unregister(sock)
        sock.close()

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
                elif sock.fileno() < 0 or not _readable(sock):
                    continue  # closed or drained meanwhile, by a GET (_drain_others)
                elif not self.handle(sock):
                    self._forget(sock)


def _readable(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def main() -> None:
    ap = argparse.ArgumentParser(description="hold the containerfs service's fds")
    ap.add_argument("--socket", required=True)
    args = ap.parse_args()
    try:
        keeper = Keeper(args.socket)
    except OSError as e:
        print(f"containerfs keeper: {e.strerror or e}", file=sys.stderr)
        sys.exit(rundir.KEEPER_BUSY_EXIT if e.errno == errno.EBUSY else 1)
    keeper.run()


if __name__ == "__main__":
    main()
