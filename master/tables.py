"""Plain-text tables for the CLI: what a person reads in a terminal."""

from __future__ import annotations

import time
from typing import Any, Sequence

__all__ = ["format_table", "format_age"]


def format_age(ts: float, now: float | None = None) -> str:
    if not ts:
        return "-"
    age = max(0.0, (time.time() if now is None else now) - ts)
    if age < 120:
        return f"{age:.0f}s ago"
    if age < 7200:
        return f"{age / 60:.0f}m ago"
    return f"{age / 3600:.0f}h ago"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
