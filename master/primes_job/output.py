"""primes.txt: unique primes, one a line, ascending, replaced atomically.

The file is written beside its final name, flushed to disk, then renamed over it: a reader
(`watch wc -l primes.txt`) sees the previous complete list or the new one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

__all__ = ["write_primes"]

_BUFFER = 1 << 20


def write_primes(values: Iterable[str], path: str | Path) -> int:
    """Write `values` (ascending decimal text) to `path` atomically; how many were written."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(directory))
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="ascii", buffering=_BUFFER) as f:
            chunk: list[str] = []
            for value in values:
                chunk.append(value)
                if len(chunk) >= 4096:
                    f.write("\n".join(chunk) + "\n")
                    count += len(chunk)
                    chunk.clear()
            if chunk:
                f.write("\n".join(chunk) + "\n")
                count += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return count
