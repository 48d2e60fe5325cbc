"""The registry's persistent half: containers and the id counter, in SQLite.

The service keeps live objects (fds, tasks) in memory; this keeps what must survive a restart
and what people may inspect: ids are never reused, and every container's record stays findable
by its handle's pipe inode after it is gone, so container_wait works on a dead one.
"""

from __future__ import annotations

import sqlite3
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
    removed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS containers_pipe ON containers (pipe_dev, pipe_ino);
"""

COLUMNS = ("id", "name", "flags", "owner", "grp", "parent", "state", "pipe_dev", "pipe_ino",
           "init_pid", "exit_status", "removed")

# Records of removed containers kept for container_wait on a handle still held; oldest go first.
KEEP_REMOVED = 10000
# Trimming them walks that many rows: do it once per this many removals, not at each one.
TRIM_EVERY = 256


class Store:
    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # Process crashes lose nothing with synchronous=OFF; only a power cut could, and the
        # runtime directory is a tmpfs (/run) by default anyway.
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.executescript(_SCHEMA)
        self._removals = 0
        self._trim()  # a service that never lives for TRIM_EVERY removals still trims

    def next_id(self) -> int:
        """A new container id, never handed out before (the first is 2; 1 is the host)."""
        (value,) = self.db.execute(
            "UPDATE counter SET value = value + 1 WHERE name = 'container_id' RETURNING value"
        ).fetchone()
        return int(value)

    def save(self, row: dict[str, Any]) -> None:
        cols = ",".join(COLUMNS)
        marks = ",".join("?" * len(COLUMNS))
        self.db.execute(f"INSERT OR REPLACE INTO containers ({cols}) VALUES ({marks})",
                        [row.get(c, 0 if c == "removed" else None) for c in COLUMNS])

    def forget_pipe(self, dev: int, ino: int) -> None:
        """A new handle got this pipe inode: any record still naming it is stale."""
        self.db.execute("DELETE FROM containers WHERE pipe_dev=? AND pipe_ino=? AND removed=1",
                        (dev, ino))

    def mark_removed(self, cid: int) -> None:
        self.db.execute("UPDATE containers SET removed=1 WHERE id=?", (cid,))
        self._removals += 1
        if self._removals % TRIM_EVERY == 0:
            self._trim()

    def _trim(self) -> None:
        self.db.execute(
            "DELETE FROM containers WHERE removed=1 AND id <= "
            "(SELECT id FROM containers WHERE removed=1 ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (KEEP_REMOVED,))

    def by_pipe(self, dev: int, ino: int) -> dict[str, Any] | None:
        cur = self.db.execute(
            f"SELECT {','.join(COLUMNS)} FROM containers WHERE pipe_dev=? AND pipe_ino=? "
            "ORDER BY id DESC LIMIT 1", (dev, ino))
        row = cur.fetchone()
        return dict(zip(COLUMNS, row)) if row else None

    def unremoved_rows(self) -> list[dict[str, Any]]:
        """Every container not yet removed, oldest first (for recovery)."""
        cur = self.db.execute(
            f"SELECT {','.join(COLUMNS)} FROM containers WHERE removed=0 ORDER BY id")
        return [dict(zip(COLUMNS, row)) for row in cur.fetchall()]

    def close(self) -> None:
        self.db.close()
