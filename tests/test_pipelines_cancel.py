"""A pipeline job whose task is cancelled ends: the job fails saying `cancelled`, with no retry
spent (a retry would undo the cancel), its dependents fail, and the run ends Failed. After a
master restart, a job task recorded as cancelled is not submitted again."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from core.protocol import TaskOutcome
from core.topics import Topics
from master.handles import TaskHandle
from master.pipelines_bridge import PipelineService, load_pipeline_file
from support.fabric import Fabric, wait_until

BOUND = 30.0


def run_of(client: Any, name: str, run_id: str) -> dict[str, Any] | None:
    runs = {r["run_id"]: r for r in client.query("pipelines", {"op": "history", "name": name})}
    return runs.get(run_id)


def test_a_cancelled_job_task_fails_the_job_at_once_without_a_retry(fabric: Fabric) -> None:
    fabric.master()
    fabric.node("n1", "--capacity", "2")
    with fabric.client() as client:
        wait_until(lambda: any(n["status"] == "ready" for n in client.nodes()), 20,
                   message="a ready node")
        run_id = client.dispatch_pipeline({"name": "held", "jobs": {
            "slow": {"task": "sleep", "args": [60], "retries": 2},
            "after": {"task": "echo", "args": ["never"], "depends_on": ["slow"]}}})
        running = wait_until(lambda: client.tasks(state="running", name="sleep"), BOUND,
                             message="the job's task running")
        assert [v["was"] for v in client.cancel([running[0]["id"]])] == ["running"]

        run = wait_until(lambda: (r := run_of(client, "held", run_id)) is not None
                         and r["state"] in ("Completed", "Failed") and r, BOUND,
                         interval=0.1, message="the run to end")
        jobs = {job["job"]: job for job in run["jobs"]}
        assert run["state"] == "Failed" and "cancelled" in run["error"]
        assert (jobs["slow"]["state"], jobs["slow"]["attempts"]) == ("Failed", 1)
        assert "cancelled" in jobs["slow"]["error"] and running[0]["id"] in jobs["slow"]["error"]
        assert jobs["after"]["state"] == "Failed"
        assert client.tasks(name="sleep", state="running") == []  # no retry was submitted


class CancelledBeforeRestart:
    """What the service uses of the master, where every job task was cancelled before a
    restart: `outcomes` answers `cancelled`; a submission is recorded (and must not happen)."""

    def __init__(self) -> None:
        self.topics = Topics("standin")
        self.submitted: list[str | None] = []
        self.lock = threading.Lock()

    def add_query(self, what: str, handler: Any) -> None:
        pass

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        pass

    def get_node_info(self) -> list[dict[str, Any]]:
        return []

    def outcomes(self, ids: list[str]) -> dict[str, TaskOutcome]:
        return {i: TaskOutcome(id=i, state="cancelled", error={
            "kind": "cancelled", "message": "cancelled by client c1"}) for i in ids}

    def submit(self, name: str, args: Any, kwargs: dict, *, priority: int,
               task_id: str | None, max_attempts: int) -> TaskHandle:
        with self.lock:
            self.submitted.append(task_id)
        handle = TaskHandle(task_id or "anonymous")
        handle.resolve(TaskOutcome(id=handle.id, state="completed", value="ran again"))
        return handle


def test_a_job_task_recorded_cancelled_is_not_submitted_again(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[pipelines.p.jobs.a]\ntask = "echo"\nretries = 2\n')
    master = CancelledBeforeRestart()
    service = PipelineService(master=master,  # type: ignore[arg-type]
                              pipelines=load_pipeline_file(path),
                              store_path=tmp_path / "state" / "pipelines.sqlite3",
                              poll_interval=0.05, answer_timeout=2.0).start()
    try:
        run_id = service.answer({"op": "run", "name": "p"})["run_id"]

        def ended() -> dict[str, Any] | None:
            run = service.answer({"op": "history", "name": "p"})[0]
            return run if run["run_id"] == run_id and run["state"] in ("Completed", "Failed") \
                else None
        run = wait_until(ended, 10, message="the run to end")
    finally:
        service.stop()
    job = run["jobs"][0]
    assert (run["state"], job["state"], job["attempts"]) == ("Failed", "Failed", 1)
    assert "cancelled by client c1" in job["error"]
    assert master.submitted == []  # the recorded outcome was used, not a new run
