"""Errors of the pipelines package: one shallow tree under the fabric's root error.

A class stands for a case some caller handles on its own; `TransactionError` (a transaction
used after it ended, or with another store) is `StoreError`, since nothing tells them apart.
"""

from __future__ import annotations

from core.errors import FabricError

__all__ = [
    "PipelineError",
    "ScheduleError",
    "PipelineConfigError",
    "IllegalTransition",
    "TransactionConflict",
    "TransactionError",
    "StoreError",
    "JobFailed",
    "PipelineBusy",
    "UnknownPipeline",
    "UnknownRun",
]


class PipelineError(FabricError):
    """Root of every error the pipelines package raises."""


class ScheduleError(PipelineError):
    """A time string or interval is not valid; the message names the bad part."""


class PipelineConfigError(PipelineError):
    """A pipeline definition is invalid; `pipeline`, `job` and `field` say where."""

    def __init__(
        self,
        message: str,
        *,
        pipeline: str | None = None,
        job: str | None = None,
        field: str | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.job = job
        self.field = field
        super().__init__(message)


class IllegalTransition(PipelineError):
    """A state change that the transition table does not allow."""

    def __init__(self, from_state: str | None, to_state: str,
                 message: str | None = None) -> None:
        self.from_state = from_state
        self.to_state = to_state
        super().__init__(message or f"illegal transition {from_state} -> {to_state}")


class TransactionConflict(PipelineError):
    """Another transaction committed a change to the same key first (optimistic concurrency)."""

    def __init__(self, key: str, *, snapshot: int, committed_version: int) -> None:
        self.key = key
        self.snapshot = snapshot
        self.committed_version = committed_version
        super().__init__(
            f"conflict on {key!r}: version {committed_version} was committed after this "
            f"transaction began; reload and try again"
        )


class StoreError(PipelineError):
    """The pipeline store could not read or write its sqlite file, a value is not storable, or
    a transaction was used after it ended or with a store it does not belong to."""


TransactionError = StoreError  # the name of its misused-transaction case, kept for importers


class JobFailed(PipelineError):
    """A job's task failed; raised by `run_task` to report a failure, and by `run_job`.

    `permanent`: another run cannot cure it (e.g. no node has the task), so no retry is spent.
    """

    def __init__(self, message: str, *, job: str | None = None,
                 permanent: bool = False) -> None:
        self.job = job
        self.permanent = permanent
        super().__init__(message)


class PipelineBusy(PipelineError):
    """A run cannot start now: the pipeline has a run in progress, or it is paused."""


class UnknownPipeline(PipelineError):
    """No pipeline of that name is configured."""


class UnknownRun(PipelineError):
    """No run of that id is in the store."""
