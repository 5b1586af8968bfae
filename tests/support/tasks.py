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
