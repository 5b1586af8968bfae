"""Where a node runs its tasks (`compute-node --pool thread|process`), with a real broker,
master and node: a time limit on both pools, a cancel that kills on the process pool (its slot
free at once), and task output that never floods the node's log."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.errors import ConfigError, TaskFailed
from node import ComputeNodeTransport
from node.task_output import OutputTail
from support.fabric import REPO, Fabric, child_env, wait_until

POOL = "support.pool_tasks"
MB = 1 << 20


def ready(client, node_id: str) -> None:
    wait_until(lambda: any(n["node_id"] == node_id and n["status"] == "ready"
                           for n in client.nodes()), 30, message=f"node {node_id} ready")


def pids(path: Path) -> list[int]:
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("pool", ["thread", "process"])
def test_output_is_bounded_and_a_time_limit_ends_a_runaway_task(
        fabric: Fabric, tmp_path: Path, pool: str) -> None:
    fabric.master("--max-attempts", "1")
    node = fabric.node("n1", "--capacity", "1", "--prefetch", "0", "--pool", pool,
                       "--task", f"{POOL}:chatty", "--task", f"{POOL}:runaway",
                       "--lambda", f"{POOL}:loud")
    with fabric.client() as client:
        ready(client, "n1")
        node.wait_for_output(f"{pool} pool")
        # 10 MB printed: the node's log stays small; a failure carries the tail and the count
        assert client.submit("chatty", [10 * MB]).result(timeout=60) == 10 * MB
        with pytest.raises(TaskFailed) as failed:
            client.submit("chatty", [10 * MB, True]).result(timeout=60)
        error = failed.value.error
        assert error["kind"] == "exception" and "failed after printing" in error["message"]
        assert error["output"].endswith("the last line\n") and len(error["output"]) <= 4096
        assert error["output_bytes"] == 10 * MB + len("the last line\n")
        assert "printed 10485774 bytes; the last 4096 are kept" in node.output()
        # a lambda too: each call's output is cut to its tail where the lambda runs
        assert client.dispatch_lambda({"name": "loud", "event": {"bytes": 10 * MB}}).result(
            timeout=60) == 10 * MB
        if pool == "thread":
            assert "lambda 'loud' printed 10485783 bytes; the last 4096 follow" in node.output()
        assert node.log_path.stat().st_size < 64 * 1024

        # a task that would run 30 s, with a 1 s limit
        started = time.monotonic()
        handle = client.submit("runaway", [str(tmp_path / "runaway"), 30.0], timeout=1)
        outcome = handle.outcome(timeout=30)
        assert outcome.state == "failed" and outcome.error["kind"] == "timeout"
        assert "1s limit on node n1" in outcome.error["message"]
        assert time.monotonic() - started < 5
        if pool == "process":  # killed: the slot is free again at once
            assert "worker process was killed" in outcome.error["message"]
            assert client.submit("chatty", [0]).result(timeout=5) == 0
            assert time.monotonic() - started < 6
            killed, = pids(tmp_path / "runaway")
            assert gone(killed)


def test_the_process_pool_kills_a_cancelled_task_and_runs_lambdas(
        fabric: Fabric, tmp_path: Path) -> None:
    fabric.master("--max-attempts", "1")
    fabric.node("n1", "--capacity", "1", "--prefetch", "0", "--pool", "process",
                "--task", f"{POOL}:runaway", "--task", f"{POOL}:pid", "--task", f"{POOL}:die")
    with fabric.client() as client:
        ready(client, "n1")
        first = client.submit("pid").result(timeout=30)
        assert client.submit("pid").result(timeout=30) == first  # a worker is reused

        log = tmp_path / "runaway"
        running = client.submit("runaway", [str(log), 30.0])
        wait_until(lambda: pids(log), 30, message="the task started")
        verdict, = client.cancel(running.id)
        cancelled_at = time.monotonic()
        assert verdict["was"] == "running"
        follower = client.submit("pid")  # one slot: it can start only once the slot is free
        replacement = follower.result(timeout=10)
        freed = time.monotonic() - cancelled_at
        assert freed < 1.5, f"the slot was free {freed:.2f}s after the cancel"
        assert running.outcome(timeout=5).state == "cancelled"
        assert replacement != first and pids(log) == [first]  # killed, and replaced
        assert gone(first)
        assert client.task(running.id)["state"] == "cancelled"

        # lambdas run in the worker processes too, under their own limits
        assert client.dispatch_lambda({"name": "echo", "event": {"a": 1}}).result(
            timeout=30) == {"a": 1}
        with pytest.raises(TaskFailed) as failed:
            client.dispatch_lambda({"name": "allocate", "event": {"mb": 512},
                                    "memory": 64}).result(timeout=30)
        assert failed.value.error["kind"] == "memory"
        lambda_run = client.dispatch_lambda({"name": "sleep", "event": {"seconds": 30}})
        wait_until(lambda: client.task(lambda_run.id)["state"] == "running", 10,
                   message="the lambda running")
        client.cancel(lambda_run.id)
        assert lambda_run.outcome(timeout=5).state == "cancelled"
        assert client.submit("pid").result(timeout=10) not in (first, replacement)

        # a worker that dies on its own: the task fails `crashed`, the next one runs
        with pytest.raises(TaskFailed) as failed:
            client.submit("die").result(timeout=30)
        assert failed.value.error["kind"] == "crashed"
        assert isinstance(client.submit("pid").result(timeout=10), int)
        status = client.status()
        assert status["failed"] == 2 and status["in_flight"] == 0


def test_a_pool_is_thread_or_process() -> None:
    with pytest.raises(ConfigError, match="pool must be one of thread, process"):
        ComputeNodeTransport(node_id="n1", pool="threads")
    bad = subprocess.run([sys.executable, "-m", "node.cli", "--pool", "fork"],
                         capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=60)
    assert bad.returncode == 2 and "invalid choice: 'fork'" in bad.stderr


def test_an_output_tail_keeps_the_last_bytes_and_counts_all() -> None:
    tail = OutputTail(limit=8)
    for chunk in (b"abc", b"defghij", b"k" * 3, b"0123456789"):
        tail.feed(chunk)
    assert tail.text() == "23456789" and tail.total == 23 and tail.dropped == 15
    small = OutputTail(limit=8)
    small.feed("é!".encode())
    assert small.text() == "é!" and small.dropped == 0
