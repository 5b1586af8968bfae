"""Pipelines inside the master: a `PipelineManager` on a thread and event loop of its own.

Each job runs as one fabric task submitted to the master; every pipeline and job event goes out
as flat JSON on `<root>/events/<event>`, and each pipeline's state is kept retained on
`<root>/pipelines/<name>/state`. Clients drive pipelines with the `pipelines` query
(`FabricClient.query("pipelines", {"op": ..., "name": ...})`, used by `master-node pipelines`).

Threads. The manager, its store (`<state>/pipelines.sqlite3`, a file of its own) and its events
live on the `pipelines` thread. Query handlers run on the master's loop thread while it holds
the master's lock, so they must never wait for anything that needs that lock. Hence the
pipelines loop never takes it: `MasterNodeTransport.submit` (and the journal look-up below) run
on a small pool of threads, and the loop only awaits their futures. A query therefore waits (at
most `answer_timeout`) only for a loop that is always free to answer; `list` is answered from a
cache of the state payloads without waiting at all.

Exactly once across a master crash. A job's task id is derived from its run, job and attempt
(`<run_id>:job:<job>:<attempt>`; `<run_id>:metadata` for the metadata task), so when a run is
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
import logging
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import ConfigError, FabricError, FabricTimeout
from core.protocol import TaskOutcome
from master.handles import TaskHandle
from master.pipelines_bridge.flat import flat_json_bytes
from master.pipelines_bridge.pipeline_file import PipelineFile
from master.pipelines_bridge.views import run_view
from pipelines import (DEFAULT_TIMEOUT, JOB_FAILED, JOB_STARTED, PIPELINE_COMPLETED,
                       PIPELINE_FAILED, PIPELINE_STARTED, EventSystem, JobFailed, PipelineError,
                       PipelineManager, UnknownPipeline, VersionedStore)

if TYPE_CHECKING:
    from master.transport import MasterNodeTransport

__all__ = ["PipelineService", "serve_pipelines", "QUERY", "OPERATIONS", "STORE_FILE"]

log = logging.getLogger(__name__)

QUERY = "pipelines"
OPERATIONS = ("list", "run", "pause", "resume", "history")
STORE_FILE = "pipelines.sqlite3"
_MAX_TASK_ID = 128
_MAX_HISTORY = 1000
_FINISHED = ("completed", "failed")

# (task name, task id) of the job whose asyncio task is about to call run_task
_NEXT_TASK: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "pipeline_next_task", default=None)


class PipelineService:
    """Runs the pipelines of one file inside a master; see the module docstring."""

    def __init__(self, *, master: MasterNodeTransport, pipelines: PipelineFile,
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
        self._metadata_tasks = {c.name: c.metadata for c in pipelines.configs}
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
            manager = PipelineManager(self.pipelines.configs, events, run_task=self.run_task,
                                      store=store, clock=self._clock)
            manager.add_state_listener(self._on_state)
            continued = manager.recover()
            for name in manager.executors:
                self._on_state(name, manager.state_payload(name))
            self._manager = manager
            self._loop = asyncio.get_running_loop()
            self._running = True
            self._ready.set()
            log.info("pipelines %s from %s running (store %s%s)",
                     ", ".join(self.pipelines.names), self.pipelines.path, self.store_path,
                     f"; continuing {len(continued)} interrupted run(s)" if continued else "")
            await manager.run_forever(self._stop_event, poll_interval=self.poll_interval)
        finally:
            self._running = False
            self._manager = None
            store.close()

    # -- running jobs on the fabric --------------------------------------------------------------

    async def run_task(self, task_name: str, args: list[Any], kwargs: dict[str, Any], *,
                       priority: int, timeout: float | None = None) -> Any:
        """The manager's `run_task`: submit to the master, await the outcome (bounded by the
        job's timeout). A task given up on this way stays with the master, which has no way
        to withdraw it; the next attempt is a task of its own."""
        noted = _NEXT_TASK.get()
        task_id = noted[1] if noted is not None and noted[0] == task_name else None
        loop = asyncio.get_running_loop()
        submitted = await loop.run_in_executor(self._pool, self._submit, task_name, list(args),
                                               dict(kwargs), priority, task_id)
        if isinstance(submitted, TaskHandle):
            outcome = await asyncio.wait_for(asyncio.wrap_future(submitted.future),
                                             timeout or DEFAULT_TIMEOUT)
        else:
            outcome = submitted
        if outcome.state != "completed":
            raise JobFailed(_failure(outcome))
        return outcome.value

    def _submit(self, name: str, args: list[Any], kwargs: dict[str, Any], priority: int,
                task_id: str | None) -> TaskHandle | TaskOutcome:
        """On a pool thread (it takes the master's lock): the recorded outcome, or a handle."""
        if task_id is not None:
            known = self.master.outcomes([task_id]).get(task_id)
            if known is not None and known.state in _FINISHED:
                log.info("task %s finished before the restart: using its recorded outcome",
                         task_id)
                return known
        return self.master.submit(name, args, kwargs, priority=priority, task_id=task_id)

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
                _NEXT_TASK.set((task, _task_id(f"{run_id}:job:{job}:{attempt}")))
        elif event_name == PIPELINE_STARTED:
            metadata_task = self._metadata_tasks.get(data.get("pipeline"))
            if metadata_task is not None:
                _NEXT_TASK.set((metadata_task, _task_id(f"{run_id}:metadata")))

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
        """The latest state payload of every pipeline, in file order (thread-safe)."""
        with self._lock:
            return [dict(self._states[n]) for n in self.pipelines.names if n in self._states]

    # -- the `pipelines` query -------------------------------------------------------------------

    def answer(self, params: Any) -> Any:
        """Answer a `pipelines` query: {"op": list|run|pause|resume|history, "name": ...}.

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
        name = params.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"pipelines {op} needs params.name: a pipeline name")
        if name not in self.pipelines.names:
            raise UnknownPipeline(f"no pipeline called {name!r} (pipelines: "
                                  f"{', '.join(self.pipelines.names)})")
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
                    state_dir: str | Path, **options: Any) -> PipelineService | None:
    """Answer `pipelines` queries on `master`; with a file, also run its pipelines (started).

    Without a file the query answers with an error saying how to give one. Call after
    `master.start()`, so the journal's unfinished tasks are back before runs continue.
    """
    if pipelines is None:
        master.add_query(QUERY, _no_pipelines)
        return None
    service = PipelineService(master=master, pipelines=pipelines,
                              store_path=Path(state_dir) / STORE_FILE, **options)
    master.add_query(QUERY, service.answer)
    try:
        service.start()
    except BaseException:
        service.stop()
        raise
    return service


def _no_pipelines(_params: Any) -> Any:
    raise PipelineError("this master runs no pipelines: start it with "
                        "`master-node serve --pipelines FILE`")


def _failure(outcome: TaskOutcome) -> str:
    """What a job's error says: the task's own error first, then which task and node."""
    error = outcome.error or {}
    what = error.get("type") or error.get("kind") or outcome.state
    message = error.get("message") or ""
    node = error.get("node_id") or outcome.node_id
    where = f"task {outcome.id}" + (f" on {node}" if node else "")
    return f"{what}: {message} ({where})" if message else f"{what} ({where})"


def _task_id(text: str) -> str:
    """`text` if it fits a task id, else a digest of it (still deterministic)."""
    if len(text) <= _MAX_TASK_ID:
        return text
    return "pipeline:" + hashlib.sha256(text.encode()).hexdigest()
