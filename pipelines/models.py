"""Pipelines and jobs as versioned models: each save is a new version, written in a transaction.

    tx = model.begin_transaction()
    model.save_pipeline(tx)      # or job.save_job(tx); several models may share one tx
    model.commit(tx)             # or model.rollback(tx); TransactionConflict if another
                                 # transaction changed the same model first

Saves are synchronous (sqlite is); `save()` does the three steps in one call. `save_pipeline`
and `save_job` stage at once and return an awaitable that is already done, so coroutine code
may write `await model.save_pipeline(tx)` with the same effect.

Without a `store`, a model uses `default_store()`. A pipeline's config may be a
`PipelineConfig` or the same pipeline as data (`{"jobs": [{"name": "extract"}, ...]}`, see
`parse_pipeline_data`), validated on construction.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Generator, Mapping
from typing import Any

from pipelines.config import JobConfig, PipelineConfig, parse_pipeline_data
from pipelines.errors import PipelineError, StoreError
from pipelines.states import (JOB_STATES, PENDING, PIPELINE_STATES, SCHEDULED, StateMachine,
                              job_state_machine, pipeline_state_machine)
from pipelines.store import Transaction, Version, VersionedStore, default_store
from pipelines.timestrings import parse_time_string

__all__ = ["VersionedModel", "PipelineModel", "JobModel", "Staged"]


class Staged:
    """What `save_pipeline`/`save_job` return: the write is already staged; awaiting it is a
    no-op that lets coroutine code await the save as well."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # a generator that finishes at once


_STAGED = Staged()


class VersionedModel(ABC):
    """A model whose saves are versions of one key in a `VersionedStore`."""

    state_machine: StateMachine

    def __init__(self, key: str, *, store: VersionedStore | None) -> None:
        self.key = key
        self.store = store if store is not None else default_store()
        self.version = 0  # the last version this object saved or loaded; 0 = never stored

    @property
    def state(self) -> str:
        state = self.state_machine.get_state()
        assert state is not None  # models always start in a state
        return state

    def begin_transaction(self) -> Transaction:
        """A transaction on the model's store."""
        return self.store.begin()

    def commit(self, tx: Transaction) -> dict[str, int]:
        """Commit `tx` (every model saved in it); returns {key: new version}."""
        return self.store.commit(tx)

    def rollback(self, tx: Transaction) -> None:
        """Discard `tx`; the last committed versions stay."""
        self.store.rollback(tx)

    def history(self) -> list[Version]:
        """Every committed version of this model, oldest first."""
        return self.store.history(self.key)

    def save(self) -> int:
        """Save in a transaction of its own; returns the new version."""
        tx = self.begin_transaction()
        self._stage(tx)
        return self.commit(tx)[self.key]

    @abstractmethod
    def data(self) -> dict[str, Any]:
        """What a version of this model holds besides its state."""

    def _stage(self, tx: Transaction) -> None:
        tx.write(self.key, self.state, self.data(), on_commit=self._committed)

    def _committed(self, version: int) -> None:
        self.version = version

    def _restore(self, states: tuple[str, ...]) -> Version | None:
        """Take the state of the last committed version, if there is one."""
        stored = self.store.read(self.key)
        if stored is None:
            return None
        if stored.state not in states:
            raise StoreError(f"{self.key!r} version {stored.version} has unknown state "
                             f"{stored.state!r}")
        self.state_machine.current_state = stored.state
        self.version = stored.version
        return stored


class PipelineModel(VersionedModel):
    """A pipeline: its config, its lifecycle state and its latest run."""

    def __init__(self, name: str, config: PipelineConfig | Mapping[str, Any], *,
                 store: VersionedStore | None = None, state: str = SCHEDULED) -> None:
        if not isinstance(config, PipelineConfig):
            config = parse_pipeline_data(config, name=name)
        if config.name != name:
            raise PipelineError(f"pipeline model {name!r} given the config of {config.name!r}")
        super().__init__(f"pipeline:{name}", store=store)
        self.name = name
        self.config = config
        self.state_machine = pipeline_state_machine(state)
        self.last_run_id: str | None = None

    @classmethod
    def load(cls, config: PipelineConfig, *,
             store: VersionedStore | None = None) -> PipelineModel:
        """The model as last committed (state, latest run), or a new Scheduled one."""
        model = cls(config.name, config, store=store)
        stored = model._restore(PIPELINE_STATES)
        if stored is not None and isinstance(stored.data, dict):
            model.last_run_id = stored.data.get("last_run_id")
        return model

    def save_pipeline(self, tx: Transaction) -> Staged:
        """Stage the current state of the pipeline in `tx` (awaitable, already done)."""
        self._stage(tx)
        return _STAGED

    def data(self) -> dict[str, Any]:
        return {"name": self.name, "last_run_id": self.last_run_id,
                "config": self.config.to_dict()}


class JobModel(VersionedModel):
    """A job of a pipeline: its config and the outcome of its latest run."""

    def __init__(self, pipeline_id: str, name: str, schedule: str | None = None, *,
                 store: VersionedStore | None = None, config: JobConfig | None = None,
                 state: str = PENDING) -> None:
        if config is not None and config.name != name:
            raise PipelineError(f"job model {name!r} given the config of {config.name!r}")
        super().__init__(f"job:{pipeline_id}/{name}", store=store)
        self.pipeline_id = pipeline_id
        self.name = name
        self.config = config
        self.schedule = schedule if schedule is not None else (config.schedule if config else None)
        if self.schedule is not None:
            parse_time_string(self.schedule)  # ScheduleError now, not at the first fire
        self.state_machine = job_state_machine(state)
        self.last_run_id: str | None = None
        self.error: str | None = None

    @classmethod
    def load(cls, pipeline_id: str, config: JobConfig, *,
             store: VersionedStore | None = None) -> JobModel:
        """The job as last committed, or a new Pending one."""
        model = cls(pipeline_id, config.name, store=store, config=config)
        stored = model._restore(JOB_STATES)
        if stored is not None and isinstance(stored.data, dict):
            model.last_run_id = stored.data.get("last_run_id")
            model.error = stored.data.get("error")
        return model

    def save_job(self, tx: Transaction) -> Staged:
        """Stage the current state of the job in `tx` (awaitable, already done)."""
        self._stage(tx)
        return _STAGED

    def data(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline_id, "name": self.name, "schedule": self.schedule,
                "task": self.config.task if self.config else None,
                "last_run_id": self.last_run_id, "error": self.error}
