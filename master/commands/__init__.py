"""The `master-node` commands, one module each: NAME, HELP, DESCRIPTION, add_arguments, run.

The modules are imported when asked for: a one-shot command (`master-node submit`) loads its
own module only, not every other command's imports and options.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

# In the order `master-node --help` lists them; each is the module master/commands/<name>.py.
NAMES = ("serve", "submit", "result", "tasks", "task", "cancel", "nodes", "status", "primes",
         "snapshot", "pipelines", "dashboard", "passwd", "broker")

__all__ = ["COMMANDS", "NAMES", "load"]


def load(name: str) -> ModuleType:
    """The module of the command `name` (one of NAMES)."""
    if name not in NAMES:
        raise KeyError(name)
    return importlib.import_module(f"master.commands.{name}")


def __getattr__(attr: str) -> Any:
    if attr == "COMMANDS":  # every command, imported on first use
        return [load(name) for name in NAMES]
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
