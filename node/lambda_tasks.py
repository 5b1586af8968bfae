"""The `lambda` task: named lambda handlers run in worker processes under limits.

`submit("lambda", kwargs={"name": ..., "event": ..., "env": {...}, "timeout": s, "memory": MB})`
runs the handler registered under that name; a failure (timeout, memory, exception, unknown
name) comes back as the task's structured error, and the node keeps serving.

On a process-pool node the `lambda` task runs in a worker process forked from the node, which
cannot share the node's lambda worker: it starts its own on its first lambda call (same
lambdas, same limits), and that one stops when the worker process ends or is killed.
"""

from __future__ import annotations

import os
from typing import Any

from core.errors import ConfigError, TaskError
from node.registry import TaskRegistry

__all__ = ["attach_lambdas"]


def attach_lambdas(registry: TaskRegistry, specs: list[str]) -> Any:
    """Start a lambda runner for the built-in and `specs` lambdas; register the `lambda` task."""
    from node.lambdas import LambdaError, LambdaRunner
    from node.lambdas.builtin import register_builtins

    register_builtins()  # echo, sleep, allocate, fail, env in the default lambda registry

    runner = LambdaRunner(specs=list(specs))
    try:
        runner.start()
    except LambdaError as e:
        runner.close()
        raise ConfigError(f"cannot load lambdas: {e}") from e

    owner = os.getpid()
    forked: dict[int, Any] = {}  # pid of a pool's worker process -> its own runner
    # (the node's runner is inherited by such a process, but is not its to use or close)

    def here() -> Any:
        pid = os.getpid()
        if pid == owner:
            return runner
        mine = forked.get(pid)
        if mine is None:
            mine = forked[pid] = LambdaRunner(specs=list(specs))
            mine.start()
        return mine

    def run_lambda(**lambda_data: Any) -> Any:
        result = here().dispatch_lambda(lambda_data)
        if not result["ok"]:
            raise TaskError(result["error"])
        return result["value"]

    registry.add("lambda", run_lambda)
    return runner
