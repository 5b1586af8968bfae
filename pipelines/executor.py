"""Runs one pipeline: its jobs as a dependency graph, each job one task on the fabric.

The fabric is reached only through `run_task`, an async callable the master provides:

    await run_task(task_name, args: list, kwargs: dict, *, priority: int, timeout: float | None)

It returns the task's value, or raises (`JobFailed` or any other exception) when the task
failed. A call runs the task at most once: the job's `retries` are the only retries, so a job
runs at most `1 + retries` times in all (the fabric's runners submit each call with
`max_attempts=1`). A `JobFailed(permanent=True)` (another run cannot cure it) is not retried.
The executor also bounds each attempt by the job's timeout. Values must be JSON-serialisable:
they are stored in the run record so that an interrupted run can resume. Without a `run_task`,
jobs run on the fabric through `FabricRunTask()` (see `pipelines.fabric_runner`); `close()`
disconnects it.

What a job's task receives: the job's `args` and `kwargs`, plus
- `inputs`: {dependency name: its result}, only when the job has `depends_on`;
- `metadata`: the output of the pipeline's metadata task, only when the pipeline has one. The
  metadata task runs once per run, before any job, with no arguments, at the highest priority
  among the jobs; if it fails, the run fails and no job runs.

A job starts once all its dependencies completed; jobs whose dependencies are met run
concurrently. A job is attempted `1 + retries` times; once it has failed for good, its
dependents end Failed with the reason "dependency X failed" without running, jobs that do not
depend on it still run, and the run ends Failed.

Runs are recorded in the store as they go. `execute_pipeline(run_id=...)` continues a stored run
that was interrupted (the process died, or the pipeline was paused): jobs that completed keep
their results and are not run again, jobs that failed stay failed, and jobs that were running
start again from their first attempt. A paused pipeline starts no job: jobs already running finish and are recorded, and the
run waits as Paused until `resume()`.

Collectors (`add_collector(cb)`) get `cb(job_name, result)` for each completed job, once per
run in this process; when a run is continued in a new process they also get the results of the
jobs completed before, so delivery across a crash is at least once. An async collector is
awaited (at most a minute) before the job's dependents start; a collector that fails is logged
and does not fail the job.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Collection
from dataclasses import replace
from typing import Any

from pipelines.config import DEFAULT_TIMEOUT, INPUTS_KWARG, METADATA_KWARG, PipelineConfig
from pipelines.errors import JobFailed, PipelineBusy, PipelineError
from pipelines.events import (JOB_COMPLETED, JOB_FAILED, JOB_RETRYING, JOB_STARTED,
                              PIPELINE_COMPLETED, PIPELINE_FAILED, PIPELINE_PAUSED,
                              PIPELINE_RESUMED, PIPELINE_STARTED, EventSystem)
from pipelines.fabric_runner import FabricRunTask
from pipelines.models import JobModel, PipelineModel
from pipelines.states import COMPLETED, FAILED, PAUSED, PENDING, RUNNING, SCHEDULED
from pipelines.store import JobRun, RunRecord, VersionedStore

__all__ = ["PipelineExecutor", "RunTask", "Collector", "MANUAL"]

logger = logging.getLogger(__name__)

RunTask = Callable[..., Awaitable[Any]]
Collector = Callable[[str, Any], Any]
MANUAL = "manual"

_NO_METADATA: Any = object()
_CANCEL_GRACE = 5.0
_COLLECTOR_TIMEOUT = 60.0


class PipelineExecutor:
    """Executes the runs of one pipeline, one run at a time, and keeps its state in the store."""

    def __init__(
        self,
        pipeline_model: PipelineModel,
        event_system: EventSystem,
        *,
        run_task: RunTask | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pipeline = pipeline_model
        self.event_system = event_system
        self._owned_runner = FabricRunTask() if run_task is None else None
        self._run_task: RunTask = run_task if run_task is not None else self._owned_runner
        self._clock = clock
        self._collectors: list[Collector] = []
        self._collected: dict[str, set[str]] = {}
        self._run_id: str | None = None
        self._job_runs: dict[str, JobRun] = {}
        self._outside: dict[str, tuple[bool, Any]] = {}
        self.jobs: dict[str, JobModel] = {}
        self.init_jobs()

    @property
    def name(self) -> str:
        return self.pipeline.name

    @property
    def config(self) -> PipelineConfig:
        return self.pipeline.config

    @property
    def store(self) -> VersionedStore:
        return self.pipeline.store

    @property
    def running(self) -> bool:
        """Whether a run is in progress in this process."""
        return self._run_id is not None

    @property
    def current_run_id(self) -> str | None:
        return self._run_id

    def init_jobs(self) -> list[JobModel]:
        """(Re)load the job models of the pipeline's config, with their last stored state."""
        self.jobs = {job.name: JobModel.load(self.name, job, store=self.store)
                     for job in self.config.jobs}
        return list(self.jobs.values())

    def close(self) -> None:
        """Disconnect the fabric runner this executor opened itself, if any."""
        if self._owned_runner is not None:
            self._owned_runner.close()

    def add_collector(self, collector: Collector) -> None:
        """Call `collector(job_name, result)` (sync or async) for each completed job."""
        self._collectors.append(collector)

    # -- pause and resume -------------------------------------------------------------------

    def pause(self) -> None:
        """Stop starting jobs; running jobs finish and are recorded. No-op if already paused."""
        if self.pipeline.state == PAUSED:
            return
        self._set_pipeline_state(PAUSED)
        self._publish(PIPELINE_PAUSED, {"run_id": self._run_id})

    def resume(self) -> str | None:
        """Undo `pause`. Returns the id of a paused run to continue with
        `execute_pipeline(run_id=...)`, or None (no such run, or the active run just goes on)."""
        if self.pipeline.state != PAUSED:
            return None
        to_continue: str | None = None
        if self.running:
            self._set_pipeline_state(RUNNING)
        else:
            unfinished = self.store.unfinished_runs(self.name)
            if unfinished:
                to_continue = unfinished[0].run_id
                self._set_pipeline_state(RUNNING, run_id=to_continue)
            else:
                self._set_pipeline_state(SCHEDULED)
        self._publish(PIPELINE_RESUMED, {"run_id": self._run_id or to_continue})
        return to_continue

    def reconcile(self) -> None:
        """After a restart: a pipeline saved as Running whose runs all ended (the process died
        between ending the run and saving the pipeline) takes the outcome of its last run."""
        if self.running or self.pipeline.state != RUNNING:
            return
        if self.store.unfinished_runs(self.name):
            return
        last = self.store.runs(self.name, limit=1)
        if last:
            self._set_pipeline_state(last[0].state)

    # -- runs -------------------------------------------------------------------------------

    def create_run(self, *, jobs: Collection[str] | None = None,
                   trigger: str = MANUAL) -> RunRecord:
        """Record a new run of all jobs (or of `jobs`, in config order); start it with
        `execute_pipeline(run_id=record.run_id)`."""
        names = self.config.job_names
        if jobs is not None:
            unknown = sorted(set(jobs) - set(names))
            if unknown:
                raise PipelineError(f"pipeline {self.name!r} has no job {unknown[0]!r}")
            names = tuple(name for name in names if name in jobs)
            if not names:
                raise PipelineError(f"a run of pipeline {self.name!r} needs at least one job")
        return self.store.create_run(run_id=uuid.uuid4().hex, pipeline=self.name, jobs=names,
                                     trigger=trigger, started_at=self._clock())

    async def execute_pipeline(
        self,
        *,
        run_id: str | None = None,
        jobs: Collection[str] | None = None,
        trigger: str = MANUAL,
    ) -> RunRecord:
        """Run the pipeline (or only `jobs`), or continue the stored run `run_id`; returns the
        run as stored when it ended (Completed, Failed) or parked (Paused).

        Cancelling it leaves the run Running in the store, to be continued later.
        """
        if self._run_id is not None:
            raise PipelineBusy(f"pipeline {self.name!r} is already running run {self._run_id}")
        if run_id is None:
            record = self.create_run(jobs=jobs, trigger=trigger)
        else:
            if jobs is not None:
                raise PipelineError("give either run_id (to continue a run) or jobs, not both")
            record = self.store.get_run(run_id)
            if record.pipeline != self.name:
                raise PipelineError(f"run {run_id} belongs to pipeline {record.pipeline!r}, "
                                    f"not {self.name!r}")
            if record.finished:
                raise PipelineError(f"run {run_id} already ended {record.state}")
        self._run_id = record.run_id
        try:
            return await self._drive(record)
        finally:
            self._run_id = None
            self._job_runs = {}
            self._outside = {}

    async def run_job(self, job: JobModel, *, inputs: dict[str, Any] | None = None,
                      metadata: Any = _NO_METADATA) -> Any:
        """Run one job of the active run, with its retries and timeout; returns its result.

        Records every state change and publishes job events; raises `JobFailed` once the job
        has failed for good.
        """
        if self._run_id is None or job.name not in self._job_runs:
            raise PipelineError(f"job {job.name!r} is not part of an active run of "
                                f"{self.name!r}: use execute_pipeline")
        config = job.config
        assert config is not None  # executor jobs are built from the pipeline config
        kwargs = dict(config.kwargs)
        if config.depends_on:
            kwargs[INPUTS_KWARG] = dict(inputs or {})
        if metadata is not _NO_METADATA:
            kwargs[METADATA_KWARG] = metadata
        if job.state != PENDING:
            job.state_machine.set_state(PENDING)
        attempt = 0
        while True:
            attempt += 1
            job.state_machine.set_state(RUNNING)
            self._update_job(job.name, state=RUNNING, attempts=attempt, error=None,
                             started_at=self._clock(), finished_at=None)
            self._publish(JOB_STARTED, self._job_event(job, attempt=attempt))
            try:
                result = await self._call(config.task, list(config.args), kwargs,
                                          priority=config.priority, timeout=config.timeout)
                self._update_job(job.name, state=COMPLETED, result=result,
                                 finished_at=self._clock())
            except asyncio.CancelledError:
                raise
            except Exception as e:
                error = _describe(e, timeout=config.timeout)
                if attempt <= config.retries and not getattr(e, "permanent", False):
                    job.state_machine.set_state(PENDING)
                    self._update_job(job.name, state=PENDING, error=error)
                    self._publish(JOB_RETRYING, self._job_event(
                        job, attempt=attempt, retries_left=config.retries - attempt + 1,
                        error=error))
                    continue
                self._fail_job(job.name, error)
                raise JobFailed(f"job {job.name!r} failed after {attempt} attempt(s): {error}",
                                job=job.name) from e
            break
        job.state_machine.set_state(COMPLETED)
        job.last_run_id, job.error = self._run_id, None
        job.save()
        self._publish(JOB_COMPLETED, self._job_event(job, attempt=attempt, result=result))
        await self._collect(job.name, result)
        return result

    async def _drive(self, record: RunRecord) -> RunRecord:
        run_id = record.run_id
        resumed = record.has_metadata or any(
            job.state != PENDING or job.attempts for job in record.jobs.values())
        self._job_runs = dict(record.jobs)
        for name, job_run in record.jobs.items():
            if job_run.state in (COMPLETED, FAILED):
                continue
            if name not in self.jobs:
                self._fail_job(name, f"job {name!r} is no longer in the pipeline")
            elif job_run.state == RUNNING:  # interrupted: runs again from its first attempt
                self._update_job(name, state=PENDING, attempts=0, started_at=None)
        self._outside = {
            dependency: self.store.latest_job_result(self.name, dependency)
            for name in self._job_runs if name in self.jobs
            for dependency in self.jobs[name].config.depends_on  # type: ignore[union-attr]
            if dependency not in self._job_runs
        }
        if record.state != RUNNING:
            self.store.set_run_state(run_id, RUNNING)
        if self.pipeline.state != PAUSED:
            self._set_pipeline_state(RUNNING, run_id=run_id)
        self._publish(PIPELINE_STARTED, {"run_id": run_id, "trigger": record.trigger,
                                         "jobs": list(self._job_runs), "resumed": resumed})
        for name, job_run in record.jobs.items():
            if job_run.state == COMPLETED:
                await self._collect(name, job_run.result)

        metadata = _NO_METADATA
        if self.config.metadata is not None:
            if record.has_metadata:
                metadata = record.metadata
            elif self.pipeline.state != PAUSED:
                try:
                    metadata = await self._call(
                        self.config.metadata, [], {},
                        priority=max(job.priority for job in self.config.jobs),
                        timeout=DEFAULT_TIMEOUT)
                    self.store.set_run_metadata(run_id, metadata)
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    error = (f"metadata task {self.config.metadata!r} failed: "
                             f"{_describe(e, timeout=DEFAULT_TIMEOUT)}")
                    for name, job_run in list(self._job_runs.items()):
                        if job_run.state == PENDING:
                            self._fail_job(name, error)
                    return self._finish_run(run_id, error=error)

        in_flight: dict[asyncio.Task[Any], str] = {}
        try:
            while True:
                self._fail_blocked(set(in_flight.values()))
                if self.pipeline.state != PAUSED:
                    for name in self._ready(set(in_flight.values())):
                        task = asyncio.create_task(self.run_job(
                            self.jobs[name], inputs=self._inputs(name), metadata=metadata))
                        in_flight[task] = name
                if not in_flight:
                    break
                done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    name = in_flight.pop(task)
                    error = task.exception()
                    if error is not None and not isinstance(error, JobFailed):
                        logger.error("job %r of pipeline %r broke", name, self.name,
                                     exc_info=error)
                        self._fail_job(name, _describe(error, timeout=None))
        except BaseException:  # cancelled, or the store failed: the run stays resumable
            for task in in_flight:
                task.cancel()
            if in_flight:
                await asyncio.wait(in_flight, timeout=_CANCEL_GRACE)
            raise
        return self._finish_run(run_id)

    def _ready(self, in_flight: set[str]) -> list[str]:
        ready = []
        for name, job_run in self._job_runs.items():
            if job_run.state != PENDING or name in in_flight:
                continue
            dependencies = self.jobs[name].config.depends_on  # type: ignore[union-attr]
            if all(self._job_runs[d].state == COMPLETED if d in self._job_runs
                   else self._outside[d][0] for d in dependencies):
                ready.append(name)
        return ready

    def _fail_blocked(self, in_flight: set[str]) -> None:
        """Fail pending jobs that can never run, until none is left (failures cascade)."""
        changed = True
        while changed:
            changed = False
            for name, job_run in list(self._job_runs.items()):
                if job_run.state != PENDING or name in in_flight:
                    continue
                for dependency in self.jobs[name].config.depends_on:  # type: ignore[union-attr]
                    if dependency in self._job_runs:
                        reason = (f"dependency {dependency!r} failed"
                                  if self._job_runs[dependency].state == FAILED else None)
                    elif not self._outside[dependency][0]:
                        reason = (f"dependency {dependency!r} has no result yet (it is not "
                                  f"part of this run and has never completed)")
                    else:
                        reason = None
                    if reason is not None:
                        self._fail_job(name, reason)
                        changed = True
                        break

    def _inputs(self, name: str) -> dict[str, Any]:
        return {
            dependency: (self._job_runs[dependency].result if dependency in self._job_runs
                         else self._outside[dependency][1])
            for dependency in self.jobs[name].config.depends_on  # type: ignore[union-attr]
        }

    def _finish_run(self, run_id: str, *, error: str | None = None) -> RunRecord:
        states = [job.state for job in self._job_runs.values()]
        if PENDING in states:
            state = PAUSED
        elif FAILED in states or error is not None:
            state = FAILED
            if error is None:
                name, job = next((n, j) for n, j in self._job_runs.items() if j.state == FAILED)
                error = f"job {name!r} failed: {job.error}"
        else:
            state = COMPLETED
        finished_at = None if state == PAUSED else self._clock()
        self.store.set_run_state(run_id, state, finished_at=finished_at, error=error)
        if state != PAUSED:
            self._collected.pop(run_id, None)
            if self.pipeline.state != PAUSED:
                self._set_pipeline_state(state)
            done = sum(1 for s in states if s == COMPLETED)
            self._publish(PIPELINE_COMPLETED if state == COMPLETED else PIPELINE_FAILED,
                          {"run_id": run_id, "state": state, "error": error,
                           "jobs_done": done, "jobs_total": len(states)})
        return self.store.get_run(run_id)

    # -- helpers ----------------------------------------------------------------------------

    async def _call(self, task: str, args: list[Any], kwargs: dict[str, Any], *,
                    priority: int, timeout: float) -> Any:
        return await asyncio.wait_for(
            self._run_task(task, args, kwargs, priority=priority, timeout=timeout), timeout)

    def _update_job(self, name: str, **changes: Any) -> None:
        """Store the change first, so memory never claims what the store does not hold."""
        assert self._run_id is not None
        updated = replace(self._job_runs[name], **changes)
        self.store.save_run_job(self._run_id, updated)
        self._job_runs[name] = updated

    def _fail_job(self, name: str, error: str) -> None:
        previous = self._job_runs[name]
        self._update_job(name, state=FAILED, error=error, finished_at=self._clock())
        job = self.jobs.get(name)
        if job is not None:
            if not job.state_machine.can_transition(FAILED):  # still shows an earlier run
                job.state_machine.set_state(PENDING)
            job.state_machine.set_state(FAILED)
            job.last_run_id, job.error = self._run_id, error
            job.save()
        self._publish(JOB_FAILED, {"run_id": self._run_id, "job": name,
                                   "task": job.config.task if job and job.config else None,
                                   "attempts": previous.attempts, "error": error})

    async def _collect(self, name: str, result: Any) -> None:
        assert self._run_id is not None
        delivered = self._collected.setdefault(self._run_id, set())
        if name in delivered:
            return
        delivered.add(name)
        for collector in list(self._collectors):
            try:
                outcome = collector(name, result)
                if inspect.isawaitable(outcome):
                    await asyncio.wait_for(outcome, _COLLECTOR_TIMEOUT)
            except Exception:
                logger.exception("collector %r failed on job %r of pipeline %r",
                                 collector, name, self.name)

    def _set_pipeline_state(self, state: str, *, run_id: str | None = None) -> None:
        """Move the pipeline model to `state` and save a version, if anything changed."""
        model = self.pipeline
        changed = model.version == 0
        if run_id is not None and run_id != model.last_run_id:
            model.last_run_id = run_id
            changed = True
        if state != model.state:
            model.state_machine.set_state(state)
            changed = True
        if changed:
            model.save()

    def _job_event(self, job: JobModel, **extra: Any) -> dict[str, Any]:
        return {"run_id": self._run_id, "job": job.name,
                "task": job.config.task if job.config else None, **extra}

    def _publish(self, event_name: str, data: dict[str, Any]) -> None:
        self.event_system.publish(event_name, {"pipeline": self.name, **data,
                                               "at": self._clock()})


def _describe(error: BaseException, *, timeout: float | None) -> str:
    if isinstance(error, asyncio.TimeoutError) and timeout is not None:
        return f"timed out after {timeout:g}s"
    if isinstance(error, JobFailed):
        return str(error) or "JobFailed"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
