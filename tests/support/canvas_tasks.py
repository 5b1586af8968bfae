"""Tasks the canvas tests register on real nodes with `--task support.canvas_tasks:NAME`."""

from __future__ import annotations

from node import task_context


def add(a: float, b: float) -> float:
    return a + b


def mul(a: float, b: float) -> float:
    return a * b


def divide(a: float, b: float) -> float:
    return a / b  # b == 0: a ZeroDivisionError, the step that fails


def note(value: object, path: str) -> object:
    """Write that it ran (a step after a failure must never get here), pass `value` on."""
    with open(path, "a") as f:
        f.write(f"{value}\n")
    return value


def hold(seconds: float) -> str:
    """Wait until cancelled (or `seconds` pass): a step that is under way when cancelled."""
    task_context.sleep(seconds)
    return "finished"
