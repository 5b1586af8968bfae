"""The `lambda` task: named lambda handlers run in worker processes under limits.

`submit("lambda", kwargs={"name": ..., "event": ..., "env": {...}, "timeout": s, "memory": MB})`
runs the handler registered under that name; a failure (timeout, memory, exception, unknown
name) comes back as the task's structured error, and the node keeps serving.
"""

from __future__ import annotations

from typing import Any

from core.errors import ConfigError, TaskError
from node.registry import TaskRegistry

__all__ = ["attach_lambdas"]


def attach_lambdas(registry: TaskRegistry, specs: list[str]) -> Any:
    """Start a lambda runner for the built-in and `specs` lambdas; register the `lambda` task."""
    from node.lambdas import LambdaError, LambdaRunner
    import node.lambdas.builtin  # noqa: F401  (registers echo, sleep, allocate, fail, env)

    runner = LambdaRunner(specs=list(specs))
    try:
        runner.start()
    except LambdaError as e:
        runner.close()
        raise ConfigError(f"cannot load lambdas: {e}") from e

    def run_lambda(**lambda_data: Any) -> Any:
        result = runner.dispatch_lambda(lambda_data)
        if not result["ok"]:
            raise TaskError(result["error"])
        return result["value"]

    registry.add("lambda", run_lambda)
    return runner
