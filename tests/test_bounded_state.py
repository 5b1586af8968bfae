"""Bounded state of a long-running master: finished tasks expire after the result TTL (and
leave the journal, which stays small), counters and uptime survive a restart, and nodes gone
for too long are forgotten with their retained status cleared. The rules are pure functions
tested with a clock of their own; the rest against real brokers, masters and nodes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.errors import ConfigError
from core.protocol import MasterStatus, make_task
from master.journal import Journal
from master.rates import RateWindow
from master.retention import (NEVER, expiry_cutoff, format_duration, gone_marks,
                              nodes_to_forget, parse_duration, sweep_interval, vacuum_pages)
from master.scheduler import COMPLETED, RUNNING, TaskRecord
from support.fabric import REPO, Fabric, Observer, child_env, master_cli, wait_ready, wait_until


# -- the rules, with their clock as a parameter ---------------------------------------------------

def test_durations_are_read_as_people_write_them() -> None:
    assert parse_duration("30s", option="--x") == 30
    assert parse_duration("5m", option="--x") == 300
    assert parse_duration("24h", option="--x") == 86400
    assert parse_duration("1d12h", option="--x") == 129600
    assert parse_duration("0.5", option="--x") == 0.5
    assert parse_duration("0", option="--x") == NEVER == parse_duration("never", option="--x")
    for bad in ("", "5x", "-1", "nan", "h5", "99999999d"):
        with pytest.raises(ConfigError, match="--x"):
            parse_duration(bad, option="--x")
    assert [format_duration(s) for s in (0, 0.5, 30, 300, 86400, 90061)] == \
        ["never", "0.5s", "30s", "5m", "1d", "1d1h1m1s"]


def test_when_a_finished_task_expires() -> None:
    assert expiry_cutoff(1000.0, 0) is None  # 0: kept forever
    assert expiry_cutoff(1000.0, 60.0) == 940.0
    assert sweep_interval(86400) == 1.0 and sweep_interval(1.0) == 0.1
    assert sweep_interval(0.1) == 0.05


def test_when_a_gone_node_is_forgotten() -> None:
    marks = gone_marks({}, [("a", True), ("b", False)], now=10.0)
    assert marks == {"b": 10.0}
    marks = gone_marks(marks, [("a", False), ("b", False)], now=12.0)
    assert marks == {"a": 12.0, "b": 10.0}  # gone since first seen gone, not since the last look
    assert nodes_to_forget(marks, 14.9, after=5.0) == []
    assert nodes_to_forget(marks, 15.0, after=5.0) == ["b"]
    assert nodes_to_forget(marks, 17.0, after=5.0) == ["a", "b"]
    assert nodes_to_forget(marks, 1e9, after=0) == []  # 0: never
    # a node back alive loses its mark; one the registry dropped too
    assert gone_marks(marks, [("a", True)], now=20.0) == {}


def test_free_pages_go_back_in_bounded_steps_only_when_they_weigh() -> None:
    assert vacuum_pages(100, 1000) == 0            # few: inserts reuse them
    assert vacuum_pages(300, 10_000) == 0          # a small part of the file
    assert vacuum_pages(5000, 10_000) == 0         # half the file: kept for new rows
    assert vacuum_pages(8000, 10_000) == 512       # most of it: a bounded step
    assert vacuum_pages(300, 400) == 44            # down to the floor, not below


def test_the_rate_over_the_last_minute() -> None:
    window = RateWindow(window=60.0)
    assert window.rate(0.0, 0) == 0.0
    for t in range(1, 121):
        window.record(float(t), 10 * t)  # 10 per second throughout
    assert window.rate(120.0, 1200) == pytest.approx(10.0)
    assert window.rate(180.0, 1200) == pytest.approx(0.0, abs=0.2)  # a quiet minute later
    window.record(181.0, 5)  # the counter went back (another master's): starts again
    assert window.rate(182.0, 15) == pytest.approx(10.0)


def test_master_status_gains_fields_an_older_reader_or_writer_can_do_without() -> None:
    old = {"type": "master_status", "master_id": "m", "status": "running", "completed": 3}
    status = MasterStatus.from_dict(old)
    assert (status.cancelled, status.expired, status.uptime, status.throughput) == (0, 0, 0.0, 0.0)
    new = MasterStatus(master_id="m", status="running", cancelled=2, expired=7, uptime=12.5,
                       throughput=3.5)
    assert MasterStatus.from_dict(new.to_dict()) == new


def _finished(journal: Journal, ids: list[str], when: list[float]) -> None:
    records = [TaskRecord(spec=make_task("echo", [i], task_id=i)) for i in ids]
    journal.submitted(records, now=min(when))
    for record in records:
        record.state = COMPLETED
    for record, end in zip(records, when):
        journal.finished([(record, record.id)], now=end)


def test_the_journal_deletes_expired_tasks_oldest_first_and_gives_back_their_pages(
        tmp_path: Path) -> None:
    journal = Journal(tmp_path / "master.sqlite3")
    try:
        old = [f"old-{i}" for i in range(20_000)]
        _finished(journal, old, [100.0 + i / 1000 for i in range(len(old))])
        _finished(journal, ["young"], [500.0])
        running = TaskRecord(spec=make_task("sleep", [9], task_id="running"))
        journal.submitted([running], now=0.0)  # older than any, but not finished
        running.state = RUNNING
        journal.dispatched([running], now=0.0)
        journal.commit()
        assert journal.expire(400.0, limit=1000) == 1000  # bounded
        journal.commit()
        assert not journal.outcomes(["old-0", "old-999"])
        assert set(journal.outcomes(["old-1000", "young"])) == {"old-1000", "young"}
        assert journal.reclaim() == 0  # a few free pages: left for inserts to reuse
        before = journal.sizes()
        while journal.expire(400.0, limit=1000):
            journal.commit()
        assert set(journal.outcomes(["young", "running"])) == {"young", "running"}
        assert journal.sizes()["rows"] == 2
        reclaimed = 0
        while (pages := journal.reclaim(step=64)):
            assert pages <= 64
            reclaimed += pages
            journal.commit()
        assert reclaimed > 0 and journal.sizes()["db_bytes"] < before["db_bytes"]
    finally:
        journal.close()


# -- against real brokers, masters and nodes ------------------------------------------------------

def test_a_finished_task_expires_after_the_result_ttl(fabric: Fabric) -> None:
    fabric.master("--result-ttl", "1")
    fabric.node("n1", "--capacity", "2")
    with fabric.client() as client:
        wait_ready(client, "n1")
        # a task that runs longer than the TTL: the TTL counts from its end
        slow = client.submit("sleep", [1.5])
        assert slow.result(timeout=30) == 1.5
        assert client.result(slow.id, timeout=5) == 1.5
        task_id = master_cli(fabric, "submit", "echo", "7", "--no-wait").stdout.strip()
        done = master_cli(fabric, "result", task_id, "--wait", "--timeout", "30")
        assert (done.returncode, done.stdout.strip()) == (0, "7"), done.stderr
        ended = time.monotonic()

        gone = wait_until(lambda: (r := master_cli(fabric, "result", task_id)).returncode == 2 and r,
                          15, message="the result expired")
        assert time.monotonic() - ended >= 0.5  # not before its TTL
        assert f"no task with id {task_id!r}" in gone.stderr and "expired" in gone.stderr
        with pytest.raises(ConfigError, match="expired"):
            client.result(task_id, timeout=5)
        wait_until(lambda: client.status()["expired"] >= 2, 15, message="both counted expired")
        assert master_cli(fabric, "task", task_id).returncode == 2


def test_the_journal_stays_bounded_over_a_short_soak(fabric: Fabric) -> None:
    """scripts/soak_journal.py with 20,000 tasks: without expiry the journal would end with
    20,000 rows; with a 0.1 s TTL it holds a few thousand at most, none at the end."""
    run = subprocess.run([sys.executable, "scripts/soak_journal.py", "--broker", fabric.broker_url,
                          "--tasks", "20000", "--ttl", "0.1", "--window", "1000", "--every",
                          "0.2", "--json"], capture_output=True, text=True, env=child_env(),
                         cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    assert out["status"]["completed"] == 20000 and out["status"]["expired"] == 20000
    assert 0 < out["peak_rows"] <= 12000, out["samples"]
    assert out["final"]["rows"] == 0
    assert out["final"]["db_bytes"] < 4 * 2**20, out["final"]
    assert out["peak_wal_bytes"] < 48 * 2**20, out["samples"]


def test_counters_and_uptime_survive_a_restart_of_the_master(fabric: Fabric) -> None:
    master = fabric.master()
    fabric.node("n1", "--capacity", "2")
    with fabric.client() as client:
        wait_ready(client, "n1")
        assert [h.result(timeout=30) for h in client.submit_many(
            [("echo", [i], {}, 5) for i in range(5)])] == list(range(5))
        failed = client.submit("fail", ["on purpose"], max_attempts=1)
        assert failed.outcome(timeout=30).state == "failed"
        sleeper = client.submit("sleep", [30])
        wait_until(lambda: client.task(sleeper.id)["state"] == "running", 15,
                   message="the sleep running")
        assert client.cancel([sleeper.id])[0]["state"] == "cancelled"
        before = client.status()
    assert (before["completed"], before["failed"], before["cancelled"]) == (5, 1, 1)
    assert before["throughput"] > 0

    master.kill()  # kill -9: the counters were journalled with the tasks they count
    master = fabric.master()
    with fabric.client() as client:
        after = client.status()
        keys = ("completed", "failed", "cancelled", "duplicates", "rejected", "expired")
        assert {k: after[k] for k in keys} == {k: before[k] for k in keys}
        wait_until(lambda: client.status()["uptime"] >= before["uptime"] + 1.0, 15,
                   message="the uptime going on from the last run's")
        uptime = client.status()["uptime"]
    assert master.terminate() == 0
    fabric.master()
    with fabric.client() as client:
        assert client.status()["uptime"] >= uptime  # a clean stop saved it to the second
    shown = master_cli(fabric, "status")
    assert shown.returncode == 0 and "cancelled" in shown.stdout, shown.stderr
    assert "tasks/s (last minute)" in shown.stdout


def test_a_node_gone_too_long_is_forgotten_and_its_retained_status_cleared(
        fabric: Fabric, observer: Observer, tmp_path: Path) -> None:
    fabric.master("--forget-nodes-after", "1")
    ghost = fabric.node("ghost", "--task", "support.tasks:record")  # the only one with it
    fabric.node("keeper")
    topic = f"{fabric.root}/nodes/ghost/status"
    with fabric.client() as client:
        wait_ready(client, "ghost", "keeper")
        ghost.kill()  # its will says dead
        wait_until(lambda: {n["node_id"]: n["status"] for n in client.nodes()}.get("ghost")
                   == "dead", 15, message="ghost found dead")
        found_dead = time.monotonic()
        # a task waits for what only the dead node runs: the node is kept past its time
        waiting = client.submit("record", [str(tmp_path / "order"), "x"])
        wait_until(lambda: client.status()["waiting"] == 1, 10, message="the task waiting")

        def kept_past_its_time() -> bool:
            assert "ghost" in {n["node_id"] for n in client.nodes()}
            return time.monotonic() - found_dead > 2.0
        wait_until(kept_past_its_time, 10, interval=0.1, message="two seconds with ghost kept")
        client.cancel([waiting.id])
        wait_until(lambda: "ghost" not in {n["node_id"] for n in client.nodes()}, 15,
                   message="ghost forgotten")
        wait_until(lambda: observer.retained.get(topic) == b"", 10,
                   message="ghost's retained status cleared")
        assert {n["node_id"] for n in client.nodes()} == {"keeper"}  # a live node stays
    late = Observer(fabric.broker_url, fabric.root)  # what MQTT Explorer shows from now on
    try:
        wait_until(lambda: late.node_status("keeper"), 10, message="keeper's retained status")
        assert late.node_status("ghost") is None
    finally:
        late.close()


def test_expired_tasks_leave_a_standby_copy_of_the_journal_too(tmp_path: Path) -> None:
    from core.protocol import decode_message
    from core.replication import JournalDelta
    from master.journal_replication import APPLY, ChangeCapture, JournalReplica

    active_path, standby_path = tmp_path / "a" / "master.sqlite3", tmp_path / "b" / "master.sqlite3"
    journal = Journal(active_path)
    capture = ChangeCapture(active_path, epoch=1)
    replica = JournalReplica(standby_path)

    def ship() -> None:
        for prev, new, ops in capture.drain(epoch=1):
            delta = JournalDelta(master="m1", epoch=1, seq=new[1], prev_seq=prev[1],
                                 prev_epoch=prev[0], ops=tuple(ops))
            assert replica.apply(decode_message(delta.encode())) == APPLY
    try:
        _finished(journal, [f"t-{i}" for i in range(2000)], [100.0 + i for i in range(2000)])
        journal.set_meta("counters", json.dumps({"completed": 2000}))
        journal.commit()
        ship()
        assert replica.counts() == {COMPLETED: 2000}
        while journal.expire(100.0 + 1500, limit=500):  # the sweep, turn after turn
            journal.reclaim()
            journal.commit()
            ship()
        journal.commit()  # the last, empty sweep's transaction
        assert replica.counts() == {COMPLETED: 500}  # the standby deleted the same rows
        standby = Journal(standby_path)  # what a standby that takes over opens
        try:
            assert set(standby.outcomes(["t-0", "t-1499", "t-1500"])) == {"t-1500"}
            assert json.loads(standby.meta("counters")) == {"completed": 2000}
        finally:
            standby.close()
    finally:
        replica.close()
        capture.close()
        journal.close()
