"""The master package's own errors, defined once; the fabric's shared ones are in core.errors.

Each is caught by name where it is handled and re-exported by the module that raises it
(`master.primes_job.feeder`, `master.journal_replication`), so either import works.
"""

from __future__ import annotations

from core.errors import ConfigError, FabricError

__all__ = ["StaleCheckpoint", "ReplicationError"]


class StaleCheckpoint(ConfigError):
    """A shard the checkpoint holds as done now has other numbers (same files' sizes and
    times, other content): the checkpoint cannot be trusted for this input."""


class ReplicationError(FabricError):
    """A delta or copy cannot be applied here (the standby then asks for a full copy)."""
