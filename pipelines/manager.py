"""Runs many pipelines: interval schedules, manual runs, pause and resume, recovery on restart.

Schedules are pure: `due(now)` says what should fire at `now`, `tick(now)` starts it, and only
`run_forever` reads the real clock. A pipeline's `schedule` runs all its jobs; a job's own
`schedule` runs that job alone (its dependencies' latest results are its inputs). Fire times sit
on a grid of the interval, anchored at the latest scheduled run in the store (or at start-up if
there is none): a restart does not push the next run back, and fires missed while the master
was down happen once, not as a burst. A fire that finds the pipeline still running is skipped.

Pausing stops the schedules of the pipeline and lets a running run finish only the jobs it had
started; the run waits as Paused. Resuming continues that run at once, and the schedules fire
next one full interval after the resume. A paused pipeline stays paused across restarts; a run
interrupted by a crash is continued by `recover()` (which `run_forever` calls first).

Methods that start runs (`run`, `tick`, `schedule_pipelines`, `resume`, `recover`,
`startup_event`) must be called from the running event loop; runs go on as tasks, and
`wait_run` waits for one.

Built as `PipelineManager(pipeline_configs, event_system)`, with configs given as data (see
`parse_pipeline_data`), the manager keeps its state in `default_store()` and runs its jobs on
the fabric through `FabricRunTask()`; `close()` disconnects that runner.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Collection, Generator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from core.errors import FabricTimeout

from pipelines.config import PipelineConfig, load_pipelines, parse_pipeline_data
from pipelines.errors import PipelineBusy, PipelineConfigError, PipelineError, UnknownPipeline
from pipelines.events import EventSystem
from pipelines.executor import MANUAL, PipelineExecutor, RunTask
from pipelines.fabric_runner import FabricRunTask
from pipelines.models import PipelineModel
from pipelines.schedule import next_run
from pipelines.state_topic import pipeline_state_payload
from pipelines.states import COMPLETED, FAILED, PAUSED, RUNNING
from pipelines.store import RunRecord, VersionedStore, default_store
from pipelines.timestrings import parse_time_string

__all__ = ["PipelineManager", "Due", "IntervalSchedule", "SCHEDULED_TRIGGER", "StateListener"]

logger = logging.getLogger(__name__)

SCHEDULED_TRIGGER = "schedule"
StateListener = Callable[[str, dict[str, Any]], Any]
_CLOSE_TIMEOUT = 10.0


@dataclass(frozen=True)
class Due:
    """Something a schedule fires: a whole pipeline (`job` None) or one job of it alone."""

    pipeline: str
    job: str | None = None

    @property
    def trigger(self) -> str:
        """The trigger recorded on the runs this schedule starts."""
        return SCHEDULED_TRIGGER if self.job is None else f"{SCHEDULED_TRIGGER}:{self.job}"


class IntervalSchedule:
    """What `schedule_pipelines_with_interval` returns: the interval is set already; awaiting
    this runs the manager (`run_forever`) until `stop_event` is set or the await is cancelled."""

    def __init__(self, manager: PipelineManager, interval: float,
                 stop_event: asyncio.Event | None, poll_interval: float) -> None:
        self.manager = manager
        self.interval = interval
        self.stop_event = stop_event
        self.poll_interval = poll_interval

    def __await__(self) -> Generator[Any, None, None]:
        return self._run().__await__()

    async def _run(self) -> None:
        stop_event = self.stop_event if self.stop_event is not None else asyncio.Event()
        await self.manager.run_forever(stop_event, poll_interval=self.poll_interval)


class PipelineManager:
    """Owns one executor per pipeline and decides when each runs."""

    def __init__(
        self,
        pipeline_configs: Iterable[PipelineConfig | Mapping[str, Any]],
        event_system: EventSystem,
        *,
        run_task: RunTask | None = None,
        store: VersionedStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pipeline_configs = [_config(config) for config in pipeline_configs]
        names = [config.name for config in self.pipeline_configs]
        for name in names:
            if names.count(name) > 1:
                raise PipelineConfigError(f"two pipelines are called {name!r}", pipeline=name)
        self.event_system = event_system
        self.store = store if store is not None else default_store()
        self._owned_runner = FabricRunTask() if run_task is None else None
        self._run_task: RunTask = run_task if run_task is not None else self._owned_runner
        self._clock = clock
        self.executors: dict[str, PipelineExecutor] = {}
        self._intervals: dict[Due, float] = {}
        self._next: dict[Due, float] = {}
        self._active: dict[str, asyncio.Task[RunRecord]] = {}
        self._tasks_by_run: dict[str, asyncio.Task[RunRecord]] = {}
        self._state_listeners: list[StateListener] = []
        self.create_executors()
        event_system.add_listener(self._on_event)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        event_system: EventSystem,
        *,
        run_task: RunTask | None = None,
        store: VersionedStore | None = None,
        known_tasks: Collection[str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> PipelineManager:
        """A manager of the pipelines defined in a TOML file (see `pipelines.config`)."""
        return cls(load_pipelines(path, known_tasks=known_tasks), event_system,
                   run_task=run_task, store=store, clock=clock)

    def create_executors(self) -> list[PipelineExecutor]:
        """An executor per configured pipeline (with its stored state) and their schedules."""
        now = self._clock()
        for config in self.pipeline_configs:
            if config.name not in self.executors:
                self._add_executor(config, now)
        return list(self.executors.values())

    def add_pipeline(self, config: PipelineConfig | Mapping[str, Any]) -> PipelineExecutor:
        """Manage one more pipeline, or take a new definition of one that is not running.

        The same definition again changes nothing; a new one replaces the old (its stored
        state and history stay) unless a run of it is going (`PipelineBusy`).
        """
        config = _config(config)
        existing = self.executors.get(config.name)
        if existing is not None:
            if existing.config == config:
                return existing
            if self._busy(config.name):
                raise PipelineBusy(f"pipeline {config.name!r} is running run "
                                   f"{existing.current_run_id}: its definition cannot change "
                                   f"until the run ends")
            for due in [due for due in self._next if due.pipeline == config.name]:
                del self._next[due]
                del self._intervals[due]
            self.pipeline_configs = [config if c.name == config.name else c
                                     for c in self.pipeline_configs]
        else:
            self.pipeline_configs.append(config)
        return self._add_executor(config, self._clock())

    def _add_executor(self, config: PipelineConfig, now: float) -> PipelineExecutor:
        model = PipelineModel.load(config, store=self.store)
        executor = self.executors[config.name] = PipelineExecutor(
            model, self.event_system, run_task=self._run_task, clock=self._clock)
        if config.interval is not None:
            self._arm(Due(config.name), config.interval, now)
        for job in config.jobs:
            if job.interval is not None:
                self._arm(Due(config.name, job.name), job.interval, now)
        return executor

    def executor(self, name: str) -> PipelineExecutor:
        """The executor of pipeline `name`; `UnknownPipeline` if there is none."""
        try:
            return self.executors[name]
        except KeyError:
            raise UnknownPipeline(f"no pipeline called {name!r} (pipelines: "
                                  f"{', '.join(self.executors) or 'none'})") from None

    # -- schedules --------------------------------------------------------------------------

    def schedule_pipelines(self) -> list[str]:
        """Run every pipeline that is neither paused nor running once now; returns run ids.

        Pipeline schedules then fire one interval from now.
        """
        self._loop()
        now = self._clock()
        started = []
        for name, executor in self.executors.items():
            if executor.pipeline.state == PAUSED or self._busy(name):
                continue
            due = Due(name)
            if due in self._intervals:
                self._next[due] = now + self._intervals[due]
            started.append(self._start(name, trigger=due.trigger))
        return started

    async def startup_event(self, *, timeout: float | None = None) -> list[RunRecord]:
        """At start-up: continue interrupted runs, run every pipeline that is neither paused
        nor running once, and wait for all of these runs; returns them as stored, in order.

        Each run ends by itself (every job attempt is bounded by its timeout); `timeout`
        bounds the wait further (`FabricTimeout`, the runs go on).
        """
        started = self.recover() + self.schedule_pipelines()
        deadline = None if timeout is None else time.monotonic() + timeout
        records = []
        for run_id in started:
            task = self._tasks_by_run.get(run_id)
            if task is not None:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                await asyncio.wait({task}, timeout=left)
                if not task.done():
                    raise FabricTimeout(f"run {run_id} still running after {timeout:g}s")
            records.append(self.store.get_run(run_id))
        return records

    def schedule_pipelines_with_interval(
        self, interval_str: str, *, stop_event: asyncio.Event | None = None,
        poll_interval: float = 1.0,
    ) -> IntervalSchedule:
        """Run every pipeline at this interval (a time string), first one interval from now.

        This replaces the pipelines' own schedules; job schedules are kept. The interval is
        set when this returns; awaiting the result runs the schedules (`run_forever`) until
        `stop_event` is set or the await is cancelled.
        """
        interval = parse_time_string(interval_str)
        now = self._clock()
        for name in self.executors:
            due = Due(name)
            self._intervals[due] = interval
            self._next[due] = now + interval
        return IntervalSchedule(self, interval, stop_event, poll_interval)

    def due(self, now: float) -> list[Due]:
        """What is due at `now`: whole pipelines first, then jobs alone; paused ones never."""
        ready = [due for due, at in self._next.items()
                 if at <= now and self.executors[due.pipeline].pipeline.state != PAUSED]
        return sorted(ready, key=lambda due: (due.job is not None, self._next[due]))

    def tick(self, now: float | None = None) -> list[str]:
        """Start what is due at `now` (default: the clock) and move each schedule on; returns
        the ids of the runs started. A pipeline still running skips the fire."""
        self._loop()
        now = self._clock() if now is None else now
        started = []
        for due in self.due(now):
            self._next[due] = next_run(self._next[due], self._intervals[due], now=now)
            if self._busy(due.pipeline):
                logger.info("pipeline %r is still running: skipping the fire of %s",
                            due.pipeline, due.trigger)
                continue
            jobs = None if due.job is None else [due.job]
            started.append(self._start(due.pipeline, jobs=jobs, trigger=due.trigger))
        return started

    def next_run_at(self, name: str) -> float | None:
        """When the pipeline's schedules fire next; None if it is paused or unscheduled."""
        if self.executor(name).pipeline.state == PAUSED:
            return None
        times = [at for due, at in self._next.items() if due.pipeline == name]
        return min(times) if times else None

    async def run_forever(self, stop_event: asyncio.Event, *,
                          poll_interval: float = 1.0) -> None:
        """Recover interrupted runs, then tick with the real clock until `stop_event` is set.

        On the way out, runs still going are cancelled (bounded); they stay resumable.
        """
        self.recover()
        try:
            while not stop_event.is_set():
                self.tick(self._clock())
                try:
                    await asyncio.wait_for(stop_event.wait(), timeout=poll_interval)
                except asyncio.TimeoutError:
                    pass
        finally:
            await self.close()

    # -- control ----------------------------------------------------------------------------

    def run(self, name: str, *, jobs: Collection[str] | None = None) -> str:
        """Start a manual run of the pipeline (or of some of its jobs); returns the run id."""
        executor = self.executor(name)
        self._loop()
        if executor.pipeline.state == PAUSED:
            raise PipelineBusy(f"pipeline {name!r} is paused: resume it first")
        if self._busy(name):
            raise PipelineBusy(f"pipeline {name!r} is already running run "
                               f"{executor.current_run_id}")
        return self._start(name, jobs=jobs, trigger=MANUAL)

    def pause(self, name: str) -> None:
        """Stop the pipeline's schedules and its running run, if any, after the jobs under way."""
        self.executor(name).pause()

    def resume(self, name: str) -> str | None:
        """Undo `pause`: a paused run continues (its id is returned), and schedules fire next
        one interval from now. Returns None when no run needed continuing."""
        executor = self.executor(name)
        self._loop()
        if executor.pipeline.state != PAUSED:
            return None
        run_id = executor.resume()
        now = self._clock()
        for due in self._next:
            if due.pipeline == name:
                self._next[due] = now + self._intervals[due]
        if run_id is not None:
            self._start(name, run_id=run_id)
        return run_id

    def recover(self) -> list[str]:
        """Continue the runs that a previous process left unfinished; returns their ids.

        A paused pipeline's run is not continued (it waits for `resume`).
        """
        self._loop()
        continued = []
        for name, executor in self.executors.items():
            if self._busy(name):
                continue
            unfinished = self.store.unfinished_runs(name)
            if not unfinished:
                executor.reconcile()
                continue
            newest, *older = unfinished
            for run in older:
                self.store.set_run_state(run.run_id, FAILED, finished_at=self._clock(),
                                         error=f"abandoned for the newer run {newest.run_id}")
            if executor.pipeline.state == PAUSED:
                if newest.state == RUNNING:
                    self.store.set_run_state(newest.run_id, PAUSED)
                continue
            logger.info("continuing run %s of pipeline %r", newest.run_id, name)
            continued.append(self._start(name, run_id=newest.run_id))
        return continued

    async def wait_run(self, run_id: str, *, timeout: float) -> RunRecord:
        """The run as stored once its task ended (or at once, if it is not running here).

        Raises `FabricTimeout` if it is still running after `timeout` seconds.
        """
        task = self._tasks_by_run.get(run_id)
        if task is not None:
            await asyncio.wait({task}, timeout=timeout)
            if not task.done():
                raise FabricTimeout(f"run {run_id} still running after {timeout:g}s")
        return self.store.get_run(run_id)

    async def wait_idle(self, *, timeout: float) -> None:
        """Wait until no run is going; `FabricTimeout` after `timeout` seconds."""
        tasks = [task for task in self._active.values() if not task.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            if pending:
                raise FabricTimeout(f"{len(pending)} pipeline run(s) still going after "
                                    f"{timeout:g}s")

    async def close(self, *, timeout: float = _CLOSE_TIMEOUT) -> None:
        """Cancel the runs still going and wait for them (bounded); the store keeps them
        resumable. A fabric runner the manager opened itself is disconnected."""
        tasks = [task for task in self._active.values() if not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        if self._owned_runner is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._owned_runner.close)

    # -- inspection -------------------------------------------------------------------------

    def history(self, name: str, *, limit: int | None = None) -> list[RunRecord]:
        """The pipeline's runs, newest first, with every job's state, result and error."""
        self.executor(name)
        return self.store.runs(name, limit=limit)

    def list(self) -> list[dict[str, Any]]:
        """The state payload of every pipeline, in config order."""
        return [self.state_payload(name) for name in self.executors]

    def state_payload(self, name: str) -> dict[str, Any]:
        """The flat JSON state of the pipeline, as published on its retained state topic."""
        executor = self.executor(name)
        current = self.store.runs(name, limit=1, states=(RUNNING, PAUSED))
        last = self.store.runs(name, limit=1, states=(COMPLETED, FAILED))
        return pipeline_state_payload(
            name=name, state=executor.pipeline.state,
            current=current[0] if current else None, last=last[0] if last else None,
            next_run_at=self.next_run_at(name), jobs_total=len(executor.config.jobs))

    def add_state_listener(self, listener: StateListener) -> None:
        """Call `listener(pipeline_name, state_payload)` after every event of a pipeline."""
        self._state_listeners.append(listener)

    # -- internals --------------------------------------------------------------------------

    def _arm(self, due: Due, interval: float, now: float) -> None:
        latest = self.store.runs(due.pipeline, limit=1, trigger=due.trigger)
        anchor = latest[0].started_at if latest else now
        self._intervals[due] = interval
        self._next[due] = next_run(anchor, interval)

    def _busy(self, name: str) -> bool:
        task = self._active.get(name)
        return task is not None and not task.done()

    def _start(self, name: str, *, jobs: Collection[str] | None = None, trigger: str = MANUAL,
               run_id: str | None = None) -> str:
        loop = self._loop()
        executor = self.executor(name)
        if run_id is None:
            run_id = executor.create_run(jobs=jobs, trigger=trigger).run_id
        task = loop.create_task(executor.execute_pipeline(run_id=run_id),
                                name=f"pipeline {name} run {run_id}")
        self._active[name] = task
        self._tasks_by_run[run_id] = task
        task.add_done_callback(lambda done: self._finished(run_id, done))
        return run_id

    def _finished(self, run_id: str, task: asyncio.Task[RunRecord]) -> None:
        self._tasks_by_run.pop(run_id, None)
        if not task.cancelled() and task.exception() is not None:
            logger.error("run %s stopped by an error; it stays resumable", run_id,
                         exc_info=task.exception())

    @staticmethod
    def _loop() -> asyncio.AbstractEventLoop:
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            raise PipelineError("pipeline runs start only from a running event loop") from None

    def _on_event(self, event_name: str, data: Any) -> None:
        if not self._state_listeners or not isinstance(data, dict):
            return
        name = data.get("pipeline")
        if name not in self.executors:
            return
        payload = self.state_payload(name)
        for listener in list(self._state_listeners):
            try:
                listener(name, payload)
            except Exception:
                logger.exception("state listener %r failed on pipeline %r", listener, name)


def _config(config: PipelineConfig | Mapping[str, Any]) -> PipelineConfig:
    return config if isinstance(config, PipelineConfig) else parse_pipeline_data(config)
