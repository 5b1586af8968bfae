"""Lambdas are functions registered by name; nothing from the wire is ever run except these.

A worker process finds each registered function again by importing it, so a function must live
at the top level of an importable module: that is checked here, when it is registered, rather
than on the first call.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from node.function_registry import FunctionRegistry, import_spec_module, missing_module
from node.lambdas.errors import LambdaError

__all__ = [
    "Handler",
    "LambdaRegistry",
    "default_registry",
    "lambda_function",
    "load_lambda",
    "spec_of",
    "parse_spec",
]

Handler = Callable[[Any, Any], Any]
F = TypeVar("F", bound=Callable[..., Any])

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,127}$")


def spec_of(fn: Callable[..., Any]) -> str:
    """The `module:qualname` a worker imports to find `fn` again."""
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', '?')}"


def _check_importable(fn: Callable[..., Any], name: str) -> None:
    qualname = getattr(fn, "__qualname__", None)
    module = getattr(fn, "__module__", None)
    if not isinstance(qualname, str) or not isinstance(module, str):
        raise LambdaError(f"lambda {name!r}: {fn!r} has no module and name to import it by")
    if "<locals>" in qualname or "<lambda>" in qualname:
        raise LambdaError(
            f"lambda {name!r} ({qualname}) is defined inside a function or as a lambda "
            "expression; lambdas run in a worker process that imports them by module and name, "
            "so define it at the top level of a module"
        )


class LambdaRegistry(FunctionRegistry[Handler]):
    """Name -> handler table. Names are what a job asks for; registering twice is an error
    unless it is the same function again (a module imported twice)."""

    def register(self, name: str | None = None) -> Callable[[F], F]:
        """Decorator: `@registry.register()` uses the function's name, `register("x")` sets it."""
        if name is not None and not isinstance(name, str):
            raise LambdaError(
                "register() takes an optional name; write @registry.register() with parentheses"
            )

        def decorate(fn: F) -> F:
            self.add(fn, name=name)
            return fn

        return decorate

    def add(self, fn: Handler, *, name: str | None = None) -> str:
        """Register `fn` (the non-decorator form); returns the name it is known by."""
        if not callable(fn):
            raise LambdaError(f"a lambda must be callable, got {type(fn).__name__}")
        if name is None:
            name = getattr(fn, "__name__", "")
        if not isinstance(name, str) or not _NAME.match(name):
            raise LambdaError(
                f"invalid lambda name {name!r}: use 1-128 letters, digits, '_', '-', '.' or ':'"
            )
        _check_importable(fn, name)
        existing = self._lookup(name)
        if existing is not None and existing is not fn and spec_of(existing) != spec_of(fn):
            raise LambdaError(
                f"lambda name {name!r} is already taken by {spec_of(existing)}; "
                f"choose another name for {spec_of(fn)}"
            )
        self._store(name, fn)
        return name

    def get(self, name: str) -> Handler:
        fn = self._lookup(name)
        if fn is None:
            raise LambdaError(f"no lambda named {name!r}")
        return fn

    def __len__(self) -> int:
        return len(self._functions)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


default_registry = LambdaRegistry()
"""The registry `lambda_function` fills and a `LambdaRunner` serves unless given another; the
node adds the built-ins to it (`node.lambdas.builtin.register_builtins`)."""


def lambda_function(name: str | None = None) -> Callable[[F], F]:
    """`@lambda_function()` / `@lambda_function("name")`: register in the default registry."""
    return default_registry.register(name)


def parse_spec(spec: str) -> tuple[str, str]:
    """Split `module:function` into its parts; LambdaError says what a valid spec looks like."""
    if not isinstance(spec, str):
        raise LambdaError(f"a lambda spec must be a string like 'package.module:function', got {spec!r}")
    module, sep, attr = spec.partition(":")
    if not sep or not _DOTTED.match(module) or not _DOTTED.match(attr):
        raise LambdaError(
            f"invalid lambda spec {spec!r}: expected 'module:function', "
            "for example 'thumbnails:lambda_handler' or 'images.resize:handler'"
        )
    return module, attr


def load_lambda(spec: str) -> Handler:
    """Import the function named by `module:function` (the `--lambda` option).

    The module is found as for `--task` (`node.function_registry.import_spec_module`), so a
    file next to where the node was started can be named without packaging it.
    """
    module_name, attr = parse_spec(spec)
    try:
        module = import_spec_module(module_name)
    except ModuleNotFoundError as e:
        raise missing_module(spec, module_name, e, kind="lambda", error=LambdaError) from e
    except (Exception, SystemExit) as e:  # any failure of user code at import is the spec's
        raise LambdaError(
            f"lambda spec {spec!r}: importing {module_name!r} raised {type(e).__name__}: {e}"
        ) from e
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise LambdaError(
                f"lambda spec {spec!r}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    if not callable(target):
        raise LambdaError(
            f"lambda spec {spec!r}: {attr!r} is a {type(target).__name__}, not a function"
        )
    return target
