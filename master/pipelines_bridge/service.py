"""Pipelines inside the master: a `PipelineManager` on a thread and event loop of its own.

Each job runs as one fabric task submitted to the master; every pipeline and job event goes out
as flat JSON on `<root>/events/<event>`, and each pipeline's state is kept retained on
`<root>/pipelines/<name>/state`. Clients drive pipelines with the `pipelines` query
(`FabricClient.query("pipelines", {"op": ..., "name": ...})`, used by `master-node pipelines`).

The pipelines come from the file of `serve --pipelines` and from `dispatch_pipeline(data)`
(in the master's process on this service, or from any program with
`FabricClient.dispatch_pipeline`, the `dispatch` operation of the query): a pipeline given as
data runs once, now (see `master.pipelines_bridge.dispatch`). Its definition is kept in the store, so after a restart
it is still listed, its history kept and an interrupted run of it continued.

One budget for retries. Each attempt of a job is one task submitted with `max_attempts=1`: the
job's `retries` are its only retries, so a job with `retries = r` runs at most r + 1 times in
all, whatever the master's `--max-attempts`; errors another run cannot cure are not retried.

Threads. The manager, its store (`<state>/pipelines.sqlite3`, a file of its own) and its events
live on the `pipelines` thread. Query handlers run on the master's loop thread while it holds
the master's lock, so they must never wait for anything that needs that lock. Hence the
pipelines loop never takes it: `MasterNodeTransport.submit` (and the journal look-up below) run
on a small pool of threads, and the loop only awaits their futures. A query therefore waits (at
most `answer_timeout`) only for a loop that is always free to answer; `list` is answered from a
cache of the state payloads without waiting at all.

Exactly once across a master crash. A job's task id is derived from its run, job, attempt and a
digest of what it computes (`<run_id>:job:<job>:<attempt>:<digest>`; `<run_id>:metadata:
<digest>` for the metadata task), so when a run is
continued after kill -9 the job that was in flight is not submitted again: the master restored
that task from its journal, the submission of the same id joins it, and a task that had already
finished is answered from the journal. The executor publishes `job_started` from the job's own
asyncio task just before it calls `run_task`; the listener notes the job in a context variable
that `run_task` reads. A call that cannot be matched this way gets a fresh id.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import ConfigError, FabricError, FabricTimeout
from core import states
from core.protocol import TaskOutcome
from master.handles import TaskHandle
from master.pipelines_bridge.dispatch import node_task_names, parse_dispatched
from master.pipelines_bridge.flat import flat_json_bytes
from master.pipelines_bridge.pipeline_file import PipelineFile
from master.pipelines_bridge.views import run_view
from pipelines import (DEFAULT_TIMEOUT, JOB_FAILED, JOB_STARTED, PIPELINE_COMPLETED,
                       PIPELINE_FAILED, PIPELINE_STARTED, EventSystem, PipelineConfig,
                       PipelineConfigError, PipelineError, PipelineManager, UnknownPipeline,
                       VersionedStore, parse_pipeline_data)
from pipelines.fabric_runner import ONE_RUN, task_failure

if TYPE_CHECKING:
    from master.transport import MasterNodeTransport

__all__ = ["PipelineService", "serve_pipelines", "QUERY", "OPERATIONS", "STORE_FILE"]

log = logging.getLogger(__name__)

QUERY = "pipelines"
OPERATIONS = ("list", "run", "pause", "resume", "history", "dispatch")
STORE_FILE = "pipelines.sqlite3"
_DISPATCHED = "dispatched:"  # store key prefix of the definitions of dispatched pipelines
_MAX_TASK_ID = 128
_MAX_HISTORY = 1000

# (task name, task id) of the job whose asyncio task is about to call run_task
_NEXT_TASK: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "pipeline_next_task", default=None)


class PipelineService:
    """Runs the pipelines of a file, and those dispatched as data, inside a master; see the
    module docstring."""

    def __init__(self, *, master: MasterNodeTransport, pipelines: PipelineFile | None,
                 store_path: str | Path, poll_interval: float = 1.0,
                 answer_timeout: float = 5.0, submit_threads: int = 2,
                 clock: Callable[[], float] = time.time) -> None:
        if poll_interval <= 0 or answer_timeout <= 0:
            raise ConfigError("poll_interval and answer_timeout must be positive")
        self.master = master
        self.pipelines = pipelines
        self.store_path = Path(store_path)
        self.poll_interval = poll_interval
        self.answer_timeout = answer_timeout
        self._clock = clock
        self._topics = master.topics
        self._file_configs: tuple[PipelineConfig, ...] = pipelines.configs if pipelines else ()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=submit_threads, thread_name_prefix="pipelines-submit")
        self._lock = threading.Lock()
        self._states: dict[str, dict[str, Any]] = {}
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._manager: PipelineManager | None = None
        self._running = False

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, *, timeout: float = 10.0) -> PipelineService:
        """Open the store, continue interrupted runs, publish every state; then schedule."""
        self.store_path.parent.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._thread_main, name="pipelines", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise FabricTimeout(f"pipelines did not start within {timeout:g}s")
        error = self._startup_error
        if error is not None:
            if isinstance(error, FabricError):
                raise error
            raise PipelineError(f"pipelines could not start: {type(error).__name__}: "
                                f"{error}") from error
        return self

    def stop(self, *, timeout: float = 15.0) -> None:
        """Stop scheduling; runs still going stay resumable for the next start (bounded)."""
        self._running = False
        loop, stop_event = self._loop, self._stop_event
        if loop is not None and stop_event is not None:
            try:
                loop.call_soon_threadsafe(stop_event.set)
            except RuntimeError:  # the loop already ended
                pass
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("pipelines thread still running after %gs", timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def running(self) -> bool:
        return self._running

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # reported by start(), or logged once running
            if self._ready.is_set():
                log.exception("pipelines stopped by an error")
            else:
                self._startup_error = e
        finally:
            self._running = False
            self._ready.set()

    async def _main(self) -> None:
        self._stop_event = asyncio.Event()
        store = VersionedStore(self.store_path, clock=self._clock)
        try:
            events = EventSystem()
            events.add_listener(self._on_event)
            configs = list(self._file_configs) + self._restore_dispatched(store)
            manager = PipelineManager(configs, events, run_task=self.run_task,
                                      store=store, clock=self._clock)
            manager.add_state_listener(self._on_state)
            continued = manager.recover()
            for name in manager.executors:
                self._on_state(name, manager.state_payload(name))
            self._manager = manager
            self._loop = asyncio.get_running_loop()
            self._running = True
            self._ready.set()
            log.info("pipelines %s running (store %s%s)",
                     f"{', '.join(self.pipelines.names)} from {self.pipelines.path}"
                     if self.pipelines else "(none from a file)", self.store_path,
                     f"; continuing {len(continued)} interrupted run(s)" if continued else "")
            await manager.run_forever(self._stop_event, poll_interval=self.poll_interval)
        finally:
            self._running = False
            self._manager = None
            store.close()

    def _restore_dispatched(self, store: VersionedStore) -> list[PipelineConfig]:
        """The dispatched pipelines kept in the store, unless the file now defines the name."""
        in_file = {config.name for config in self._file_configs}
        restored = []
        for key in store.keys(_DISPATCHED):
            version = store.read(key)
            name = key[len(_DISPATCHED):]
            if version is None or name in in_file:
                continue
            try:
                restored.append(parse_pipeline_data(version.data, name=name,
                                                    source=f"stored {key}"))
            except PipelineError as e:
                log.error("dispatched pipeline %r cannot be restored: %s", name, e)
        return restored

    # -- dispatched pipelines --------------------------------------------------------------------

    def dispatch_pipeline(self, pipeline_data: Mapping[str, Any]) -> str:
        """Run a pipeline given as data once, now; returns its run id (any thread).

        Validated like the pipelines file (see `master.pipelines_bridge.dispatch`), with the
        tasks the master's nodes offer counted as known. The same name again runs the pipeline
        again, with the new definition if it changed (refused while a run of it is going, and
        for a pipeline of the file unless the definition is the file's own).
        """
        if threading.current_thread() is self._thread:  # it would wait for itself
            raise PipelineError("dispatch_pipeline is for callers outside the pipelines loop")
        config = parse_dispatched(pipeline_data,
                                  node_tasks=node_task_names(self.master.get_node_info()))
        if not self._running:
            raise PipelineError("the master's pipelines are not running (starting or stopping)")
        return self._on_loop(self._dispatch(config), "dispatch")

    async def _dispatch(self, config: PipelineConfig) -> str:
        manager = self._manager
        if manager is None:
            raise PipelineError("the master's pipelines are stopping")
        in_file = next((c for c in self._file_configs if c.name == config.name), None)
        if in_file is not None and in_file != config:
            raise PipelineConfigError(
                f"pipeline {config.name!r} is defined by the master's pipelines file with other "
                f"jobs: give the dispatched pipeline another name", pipeline=config.name,
                field="name")
        manager.add_pipeline(config)
        stored = manager.store.read(_DISPATCHED + config.name)
        if in_file is None and (stored is None or stored.data != config.to_dict()):
            tx = manager.store.begin()
            tx.write(_DISPATCHED + config.name, None, config.to_dict())
            manager.store.commit(tx)
        run_id = manager.run(config.name)
        self._on_state(config.name, manager.state_payload(config.name))
        log.info("dispatched pipeline %s: run %s", config.name, run_id)
        return run_id

    # -- running jobs on the fabric --------------------------------------------------------------

    async def run_task(self, task_name: str, args: list[Any], kwargs: dict[str, Any], *,
                       priority: int, timeout: float | None = None) -> Any:
        """The manager's `run_task`: submit to the master for one run (`max_attempts=1`: the
        job's retries are the executor's), await the outcome (bounded by the job's timeout).
        A task given up on this way stays with the master (it may still run to its end);
        the next attempt is a task of its own. A task cancelled (`master-node cancel ID`)
        fails its job at once, with no retry spent: the job ends Failed, saying cancelled."""
        noted = _NEXT_TASK.get()
        task_id = (_task_id(f"{noted[1]}:{_digest(task_name, args, kwargs)}")
                   if noted is not None and noted[0] == task_name else None)
        loop = asyncio.get_running_loop()
        submitted = await loop.run_in_executor(self._pool, self._submit, task_name, list(args),
                                               dict(kwargs), priority, task_id)
        if isinstance(submitted, TaskHandle):
            outcome = await asyncio.wait_for(asyncio.wrap_future(submitted.future),
                                             timeout or DEFAULT_TIMEOUT)
        else:
            outcome = submitted
        if outcome.state != states.COMPLETED:
            failure = task_failure(outcome)
            if outcome.state == states.CANCELLED:  # someone stopped it: retrying would undo that
                failure.permanent = True
            raise failure
        return outcome.value

    def _submit(self, name: str, args: list[Any], kwargs: dict[str, Any], priority: int,
                task_id: str | None) -> TaskHandle | TaskOutcome:
        """On a pool thread (it takes the master's lock): the recorded outcome, or a handle."""
        if task_id is not None:
            known = self.master.outcomes([task_id]).get(task_id)
            if known is not None and known.state in states.FINAL_STATES:  # the job's attempt ended
                log.info("task %s finished before the restart: using its recorded outcome",
                         task_id)
                return known
        return self.master.submit(name, args, kwargs, priority=priority, task_id=task_id,
                                  max_attempts=ONE_RUN)

    # -- events and states -----------------------------------------------------------------------

    def _on_event(self, event_name: str, data: Any) -> None:
        if not isinstance(data, dict):
            return
        self._note_next_task(event_name, data)
        self._publish(self._topics.event(event_name),
                      flat_json_bytes({"event": event_name, **data}), retain=False)
        if event_name in (PIPELINE_STARTED, PIPELINE_COMPLETED, PIPELINE_FAILED, JOB_FAILED):
            detail = data.get("error") or data.get("job") or ""
            log.info("pipeline %s run %s: %s %s", data.get("pipeline"), data.get("run_id"),
                     event_name, detail)

    def _note_next_task(self, event_name: str, data: dict[str, Any]) -> None:
        run_id = data.get("run_id")
        if not isinstance(run_id, str):
            return
        if event_name == JOB_STARTED:
            task, job, attempt = data.get("task"), data.get("job"), data.get("attempt")
            if isinstance(task, str) and isinstance(job, str) and isinstance(attempt, int):
                _NEXT_TASK.set((task, f"{run_id}:job:{job}:{attempt}"))
        elif event_name == PIPELINE_STARTED:
            manager = self._manager
            executor = manager.executors.get(data.get("pipeline")) if manager else None
            metadata_task = executor.config.metadata if executor is not None else None
            if metadata_task is not None:
                _NEXT_TASK.set((metadata_task, f"{run_id}:metadata"))

    def _on_state(self, name: str, payload: dict[str, Any]) -> None:
        with self._lock:
            self._states[name] = dict(payload)
        self._publish(self._topics.pipeline_state(name), flat_json_bytes(payload, max_text=500),
                      retain=True)

    def _publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        try:
            self.master.publish(topic, payload, retain=retain)
        except FabricError:
            log.exception("could not publish %s", topic)

    def states(self) -> list[dict[str, Any]]:
        """The latest state payload of every pipeline: the file's in file order, then the
        dispatched ones (thread-safe)."""
        with self._lock:
            return [dict(state) for state in self._states.values()]

    # -- the `pipelines` query -------------------------------------------------------------------

    def answer(self, params: Any) -> Any:
        """Answer a `pipelines` query: {"op": list|run|pause|resume|history, "name": ...}, or
        {"op": "dispatch", "pipeline": pipeline_data} (answered {"pipeline", "run_id"}).

        Runs on the master's loop thread under its lock: `list` reads the cache; the other
        operations run on the pipelines loop, waited for at most `answer_timeout`.
        """
        if not isinstance(params, dict):
            raise ConfigError("the pipelines query takes params {'op': ..., 'name': ...}")
        op = params.get("op")
        if op not in OPERATIONS:
            raise ConfigError(f"unknown pipelines operation {op!r} (use: "
                              f"{', '.join(OPERATIONS)})")
        if not self._running:
            raise PipelineError("the master's pipelines are not running (starting or stopping)")
        if op == "list":
            return self.states()
        if op == "dispatch":
            pipeline = params.get("pipeline")
            run_id = self.dispatch_pipeline(pipeline)
            return {"pipeline": pipeline.get("name"), "run_id": run_id}
        name = params.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"pipelines {op} needs params.name: a pipeline name")
        with self._lock:
            names = list(self._states)
        if name not in names:
            raise UnknownPipeline(f"no pipeline called {name!r} (pipelines: "
                                  f"{', '.join(names) or 'none'})")
        jobs = params.get("jobs")
        if jobs is not None and (not isinstance(jobs, list)
                                 or not all(isinstance(j, str) for j in jobs) or not jobs):
            raise ConfigError("params.jobs must be a non-empty list of job names")
        limit = params.get("limit", 10)
        if isinstance(limit, bool) or not isinstance(limit, int) \
                or not 1 <= limit <= _MAX_HISTORY:
            raise ConfigError(f"params.limit must be an integer 1-{_MAX_HISTORY}")
        return self._on_loop(self._operate(op, name, jobs=jobs, limit=limit), op)

    async def _operate(self, op: str, name: str, *, jobs: Collection[str] | None,
                       limit: int) -> Any:
        manager = self._manager
        if manager is None:
            raise PipelineError("the master's pipelines are stopping")
        if op == "run":
            run_id = manager.run(name, jobs=jobs)
            return {"pipeline": name, "run_id": run_id}
        if op == "pause":
            manager.pause(name)
            return manager.state_payload(name)
        if op == "resume":
            run_id = manager.resume(name)
            return {**manager.state_payload(name), "continued_run_id": run_id}
        return [run_view(run) for run in manager.history(name, limit=limit)]

    def _on_loop(self, coro: Any, op: str) -> Any:
        loop = self._loop
        try:
            if loop is None:
                raise RuntimeError("no loop")
            future = asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError:
            coro.close()
            raise PipelineError("the master's pipelines are stopping") from None
        try:
            return future.result(self.answer_timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise FabricTimeout(f"pipelines {op}: no answer from the pipelines loop within "
                                f"{self.answer_timeout:g}s") from None
        except FabricError:
            raise
        except Exception as e:
            log.exception("pipelines %s failed", op)
            raise PipelineError(f"pipelines {op} failed: {type(e).__name__}: {e}") from e


def serve_pipelines(master: MasterNodeTransport, pipelines: PipelineFile | None, *,
                    state_dir: str | Path, **options: Any) -> PipelineService:
    """Run the pipelines of `master` (those of the file, if one is given, and any dispatched
    later) and answer `pipelines` queries; returns the started service.

    Call after `master.start()`, so the journal's unfinished tasks are back before runs
    continue.
    """
    service = PipelineService(master=master, pipelines=pipelines,
                              store_path=Path(state_dir) / STORE_FILE, **options)
    master.add_query(QUERY, service.answer)
    try:
        service.start()
    except BaseException:
        service.stop()
        raise
    return service


def _digest(task_name: str, args: list[Any], kwargs: dict[str, Any]) -> str:
    """A short digest of what a task computes, so a task id names one piece of work."""
    text = json.dumps([task_name, args, kwargs], sort_keys=True, separators=(",", ":"),
                      default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _task_id(text: str) -> str:
    """`text` if it fits a task id, else a digest of it (still deterministic)."""
    if len(text) <= _MAX_TASK_ID:
        return text
    return "pipeline:" + hashlib.sha256(text.encode()).hexdigest()
