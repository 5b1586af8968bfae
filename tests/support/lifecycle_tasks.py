"""Tasks the lifecycle tests register on real nodes with `--task support.lifecycle_tasks:NAME`."""

from __future__ import annotations

import time

from node import task_context
from node.registry import task


def _note(path: str, word: str) -> None:
    with open(path, "a") as f:
        f.write(word + "\n")


def patient(path: str, seconds: float = 60.0) -> str:
    """Note its start, then work in small steps until done or cancelled (it checks its
    context between steps, as a long task on a thread worker should)."""
    _note(path, "started")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if task_context.cancelled():
            _note(path, "stopped")
            return "stopped"
        time.sleep(0.01)
    _note(path, "finished")
    return "finished"


def stubborn(path: str, seconds: float) -> str:
    """Note its start, then sleep without ever looking at its context: a task that cannot
    be stopped on a thread, whose late result must be dropped."""
    _note(path, "started")
    time.sleep(seconds)
    _note(path, "finished")
    return "finished"


@task(timeout=1)
def bounded(seconds: float) -> str:
    """Sleeps `seconds` in steps it can be told to stop at; registered with a default time
    limit of 1 s, which applies to calls submitted without one."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if task_context.cancelled():
            return "stopped"
        time.sleep(0.01)
    return "slept"
