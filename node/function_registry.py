"""The node's one registry concept: functions known by name, and user code named `module:function`.

Nothing from the wire ever runs except a function registered here. Tasks (`node.registry`,
called as `fn(*args, **kwargs)`) and lambdas (`node.lambdas.registry`, called as
`handler(event, context)` in a worker process) are two kinds of it: each checks names and
functions its own way and keeps its own options, the table and the import of a spec are shared.
Built-ins are registered by an explicit call where the node builds its registry
(`node.builtin_tasks.with_builtins`, `node.lambdas.builtin.register_builtins`), never as a side
effect of importing a module.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any, Generic, TypeVar

__all__ = ["FunctionRegistry", "import_spec_module", "missing_module"]

F = TypeVar("F", bound=Callable[..., Any])


class FunctionRegistry(Generic[F]):
    """Name -> function table; a kind of registry adds its own checks in its `add`."""

    def __init__(self) -> None:
        self._functions: dict[str, F] = {}

    def names(self) -> list[str]:
        return sorted(self._functions)

    def items(self) -> list[tuple[str, F]]:
        return sorted(self._functions.items())

    def __contains__(self, name: object) -> bool:
        return name in self._functions

    def _lookup(self, name: str) -> F | None:
        return self._functions.get(name)

    def _store(self, name: str, fn: F) -> None:
        self._functions[name] = fn


def import_spec_module(module_name: str) -> ModuleType:
    """Import the module of a `--task` or `--lambda` spec, looked up on sys.path with the
    current directory added to its end if absent, so a file beside where the node starts needs
    no packaging and no PYTHONPATH. Failures propagate: the caller words them, a missing
    module with `missing_module`."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.append(cwd)
    return importlib.import_module(module_name)


def missing_module(spec: str, module_name: str, e: ModuleNotFoundError, *, kind: str,
                   error: type[Exception]) -> Exception:
    """The `error` to raise when importing the module of `spec` found a module missing: the
    spec's own, or one it needs that is not installed."""
    missing = e.name or ""
    if missing == module_name or module_name.startswith(missing + "."):
        return error(f"{kind} spec {spec!r}: no module named {missing!r} (looked in sys.path "
                     f"and the current directory {os.getcwd()})")
    return error(f"{kind} spec {spec!r}: importing {module_name!r} failed: it needs module "
                 f"{missing!r}, which is not installed")
