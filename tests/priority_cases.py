"""Ordering cases every task queue of the fabric must pass: core.priority_queue (the master's
scheduler and the node use it) and the board's own small queue (esp32/task_queue.py).

A case is (name, operations, expected): the operations run on an empty queue, then the queue
is emptied by popping; `expected` is every item in the order it left, whether popped,
handed back as least urgent or removed. Operations (plain lists, so they travel as JSON to
the board):

- ["push", id, priority]    queued behind its priority
- ["front", id, priority]   put back ahead of its priority (a task handed back or requeued)
- ["pop"]                   the most urgent item leaves
- ["release", n]            the n least urgent leave, the least urgent first
- ["remove", id]            leaves at once (cancelled while queued)

The board never puts a task back in front (it hands tasks back to the master instead), so
cases with "front" run on the other queues only: `board_cases()`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CASES", "Case", "board_cases"]

Case = tuple[str, list[list[Any]], list[str]]


def _pushes(*pairs: tuple[str, int]) -> list[list[Any]]:
    return [["push", item, priority] for item, priority in pairs]


CASES: list[Case] = [
    ("empty", [["pop"]], []),
    ("highest priority first", _pushes(("a", 1), ("b", 10), ("c", 5)), ["b", "c", "a"]),
    ("submission order within a priority",
     _pushes(("a", 3), ("b", 9), ("c", 5), ("d", 9), ("e", 3)), ["b", "d", "c", "a", "e"]),
    ("bounds 1 and 10", _pushes(("low", 1), ("high", 10), ("low2", 1), ("high2", 10)),
     ["high", "high2", "low", "low2"]),
    ("popping in between keeps the order",
     [*_pushes(("a", 5), ("b", 5)), ["pop"], *_pushes(("c", 9), ("d", 5)), ["pop"]],
     ["a", "c", "b", "d"]),
    ("least urgent: lowest priority, newest first",
     [*_pushes(("a", 5), ("b", 1), ("c", 1), ("d", 9)), ["release", 2]],
     ["c", "b", "d", "a"]),
    ("release more than held", [*_pushes(("a", 5), ("b", 6)), ["release", 5], ["pop"]],
     ["a", "b"]),
    ("removed items never come up",
     [*_pushes(("a", 5), ("b", 7), ("c", 5)), ["remove", "b"], ["remove", "zz"]],
     ["b", "a", "c"]),
    ("front: ahead of its priority only",
     [*_pushes(("a", 5), ("b", 9)), ["front", "r", 5]], ["b", "r", "a"]),
    ("front: the last put back first",
     [*_pushes(("a", 5)), ["front", "r1", 5], ["front", "r2", 5]], ["r2", "r1", "a"]),
    ("front, then behind",
     [["front", "r", 5], *_pushes(("a", 5)), ["front", "s", 3], ["release", 1]],
     ["s", "r", "a"]),
]


def board_cases() -> list[Case]:
    """The cases the board's queue runs (it has no front)."""
    return [case for case in CASES if all(op[0] != "front" for op in case[1])]
