"""Tasks a node will run, registered by name: nothing else ever runs, no code from the wire."""

from __future__ import annotations

from typing import Any, Callable

from core.errors import ConfigError
from core.protocol import MAX_ATTEMPTS, MAX_DELAY
from node.function_registry import FunctionRegistry, import_spec_module, missing_module

__all__ = ["TaskRegistry", "default_registry", "task", "load_task"]

TaskFunction = Callable[..., Any]


class TaskRegistry(FunctionRegistry[TaskFunction]):
    """Maps task names to plain functions called as `fn(*args, **kwargs)`, each with an
    optional default time limit for calls that were submitted without one."""

    def __init__(self) -> None:
        super().__init__()
        self._timeouts: dict[str, float] = {}
        self._retries: dict[str, dict[str, Any]] = {}

    def register(self, name: str | None = None, *, timeout: float = 0.0,
                 retry: dict[str, Any] | None = None
                 ) -> Callable[[TaskFunction], TaskFunction]:
        """Decorator; `timeout` is the task's default time limit and `retry` its default
        retry policy (see `add`), also kept on the function (`task_timeout`, `task_retry`),
        so `--task module:function` finds them."""
        def decorator(fn: TaskFunction) -> TaskFunction:
            if timeout:
                fn.task_timeout = timeout  # type: ignore[attr-defined]
            if retry:
                fn.task_retry = retry  # type: ignore[attr-defined]
            self.add(name or fn.__name__, fn, timeout=timeout, retry=retry)
            return fn
        return decorator

    def add(self, name: str, fn: TaskFunction, *, timeout: float | None = None,
            retry: dict[str, Any] | None = None) -> None:
        """Register `fn` as `name`. `timeout` (seconds, 0: none; default: the function's
        `task_timeout` if it has one) applies to calls submitted without a time limit of
        their own: a submitted limit always wins. `retry` (default: the function's
        `task_retry`): how the master retries its failed runs when the submission says
        nothing, any of `max_attempts`, `backoff`, `backoff_max` (seconds) and `retry_on`
        (error kinds); the node sends it with each failed run."""
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
        if retry is None:
            retry = getattr(fn, "task_retry", None)
        hint = _retry_hint(name, retry) if retry else None
        self._store(name, fn)
        if timeout:
            self._timeouts[name] = float(timeout)
        else:
            self._timeouts.pop(name, None)
        if hint:
            self._retries[name] = hint
        else:
            self._retries.pop(name, None)

    def get(self, name: str) -> TaskFunction | None:
        return self._lookup(name)

    def timeout(self, name: str) -> float:
        """The default time limit of task `name` (0: none)."""
        return self._timeouts.get(name, 0.0)

    def retry(self, name: str) -> dict[str, Any] | None:
        """The retry policy task `name` was registered with, as sent to the master."""
        return self._retries.get(name)

    def copy(self) -> "TaskRegistry":
        other = TaskRegistry()
        other._functions = dict(self._functions)
        other._timeouts = dict(self._timeouts)
        other._retries = dict(self._retries)
        return other


def _retry_hint(name: str, retry: object) -> dict[str, Any]:
    """A registered retry policy as the master reads it, checked here so that a mistake
    shows when the node starts, not as an ignored policy later."""
    if not isinstance(retry, dict) or set(retry) - set(_RETRY_KEYS):
        raise ConfigError(f"task {name!r}: retry must be a dict of {', '.join(_RETRY_KEYS)}, "
                          f"not {retry!r}")
    hint: dict[str, Any] = {}
    attempts = retry.get("max_attempts", 0)
    if type(attempts) is not int or not 0 <= attempts <= MAX_ATTEMPTS:
        raise ConfigError(f"task {name!r}: max_attempts must be 0-{MAX_ATTEMPTS}, "
                          f"not {attempts!r}")
    if attempts:
        hint["max_attempts"] = attempts
    for key in ("backoff", "backoff_max"):
        if key in retry:
            value = retry[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0 <= value <= MAX_DELAY:
                raise ConfigError(f"task {name!r}: {key} must be 0-{MAX_DELAY:g} seconds, "
                                  f"not {value!r}")
            hint[key] = float(value)
    if "retry_on" in retry:
        kinds = retry["retry_on"]
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not isinstance(kinds, (list, tuple)) or not all(isinstance(k, str) for k in kinds):
            raise ConfigError(f"task {name!r}: retry_on must be error kinds, not {kinds!r}")
        hint["retry_on"] = list(kinds)
    return hint


_RETRY_KEYS = ("max_attempts", "backoff", "backoff_max", "retry_on")

default_registry = TaskRegistry()
"""What `@task` fills; the node serves a copy of it over the built-ins
(`node.builtin_tasks.with_builtins`)."""
task = default_registry.register


def load_task(spec: str, *, registry: TaskRegistry) -> str:
    """Register user code given as `module:function` (the task keeps the function's name).

    The module is found as for `--lambda` (`node.function_registry.import_spec_module`), so
    `mytasks.py` beside where the node starts needs no packaging and no PYTHONPATH.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"task spec {spec!r} must look like module:function")
    try:
        module = import_spec_module(module_name)
    except ModuleNotFoundError as e:
        raise missing_module(spec, module_name, e, kind="task", error=ConfigError) from e
    except ImportError as e:
        raise ConfigError(f"task spec {spec!r}: cannot import {module_name!r}: {e}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(f"task spec {spec!r}: {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ConfigError(f"task spec {spec!r}: {module_name}.{attr} is not a function")
    registry.add(attr, fn)
    return attr
