"""Tasks the pool tests register on real nodes with `--task support.pool_tasks:NAME`."""

from __future__ import annotations

import os
import sys
import time


def chatty(nbytes: int, fail: bool = False) -> int:
    """Print `nbytes` (stdout and stderr, in lines), end with a marker line, maybe fail."""
    line = "x" * 1023 + "\n"
    for i in range(nbytes // 1024):
        (sys.stderr if i % 2 else sys.stdout).write(line)
    print("the last line")
    if fail:
        raise ValueError("failed after printing")
    return nbytes


def runaway(path: str, seconds: float) -> int:
    """Note its pid, then sleep without ever looking at its context."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    return os.getpid()


def pid() -> int:
    return os.getpid()


def loud(event: dict, context: object) -> int:
    """A lambda that prints event["bytes"] bytes before it answers."""
    line = "y" * 1023 + "\n"
    for _ in range(event["bytes"] // 1024):
        print(line, end="")
    print("the lambda's last line")
    return event["bytes"]


def die(code: int = 3) -> None:
    """End the process at once, without a result."""
    os._exit(code)
