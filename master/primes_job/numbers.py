"""Input numbers: files read in blocks, in bounded memory, with bad lines named, not fatal.

A line holds one decimal integer (core/number_text.py has the rules, shared with the nodes
that parse byte ranges). Anything else is a `BadLine` with its file and line number, and the
job goes on. Files are read a block at a time and a line may be at most MAX_LINE_BYTES long,
so a file larger than memory, or one without newlines, is read in bounded memory.

The numbers come out in chunks (lists of ints, one per block of the file): parsing a block
at once is several times faster than a line at a time, and the client reading the files is
what limits a prime job's speed when the nodes test numbers with gmpy2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Union

from core.number_text import MAX_DIGITS, MAX_LINE_BYTES, excerpt, parse_line, parse_lines

__all__ = ["BadLine", "parse_line", "read_numbers", "wire_number", "wire_numbers", "MAX_DIGITS",
           "MAX_LINE_BYTES"]

BLOCK_BYTES = 1 << 20
_WIRE_LOW, _WIRE_HIGH = -(1 << 63), 1 << 64  # msgpack's integers: int64 and uint64


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line that is not an integer: where it is, why, and (the start of) what it holds."""

    path: str
    line: int
    reason: str
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}: {self.text!r}"


def _excerpt(raw: bytes) -> str:
    return excerpt(raw)


def _parse_block(lines: list[bytes], path: str, first_line: int, *, fast: bool = True
                 ) -> Iterator[Union[list[int], BadLine]]:
    """The numbers of whole lines; the fast path when every line is a plain integer.
    `fast` must be False when the lines hold a `_` (int() would take "1_000")."""
    for item in parse_lines(lines, fast=fast):
        if isinstance(item, list):
            yield item
        else:
            offset, reason, raw = item
            yield BadLine(path, first_line + offset, reason, excerpt(raw))


def read_numbers(paths: Iterable[Path], *, on_bytes: Callable[[int], None] | None = None,
                 block_bytes: int = BLOCK_BYTES) -> Iterator[Union[list[int], BadLine]]:
    """Each file's integers in order, in chunks (lists), and a BadLine for each bad line.

    `on_bytes(n)` is told how many bytes each block took, for progress by size.
    """
    for path in paths:
        name = str(path)
        line_no = 1          # number of the first line in `carry`
        carry = b""          # a line begun in the previous block
        skipping = False     # inside an overlong line: drop bytes up to its end
        with open(path, "rb") as f:
            while True:
                block = f.read(block_bytes)
                if on_bytes is not None and block:
                    on_bytes(len(block))
                if not block:
                    if carry and not skipping:
                        yield from _parse_block([carry], name, line_no, fast=b"_" not in carry)
                    break
                if skipping:
                    end = block.find(b"\n")
                    if end < 0:
                        continue
                    block = block[end + 1:]
                    skipping = False
                    line_no += 1
                data = carry + block
                cut = data.rfind(b"\n")
                if cut < 0:
                    carry = data
                else:
                    fast = data.find(b"_", 0, cut) < 0
                    lines = data[:cut].split(b"\n")
                    carry = data[cut + 1:]
                    yield from _parse_block(lines, name, line_no, fast=fast)
                    line_no += len(lines)
                if len(carry) > MAX_LINE_BYTES:
                    yield BadLine(name, line_no, f"line longer than {MAX_LINE_BYTES} bytes",
                                  _excerpt(carry[:64]))
                    carry = b""
                    skipping = True


def wire_number(n: int) -> int | str:
    """How a number travels in a task: an int when -2**63 <= n < 2**64, else a decimal
    string (msgpack carries exactly those ints, and so does every peer's JSON, MicroPython's
    included; bigger ones would not survive all). Every 64-bit number goes as an int: turning
    half of them into text and back cost the job's client and nodes more than the test."""
    return n if _WIRE_LOW <= n < _WIRE_HIGH else str(n)


def wire_numbers(numbers: list[int]) -> list[int | str]:
    """`wire_number` of each, as one list comprehension (the hot path of a big job)."""
    lo, hi = _WIRE_LOW, _WIRE_HIGH
    return [n if lo <= n < hi else str(n) for n in numbers]
