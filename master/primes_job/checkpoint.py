"""The job's local checkpoint: finished shards and the primes found, in one sqlite file.

A run that crashes (or is interrupted) is resumed by running the same command again: shards
recorded here are skipped when their content digest still matches, and the primes they found
are already here. Primes are stored
as decimal text (they can exceed 2**63) with their digit count, so `ORDER BY digits, value`
is numeric order and the primary key keeps each prime once.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Iterable, Iterator

from core.errors import ConfigError
from master.primes_job.plan import ShardPlan
from master.sqlite_batch import BatchedWrites

__all__ = ["Checkpoint", "SCHEMA_VERSION"]

SCHEMA_VERSION = 2  # 2: shards keep the digest of their task

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shards (
    shard INTEGER PRIMARY KEY,
    attempt INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    digest TEXT NOT NULL DEFAULT '',
    numbers INTEGER NOT NULL DEFAULT 0,
    bad INTEGER NOT NULL DEFAULT 0,
    primes INTEGER NOT NULL DEFAULT 0,
    node TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS primes (
    digits INTEGER NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (digits, value)
) WITHOUT ROWID;
"""

DONE, RETRY, FAILED = "done", "retry", "failed"


class Checkpoint(BatchedWrites):
    """One job's progress on disk. Used from one thread; `commit` groups writes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # a process crash loses nothing
            self._db.executescript(_SCHEMA)
            self.reset_reason = self._drop_other_schema()
            self._add_bad_column()
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"checkpoint {self.path} is not usable ({e}); remove it or "
                              "choose another with --checkpoint") from e
        self._in_tx = False

    def _drop_other_schema(self) -> str:
        """Empty a checkpoint written by another schema (its shards cannot be matched to
        tasks by content); the reason, or "" when it is current."""
        schema = self._meta("schema")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(shards)")}
        if schema in (None, str(SCHEMA_VERSION)) and "digest" in columns:
            return ""
        self._db.executescript("DROP TABLE IF EXISTS meta; DROP TABLE IF EXISTS shards; "
                               "DROP TABLE IF EXISTS primes;" + _SCHEMA)
        return f"it was written in checkpoint schema {schema or '?'}, not {SCHEMA_VERSION}"

    def _add_bad_column(self) -> None:
        """A checkpoint of this schema from before range shards lacks the bad-line count of
        its shards (its shards hold numbers, whose bad lines the client counts itself)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(shards)")}
        if "bad" not in columns:
            self._db.execute("ALTER TABLE shards ADD COLUMN bad INTEGER NOT NULL DEFAULT 0")

    # -- the job it belongs to -----------------------------------------------------------------

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def job_id(self) -> str | None:
        return self._meta("job_id")

    def plan(self) -> ShardPlan | None:
        text = self._meta("plan")
        return ShardPlan.from_dict(json.loads(text)) if text else None

    def begin(self, job_id: str, plan: ShardPlan, *, files: Iterable[str]) -> None:
        """Start afresh for `job_id`: whatever an earlier job left here is dropped."""
        self._db.execute("BEGIN")
        for table in ("meta", "shards", "primes"):
            self._db.execute(f"DELETE FROM {table}")
        self._db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", [
            ("schema", str(SCHEMA_VERSION)), ("job_id", job_id),
            ("plan", json.dumps(plan.to_dict())), ("files", json.dumps(list(files)))])
        self._db.execute("COMMIT")

    # -- shards ----------------------------------------------------------------------------------

    def done_shards(self) -> dict[int, str]:
        """Each finished shard's index and the digest of the task that finished it."""
        return dict(self._db.execute("SELECT shard, digest FROM shards WHERE state = ?",
                                     (DONE,)))

    def done_counts(self) -> dict[int, tuple[int, int]]:
        """Each finished shard's numbers and bad lines (what a skipped range shard adds)."""
        return {shard: (numbers, bad) for shard, numbers, bad in self._db.execute(
            "SELECT shard, numbers, bad FROM shards WHERE state = ?", (DONE,))}

    def attempts(self) -> dict[int, int]:
        """The attempt number each unfinished shard's next task id must carry."""
        return dict(self._db.execute("SELECT shard, attempt FROM shards WHERE state != ?",
                                     (DONE,)))

    def record_done(self, shard: int, attempt: int, digest: str, numbers: int,
                    primes: Iterable[int | str], node: str, *, bad: int = 0) -> int:
        """Record a finished shard (its task's digest) and its primes; how many of them
        were new to the job."""
        values = [(len(text), text) for text in map(str, primes)]
        self._begin()
        added = self._db.executemany("INSERT OR IGNORE INTO primes (digits, value) VALUES (?, ?)",
                                     values).rowcount if values else 0
        self._db.execute("INSERT OR REPLACE INTO shards (shard, attempt, state, digest, numbers, "
                         "bad, primes, node) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (shard, attempt, DONE, digest, numbers, bad, len(values), node))
        return max(0, added)

    def record_attempt(self, shard: int, attempt: int, *, failed: bool, error: str) -> None:
        """The shard's next task id carries `attempt`; `failed` when this run gave up on it."""
        self._begin()
        self._db.execute("INSERT OR REPLACE INTO shards (shard, attempt, state, error) "
                         "VALUES (?, ?, ?, ?)", (shard, attempt, FAILED if failed else RETRY,
                                                 error))

    # -- totals and output -------------------------------------------------------------------------

    def primes_count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM primes").fetchone()[0]

    def numbers_tested(self) -> int:
        return self._db.execute("SELECT COALESCE(SUM(numbers), 0) FROM shards WHERE state = ?",
                                (DONE,)).fetchone()[0]

    def failed_shards(self) -> list[tuple[int, str]]:
        return list(self._db.execute("SELECT shard, error FROM shards WHERE state = ? "
                                     "ORDER BY shard", (FAILED,)))

    def iter_primes(self) -> Iterator[str]:
        """Every prime found, ascending, as decimal text (streamed, not loaded)."""
        for (value,) in self._db.execute("SELECT value FROM primes ORDER BY digits, value"):
            yield value

    # -- closing (writes join one transaction until commit(): BatchedWrites) --------------------

    def close(self) -> None:
        self.commit()
        self._db.close()

    def remove(self) -> None:
        """Close and delete the checkpoint (and sqlite's side files)."""
        self.close()
        for suffix in ("", "-wal", "-shm"):
            try:
                Path(str(self.path) + suffix).unlink()
            except FileNotFoundError:
                pass
