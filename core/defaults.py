"""The fabric's default settings, defined once.

The master's options, its CLI, the scheduler, the replicated master and the wire messages all
fall back to these; a copy of a literal in each would drift the day one of them changes.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_NODE_TIMEOUT",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MAX_QUEUED",
    "DEFAULT_HEARTBEAT",
    "DEFAULT_CAPACITY",
    "DEFAULT_PREFETCH",
    "DEFAULT_LEASE_TTL",
    "DEFAULT_WAIT",
]

DEFAULT_NODE_TIMEOUT = 3.0      # seconds: a node silent this long is dead
DEFAULT_MAX_ATTEMPTS = 3        # runs (failed or lost) before a task ends failed
DEFAULT_MAX_QUEUED = 1_000_000  # tasks queued before submitters are slowed
DEFAULT_HEARTBEAT = 1.0         # seconds between a node's status messages
DEFAULT_CAPACITY = 1            # tasks a node runs at once
DEFAULT_PREFETCH = 1            # tasks a node holds ready, when it does not say
DEFAULT_LEASE_TTL = 3.0         # seconds an active master's lease (or a root claim) lives
DEFAULT_WAIT = 300.0            # seconds a caller waits for outcomes unless told (None: no end)
