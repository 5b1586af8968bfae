"""Snapshots: the master's state and every node's report, on a timer and on demand."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from core.protocol import NodeStatus, make_task
from master.scheduler import Scheduler
from master.snapshots import (coordinator_state, expired_snapshots, next_snapshot_number,
                              snapshot_filename)
from support.fabric import Fabric, child_env, wait_until

NAME = re.compile(r"^snapshot_(\d+)_\d{8}T\d{6}Z\.json$")


# -- pure ---------------------------------------------------------------------------------------------

def test_names_number_on_from_what_is_there_and_old_ones_expire() -> None:
    name = snapshot_filename(3, 0.0)
    assert name == "snapshot_3_19700101T000000Z.json" and NAME.match(name)
    names = ["snapshot_2_20240101T000000Z.json", "snapshot_10_20240101T000100Z.json",
             "notes.txt", "snapshot_x.json", ".snapshot_11_20240101T000000Z.json.abc.tmp"]
    assert next_snapshot_number(names) == 11
    assert next_snapshot_number([]) == 1
    assert expired_snapshots(names, keep=1) == ["snapshot_2_20240101T000000Z.json"]
    assert expired_snapshots(names, keep=5) == []


def test_coordinator_state_lists_pending_in_dispatch_order_with_exact_counts() -> None:
    scheduler = Scheduler()
    scheduler.node_status(NodeStatus(node_id="n1", status="ready", capacity=1, prefetch=0), 0.0)
    for i, priority in enumerate([1, 5, 10, 5, 3]):
        scheduler.submit(make_task("echo", [i], priority=priority, task_id=f"t{i}"))
    assigned = scheduler.assign()  # t2 (priority 10) goes to n1
    assert [r.id for r in assigned["n1"]] == ["t2"]
    state = coordinator_state(scheduler, master_id="m", limit=3)
    assert [t["id"] for t in state["pending_tasks"]] == ["t1", "t3", "t4"]
    assert state["pending_tasks"][0] == {"id": "t1", "name": "echo", "priority": 5, "attempts": 0}
    assert state["pending_total"] == 4 and state["pending_listed"] == 3
    assert state["pending_by_priority"] == {"5": 2, "3": 1, "1": 1}
    assert state["in_flight"] == {"n1": {"count": 1, "tasks": ["t2"]}}
    assert state["workers"] == ["n1"] and state["nodes"][0]["node_id"] == "n1"
    json.dumps(state)  # all of it goes into a JSON file


# -- on the fabric ------------------------------------------------------------------------------------

def snapshots_in(directory: Path) -> list[Path]:
    return sorted((p for p in directory.glob("snapshot_*.json") if NAME.match(p.name)),
                  key=lambda p: int(NAME.match(p.name).group(1)))


def test_periodic_snapshots_hold_the_master_state_and_node_reports(fabric: Fabric) -> None:
    directory = fabric.tmp / "snaps"
    fabric.master("--snapshot-interval", "1", "--snapshots", str(directory))
    fabric.node("n1")
    fabric.node("n2")
    with fabric.client() as client:
        wait_until(lambda: sum(n["status"] == "ready" for n in client.nodes()) >= 2, 30,
                   message="2 ready nodes")
        for h in client.submit_many([("echo", [i], {}, 5) for i in range(20)]):
            h.result(timeout=30)

    def complete_snapshot() -> dict | None:
        for path in reversed(snapshots_in(directory)):
            data = json.loads(path.read_text())
            workers = data["workers"]
            if set(workers) == {"n1", "n2"} and data["coordinator"]["completed_tasks"] == 20 \
                    and sum(w["tasks_processed"] for w in workers.values()) == 20:
                return data
        return None
    data = wait_until(complete_snapshot, 20, message="a snapshot after the 20 tasks")
    assert data["reason"] == "periodic" and data["missing_reports"] == []
    assert data["coordinator"]["workers"] == ["n1", "n2"]
    assert data["coordinator"]["pending_total"] == 0 and data["coordinator"]["failed_tasks"] == 0
    for node_id, report in data["workers"].items():
        assert report["node_id"] == node_id and report["tasks_failed"] == 0
        assert report["held"] == []
    numbers = [int(NAME.match(p.name).group(1)) for p in snapshots_in(directory)]
    assert numbers == list(range(1, len(numbers) + 1))
    assert not list(directory.glob(".*tmp"))  # written atomically: no temp file left behind


def test_snapshot_on_demand_shows_queued_and_held_work(fabric: Fabric) -> None:
    directory = fabric.tmp / "snaps"
    fabric.master("--snapshot-interval", "0", "--snapshots", str(directory))
    fabric.node("solo", "--capacity", "1", "--prefetch", "0",
                "--task", "support.tasks:wait_for_file")
    gate = fabric.tmp / "gate"
    with fabric.client() as client:
        wait_until(lambda: any(n["status"] == "ready" for n in client.nodes()), 30,
                   message="node ready")
        blocker = client.submit("wait_for_file", [str(gate)], priority=10)
        wait_until(lambda: client.status()["in_flight"] == 1, 20, message="blocker running")
        queued = client.submit_many([("echo", [i], {}, p) for i, p in enumerate([2, 9, 5])])
        wait_until(lambda: client.status()["queued"] == 3, 10, message="3 queued")
        result = subprocess.run(
            [sys.executable, "-m", "master.cli", "snapshot", "--broker", fabric.broker_url,
             "--root", fabric.root], capture_output=True, text=True, env=child_env(), timeout=60)
        assert result.returncode == 0, result.stderr
        path = Path(result.stdout.strip())
        data = json.loads(path.read_text())
        gate.touch()
        blocker.result(timeout=30)
        for h in queued:
            h.result(timeout=30)
    assert path.parent == directory.resolve() and NAME.match(path.name)
    assert data["reason"] == "requested"
    coordinator = data["coordinator"]
    assert [(t["id"], t["priority"]) for t in coordinator["pending_tasks"]] == \
        [(queued[1].id, 9), (queued[2].id, 5), (queued[0].id, 2)]
    assert coordinator["in_flight"] == {"solo": {"count": 1, "tasks": [blocker.id]}}
    assert data["workers"]["solo"]["held"] == [blocker.id]
    assert snapshots_in(directory) == [path]  # interval 0: only the one asked for


def test_snapshot_command_without_a_master_fails_clearly(fabric: Fabric) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "master.cli", "snapshot", "--broker", fabric.broker_url,
         "--root", fabric.root, "--timeout", "1"],
        capture_output=True, text=True, env=child_env(), timeout=60)
    assert result.returncode == 2
    assert "no answer from the master" in result.stderr
