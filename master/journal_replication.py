"""The journal, copied to standby masters: change capture on the active, replay on standbys.

On the active master, sqlite triggers note which journal rows each write touched, in a log
table and in the same transaction as the write, so nothing the journal commits can escape
the copy, whichever code path wrote it. After each loop turn's commit `ChangeCapture.drain`
reads those rows back as they now are (row images, not SQL), empties the log and advances
the journal position (epoch, seq) in one transaction, and returns the deltas to publish.

A standby's `JournalReplica` applies a delta only on top of exactly the position it follows
(`JournalDelta.previous`): a missed delta, or one from a master whose history differs,
is refused and the standby asks for a full copy (`JournalSnapshot`, read inside one sqlite
read transaction, so it is exactly the journal at one position while the active goes on).
Row images make replay idempotent, and the standby's file is an ordinary journal: the
master it becomes on take-over opens it like any other.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Iterable, Iterator

from core.replication import JournalDelta, JournalOp
from master.errors import ReplicationError
from master.journal import Journal

__all__ = ["ChangeCapture", "JournalReplica", "JournalSnapshot", "ReplicationError",
           "delta_verdict", "journal_path", "APPLY", "DUPLICATE", "GAP"]

Position = tuple[int, int]   # (journal epoch, journal seq)
APPLY, DUPLICATE, GAP = "apply", "duplicate", "gap"
MAX_CHUNK_BYTES = 256 * 1024  # one delta or dump message stays well below a broker's limit
_UPDATE_SKIPS = frozenset({"call"})  # written once, at insert, and the largest column
_KEYS = {"tasks": "rowid", "meta": "key"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS replication (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS replication_log (
    n INTEGER PRIMARY KEY, tbl TEXT NOT NULL, ref NOT NULL, op TEXT NOT NULL);
"""
_TRIGGERS = {
    f"replication_{table}_{op}": (
        f"AFTER {op.upper()} ON {table} BEGIN INSERT INTO replication_log (tbl, ref, op) "
        f"VALUES ('{table}', {'OLD' if op == 'delete' else 'NEW'}.{key}, '{op[0]}'); END")
    for table, key in _KEYS.items() for op in ("insert", "update", "delete")
}


def journal_path(state_dir: str | Path) -> Path:
    """Where a master keeps its journal (the same file MasterNodeTransport opens)."""
    return Path(state_dir) / "master.sqlite3"


def delta_verdict(position: Position, previous: Position, new: Position) -> str:
    """APPLY a delta that follows exactly our position; DUPLICATE one we have already (same
    epoch, not ahead); GAP for anything else (missed deltas, or another history)."""
    if previous == position:
        return APPLY
    if new[0] == position[0] and new[1] <= position[1]:
        return DUPLICATE
    return GAP


def _connect(path: Path) -> sqlite3.Connection:
    Journal(path).close()  # the journal's own schema, whoever opens the file first
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=5.0)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(_SCHEMA)
    return db


def _columns(db: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in db.execute(f"PRAGMA table_info({table})")]


def _read(db: sqlite3.Connection, name: str) -> int:
    row = db.execute("SELECT value FROM replication WHERE name = ?", (name,)).fetchone()
    return int(row[0]) if row else 0


def _write(db: sqlite3.Connection, name: str, value: int) -> None:
    db.execute("INSERT OR REPLACE INTO replication (name, value) VALUES (?, ?)", (name, value))


def _read_position(db: sqlite3.Connection) -> Position:
    return (_read(db, "seq_epoch"), _read(db, "seq"))


def _write_position(db: sqlite3.Connection, position: Position) -> None:
    _write(db, "seq_epoch", position[0])
    _write(db, "seq", position[1])


def _size(row: tuple | list) -> int:
    return 4 + sum(len(v) + 5 if isinstance(v, (bytes, str)) else 9 for v in row)


def _chunked(sources: Iterable[tuple[str, str, tuple[str, ...], Iterable[tuple]]],
             max_bytes: int) -> Iterator[list[JournalOp]]:
    """Pack (table, kind, columns, rows) into lists of ops of about `max_bytes` each; rows
    are read lazily, so a copy of a large journal is never all in memory."""
    chunk: list[JournalOp] = []
    batch: list[list] = []
    size = 0
    for table, kind, columns, rows in sources:
        for row in rows:
            row_size = _size(row)
            if size + row_size > max_bytes and (batch or chunk):
                if batch:
                    chunk.append(JournalOp(table, kind, columns, tuple(batch)))
                yield chunk
                chunk, batch, size = [], [], 0
            batch.append(list(row))
            size += row_size
        if batch:
            chunk.append(JournalOp(table, kind, columns, tuple(batch)))
            batch = []
    if chunk:
        yield chunk


class ChangeCapture:
    """The active master's side: what the journal changed since the last drain."""

    def __init__(self, path: str | Path, *, epoch: int, max_bytes: int = MAX_CHUNK_BYTES) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._db = _connect(self.path)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        for name, body in _TRIGGERS.items():
            db.execute(f"CREATE TRIGGER IF NOT EXISTS {name} {body}")
        db.execute("DELETE FROM replication_log")  # what is in the file now is the base
        _write(db, "epoch", max(epoch, _read(db, "epoch")))
        db.execute("COMMIT")
        self.position: Position = _read_position(db)
        self._task_columns = _columns(db, "tasks")

    def drain(self, *, epoch: int) -> list[tuple[Position, Position, list[JournalOp]]]:
        """The changes committed since the last drain as (previous, new position, ops), one
        per message; the position advances, durably, before anything is published."""
        db = self._db
        if db.execute("SELECT 1 FROM replication_log LIMIT 1").fetchone() is None:
            return []  # nothing changed: no write transaction at all
        db.execute("BEGIN IMMEDIATE")
        try:
            log = db.execute("SELECT n, tbl, ref, op FROM replication_log ORDER BY n").fetchall()
            ops = self._images(log)
            db.execute("DELETE FROM replication_log WHERE n <= ?", (log[-1][0],))
            out = []
            position = self.position
            for chunk in _chunked(ops, self.max_bytes):
                new = (epoch, position[1] + 1)
                out.append((position, new, chunk))
                position = new
            _write_position(db, position)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.position = position
        return out

    def _images(self, log: list[tuple]) -> list[tuple[str, str, tuple[str, ...], list[tuple]]]:
        last: dict[tuple[str, Any], str] = {}
        inserted: set[tuple[str, Any]] = set()
        for _n, table, ref, op in log:
            last[(table, ref)] = op
            if op == "i":
                inserted.add((table, ref))
        upserts = {t: [] for t in _KEYS}
        updates: list = []
        deletes = {t: [] for t in _KEYS}
        for (table, ref), op in last.items():
            if op == "d":
                deletes[table].append(ref)
            elif (table, ref) in inserted or table == "meta":
                upserts[table].append(ref)
            else:
                updates.append(ref)
        db = self._db
        full = tuple(["rowid", *self._task_columns])
        partial = tuple(["rowid", *(c for c in self._task_columns if c not in _UPDATE_SKIPS)])
        ops: list[tuple[str, str, tuple[str, ...], list[tuple]]] = []
        for columns, refs, kind in ((full, upserts["tasks"], "upsert"),
                                    (partial, updates, "update")):
            rows = self._rows(db, "tasks", columns, refs)
            if rows:
                ops.append(("tasks", kind, columns, rows))
            gone = set(refs) - {row[0] for row in rows}  # changed, then deleted since
            deletes["tasks"].extend(gone)
        meta_columns = tuple(_columns(db, "meta"))
        rows = self._rows(db, "meta", meta_columns, upserts["meta"])
        if rows:
            ops.append(("meta", "upsert", meta_columns, rows))
        for table, refs in deletes.items():
            if refs:
                ops.append((table, "delete", (_KEYS[table],), [(r,) for r in refs]))
        return ops

    @staticmethod
    def _rows(db: sqlite3.Connection, table: str, columns: tuple[str, ...],
              refs: list) -> list[tuple]:
        key = _KEYS[table]
        names = ", ".join(columns)
        rows: list[tuple] = []
        for start in range(0, len(refs), 500):
            chunk = refs[start:start + 500]
            marks = ",".join("?" * len(chunk))
            rows += db.execute(f"SELECT {names} FROM {table} WHERE {key} IN ({marks}) "
                               f"ORDER BY {key}", chunk).fetchall()
        return rows

    def snapshot(self) -> "JournalSnapshot":
        """A full copy of the journal as it is now (call right after a drain)."""
        return JournalSnapshot(self.path, self.position)

    def close(self) -> None:
        """Stop capturing: triggers and log go (a standby must not log what it replays)."""
        try:
            _drop_capture(self._db)
        finally:
            self._db.close()


def _drop_capture(db: sqlite3.Connection) -> None:
    db.execute("BEGIN IMMEDIATE")
    for name in _TRIGGERS:
        db.execute(f"DROP TRIGGER IF EXISTS {name}")
    db.execute("DELETE FROM replication_log")
    db.execute("COMMIT")


class JournalSnapshot:
    """The whole journal at one position, read in a transaction of its own (so the active
    master keeps writing meanwhile); read it from any one thread, then close it."""

    def __init__(self, path: Path, position: Position) -> None:
        self.position = position
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                                   timeout=5.0)
        self._db.execute("BEGIN")
        self._db.execute("SELECT COUNT(*) FROM meta").fetchone()  # the snapshot starts here

    def chunks(self, max_bytes: int = MAX_CHUNK_BYTES) -> Iterator[list[JournalOp]]:
        db = self._db
        meta_columns = tuple(_columns(db, "meta"))
        task_columns = tuple(["rowid", *_columns(db, "tasks")])
        meta = db.execute(f"SELECT {', '.join(meta_columns)} FROM meta").fetchall()
        tasks = db.execute(f"SELECT {', '.join(task_columns)} FROM tasks ORDER BY rowid")
        yield from _chunked([("meta", "upsert", meta_columns, meta),
                             ("tasks", "upsert", task_columns, tasks)], max_bytes)

    def close(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        self._db.close()


class JournalReplica:
    """A standby's copy of the journal, at `position`; used from one thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = _connect(self.path)
        _drop_capture(self._db)
        self.position: Position = _read_position(self._db)
        self.epoch = _read(self._db, "epoch")
        self._known = {table: set(_columns(self._db, table)) | {"rowid"} for table in _KEYS}
        self.in_copy = False

    # -- deltas -------------------------------------------------------------------------------

    def apply(self, delta: JournalDelta) -> str:
        """APPLY (done), DUPLICATE (nothing to do) or GAP (ask for a full copy)."""
        verdict = delta_verdict(self.position, delta.previous, delta.position)
        if verdict != APPLY or self.in_copy:
            return GAP if self.in_copy else verdict
        db = self._db
        db.execute("BEGIN")
        try:
            for op in delta.ops:
                self._apply_op(op)
            _write_position(db, delta.position)
            db.execute("COMMIT")
        except (ReplicationError, sqlite3.Error):
            db.execute("ROLLBACK")
            return GAP
        self.position = delta.position
        return APPLY

    def _apply_op(self, op: JournalOp) -> None:
        key = _KEYS[op.table]
        columns = op.columns
        if columns[0] != key or not set(columns) <= self._known[op.table]:
            raise ReplicationError(f"columns {columns} do not fit table {op.table}")
        db = self._db
        if op.kind == "upsert":
            db.executemany(f"INSERT OR REPLACE INTO {op.table} ({', '.join(columns)}) "
                           f"VALUES ({', '.join('?' * len(columns))})", op.rows)
        elif op.kind == "update":
            sets = ", ".join(f"{c} = ?" for c in columns[1:])
            sql = f"UPDATE {op.table} SET {sets} WHERE {key} = ?"
            for row in op.rows:
                if db.execute(sql, (*row[1:], row[0])).rowcount != 1:
                    raise ReplicationError(f"row {row[0]} of {op.table} is missing here")
        else:
            db.executemany(f"DELETE FROM {op.table} WHERE {key} = ?", [r[:1] for r in op.rows])

    # -- full copies ----------------------------------------------------------------------------

    def begin_copy(self) -> None:
        """Start replacing everything (in one transaction: an aborted copy changes nothing)."""
        self.abort_copy()
        self._db.execute("BEGIN")
        for table in _KEYS:
            self._db.execute(f"DELETE FROM {table}")
        self.in_copy = True

    def copy_chunk(self, ops: tuple[JournalOp, ...]) -> None:
        if not self.in_copy:
            raise ReplicationError("no copy in progress")
        try:
            for op in ops:
                if op.kind != "upsert":
                    raise ReplicationError("a copy holds whole rows only")
                self._apply_op(op)
        except (ReplicationError, sqlite3.Error):
            self.abort_copy()
            raise

    def finish_copy(self, position: Position) -> None:
        if not self.in_copy:
            raise ReplicationError("no copy in progress")
        _write_position(self._db, position)
        self._db.execute("COMMIT")
        self.in_copy = False
        self.position = position

    def abort_copy(self) -> None:
        if self.in_copy:
            self._db.execute("ROLLBACK")
            self.in_copy = False

    # -- the rest --------------------------------------------------------------------------------

    def note_epoch(self, epoch: int) -> None:
        """Remember the highest lease epoch seen, so a restart never claims an old one."""
        if epoch > self.epoch and not self.in_copy:
            _write(self._db, "epoch", epoch)
            self.epoch = epoch

    def counts(self) -> dict[int, int]:
        """Tasks by state (for logs and tests)."""
        return dict(self._db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state"))

    def close(self) -> None:
        self.abort_copy()
        self._db.close()
