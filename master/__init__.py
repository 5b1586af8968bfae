"""The master: scheduler, durable journal, node registry and liveness, over MQTT.

`MasterNodeTransport` runs in the master process; `FabricClient` is how any other program
(and the CLI) submits work and asks questions, through the broker.
"""

from master.client import FabricClient
from master.handles import TaskHandle
from master.transport import MasterNodeTransport

__all__ = ["MasterNodeTransport", "FabricClient", "TaskHandle"]
