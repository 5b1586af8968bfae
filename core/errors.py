"""The single exception tree of the fabric: catch `FabricError` to catch them all."""

from __future__ import annotations

__all__ = [
    "FabricError",
    "ConfigError",
    "DecodeError",
    "EncodeError",
    "BrokerUnavailable",
    "FabricTimeout",
    "TaskFailed",
    "QueueFull",
    "TaskRefused",
    "NodeUnavailable",
    "TaskError",
]


class FabricError(Exception):
    """Root of every error the fabric raises."""


class ConfigError(FabricError):
    """A setting, URL or command-line value is invalid; the message says which."""


class DecodeError(FabricError):
    """A payload from the wire is not a valid fabric message."""


class EncodeError(FabricError):
    """A value cannot be put on the wire (unsupported type, too large)."""


class BrokerUnavailable(FabricError):
    """The MQTT broker could not be reached within the allowed time."""


class FabricTimeout(FabricError):
    """A bounded wait ran out before its condition held."""


class TaskFailed(FabricError):
    """A task ended as failed; `error` holds the structured reason."""

    def __init__(self, task_id: str, error: dict) -> None:
        self.task_id = task_id
        self.error = error
        kind = error.get("kind", "error") if isinstance(error, dict) else "error"
        message = error.get("message", "") if isinstance(error, dict) else str(error)
        super().__init__(f"task {task_id} failed ({kind}): {message}")


class QueueFull(FabricError):
    """The master's queue is at its configured bound; submit again later."""


class TaskRefused(FabricError):
    """The master refused a task for good (its id is bound to other work, ...): resending
    the same task cannot help."""


class NodeUnavailable(FabricError):
    """The named node is not known to the master, or not alive."""


class TaskError(FabricError):
    """Raised by a task to report a structured error (`kind`, `type`, `message`, ...) as is."""

    def __init__(self, error: dict) -> None:
        self.error = dict(error)
        super().__init__(f"{self.error.get('kind', 'error')}: {self.error.get('message', '')}")
