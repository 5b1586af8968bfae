"""The pipeline API as its original description writes it: each usage snippet, run as written
(construction and calls), with a real master and real nodes wherever it dispatches work; and
`dispatch_pipeline` on the client, in the master's process and from the CLI.

The snippets' jobs name no task, so each runs the fabric task of its own name: the nodes here
register plain functions called `Job1`, `Job2`, `ExtractJob` and `TransformJob`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from support.fabric import REPO, Fabric, child_env, wait_until

from core.errors import FabricError
from core.topics import DEFAULT_ROOT
from pipelines import (COMPLETED, FAILED, EventSystem, IllegalTransition, JobModel,
                       PipelineConfigError, PipelineExecutor, PipelineManager, PipelineModel,
                       ScheduleError, StateMachine, parse_time_string)

BOUND = 30.0

SEED_TASKS = '''
import os, time

def _ran(name, kwargs):
    with open(os.environ["SEED_LOG"], "a") as f:
        f.write(name + "\\n")
    return {"job": name, "pid": os.getpid(), "inputs": sorted(kwargs.get("inputs") or {})}

def Job1(**kwargs):
    return _ran("Job1", kwargs)

def Job2(**kwargs):
    return _ran("Job2", kwargs)

def ExtractJob(**kwargs):
    return _ran("ExtractJob", kwargs)

def TransformJob(**kwargs):
    return _ran("TransformJob", kwargs)
'''
NODE_TASKS = [arg for name in ("Job1", "Job2", "ExtractJob", "TransformJob")
              for arg in ("--task", f"seedjobs:{name}")]


@pytest.fixture
def seed_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The snippets' default store in the test's directory; the nodes find `seedjobs`."""
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "seedjobs.py").write_text(SEED_TASKS)
    log = tmp_path / "seed.log"
    monkeypatch.setenv("SEED_LOG", str(log))
    monkeypatch.setenv("PYTHONPATH", str(modules))
    monkeypatch.setenv("FABRIC_PIPELINES_STORE", str(tmp_path / "seed-store.sqlite3"))
    return log


@pytest.fixture
def seed_fabric(fabric: Fabric, seed_env: Path,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[Fabric]:
    """A master and two nodes on the default root, found through $FABRIC_BROKER, as the
    snippets' objects (built with no broker, no root) find them."""
    fabric.root = DEFAULT_ROOT
    monkeypatch.setenv("FABRIC_BROKER", fabric.broker_url)
    fabric.master()
    for node_id in ("seed-a", "seed-b"):
        fabric.node(f"{node_id}-{fabric.tmp.name[-6:]}", "--capacity", "1", *NODE_TASKS)
    with fabric.client() as client:
        wait_until(lambda: sum(n["status"] == "ready" and "Job1" in n.get("tasks", ())
                               for n in client.nodes()) >= 2, 20, message="two seed nodes")
    yield fabric


def ran(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def bounded(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, BOUND))


# -- the snippets that need no fabric ------------------------------------------------------------

def test_time_string_and_event_system_snippets() -> None:
    interval = parse_time_string('5m')
    assert interval == 300

    async def snippet() -> None:
        event_system = EventSystem()
        # Subscribe to an event
        job_completed_event = event_system.subscribe('job_completed')
        # Publish an event
        event_system.publish('job_completed')
        assert job_completed_event.is_set()

    bounded(snippet())


def test_state_machine_snippet_is_a_free_machine_over_its_states() -> None:
    state_machine = StateMachine(['Pending', 'Running', 'Completed'])
    assert state_machine.get_state() is None  # no state until the first set_state
    state_machine.set_state('Running')
    assert state_machine.get_state() == 'Running'
    # with no table, any listed state may follow any other, itself included
    for state in ('Completed', 'Pending', 'Pending', 'Completed', 'Running'):
        state_machine.set_state(state)
        assert state_machine.get_state() == state
    with pytest.raises(IllegalTransition, match="unknown state 'Failed'"):
        state_machine.set_state('Failed')
    # a table, when given, still rules
    strict = StateMachine(['A', 'B'], {'A': ['B']}, 'A')
    with pytest.raises(IllegalTransition, match="A -> A"):
        strict.set_state('A')


def test_pipeline_and_job_model_snippets_save_versions_in_transactions(seed_env: Path) -> None:
    pipeline_config = {
        'jobs': [
            {'name': 'Job1', 'schedule': '5m'},
            {'name': 'Job2', 'schedule': '10m'}
        ]
    }

    async def snippet() -> tuple[PipelineModel, JobModel]:
        pipeline_model = PipelineModel(name='MyPipeline', config=pipeline_config)
        tx_id = pipeline_model.begin_transaction()
        await pipeline_model.save_pipeline(tx_id)
        pipeline_model.commit(tx_id)

        job = JobModel(pipeline_id='MyPipeline', name='Job1', schedule='5m')
        tx_id = job.begin_transaction()
        await job.save_job(tx_id)
        job.commit(tx_id)
        return pipeline_model, job

    pipeline_model, job = bounded(snippet())
    assert [(v.version, v.state) for v in pipeline_model.history()] == [(1, "Scheduled")]
    stored = pipeline_model.history()[0].data["config"]
    assert [(j["name"], j["task"], j["schedule"]) for j in stored["jobs"]] == \
        [("Job1", "Job1", "5m"), ("Job2", "Job2", "10m")]  # a job runs the task of its name
    assert [(v.version, v.state, v.data["schedule"]) for v in job.history()] == \
        [(1, "Pending", "5m")]
    # the same store, seen from a new model: the default store is a file, not memory
    again = PipelineModel.load(pipeline_model.config)
    assert again.version == 1 and again.store.path == str(seed_env.parent / "seed-store.sqlite3")
    # the sync form works as before, in the same transaction as another model
    tx = pipeline_model.begin_transaction()
    pipeline_model.save_pipeline(tx)
    job.save_job(tx)
    assert pipeline_model.commit(tx) == {"pipeline:MyPipeline": 2, "job:MyPipeline/Job1": 2}
    with pytest.raises(ScheduleError):
        JobModel(pipeline_id='MyPipeline', name='Job3', schedule='5 minutes')
    with pytest.raises(PipelineConfigError, match="unknown job 'Job9'"):
        PipelineModel(name='Bad', config={'jobs': [{'name': 'J', 'depends_on': ['Job9']}]})


# -- the snippets that run jobs, on a real master and real nodes -----------------------------------

def test_pipeline_executor_snippet_runs_the_jobs_on_the_fabric(seed_fabric: Fabric,
                                                               seed_env: Path) -> None:
    pipeline_config = {
        'jobs': [
            {'name': 'Job1', 'schedule': '5m'},
            {'name': 'Job2', 'schedule': '10m'}
        ]
    }

    async def snippet() -> Any:
        event_system = EventSystem()
        completed = event_system.subscribe('job_completed')
        pipeline_model = PipelineModel(name='MyPipeline', config=pipeline_config)
        pipeline_executor = PipelineExecutor(pipeline_model, event_system)
        try:
            record = await pipeline_executor.execute_pipeline()
        finally:
            pipeline_executor.close()
        assert completed.is_set()
        return record, pipeline_model

    record, model = bounded(snippet())
    assert record.state == COMPLETED and model.state == COMPLETED
    assert sorted(ran(seed_env)) == ["Job1", "Job2"]
    assert {job.result["job"] for job in record.jobs.values()} == {"Job1", "Job2"}


def test_pipeline_manager_snippets_startup_event_and_interval(seed_fabric: Fabric,
                                                              seed_env: Path) -> None:
    async def snippet() -> None:
        event_system = EventSystem()
        pipeline_configs = [
            {'name': 'Pipeline1', 'jobs': [{'name': 'Job1', 'schedule': '5m'}]},
            {'name': 'Pipeline2', 'jobs': [{'name': 'Job2', 'schedule': '10m'}]}
        ]

        pipeline_manager = PipelineManager(pipeline_configs, event_system)
        records = await pipeline_manager.startup_event()
        assert [(r.pipeline, r.state) for r in records] == \
            [("Pipeline1", COMPLETED), ("Pipeline2", COMPLETED)]
        assert sorted(ran(seed_env)) == ["Job1", "Job2"]
        await pipeline_manager.close()

        # Pipeline Configuration (the full example)
        pipeline_configs = [
            {
                'name': 'DataPipeline',
                'jobs': [
                    {'name': 'ExtractJob', 'schedule': '5m'},
                    {'name': 'TransformJob', 'schedule': '10m'}
                ]
            }
        ]
        pipeline_manager = PipelineManager(pipeline_configs, event_system)
        # Schedule pipelines to run every 5 minutes: awaiting runs the schedule, so here it
        # runs as a task while the test moves the clock on by five minutes
        schedule = asyncio.ensure_future(
            pipeline_manager.schedule_pipelines_with_interval('5m'))
        assert pipeline_manager.tick(time.time()) == []  # nothing due yet
        fire = time.time() + 300
        (run_id,) = pipeline_manager.tick(fire)  # the whole pipeline; its jobs' own fires skip
        record = await pipeline_manager.wait_run(run_id, timeout=BOUND)
        assert (record.trigger, record.state) == ("schedule", COMPLETED)
        assert fire < (pipeline_manager.next_run_at('DataPipeline') or 0) <= fire + 300
        assert not schedule.done()  # the schedule goes on until cancelled (or stop_event)
        schedule.cancel()
        with pytest.raises(asyncio.CancelledError):
            await schedule

    bounded(snippet())
    assert sorted(ran(seed_env)) == ["ExtractJob", "Job1", "Job2", "TransformJob"]


# -- dispatch_pipeline ---------------------------------------------------------------------------

def history(client: Any, name: str) -> list[dict[str, Any]]:
    return client.query("pipelines", {"op": "history", "name": name})


def wait_ended(client: Any, name: str, run_id: str) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        run = next((r for r in history(client, name) if r["run_id"] == run_id), None)
        return run if run is not None and run["state"] in (COMPLETED, FAILED) else None
    return wait_until(ended, BOUND, interval=0.1, message=f"run {run_id} to end")


PIPELINE_DATA = {'name': 'MyPipeline',
                 'jobs': [{'name': 'Job1'}, {'name': 'Job2', 'depends_on': ['Job1']}]}


def test_client_dispatch_pipeline_runs_it_once_and_validates_it(seed_fabric: Fabric,
                                                                seed_env: Path) -> None:
    with seed_fabric.client() as client:
        run_id = client.dispatch_pipeline(PIPELINE_DATA)
        run = wait_ended(client, "MyPipeline", run_id)
        assert run["state"] == COMPLETED, run
        jobs = {job["job"]: job for job in run["jobs"]}
        assert jobs["Job2"]["result"]["inputs"] == ["Job1"]
        assert sorted(ran(seed_env)) == ["Job1", "Job2"]
        assert [s["pipeline"] for s in client.query("pipelines", {"op": "list"})] == \
            ["MyPipeline"]

        again = client.dispatch_pipeline(PIPELINE_DATA)  # the same name: another run
        assert again != run_id and wait_ended(client, "MyPipeline", again)["state"] == COMPLETED

        mistakes = [
            ({'name': 'P', 'jobs': [{'name': 'J', 'task': 'nowhere'}]},
             "pipelines.P.jobs.J.task: unknown task 'nowhere'"),
            ({'name': 'P', 'jobs': [{'name': 'J', 'task': 'echo', 'priority': 11}]},
             "pipelines.P.jobs.J.priority: must be an integer 1-10"),
            ({'name': 'P', 'jobs': [{'name': 'J', 'task': 'echo', 'schedule': '5m'}]},
             "a dispatched pipeline runs once"),
            ({'jobs': [{'name': 'J', 'task': 'echo'}]}, "a pipeline needs a name"),
            ({'name': 'P', 'jobs': [{'task': 'echo'}]}, "item 0 needs a name"),
            ("P", "must be a table"),
        ]
        for data, message in mistakes:
            with pytest.raises(FabricError) as refused:
                client.dispatch_pipeline(data)  # type: ignore[arg-type]
            assert message in str(refused.value), (data, str(refused.value))
        # a task declared in the data but offered by no node fails, and is not retried
        declared = client.dispatch_pipeline({'name': 'Q', 'tasks': ['nowhere'],
                                             'jobs': [{'name': 'J', 'task': 'nowhere',
                                                       'retries': 2}]})
        failed = wait_ended(client, "Q", declared)
        assert failed["state"] == FAILED and failed["jobs"][0]["attempts"] == 1
        assert "nowhere" in failed["jobs"][0]["error"]


def test_dispatch_pipeline_in_the_master_process(fabric: Fabric, seed_env: Path) -> None:
    from master.pipelines_bridge import serve_pipelines
    from master.transport import MasterNodeTransport
    fabric.node("n1", *NODE_TASKS)
    master = MasterNodeTransport(broker_url=fabric.broker_url, root=fabric.root,
                                 state_dir=fabric.tmp / "inproc")
    master.start()
    service = None
    try:
        wait_until(lambda: master.get_nodes_by_status("ready"), 30, message="node ready")
        service = serve_pipelines(master, None, state_dir=fabric.tmp / "inproc")
        run_id = service.dispatch_pipeline(PIPELINE_DATA)

        def ended() -> dict[str, Any] | None:
            run = service.answer({"op": "history", "name": "MyPipeline"})[0]
            return run if run["state"] in (COMPLETED, FAILED) else None
        run = wait_until(ended, BOUND, interval=0.1, message="the run to end")
        assert (run["run_id"], run["state"]) == (run_id, COMPLETED)
        assert sorted(ran(seed_env)) == ["Job1", "Job2"]
    finally:
        if service is not None:
            service.stop()
        master.stop()


def cli(fabric: Fabric, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "master.cli", "pipelines", *args, "--broker", fabric.broker_url,
         "--root", fabric.root, "--timeout", "10"],
        capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=60)


def test_cli_submit_runs_a_file_once_without_restarting_serve(fabric: Fabric,
                                                              seed_env: Path) -> None:
    path = fabric.tmp / "oneoff.toml"
    path.write_text("""
[pipelines.oneoff.jobs.Job1]
[pipelines.oneoff.jobs.Job2]
depends_on = ["Job1"]
[pipelines.other.jobs.echoed]
task = "echo"
args = ["hello"]
""")
    master = fabric.master()
    fabric.node("n1", *NODE_TASKS)
    with fabric.client() as client:
        wait_until(lambda: any(n["status"] == "ready" for n in client.nodes()), 20,
                   message="node ready")
        done = cli(fabric, "submit", str(path), "--json")
        assert done.returncode == 0, done.stderr
        started = json.loads(done.stdout)
        assert [s["pipeline"] for s in started] == ["oneoff", "other"]
        runs = {s["pipeline"]: wait_ended(client, s["pipeline"], s["run_id"]) for s in started}
        assert {name: run["state"] for name, run in runs.items()} == \
            {"oneoff": COMPLETED, "other": COMPLETED}
        assert runs["other"]["jobs"][0]["result"] == "hello"
        assert sorted(ran(seed_env)) == ["Job1", "Job2"]

    # a dispatched pipeline is kept with its history across a restart of the master
    master.terminate()
    fabric.master()
    with fabric.client() as client:
        assert [s["pipeline"] for s in client.query("pipelines", {"op": "list"})] == \
            ["oneoff", "other"]
        assert history(client, "oneoff")[0]["run_id"] == started[0]["run_id"]

    bad = fabric.tmp / "bad.toml"
    bad.write_text('[pipelines.p.jobs.a]\ndepends_on = ["b"]\n')
    refused = cli(fabric, "submit", str(bad))
    assert refused.returncode == 2 and "pipelines.p.jobs.a.depends_on: unknown job 'b'" in \
        refused.stderr
