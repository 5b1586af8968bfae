"""Batching, seen from outside: many tiny tasks share messages, a lone task is not held back,
results stay exactly-once (even when a message is lost on the way), and slow tasks are not
hoarded by one node."""

from __future__ import annotations

import sqlite3
import threading
from collections import Counter
from pathlib import Path

import msgpack

from core.mqtt import MqttSession, Will
from core.protocol import NodeStatus, ResultBatch, TaskBatch, decode_message, result_for
from core.url import parse_broker_url
from support.fabric import Fabric, Observer, wait_until


def _decode(payload: bytes) -> dict:
    return msgpack.unpackb(payload, raw=False)


def _messages(observer: Observer, topic: str) -> list[dict]:
    with observer._lock:
        payloads = [p for t, p, _retain in observer.messages if t == topic and p]
    return [_decode(p) for p in payloads]


def _result_messages(observer: Observer, root: str, node_id: str) -> list[dict]:
    return [m for m in _messages(observer, f"{root}/results/{node_id}") if m["type"] == "results"]


def _journal(fabric: Fabric, state: Path | None = None) -> dict[str, tuple[int, str]]:
    """Task id -> (state, node) as the master's journal in `state` (default: the fabric's)
    holds them, read through a connection of its own: what is committed, nothing else."""
    db = sqlite3.connect((state or fabric.state) / "master.sqlite3")
    try:
        return {i: (s, n) for i, s, n in db.execute("SELECT id, state, node FROM tasks")}
    finally:
        db.close()


def _wait_ready(client, count: int) -> None:
    wait_until(lambda: sum(n["status"] == "ready" for n in client.nodes()) >= count, 20,
               message=f"{count} ready nodes")


def test_thousand_tiny_tasks_share_messages_and_complete_once(fabric: Fabric,
                                                             observer: Observer) -> None:
    fabric.master()
    fabric.node("solo")
    root = fabric.root
    with fabric.client() as client:
        _wait_ready(client, 1)
        handles = client.submit_many([("echo", [i], {}, 5) for i in range(1000)])
        values = [h.result(timeout=60) for h in handles]
        status = client.status()
        # every result the node sent has reached the observer once the client has them all
        wait_until(lambda: sum(len(m["results"]) for m in _result_messages(observer, root, "solo"))
                   >= 1000, 20, message="results observed")
    assert values == list(range(1000))
    task_messages = [m for m in _messages(observer, f"{root}/nodes/solo/tasks")
                     if m["type"] == "tasks"]
    result_messages = _result_messages(observer, root, "solo")
    assert sum(len(m["tasks"]) for m in task_messages) == 1000
    assert len(task_messages) <= 100, f"{len(task_messages)} task messages for 1000 tasks"
    assert len(result_messages) <= 250, f"{len(result_messages)} result messages for 1000 tasks"
    sent = Counter(r["id"] for m in result_messages for r in m["results"])
    assert set(sent) == {h.id for h in handles} and set(sent.values()) == {1}  # each once
    rows = _journal(fabric)
    assert len(rows) == 1000 and {s for s, _n in rows.values()} == {2}
    assert status["completed"] == 1000 and status["duplicates"] == 0


def test_a_lone_task_travels_alone_and_is_not_held_back(fabric: Fabric, observer: Observer) -> None:
    fabric.master()
    fabric.node("quiet")
    with fabric.client() as client:
        _wait_ready(client, 1)
        client.submit_many([("noop", [], {}, 5) for _ in range(300)])  # a burst first
        wait_until(lambda: client.status()["completed"] >= 300, 30, message="burst done")
        handle = client.submit("echo", ["alone"])
        assert handle.result(timeout=10) == "alone"  # no batch to fill: it goes at once
    lone = [m for m in _messages(observer, f"{fabric.root}/nodes/quiet/tasks")
            if m["type"] == "tasks" and any(t["id"] == handle.id for t in m["tasks"])]
    assert len(lone) == 1 and len(lone[0]["tasks"]) == 1


def test_outcomes_given_in_process_reach_the_journal_soon_after(fabric: Fabric,
                                                                  tmp_path: Path) -> None:
    """A master embedded in a program hands it outcomes before their journal commit (a crash
    would end that program too); the journal still has every one of them shortly after."""
    from master.transport import MasterNodeTransport
    fabric.node("near")
    master = MasterNodeTransport(broker_url=fabric.broker_url, root=fabric.root,
                                 state_dir=tmp_path / "embedded")
    master.start()
    try:
        wait_until(lambda: master.get_nodes_by_status("ready"), 30, message="node ready")
        handles = [master.submit("echo", [i]) for i in range(20)]
        assert [h.result(timeout=30) for h in handles] == list(range(20))
        ids = {h.id for h in handles}

        def all_completed() -> bool:
            rows = _journal(fabric, tmp_path / "embedded")
            return all(i in rows and rows[i][0] == 2 for i in ids)
        # committed by the master on its own (no stop, no other message) within its delay
        wait_until(all_completed, 5, message="20 completed rows in the journal")
    finally:
        master.stop()


def test_slow_tasks_after_tiny_ones_are_handed_back_not_hoarded(fabric: Fabric) -> None:
    """A node whose prefetch grew on tiny tasks gives back what it cannot start soon."""
    fabric.master()
    fabric.node("first")
    with fabric.client() as client:
        _wait_ready(client, 1)
        warmup = client.submit_many([("noop", [], {}, 5) for _ in range(1000)])
        for h in warmup:
            h.result(timeout=60)
        slow = client.submit_many([("sleep", [0.1], {}, 5) for _ in range(60)])
        wait_until(lambda: client.status()["completed"] >= 1001, 20, message="a slow task done")
        wait_until(lambda: all(n["in_flight"] <= 10 for n in client.nodes()), 10,
                   message="the first node holding at most a few slow tasks")
        fabric.node("second")
        for h in slow:
            assert h.result(timeout=60) == 0.1
    rows = _journal(fabric)
    workers = Counter(rows[h.id][1] for h in slow)
    assert set(workers) == {"first", "second"}, workers
    assert all(rows[h.id][0] == 2 for h in slow)


def test_a_task_lost_on_the_way_is_sent_again_and_recorded_once(fabric: Fabric) -> None:
    """A broker may drop a message (its queue for a client overflowed): a node that says it
    holds nothing while a task sent to it has no result gets that task again."""
    fabric.master()
    root, node_id = fabric.root, "forgetful"
    status_topic = f"{root}/nodes/{node_id}/status"
    received: list[list[str]] = []
    session = MqttSession(broker=parse_broker_url(fabric.broker_url), client_id=node_id,
                          will=Will(status_topic, NodeStatus(node_id, "dead").encode()))

    def on_tasks(_topic: str, payload: bytes) -> None:
        batch = decode_message(payload)
        if not isinstance(batch, TaskBatch):
            return
        received.append([t.id for t in batch.tasks])
        if len(received) > 1:  # the first batch is "lost": no answer, nothing held
            results = tuple(result_for(t, True, t.args[0]) for t in batch.tasks)
            session.publish(f"{root}/results/{node_id}",
                            ResultBatch(node_id=node_id, results=results).encode())

    session.subscribe(f"{root}/nodes/{node_id}/tasks", on_tasks)
    session.start()
    stop = threading.Event()

    def heartbeats() -> None:
        while not stop.is_set():
            session.publish(status_topic, NodeStatus(node_id, "ready", workload=0,
                                                     heartbeat=0.3, tasks="echo").encode(),
                            retain=True)
            stop.wait(0.3)

    beating = threading.Thread(target=heartbeats, daemon=True)
    beating.start()
    try:
        with fabric.client() as client:
            _wait_ready(client, 1)
            handle = client.submit("echo", ["again"])
            assert handle.result(timeout=30) == "again"
            status = client.status()
    finally:
        stop.set()
        beating.join(5)
        session.stop()
    assert received[0] == received[1] == [handle.id]
    assert status["completed"] == 1 and status["duplicates"] == 0
    assert _journal(fabric)[handle.id] == (2, node_id)
