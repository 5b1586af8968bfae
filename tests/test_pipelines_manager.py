"""The manager: schedules under a fake clock, pause and resume, per-job schedules, manual runs,
history, state payloads, and recovery after the process is killed."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from core.errors import FabricTimeout
from pipelines import (COMPLETED, FAILED, PAUSED, PENDING, RUNNING, Due, EventSystem,
                       JobFailed, PipelineBusy, PipelineConfig, PipelineManager, UnknownPipeline,
                       VersionedStore, parse_pipelines)

BOUND = 5.0
ROOT = Path(__file__).resolve().parents[1]
T0 = 1_000.0


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=6 * BOUND))


def definition(*, schedule: str | None = None, **job_extra: dict[str, Any]) -> dict[str, Any]:
    """a -> (b, c) -> d -> e, every job running the task of its own name."""
    jobs: dict[str, dict[str, Any]] = {
        "a": {"task": "a"},
        "b": {"task": "b", "depends_on": ["a"]},
        "c": {"task": "c", "depends_on": ["a"]},
        "d": {"task": "d", "depends_on": ["b", "c"]},
        "e": {"task": "e", "depends_on": ["d"]},
    }
    for name, extra in job_extra.items():
        jobs[name].update(extra)
    pipeline: dict[str, Any] = {"jobs": jobs}
    if schedule is not None:
        pipeline["schedule"] = schedule
    return {"p": pipeline}


def configs(**kwargs: Any) -> list[PipelineConfig]:
    return parse_pipelines(definition(**kwargs))


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Runner:
    """A fake fabric: a task returns "name(inputs...)"; `gates` hold a task until set,
    `failing` tasks raise."""

    def __init__(self) -> None:
        self.tasks: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.started: dict[str, asyncio.Event] = {}
        self.failing: set[str] = set()

    def gate(self, task: str) -> asyncio.Event:
        self.started[task] = asyncio.Event()
        self.gates[task] = asyncio.Event()
        return self.gates[task]

    async def wait_started(self, task: str) -> None:
        await asyncio.wait_for(self.started[task].wait(), timeout=BOUND)

    async def __call__(self, task: str, args: list[Any], kwargs: dict[str, Any], *,
                       priority: int, timeout: float | None) -> Any:
        self.tasks.append(task)
        if task in self.gates:
            self.started[task].set()
            await asyncio.wait_for(self.gates[task].wait(), timeout=BOUND)
        if task in self.failing:
            raise JobFailed(f"{task} cannot")
        inputs = kwargs.get("inputs", {})
        return f"{task}({','.join(inputs[name] for name in sorted(inputs))})"


OPENED: list[VersionedStore] = []


@pytest.fixture(autouse=True)
def close_stores() -> Iterator[None]:
    yield
    while OPENED:
        OPENED.pop().close()


def manager_for(path: Path, pipeline_configs: list[PipelineConfig], runner: Runner,
                clock: Clock, events: EventSystem | None = None) -> PipelineManager:
    store = VersionedStore(path)
    OPENED.append(store)
    return PipelineManager(pipeline_configs, events or EventSystem(), run_task=runner,
                           store=store, clock=clock)


# -- schedules ------------------------------------------------------------------------------

def test_an_interval_schedule_fires_on_its_grid_under_a_fake_clock(tmp_path: Path) -> None:
    clock, runner = Clock(), Runner()
    manager = manager_for(tmp_path / "s.db", configs(schedule="5m"), runner, clock)

    async def scenario() -> None:
        assert manager.next_run_at("p") == T0 + 300
        assert manager.due(T0 + 299) == []
        assert manager.due(T0 + 300) == [Due("p")]
        assert manager.tick(T0 + 299) == []
        (first,) = manager.tick(T0 + 300)
        record = await manager.wait_run(first, timeout=BOUND)
        assert (record.state, record.trigger) == (COMPLETED, "schedule")
        assert manager.tick(T0 + 300) == []                   # fired once per grid time
        assert manager.tick(T0 + 599) == []
        (second,) = manager.tick(T0 + 600)
        await manager.wait_run(second, timeout=BOUND)
        # The clock jumps past three grid times: one run, and the grid is kept.
        (third,) = manager.tick(T0 + 1550)
        await manager.wait_run(third, timeout=BOUND)
        assert manager.next_run_at("p") == T0 + 1800
        assert [r.run_id for r in manager.history("p")] == [third, second, first]

    run(scenario())
    assert runner.tasks.count("a") == 3


def test_a_fire_that_finds_the_pipeline_running_is_skipped(tmp_path: Path) -> None:
    clock, runner = Clock(), Runner()
    gate = runner.gate("a")
    manager = manager_for(tmp_path / "s.db", configs(schedule="5m"), runner, clock)

    async def scenario() -> None:
        (first,) = manager.tick(T0 + 300)
        await runner.wait_started("a")
        assert manager.tick(T0 + 600) == []
        assert manager.next_run_at("p") == T0 + 900
        gate.set()
        assert (await manager.wait_run(first, timeout=BOUND)).state == COMPLETED

    run(scenario())
    assert runner.tasks.count("a") == 1


def test_pause_stops_the_schedule_and_resume_restarts_it_from_the_resume_time(
        tmp_path: Path) -> None:
    clock, runner = Clock(), Runner()
    events = EventSystem()
    seen: list[str] = []
    events.add_listener(lambda name, data: seen.append(name))
    manager = manager_for(tmp_path / "s.db", configs(schedule="5m", e={"schedule": "7m"}),
                          runner, clock, events)

    async def scenario() -> None:
        clock.now = T0 + 100
        manager.pause("p")
        assert manager.due(T0 + 100_000) == []
        assert manager.tick(T0 + 100_000) == []
        assert manager.next_run_at("p") is None
        assert manager.state_payload("p")["state"] == PAUSED
        with pytest.raises(PipelineBusy, match="paused"):
            manager.run("p")
        clock.now = 5_000.0
        assert manager.resume("p") is None                  # no run was waiting
        assert manager.executor("p").pipeline.state == "Scheduled"
        assert manager.next_run_at("p") == 5_300.0          # one interval after the resume
        assert manager.tick(5_299.0) == []
        (full_run,) = manager.tick(5_300.0)
        assert (await manager.wait_run(full_run, timeout=BOUND)).trigger == "schedule"
        assert manager.due(5_419.0) == []
        assert manager.due(5_420.0) == [Due("p", "e")]      # the job's schedule resumed too

    run(scenario())
    assert seen.index("pipeline_paused") < seen.index("pipeline_resumed")
    assert runner.tasks.count("a") == 1


def test_a_job_with_its_own_schedule_reruns_alone(tmp_path: Path) -> None:
    clock, runner = Clock(), Runner()
    manager = manager_for(tmp_path / "s.db", configs(e={"schedule": "1m"}), runner, clock)

    async def scenario() -> None:
        assert manager.due(T0 + 60) == [Due("p", "e")]
        full = manager.run("p")
        await manager.wait_run(full, timeout=BOUND)
        runner.tasks.clear()
        (alone,) = manager.tick(T0 + 60)
        record = await manager.wait_run(alone, timeout=BOUND)
        assert list(record.jobs) == ["e"] and record.trigger == "schedule:e"
        assert record.jobs["e"].result == "e(d(b(a()),c(a())))"   # d's latest result
        (again,) = manager.tick(T0 + 120)
        await manager.wait_run(again, timeout=BOUND)

    run(scenario())
    assert runner.tasks == ["e", "e"]


def test_pipeline_and_job_schedules_due_together_start_one_run(tmp_path: Path) -> None:
    clock, runner = Clock(), Runner()
    manager = manager_for(tmp_path / "s.db", configs(schedule="2m", e={"schedule": "1m"}),
                          runner, clock)

    async def scenario() -> None:
        (job_only,) = manager.tick(T0 + 60)
        await manager.wait_run(job_only, timeout=BOUND)          # no d yet: e fails alone
        assert manager.due(T0 + 120) == [Due("p"), Due("p", "e")]
        started = manager.tick(T0 + 120)
        assert len(started) == 1
        record = await manager.wait_run(started[0], timeout=BOUND)
        assert (record.trigger, record.state, len(record.jobs)) == ("schedule", COMPLETED, 5)

    run(scenario())


def test_schedule_pipelines_runs_all_now_and_with_interval_sets_one_interval(
        tmp_path: Path) -> None:
    clock, runner = Clock(), Runner()
    two = parse_pipelines({**definition(), "q": {"jobs": {"only": {"task": "only"}}}})
    manager = manager_for(tmp_path / "s.db", two, runner, clock)

    async def scenario() -> None:
        assert manager.next_run_at("p") is None
        ids = manager.schedule_pipelines()
        assert len(ids) == 2
        await manager.wait_idle(timeout=BOUND)
        assert [manager.store.get_run(run_id).state for run_id in ids] == [COMPLETED] * 2
        manager.schedule_pipelines_with_interval("10m")
        assert manager.next_run_at("p") == manager.next_run_at("q") == T0 + 600
        assert {d.pipeline for d in manager.due(T0 + 600)} == {"p", "q"}

    run(scenario())
    assert sorted(runner.tasks) == ["a", "b", "c", "d", "e", "only"]


def test_the_schedule_grid_survives_a_restart(tmp_path: Path) -> None:
    clock, path = Clock(), tmp_path / "s.db"

    async def first() -> None:
        manager = manager_for(path, configs(schedule="5m"), Runner(), clock)
        clock.now = T0 + 300
        (run_id,) = manager.tick(T0 + 300)
        await manager.wait_run(run_id, timeout=BOUND)

    run(first())
    clock.now = T0 + 400
    restarted = manager_for(path, configs(schedule="5m"), Runner(), clock)
    assert restarted.next_run_at("p") == T0 + 600     # not 5m after the restart


def test_run_forever_ticks_with_the_clock_until_stopped(tmp_path: Path) -> None:
    clock, runner = Clock(), Runner()
    events = EventSystem()
    manager = manager_for(tmp_path / "s.db", configs(schedule="5m"), runner, clock, events)

    async def scenario() -> None:
        stop = asyncio.Event()
        loop = asyncio.ensure_future(manager.run_forever(stop, poll_interval=0.01))
        completed = asyncio.ensure_future(events.wait_for("pipeline_completed", timeout=BOUND))
        clock.now = T0 + 300
        data = await completed
        assert data["pipeline"] == "p"
        stop.set()
        await asyncio.wait_for(loop, timeout=BOUND)

    run(scenario())
    assert runner.tasks.count("e") == 1


# -- manual runs, history, state -----------------------------------------------------------

def test_a_manual_run_that_fails_is_in_history_and_the_state_payload(tmp_path: Path) -> None:
    clock, runner = Clock(), Runner()
    runner.failing.add("b")
    manager = manager_for(tmp_path / "s.db", configs(b={"retries": 1}), runner, clock)
    published: list[tuple[str, dict[str, Any]]] = []
    manager.add_state_listener(lambda name, payload: published.append((name, payload)))

    async def scenario() -> str:
        run_id = manager.run("p")
        with pytest.raises(PipelineBusy, match="already running"):
            manager.run("p")
        clock.now = T0 + 5
        await manager.wait_run(run_id, timeout=BOUND)
        return run_id

    run_id = run(scenario())
    (record,) = manager.history("p")
    assert (record.run_id, record.state, record.trigger) == (run_id, FAILED, "manual")
    assert record.error == "job 'b' failed: b cannot"
    assert record.jobs["b"].attempts == 2
    assert record.jobs["e"].error == "dependency 'd' failed"
    payload = manager.state_payload("p")
    assert payload == {
        "pipeline": "p", "state": FAILED, "run_id": run_id, "run_started_at": None,
        "jobs_done": 2, "jobs_failed": 3, "jobs_total": 5, "last_result": FAILED,
        "last_error": "job 'b' failed: b cannot", "last_started_at": T0,
        "last_finished_at": T0 + 5, "next_run_at": None,
    }
    assert manager.list() == [payload]
    assert json.loads(json.dumps(payload)) == payload
    assert all("." not in key for key in payload)
    assert published[-1] == ("p", payload)
    assert any(p["state"] == RUNNING and p["run_started_at"] == T0 for _, p in published)
    with pytest.raises(UnknownPipeline):
        manager.run("nope")


def test_a_fresh_pipeline_has_a_payload_too(tmp_path: Path) -> None:
    manager = manager_for(tmp_path / "s.db", configs(schedule="1h"), Runner(), Clock())
    assert manager.state_payload("p") == {
        "pipeline": "p", "state": "Scheduled", "run_id": None, "run_started_at": None,
        "jobs_done": 0, "jobs_failed": 0, "jobs_total": 5, "last_result": None,
        "last_error": None, "last_started_at": None, "last_finished_at": None,
        "next_run_at": T0 + 3600,
    }


def test_from_file_builds_the_manager_from_a_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "pipelines.toml"
    path.write_text('[pipelines.nightly]\nschedule = "1d"\n'
                    '[pipelines.nightly.jobs.primes]\ntask = "primes"\nargs = [1, 100]\n')
    store = VersionedStore(tmp_path / "s.db")
    OPENED.append(store)
    manager = PipelineManager.from_file(path, EventSystem(), run_task=Runner(), store=store,
                                        known_tasks={"primes"}, clock=Clock())
    assert list(manager.executors) == ["nightly"]
    assert manager.next_run_at("nightly") == T0 + 86400


# -- pause, restart, recovery ---------------------------------------------------------------

def test_a_pipeline_paused_mid_run_stays_paused_across_a_restart_until_resumed(
        tmp_path: Path) -> None:
    clock, path = Clock(), tmp_path / "s.db"
    runner = Runner()
    gate = runner.gate("b")

    async def before_restart() -> str:
        manager = manager_for(path, configs(), runner, clock)
        run_id = manager.run("p")
        await runner.wait_started("b")
        manager.pause("p")
        gate.set()
        record = await manager.wait_run(run_id, timeout=BOUND)
        assert record.state == PAUSED
        return run_id

    run_id = run(before_restart())
    assert sorted(runner.tasks) == ["a", "b", "c"]

    after = Runner()

    async def after_restart() -> None:
        manager = manager_for(path, configs(), after, clock)
        assert manager.executor("p").pipeline.state == PAUSED
        assert manager.recover() == []
        assert manager.state_payload("p")["run_id"] == run_id
        assert manager.resume("p") == run_id
        record = await manager.wait_run(run_id, timeout=BOUND)
        assert record.state == COMPLETED

    run(after_restart())
    assert after.tasks == ["d", "e"]


CHILD = r"""
import asyncio, json, sys
sys.path.insert(0, sys.argv[1])
from pipelines import EventSystem, PipelineManager, VersionedStore, parse_pipelines

async def main():
    events = EventSystem()
    b_done = asyncio.Event()
    events.on("job_completed", lambda data: data["job"] == "b" and b_done.set())

    async def run_task(task, args, kwargs, *, priority, timeout):
        if task == "c":
            await asyncio.wait_for(b_done.wait(), timeout=10)
            print("c started", flush=True)
            await asyncio.Event().wait()
        inputs = kwargs.get("inputs", {})
        return f"{task}({','.join(inputs[n] for n in sorted(inputs))})"

    manager = PipelineManager(parse_pipelines(json.loads(sys.argv[3])), events,
                              run_task=run_task, store=VersionedStore(sys.argv[2]))
    print("run", manager.run("p"), flush=True)
    await asyncio.wait_for(asyncio.Event().wait(), timeout=60)

asyncio.run(main())
"""


def test_a_run_killed_mid_way_resumes_on_restart_without_rerunning_completed_jobs(
        tmp_path: Path) -> None:
    path = tmp_path / "s.db"

    async def killed() -> str:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, str(ROOT), str(path), json.dumps(definition()),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            first = await asyncio.wait_for(child.stdout.readline(), timeout=3 * BOUND)
            second = await asyncio.wait_for(child.stdout.readline(), timeout=3 * BOUND)
            if second != b"c started\n":
                child.kill()
                _, err = await child.communicate()
                pytest.fail(f"child did not reach job c: {first!r} {second!r} {err.decode()}")
        finally:
            if child.returncode is None:
                child.kill()                                   # SIGKILL: no clean-up at all
            await asyncio.wait_for(child.wait(), timeout=BOUND)
        assert child.returncode == -9
        return first.decode().split()[1]

    run_id = run(killed())
    with VersionedStore(path) as store:
        states = {n: j.state for n, j in store.get_run(run_id).jobs.items()}
    assert states == {"a": COMPLETED, "b": COMPLETED, "c": RUNNING, "d": PENDING, "e": PENDING}

    runner = Runner()

    async def restarted() -> None:
        manager = manager_for(path, configs(), runner, Clock())
        assert manager.recover() == [run_id]
        record = await manager.wait_run(run_id, timeout=BOUND)
        assert record.state == COMPLETED
        assert record.jobs["e"].result == "e(d(b(a()),c(a())))"
        assert manager.state_payload("p")["last_result"] == COMPLETED

    run(restarted())
    assert runner.tasks == ["c", "d", "e"]


def test_recover_settles_a_pipeline_left_running_after_its_run_ended(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with VersionedStore(path) as store:
        # The process died between ending the run and saving the pipeline's new state.
        store.create_run(run_id="r1", pipeline="p", jobs=["a"], trigger="manual",
                         started_at=T0)
        store.set_run_state("r1", COMPLETED, finished_at=T0 + 1)
        tx = store.begin()
        tx.write("pipeline:p", RUNNING, {"name": "p", "last_run_id": "r1"})
        store.commit(tx)

    async def restarted() -> list[str]:
        manager = manager_for(path, configs(), Runner(), Clock())
        assert manager.executor("p").pipeline.state == RUNNING
        return manager.recover()

    assert run(restarted()) == []
    with VersionedStore(path) as store:
        assert store.read("pipeline:p").state == COMPLETED


def test_close_cancels_runs_and_leaves_them_to_recover(tmp_path: Path) -> None:
    runner = Runner()
    runner.gate("d")
    manager = manager_for(tmp_path / "s.db", configs(), runner, Clock())

    async def scenario() -> None:
        run_id = manager.run("p")
        await runner.wait_started("d")
        await manager.close(timeout=BOUND)
        assert manager.store.get_run(run_id).state == RUNNING
        runner.gates.clear()
        assert manager.recover() == [run_id]
        assert (await manager.wait_run(run_id, timeout=BOUND)).state == COMPLETED

    run(scenario())
    assert runner.tasks == ["a", "b", "c", "d", "d", "e"]


# -- pipelines added while running, the start-up run, the awaitable interval ------------------------

def test_add_pipeline_adds_keeps_or_replaces_a_definition(tmp_path: Path) -> None:
    clock, runner = Clock(), Runner()
    manager = manager_for(tmp_path / "s.db", configs(), runner, clock)
    extra = {"name": "q", "jobs": [{"name": "only"}]}

    async def scenario() -> None:
        added = manager.add_pipeline(extra)
        assert manager.add_pipeline(extra) is added  # the same definition: nothing changes
        run_id = manager.run("q")
        await manager.wait_run(run_id, timeout=BOUND)
        gate = runner.gate("other")
        replaced = manager.add_pipeline({"name": "q", "jobs": [{"name": "other"}]})
        assert replaced is not added and manager.executor("q") is replaced
        run_id = manager.run("q")
        await runner.wait_started("other")
        with pytest.raises(PipelineBusy, match="cannot change"):
            manager.add_pipeline(extra)
        gate.set()
        assert (await manager.wait_run(run_id, timeout=BOUND)).state == COMPLETED
        assert [r.state for r in manager.history("q")] == [COMPLETED, COMPLETED]  # kept

    run(scenario())
    assert runner.tasks == ["only", "other"]  # each job runs the task of its own name


def test_startup_event_continues_runs_then_runs_each_pipeline_once(tmp_path: Path) -> None:
    clock, runner = Clock(), Runner()
    two = configs() + parse_pipelines({"q": {"jobs": {"only": {"task": "only"}}}})
    manager = manager_for(tmp_path / "s.db", two, runner, clock)

    async def scenario() -> None:
        records = await manager.startup_event()
        assert [(r.pipeline, r.state) for r in records] == [("p", COMPLETED), ("q", COMPLETED)]
        runner.gate("only")
        with pytest.raises(FabricTimeout, match="still running"):
            await manager.startup_event(timeout=0.05)
        runner.gates["only"].set()
        await manager.wait_idle(timeout=BOUND)

    run(scenario())


def test_schedule_pipelines_with_interval_runs_while_awaited_until_stopped(
        tmp_path: Path) -> None:
    clock, runner = Clock(), Runner()
    manager = manager_for(tmp_path / "s.db", configs(), runner, clock)

    async def scenario() -> None:
        stop = asyncio.Event()
        schedule = manager.schedule_pipelines_with_interval("1m", stop_event=stop,
                                                            poll_interval=0.01)
        assert schedule.interval == 60 and manager.next_run_at("p") == T0 + 60
        running = asyncio.ensure_future(schedule)
        clock.now = T0 + 60
        await asyncio.wait_for(_until(lambda: manager.history("p")), BOUND)
        await manager.wait_idle(timeout=BOUND)
        stop.set()
        await asyncio.wait_for(running, BOUND)
        assert [r.trigger for r in manager.history("p")] == ["schedule"]

    run(scenario())


async def _until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0.01)
