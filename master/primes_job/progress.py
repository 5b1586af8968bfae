"""Progress of a prime job: the counters, one line of text for them, and a bar on stderr.

On a terminal the bar redraws in place a few times a second; into a log file it prints a
plain line every few seconds instead, so `tail -f logs/job.log` shows the job moving.

The same counters go, retained, to `<root>/jobs/<job id>/progress` as flat JSON that carries
its `type` and `v` like the fabric's messages; a number not known yet (the shard count while
the input is still being read) is absent rather than 0.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, TextIO

from core.protocol import SCHEMA_VERSION

__all__ = ["JobProgress", "render_progress", "ProgressBar", "PROGRESS_TYPE", "JOB_STATES",
           "FINAL_STATES"]

PROGRESS_TYPE = "job_progress"
# running: under way; done: every number tested; incomplete: ended with failed shards;
# cancelled: ended with shards someone cancelled (`master-node cancel`), the rest finished;
# failed: an error stopped it (see `reason`); interrupted: stopped by a signal.
JOB_STATES = ("running", "done", "incomplete", "failed", "interrupted", "cancelled")
FINAL_STATES = frozenset(JOB_STATES[1:])


@dataclass(frozen=True)
class JobProgress:
    """Counters of a job; `shards_total` is None until the input is read to its end.
    `shards_done` counts those reused too (`shards_reused`: from the checkpoint or the
    master's earlier results); `reason` says why a job failed or was interrupted."""

    job_id: str
    state: str
    numbers_read: int
    numbers_tested: int
    bad_lines: int
    shards_done: int
    shards_total: int | None
    shards_in_flight: int
    primes: int
    bytes_read: int
    bytes_total: int
    elapsed: float
    shards_reused: int = 0
    reason: str = ""

    @property
    def fraction(self) -> float:
        """Share of the job done: tested numbers over the numbers there are (or, while
        reading, an estimate of them from the bytes read)."""
        if self.shards_total is not None and self.shards_done >= self.shards_total:
            return 1.0
        total = self.numbers_read
        if self.bytes_read and self.bytes_read < self.bytes_total:
            total = self.numbers_read * self.bytes_total / self.bytes_read
        return min(1.0, self.numbers_tested / total) if total else 0.0

    @property
    def rate(self) -> float:
        return self.numbers_tested / self.elapsed if self.elapsed > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Flat, dot-free, numbers as numbers: what MQTT Explorer shows and charts; what is
        unknown (None) or unset (an empty reason) is left out."""
        d: dict[str, Any] = {"type": PROGRESS_TYPE, "v": SCHEMA_VERSION}
        d.update((k, v) for k, v in asdict(self).items() if v is not None and v != "")
        d["percent"] = round(100 * self.fraction, 1)
        d["rate"] = round(self.rate, 1)
        d["elapsed"] = round(self.elapsed, 3)
        d["ts"] = round(time.time(), 3)
        return d


def _si(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"


def render_progress(p: JobProgress, *, width: int = 24) -> str:
    """One line: bar, percent, numbers tested, shards, primes, rate, bad lines."""
    filled = int(round(p.fraction * width))
    total = "?" if p.shards_total is None else str(p.shards_total)
    line = (f"[{'#' * filled}{'.' * (width - filled)}] {100 * p.fraction:5.1f}%  "
            f"{p.numbers_tested:,}/{p.numbers_read:,} tested  shards {p.shards_done}/{total}  "
            f"{p.primes:,} primes  {_si(p.rate)}/s")
    if p.bad_lines:
        line += f"  {p.bad_lines:,} bad lines"
    return line


class ProgressBar:
    """Draws JobProgress on a stream; `message` prints a line without garbling the bar."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True,
                 interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.2 if self.tty else 5.0)
        self._clock = clock
        self._next = 0.0
        self._drawn = False
        self._lock = threading.Lock()  # messages come from the job's reading thread too

    def update(self, progress: JobProgress, *, force: bool = False) -> None:
        """Redraw if due; always for a final state (anything but `running`), with its
        reason if it has one."""
        if not self.enabled:
            return
        now = self._clock()
        if not force and progress.state == "running" and now < self._next:
            return
        self._next = now + self.interval
        line = render_progress(progress)
        if progress.state in ("failed", "interrupted"):
            line += f"  {progress.state}"
        with self._lock:
            if self.tty:
                self.stream.write("\r\x1b[2K" + line)
                self._drawn = True
            else:
                self.stream.write(line + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        with self._lock:
            self._clear()
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._drawn:
                self.stream.write("\n")
                self.stream.flush()
                self._drawn = False

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[2K")
