"""The executor: dependency order, concurrency, retries, failure propagation, metadata,
collectors, pause, and continuing an interrupted run from the store."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipelines import (COMPLETED, FAILED, PAUSED, PENDING, RUNNING, EventSystem, JobFailed,
                       PipelineBusy, PipelineConfig, PipelineError, PipelineExecutor,
                       PipelineModel, VersionedStore, parse_pipelines)

BOUND = 5.0  # seconds any single wait in these tests may take


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=4 * BOUND))


def diamond(**extra: Any) -> PipelineConfig:
    """a -> (b, c) -> d -> e, every job running the task of its own name."""
    jobs = {
        "a": {"task": "a"},
        "b": {"task": "b", "depends_on": ["a"]},
        "c": {"task": "c", "depends_on": ["a"]},
        "d": {"task": "d", "depends_on": ["b", "c"]},
        "e": {"task": "e", "depends_on": ["d"]},
    }
    pipeline: dict[str, Any] = {"jobs": jobs}
    for key, value in extra.items():
        if key in jobs:
            jobs[key].update(value)
        else:
            pipeline[key] = value
    return parse_pipelines({"p": pipeline})[0]


@dataclass
class Call:
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    priority: int
    timeout: float | None


Handler = Callable[[Call], Awaitable[Any]]


class Runner:
    """A fake fabric: records every call; a task returns "name(inputs...)" unless handled."""

    def __init__(self, **handlers: Handler) -> None:
        self.handlers = handlers
        self.calls: list[Call] = []
        self.log: list[tuple[str, str]] = []

    def tasks(self) -> list[str]:
        return [call.task for call in self.calls]

    async def __call__(self, task: str, args: list[Any], kwargs: dict[str, Any], *,
                       priority: int, timeout: float | None) -> Any:
        call = Call(task, args, kwargs, priority, timeout)
        self.calls.append(call)
        self.log.append(("start", task))
        handler = self.handlers.get(task)
        if handler is not None:
            result = await handler(call)
        else:
            inputs = kwargs.get("inputs", {})
            result = f"{task}({','.join(inputs[name] for name in sorted(inputs))})"
        self.log.append(("end", task))
        return result


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


OPENED: list[VersionedStore] = []


@pytest.fixture(autouse=True)
def close_stores() -> Iterator[None]:
    yield
    while OPENED:
        OPENED.pop().close()


def make(path: Path, config: PipelineConfig, runner: Runner,
         events: EventSystem | None = None) -> PipelineExecutor:
    store = VersionedStore(path)
    OPENED.append(store)
    model = PipelineModel.load(config, store=store)
    return PipelineExecutor(model, events or EventSystem(), run_task=runner, clock=Clock())


def record_events(events: EventSystem) -> list[tuple[str, dict[str, Any]]]:
    seen: list[tuple[str, dict[str, Any]]] = []
    events.add_listener(lambda name, data: seen.append((name, data)))
    return seen


def test_diamond_runs_in_dependency_order_and_independent_jobs_overlap(tmp_path: Path) -> None:
    started = {"b": asyncio.Event(), "c": asyncio.Event()}

    def meet(me: str, other: str) -> Handler:
        async def handler(call: Call) -> str:
            started[me].set()
            # Returns only once the other branch has started too: run one after the other,
            # this would time out and fail the job.
            await asyncio.wait_for(started[other].wait(), timeout=BOUND)
            return f"{me}({call.kwargs['inputs']['a']})"
        return handler

    runner = Runner(b=meet("b", "c"), c=meet("c", "b"))
    events = EventSystem()
    seen = record_events(events)
    executor = make(tmp_path / "s.db", diamond(), runner, events)

    record = run(executor.execute_pipeline())

    assert record.state == COMPLETED
    assert record.jobs["e"].result == "e(d(b(a()),c(a())))"
    log = runner.log
    assert log.index(("end", "a")) < min(log.index(("start", "b")), log.index(("start", "c")))
    assert max(log.index(("start", "b")), log.index(("start", "c"))) < min(
        log.index(("end", "b")), log.index(("end", "c")))               # b and c overlapped
    assert log.index(("start", "d")) > max(log.index(("end", "b")), log.index(("end", "c")))
    assert log.index(("start", "e")) > log.index(("end", "d"))
    assert sorted(runner.tasks()) == ["a", "b", "c", "d", "e"]
    assert executor.pipeline.state == COMPLETED
    assert [v.state for v in executor.pipeline.history()] == [RUNNING, COMPLETED]
    assert all(job.state == COMPLETED for job in executor.jobs.values())
    names = [name for name, _ in seen]
    assert names[0] == "pipeline_started" and names[-1] == "pipeline_completed"
    assert names.count("job_started") == names.count("job_completed") == 5
    assert all(data["pipeline"] == "p" and data["run_id"] == record.run_id for _, data in seen)


def test_tasks_get_args_kwargs_priority_timeout_inputs_and_metadata(tmp_path: Path) -> None:
    async def meta(call: Call) -> dict[str, int]:
        assert not any(c.task != "meta" for c in runner.calls)   # before every job
        return {"day": 3}

    runner = Runner(meta=meta)
    config = diamond(metadata="meta",
                     a={"args": [1, "x"], "kwargs": {"mode": "fast"}, "priority": 9,
                        "timeout": "2m"})
    collected: list[tuple[str, Any]] = []

    async def async_collector(name: str, result: Any) -> None:
        collected.append(("async", name))

    def broken_collector(name: str, result: Any) -> None:
        raise RuntimeError("collector broke")

    executor = make(tmp_path / "s.db", config, runner)
    executor.add_collector(lambda name, result: collected.append((name, result)))
    executor.add_collector(async_collector)
    executor.add_collector(broken_collector)

    record = run(executor.execute_pipeline())

    assert record.state == COMPLETED
    assert record.metadata == {"day": 3}
    calls = {call.task: call for call in runner.calls}
    assert runner.tasks().count("meta") == 1
    assert calls["meta"].priority == 9                      # the highest among the jobs
    a = calls["a"]
    assert (a.args, a.kwargs, a.priority, a.timeout) == (
        [1, "x"], {"mode": "fast", "metadata": {"day": 3}}, 9, 120.0)
    assert "inputs" not in a.kwargs                         # a has no dependencies
    assert calls["d"].kwargs == {"inputs": {"b": "b(a())", "c": "c(a())"},
                                 "metadata": {"day": 3}}
    results = {name: result for name, result in collected if name != "async"}
    assert results == {name: job.result for name, job in record.jobs.items()}
    assert sorted(name for kind, name in collected if kind == "async") == list("abcde")


def test_a_job_failing_after_its_retries_fails_dependents_and_the_pipeline(
        tmp_path: Path) -> None:
    async def fail(call: Call) -> None:
        raise JobFailed("disk full")

    runner = Runner(b=fail)
    events = EventSystem()
    seen = record_events(events)
    executor = make(tmp_path / "s.db", diamond(b={"retries": 2}), runner, events)

    record = run(executor.execute_pipeline())

    assert runner.tasks().count("b") == 3                   # first attempt + 2 retries
    assert "d" not in runner.tasks() and "e" not in runner.tasks()
    assert record.jobs["c"].state == COMPLETED              # independent branch still ran
    assert record.state == FAILED
    assert record.error == "job 'b' failed: disk full"
    assert (record.jobs["b"].state, record.jobs["b"].attempts) == (FAILED, 3)
    assert record.jobs["d"].error == "dependency 'b' failed"
    assert record.jobs["e"].error == "dependency 'd' failed"
    assert record.jobs["d"].attempts == 0 and record.jobs["d"].state == FAILED
    assert executor.pipeline.state == FAILED
    stored = executor.store.get_run(record.run_id)         # the failure is in the history
    assert stored == record
    assert executor.jobs["b"].history()[-1].data["error"] == "disk full"
    names = [name for name, _ in seen]
    assert names.count("job_retrying") == 2
    failed = [data["job"] for name, data in seen if name == "job_failed"]
    assert sorted(failed) == ["b", "d", "e"]
    assert names[-1] == "pipeline_failed"
    retry = next(data for name, data in seen if name == "job_retrying")
    assert (retry["attempt"], retry["retries_left"], retry["error"]) == (1, 2, "disk full")


def test_a_retry_that_succeeds_completes_the_job(tmp_path: Path) -> None:
    attempts = []

    async def flaky(call: Call) -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("node went away")
        return "ok"

    executor = make(tmp_path / "s.db", diamond(a={"retries": 1}), Runner(a=flaky))
    record = run(executor.execute_pipeline())
    assert record.state == COMPLETED
    assert (record.jobs["a"].attempts, record.jobs["a"].result) == (2, "ok")


def test_a_job_that_exceeds_its_timeout_fails(tmp_path: Path) -> None:
    async def hang(call: Call) -> None:
        await asyncio.Event().wait()

    runner = Runner(e=hang)
    executor = make(tmp_path / "s.db", diamond(e={"timeout": 0.05}), runner)
    record = run(executor.execute_pipeline())
    assert record.jobs["e"].error == "timed out after 0.05s"
    assert runner.calls[-1].timeout == 0.05
    assert record.state == FAILED


def test_a_failing_metadata_task_fails_the_run_before_any_job(tmp_path: Path) -> None:
    async def meta(call: Call) -> None:
        raise ValueError("no catalogue")

    runner = Runner(meta=meta)
    executor = make(tmp_path / "s.db", diamond(metadata="meta"), runner)
    record = run(executor.execute_pipeline())
    assert runner.tasks() == ["meta"]
    assert record.state == FAILED
    assert record.error == "metadata task 'meta' failed: ValueError: no catalogue"
    assert {job.state for job in record.jobs.values()} == {FAILED}


def test_a_result_that_cannot_be_stored_fails_the_job(tmp_path: Path) -> None:
    async def unstorable(call: Call) -> object:
        return object()

    executor = make(tmp_path / "s.db", diamond(), Runner(e=unstorable))
    record = run(executor.execute_pipeline())
    assert record.jobs["e"].state == FAILED
    assert "not JSON-serialisable" in record.jobs["e"].error


def test_an_interrupted_run_continues_without_running_completed_jobs(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    c_started = asyncio.Event()

    async def hang(call: Call) -> None:
        c_started.set()
        await asyncio.Event().wait()

    async def first_process() -> str:
        events = EventSystem()
        executor = make(path, diamond(), Runner(c=hang), events)
        b_done = asyncio.ensure_future(events.wait_for(
            "job_completed", timeout=BOUND, predicate=lambda d: d["job"] == "b"))
        task = asyncio.ensure_future(executor.execute_pipeline())
        await b_done
        await asyncio.wait_for(c_started.wait(), timeout=BOUND)
        run_id = executor.current_run_id
        task.cancel()                                         # the process stops here
        with pytest.raises(asyncio.CancelledError):
            await task
        return run_id

    run_id = run(first_process())
    with VersionedStore(path) as store:
        interrupted = store.get_run(run_id)
    assert interrupted.state == RUNNING
    assert {name: job.state for name, job in interrupted.jobs.items()} == {
        "a": COMPLETED, "b": COMPLETED, "c": RUNNING, "d": PENDING, "e": PENDING}

    runner = Runner()
    events = EventSystem()
    seen = record_events(events)
    executor = make(path, diamond(), runner, events)
    collected: list[str] = []
    executor.add_collector(lambda name, result: collected.append(name))
    record = run(executor.execute_pipeline(run_id=run_id))

    assert runner.tasks() == ["c", "d", "e"]
    assert record.run_id == run_id and record.state == COMPLETED
    assert record.jobs["e"].result == "e(d(b(a()),c(a())))"   # b's stored result fed d
    assert seen[0][0] == "pipeline_started" and seen[0][1]["resumed"] is True
    assert sorted(collected) == list("abcde")                 # at least once across a crash


def test_pause_lets_started_jobs_finish_and_resume_continues_the_run(tmp_path: Path) -> None:
    gate = asyncio.Event()
    started = {"b": asyncio.Event(), "c": asyncio.Event()}

    def gated(name: str) -> Handler:
        async def handler(call: Call) -> str:
            started[name].set()
            await asyncio.wait_for(gate.wait(), timeout=BOUND)
            return name
        return handler

    runner = Runner(b=gated("b"), c=gated("c"))
    events = EventSystem()
    seen = record_events(events)
    executor = make(tmp_path / "s.db", diamond(), runner, events)

    async def scenario() -> None:
        task = asyncio.ensure_future(executor.execute_pipeline())
        for event in started.values():
            await asyncio.wait_for(event.wait(), timeout=BOUND)
        executor.pause()
        assert executor.pipeline.state == PAUSED
        gate.set()
        parked = await asyncio.wait_for(task, timeout=BOUND)
        assert parked.state == PAUSED
        assert {n: j.state for n, j in parked.jobs.items()} == {
            "a": COMPLETED, "b": COMPLETED, "c": COMPLETED, "d": PENDING, "e": PENDING}
        assert runner.tasks() == ["a", "b", "c"]
        run_id = executor.resume()
        assert run_id == parked.run_id
        assert executor.pipeline.state == RUNNING
        finished = await executor.execute_pipeline(run_id=run_id)
        assert finished.state == COMPLETED
        assert runner.tasks() == ["a", "b", "c", "d", "e"]

    run(scenario())
    names = [name for name, _ in seen]
    assert names.index("pipeline_paused") < names.index("pipeline_resumed")
    assert executor.pipeline.state == COMPLETED


def test_resume_while_the_run_is_still_going_just_lets_it_continue(tmp_path: Path) -> None:
    gate = asyncio.Event()
    b_started = asyncio.Event()

    async def gated(call: Call) -> str:
        b_started.set()
        await asyncio.wait_for(gate.wait(), timeout=BOUND)
        return "b"

    runner = Runner(b=gated)
    executor = make(tmp_path / "s.db", diamond(), runner)

    async def scenario() -> None:
        task = asyncio.ensure_future(executor.execute_pipeline())
        await asyncio.wait_for(b_started.wait(), timeout=BOUND)
        executor.pause()
        assert executor.resume() is None
        gate.set()
        record = await asyncio.wait_for(task, timeout=BOUND)
        assert record.state == COMPLETED

    run(scenario())
    assert sorted(runner.tasks()) == list("abcde")


def test_one_run_at_a_time_and_no_job_outside_a_run(tmp_path: Path) -> None:
    gate = asyncio.Event()
    a_started = asyncio.Event()

    async def wait(call: Call) -> str:
        a_started.set()
        await asyncio.wait_for(gate.wait(), timeout=BOUND)
        return "a"

    executor = make(tmp_path / "s.db", diamond(), Runner(a=wait))

    async def scenario() -> None:
        with pytest.raises(PipelineError, match="not part of an active run"):
            await executor.run_job(executor.jobs["a"])
        first = asyncio.ensure_future(executor.execute_pipeline())
        await asyncio.wait_for(a_started.wait(), timeout=BOUND)
        with pytest.raises(PipelineBusy):
            await executor.execute_pipeline()
        gate.set()
        record = await asyncio.wait_for(first, timeout=BOUND)
        with pytest.raises(PipelineError, match="already ended Completed"):
            await executor.execute_pipeline(run_id=record.run_id)

    run(scenario())


def test_running_some_jobs_alone_uses_the_latest_results_of_their_dependencies(
        tmp_path: Path) -> None:
    runner = Runner()
    executor = make(tmp_path / "s.db", diamond(), runner)

    lonely = run(executor.execute_pipeline(jobs=["e"]))
    assert lonely.state == FAILED
    assert "dependency 'd' has no result yet" in lonely.jobs["e"].error
    assert runner.tasks() == []

    run(executor.execute_pipeline())
    runner.calls.clear()
    alone = run(executor.execute_pipeline(jobs=["e"], trigger="schedule:e"))
    assert list(alone.jobs) == ["e"] and alone.trigger == "schedule:e"
    assert runner.tasks() == ["e"]
    assert runner.calls[0].kwargs["inputs"] == {"d": "d(b(a()),c(a()))"}


def test_a_permanent_failure_spends_no_retry(tmp_path: Path) -> None:
    async def no_node(call: Call) -> Any:
        raise JobFailed("unknown_task: no live node runs a task named 'a'", permanent=True)

    runner = Runner(a=no_node)
    executor = make(tmp_path / "s.db", diamond(a={"retries": 3}), runner)
    record = run(executor.execute_pipeline())
    assert record.state == FAILED
    assert (record.jobs["a"].state, record.jobs["a"].attempts) == (FAILED, 1)
    assert runner.tasks() == ["a"]  # neither retried nor its dependents run
