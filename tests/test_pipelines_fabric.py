"""Pipelines inside a real master: jobs run on real nodes, events and states on MQTT, the CLI,
and a master killed mid-run that continues the run without running a completed job again."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from support.fabric import REPO, Fabric, Observer, Proc, child_env, wait_until
from support.pipeline_tasks import executions

from core.protocol import TaskOutcome
from core.topics import Topics
from master.handles import TaskHandle
from master.pipelines_bridge import PipelineService, flat_json, load_pipeline_file
from pipelines import PipelineConfigError

NODE_TASKS = ("--task", "support.pipeline_tasks:stamp", "--task", "support.pipeline_tasks:boom")
BOUND = 30.0


# -- helpers --------------------------------------------------------------------------------------

def toml_string(value: Any) -> str:
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_pipelines(fabric: Fabric, text: str) -> Path:
    path = fabric.tmp / "pipelines.toml"
    path.write_text(text)
    return path


def log_dir(fabric: Fabric) -> Path:
    path = fabric.tmp / "runs"
    path.mkdir(exist_ok=True)
    return path


def cli(fabric: Fabric, *args: str) -> subprocess.CompletedProcess[str]:
    """`master-node pipelines ARGS` against the test's broker and root."""
    return subprocess.run(
        [sys.executable, "-m", "master.cli", "pipelines", *args, "--broker", fabric.broker_url,
         "--root", fabric.root, "--timeout", "10"],
        capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=60)


def cli_ok(fabric: Fabric, *args: str) -> str:
    done = cli(fabric, *args)
    assert done.returncode == 0, f"pipelines {args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def history(client: Any, name: str) -> list[dict[str, Any]]:
    return client.query("pipelines", {"op": "history", "name": name})


def wait_run(client: Any, name: str, run_id: str, states: tuple[str, ...]) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        runs = {r["run_id"]: r for r in history(client, name)}
        run = runs.get(run_id)
        return run if run is not None and run["state"] in states else None
    return wait_until(ended, BOUND, interval=0.1, message=f"run {run_id} to be {states}")


def wait_nodes(client: Any, count: int) -> None:
    wait_until(lambda: sum(n["status"] == "ready" for n in client.nodes()) >= count, 20,
               message=f"{count} ready nodes")


def jobs_of(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {job["job"]: job for job in run["jobs"]}


def events(observer: Observer, name: str) -> list[dict[str, Any]]:
    topic = f"{observer.root}/events/{name}"
    return [json.loads(payload) for t, payload, _ in list(observer.messages) if t == topic]


def retained_state(observer: Observer, pipeline: str) -> dict[str, Any] | None:
    payload = observer.retained.get(f"{observer.root}/pipelines/{pipeline}/state")
    return json.loads(payload) if payload else None


def assert_flat(payload: dict[str, Any]) -> None:
    for key, value in payload.items():
        assert "." not in key and "/" not in key, key
        assert value is None or isinstance(value, (str, int, float, bool)), (key, value)


# -- end to end -----------------------------------------------------------------------------------

def test_diamond_runs_in_dependency_order_with_independent_jobs_overlapping(
        fabric: Fabric, observer: Observer) -> None:
    logs = log_dir(fabric)
    job = f'task = "stamp"\ntimeout = "60s"\n'
    path = write_pipelines(fabric, f"""
tasks = ["stamp"]
[pipelines.diamond.jobs.a]
{job}args = [{toml_string(logs)}, "a"]
[pipelines.diamond.jobs.b]
{job}args = [{toml_string(logs)}, "b"]
kwargs = {{ wait_for = "c" }}
depends_on = ["a"]
[pipelines.diamond.jobs.c]
{job}args = [{toml_string(logs)}, "c"]
kwargs = {{ wait_for = "b" }}
depends_on = ["a"]
[pipelines.diamond.jobs.d]
{job}args = [{toml_string(logs)}, "d"]
depends_on = ["b", "c"]
[pipelines.diamond.jobs.e]
{job}args = [{toml_string(logs)}, "e"]
depends_on = ["d"]
""")
    fabric.master("--pipelines", str(path))
    for node_id in ("n1", "n2"):  # one slot each: b and c can only overlap on two nodes
        fabric.node(node_id, "--capacity", "1", "--prefetch", "0", *NODE_TASKS)
    with fabric.client() as client:
        wait_nodes(client, 2)
        run_id = json.loads(cli_ok(fabric, "run", "diamond", "--json"))["run_id"]
        run = wait_run(client, "diamond", run_id, ("Completed", "Failed"))

    assert run["state"] == "Completed", run
    assert sorted(executions(logs)) == ["a", "b", "c", "d", "e"]  # each job once
    jobs = {name: job["result"] for name, job in jobs_of(run).items()}
    a, b, c, d, e = (jobs[n] for n in "abcde")
    assert a["ended"] <= b["started"] and a["ended"] <= c["started"]
    assert max(b["ended"], c["ended"]) <= d["started"]
    assert d["ended"] <= e["started"]
    assert b["started"] < c["ended"] and c["started"] < b["ended"]  # b and c overlapped
    assert [a["inputs"], b["inputs"], c["inputs"], d["inputs"], e["inputs"]] == \
        [[], ["a"], ["a"], ["b", "c"], ["d"]]

    def published() -> bool:
        done = [ev for ev in events(observer, "job_completed") if ev["run_id"] == run_id]
        return len(done) == 5 and events(observer, "pipeline_completed") and \
            (retained_state(observer, "diamond") or {}).get("state") == "Completed"
    wait_until(published, 10, message="events and the retained state on MQTT")
    completed = [ev for ev in events(observer, "job_completed") if ev["run_id"] == run_id]
    for ev in completed:
        assert_flat(ev)
    d_event = next(ev for ev in completed if ev["job"] == "d")
    assert d_event["result_label"] == "d" and d_event["result_inputs"] == "b, c"
    assert isinstance(d_event["result_started"], float)  # numbers stay numbers
    state = retained_state(observer, "diamond")
    assert state is not None
    assert_flat(state)
    assert state["run_id"] == run_id and state["jobs_done"] == 5 and state["jobs_total"] == 5
    assert state["last_result"] == "Completed"


def test_failed_job_fails_its_dependents_and_the_pipeline(fabric: Fabric,
                                                          observer: Observer) -> None:
    logs = log_dir(fabric)
    args = toml_string(logs)
    path = write_pipelines(fabric, f"""
tasks = ["stamp", "boom"]
[pipelines.fragile.jobs.ok]
task = "stamp"
args = [{args}, "ok"]
[pipelines.fragile.jobs.bad]
task = "boom"
args = [{args}, "bad"]
retries = 1
[pipelines.fragile.jobs.after]
task = "stamp"
args = [{args}, "after"]
depends_on = ["bad"]
[pipelines.fragile.jobs.aside]
task = "stamp"
args = [{args}, "aside"]
depends_on = ["ok"]
""")
    fabric.master("--pipelines", str(path))  # the master's default --max-attempts (3)
    fabric.node("n1", "--capacity", "2", *NODE_TASKS)
    fabric.node("n2", "--capacity", "2", *NODE_TASKS)
    with fabric.client() as client:
        wait_nodes(client, 2)
        run_id = client.query("pipelines", {"op": "run", "name": "fragile"})["run_id"]
        run = wait_run(client, "fragile", run_id, ("Completed", "Failed"))

    assert run["state"] == "Failed" and "bad" in run["error"]
    jobs = jobs_of(run)
    assert (jobs["bad"]["state"], jobs["bad"]["attempts"]) == ("Failed", 2)
    assert "failed on purpose" in jobs["bad"]["error"]
    assert jobs["after"]["state"] == "Failed"
    assert "dependency 'bad' failed" in jobs["after"]["error"]
    assert jobs["ok"]["state"] == jobs["aside"]["state"] == "Completed"
    ran = executions(logs)
    # one budget: 1 + retries runs of `bad` in all, not (1 + retries) x --max-attempts
    assert sorted(ran) == ["aside", "bad", "bad", "ok"]

    text = cli_ok(fabric, "history", "fragile")
    assert run_id in text and "Failed" in text
    assert "failed on purpose" in text and "dependency 'bad' failed" in text

    def published() -> bool:
        return len(events(observer, "job_failed")) == 2 and events(observer, "pipeline_failed") \
            and (retained_state(observer, "fragile") or {}).get("state") == "Failed"
    wait_until(published, 10, message="failure events and the retained Failed state")
    failed = {ev["job"]: ev for ev in events(observer, "job_failed")}
    assert "failed on purpose" in failed["bad"]["error"] and failed["bad"]["attempts"] == 2
    assert "dependency 'bad' failed" in failed["after"]["error"]
    retrying = events(observer, "job_retrying")
    assert [(ev["job"], ev["retries_left"]) for ev in retrying] == [("bad", 1)]
    pipeline_failed = events(observer, "pipeline_failed")[0]
    assert pipeline_failed["run_id"] == run_id and pipeline_failed["state"] == "Failed"
    for ev in (*failed.values(), pipeline_failed):
        assert_flat(ev)
    state = retained_state(observer, "fragile")
    assert state is not None
    assert (state["state"], state["last_result"], state["jobs_failed"]) == ("Failed", "Failed", 2)


FLAKY = '''
from pathlib import Path

def flaky(log_dir, label, **kwargs):
    """Fails on its first run, succeeds on the next ones."""
    log = Path(log_dir) / "executions.log"
    with open(log, "a") as f:
        f.write(label + "\\n")
    if log.read_text().split().count(label) < 2:
        raise RuntimeError(f"{label}: a transient fault")
    return "recovered"
'''


def test_a_transient_fault_and_a_lost_node_each_take_one_retry_of_the_budget(
        fabric: Fabric, monkeypatch: pytest.MonkeyPatch) -> None:
    modules = fabric.tmp / "modules"
    modules.mkdir()
    (modules / "flakytasks.py").write_text(FLAKY)
    monkeypatch.setenv("PYTHONPATH", str(modules))
    logs = log_dir(fabric)
    gate = fabric.tmp / "gate"
    args = toml_string(logs)
    path = write_pipelines(fabric, f"""
tasks = ["stamp", "flaky"]
[pipelines.transient.jobs.flaky]
task = "flaky"
args = [{args}, "flaky"]
retries = 1
[pipelines.lost.jobs.held]
task = "stamp"
args = [{args}, "held"]
kwargs = {{ gate = {toml_string(gate)} }}
retries = 1
""")
    tasks = [*NODE_TASKS, "--task", "flakytasks:flaky"]
    fabric.master("--pipelines", str(path))
    first = fabric.node("n1", "--capacity", "1", "--prefetch", "0", *tasks)
    with fabric.client() as client:
        wait_nodes(client, 1)
        run_id = client.query("pipelines", {"op": "run", "name": "transient"})["run_id"]
        run = wait_run(client, "transient", run_id, ("Completed", "Failed"))
        assert run["state"] == "Completed", run
        assert (jobs_of(run)["flaky"]["attempts"], jobs_of(run)["flaky"]["result"]) == \
            (2, "recovered")
        assert executions(logs).count("flaky") == 2  # ran again, did not answer from a cache

        lost = client.query("pipelines", {"op": "run", "name": "lost"})["run_id"]
        wait_until((logs / "held.start").exists, BOUND, message="the job running on n1")
        fabric.node("n2", "--capacity", "1", "--prefetch", "0", *tasks)
        wait_until(lambda: any(n["node_id"] == "n2" and n["status"] == "ready"
                               for n in client.nodes()), 20, message="n2 ready")
        first.kill()  # the node dies mid-job: that run is one of the job's two
        gate.touch()
        run = wait_run(client, "lost", lost, ("Completed", "Failed"))
    assert run["state"] == "Completed", run
    assert jobs_of(run)["held"]["attempts"] == 2
    assert executions(logs).count("held") == 2


def test_master_killed_mid_run_continues_it_without_rerunning_jobs(fabric: Fabric) -> None:
    logs = log_dir(fabric)
    gate = fabric.tmp / "gate"
    args = toml_string(logs)
    path = write_pipelines(fabric, f"""
tasks = ["stamp"]
[pipelines.long.jobs.first]
task = "stamp"
args = [{args}, "first"]
[pipelines.long.jobs.second]
task = "stamp"
args = [{args}, "second"]
kwargs = {{ gate = {toml_string(gate)} }}
depends_on = ["first"]
[pipelines.long.jobs.third]
task = "stamp"
args = [{args}, "third"]
depends_on = ["second"]
""")
    master = fabric.master("--pipelines", str(path))
    fabric.node("n1", "--capacity", "1", *NODE_TASKS)
    with fabric.client() as client:
        wait_nodes(client, 1)
        run_id = client.query("pipelines", {"op": "run", "name": "long"})["run_id"]
        wait_until((logs / "second.start").exists, BOUND, message="second job running")
    master.kill()  # kill -9: `first` completed, `second` in flight on the node

    fabric.master("--pipelines", str(path))
    gate.touch()
    with fabric.client() as client:
        run = wait_run(client, "long", run_id, ("Completed", "Failed"))
        runs = history(client, "long")

    assert run["state"] == "Completed", run
    assert [r["run_id"] for r in runs] == [run_id]  # the same run went on; no new one
    assert sorted(executions(logs)) == ["first", "second", "third"]  # nothing ran twice
    assert jobs_of(run)["third"]["result"]["inputs"] == ["second"]


def test_cli_lists_pauses_and_resumes(fabric: Fabric) -> None:
    logs = log_dir(fabric)
    gate = fabric.tmp / "gate"
    args = toml_string(logs)
    path = write_pipelines(fabric, f"""
tasks = ["stamp"]
[pipelines.steps]
schedule = "1h"
[pipelines.steps.jobs.one]
task = "stamp"
args = [{args}, "one"]
kwargs = {{ gate = {toml_string(gate)} }}
[pipelines.steps.jobs.two]
task = "stamp"
args = [{args}, "two"]
depends_on = ["one"]
[pipelines.other.jobs.only]
task = "noop"
""")
    fabric.master("--pipelines", str(path))
    fabric.node("n1", "--capacity", "1", *NODE_TASKS)

    table = cli_ok(fabric, "list").splitlines()
    assert table[0].split()[:2] == ["PIPELINE", "STATE"]
    rows = {line.split()[0]: line for line in table[2:]}
    assert set(rows) == {"steps", "other"}
    assert "Scheduled" in rows["steps"] and re.search(r"in (59|60)m", rows["steps"])  # 1h

    with fabric.client() as client:
        wait_nodes(client, 1)
        run_id = json.loads(cli_ok(fabric, "run", "steps", "--json"))["run_id"]
        wait_until((logs / "one.start").exists, BOUND, message="job one running")
        assert "pipeline steps is Paused" in cli_ok(fabric, "pause", "steps")
        refused = cli(fabric, "run", "steps")
        assert refused.returncode != 0 and "paused" in refused.stderr

        gate.touch()  # `one` finishes; `two` must not start while paused
        run = wait_run(client, "steps", run_id, ("Paused",))
        assert [(j["job"], j["state"], j["attempts"]) for j in run["jobs"]] == \
            [("one", "Completed", 1), ("two", "Pending", 0)]
        assert executions(logs) == ["one"]
        listed = {s["pipeline"]: s for s in json.loads(cli_ok(fabric, "list", "--json"))}
        assert listed["steps"]["state"] == "Paused" and listed["steps"]["jobs_done"] == 1
        assert listed["steps"]["next_run_at"] is None  # no schedule fires while paused

        resumed = cli_ok(fabric, "resume", "steps")
        assert f"run {run_id} continues" in resumed
        run = wait_run(client, "steps", run_id, ("Completed",))
    assert executions(logs) == ["one", "two"]
    rows = {line.split()[0]: line for line in cli_ok(fabric, "list").splitlines()[2:]}
    assert "Completed" in rows["steps"]

    unknown = cli(fabric, "history", "nope")
    assert unknown.returncode == 2
    assert "no pipeline called 'nope'" in unknown.stderr and "steps" in unknown.stderr


def test_cli_says_how_to_give_pipelines_to_a_master_that_has_none(fabric: Fabric) -> None:
    fabric.master()
    text = cli_ok(fabric, "list")
    assert "no pipelines" in text and "--pipelines FILE" in text and "submit FILE" in text


# -- validation, before anything starts -----------------------------------------------------------

BAD_FILES = [
    ("""[pipelines.etl.jobs.extract]\ntask = "echo"\n[pipelines.etl.jobs.load]
task = "echo"\ndepends_on = ["extrac"]\n""",
     "pipelines.etl.jobs.load.depends_on: unknown job 'extrac'"),
    ("""[pipelines.etl.jobs.load]\ntask = "load_rows"\n""",
     "pipelines.etl.jobs.load.task: unknown task 'load_rows'"),
    ("""tasks = ["load_rows"]\n[pipelines.etl.jobs.load]\ntask = "load_rows"\npriority = 11\n""",
     "pipelines.etl.jobs.load.priority: must be an integer 1-10"),
    ("""tasks = "load_rows"\n[pipelines.etl.jobs.load]\ntask = "load_rows"\n""",
     "tasks: must be an array of task names"),
]


@pytest.mark.parametrize("text, message", BAD_FILES)
def test_serve_refuses_an_invalid_pipelines_file(tmp_path: Path, text: str,
                                                 message: str) -> None:
    path = tmp_path / "pipelines.toml"
    path.write_text(text)
    # nothing listens on port 9: the file must be refused before any connection is tried
    proc = Proc([sys.executable, "-m", "master.cli", "serve", "--broker", "mqtt://127.0.0.1:9",
                 "--state", str(tmp_path / "state"), "--pipelines", str(path)],
                tmp_path / "serve.log")
    try:
        code = proc.popen.wait(30)
    finally:
        proc.cleanup()
    assert code != 0
    assert message in proc.output() and str(path) in proc.output()


def test_declared_user_tasks_are_accepted_and_the_example_file_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('tasks = ["load_rows"]\n[pipelines.etl.jobs.load]\ntask = "load_rows"\n')
    assert load_pipeline_file(path).configs[0].jobs[0].task == "load_rows"
    example = load_pipeline_file(REPO / "examples" / "pipelines.toml")
    assert example.configs and example.known_tasks >= {"echo", "primes"}
    with pytest.raises(PipelineConfigError) as failure:
        path.write_text('[pipelines.etl.jobs.load]\ntask = "echo"\nretries = -1\n')
        load_pipeline_file(path)
    assert (failure.value.pipeline, failure.value.job, failure.value.field) == \
        ("etl", "load", "retries")


def test_flat_json_reads_well_in_mqtt_explorer() -> None:
    flat = flat_json({"job": "d", "result": {"rows": 3, "by.region": {"eu": 1.5}},
                      "jobs": ["a", "b"], "blob": b"\x00" * 10, "big": 2 ** 70,
                      "text": "x" * 1000, "nan": float("nan"), "nested": [{"a": 1}]})
    assert flat["result_rows"] == 3 and flat["result_by_region_eu"] == 1.5
    assert (flat["jobs"], flat["jobs_count"]) == ("a, b", 2)
    assert flat["blob"] == "<10 bytes>" and flat["big"] == str(2 ** 70)
    assert len(flat["text"]) == 300 and flat["nan"] == "nan"
    assert flat["nested"] == '[{"a":1}]'
    assert_flat(flat)
    many = flat_json({f"k{i}": i for i in range(100)}, max_keys=10)
    assert len(many) == 11 and many["keys_dropped"] == 90


# -- the bridge in process, against a stand-in master ---------------------------------------------

class StandInMaster:
    """What the service uses of MasterNodeTransport, with the master's lock made visible:
    `submit` and `outcomes` take it, as the real ones do. Tasks named `fail` fail; a task whose
    id holds one of `journalled` finished before a restart, with the value "journalled"."""

    def __init__(self, journalled: tuple[str, ...] = ()) -> None:
        self.topics = Topics("standin")
        self.lock = threading.RLock()
        self.journalled = journalled
        self.submitted: list[str | None] = []
        self.max_attempts: list[int] = []
        self.attempts = threading.Semaphore(0)
        self.queries: dict[str, Any] = {}

    def add_query(self, what: str, handler: Any) -> None:
        self.queries[what] = handler

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        pass

    def outcomes(self, ids: list[str]) -> dict[str, TaskOutcome]:
        self.attempts.release()
        with self.lock:
            return {i: TaskOutcome(id=i, state="completed", value="journalled")
                    if any(mark in i for mark in self.journalled)
                    else TaskOutcome(id=i, state="unknown")
                    for i in ids}

    def get_node_info(self) -> list[dict[str, Any]]:
        with self.lock:
            return [{"node_id": "n1", "tasks": ["user_task"]}]

    def submit(self, name: str, args: Any, kwargs: dict, *, priority: int,
               task_id: str | None, max_attempts: int) -> TaskHandle:
        with self.lock:
            self.submitted.append(task_id)
            self.max_attempts.append(max_attempts)
            handle = TaskHandle(task_id or "anonymous")
            if name == "fail":
                handle.resolve(TaskOutcome(id=handle.id, state="failed",
                                           error={"kind": "exception", "message": "no"}))
            else:
                handle.resolve(TaskOutcome(id=handle.id, state="completed", value=name))
            return handle


@pytest.fixture
def stand_in(tmp_path: Path) -> Iterator[tuple[StandInMaster, PipelineService]]:
    path = tmp_path / "p.toml"
    path.write_text("""
[pipelines.p.jobs.a]
task = "fail"
retries = 1
[pipelines.p.jobs.b]
task = "echo"
[pipelines.p.jobs.c]
task = "noop"
depends_on = ["b"]
""")
    master = StandInMaster(journalled=(":job:b:1:",))
    service = PipelineService(master=master,  # type: ignore[arg-type]
                              pipelines=load_pipeline_file(path),
                              store_path=tmp_path / "state" / "pipelines.sqlite3",
                              poll_interval=0.05, answer_timeout=2.0).start()
    yield master, service
    service.stop()


def wait_standin_run(service: PipelineService, run_id: str) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        run = service.answer({"op": "history", "name": "p"})[0]
        return run if run["run_id"] == run_id and run["state"] in ("Completed", "Failed") \
            else None
    return wait_until(ended, 10, message="the run to end")


def test_task_ids_name_run_job_and_attempt_and_finished_tasks_are_not_resubmitted(
        stand_in: tuple[StandInMaster, PipelineService]) -> None:
    master, service = stand_in
    run_id = service.answer({"op": "run", "name": "p"})["run_id"]
    run = wait_standin_run(service, run_id)
    jobs = jobs_of(run)
    assert (jobs["a"]["state"], jobs["a"]["attempts"]) == ("Failed", 2)
    assert jobs["b"]["result"] == "journalled"  # answered from the journal, not run again
    ids = sorted(master.submitted)  # type: ignore[type-var]
    assert [i.rsplit(":", 1)[0] for i in ids] == [f"{run_id}:job:a:1", f"{run_id}:job:a:2",
                                                  f"{run_id}:job:c:1"]
    assert all(re.fullmatch(r"[0-9a-f]{12}", i.rsplit(":", 1)[1]) for i in ids)
    assert master.max_attempts == [1, 1, 1]  # each attempt runs once: retries are the job's


def test_queries_answer_while_the_master_lock_is_held_by_the_query_thread(
        stand_in: tuple[StandInMaster, PipelineService]) -> None:
    master, service = stand_in
    with master.lock:  # as on the master's loop thread, which answers queries under its lock
        run_id = service.answer({"op": "run", "name": "p"})["run_id"]
        assert master.attempts.acquire(timeout=5)  # a job is now blocked on the master's lock
        running = service.answer({"op": "history", "name": "p"})[0]
        assert running["run_id"] == run_id and running["state"] == "Running"
        paused = service.answer({"op": "pause", "name": "p"})
        assert paused["state"] == "Paused"
        assert [s["state"] for s in service.answer({"op": "list"})] == ["Paused"]
    resumed = service.answer({"op": "resume", "name": "p"})
    assert resumed["state"] == "Running"
    assert wait_standin_run(service, run_id)["state"] == "Failed"
