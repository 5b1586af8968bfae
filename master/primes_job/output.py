"""primes.txt: unique primes, one a line, ascending, replaced atomically.

The file is written beside its final name, flushed to disk, then renamed over it: a reader
(`watch wc -l primes.txt`) sees the previous complete list or the new one, never half of one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from master.atomic_file import atomic_text_file

__all__ = ["write_primes"]

_BUFFER = 1 << 20


def write_primes(values: Iterable[str], path: str | Path) -> int:
    """Write `values` (ascending decimal text) to `path` atomically; how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with atomic_text_file(path, encoding="ascii", buffering=_BUFFER, mode=0o644) as f:
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
    return count
