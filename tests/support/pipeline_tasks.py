"""Tasks the pipeline tests load on real nodes with `--task support.pipeline_tasks:NAME`.

Each one appends its label to `<log_dir>/executions.log`, so a test counts how often a job ran,
and leaves `<log_dir>/<label>.start` behind once it started, so a test (or another task) can
wait for it. Times are wall-clock seconds, comparable across processes of one machine.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

_BOUND = 30.0


def _record(log_dir: str, label: str) -> float:
    started = time.time()
    with open(Path(log_dir) / "executions.log", "a") as f:
        f.write(label + "\n")
    marker = Path(log_dir) / f"{label}.start"
    partial = marker.with_suffix(".partial")
    partial.write_text(repr(started))
    os.replace(partial, marker)  # appears whole, or not at all
    return started


def _wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout:g}s")
        time.sleep(0.01)


def stamp(log_dir: str, label: str, *, wait_for: str | None = None, gate: str | None = None,
          inputs: dict[str, Any] | None = None, timeout: float = _BOUND) -> dict[str, Any]:
    """Record the start, wait until job `wait_for` started too and/or file `gate` exists
    (bounded), record the end. Returns the times and what the job received as inputs."""
    started = _record(log_dir, label)
    if wait_for is not None:
        _wait_for(Path(log_dir) / f"{wait_for}.start", timeout)
    if gate is not None:
        _wait_for(Path(gate), timeout)
    return {"label": label, "started": started, "ended": time.time(),
            "inputs": sorted(inputs or {})}


def boom(log_dir: str, label: str, *, inputs: dict[str, Any] | None = None) -> None:
    """Record the attempt, then fail."""
    _record(log_dir, label)
    raise RuntimeError(f"{label} failed on purpose")


def executions(log_dir: str | Path) -> list[str]:
    """The labels of every task run so far, in the order they started (read by the tests)."""
    path = Path(log_dir) / "executions.log"
    return path.read_text().split() if path.exists() else []
