"""Shards: split a data set into balanced pieces and run one task per piece on the fabric.

`shard_data` is pure. `assign_shards` and `map_shards` take either side of the fabric
(`MasterNodeTransport` inside the master, `FabricClient` anywhere else): both submit through
`submit_many`, and the master's scheduler already hands each task to the least-loaded live
node, and puts a lost node's tasks back at the front of the queue for another node.
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED
from concurrent.futures import wait as wait_futures
from typing import Any, Protocol, Sequence

from core.defaults import DEFAULT_WAIT
from core.errors import ConfigError, FabricTimeout, TaskFailed
from core.protocol import DEFAULT_PRIORITY, MAX_PRIORITY, MIN_PRIORITY
from master.handles import TaskHandle

__all__ = ["shard_data", "assign_shards", "map_shards", "Submitter", "DEFAULT_MAP_TIMEOUT"]

DEFAULT_MAP_TIMEOUT = DEFAULT_WAIT  # seconds a map_shards call waits for its shards by default


class Submitter(Protocol):
    """What the shard functions need of the fabric: MasterNodeTransport or FabricClient."""

    def submit_many(self, calls: Any) -> list[TaskHandle]: ...


def shard_data(data: Sequence[Any], num_shards: int) -> list[list[Any]]:
    """Split `data` into at most `num_shards` consecutive, non-empty pieces whose sizes
    differ by at most one; concatenated, they give `data` back in order."""
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ConfigError(f"num_shards must be a positive integer, got {num_shards!r}")
    items = list(data)
    count = min(num_shards, len(items))
    if count == 0:
        return []
    size, extra = divmod(len(items), count)
    shards = []
    start = 0
    for index in range(count):
        end = start + size + (1 if index < extra else 0)
        shards.append(items[start:end])
        start = end
    return shards


def _job_field(job_data: dict, key: str, kind: type, default: Any) -> Any:
    value = job_data.get(key, default)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"job_data[{key!r}] must be {kind.__name__}, got {value!r}")
    return value


def assign_shards(fabric: Submitter, job_data: dict) -> list[TaskHandle]:
    """Submit one task per shard of `job_data["data"]`; the handles, in shard order.

    `job_data`: `task` (the registered task name, called as `task(shard, **kwargs)`),
    `data` (a list), `num_shards` (default: one per item up to 16), and optionally
    `kwargs` and `priority` (1-10). The scheduler sends each shard to the least-loaded node.
    """
    if not isinstance(job_data, dict):
        raise ConfigError("job_data must be a dict with 'task' and 'data'")
    task = _job_field(job_data, "task", str, "")
    if not task:
        raise ConfigError("job_data['task'] must name a registered task")
    data = _job_field(job_data, "data", list, None)
    num_shards = _job_field(job_data, "num_shards", int, min(16, max(1, len(data))))
    kwargs = _job_field(job_data, "kwargs", dict, {})
    priority = _job_field(job_data, "priority", int, DEFAULT_PRIORITY)
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise ConfigError(f"priority must be {MIN_PRIORITY}-{MAX_PRIORITY}, got {priority}")
    shards = shard_data(data, num_shards)
    return fabric.submit_many([(task, [shard], dict(kwargs), priority) for shard in shards])


def map_shards(fabric: Submitter, task_name: str, data: Sequence[Any], num_shards: int, *,
               timeout: float = DEFAULT_MAP_TIMEOUT, kwargs: dict | None = None,
               priority: int = DEFAULT_PRIORITY) -> list[Any]:
    """Run `task_name(shard, **kwargs)` over the shards of `data`; one result per item, in
    input order. Each shard's task must return a list as long as its shard.

    A shard whose node dies is run again elsewhere by the master. Raises TaskFailed when a
    shard ended failed, FabricTimeout (naming the unfinished shards) after `timeout` seconds
    (DEFAULT_MAP_TIMEOUT unless given: a map never waits forever).
    """
    if timeout <= 0:
        raise ConfigError("timeout must be positive")
    deadline = time.monotonic() + timeout
    shards = shard_data(data, num_shards)
    handles = assign_shards(fabric, {"task": task_name, "data": list(data),
                                     "num_shards": num_shards,
                                     "kwargs": dict(kwargs or {}), "priority": priority})
    pending = {h.future: index for index, h in enumerate(handles)}
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            unfinished = sorted(pending.values())
            raise FabricTimeout(f"map of {task_name!r}: shards {unfinished[:20]} of {len(shards)} "
                                f"not finished within {timeout:g}s")
        done, _ = wait_futures(list(pending), timeout=min(left, 1.0), return_when=FIRST_COMPLETED)
        for future in done:
            index = pending.pop(future)
            handles[index].result(0)  # raises TaskFailed (or QueueFull) for this shard
    out: list[Any] = []
    for index, (handle, shard) in enumerate(zip(handles, shards)):
        value = handle.result(0)
        if not isinstance(value, list) or len(value) != len(shard):
            raise TaskFailed(handle.id, {
                "kind": "bad_result", "shard": index,
                "message": f"shard {index} of {task_name!r} returned "
                           f"{type(value).__name__} of length "
                           f"{len(value) if isinstance(value, list) else '-'}, expected a list of "
                           f"{len(shard)} results"})
        out.extend(value)
    return out
