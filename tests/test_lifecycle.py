"""A task's life after submission, on both brokers with a real master, nodes and CLI: its
result by id from any process, inspection with every attempt, and cancellation."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from core.errors import ConfigError, FabricError, FabricTimeout, TaskFailed
from support.fabric import Fabric, master_cli, wait_ready, wait_until

LIFE = "support.lifecycle_tasks"


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_a_result_is_read_by_id_after_its_submitter_exited(fabric: Fabric) -> None:
    fabric.master()
    fabric.node("n1", "--capacity", "2")
    with fabric.client() as client:
        wait_ready(client, "n1")
    submitted = master_cli(fabric, "submit", "echo", '{"answer": 42}', "--no-wait")
    assert submitted.returncode == 0, submitted.stderr
    task_id = submitted.stdout.strip()

    done = master_cli(fabric, "result", task_id, "--wait", "--timeout", "30")
    assert (done.returncode, json.loads(done.stdout)) == (0, {"answer": 42}), done.stderr
    done = master_cli(fabric, "result", task_id, "--json")
    outcome = json.loads(done.stdout)
    assert done.returncode == 0 and outcome["state"] == "completed"
    assert outcome["node_id"] == "n1" and outcome["value"] == {"answer": 42}

    with fabric.client() as other:  # another process's client: by id, value and handle
        assert other.result(task_id, timeout=10) == {"answer": 42}
        assert other.handle(task_id).outcome(timeout=10).state == "completed"
        # small values read back exactly, 0 among them (a single byte in the journal)
        for value in (0, 1, -1, False, "", 2**70):
            small = other.submit("echo", [value])
            assert small.result(timeout=30) == value
            assert other.result(small.id, timeout=10) == value
            assert other.task(small.id)["value"] == value
        # a task still running: the master pushes its outcome to whoever waits on it
        slow = other.submit("sleep", [1.0]).id
        with fabric.client() as third:
            with pytest.raises(FabricTimeout):
                third.outcome(slow, timeout=0.1)
            pending = master_cli(fabric, "result", slow)
            assert pending.returncode == 3 and "still" in pending.stderr
            assert third.result(slow, timeout=30) == 1.0
        failed = other.submit("fail", ["on purpose"], max_attempts=1).id
        with pytest.raises(TaskFailed, match="on purpose"):
            other.result(failed, timeout=30)
    done = master_cli(fabric, "result", failed)
    assert done.returncode == 1 and json.loads(done.stderr)["state"] == "failed"

    unknown = master_cli(fabric, "result", "no-such-task")
    assert unknown.returncode == 2 and "no task with id 'no-such-task'" in unknown.stderr
    malformed = master_cli(fabric, "result", "x" * 200)
    assert malformed.returncode == 2 and "1-128 characters" in malformed.stderr
    negative = master_cli(fabric, "result", task_id, "--wait", "--timeout", "-1")
    assert negative.returncode == 2 and "--timeout must be 0 or more" in negative.stderr


def test_tasks_are_listed_and_inspected_with_every_attempt(fabric: Fabric,
                                                          tmp_path: Path) -> None:
    fabric.master("--max-attempts", "3")
    fabric.node("solo", "--task", "support.tasks:flaky")
    with fabric.client() as client:
        wait_ready(client, "solo")
        runs = str(tmp_path / "runs")
        before = time.time()
        flaky = client.submit("flaky", [runs, 1])
        assert flaky.result(timeout=30) == 2
        echo = client.submit("echo", ["hello"], priority=7)
        assert echo.result(timeout=30) == "hello"

        info = client.task(flaky.id)
        assert (info["name"], info["args"], info["state"], info["node_id"]) == \
            ("flaky", [runs, 1], "completed", "solo")
        assert info["value"] == 2 and info["dispatches"] == 2 and info["attempts"] == 1
        first, second = info["history"]
        assert (first["attempt"], first["node_id"], first["outcome"]) == (1, "solo", "exception")
        assert "transient fault on run 1" in first["message"]
        assert (second["attempt"], second["node_id"], second["outcome"]) == (2, "solo",
                                                                              "completed")
        for attempt in (first, second):
            assert before - 1 <= attempt["started"] <= attempt["ended"] <= time.time() + 1
        assert first["ended"] <= second["started"] + 0.5

        listed = client.tasks()
        assert [t["id"] for t in listed[:2]] == [echo.id, flaky.id]  # newest first
        assert [t["id"] for t in client.tasks(name="flaky")] == [flaky.id]
        assert [t["id"] for t in client.tasks(state="completed", limit=1)] == [echo.id]
        assert client.tasks(state="failed") == []
        with pytest.raises(FabricError, match="unknown task state 'done'"):
            client.tasks(state="done")
        with pytest.raises(FabricError, match="limit must be an integer"):
            client.tasks(limit=0)
        with pytest.raises(ConfigError, match="no task with id 'nope'"):
            client.task("nope")

    table = master_cli(fabric, "tasks", "--name", "flaky")
    assert table.returncode == 0 and flaky.id in table.stdout and echo.id not in table.stdout
    as_json = json.loads(master_cli(fabric, "tasks", "--state", "completed", "--json").stdout)
    assert {t["id"] for t in as_json} == {flaky.id, echo.id}
    shown = master_cli(fabric, "task", flaky.id)
    assert shown.returncode == 0, shown.stderr
    assert "transient fault on run 1" in shown.stdout and "completed" in shown.stdout
    assert json.loads(master_cli(fabric, "task", echo.id, "--json").stdout)["priority"] == 7
    unknown = master_cli(fabric, "task", "nope")
    assert unknown.returncode == 2 and "no task with id 'nope'" in unknown.stderr
    bad = master_cli(fabric, "tasks", "--state", "done")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_cancel_a_queued_and_a_running_task(fabric: Fabric, tmp_path: Path) -> None:
    fabric.master()
    # one slot and one prefetched task: a running task, one queued on the node, one on the master
    fabric.node("n1", "--capacity", "1", "--prefetch", "1", "--task", f"{LIFE}:patient",
                "--task", "support.tasks:record")
    with fabric.client() as client:
        wait_ready(client, "n1")
        running_log = tmp_path / "running"
        running = client.submit("patient", [str(running_log)])
        wait_until(lambda: lines(running_log) == ["started"], 30, message="the task started")
        on_node = client.submit("record", [str(tmp_path / "on-node"), "ran"])
        on_master = client.submit("record", [str(tmp_path / "on-master"), "ran"])
        wait_until(lambda: client.task(on_node.id)["state"] == "running", 10,
                   message="the second task sent to the node")
        assert client.task(on_master.id)["state"] == "queued"

        verdicts = {v["id"]: v for v in client.cancel([on_node.id, on_master.id])}
        assert verdicts[on_node.id]["was"] == "running"  # sent to the node, not started there
        assert verdicts[on_master.id]["was"] == "queued"
        for handle in (on_node, on_master):
            outcome = handle.outcome(timeout=10)
            assert outcome.state == "cancelled" and outcome.error["kind"] == "cancelled"
        assert lines(running_log) == ["started"]  # the running task goes on meanwhile

        started = time.monotonic()
        done = master_cli(fabric, "cancel", running.id)
        assert done.returncode == 0 and "cancelled (it was running on node n1)" in done.stdout
        assert running.outcome(timeout=10).state == "cancelled"
        wait_until(lambda: lines(running_log) == ["started", "stopped"], 10,
                   message="the running task told to stop")
        assert time.monotonic() - started < 5
        # the slot is free again: new work runs at once
        assert client.submit("echo", ["next"]).result(timeout=10) == "next"
        assert not (tmp_path / "on-node").exists() and not (tmp_path / "on-master").exists()

        again = master_cli(fabric, "cancel", running.id, "no-such-task")
        assert again.returncode == 1
        assert f"{running.id}: already cancelled; nothing changed" in again.stdout
        assert "no-such-task: no such task" in again.stdout
        info = client.task(running.id)
        assert info["state"] == "cancelled" and info["history"][-1]["outcome"] == "cancelled"
        assert info["history"][-1]["node_id"] == "n1"
        assert {t["id"] for t in client.tasks(state="cancelled")} == {
            running.id, on_node.id, on_master.id}
        status = client.status()
        assert status["completed"] == 1 and status["failed"] == 0
        assert status["queued"] == 0 and status["in_flight"] == 0
        with pytest.raises(TaskFailed, match="cancelled"):
            client.result(running.id, timeout=5)
        with pytest.raises(FabricError, match="1-128 characters"):
            client.cancel([""])


def test_a_cancelled_task_that_ignores_it_keeps_its_slot_and_its_result_is_dropped(
        fabric: Fabric, tmp_path: Path) -> None:
    fabric.master()
    fabric.node("n1", "--capacity", "1", "--prefetch", "0", "--task", f"{LIFE}:stubborn")
    with fabric.client() as client:
        wait_ready(client, "n1")
        log = tmp_path / "stubborn"
        stubborn = client.submit("stubborn", [str(log), 1.5])
        wait_until(lambda: lines(log) == ["started"], 30, message="the task started")
        verdict, = client.cancel(stubborn.id)
        assert verdict["was"] == "running"
        assert stubborn.outcome(timeout=5).state == "cancelled"
        follower = client.submit("echo", ["after"])
        # the node is still busy with it: nothing new is sent into its slot until it returns
        assert client.task(follower.id)["state"] == "queued"
        assert follower.result(timeout=30) == "after"
        assert lines(log) == ["started", "finished"]
        # its late result changed nothing
        assert client.task(stubborn.id)["state"] == "cancelled"
        finished = master_cli(fabric, "cancel", follower.id)
        assert finished.returncode == 1 and "already completed; nothing changed" in finished.stdout
        assert client.result(follower.id, timeout=5) == "after"
        status = client.status()
        assert (status["completed"], status["failed"], status["in_flight"]) == (1, 0, 0)


def test_a_time_limit_ends_a_run_with_timeout_on_its_node(fabric: Fabric, tmp_path: Path) -> None:
    fabric.master()
    fabric.node("n1", "--capacity", "2", "--task", f"{LIFE}:patient", "--task", f"{LIFE}:stubborn",
                "--task", f"{LIFE}:bounded")
    with fabric.client() as client:
        wait_ready(client, "n1")
        assert client.submit("echo", ["quick"], timeout=5).result(timeout=30) == "quick"

        told = tmp_path / "told"  # a task that checks its context stops at the limit
        started = time.monotonic()
        outcome = client.submit("patient", [str(told)], timeout=1).outcome(timeout=30)
        assert outcome.state == "failed" and outcome.error["kind"] == "timeout"
        assert "1s limit on node n1" in outcome.error["message"]
        assert outcome.attempts == 1  # another run would not cure it
        wait_until(lambda: lines(told) == ["started", "stopped"], 10, message="told to stop")
        assert time.monotonic() - started < 10

        deaf = tmp_path / "deaf"  # one that never looks: reported at the limit, result dropped
        started = time.monotonic()
        handle = client.submit("stubborn", [str(deaf), 3.0], timeout=0.5)
        outcome = handle.outcome(timeout=30)
        assert outcome.error["kind"] == "timeout" and time.monotonic() - started < 2.5
        assert lines(deaf) == ["started"]
        wait_until(lambda: lines(deaf) == ["started", "finished"], 30, message="it returned")
        assert client.submit("echo", ["after"]).result(timeout=30) == "after"
        info = client.task(handle.id)
        assert info["state"] == "failed" and info["timeout"] == 0.5
        assert [h["outcome"] for h in info["history"]] == ["timeout"]
        status = client.status()
        assert (status["completed"], status["failed"]) == (2, 2)

        # a limit set where the task was registered holds for calls submitted without one;
        # a limit given at submit time wins over it
        outcome = client.submit("bounded", [30]).outcome(timeout=30)
        assert outcome.state == "failed" and outcome.error["kind"] == "timeout"
        assert "1s limit on node n1" in outcome.error["message"]
        assert client.submit("bounded", [1.5], timeout=10).result(timeout=30) == "slept"

    limited = master_cli(fabric, "submit", "sleep", "5", "--time-limit", "1")
    assert limited.returncode == 1 and json.loads(limited.stderr)["error"]["kind"] == "timeout"
    negative = master_cli(fabric, "submit", "sleep", "1", "--time-limit", "-1")
    assert negative.returncode == 2 and "timeout must be 0-" in negative.stderr


def test_the_master_api_cancels_inspects_and_a_cancel_survives_a_restart(
        broker_url: str, tmp_path: Path) -> None:
    from master.client import FabricClient
    from master.transport import MasterNodeTransport
    from node.transport import ComputeNodeTransport

    root = f"t{uuid.uuid4().hex[:8]}"
    state = tmp_path / "state"
    master = MasterNodeTransport(broker_url=broker_url, root=root, state_dir=state)
    master.start()
    node = ComputeNodeTransport(broker_url=broker_url, root=root, node_id="inproc", capacity=1,
                                prefetch=0, heartbeat=0.5)
    try:
        node.start()
        wait_until(lambda: "inproc" in master.get_nodes_by_status("ready"), 30,
                   message="the node ready")
        running = master.submit("sleep", [30])
        wait_until(lambda: master.task_info(running.id)["state"] == "running", 10,
                   message="the sleep dispatched")
        queued = master.submit("echo", ["never"], task_id="keep-me")
        verdicts = {v["id"]: v for v in master.cancel([running.id, "keep-me", "unheard-of"])}
        assert verdicts[running.id] == {"id": running.id, "was": "running",
                                        "state": "cancelled", "node_id": "inproc"}
        assert verdicts["keep-me"]["was"] == "queued"
        assert verdicts["unheard-of"]["was"] == "unknown"
        assert running.outcome(timeout=5).state == "cancelled"
        assert queued.outcome(timeout=5).state == "cancelled"
        # the node stopped the sleep (it waits on its context): the one slot runs new work
        assert master.submit("echo", ["next"]).result(timeout=10) == "next"
        assert {t["id"] for t in master.tasks(state="cancelled")} == {running.id, "keep-me"}
        assert master.task_info("unheard-of") is None
        assert master.scheduler.cancelled == 2 and not master.scheduler._cancelling
    finally:
        node.stop()
        master.stop()

    master = MasterNodeTransport(broker_url=broker_url, root=root, state_dir=state)
    master.start()
    try:
        info = master.task_info("keep-me")
        assert info["state"] == "cancelled" and info["error"]["kind"] == "cancelled"
        with FabricClient(broker_url=broker_url, root=root) as client:
            with pytest.raises(TaskFailed, match="cancelled"):
                client.result(running.id, timeout=10)
            # the same work submitted again under its id gets its outcome, not another run
            again = client.submit("echo", ["never"], task_id="keep-me")
            assert again.outcome(timeout=10).state == "cancelled"
        assert master.status()["queued"] == 0
    finally:
        master.stop()
