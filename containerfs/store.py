"""The registry's persistent half: containers and the id counter, in SQLite.

The service keeps live objects (fds, tasks) in memory; this keeps what must survive a restart
and what people may inspect: ids are never reused, and every container's record stays findable
by its handle's pipe inode after it is gone, so container_wait works on a dead one.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counter (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counter VALUES ('container_id', 1);
CREATE TABLE IF NOT EXISTS containers (
    id INTEGER PRIMARY KEY,
    name BLOB NOT NULL,
    flags INTEGER NOT NULL,
    owner INTEGER NOT NULL,
    grp INTEGER NOT NULL,
    parent INTEGER NOT NULL,
    state TEXT NOT NULL,
    pipe_dev INTEGER NOT NULL,
    pipe_ino INTEGER NOT NULL,
    init_pid INTEGER,
    exit_status INTEGER,
    removed INTEGER NOT NULL DEFAULT 0,
    caps INTEGER,
    seccomp TEXT
);
CREATE INDEX IF NOT EXISTS containers_pipe ON containers (pipe_dev, pipe_ino);
"""

COLUMNS = ("id", "name", "flags", "owner", "grp", "parent", "state", "pipe_dev", "pipe_ino",
           "init_pid", "exit_status", "removed", "caps", "seccomp")
# Columns added since the first registries (a registry in /run outlives an upgrade).
_ADDED = {"caps": "INTEGER", "seccomp": "TEXT"}

# Records of removed containers kept for container_wait on a handle still held; oldest go first.
KEEP_REMOVED = 10000
# Trimming them walks that many rows: do it once per this many removals, not at each one.
TRIM_EVERY = 256
# Ids are reserved this many at a time (one write per block, not per container); a crash
# skips what was left of the block, so ids stay unique, only not dense.
ID_BLOCK = 64


class Store:
    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # Process crashes lose nothing with synchronous=OFF; only a power cut could, and the
        # runtime directory is a tmpfs (/run) by default anyway.
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.executescript(_SCHEMA)
        have = {row[1] for row in self.db.execute("PRAGMA table_info(containers)")}
        for column, kind in _ADDED.items():
            if column not in have:
                self.db.execute(f"ALTER TABLE containers ADD COLUMN {column} {kind}")
        (last,) = self.db.execute(
            "SELECT value FROM counter WHERE name = 'container_id'").fetchone()
        self._next = self._reserved = int(last)
        self._next += 1
        # Rows whose writing may wait (save_later): written with the next write, or flush().
        self._later: dict[int, dict[str, Any]] = {}
        self._new_pipes: list[tuple[int, int]] = []  # (see save's new_pipe)
        self.unwritten: set[int] = set()  # ids whose first row waits in _later
        self._removals = 0
        self._trim()  # a service that never lives for TRIM_EVERY removals still trims

    def next_id(self) -> int:
        """A new container id, never handed out before (the first is 2; 1 is the host)."""
        if self._next > self._reserved:
            self._reserved = self._next + ID_BLOCK - 1
            self._set_counter(self._reserved)
        cid = self._next
        self._next += 1
        return cid

    def _set_counter(self, value: int) -> None:
        self.db.execute("UPDATE counter SET value = ? WHERE name = 'container_id'", (value,))

    def _write(self, row: dict[str, Any]) -> None:
        cols = ",".join(COLUMNS)
        marks = ",".join("?" * len(COLUMNS))
        self.db.execute(f"INSERT OR REPLACE INTO containers ({cols}) VALUES ({marks})",
                        [row.get(c, 0 if c == "removed" else None) for c in COLUMNS])

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def save(self, row: dict[str, Any], new_pipe: bool = False) -> None:
        """Write `row` now, with every row saved for later, in one transaction. `new_pipe`:
        the row's handle is new, so a removed record still naming its pipe inode is stale."""
        self.save_later(row, new_pipe)
        self.flush()

    def save_later(self, row: dict[str, Any], new_pipe: bool = False) -> None:
        """Write `row` with the next write or flush() (`new_pipe` as for save): for what a
        crash a moment later could lose without harm (the keeper's fds say what is alive,
        and its entry carries the row: see encode_row, Service.recover)."""
        if new_pipe:
            self._new_pipes.append((row["pipe_dev"], row["pipe_ino"]))
            self.unwritten.add(row["id"])
        self._later[row["id"]] = row
        if row.get("removed"):
            self._removals += 1

    def _write_later(self) -> None:
        pipes, self._new_pipes = self._new_pipes, []
        for pipe in pipes:
            self.db.execute("DELETE FROM containers WHERE pipe_dev=? AND pipe_ino=? "
                            "AND removed=1", pipe)
        rows, self._later = self._later, {}
        self.unwritten = set()
        for row in rows.values():
            self._write(row)

    def flush(self) -> None:
        """Write the rows saved for later, in one transaction; trim now and then."""
        if self._later or self._new_pipes:
            with self._transaction():
                self._write_later()
        if self._removals >= TRIM_EVERY:
            self._removals = 0
            self._trim()

    def _trim(self) -> None:
        self.db.execute(
            "DELETE FROM containers WHERE removed=1 AND id <= "
            "(SELECT id FROM containers WHERE removed=1 ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (KEEP_REMOVED,))

    def by_pipe(self, dev: int, ino: int) -> dict[str, Any] | None:
        self.flush()
        cur = self.db.execute(
            f"SELECT {','.join(COLUMNS)} FROM containers WHERE pipe_dev=? AND pipe_ino=? "
            "ORDER BY id DESC LIMIT 1", (dev, ino))
        row = cur.fetchone()
        return dict(zip(COLUMNS, row)) if row else None

    def has(self, cid: int) -> bool:
        """Whether container `cid` has a row (written or waiting to be)."""
        return cid in self._later or self.db.execute(
            "SELECT 1 FROM containers WHERE id = ?", (cid,)).fetchone() is not None

    def unremoved_rows(self) -> list[dict[str, Any]]:
        """Every container not yet removed, oldest first (for recovery)."""
        cur = self.db.execute(
            f"SELECT {','.join(COLUMNS)} FROM containers WHERE removed=0 ORDER BY id")
        return [dict(zip(COLUMNS, row)) for row in cur.fetchall()]

    def close(self) -> None:
        """Write what waits, give back the ids reserved but not handed out, and close."""
        self.flush()
        self._set_counter(self._next - 1)
        self.db.close()


def encode_row(row: dict[str, Any]) -> str:
    """`row` as text (for the keeper: a row not written yet survives a crash there)."""
    return json.dumps({**row, "name": row["name"].decode("latin-1")})


def decode_row(text: str) -> dict[str, Any] | None:
    """A row from encode_row's text; None if it is not one."""
    try:
        row = json.loads(text)
        if not isinstance(row, dict) or not isinstance(row.get("id"), int):
            return None
        row["name"] = str(row["name"]).encode("latin-1")
        return {c: row.get(c, 0 if c == "removed" else None) for c in COLUMNS}
    except (ValueError, KeyError, UnicodeEncodeError):
        return None
