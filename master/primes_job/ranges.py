"""Range shards: line-aligned bytes of the input files, parsed by the nodes, not the client.

Parsing every number (and packing it for the wire) cost the job's client about as much CPU as
the nodes spent testing with gmpy2. A range shard carries a run of whole lines of one file as
text; a CPython node's `primes_range` parses and tests them and answers with the primes, how
many numbers it read and its bad lines (offsets into the shard, made file:line here). The
client only finds line ends and counts them, in C, a block at a time.

The shard's text is the bytes read as Latin-1 (every byte one character, so any file travels,
and back on the node exactly as read). Its task id carries the digest of that text, so a shard
is bound to its very bytes: another cut (another --shard-size) or changed content gets other
ids, and a rerun never takes an outcome computed for other numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from core.number_text import MAX_LINE_BYTES, excerpt
from master.primes_job.numbers import BLOCK_BYTES, BadLine
from master.primes_job.plan import ShardPlan

__all__ = ["RangeShard", "iter_range_shards", "RangeResult", "range_result"]

# Bytes that need no escaping in JSON besides the newline (which takes two).
_PLAIN = b"0123456789\n +-"
_OVERLONG = f"line longer than {MAX_LINE_BYTES} bytes"


@dataclass(frozen=True, slots=True)
class RangeShard:
    """Lines `first_line`.. of `path` (`lines` newlines' worth), as Latin-1 text in `wire`;
    `cost` bounds its JSON bytes."""

    index: int
    path: str
    first_line: int
    lines: int
    wire: str
    cost: int

    @property
    def count(self) -> int | None:
        """Unknown until a node has parsed it."""
        return None


def _json_cost(raw: bytes, lines: int) -> int:
    """JSON bytes of `raw` (holding `lines` newlines) as a Latin-1 string, with its quotes
    and a separator."""
    if not raw.translate(None, _PLAIN):
        return len(raw) + lines + 3
    return len(json.dumps(raw.decode("latin-1"))) + 1


def iter_range_shards(paths: Iterable[Path], plan: ShardPlan, on_bad: Callable[[BadLine], None],
                      *, on_bytes: Callable[[int], None] | None = None,
                      block_bytes: int = BLOCK_BYTES) -> Iterator[RangeShard]:
    """Cut each file into runs of whole lines of at most `plan.range_bytes` (a single line up
    to MAX_LINE_BYTES goes alone if longer), each within `plan.max_bytes` as JSON.

    A line longer than MAX_LINE_BYTES is a bad line named here, and skipped in bounded memory;
    a file is read a block at a time, so memory stays bounded whatever its size.
    """
    target = plan.range_bytes
    need = target + MAX_LINE_BYTES + 1  # bytes in hand before a cut: a whole line fits
    index = 0
    for path in paths:
        name = str(path)
        line_no = 1        # number of the line that starts at `pos`
        buf, pos = b"", 0
        eof = skipping = False  # skipping: inside an overlong line, up to its end
        with open(path, "rb") as f:
            while True:
                if not eof and len(buf) - pos < need:
                    block = f.read(max(block_bytes, need))
                    if block:
                        if on_bytes is not None:
                            on_bytes(len(block))
                        buf, pos = buf[pos:] + block, 0
                    else:
                        eof = True
                if skipping:
                    end = buf.find(b"\n", pos)
                    if end < 0:
                        buf, pos = b"", 0
                        if eof:
                            break
                        continue
                    pos, line_no, skipping = end + 1, line_no + 1, False
                left = len(buf) - pos
                if not left:
                    if eof:
                        break
                    continue
                if eof and left <= target:
                    cut = len(buf)  # the file's last lines
                else:
                    cut = buf.rfind(b"\n", pos, pos + target) + 1
                    if not cut:  # its first line is longer than a shard: alone, if it may be
                        cut = buf.find(b"\n", pos, pos + MAX_LINE_BYTES + 1) + 1
                        if not cut:
                            if left > MAX_LINE_BYTES:
                                on_bad(BadLine(name, line_no, _OVERLONG,
                                               excerpt(buf[pos:pos + 64])))
                                skipping = True
                                continue
                            if not eof:
                                continue  # read the rest of the line
                            cut = len(buf)
                for raw, lines, cost in _pieces(buf[pos:cut], plan.max_bytes):
                    yield RangeShard(index, name, line_no, lines, raw.decode("latin-1"), cost)
                    index += 1
                    line_no += lines
                pos = cut


def _pieces(raw: bytes, max_bytes: int) -> list[tuple[bytes, int, int]]:
    """`raw` with its newlines and JSON cost, or halves of it at line ends while its JSON
    exceeds `max_bytes` (text that needs escaping: control characters, bytes above 127)."""
    lines = raw.count(b"\n")
    cost = _json_cost(raw, lines)
    if cost <= max_bytes:
        return [(raw, lines, cost)]
    middle = raw.rfind(b"\n", 0, len(raw) // 2) + 1 or raw.find(b"\n") + 1
    if not 0 < middle < len(raw):
        return [(raw, lines, cost)]  # one line: as it is (at most MAX_LINE_BYTES, escaped)
    return _pieces(raw[:middle], max_bytes) + _pieces(raw[middle:], max_bytes)


@dataclass(frozen=True, slots=True)
class RangeResult:
    """What a node found in a range shard."""

    primes: list[int | str]
    numbers: int
    bad: int
    bad_lines: list[BadLine]


def range_result(shard: RangeShard, value: Any) -> RangeResult:
    """A node's answer for `shard`, checked; ValueError for a malformed one."""
    if not isinstance(value, dict):
        raise ValueError(f"expected a dict, got {type(value).__name__}")
    primes, numbers, bad = value.get("primes"), value.get("numbers"), value.get("bad", 0)
    if not isinstance(primes, list):
        raise ValueError("no list of primes in the answer")
    if type(numbers) is not int or type(bad) is not int or not 0 <= len(primes) <= numbers \
            or bad < 0 or numbers + bad > shard.lines + 1:
        raise ValueError(f"counts {numbers!r} numbers, {bad!r} bad lines do not fit a shard "
                         f"of {shard.lines} lines")
    for p in primes:
        if type(p) is int:
            if p < 2:
                raise ValueError(f"{p} is not a prime")
        elif not (isinstance(p, str) and p.isdigit() and p.isascii() and p[0] != "0"):
            raise ValueError(f"prime {p!r} is not a decimal number")
    bad_lines = []
    for item in value.get("bad_lines") or []:
        if not (isinstance(item, list) and len(item) == 3 and type(item[0]) is int
                and 0 <= item[0] <= shard.lines):
            raise ValueError(f"bad line {item!r} is not [offset, reason, text] in the shard")
        bad_lines.append(BadLine(shard.path, shard.first_line + item[0], str(item[1]),
                                 str(item[2])[:40]))
    return RangeResult(primes, numbers, bad, bad_lines)
