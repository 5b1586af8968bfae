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
    """Maps task names to plain functions called as `fn(*args, **kwargs)`."""

    def __init__(self) -> None:
        self._tasks: dict[str, TaskFunction] = {}

    def register(self, name: str | None = None) -> Callable[[TaskFunction], TaskFunction]:
        def decorator(fn: TaskFunction) -> TaskFunction:
            self.add(name or fn.__name__, fn)
            return fn
        return decorator

    def add(self, name: str, fn: TaskFunction) -> None:
        if not isinstance(name, str) or not name or "," in name:
            raise ConfigError(f"invalid task name {name!r}")
        if not callable(fn):
            raise ConfigError(f"task {name!r} is not callable")
        self._tasks[name] = fn

    def get(self, name: str) -> TaskFunction | None:
        return self._tasks.get(name)

    def names(self) -> list[str]:
        return sorted(self._tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def copy(self) -> "TaskRegistry":
        other = TaskRegistry()
        other._tasks = dict(self._tasks)
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
