"""The master: scheduler, durable journal, node registry and liveness, over MQTT.

`MasterNodeTransport` runs in the master process; `FabricClient` is how any other program
(and the CLI) submits work and asks questions, through the broker.

The names below are imported when first used, so a short-lived client (`master-node submit`)
does not pay for loading the scheduler and the journal it never runs.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__all__ = ["MasterNodeTransport", "MasterHooks", "FabricClient", "TaskHandle", "call", "Call",
           "group", "chain", "GroupHandle", "ChainHandle"]

_HOMES = {"MasterNodeTransport": "master.transport", "MasterHooks": "master.hooks",
          "FabricClient": "master.client",
          "TaskHandle": "master.handles", "call": "master.canvas", "Call": "master.canvas",
          "group": "master.canvas", "chain": "master.canvas", "GroupHandle": "master.canvas",
          "ChainHandle": "master.canvas"}

if TYPE_CHECKING:
    from master.canvas import Call, ChainHandle, GroupHandle, call, chain, group
    from master.client import FabricClient
    from master.handles import TaskHandle
    from master.hooks import MasterHooks
    from master.transport import MasterNodeTransport


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'master' has no attribute {name!r}")
    value = getattr(import_module(home), name)
    globals()[name] = value
    return value
