"""The master's durable journal: every task, attempt and result, in sqlite.

Writes are grouped: the master applies a batch of messages, then commits once, and only
then acknowledges submissions and reports outcomes. `kill -9` at any point loses nothing
that was acknowledged: what was queued or in flight is read back and dispatched again.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable

import msgpack

from core.protocol import TaskOutcome, TaskSpec
from master.scheduler import COMPLETED, FAILED, QUEUED, RUNNING, STATE_NAMES, TaskRecord

__all__ = ["Journal"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    call BLOB NOT NULL,
    priority INTEGER NOT NULL,
    client TEXT NOT NULL DEFAULT '',
    pinned TEXT NOT NULL DEFAULT '',
    state INTEGER NOT NULL,
    node TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    errors TEXT NOT NULL DEFAULT '[]',
    result BLOB,
    submitted REAL NOT NULL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS tasks_active ON tasks(state) WHERE state < 2;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _pack(value: Any) -> bytes:
    """Results as msgpack, or JSON (prefixed with a NUL byte) for ints msgpack cannot hold."""
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (OverflowError, TypeError, ValueError):
        return b"\0" + json.dumps(value).encode()


def _unpack(blob: bytes | None) -> Any:
    if blob is None:
        return None
    if blob[:1] == b"\0":
        return json.loads(blob[1:])
    return msgpack.unpackb(blob, raw=False, strict_map_key=False)


class Journal:
    """sqlite journal in WAL mode; used from one thread (the master's processing loop)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # a process crash loses nothing in WAL
        self._db.executescript(_SCHEMA)
        self._in_tx = False

    # -- transactions ----------------------------------------------------------------------------

    def _begin(self) -> None:
        if not self._in_tx:
            self._db.execute("BEGIN")
            self._in_tx = True

    def commit(self) -> None:
        if self._in_tx:
            self._db.execute("COMMIT")
            self._in_tx = False

    def close(self) -> None:
        self.commit()
        self._db.close()

    # -- writes --------------------------------------------------------------------------------

    def submitted(self, records: Iterable[TaskRecord], now: float | None = None) -> None:
        now = time.time() if now is None else now
        rows = [(r.id, r.spec.name, _pack([r.spec.args, r.spec.kwargs]), r.spec.priority, r.client,
                 r.pinned, QUEUED, now) for r in records]
        if rows:
            self._begin()
            self._db.executemany(
                "INSERT OR IGNORE INTO tasks (id, name, call, priority, client, pinned, state, "
                "submitted) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def dispatched(self, records: Iterable[TaskRecord]) -> None:
        rows = [(r.node, r.id) for r in records]
        if rows:
            self._begin()
            self._db.executemany(
                f"UPDATE tasks SET state = {RUNNING}, node = ? WHERE id = ?", rows)

    def requeued(self, records: Iterable[TaskRecord]) -> None:
        rows = [(r.attempts, json.dumps(r.errors), r.id) for r in records]
        if rows:
            self._begin()
            self._db.executemany(
                f"UPDATE tasks SET state = {QUEUED}, node = '', attempts = ?, errors = ? "
                "WHERE id = ?", rows)

    def finished(self, records: Iterable[tuple[TaskRecord, Any]], now: float | None = None) -> None:
        """Record final states; `records` pairs each task with its value (None if failed)."""
        now = time.time() if now is None else now
        rows = [(r.state, r.node, r.attempts, json.dumps(r.errors),
                 _pack(value) if r.state == COMPLETED else None, now, r.id)
                for r, value in records]
        if rows:
            self._begin()
            self._db.executemany(
                "UPDATE tasks SET state = ?, node = ?, attempts = ?, errors = ?, result = ?, "
                "finished = ? WHERE id = ?", rows)

    def set_meta(self, key: str, value: str) -> None:
        self._begin()
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- reads ---------------------------------------------------------------------------------

    def meta(self, key: str, default: str | None = None) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def unfinished(self) -> list[tuple[TaskRecord, bool]]:
        """Tasks to restore after a restart, with whether each was in flight (goes in front)."""
        out = []
        for (task_id, name, call, priority, client, pinned, state, attempts, errors) in self._db.execute(
                "SELECT id, name, call, priority, client, pinned, state, attempts, errors "
                f"FROM tasks WHERE state < {COMPLETED} ORDER BY state DESC, rowid"):
            args, kwargs = _unpack(call)
            record = TaskRecord(spec=TaskSpec(id=task_id, name=name, args=args, kwargs=kwargs,
                                              priority=priority),
                                client=client, pinned=pinned, attempts=attempts,
                                errors=json.loads(errors))
            out.append((record, state == RUNNING))
        return out

    def outcomes(self, task_ids: Iterable[str]) -> dict[str, TaskOutcome]:
        ids = list(task_ids)
        out: dict[str, TaskOutcome] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for task_id, state, node, attempts, errors, result in self._db.execute(
                    f"SELECT id, state, node, attempts, errors, result FROM tasks WHERE id IN ({marks})",
                    chunk):
                error_list = json.loads(errors)
                out[task_id] = TaskOutcome(
                    id=task_id, state=STATE_NAMES[state] if state in (COMPLETED, FAILED) else "pending",
                    value=_unpack(result) if state == COMPLETED else None,
                    error=_failure(error_list) if state == FAILED else None,
                    node_id=node, attempts=attempts)
        return out

    def is_finished(self, task_id: str) -> bool:
        row = self._db.execute("SELECT state FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return row is not None and row[0] >= COMPLETED

    def counts(self) -> dict[str, int]:
        counts = {name: 0 for name in STATE_NAMES.values()}
        for state, n in self._db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state"):
            counts[STATE_NAMES[state]] = n
        return counts

    def results(self, *, limit: int | None = None) -> list[tuple[str, str, Any]]:
        """(task id, node, value) of completed tasks, oldest first."""
        sql = f"SELECT id, node, result FROM tasks WHERE state = {COMPLETED} ORDER BY finished"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return [(i, n, _unpack(r)) for i, n, r in self._db.execute(sql)]


def _failure(errors: list) -> dict:
    """The failure a submitter sees: the last reason, with every earlier one attached."""
    last = dict(errors[-1]) if errors else {"kind": "failed", "message": "failed"}
    last["reasons"] = [f"{e.get('kind', 'error')}: {e.get('message', '')}" for e in errors]
    return last
