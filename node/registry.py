"""Tasks a node will run, registered by name: nothing else ever runs, no code from the wire."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable

from core.errors import ConfigError

__all__ = ["TaskRegistry", "default_registry", "task", "load_task"]

TaskFunction = Callable[..., Any]


class TaskRegistry:
    """Maps task names to plain functions called as `fn(*args, **kwargs)`, each with an
    optional default time limit for calls that were submitted without one."""

    def __init__(self) -> None:
        self._tasks: dict[str, TaskFunction] = {}
        self._timeouts: dict[str, float] = {}

    def register(self, name: str | None = None, *, timeout: float = 0.0
                 ) -> Callable[[TaskFunction], TaskFunction]:
        """Decorator; `timeout` is the task's default time limit (see `add`), also kept on the
        function as `task_timeout`, so `--task module:function` finds it."""
        def decorator(fn: TaskFunction) -> TaskFunction:
            if timeout:
                fn.task_timeout = timeout  # type: ignore[attr-defined]
            self.add(name or fn.__name__, fn, timeout=timeout)
            return fn
        return decorator

    def add(self, name: str, fn: TaskFunction, *, timeout: float | None = None) -> None:
        """Register `fn` as `name`. `timeout` (seconds, 0: none; default: the function's
        `task_timeout` if it has one) applies to calls submitted without a time limit of
        their own: a submitted limit always wins."""
        if not isinstance(name, str) or not name or "," in name:
            raise ConfigError(f"invalid task name {name!r}")
        if not callable(fn):
            raise ConfigError(f"task {name!r} is not callable")
        if timeout is None:
            timeout = getattr(fn, "task_timeout", 0.0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not 0 <= timeout < float("inf"):
            raise ConfigError(f"task {name!r}: timeout must be a number of seconds >= 0, "
                              f"not {timeout!r}")
        self._tasks[name] = fn
        if timeout:
            self._timeouts[name] = float(timeout)
        else:
            self._timeouts.pop(name, None)

    def get(self, name: str) -> TaskFunction | None:
        return self._tasks.get(name)

    def timeout(self, name: str) -> float:
        """The default time limit of task `name` (0: none)."""
        return self._timeouts.get(name, 0.0)

    def names(self) -> list[str]:
        return sorted(self._tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def copy(self) -> "TaskRegistry":
        other = TaskRegistry()
        other._tasks = dict(self._tasks)
        other._timeouts = dict(self._timeouts)
        return other


default_registry = TaskRegistry()
task = default_registry.register


def load_task(spec: str, *, registry: TaskRegistry) -> str:
    """Register user code given as `module:function` (the task keeps the function's name).

    The module is looked up on sys.path, with the current directory added to its end if
    absent (as for `--lambda`), so `mytasks.py` beside where the node starts needs no
    packaging and no PYTHONPATH.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"task spec {spec!r} must look like module:function")
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if missing == module_name or module_name.startswith(missing + "."):
            raise ConfigError(f"task spec {spec!r}: no module named {missing!r} (looked in "
                              f"sys.path and the current directory {cwd})") from e
        raise ConfigError(f"task spec {spec!r}: importing {module_name!r} failed: it needs "
                          f"module {missing!r}, which is not installed") from e
    except ImportError as e:
        raise ConfigError(f"task spec {spec!r}: cannot import {module_name!r}: {e}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(f"task spec {spec!r}: {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ConfigError(f"task spec {spec!r}: {module_name}.{attr} is not a function")
    registry.add(attr, fn)
    return attr
