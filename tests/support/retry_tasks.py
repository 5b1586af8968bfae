"""Tasks the retry and delay tests register on real nodes with `--task support.retry_tasks:NAME`:
each notes the wall-clock time it started, so a test sees when the master let it run."""

from __future__ import annotations

import time

from node.registry import task


def _stamp(path: str) -> tuple[float, int]:
    now = time.time()
    with open(path, "a") as f:
        f.write(f"{now:.6f}\n")
    with open(path) as f:
        return now, sum(1 for _ in f)


def stamp(path: str) -> float:
    """Note when it started (one line per run in `path`); return that time."""
    return _stamp(path)[0]


def flaky_stamp(path: str, failures: int) -> int:
    """Note when it started; raise on the first `failures` runs, then return the run count."""
    _now, runs = _stamp(path)
    if runs <= failures:
        raise RuntimeError(f"transient fault on run {runs}")
    return runs


@task(retry={"max_attempts": 5, "backoff": 0.2, "retry_on": ["exception"]})
def registered_flaky(path: str, failures: int) -> int:
    """`flaky_stamp` registered with its own retry policy: 5 runs, backoff from 0.2 s."""
    return flaky_stamp(path, failures)


def starts(path: str) -> list[float]:
    """The start times noted in `path`, in order."""
    try:
        with open(path) as f:
            return [float(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
