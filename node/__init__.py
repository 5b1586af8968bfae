"""A CPython compute node: takes tasks from its topic, runs registered functions, reports."""

from node.registry import TaskRegistry, default_registry, load_task, task
from node.transport import ComputeNodeTransport

__all__ = ["ComputeNodeTransport", "TaskRegistry", "default_registry", "load_task", "task"]
