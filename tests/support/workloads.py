"""Tasks the workload tests register on real nodes with `--task support.workloads:NAME`."""

from __future__ import annotations

import time

from node.builtin_tasks import primes as _builtin_primes
from node.builtin_tasks import primes_range as _builtin_primes_range

# Long enough that a job of a few dozen shards is still running when a test kills a process
# mid-job, short enough that the whole job takes a few seconds.
SLOW_SHARD_S = 0.05
# compute-node arguments for both prime shard forms, slowed (the job sends ranges to nodes
# that run `primes_range`, numbers to the others)
SLOW_PRIMES = ("--task", "support.workloads:primes", "--task", "support.workloads:primes_range")


def square_all(items: list, delay: float = 0.0) -> list:
    """One result per item, in order: what a map over shards must put back together."""
    if delay:
        time.sleep(delay)
    return [x * x for x in items]


def primes(numbers: list) -> list:
    """The built-in `primes` task, slowed down per shard (registered under the same name)."""
    time.sleep(SLOW_SHARD_S)
    return _builtin_primes(numbers)


def primes_range(text: str) -> dict:
    """The built-in `primes_range` task (range shards of the prime job), slowed down alike."""
    time.sleep(SLOW_SHARD_S)
    return _builtin_primes_range(text)
