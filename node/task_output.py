"""Bounded task output: what a task prints never floods the node's log.

Each task's stdout and stderr go to one `OutputTail`, which keeps the last `TAIL_BYTES`
bytes and counts the rest. When the task ends, `settle` decides where the tail goes: the
node's log at DEBUG for every task (one INFO line says how much a task printed past the
bound), and the error of a failed task (`output`, `output_bytes`), where whoever reads the
failure needs it.

On a process-pool node the worker's file descriptors 1 and 2 are a pipe the node reads
(everything the task, its C code and its subprocesses write). On a thread-pool node
`install` puts a stream on `sys.stdout`/`sys.stderr` that sends a task thread's writes to
its task's tail and every other thread's writes through unchanged; writes that bypass
`sys.stdout` (`os.write(1, ...)`, C extensions, subprocesses) are not seen there.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
from typing import Any

from core.protocol import TaskResult

__all__ = ["TAIL_BYTES", "OutputTail", "ThreadOutput", "install", "settle"]

TAIL_BYTES = 4096

log = logging.getLogger("node.output")


class OutputTail:
    """The last `limit` bytes written, and how many were written in all."""

    __slots__ = ("limit", "total", "_buf")

    def __init__(self, limit: int = TAIL_BYTES) -> None:
        self.limit = limit
        self.total = 0
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        if len(data) >= self.limit:
            self._buf[:] = data[-self.limit:]
            return
        self._buf += data
        if len(self._buf) > 2 * self.limit:  # trim now and then, not on every write
            del self._buf[:-self.limit]

    def text(self) -> str:
        """The tail as text (a cut multibyte character at its start is replaced)."""
        return bytes(self._buf[-self.limit:]).decode("utf-8", errors="replace")

    @property
    def dropped(self) -> int:
        return max(0, self.total - self.limit)


def settle(result: TaskResult, output: OutputTail | None, name: str) -> TaskResult:
    """Log a task's output tail (DEBUG) and put it in the error of a failed result."""
    if output is None or not output.total:
        return result
    if output.dropped:
        log.info("task %s (%s) printed %d bytes; the last %d are kept", result.id, name,
                 output.total, output.limit)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("task %s (%s) output (last %d of %d bytes):\n%s", result.id, name,
                  min(output.total, output.limit), output.total, output.text())
    if result.ok or not isinstance(result.error, dict):
        return result
    error = dict(result.error, output=output.text(), output_bytes=output.total)
    return TaskResult(result.id, False, error=error, ts=result.ts, attempt=result.attempt,
                      token=result.token)


class ThreadOutput(io.TextIOBase):
    """`sys.stdout`/`sys.stderr` on a thread-pool node: a thread running a task writes to that
    task's tail (`running.output`, made on its first write); other threads pass through."""

    def __init__(self, stream: Any, running: threading.local) -> None:
        super().__init__()
        self._stream = stream
        self._running = running

    def write(self, text: str) -> int:
        running = self._running
        if getattr(running, "task", None) is None:
            return self._stream.write(text)
        output = getattr(running, "output", None)
        if output is None:
            output = running.output = OutputTail()
        output.feed(text.encode("utf-8", errors="replace"))
        return len(text)

    def flush(self) -> None:
        if getattr(self._running, "task", None) is None:
            self._stream.flush()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream, "encoding", "utf-8")

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._stream.fileno()

    def __getattr__(self, name: str) -> Any:  # buffer, errors, ... of the real stream
        return getattr(self._stream, name)


_installed = threading.Lock()


def install(running: threading.local) -> None:
    """Route task threads' `sys.stdout`/`sys.stderr` writes to their tails (once a process)."""
    with _installed:
        if not isinstance(sys.stdout, ThreadOutput) and sys.stdout is not None:
            sys.stdout = ThreadOutput(sys.stdout, running)
        if not isinstance(sys.stderr, ThreadOutput) and sys.stderr is not None:
            sys.stderr = ThreadOutput(sys.stderr, running)
