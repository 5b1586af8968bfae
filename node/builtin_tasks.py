"""Tasks every CPython node runs out of the box (ESP32 nodes run the same names).

Plain functions: the node adds them to the registry it serves (`with_builtins`), importing
this module registers nothing."""

from __future__ import annotations

from typing import Any

from core.errors import FabricError
from core.number_text import excerpt, parse_lines
from core.primality import filter_primes, is_prime
from node import task_context
from node.registry import TaskRegistry

__all__ = ["noop", "echo", "sleep", "fail", "primes", "primes_range", "parse_number",
           "BUILTIN_TASKS", "with_builtins"]

_MAX_SLEEP = 3600.0
_MAX_BAD_REPORTED = 100  # bad lines named per range (all are counted)
_WIRE_HIGH = 1 << 64     # primes from here on travel as decimal text (msgpack's ints end)


def noop(*_args: Any, **_kwargs: Any) -> None:
    """Does nothing: what the fabric's own overhead is measured with."""
    return None


def echo(value: Any = None) -> Any:
    return value


def sleep(seconds: float = 0.0) -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= _MAX_SLEEP:
        raise ValueError(f"sleep takes 0..{_MAX_SLEEP:g} seconds, got {seconds!r}")
    task_context.sleep(seconds)  # ends early if the task is cancelled
    return seconds


def fail(message: str = "failed on purpose") -> None:
    raise FabricError(str(message))


def parse_number(value: Any) -> int:
    """Numbers travel as ints, or as decimal strings when too big for msgpack."""
    if isinstance(value, bool):
        raise TypeError("a boolean is not a number")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return int(value, 10)
    raise TypeError(f"expected an integer or a decimal string, got {type(value).__name__}")


def primes(numbers: list) -> list[int]:
    """Indices (within `numbers`) of the primes: small to send back whatever the numbers' size."""
    if not isinstance(numbers, list):
        raise TypeError("primes takes a list of numbers")
    return [i for i, value in enumerate(numbers) if is_prime(parse_number(value))]


def primes_range(text: str) -> dict[str, Any]:
    """The primes among the lines of `text` (bytes of an input file as Latin-1), parsed here
    so the job's client need not: {"primes": [...], "numbers": how many numbers,
    "bad": how many bad lines, "bad_lines": [[line offset, reason, excerpt], ...]}.
    CPython nodes advertise it; boards keep `primes` (the job falls back to it for them)."""
    if not isinstance(text, str):
        raise TypeError("primes_range takes the text of whole lines")
    data = text.encode("latin-1")
    if data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        return {"primes": [], "numbers": 0, "bad": 0, "bad_lines": []}
    found: list[int | str] = []
    numbers = bad = 0
    bad_lines: list[list[Any]] = []
    for item in parse_lines(data.split(b"\n"), fast=b"_" not in data):
        if isinstance(item, list):
            numbers += len(item)
            found += filter_primes(item)
        else:
            bad += 1
            if len(bad_lines) < _MAX_BAD_REPORTED:
                offset, reason, raw = item
                bad_lines.append([offset, reason, excerpt(raw)])
    high = _WIRE_HIGH
    return {"primes": [p if p < high else str(p) for p in found], "numbers": numbers,
            "bad": bad, "bad_lines": bad_lines}


BUILTIN_TASKS = {"noop": noop, "echo": echo, "sleep": sleep, "fail": fail, "primes": primes,
                 "primes_range": primes_range}


def with_builtins(registry: TaskRegistry) -> TaskRegistry:
    """What a node serves: a copy of `registry` (the tasks `@task` and `--task` gave) over the
    built-in tasks; a task of `registry` wins over a built-in of the same name."""
    served = registry.copy()
    for name, fn in BUILTIN_TASKS.items():
        if name not in served:
            served.add(name, fn)
    return served
