"""Durable pipeline state in sqlite: versioned models (MVCC) and the records of pipeline runs.

Versions. Every committed change of a key is a new row `(key, version, state, data,
committed_at)`; nothing is overwritten, so `history(key)` lists every version. Readers outside
a transaction see the last committed version. A transaction reads the snapshot it began with
(plus its own writes) and commits all its writes at once. Concurrency is optimistic, first
committer wins: if any key the transaction writes got a version committed after the transaction
began, the commit raises `TransactionConflict` and writes nothing, instead of silently
overwriting the other change.

Runs. A run record holds the run's state and, per job, its state, attempts, result and error.
Each change is committed as it happens, so after a crash (even kill -9) the record tells which
jobs completed, and a resumed run does not run them again.

Storage. The file may be shared with other components: every table is prefixed `pipeline_`.
The file is switched to WAL mode, so readers do not block the writer. Commits take sqlite's
write lock with `BEGIN IMMEDIATE` and wait for it at most `busy_timeout` seconds, so several
processes may use one file. Results, metadata and model data are stored as JSON: they must be
JSON-serialisable.

Threading. A `VersionedStore` wraps one sqlite connection, which sqlite3 lets only the creating
thread use: create the store in the thread that uses it (the master's event-loop thread) and
keep it there. Every call is synchronous and short.

Models and managers built without a store use `default_store()`: the file named by
$FABRIC_PIPELINES_STORE, else `pipelines.sqlite3` in the working directory, opened once per
thread. State written that way survives the process, as it does in the master.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pipelines.errors import StoreError, TransactionConflict, TransactionError, UnknownRun
from pipelines.states import COMPLETED, FAILED, PAUSED, PENDING, RUNNING

__all__ = ["VersionedStore", "Transaction", "Version", "RunRecord", "JobRun", "to_json",
           "default_store", "STORE_ENV", "DEFAULT_STORE_PATH"]

STORE_ENV = "FABRIC_PIPELINES_STORE"
DEFAULT_STORE_PATH = "pipelines.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pipeline_versions (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    key          TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    state        TEXT,
    data         TEXT    NOT NULL,
    committed_at REAL    NOT NULL,
    tx_id        TEXT    NOT NULL,
    UNIQUE (key, version)
);
CREATE TABLE IF NOT EXISTS pipeline_runs (
    run_id      TEXT PRIMARY KEY,
    pipeline    TEXT NOT NULL,
    state       TEXT NOT NULL,
    trigger     TEXT NOT NULL,
    started_at  REAL NOT NULL,
    finished_at REAL,
    error       TEXT,
    metadata    TEXT
);
CREATE INDEX IF NOT EXISTS pipeline_runs_by_pipeline ON pipeline_runs (pipeline, started_at);
CREATE TABLE IF NOT EXISTS pipeline_run_jobs (
    run_id      TEXT    NOT NULL,
    position    INTEGER NOT NULL,
    job         TEXT    NOT NULL,
    state       TEXT    NOT NULL,
    attempts    INTEGER NOT NULL,
    result      TEXT,
    error       TEXT,
    started_at  REAL,
    finished_at REAL,
    PRIMARY KEY (run_id, job)
);
"""


def to_json(value: Any, *, what: str) -> str:
    """`value` as JSON text; `StoreError` naming `what` if it is not JSON-serialisable."""
    try:
        return json.dumps(value, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise StoreError(f"{what} is not JSON-serialisable: {e}") from e


_defaults = threading.local()


def default_store() -> VersionedStore:
    """This thread's store at $FABRIC_PIPELINES_STORE (else ./pipelines.sqlite3), opened once
    per path and thread (sqlite connections stay in the thread that opened them)."""
    path = os.path.abspath(os.environ.get(STORE_ENV) or DEFAULT_STORE_PATH)
    stores: dict[str, VersionedStore] = getattr(_defaults, "stores", None) or {}
    _defaults.stores = stores
    store = stores.get(path)
    if store is None:
        store = stores[path] = VersionedStore(path)
    return store


def _from_json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


@dataclass(frozen=True)
class Version:
    """One committed version of a key."""

    key: str
    version: int
    state: str | None
    data: Any
    committed_at: float | None  # None: staged in a transaction, not committed yet


@dataclass(frozen=True)
class JobRun:
    """The state of one job within one run."""

    name: str
    state: str = PENDING
    attempts: int = 0
    result: Any = None
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None


@dataclass(frozen=True)
class RunRecord:
    """One run of a pipeline (all its jobs, or some of them) as stored; `jobs` in run order."""

    run_id: str
    pipeline: str
    state: str
    trigger: str
    started_at: float
    finished_at: float | None = None
    error: str | None = None
    jobs: Mapping[str, JobRun] = field(default_factory=dict)
    metadata: Any = None
    has_metadata: bool = False

    @property
    def finished(self) -> bool:
        return self.state in (COMPLETED, FAILED)

    @property
    def jobs_total(self) -> int:
        return len(self.jobs)

    @property
    def jobs_done(self) -> int:
        return sum(1 for job in self.jobs.values() if job.state == COMPLETED)

    @property
    def jobs_failed(self) -> int:
        return sum(1 for job in self.jobs.values() if job.state == FAILED)


@dataclass
class _Write:
    state: str | None
    data_json: str
    data: Any
    on_commit: Callable[[int], None] | None


class Transaction:
    """A set of writes committed together; reads see the snapshot taken at `begin`."""

    def __init__(self, store: VersionedStore, snapshot: int) -> None:
        self.id = uuid.uuid4().hex
        self.store = store
        self.snapshot = snapshot
        self.status = "open"
        self._writes: dict[str, _Write] = {}

    @property
    def is_open(self) -> bool:
        return self.status == "open"

    def write(self, key: str, state: str | None, data: Any, *,
              on_commit: Callable[[int], None] | None = None) -> None:
        """Stage a new version of `key`; `on_commit(version)` is called once it is committed."""
        self._check_open()
        self._writes[key] = _Write(state, to_json(data, what=f"data of {key!r}"), data, on_commit)

    def read(self, key: str) -> Version | None:
        """The version of `key` this transaction sees: its own write, or its snapshot."""
        self._check_open()
        staged = self._writes.get(key)
        if staged is not None:
            base = self.store._latest(key, before=self.snapshot)
            return Version(key, (base.version if base else 0) + 1, staged.state, staged.data,
                           committed_at=None)
        return self.store._latest(key, before=self.snapshot)

    def _check_open(self) -> None:
        if not self.is_open:
            raise TransactionError(f"transaction {self.id} is {self.status}")


class VersionedStore:
    """Versioned keys and pipeline run records in one sqlite file (see the module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = os.fspath(path)
        self._clock = clock
        try:
            self._conn = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open pipeline store {self.path!r}: {e}") from e

    def close(self) -> None:
        """Close the sqlite connection; the store cannot be used afterwards."""
        self._conn.close()

    def __enter__(self) -> VersionedStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- versions ---------------------------------------------------------------------------

    def begin(self) -> Transaction:
        """Start a transaction on the snapshot of everything committed so far."""
        row = self._query_one("SELECT COALESCE(MAX(seq), 0) FROM pipeline_versions")
        return Transaction(self, int(row[0]))

    def commit(self, tx: Transaction) -> dict[str, int]:
        """Commit every write of `tx` at once; returns {key: new version}.

        Raises `TransactionConflict` (and commits nothing) if another transaction committed a
        version of one of those keys after `tx` began. `tx` is closed either way.
        """
        self._own(tx)
        tx._check_open()
        versions: dict[str, int] = {}
        try:
            with self._writing():
                for key in tx._writes:
                    newest = self._conn.execute(
                        "SELECT seq, version FROM pipeline_versions WHERE key = ? "
                        "ORDER BY version DESC LIMIT 1", (key,)).fetchone()
                    if newest is not None and newest[0] > tx.snapshot:
                        raise TransactionConflict(key, snapshot=tx.snapshot,
                                                  committed_version=newest[1])
                    versions[key] = (newest[1] if newest else 0) + 1
                now = self._clock()
                for key, staged in tx._writes.items():
                    self._conn.execute(
                        "INSERT INTO pipeline_versions (key, version, state, data, committed_at, "
                        "tx_id) VALUES (?, ?, ?, ?, ?, ?)",
                        (key, versions[key], staged.state, staged.data_json, now, tx.id))
        except TransactionConflict:
            tx.status = "rolled back"
            raise
        except sqlite3.Error as e:
            tx.status = "rolled back"
            raise StoreError(f"commit of transaction {tx.id} failed: {e}") from e
        tx.status = "committed"
        for key, staged in tx._writes.items():
            if staged.on_commit is not None:
                staged.on_commit(versions[key])
        return versions

    def rollback(self, tx: Transaction) -> None:
        """Discard the writes of `tx`; the last committed versions stay as they are."""
        self._own(tx)
        tx._check_open()
        tx._writes.clear()
        tx.status = "rolled back"

    def read(self, key: str, tx: Transaction | None = None) -> Version | None:
        """The last committed version of `key` (or what `tx` sees), None if it has none."""
        if tx is not None:
            self._own(tx)
            return tx.read(key)
        return self._latest(key)

    def history(self, key: str) -> list[Version]:
        """Every committed version of `key`, oldest first."""
        rows = self._query_all(
            "SELECT key, version, state, data, committed_at FROM pipeline_versions "
            "WHERE key = ? ORDER BY version", (key,))
        return [self._version(row) for row in rows]

    def keys(self, prefix: str = "") -> list[str]:
        """Every key with a committed version that starts with `prefix`, in first-commit order."""
        rows = self._query_all(
            "SELECT key FROM pipeline_versions WHERE substr(key, 1, ?) = ? GROUP BY key "
            "ORDER BY MIN(seq)", (len(prefix), prefix))
        return [row[0] for row in rows]

    def _latest(self, key: str, *, before: int | None = None) -> Version | None:
        if before is None:
            row = self._query_one(
                "SELECT key, version, state, data, committed_at FROM pipeline_versions "
                "WHERE key = ? ORDER BY version DESC LIMIT 1", (key,))
        else:
            row = self._query_one(
                "SELECT key, version, state, data, committed_at FROM pipeline_versions "
                "WHERE key = ? AND seq <= ? ORDER BY version DESC LIMIT 1", (key, before))
        return None if row is None else self._version(row)

    @staticmethod
    def _version(row: Sequence[Any]) -> Version:
        return Version(row[0], row[1], row[2], _from_json(row[3]), row[4])

    def _own(self, tx: Transaction) -> None:
        if tx.store is not self:
            raise TransactionError(f"transaction {tx.id} belongs to another store")

    # -- runs -------------------------------------------------------------------------------

    def create_run(self, *, run_id: str, pipeline: str, jobs: Sequence[str], trigger: str,
                   started_at: float) -> RunRecord:
        """Record a new run in state Running with every job Pending."""
        with self._translating(f"create run {run_id}"), self._writing():
            self._conn.execute(
                "INSERT INTO pipeline_runs (run_id, pipeline, state, trigger, started_at) "
                "VALUES (?, ?, ?, ?, ?)", (run_id, pipeline, RUNNING, trigger, started_at))
            self._conn.executemany(
                "INSERT INTO pipeline_run_jobs (run_id, position, job, state, attempts) "
                "VALUES (?, ?, ?, ?, 0)",
                [(run_id, position, name, PENDING) for position, name in enumerate(jobs)])
        return self.get_run(run_id)

    def get_run(self, run_id: str) -> RunRecord:
        """The stored run; `UnknownRun` if there is none with that id."""
        row = self._query_one(f"SELECT {_RUN_COLUMNS} FROM pipeline_runs WHERE run_id = ?",
                              (run_id,))
        if row is None:
            raise UnknownRun(f"no pipeline run with id {run_id!r}")
        return self._run(row)

    def runs(self, pipeline: str, *, limit: int | None = None,
             states: Sequence[str] | None = None, trigger: str | None = None) -> list[RunRecord]:
        """Runs of `pipeline`, newest first, optionally only those in `states` or of `trigger`."""
        sql = f"SELECT {_RUN_COLUMNS} FROM pipeline_runs WHERE pipeline = ?"
        params: list[Any] = [pipeline]
        if states is not None:
            sql += f" AND state IN ({', '.join('?' for _ in states)})"
            params.extend(states)
        if trigger is not None:
            sql += " AND trigger = ?"
            params.append(trigger)
        sql += " ORDER BY started_at DESC, rowid DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [self._run(row) for row in self._query_all(sql, params)]

    def unfinished_runs(self, pipeline: str) -> list[RunRecord]:
        """Runs of `pipeline` that are Running (or were, when the process stopped) or Paused."""
        return self.runs(pipeline, states=(RUNNING, PAUSED))

    def set_run_state(self, run_id: str, state: str, *, finished_at: float | None = None,
                      error: str | None = None) -> None:
        """Change a run's state (and its end time and error, when it ends)."""
        with self._translating(f"update run {run_id}"):
            self._conn.execute(
                "UPDATE pipeline_runs SET state = ?, finished_at = ?, error = ? WHERE run_id = ?",
                (state, finished_at, error, run_id))

    def set_run_metadata(self, run_id: str, metadata: Any) -> None:
        """Keep the output of the run's metadata step, so a resumed run does not fetch it again."""
        text = to_json(metadata, what=f"metadata of run {run_id}")
        with self._translating(f"update run {run_id}"):
            self._conn.execute("UPDATE pipeline_runs SET metadata = ? WHERE run_id = ?",
                               (text, run_id))

    def save_run_job(self, run_id: str, job: JobRun) -> None:
        """Store the state of one job of a run (inserted if the run did not list it)."""
        result = None if job.result is None else to_json(
            job.result, what=f"result of job {job.name!r}")
        with self._translating(f"update run {run_id}"), self._writing():
            updated = self._conn.execute(
                "UPDATE pipeline_run_jobs SET state = ?, attempts = ?, result = ?, error = ?, "
                "started_at = ?, finished_at = ? WHERE run_id = ? AND job = ?",
                (job.state, job.attempts, result, job.error, job.started_at, job.finished_at,
                 run_id, job.name)).rowcount
            if not updated:
                self._conn.execute(
                    "INSERT INTO pipeline_run_jobs (run_id, position, job, state, attempts, "
                    "result, error, started_at, finished_at) VALUES (?, (SELECT COALESCE("
                    "MAX(position), -1) + 1 FROM pipeline_run_jobs WHERE run_id = ?), "
                    "?, ?, ?, ?, ?, ?, ?)",
                    (run_id, run_id, job.name, job.state, job.attempts, result, job.error,
                     job.started_at, job.finished_at))

    def latest_job_result(self, pipeline: str, job: str) -> tuple[bool, Any]:
        """(True, result) of the latest completion of `job` in `pipeline`, else (False, None)."""
        row = self._query_one(
            "SELECT j.result FROM pipeline_run_jobs j JOIN pipeline_runs r USING (run_id) "
            "WHERE r.pipeline = ? AND j.job = ? AND j.state = ? "
            "ORDER BY j.finished_at DESC, r.started_at DESC, r.rowid DESC LIMIT 1",
            (pipeline, job, COMPLETED))
        return (False, None) if row is None else (True, _from_json(row[0]))

    def _run(self, row: Sequence[Any]) -> RunRecord:
        run_id = row[0]
        jobs = {
            name: JobRun(name, state, attempts, _from_json(result), error, started, finished)
            for name, state, attempts, result, error, started, finished in self._query_all(
                "SELECT job, state, attempts, result, error, started_at, finished_at "
                "FROM pipeline_run_jobs WHERE run_id = ? ORDER BY position", (run_id,))
        }
        return RunRecord(run_id=run_id, pipeline=row[1], state=row[2], trigger=row[3],
                         started_at=row[4], finished_at=row[5], error=row[6], jobs=jobs,
                         metadata=_from_json(row[7]), has_metadata=row[7] is not None)

    # -- sqlite plumbing --------------------------------------------------------------------

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """One sqlite write transaction, holding the write lock from its start."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    @contextmanager
    def _translating(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            raise StoreError(f"cannot {what} in {self.path!r}: {e}") from e

    def _query_one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        with self._translating("read"):
            return self._conn.execute(sql, params).fetchone()

    def _query_all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._translating("read"):
            return self._conn.execute(sql, params).fetchall()


_RUN_COLUMNS = "run_id, pipeline, state, trigger, started_at, finished_at, error, metadata"
