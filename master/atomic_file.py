"""A text file replaced atomically: written beside its final name, flushed to disk, renamed
over it. A reader sees the previous complete file or the new one, never half of one; a
failure part-way leaves the previous file and no temporary behind."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, TextIO

__all__ = ["atomic_text_file"]


@contextmanager
def atomic_text_file(path: Path, *, encoding: str = "utf-8", buffering: int = -1,
                     mode: int | None = None) -> Iterator[TextIO]:
    """Write through the yielded file; on a clean exit it becomes `path` (with permissions
    `mode` if given, else the private ones of a temporary file)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding=encoding, buffering=buffering) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
