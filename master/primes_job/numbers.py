"""Input numbers: files read in blocks, in bounded memory, with bad lines named, not fatal.

A line holds one decimal integer (optional sign, ASCII digits, surrounding blanks allowed).
Blank lines are skipped. Anything else is a `BadLine` with its file and line number, and the
job goes on. Files are read a block at a time and a line may be at most MAX_LINE_BYTES long,
so a file larger than memory, or one without newlines, is read in bounded memory.

The numbers come out in chunks (lists of ints, one per block of the file): parsing a block
at once is several times faster than a line at a time, and the client reading the files is
what limits a prime job's speed when the nodes test numbers with gmpy2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Union

__all__ = ["BadLine", "parse_line", "read_numbers", "wire_number", "wire_numbers", "MAX_DIGITS",
           "MAX_LINE_BYTES"]

# CPython refuses int() of longer decimal strings by default; such numbers are bad lines here.
MAX_DIGITS = 4300
MAX_LINE_BYTES = MAX_DIGITS + 64
BLOCK_BYTES = 1 << 20
_WIRE_LOW, _WIRE_HIGH = -(1 << 63), 1 << 64  # msgpack's integers: int64 and uint64
_NUMBER = re.compile(rb"[+-]?[0-9]+")
_BLANK = b" \t\r\n\x0b\x0c"


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line that is not an integer: where it is, why, and (the start of) what it holds."""

    path: str
    line: int
    reason: str
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}: {self.text!r}"


def parse_line(raw: bytes) -> int | str | None:
    """The integer on a line, None for a blank line, or the reason it is not an integer."""
    text = raw.strip(_BLANK)
    if not text:
        return None
    if not _NUMBER.fullmatch(text):
        return "not an integer"
    if len(text.lstrip(b"+-")) > MAX_DIGITS:
        return f"more than {MAX_DIGITS} digits"
    return int(text)


def _excerpt(raw: bytes) -> str:
    text = raw.strip(_BLANK).decode("utf-8", errors="replace")
    return text if len(text) <= 40 else text[:37] + "..."


def _parse_block(lines: list[bytes], path: str, first_line: int, *, fast: bool = True
                 ) -> Iterator[Union[list[int], BadLine]]:
    """The numbers of whole lines; the fast path when every line is a plain integer.
    `fast` must be False when the lines hold a `_` (int() would take "1_000")."""
    if fast:
        try:
            yield list(map(int, lines))
            return
        except ValueError:
            pass  # a blank, bad or overlong line somewhere: line by line below
    numbers: list[int] = []
    for offset, raw in enumerate(lines):
        value = parse_line(raw)
        if value is None:
            continue
        if isinstance(value, str):
            if numbers:
                yield numbers
                numbers = []
            yield BadLine(path, first_line + offset, value, _excerpt(raw))
            continue
        numbers.append(value)
    if numbers:
        yield numbers


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
