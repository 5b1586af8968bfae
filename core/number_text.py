"""Lines of decimal integers, parsed one way wherever they are parsed.

The prime job's client parses its input files, or hands line-aligned byte ranges of them to
CPython nodes, which parse them there (`primes_range`); both take the rules from here, so a
line is a number, a blank or a bad line whoever reads it.

A line holds one decimal integer (optional sign, ASCII digits, surrounding blanks allowed).
Blank lines are skipped. Anything else is bad, with a reason. Readers that cut lines out of
a file in bounded memory call a line longer than MAX_LINE_BYTES bad whatever it holds.
"""

from __future__ import annotations

import re
from typing import Iterator, Union

__all__ = ["MAX_DIGITS", "MAX_LINE_BYTES", "parse_line", "parse_lines", "excerpt", "LineError"]

# CPython refuses int() of longer decimal strings by default; such numbers are bad lines here.
MAX_DIGITS = 4300
MAX_LINE_BYTES = MAX_DIGITS + 64
_NUMBER = re.compile(rb"[+-]?[0-9]+")
_BLANK = b" \t\r\n\x0b\x0c"

# A bad line: its offset among the lines parsed, the reason, and the line's bytes.
LineError = tuple[int, str, bytes]


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


def excerpt(raw: bytes) -> str:
    """The start of a bad line, as text a person can read."""
    text = raw[:64].strip(_BLANK).decode("utf-8", errors="replace")
    return text if len(text) <= 40 else text[:37] + "..."


def parse_lines(lines: list[bytes], *, fast: bool = True
                ) -> Iterator[Union[list[int], LineError]]:
    """The numbers of whole lines, in runs (lists), and a LineError for each bad line.

    The fast path (one `int` per line, in C) serves when every line is a plain integer;
    `fast` must be False when the lines hold a `_` (int() would take "1_000").
    """
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
            yield offset, value, raw
            continue
        numbers.append(value)
    if numbers:
        yield numbers
