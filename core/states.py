"""Task and node states as the wire spells them, defined once.

A task's state is what `TaskOutcome.state` and the master's records say; a node's is what its
retained `NodeStatus.status` says. The strings are the protocol (the board, MQTT Explorer and
old clients read them), so they never change; code compares against these names instead of
copies of the literals. Use them as `states.COMPLETED`, `states.READY`: the scheduler has
integer codes of the same task states under the bare names.
"""

from __future__ import annotations

__all__ = [
    "QUEUED", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "PENDING", "UNKNOWN",
    "TASK_STATES", "FINAL_STATES",
    "CONNECTED", "READY", "BUSY", "OFFLINE", "DEAD",
    "NODE_STATES", "LIVE_STATES", "GONE_STATES",
]

# a task
QUEUED = "queued"          # waiting for a node (or for its retry delay)
RUNNING = "running"        # handed to a node, no result yet
COMPLETED = "completed"    # ended with a value
FAILED = "failed"          # ended with an error, its attempts spent or its error permanent
CANCELLED = "cancelled"    # ended because someone cancelled it
PENDING = "pending"        # an outcome asked for before the task ended
UNKNOWN = "unknown"        # an outcome asked for a task the master does not know

TASK_STATES = (QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED)  # a record's states, in order
FINAL_STATES = frozenset({COMPLETED, FAILED, CANCELLED})       # outcomes that end a task

# a node
CONNECTED = "connected"    # its session is up, its first status not yet a verdict
READY = "ready"            # has a free slot
BUSY = "busy"              # every slot taken
OFFLINE = "offline"        # stopped cleanly
DEAD = "dead"              # its will, or the master found it silent

NODE_STATES = (CONNECTED, READY, BUSY, OFFLINE, DEAD)
LIVE_STATES = frozenset({CONNECTED, READY, BUSY})  # a node that may run tasks
GONE_STATES = frozenset({OFFLINE, DEAD})
