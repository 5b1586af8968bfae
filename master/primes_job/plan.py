"""The plan of a prime job: its id, its shards' size, how many are in flight, task ids.

All pure: the same files and the same plan always give the same shards and task ids, which is
what makes a crashed run resumable (the checkpoint keeps the plan, the master keeps outcomes
by task id). A shard's task id carries a digest of what the task computes (its name, its
numbers, its keyword arguments), so the same id never names two computations: a rerun cut in
other shards gets other ids, and only a shard with the very same numbers reuses an outcome.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import msgpack

from core.errors import ConfigError
from core.states import LIVE_STATES
from master.primes_job.numbers import BadLine, wire_number, wire_numbers

__all__ = ["ShardPlan", "Shard", "plan_shards", "window_for", "job_id_for", "task_id",
           "task_digest", "iter_shards", "number_cost", "DEFAULT_SHARD_SIZE", "MAX_SHARD_BYTES",
           "BROKER_SAFE_BYTES", "LIVE_STATES", "live_nodes", "shard_form", "NUMBERS", "RANGES",
           "TASK_NAME", "RANGE_TASK"]

# Numbers per shard on CPython nodes: ~10-40 ms of Miller-Rabin in pure Python, so the
# per-task cost of the fabric (a few ms) stays small beside it, and 2 nodes x 2 slots still
# balance well on a job of 100,000 numbers.
DEFAULT_SHARD_SIZE = 4096
# A task batch to a CPython node may hold `capacity + prefetch` shards in one MQTT message;
# the brokers' packet limit (broker.conf: 1 MiB) must not be reached.
BROKER_SAFE_BYTES = 768 * 1024
# Bound on one shard's numbers as JSON, whatever the node: the submission that carries it must
# stay well below the packet limit too.
MAX_SHARD_BYTES = 256 * 1024
# JSON around a shard's numbers in a task batch: id, name, priority, keys, the batch envelope.
TASK_OVERHEAD_BYTES = 256
# JSON bytes of a typical 64-bit number with its separator: what a count is derived with.
_TYPICAL_NUMBER_BYTES = 21
# The two shard forms and their tasks (see ShardPlan).
NUMBERS, RANGES = "numbers", "ranges"
TASK_NAME, RANGE_TASK = "primes", "primes_range"
# Any number with |n| < 2**64 costs at most this as JSON: 20 digits, sign, quotes, separator.
_MAX_COST_64 = 24
_LIMIT_64 = 1 << 64


@dataclass(frozen=True)
class ShardPlan:
    """A shard holds at most `shard_size` numbers and at most `max_bytes` of them as JSON.

    `form` is how shards travel: NUMBERS (the numbers themselves, task `primes`, which every
    node runs, ESP32 boards included) or RANGES (line-aligned bytes of a file, task
    `primes_range`, parsed by the node: the client does not parse the input; a range of
    about `shard_size` lines of 64-bit numbers, cut by bytes)."""

    shard_size: int
    max_bytes: int
    form: str = NUMBERS

    def __post_init__(self) -> None:
        if self.shard_size < 1 or self.max_bytes < 64:
            raise ConfigError(f"invalid shard plan {self}: shard size must be at least 1 and "
                              "the byte bound at least 64")
        if self.form not in (NUMBERS, RANGES):
            raise ConfigError(f"invalid shard plan {self}: form must be {NUMBERS!r} or "
                              f"{RANGES!r}")

    @property
    def task_name(self) -> str:
        return RANGE_TASK if self.form == RANGES else TASK_NAME

    @property
    def range_bytes(self) -> int:
        """Bytes of input a range shard holds at most (a longer line goes alone)."""
        return max(64, min(self.max_bytes, self.shard_size * _TYPICAL_NUMBER_BYTES))

    def to_dict(self) -> dict[str, Any]:
        return {"shard_size": self.shard_size, "max_bytes": self.max_bytes, "form": self.form}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShardPlan":
        return cls(shard_size=int(d["shard_size"]), max_bytes=int(d["max_bytes"]),
                   form=str(d.get("form", NUMBERS)))


@dataclass(frozen=True, slots=True)
class Shard:
    """Numbers `first`..`first + len(numbers) - 1` of the job's input, in order; `cost` is an
    upper bound of their JSON bytes."""

    index: int
    first: int
    numbers: list[int]
    wire: list[Union[int, str]]
    cost: int

    @property
    def count(self) -> int | None:
        """How many numbers it holds (known before it runs)."""
        return len(self.numbers)


def live_nodes(nodes: Iterable[dict]) -> list[dict]:
    return [n for n in nodes if n.get("status") in LIVE_STATES]


def shard_form(nodes: Iterable[dict]) -> str:
    """RANGES when every live node that tests primes also parses ranges (CPython nodes of
    this release), else NUMBERS, so that every node (a board, an older node) can take
    shards. A node that lists no tasks is not counted on for ranges."""
    testers = [n for n in live_nodes(nodes)
               if not n.get("tasks") or TASK_NAME in n["tasks"] or RANGE_TASK in n["tasks"]]
    if testers and all(RANGE_TASK in (n.get("tasks") or ()) for n in testers):
        return RANGES
    return NUMBERS


def plan_shards(nodes: Sequence[dict], *, shard_size: int | None = None,
                form: str = NUMBERS) -> ShardPlan:
    """The plan for the live nodes in `nodes` (as `FabricClient.nodes()` lists them).

    A node that states a `max_payload` (an ESP32) must be able to take a shard in one
    message; a node that states none (CPython) may get `capacity + prefetch` shards in one
    message, which should stay under the broker's packet limit. The count follows from the
    smallest such budget, capped at DEFAULT_SHARD_SIZE; `shard_size` overrides the count.

    A CPython node's prefetch follows the durations of the tasks it ran last (up to
    hundreds after tiny ones), not of shards, which take it tens of milliseconds: it counts
    here up to the node's capacity, so the plan does not shrink to a few numbers a shard
    after a fast run (a batch larger than a packet is split by the master anyway).
    """
    if shard_size is not None and (isinstance(shard_size, bool) or shard_size < 1):
        raise ConfigError(f"shard size must be a positive integer, got {shard_size!r}")
    budgets = [MAX_SHARD_BYTES]
    for node in live_nodes(nodes):
        payload = int(node.get("max_payload") or 0)
        if payload > 0:
            budgets.append(max(64, payload - TASK_OVERHEAD_BYTES))
        else:
            capacity = max(1, int(node.get("capacity") or 1))
            slots = capacity + min(capacity, max(0, int(node.get("prefetch") or 0)))
            budgets.append(max(64, BROKER_SAFE_BYTES // slots - TASK_OVERHEAD_BYTES))
    max_bytes = min(budgets)
    count = shard_size or max(1, min(DEFAULT_SHARD_SIZE, max_bytes // _TYPICAL_NUMBER_BYTES))
    return ShardPlan(shard_size=count, max_bytes=max_bytes, form=form)


def window_for(nodes: Sequence[dict]) -> int:
    """Shards kept in flight: every slot of every live node busy, and three times as many
    queued at the master, so a node that finishes a shard finds the next one there even when
    this client is slow to answer (bounded: 256 shards of 4096 numbers is ~100 MB here)."""
    slots = sum(max(1, int(n.get("capacity") or 1) + int(n.get("prefetch") or 0))
                for n in live_nodes(nodes))
    return max(4, min(256, 4 * slots + 4))


def job_id_for(paths: Sequence[Path], *, stat: Callable[[Path], os.stat_result] = os.stat) -> str:
    """A job id from the files' absolute paths, sizes and modification times: the same
    command over unchanged files is the same job; a changed file makes a new one."""
    digest = hashlib.sha256()
    for path in paths:
        st = stat(path)
        digest.update(f"{Path(path).resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "primes-" + digest.hexdigest()[:16]


# Hex digits of the content digest in a task id: 80 bits, so two different shards of one job
# at one index never share an id by chance.
DIGEST_CHARS = 20


def task_digest(name: str, args: Sequence[Any], kwargs: dict[str, Any] | None = None) -> str:
    """What a task computes, as hex: the digest of its name, arguments and keyword arguments
    in msgpack (ints stay ints, so 7 and "7" differ, as they do for the node)."""
    body = msgpack.packb([name, list(args), dict(sorted((kwargs or {}).items()))],
                         use_bin_type=True)
    return hashlib.sha256(body).hexdigest()[:DIGEST_CHARS]


def task_id(job_id: str, shard: int, digest: str, attempt: int = 0) -> str:
    """Deterministic and bound to the content: a resubmitted shard is the same task, a shard
    with other numbers (another shard size, changed input) is another, and so is a retry
    after a failure (the master keeps the failed one as failed)."""
    base = f"{job_id}-{shard}-{digest}"
    return base if attempt == 0 else f"{base}-r{attempt}"


def number_cost(wire: Union[int, str]) -> int:
    """JSON bytes of one number in a task, with its separator (and quotes for a string)."""
    return len(str(wire)) + (3 if isinstance(wire, str) else 1)


def iter_shards(items: Iterable[Union[list[int], BadLine]], plan: ShardPlan,
                on_bad: Callable[[BadLine], None]) -> Iterator[Shard]:
    """Cut chunks of numbers into shards under `plan`; bad lines go to `on_bad`.

    A shard closes when it holds `shard_size` numbers, or when the next number would take
    its JSON past `max_bytes`. Costs are only computed where the byte bound could bite:
    a run of numbers below 2**64 that cannot reach it is cut by count alone (same shards,
    several times faster).
    """
    size, max_bytes = plan.shard_size, plan.max_bytes
    index = first = 0
    numbers: list[int] = []
    bound = 0          # upper bound of the JSON bytes of `numbers`
    exact = True       # `bound` is their exact cost
    for item in items:
        if not isinstance(item, list):
            if isinstance(item, BadLine):
                on_bad(item)
                continue
            raise TypeError(f"unexpected input item {item!r}")
        if not item:
            continue
        pos, end = 0, len(item)
        if -_LIMIT_64 < min(item) and max(item) < _LIMIT_64:
            # by count alone while the byte bound cannot close the shard first
            while pos < end and bound + (size - len(numbers)) * _MAX_COST_64 <= max_bytes:
                take = min(size - len(numbers), end - pos)
                numbers += item[pos:pos + take]
                pos += take
                bound += take * _MAX_COST_64
                exact = False
                if len(numbers) >= size:
                    yield _shard(index, first, numbers, bound)
                    index += 1
                    first += len(numbers)
                    numbers, bound, exact = [], 0, True
        if pos >= end:
            continue
        if not exact:
            bound = sum(map(number_cost, wire_numbers(numbers)))
            exact = True
        for value in item[pos:] if pos else item:
            cost = number_cost(wire_number(value))
            if numbers and (len(numbers) >= size or bound + cost > max_bytes):
                yield _shard(index, first, numbers, bound)
                index += 1
                first += len(numbers)
                numbers, bound = [], 0
            numbers.append(value)
            bound += cost
    if numbers:
        yield _shard(index, first, numbers, bound)


def _shard(index: int, first: int, numbers: list[int], bound: int) -> Shard:
    return Shard(index, first, numbers, wire_numbers(numbers), bound)
