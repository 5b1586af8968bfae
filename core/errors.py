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
    "GroupFailed",
    "ChainFailed",
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


def _reason(error: dict) -> tuple[str, str]:
    """(kind, message) of a structured error, the exception's type named with its kind."""
    if not isinstance(error, dict):
        return "error", str(error)
    kind, kind_type = str(error.get("kind", "error")), error.get("type")
    if kind_type and kind_type.lower() != kind.replace("_", ""):
        kind = f"{kind}, {kind_type}"
    return kind, str(error.get("message", ""))


class GroupFailed(TaskFailed):
    """A member of a group failed (or was cancelled); `index` (0-based), `name` and
    `task_id` say which, `failures` lists every (index, task_id, name, error) known so far.
    The other members were left to run."""

    def __init__(self, size: int, failures: list[tuple[int, str, str, dict]]) -> None:
        self.index, task_id, self.name, error = failures[0]
        self.size = size
        self.failures = list(failures)
        self.task_id, self.error = task_id, error
        kind, message = _reason(error)
        more = f"; {len(failures) - 1} more failed too" if len(failures) > 1 else ""
        FabricError.__init__(self, f"group member {self.index + 1} of {size} ({self.name}, "
                                   f"task {task_id}) failed ({kind}): {message}{more}")


class ChainFailed(TaskFailed):
    """A step of a chain failed (or was cancelled, or could not be submitted): the chain
    stopped there. `index` (0-based), `name` and `task_id` say which step; the steps after
    it never ran."""

    def __init__(self, size: int, index: int, task_id: str, name: str, error: dict) -> None:
        self.size, self.index, self.name = size, index, name
        self.task_id, self.error = task_id, error
        kind, message = _reason(error)
        rest = size - index - 1
        after = f"; the {rest} step{'s' if rest > 1 else ''} after it did not run" if rest else ""
        FabricError.__init__(self, f"chain step {index + 1} of {size} ({name}, task "
                                   f"{task_id or '-'}) failed ({kind}): {message}{after}")


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
