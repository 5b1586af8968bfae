"""The ESP32 node on real MicroPython (unix port, 100K heap) against real brokers.

Each board is a MicroPython process running the node's own files (boot.py, main.py, ...)
through the firmware emulation, with `network`/`machine` shims. The harness speaks the
protocol as the master does and decodes everything the board sends with core.protocol.
Every test runs against mosquitto and against the embedded broker.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path

import pytest
import sympy

sys.path.insert(0, str(Path(__file__).resolve().parent))

from core.protocol import TaskSpec  # noqa: E402
from support.brokers import BrokerHandle  # noqa: E402
from esp32_support import (Harness, boards, broker, harness, micropython,  # noqa: E402,F401
                           primes_tasks, retained_status, root, umqtt_file, wait_for)

pytestmark = pytest.mark.timeout(180)


def expected_prime_indices(numbers: list[int | str]) -> list[int]:
    return [i for i, n in enumerate(numbers) if sympy.isprime(int(n))]


def assert_quiet(h: Harness, node_id: str, seconds: float, since: float) -> None:
    """No status from node_id arrived after `since` during the next `seconds` (bounded watch)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        late = [s for s in h.status_of(node_id) if s.at > since]
        assert not late, f"status after the node froze: {late[0].raw}"
        time.sleep(0.05)


# -- registration --------------------------------------------------------------------------------

def test_node_registers_with_retained_ready_status(broker: BrokerHandle, root: str,
                                                   harness: Harness, boards) -> None:
    boards(broker, "reg-1", root)
    status = harness.wait_status("reg-1", "ready", 30).message
    assert status.kind == "micropython"
    assert status.codec == "json"
    assert status.max_payload == 8192
    assert (status.capacity, status.prefetch, status.workload) == (1, 0, 0)
    assert status.heartbeat == 0.5 and status.instance
    assert {"noop", "echo", "sleep", "primes", "lambda", "square"} <= set(status.tasks.split(","))
    assert status.ts == pytest.approx(time.time(), abs=60)

    late = retained_status(broker, root, "reg-1")  # what a master starting now would see
    assert late["status"] == "ready" and late["node_id"] == "reg-1" and late["v"] == 1
    assert late["heap_free"] > 0 and late["heap_alloc"] > 0

    count = len(harness.status_of("reg-1"))
    harness.wait(lambda: len([s for s in harness.statuses if s.message.node_id == "reg-1"])
                 >= count + 3, 10, "three heartbeats")


def test_node_id_comes_from_the_mac_unless_configured(broker: BrokerHandle, root: str,
                                                      harness: Harness, boards) -> None:
    board = boards(broker, None, root)
    assert board.node_id == f"esp32-{board.mac}"
    harness.wait_status(board.node_id, "ready", 30)


# -- work ----------------------------------------------------------------------------------------

def test_prime_shards_match_sympy(broker: BrokerHandle, root: str, harness: Harness,
                                  boards) -> None:
    boards(broker, "pr-1", root)
    harness.wait_status("pr-1", "ready", 30)
    rng = random.Random(20240601)
    shards: list[list[int | str]] = [[rng.getrandbits(64) for _ in range(100)] for _ in range(5)]
    shards.append([0, 1, 2, 3, 4, 561, 3215031751, 2**61 - 1, 2**64 - 59, 2**64 + 13, -7,
                   18446744073709551557, 3825123056546413051])
    big = [sympy.nextprime(rng.getrandbits(200)), rng.getrandbits(200) | 1,
           sympy.nextprime(2**300), 2**89 - 1, (2**89 - 1) * (2**61 - 1)]
    shards.append([str(n) for n in big])  # decimal strings, as the master sends big numbers
    tasks = primes_tasks("pr", shards)
    # One batch, then one task per message, faster than the board runs them: it hands back
    # what its queue cannot hold and the harness resends those, as the master does.
    results = harness.run("pr-1", [tasks[:3]] + [[t] for t in tasks[3:]], 60)
    for task, shard in zip(tasks, shards):
        result = results[task.id]
        assert result.ok, result.error
        assert result.value == expected_prime_indices(shard), task.id
        assert result.ts == pytest.approx(time.time(), abs=60)


def test_shard_round_trip(broker: BrokerHandle, root: str, harness: Harness, boards,
                          record_property) -> None:
    """Publish → result for one shard of 100 64-bit numbers, one at a time (p50 reported)."""
    boards(broker, "rt-1", root)
    harness.wait_status("rt-1", "ready", 30)
    rng = random.Random(5)
    times = []
    for i in range(25):
        shard = [rng.getrandbits(64) for _ in range(100)]
        task = TaskSpec(id=f"rt-{i}", name="primes", args=[shard])
        sent = harness.send("rt-1", [task])
        harness.wait_results([task.id], 20)
        arrived, result = harness.results("rt-1")[task.id]
        assert result.value == expected_prime_indices(shard)
        times.append(arrived - sent)
    p50 = statistics.median(times)
    record_property("shard_rtt_p50_ms", round(p50 * 1000, 2))
    record_property("shard_rtt_max_ms", round(max(times) * 1000, 2))
    print(f"{broker.kind}: shard of 100 x 64-bit, publish -> result: p50 {p50 * 1000:.1f} ms, "
          f"max {max(times) * 1000:.1f} ms")
    assert p50 < 1.0


def test_builtins_and_lambdas(broker: BrokerHandle, root: str, harness: Harness, boards) -> None:
    boards(broker, "bl-1", root)
    harness.wait_status("bl-1", "ready", 30)
    tasks = [
        TaskSpec(id="noop", name="noop"),
        TaskSpec(id="echo", name="echo", args=[{"a": [1, 2, "x"], "b": None}]),
        TaskSpec(id="sleep", name="sleep", args=[0.2]),
        TaskSpec(id="sq", name="lambda", kwargs={"name": "square", "event": 12}),
        TaskSpec(id="sum", name="sum", kwargs={"event": [1, 2, 3, 2**70]}),
        TaskSpec(id="wc", name="lambda", kwargs={"name": "word_count", "event": "a b a"}),
        TaskSpec(id="heap", name="lambda", kwargs={"name": "heap"}),
        TaskSpec(id="no-lambda", name="lambda", kwargs={"name": "missing"}),
        TaskSpec(id="no-task", name="does_not_exist"),
        TaskSpec(id="raises", name="lambda", kwargs={"name": "square", "event": "x"}),
    ]
    for part in (tasks[:5], tasks[5:]):  # the board holds 8 tasks at most
        harness.send("bl-1", part)
        harness.wait_results([t.id for t in part], 30)
    r = harness.wait_results([t.id for t in tasks], 1)
    assert r["noop"].ok and r["noop"].value is None
    assert r["echo"].value == {"a": [1, 2, "x"], "b": None}
    assert r["sleep"].value == 0.2
    assert r["sq"].value == 144
    assert r["sum"].value == 6 + 2**70
    assert r["wc"].value == {"a": 2, "b": 1}
    assert r["heap"].value["free"] > 0
    assert r["no-lambda"].error["kind"] == "unknown_lambda"
    assert r["no-task"].error["kind"] == "unknown_task"
    assert r["raises"].error["kind"] == "exception" and r["raises"].error["type"] == "TypeError"


# -- the queue -----------------------------------------------------------------------------------

def test_priority_order_on_the_board(broker: BrokerHandle, root: str, harness: Harness,
                                     boards) -> None:
    boards(broker, "pq-1", root)
    harness.wait_status("pq-1", "ready", 30)
    prios = [("a1", 1), ("a5", 5), ("a10", 10), ("b5", 5), ("a3", 3), ("b10", 10), ("c5", 5)]
    harness.send("pq-1", [TaskSpec(id=i, name="echo", args=[i], priority=p) for i, p in prios])
    harness.wait_results([i for i, _ in prios], 20)
    assert harness.result_order("pq-1") == ["a10", "b10", "a5", "b5", "c5", "a3", "a1"]
    stamps = [harness.results("pq-1")[i][1].ts
              for i in ["a10", "b10", "a5", "b5", "c5", "a3", "a1"]]
    assert stamps == sorted(stamps)


def test_full_queue_hands_back_the_least_urgent(broker: BrokerHandle, root: str, harness: Harness,
                                               boards) -> None:
    boards(broker, "hb-1", root, QUEUE_SIZE=8)
    harness.wait_status("hb-1", "ready", 30)
    tasks = [TaskSpec(id=f"q{i}", name="echo", args=[i], priority=5) for i in range(8)]
    tasks.append(TaskSpec(id="low", name="echo", args=["low"], priority=1))
    tasks.append(TaskSpec(id="high", name="echo", args=["high"], priority=9))
    harness.send("hb-1", tasks)
    kept = [f"q{i}" for i in range(7)] + ["high"]
    harness.wait_results(kept, 20)
    harness.wait(lambda: len(harness.released("hb-1")) >= 2, 10, "hand-backs")
    assert sorted(harness.released("hb-1")) == ["low", "q7"]
    assert harness.result_order("hb-1")[0] == "high"
    assert "q7" not in harness.results("hb-1") and "low" not in harness.results("hb-1")


def test_batches_the_heap_cannot_hold_are_handed_back(broker: BrokerHandle, root: str,
                                                      harness: Harness, boards) -> None:
    """Full-size shards sent faster than the board runs them (as a master ignoring its
    credit would): none is lost, each is run or handed back, and resending completes all."""
    boards(broker, "full-1", root)
    harness.wait_status("full-1", "ready", 30)
    rng = random.Random(8)
    shards = [[rng.getrandbits(64) for _ in range(380)] for _ in range(4)]  # ~7.9 KB each
    tasks = primes_tasks("full", shards)
    results = harness.run("full-1", [[t] for t in tasks], 60)
    for task, shard in zip(tasks, shards):
        assert results[task.id].value == expected_prime_indices(shard)
    assert harness.released("full-1")  # the board said what it could not hold
    state = harness.snapshot("full-1")
    assert state["tasks_processed"] == len(tasks)


def test_duplicates_are_not_run_twice(broker: BrokerHandle, root: str, harness: Harness,
                                      boards) -> None:
    boards(broker, "dup-1", root)
    harness.wait_status("dup-1", "ready", 30)
    harness.send("dup-1", [TaskSpec(id="d1", name="echo", args=["one"])])
    harness.wait_results(["d1"], 15)
    harness.send("dup-1", [TaskSpec(id="d1", name="echo", args=["one"])])  # completed: resent
    harness.wait(lambda: harness.result_order("dup-1").count("d1") == 2, 15, "cached result")
    slow = TaskSpec(id="d2", name="sleep", args=[1.0])
    harness.send("dup-1", [slow, slow])  # twice in one batch
    harness.send("dup-1", [slow])        # again: held (dropped) or done (cached result resent)
    harness.wait_results(["d2"], 15)
    state = harness.snapshot("dup-1")
    assert state["tasks_processed"] == 2
    assert state["duplicates"] == 3
    for task_id in ("d1", "d2"):
        with harness.cond:
            sent = [r for seen in harness.batches for r in seen.message.results if r.id == task_id]
        assert len({(r.ts, repr(r.value)) for r in sent}) == 1  # one run, maybe sent twice


# -- bad input -----------------------------------------------------------------------------------

HOG_LAMBDAS = '''
def hog(event, context):
    return len(bytearray(event))

def boom(event, context):
    raise ValueError("no")

LAMBDAS = {"hog": hog, "boom": boom}
'''


def test_bad_messages_are_answered_or_counted(broker: BrokerHandle, root: str, harness: Harness,
                                              boards) -> None:
    board = boards(broker, "bad-1", root, files={"lambdas.py": HOG_LAMBDAS})
    harness.wait_status("bad-1", "ready", 30)
    counted = [
        b"not json",
        b"[1, 2]",
        b'{"type": "tasks", "v": 2, "tasks": []}',
        b'{"type": "tasks", "v": true, "tasks": []}',
        b'{"type": "tasks", "v": 1, "tasks": "x"}',
        b'{"type": "tasks", "v": 1, "tasks": [5, {"id": 7, "name": "echo"}, {"name": "echo"}]}',
        b'{"type": "control", "v": 1, "command": "reboot"}',
        b'{"type": "whatever", "v": 1}',
        b'\xff\xfe',
        b'{"type": "tasks", "v": 1, "tasks": [{"id": "' + b"x" * 200 + b'", "name": "echo"}]}',
    ]
    rejected = len(counted) + 2  # the list of three bad tasks counts each one
    for payload in counted:
        harness.send_raw("bad-1", payload)
    oversized = TaskSpec(id="too-big", name="echo", args=["y" * 20000])
    harness.send("bad-1", [oversized])  # longer than max_payload: drained unread, counted
    rejected += 1
    answered = [
        TaskSpec(id="plain", name="echo"),
        TaskSpec(id="p-float", name="primes", args=[[7, 1.5]]),
        TaskSpec(id="p-text", name="primes", args=[["12a"]]),
        TaskSpec(id="p-shape", name="primes", args=["not a list"]),
        TaskSpec(id="p-none", name="primes"),
        TaskSpec(id="nap-long", name="sleep", args=[10**6]),
        TaskSpec(id="hog", name="hog", kwargs={"event": 400_000}),
        TaskSpec(id="boom", name="lambda", kwargs={"name": "boom", "event": 1}),
        TaskSpec(id="unknown", name="nope"),
    ]
    for part in (answered[:5], answered[5:]):  # the board holds 8 tasks at most
        harness.send("bad-1", part)
        harness.wait_results([t.id for t in part], 30)
    harness.send_raw("bad-1", b'{"type": "tasks", "v": 1, "tasks": ['
                     b'{"id": "t-prio", "name": "echo", "priority": 11},'
                     b'{"id": "t-args", "name": "echo", "args": "x"},'
                     b'{"id": "t-kwargs", "name": "echo", "kwargs": []},'
                     b'{"id": "t-name", "name": 5}]}')
    ids = [t.id for t in answered] + ["t-prio", "t-args", "t-kwargs", "t-name"]
    results = harness.wait_results(ids, 30)
    kinds = {i: results[i].error["kind"] for i in ids if not results[i].ok}
    assert results["plain"].ok and results["plain"].value is None  # echo without args
    assert kinds == {"p-float": "bad_request", "p-text": "bad_request", "p-shape": "bad_request",
                     "p-none": "bad_request", "nap-long": "bad_request", "hog": "memory",
                     "boom": "exception", "unknown": "unknown_task", "t-prio": "bad_request",
                     "t-args": "bad_request", "t-kwargs": "bad_request", "t-name": "bad_request"}
    assert results["boom"].error["type"] == "ValueError"
    assert "too-big" not in harness.results("bad-1")

    # A batch stamped with a lease while no lease is held is refused and handed back.
    harness.send("bad-1", [TaskSpec(id="e3", name="echo", args=[3])], epoch=3)
    rejected += 1
    harness.wait(lambda: "e3" in harness.released("bad-1"), 15, "e3 handed back")

    harness.send("bad-1", [TaskSpec(id="after", name="echo", args=["alive"])])
    assert harness.wait_results(["after"], 15)["after"].value == "alive"
    state = harness.snapshot("bad-1")
    assert state["rejected"] == rejected
    assert "e3" not in harness.results("bad-1")
    assert board.running()
    assert not harness.undecodable
    status = harness.wait(lambda: next((s for s in reversed(harness.statuses)
                                        if s.message.node_id == "bad-1"
                                        and s.message.rejected == rejected), None),
                          10, "rejected count in a heartbeat").message
    assert status.status == "ready"


# -- faults --------------------------------------------------------------------------------------

def test_sigkill_makes_the_broker_publish_dead(broker: BrokerHandle, root: str, harness: Harness,
                                               boards) -> None:
    board = boards(broker, "kill-1", root)
    ready = harness.wait_status("kill-1", "ready", 30)
    board.kill()
    dead = harness.wait_status("kill-1", "dead", 15, after=ready.at).message
    assert dead.kind == "micropython" and dead.instance == ready.message.instance
    assert retained_status(broker, root, "kill-1")["status"] == "dead"


def test_sigstop_stops_heartbeats(broker: BrokerHandle, root: str, harness: Harness,
                                  boards) -> None:
    board = boards(broker, "stop-1", root, MQTT_KEEPALIVE=4)
    harness.wait_status("stop-1", "ready", 30)
    harness.wait(lambda: len(harness.status_of("stop-1")) >= 3, 10, "heartbeats")
    board.sigstop()
    frozen = time.monotonic() + 0.3  # a heartbeat already on its way may still land
    assert_quiet(harness, "stop-1", 3.0, since=frozen)
    # Both brokers drop a client silent for 1.5 x keepalive (6 s) and send its will.
    dead = harness.wait_status("stop-1", "dead", 10, after=frozen)
    assert dead.message.instance == harness.status_of("stop-1")[0].message.instance
    board.sigcont()
    after = time.monotonic()
    harness.wait_status("stop-1", "ready", 30, after=after)
    harness.send("stop-1", [TaskSpec(id="awake", name="echo", args=["again"])])
    assert harness.wait_results(["awake"], 20)["awake"].value == "again"


def test_wifi_drop_reconnects_and_results_keep_flowing(broker: BrokerHandle, root: str,
                                                       harness: Harness, boards) -> None:
    board = boards(broker, "wifi-1", root)
    ready = harness.wait_status("wifi-1", "ready", 30)
    harness.send("wifi-1", [TaskSpec(id="w0", name="echo", args=[0])])
    harness.wait_results(["w0"], 15)
    held = [TaskSpec(id="w-slow", name="sleep", args=[1.0], priority=9),
            TaskSpec(id="w1", name="echo", args=[1]), TaskSpec(id="w2", name="echo", args=[2])]
    harness.send("wifi-1", held)
    harness.wait(lambda: any(s.message.node_id == "wifi-1" and s.message.workload >= 3
                             for s in harness.statuses), 10, "the board running the slow task")
    board.wifi(False)
    dead = harness.wait_status("wifi-1", "dead", 20, after=ready.at)
    assert_quiet(harness, "wifi-1", 1.5, since=dead.at)  # offline while the AP is away
    board.wifi(True)
    back = harness.wait_status("wifi-1", "ready", 30, after=dead.at)
    assert back.message.instance == ready.message.instance  # same boot, new session
    results = harness.wait_results(["w-slow", "w1", "w2"], 20)  # held through the drop
    assert [results[i].value for i in ("w-slow", "w1", "w2")] == [1.0, 1, 2]
    tasks = primes_tasks("after", [[2**61 - 1, 10, 13]])
    harness.send("wifi-1", tasks)
    assert harness.wait_results(["after-0"], 20)["after-0"].value == [0, 2]
    assert harness.snapshot("wifi-1")["reconnects"] >= 2


def test_clean_stop_hands_back_and_says_offline(broker: BrokerHandle, root: str, harness: Harness,
                                                boards) -> None:
    board = boards(broker, "off-1", root)
    ready = harness.wait_status("off-1", "ready", 30)
    harness.send("off-1", [TaskSpec(id="first", name="echo", args=[0], priority=10),
                           TaskSpec(id="s-run", name="sleep", args=[5], priority=9)]
                 + [TaskSpec(id=f"s{i}", name="echo", args=[i]) for i in range(3)])
    harness.wait_results(["first"], 15)  # sent just before the sleep starts
    first_at = harness.results("off-1")["first"][0]
    harness.wait(lambda: any(s.message.node_id == "off-1" and s.message.workload == 4
                             and s.at > first_at + 0.3 for s in harness.statuses),
                 10, "a heartbeat from inside the sleep")
    assert board.stop() == 0
    offline = harness.wait_status("off-1", "offline", 15, after=ready.at)
    assert sorted(harness.released("off-1")) == ["s-run", "s0", "s1", "s2"]
    assert not [s for s in harness.status_of("off-1")
                if s.message.status == "dead" and s.at >= offline.at]
    assert retained_status(broker, root, "off-1")["status"] == "offline"


# -- the heap ------------------------------------------------------------------------------------

def test_heap_under_load(broker: BrokerHandle, root: str, harness: Harness, boards,
                         record_property) -> None:
    """Full-size batches, big numbers, oversized messages: the board stays up, heap reported."""
    boards(broker, "heap-1", root)
    harness.wait_status("heap-1", "ready", 30)
    rng = random.Random(11)
    ids = []
    for round_ in range(12):
        shards = [[rng.getrandbits(64) for _ in range(100)] for _ in range(3)]  # ~6.4 KB batch
        tasks = primes_tasks(f"h{round_}", shards)
        harness.send("heap-1", tasks)
        got = harness.wait_results([t.id for t in tasks], 30)
        for task, shard in zip(tasks, shards):
            assert got[task.id].value == expected_prime_indices(shard)
        ids += [t.id for t in tasks]
    big = [[str(sympy.nextprime(rng.getrandbits(1024)) if i % 3 == 0 else rng.getrandbits(1024))
            for i in range(6)] for _ in range(3)]  # ~5.6 KB of 1024-bit decimal strings
    tasks = primes_tasks("big", big)
    harness.send("heap-1", tasks)
    got = harness.wait_results([t.id for t in tasks], 60)
    for task, shard in zip(tasks, big):
        assert got[task.id].value == expected_prime_indices(shard)
    for _ in range(3):
        harness.send("heap-1", [TaskSpec(id="huge", name="echo", args=["z" * 60000])])
    state = harness.snapshot("heap-1")
    assert state["rejected"] == 3 and state["errors"] == 0
    assert state["tasks_processed"] == len(ids) + len(tasks)
    record_property("heap_peak_alloc", state["heap_peak"])
    record_property("heap_min_free", state["heap_min_free"])
    record_property("heap_live_peak", state["heap_live_peak"])
    print(f"{broker.kind}: 100K heap under load: peak mem_alloc {state['heap_peak']} B "
          f"(live after a collection {state['heap_live_peak']} B), min mem_free "
          f"{state['heap_min_free']} B, idle free {state['heap_free']} B")
    assert state["heap_min_free"] > 0


# -- task identity: attempts, tokens, release, birth sequence ------------------------------------

def test_results_echo_attempt_and_token_and_a_new_attempt_runs_again(
        broker: BrokerHandle, root: str, harness: Harness, boards) -> None:
    boards(broker, "att-1", root)
    harness.wait_status("att-1", "ready", 30)
    first = TaskSpec(id="a1", name="lambda", kwargs={"name": "heap"}, attempt=1,
                     token="00000000000000a1")
    harness.send("att-1", [first])
    r1 = harness.wait_results(["a1"], 15)["a1"]
    assert (r1.attempt, r1.token) == (1, "00000000000000a1")
    # The same attempt again (a redelivery): answered from the cache, not run.
    harness.send("att-1", [first])
    harness.wait(lambda: harness.result_order("att-1").count("a1") == 2, 15, "cached answer")
    # A new attempt of the same id runs again and answers with its own attempt and token.
    second = TaskSpec(id="a1", name="lambda", kwargs={"name": "heap"}, attempt=2,
                      token="00000000000000a2")
    harness.send("att-1", [second])
    harness.wait(lambda: harness.result_order("att-1").count("a1") == 3, 15, "second run")
    with harness.cond:
        sent = [r for seen in harness.batches for r in seen.message.results if r.id == "a1"]
    assert [(r.attempt, r.token) for r in sent] == [
        (1, "00000000000000a1"), (1, "00000000000000a1"), (2, "00000000000000a2")]
    assert sent[0].ts == sent[1].ts and sent[2].ts > sent[0].ts  # cached, then a real run
    # A stale attempt after a newer one: a duplicate, neither run nor answered.
    harness.send("att-1", [first])
    # A new attempt while the task is still queued: one copy runs, with the newest attempt.
    slow = TaskSpec(id="slow", name="sleep", args=[1.0], priority=9, attempt=1, token="5" * 16)
    queued = [TaskSpec(id="q", name="echo", args=["q"], attempt=n, token=f"{n:016x}")
              for n in (1, 2)]
    harness.send("att-1", [slow, queued[0]])
    harness.send("att-1", [queued[1]])
    got = harness.wait_results(["slow", "q"], 20)
    assert (got["q"].attempt, got["q"].token, got["q"].value) == (2, f"{2:016x}", "q")
    assert (got["slow"].attempt, got["slow"].token) == (1, "5" * 16)
    state = harness.snapshot("att-1")
    assert state["tasks_processed"] == 4  # a1 twice, slow, q once
    assert state["duplicates"] == 2       # a1's redelivery and its stale attempt
    assert harness.result_order("att-1").count("q") == 1
    assert not harness.undecodable


def test_release_hands_back_unstarted_tasks_least_urgent_first(
        broker: BrokerHandle, root: str, harness: Harness, boards) -> None:
    boards(broker, "rel-1", root)
    harness.wait_status("rel-1", "ready", 30)
    harness.send("rel-1", [TaskSpec(id="long", name="sleep", args=[2.0], priority=10)])
    harness.wait(lambda: any(s.message.node_id == "rel-1" and s.message.workload == 1
                             for s in harness.statuses), 10, "the board running the long task")
    held = [("h9", 9), ("h2", 2), ("h5a", 5), ("h5b", 5), ("h1", 1)]
    harness.send("rel-1", [TaskSpec(id=i, name="echo", args=[i], priority=p) for i, p in held])
    harness.control("rel-1", "release", count=3)
    harness.wait(lambda: len(harness.released("rel-1")) >= 3, 10, "three tasks handed back")
    assert harness.released("rel-1") == ["h1", "h2", "h5b"]
    got = harness.wait_results(["long", "h9", "h5a"], 20)
    assert got["long"].ok and got["h9"].value == "h9"
    assert not {"h1", "h2", "h5b"} & harness.results("rel-1").keys()
    harness.control("rel-1", "release", count=0)  # malformed: counted, nothing else
    harness.control("rel-1", "release")
    state = harness.snapshot("rel-1")
    assert state["rejected"] == 2 and state["held"] == []


def test_status_lists_lambdas_and_birth_and_will_share_seq(
        broker: BrokerHandle, root: str, harness: Harness, boards) -> None:
    board = boards(broker, "seq-1", root)
    ready = harness.wait_status("seq-1", "ready", 30)
    assert set(ready.message.lambdas.split(",")) == {"square", "sum", "word_count", "heap"}
    assert "lambda" in ready.message.tasks.split(",")
    assert ready.message.seq == 1
    board.wifi(False)  # the session drops: the broker sends the will of birth 1
    dead = harness.wait_status("seq-1", "dead", 20, after=ready.at)
    assert dead.message.seq == 1
    board.wifi(True)
    back = harness.wait_status("seq-1", "ready", 30, after=dead.at)
    assert back.message.seq > 1 and back.message.instance == ready.message.instance
    board.kill()
    last = harness.wait_status("seq-1", "dead", 20, after=back.at)
    assert last.message.seq == harness.status_of("seq-1")[-2].message.seq  # the latest birth's
    assert retained_status(broker, root, "seq-1")["seq"] == last.message.seq


def test_the_board_takes_work_only_from_the_lease_holder(
        broker: BrokerHandle, root: str, harness: Harness, boards) -> None:
    """The fence of node/lease_fence.py on the board: the best lease seen held (epoch, then
    holder) admits exactly its holder's batches; anything else is handed back and counted."""
    boards(broker, "fence-1", root)
    harness.wait_status("fence-1", "ready", 30)
    expect_released: list[str] = []
    rejected = 0

    def refused(task_id: str, epoch: int, master: str) -> None:
        nonlocal rejected
        harness.send("fence-1", [TaskSpec(id=task_id, name="echo", args=[task_id])],
                     epoch=epoch, master=master)
        expect_released.append(task_id)
        rejected += 1
        harness.wait(lambda: harness.released("fence-1") == expect_released, 15,
                     f"{task_id} handed back")

    def taken(task_id: str, epoch: int, master: str) -> None:
        harness.send("fence-1", [TaskSpec(id=task_id, name="echo", args=[task_id])],
                     epoch=epoch, master=master)
        assert harness.wait_results([task_id], 15)[task_id].value == task_id

    def fence_is(epoch: int, holder: str, held: bool) -> None:
        harness.wait(lambda: harness.snapshot("fence-1", epoch=epoch)["lease"]
                     == [epoch, holder, held], 15, f"the board at lease {epoch} {holder}")

    taken("plain", 0, "solo")        # no replication: a master of its own
    refused("early", 2, "m-a")       # a lease nobody announced
    harness.lease("m-a", 2)
    fence_is(2, "m-a", True)
    taken("a-2", 2, "m-a")
    refused("zero", 0, "solo")       # a lease is held: epoch 0 is not its holder
    refused("other", 2, "m-b")       # same epoch, another master
    refused("older", 1, "m-a")
    harness.lease("m-b", 3)          # m-a deposed
    fence_is(3, "m-b", True)
    taken("b-3", 3, "m-b")
    refused("deposed", 2, "m-a")
    harness.lease("m-a", 2)          # a stale announcement does not move the fence back
    harness.lease("m-b", 3, "claim")  # nor does a claim
    taken("b-3-again", 3, "m-b")
    harness.lease("m-b", 3, "expired")  # replication gone: a lone master is taken again
    fence_is(3, "m-b", False)
    taken("alone", 0, "solo")
    refused("b-late", 3, "m-b")
    state = harness.snapshot("fence-1")
    assert state["rejected"] == rejected
    assert not set(expect_released) & harness.results("fence-1").keys()


# -- the seed API, driven directly -----------------------------------------------------------------

API_DRIVER = '''
# Replaces main.py: drives ComputeNode's seed API step by step, saying what it sees.
import gc

gc.collect()
RX = bytearray(8192)  # first, as main.py does, while the heap is whole

import json
import time

import config
import wifi
from compute_node import ComputeNode


def say(step, **kw):
    kw["step"] = step
    print("STEP " + json.dumps(kw))


def wait_task(node, ms):
    deadline = time.ticks_add(time.ticks_ms(), ms)
    while time.ticks_diff(deadline, time.ticks_ms()) > 0:
        node.check_messages(100)
        task = node.get_task()
        if task is not None:
            return task
    return None


node = ComputeNode(config.MQTT_HOST, config.MQTT_PORT, config.MQTT_KEEPALIVE, root=config.TOPIC_ROOT,
                   heartbeat=0.5, io_timeout=5, wlan=wifi.wlan(), wifi_up=lambda: wifi.up(config),
                   rx=RX)
try:
    node.check_messages()
    say("check before connect", raised=False)
except OSError:
    say("check before connect", raised=True)
say("before", connected=node.is_connected(), node_id=node.node_id)
ok = node.connect()
say("connect", ok=ok, connected=node.is_connected(), ifconfig=list(wifi.wlan().ifconfig()))
node.start_keepalive_thread()
node.start_keepalive_thread()  # once per boot: the second call starts nothing
task = wait_task(node, 20000)
node.execute(task)
node.flush(True)
say("ran", id=task["id"])
time.sleep(3)  # the main loop does nothing: only the keepalive thread keeps the session
node.check_messages(0)
say("slept", connected=node.is_connected(), threads_started=node.thread_started)
node.handle_disconnect()  # dropped without DISCONNECT: the broker sends the will
say("dropped", connected=node.is_connected())
time.sleep(1)
ok = node.connect()
task = wait_task(node, 20000)
node.execute(task)
node.flush(True)
say("again", ok=ok, connected=node.is_connected(), id=task["id"])
node.shutdown()
say("shut down", connected=node.is_connected())
'''


def test_seed_api_on_the_board(broker: BrokerHandle, root: str, harness: Harness,
                               boards) -> None:
    """connect, is_connected, check_messages, the keepalive loop and thread, handle_disconnect,
    the will, the retained status and a node id from the MAC, called one by one."""
    # the driver replaces main.py and compiles on the board beside the firmware: a heap with
    # room for it (the firmware's own 100K budget is held by the heap test)
    board = boards(broker, None, root, files={"main.py": API_DRIVER}, STATIC_IP="10.9.8.77",
                   MQTT_KEEPALIVE=2, heap="160K")
    node_id = f"esp32-{board.mac}"

    def steps() -> dict[str, dict]:
        out = {}
        for line in board.log().splitlines():
            if line.startswith("STEP "):
                d = json.loads(line[5:])
                out[d.pop("step")] = d
        return out

    ready = harness.wait_status(node_id, "ready", 30)
    assert ready.message.seq == 1
    harness.send(node_id, [TaskSpec(id="first", name="echo", args=["one"])])
    assert harness.wait_results(["first"], 20)["first"].value == "one"
    wait_for(lambda: "slept" in steps(), 20, "the driver's sleep")
    ran_at = harness.results(node_id)["first"][0]
    beats = [s for s in harness.status_of(node_id) if ran_at + 0.5 < s.at]
    assert len(beats) >= 3, "no heartbeats from the keepalive thread while the main loop slept"
    dead = harness.wait_status(node_id, "dead", 15, after=ready.at)
    assert dead.message.seq == 1 and dead.message.instance == ready.message.instance
    again = harness.wait_status(node_id, "ready", 30, after=dead.at)
    assert again.message.seq == 2
    harness.send(node_id, [TaskSpec(id="second", name="echo", args=["two"])])
    assert harness.wait_results(["second"], 20)["second"].value == "two"
    harness.wait_status(node_id, "offline", 20, after=again.at)
    wait_for(lambda: "shut down" in steps(), 15, "the driver's end")
    s = steps()
    assert s["check before connect"] == {"raised": True}
    assert s["before"] == {"connected": False, "node_id": node_id}
    assert s["connect"] == {"ok": True, "connected": True,
                            "ifconfig": ["10.9.8.77", "255.255.255.0", "10.9.8.1", "10.9.8.1"]}
    assert s["slept"] == {"connected": True, "threads_started": True}
    assert s["dropped"] == {"connected": False}
    assert s["again"] == {"ok": True, "connected": True, "id": "second"}
    assert s["shut down"] == {"connected": False}
    assert board.log().count("online as") == 2
    assert retained_status(broker, root, node_id)["status"] == "offline"
