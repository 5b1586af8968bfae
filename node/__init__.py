"""A CPython compute node: takes tasks from its topic, runs registered functions, reports.

`ComputeNodeTransport(..., pool="process")` runs them in worker processes (one per capacity
slot) that a time limit or a cancel kills; the default `pool="thread"` runs them on threads.
"""

from node.process_pool import POOLS
from node.registry import TaskRegistry, default_registry, load_task, task
from node.transport import ComputeNodeTransport

__all__ = ["ComputeNodeTransport", "POOLS", "TaskRegistry", "default_registry", "load_task",
           "task"]
