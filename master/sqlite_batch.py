"""One sqlite transaction held open across many writes, committed when the caller says.

The journal and the prime job's checkpoint both write in batches: each write joins the open
transaction (opening one if there is none), and `commit()` ends it, so a batch costs one
commit however many rows it touched.
"""

from __future__ import annotations

import sqlite3

__all__ = ["BatchedWrites"]


class BatchedWrites:
    """Mixin for a class whose `_db` is an sqlite connection in autocommit mode."""

    _db: sqlite3.Connection
    _in_tx: bool = False

    def _begin(self) -> None:
        if not self._in_tx:
            self._db.execute("BEGIN")
            self._in_tx = True

    def commit(self) -> None:
        if self._in_tx:
            self._db.execute("COMMIT")
            self._in_tx = False
