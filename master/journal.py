"""The master's durable journal: every task, attempt and result, in sqlite.

Writes are grouped: the master applies a batch of messages, then commits once, and only
then acknowledges submissions and reports outcomes. `kill -9` at any point loses nothing
that was acknowledged: what was queued or in flight is read back and dispatched again.

Each task remembers its row number, so state changes find their row without the id index.
WAL checkpoints (which copy the log into the database and sync it) run on a thread of their
own, so the commit the master waits for is only an append to the log.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import msgpack

from core import states
from core.protocol import TaskOutcome, TaskSpec
from master.scheduler import (COMPLETED, FAILED, QUEUED, RUNNING, STATE_CODES,
                              STATE_NAMES, TaskRecord)
from master.retention import vacuum_pages
from master.sqlite_batch import BatchedWrites

__all__ = ["Journal"]

log = logging.getLogger(__name__)

_NIL = msgpack.packb(None)
_NO_CALL = msgpack.packb([[], {}], use_bin_type=True)
_CHECKPOINT_INTERVAL = 0.5    # seconds between background checkpoints
_AUTOCHECKPOINT_PAGES = 20_000  # the loop checkpoints itself only if the thread falls behind
_WAL_SIZE_LIMIT = 32 * 1024 * 1024  # bytes the log file is cut back to after a checkpoint
# finished tasks by when they ended: expiry finds the oldest without reading the table
_FINISHED_INDEX = ("CREATE INDEX IF NOT EXISTS tasks_finished ON tasks(finished) "
                   "WHERE finished IS NOT NULL")

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
    finished REAL,
    dispatch INTEGER NOT NULL DEFAULT 0,
    token TEXT NOT NULL DEFAULT '',
    max_attempts INTEGER NOT NULL DEFAULT 0,
    started REAL,
    timeout REAL NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    retry TEXT NOT NULL DEFAULT ''
);
DROP INDEX IF EXISTS tasks_active;
CREATE INDEX IF NOT EXISTS tasks_open ON tasks(priority) WHERE finished IS NULL;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# columns added since the first schema: a journal written before them gains them on open
_ADDED_COLUMNS = {"dispatch": "INTEGER NOT NULL DEFAULT 0", "token": "TEXT NOT NULL DEFAULT ''",
                  "max_attempts": "INTEGER NOT NULL DEFAULT 0", "started": "REAL",
                  "timeout": "REAL NOT NULL DEFAULT 0",
                  "not_before": "REAL NOT NULL DEFAULT 0",  # epoch seconds; 0: at once
                  "retry": "TEXT NOT NULL DEFAULT ''"}       # the task's own retry policy, JSON


def _pack(value: Any) -> bytes:
    """Results as msgpack, or JSON (prefixed with a NUL byte) for ints msgpack cannot hold."""
    if value is None:
        return _NIL
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (OverflowError, TypeError, ValueError):
        return b"\0" + json.dumps(value).encode()


def _unpack(blob: bytes | None) -> Any:
    if blob is None:
        return None
    if blob[:1] == b"\0" and len(blob) > 1:  # b"\0" alone is msgpack's 0
        return json.loads(blob[1:])
    return msgpack.unpackb(blob, raw=False, strict_map_key=False)


class Journal(BatchedWrites):
    """sqlite journal in WAL mode; used from one thread (the master's processing loop)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        in_memory = str(path) == ":memory:"
        if not in_memory:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect on a new file only
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # a process crash loses nothing in WAL
        self._db.execute("PRAGMA cache_size=-32768")   # 32 MiB: the active tasks' pages stay hot
        self._db.executescript(_SCHEMA)
        present = {row[1] for row in self._db.execute("PRAGMA table_info(tasks)")}
        for column, kind in _ADDED_COLUMNS.items():
            if column not in present:
                self._db.execute(f"ALTER TABLE tasks ADD COLUMN {column} {kind}")
        self._db.execute(_FINISHED_INDEX)
        self._incremental = self._vacuumable(in_memory)
        self._in_tx = False
        self._next_row = self._db.execute(
            "SELECT IFNULL(MAX(rowid), 0) + 1 FROM tasks").fetchone()[0]
        self._checkpoints_stop = threading.Event()
        self._checkpointer: threading.Thread | None = None
        if not in_memory:
            self._db.execute(f"PRAGMA wal_autocheckpoint={_AUTOCHECKPOINT_PAGES}")
            self._db.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
            self._checkpointer = threading.Thread(target=self._checkpoint_loop,
                                                  name="journal-checkpoint", daemon=True)
            self._checkpointer.start()

    def _vacuumable(self, in_memory: bool) -> bool:
        """Can free pages be handed back bit by bit (incremental auto-vacuum)? A journal made
        before it is converted once, by a VACUUM (if no other process holds it open)."""
        if self._db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2 or in_memory:
            return not in_memory
        started = time.monotonic()
        try:
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._db.execute("VACUUM")
        except sqlite3.Error as e:  # busy: deleted rows' pages are still reused by inserts
            log.warning("journal %s not converted to incremental vacuum: %s", self.path, e)
            return False
        log.info("journal %s converted to incremental vacuum in %.1f s", self.path,
                 time.monotonic() - started)
        return self._db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2

    def _checkpoint_loop(self) -> None:
        """Copy the log into the database now and then, off the master's loop."""
        try:
            db = sqlite3.connect(str(self.path), isolation_level=None, timeout=1.0)
        except sqlite3.Error:
            log.exception("journal checkpoints fall back to the writer")
            return
        try:
            while not self._checkpoints_stop.wait(_CHECKPOINT_INTERVAL):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as e:  # busy or closing: the next round will do it
                    log.debug("journal checkpoint skipped: %s", e)
        finally:
            db.close()

    # -- closing (writes join one transaction until commit(): BatchedWrites) ----------------------

    def close(self) -> None:
        self.commit()
        self._checkpoints_stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join(5.0)
        self._db.close()

    # -- writes --------------------------------------------------------------------------------

    def submitted(self, records: Iterable[TaskRecord], now: float | None = None) -> int:
        """Journal new tasks (an id already journalled keeps its row); how many were new."""
        records = list(records)
        inserted = self._insert(records, now)
        if inserted != len(records):  # some ids were there already: point those at their rows
            for r in records:
                found = self._db.execute("SELECT rowid, finished FROM tasks WHERE id = ?",
                                         (r.id,)).fetchone()
                if found is None:
                    r.row = 0
                    continue
                if found[0] != r.row and found[1] is not None:
                    # a finished task run again: open again, so a restart finds it
                    self._db.execute(f"UPDATE tasks SET state = {QUEUED}, finished = NULL "
                                     "WHERE rowid = ?", (found[0],))
                r.row = found[0]
        return inserted

    def submitted_if_new(self, records: list[TaskRecord], now: float | None = None) -> bool:
        """Journal tasks whose ids should all be new; if one is journalled already (a resend),
        write nothing and return False, so the caller can sort them out one by one."""
        if not records:
            return True
        if len(records) == 1:  # nothing to undo if its one row was not written
            return self._insert(records, now) == 1
        self._begin()
        self._db.execute("SAVEPOINT fresh")
        if self._insert(records, now) == len(records):
            self._db.execute("RELEASE fresh")
            return True
        self._db.execute("ROLLBACK TO fresh")
        self._db.execute("RELEASE fresh")
        return False

    def _insert(self, records: list[TaskRecord], now: float | None) -> int:
        """INSERT OR IGNORE the tasks, each at a row number of its own; how many went in."""
        if not records:
            return 0
        now = time.time() if now is None else now
        rows = []
        row = self._next_row
        for r in records:
            spec = r.spec
            r.row = row
            call = _pack([spec.args, spec.kwargs]) if spec.args or spec.kwargs else _NO_CALL
            rows.append((row, spec.id, spec.name, call, spec.priority, r.client, r.pinned, QUEUED,
                         now, spec.max_attempts, spec.timeout, spec.not_before, _retry(spec)))
            row += 1
        self._next_row = row
        self._begin()
        return self._db.executemany(
            "INSERT OR IGNORE INTO tasks (rowid, id, name, call, priority, client, pinned, state, "
            "submitted, max_attempts, timeout, not_before, retry) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows).rowcount

    def _update(self, sql: str, rows: list[tuple]) -> None:
        """`sql` for each row, whose last value is the task's row number (or, if it has none,
        its id): a row number finds the task without a look-up in the id index."""
        if not rows:
            return
        self._begin()
        by_row = [r for r in rows if type(r[-1]) is int]
        if by_row:
            self._db.executemany(sql + " WHERE rowid = ?", by_row)
        if len(by_row) != len(rows):
            self._db.executemany(sql + " WHERE id = ?", [r for r in rows if type(r[-1]) is str])

    def dispatched(self, records: Iterable[TaskRecord], now: float | None = None) -> None:
        """Record dispatches (node, attempt, token, and when: the start of that attempt)."""
        now = time.time() if now is None else now
        self._update(f"UPDATE tasks SET state = {RUNNING}, node = ?, dispatch = ?, token = ?, "
                     "started = ?",
                     [(r.node, r.dispatch, r.token, now, r.row or r.id) for r in records])

    def requeued(self, records: Iterable[TaskRecord]) -> None:
        self._update(f"UPDATE tasks SET state = {QUEUED}, node = '', attempts = ?, errors = ?",
                     [(r.attempts, _errors(r.errors), r.row or r.id) for r in records])

    def delayed(self, records: Iterable[tuple[TaskRecord, float]]) -> None:
        """Record when queued tasks may start next (epoch seconds): a retry's backoff, so a
        restarted master waits it out too."""
        self._update("UPDATE tasks SET not_before = ?", [(at, r.row or r.id) for r, at in records])

    def finished(self, records: Iterable[tuple[TaskRecord, Any]], now: float | None = None) -> None:
        """Record final states; `records` pairs each task with its value (None if failed)."""
        now = time.time() if now is None else now
        self._update("UPDATE tasks SET state = ?, node = ?, attempts = ?, errors = ?, "
                     "result = ?, finished = ?",
                     [(r.state, r.node, r.attempts, json.dumps(r.errors) if r.errors else "[]",
                       (_NIL if value is None else _pack(value)) if r.state == COMPLETED
                       else None, now, r.row or r.spec.id)
                      for r, value in records])

    def expire(self, cutoff: float, *, limit: int) -> int:
        """Delete finished tasks that ended before `cutoff` (wall clock), oldest first, at
        most `limit` of them (a bounded pause for the loop); how many went."""
        self._begin()
        return self._db.execute(
            "DELETE FROM tasks WHERE rowid IN (SELECT rowid FROM tasks WHERE finished < ? "
            "ORDER BY finished LIMIT ?)", (cutoff, int(limit))).rowcount

    def reclaim(self, *, step: int = 512) -> int:
        """Hand free pages (left by deleted rows) back to the file system, at most `step`
        this call, when they are a large part of the file; how many."""
        if not self._incremental:
            return 0
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        pages = vacuum_pages(free, self._db.execute("PRAGMA page_count").fetchone()[0],
                             step=step) if free else 0
        if pages:
            self._begin()
            vacuum = self._db.execute
            for _ in range(pages):  # each statement frees one page through this driver
                vacuum("PRAGMA incremental_vacuum(1)")
        return pages

    def sizes(self) -> dict[str, int]:
        """The journal's size: bytes of the database (and of its free pages) and of its log,
        and the rows (tasks) it holds, counted by a scan: for tests and soaks, not the loop."""
        page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        wal = Path(f"{self.path}-wal")
        return {"db_bytes": pages * page_size, "free_bytes": free * page_size,
                "wal_bytes": wal.stat().st_size if wal.exists() else 0,
                "rows": self._db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]}

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
        for (row, task_id, name, call, priority, client, pinned, state, attempts,
             errors, node, dispatch, token, max_attempts, timeout, not_before,
             retry) in self._db.execute(
                "SELECT rowid, id, name, call, priority, client, pinned, state, attempts, errors, "
                "node, dispatch, token, max_attempts, timeout, not_before, retry "
                "FROM tasks WHERE finished IS NULL ORDER BY state DESC, rowid"):
            args, kwargs = _unpack(call)
            policy = json.loads(retry) if retry else {}
            if "retry_on" in policy:
                policy["retry_on"] = tuple(policy["retry_on"])
            record = TaskRecord(spec=TaskSpec(id=task_id, name=name, args=args, kwargs=kwargs,
                                              priority=priority, max_attempts=max_attempts,
                                              timeout=timeout, not_before=not_before, **policy),
                                client=client, pinned=pinned, attempts=attempts,
                                errors=json.loads(errors), row=row, dispatch=dispatch,
                                token=token if state == RUNNING else "",
                                sent_to=node if state == RUNNING else "")
            out.append((record, state == RUNNING))
        return out

    def calls(self, task_ids: Iterable[str]) -> dict[str, TaskSpec]:
        """The work each journalled id is bound to (name and call), to refuse its reuse for
        other work."""
        ids = list(task_ids)
        out: dict[str, TaskSpec] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for task_id, name, call in self._db.execute(
                    f"SELECT id, name, call FROM tasks WHERE id IN ({marks})", chunk):
                args, kwargs = _unpack(call)
                out[task_id] = TaskSpec(id=task_id, name=name, args=args, kwargs=kwargs)
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
                    id=task_id, state=STATE_NAMES[state] if state >= COMPLETED else states.PENDING,
                    value=_unpack(result) if state == COMPLETED else None,
                    error=_failure(error_list) if state >= FAILED else None,
                    node_id=node, attempts=attempts)
        return out

    def task(self, task_id: str) -> dict[str, Any] | None:
        """Everything journalled about one task (None if the id is not journalled): its call,
        state, times, and each attempt with its node, times and error."""
        row = self._db.execute(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = ?",
                               (task_id,)).fetchone()
        return None if row is None else _task_view(row, full=True)

    def tasks(self, *, state: str | None = None, name: str | None = None,
              limit: int = 50) -> list[dict[str, Any]]:
        """The latest tasks (newest first), optionally of one state and/or task name.

        This runs on the master's loop, so it reads a bounded part of a long journal: queued
        and running tasks through the index of unfinished ones, anything else among the
        latest `_SCANNED` tasks."""
        where, params = [], []
        if state is not None:
            where.append("state = ?")
            params.append(STATE_CODES[state])
        if name is not None:
            where.append("name = ?")
            params.append(name)
        if not where:
            sql = f"SELECT {_TASK_COLUMNS} FROM tasks ORDER BY rowid DESC LIMIT ?"
            return [_task_view(row, full=False) for row in self._db.execute(sql, [int(limit)])]
        if state in (states.QUEUED, states.RUNNING):  # the partial index of unfinished tasks
            sql = (f"SELECT {_TASK_COLUMNS} FROM tasks WHERE finished IS NULL AND "
                   f"{' AND '.join(where)} ORDER BY rowid DESC LIMIT ?")
        else:
            sql = (f"SELECT {_TASK_COLUMNS} FROM tasks WHERE rowid >= ? AND "
                   f"{' AND '.join(where)} ORDER BY rowid DESC LIMIT ?")
            params.insert(0, self._next_row - _SCANNED)
        params.append(int(limit))
        return [_task_view(row, full=False) for row in self._db.execute(sql, params)]


_SCANNED = 200_000  # latest tasks a listing of finished ones looks through at most
_TASK_COLUMNS = ("id, name, call, priority, client, pinned, state, node, attempts, errors, result, "
                 "submitted, finished, dispatch, max_attempts, started, timeout")


def _task_view(row: tuple, *, full: bool) -> dict[str, Any]:
    """One journal row as people read it; `full` adds the call, value and every attempt."""
    (task_id, name, call, priority, client, pinned, state, node, attempts, errors, result,
     submitted, finished, dispatch, max_attempts, started, timeout) = row
    view: dict[str, Any] = {"id": task_id, "name": name, "state": STATE_NAMES[state],
                            "priority": priority, "node_id": node, "attempts": attempts,
                            "dispatches": dispatch, "submitted": submitted, "started": started,
                            "finished": finished}
    if not full:
        return view
    error_list = json.loads(errors)
    args, kwargs = _unpack(call)
    view.update(args=args, kwargs=kwargs, client=client, pinned=pinned,
                max_attempts=max_attempts, timeout=timeout,
                value=_unpack(result) if state == COMPLETED else None,
                error=_failure(error_list) if state >= FAILED else None,
                history=_history(error_list, state=state, node=node, dispatch=dispatch,
                                 started=started, finished=finished))
    return view


def _history(errors: list, *, state: int, node: str, dispatch: int, started: float | None,
             finished: float | None) -> list[dict[str, Any]]:
    """Each dispatch that ended (from its recorded error), then the last one if it is not
    among them: the one running now, or the one that completed."""
    out = []
    for error in errors:
        if not isinstance(error, dict):
            continue
        entry = {"attempt": error.get("attempt", 0), "node_id": error.get("node_id", ""),
                 "started": error.get("started"), "ended": error.get("ended"),
                 "outcome": error.get("kind", "error"), "message": error.get("message", "")}
        out.append(entry)
    last = dispatch if dispatch else 0
    if last and not any(e["attempt"] == last for e in out):
        outcome = {RUNNING: states.RUNNING, COMPLETED: states.COMPLETED}.get(state)
        if outcome is not None:
            out.append({"attempt": last, "node_id": node, "started": started,
                        "ended": finished if state == COMPLETED else None,
                        "outcome": outcome, "message": ""})
    return out


def _retry(spec: TaskSpec) -> str:
    """A task's own retry policy as JSON ('' if it has none: the master's default)."""
    policy = spec.own_retry()
    return json.dumps(policy) if policy else ""


def _errors(errors: list) -> str:
    return json.dumps(errors) if errors else "[]"


def _failure(errors: list) -> dict:
    """The failure a submitter sees: the last reason, with every earlier one attached."""
    last = dict(errors[-1]) if errors else {"kind": "failed", "message": "failed"}
    last["reasons"] = [f"{e.get('kind', 'error')}: {e.get('message', '')}" for e in errors]
    return last
