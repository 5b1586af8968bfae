"""Tasks the tests register on real nodes with `--task support.tasks:NAME`."""

from __future__ import annotations

import os
import time


def wait_for_file(path: str, timeout: float = 30.0) -> bool:
    """Block until `path` exists (the test releases the node by creating it)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)
    return True


def record(path: str, label: str) -> str:
    """Append `label` to `path`: the order tasks started in, as the node saw it."""
    with open(path, "a") as f:
        f.write(label + "\n")
    return label


def flaky(path: str, failures: int) -> int:
    """Record a run in `path`; raise on the first `failures` runs, then return the run count:
    a fault that cures itself on a later run."""
    with open(path, "a") as f:
        f.write("run\n")
    with open(path) as f:
        runs = sum(1 for _ in f)
    if runs <= failures:
        raise RuntimeError(f"transient fault on run {runs}")
    return runs


def runs_in(path: str) -> int:
    """How many runs `flaky` recorded in `path`."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for _ in f)
