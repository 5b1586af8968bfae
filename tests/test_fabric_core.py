"""The core fabric end to end: real master and node processes on real brokers."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from support.fabric import Fabric, Observer, wait_until


def journal_rows(fabric: Fabric) -> dict[str, tuple[int, str]]:
    db = sqlite3.connect(fabric.state / "master.sqlite3")
    try:
        return {i: (s, n) for i, s, n in db.execute("SELECT id, state, node FROM tasks")}
    finally:
        db.close()


def wait_nodes_ready(client, count: int, timeout: float = 20.0) -> None:
    wait_until(lambda: sum(n["status"] == "ready" for n in client.nodes()) >= count, timeout,
               message=f"{count} ready nodes")


def test_thousand_tasks_complete_once_each(fabric: Fabric) -> None:
    fabric.master()
    fabric.node("n1", "--capacity", "2")
    fabric.node("n2", "--capacity", "2")
    with fabric.client() as client:
        wait_nodes_ready(client, 2)
        handles = client.submit_many([("echo", [i], {}, 5) for i in range(1000)])
        values = [h.result(timeout=60) for h in handles]
        status = client.status()
    assert values == list(range(1000))
    rows = journal_rows(fabric)
    assert len(rows) == 1000
    assert {state for state, _node in rows.values()} == {2}  # every one completed
    assert {node for _state, node in rows.values()} == {"n1", "n2"}  # both nodes took work
    assert status["completed"] == 1000 and status["failed"] == 0


def test_priorities_start_in_order_on_a_single_slot_node(fabric: Fabric, tmp_path: Path) -> None:
    fabric.master()
    fabric.node("solo", "--capacity", "1", "--prefetch", "0",
                "--task", "support.tasks:wait_for_file", "--task", "support.tasks:record")
    gate = tmp_path / "gate"
    log = tmp_path / "order.log"
    with fabric.client() as client:
        wait_nodes_ready(client, 1)
        blocker = client.submit("wait_for_file", [str(gate)], priority=10)
        wait_until(lambda: client.status()["in_flight"] == 1, 10, message="blocker running")
        calls = [(p, i) for i, p in enumerate([1, 5, 10, 3, 5, 8, 1, 10, 2, 5])]
        handles = client.submit_many([("record", [str(log), f"p{p}-{i}"], {}, p) for p, i in calls])
        wait_until(lambda: client.status()["queued"] == len(calls), 10, message="all queued")
        gate.touch()
        blocker.result(timeout=20)
        for h in handles:
            h.result(timeout=20)
    expected = [f"p{p}-{i}" for p, i in sorted(calls, key=lambda c: (-c[0], c[1]))]
    assert log.read_text().split() == expected


def test_killed_node_loses_no_task_and_none_is_recorded_twice(fabric: Fabric) -> None:
    fabric.master()
    victim = fabric.node("victim", "--capacity", "2")
    fabric.node("survivor", "--capacity", "2")
    with fabric.client() as client:
        wait_nodes_ready(client, 2)
        handles = client.submit_many([("sleep", [0.02], {}, 5) for _ in range(200)])
        wait_until(lambda: any(n["node_id"] == "victim" and n["tasks_done"] > 5
                               for n in client.nodes()), 30, message="victim busy")
        victim.kill()
        for h in handles:
            assert h.result(timeout=60) == 0.02
        status = client.status()
    rows = journal_rows(fabric)
    assert len(rows) == 200 and all(state == 2 for state, _ in rows.values())
    assert status["completed"] == 200


def test_frozen_node_is_found_by_heartbeat_and_its_tasks_move(fabric: Fabric,
                                                              observer: Observer) -> None:
    timeout = 2.0
    fabric.master("--node-timeout", str(timeout))
    frozen = fabric.node("frozen", "--capacity", "1")
    with fabric.client() as client:
        wait_nodes_ready(client, 1)
        handles = client.submit_many([("sleep", [0.2], {}, 5) for _ in range(4)])
        wait_until(lambda: any(n["in_flight"] for n in client.nodes()), 10, message="work held")
        frozen.signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        fabric.node("spare", "--capacity", "2")
        wait_until(lambda: (observer.node_status("frozen") or {}).get("status") == "dead",
                   timeout + 5, message="frozen node reported dead")
        detected = time.monotonic() - stopped_at
        for h in handles:
            assert h.result(timeout=30) == 0.2
        frozen.signal(signal.SIGCONT)
    assert detected <= timeout + 1.0 + 0.5  # heartbeat timeout + 1 s (+ test polling slack)


def test_master_killed_and_restarted_finishes_queued_and_in_flight_work(fabric: Fabric) -> None:
    master = fabric.master()
    fabric.node("n1", "--capacity", "2")
    with fabric.client() as client:
        wait_nodes_ready(client, 1)
        handles = client.submit_many([("sleep", [0.05], {}, 5) for _ in range(60)])
        wait_until(lambda: client.status()["completed"] >= 5, 30, message="some progress")
        master.kill()
        fabric.master()
        for h in handles:
            assert h.result(timeout=60) == 0.05
    rows = journal_rows(fabric)
    assert len(rows) == 60 and all(state == 2 for state, _ in rows.values())


def test_observer_sees_retained_status_and_dead_after_kill(fabric: Fabric, observer: Observer) -> None:
    fabric.master()
    node = fabric.node("watched")
    status = wait_until(lambda: observer.node_status("watched"), 20, message="retained status")
    assert status["status"] in ("ready", "connected")
    assert status["kind"] == "cpython" and isinstance(status["capacity"], int)
    assert all("." not in key for key in status)  # flat, dot-free keys for MQTT Explorer
    node.kill()
    wait_until(lambda: (observer.node_status("watched") or {}).get("status") == "dead", 20,
               message="dead status after kill")
    master_status = json.loads(observer.retained[f"{fabric.root}/master/status"])
    assert master_status["status"] == "running" and isinstance(master_status["queued"], int)


MALFORMED = [b"", b"\x00\x01garbage", b"{not json", b"[1,2,3]", b'{"type":"tasks","v":1}',
             b'{"type":"results","v":99}', b'{"type":"nope","v":1}',
             b'{"type":"submit","v":1,"client_id":"x","request_id":"r","tasks":[{"id":5}]}',
             b"\x81\xa4type\xa5tasks", b"x" * 100_000]


def test_malformed_payloads_are_rejected_counted_and_work_goes_on(fabric: Fabric,
                                                                  observer: Observer) -> None:
    fabric.master()
    fabric.node("tough")
    with fabric.client() as client:
        wait_nodes_ready(client, 1)
        root = fabric.root
        for topic in (f"{root}/nodes/tough/tasks", f"{root}/results/tough",
                      f"{root}/submit/{client.client_id}", f"{root}/query/{client.client_id}",
                      f"{root}/nodes/ghost/status"):
            for payload in MALFORMED:
                if payload or "status" not in topic:
                    observer.publish(topic, payload)
        assert client.submit("echo", ["still fine"]).result(timeout=20) == "still fine"
        wait_until(lambda: client.status()["rejected"] >= 20, 10, message="master rejects counted")
        wait_until(lambda: (observer.node_status("tough") or {}).get("rejected", 0) >= 8, 10,
                   message="node rejects counted in its status")
        assert client.submit("echo", [2]).result(timeout=20) == 2
