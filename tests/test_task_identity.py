"""Task identity and the scheduler's contract, on both brokers with real processes: the right
result, from the node it was given to, after a real retry, on a node that can run it."""

from __future__ import annotations

import sys
import textwrap
import threading
from pathlib import Path

import pytest

from core.errors import NodeUnavailable, TaskRefused
from core.mqtt import MqttSession, Will
from core.protocol import NodeStatus, ResultBatch, TaskResult
from core.url import parse_broker_url
from master.transport import MasterNodeTransport
from node.transport import ComputeNodeTransport
from support.fabric import Fabric, Observer, Proc, wait_ready, wait_until
from support.tasks import runs_in

USER_LAMBDA = textwrap.dedent('''
    def lambda_handler(event, context):
        return {"double": 2 * event["n"]}
''')


def test_a_transient_failure_is_retried_and_a_permanent_one_runs_max_attempts_times(
        fabric: Fabric, tmp_path: Path) -> None:
    fabric.master("--max-attempts", "3")
    fabric.node("solo", "--task", "support.tasks:flaky")
    with fabric.client() as client:
        wait_ready(client, "solo")
        once = str(tmp_path / "once")
        outcome = client.submit("flaky", [once, 1]).outcome(timeout=30)
        assert (outcome.state, outcome.value, outcome.node_id) == ("completed", 2, "solo")
        assert runs_in(once) == 2  # ran exactly twice: the retry really ran it again

        always = str(tmp_path / "always")
        outcome = client.submit("flaky", [always, 100]).outcome(timeout=30)
        assert outcome.state == "failed" and outcome.attempts == 3
        assert runs_in(always) == 3
        assert [r.split(":")[0] for r in outcome.error["reasons"]] == ["exception"] * 3
        assert all(r.endswith(f"run {i}") for i, r in enumerate(outcome.error["reasons"], 1))

        budget = str(tmp_path / "budget")  # a budget of its own, below the master's
        outcome = client.submit("flaky", [budget, 1], max_attempts=1).outcome(timeout=30)
        assert outcome.state == "failed" and runs_in(budget) == 1


def test_a_task_id_names_one_piece_of_work(fabric: Fabric) -> None:
    fabric.master()
    fabric.node("n1")
    with fabric.client() as client:
        wait_ready(client, "n1")
        assert client.submit("echo", ["a"], task_id="job-1").result(timeout=30) == "a"
        # the same work under the same id: the same answer (not another run)
        assert client.submit("echo", ["a"], task_id="job-1").result(timeout=30) == "a"
        with pytest.raises(TaskRefused, match="id_conflict"):
            client.submit("echo", ["b"], task_id="job-1").result(timeout=30)
        with pytest.raises(TaskRefused, match="bound to other work"):
            client.submit("sleep", [0], task_id="job-1").result(timeout=30)
        status = client.status()
        assert status["completed"] == 1 and status["failed"] == 0


def test_lambdas_and_tasks_go_only_to_nodes_that_have_them(fabric: Fabric,
                                                          tmp_path: Path) -> None:
    code = tmp_path / "usercode"
    code.mkdir()
    (code / "mymodule.py").write_text(USER_LAMBDA)
    fabric.master()
    fabric.node("plain", "--capacity", "2")
    user = Proc([sys.executable, "-m", "node.cli", "--broker", fabric.broker_url, "--root",
                 fabric.root, "--id", "user", "--heartbeat", "0.5", "--capacity", "2",
                 "--lambda", "mymodule:lambda_handler"], tmp_path / "node-user.log", cwd=code)
    fabric.procs.append(user)
    with fabric.client() as client:
        wait_ready(client, "plain", "user")
        nodes = {n["node_id"]: n for n in client.nodes()}
        assert "lambda_handler" in nodes["user"]["lambdas"]
        assert "lambda_handler" not in nodes["plain"]["lambdas"]
        calls = [("lambda", [], {"name": "lambda_handler", "event": {"n": i}}, 5)
                 for i in range(20)] + [("echo", [i], {}, 5) for i in range(20)]
        handles = client.submit_many(calls)
        outcomes = [h.outcome(timeout=60) for h in handles]
        assert all(o.state == "completed" for o in outcomes), \
            [o.error for o in outcomes if o.state != "completed"]
        assert [o.value for o in outcomes[:20]] == [{"double": 2 * i} for i in range(20)]
        assert {o.node_id for o in outcomes[:20]} == {"user"}
        assert [o.value for o in outcomes[20:]] == list(range(20))
        # a lambda no node ever offered fails at once, naming what exists
        outcome = client.dispatch_lambda({"name": "missing", "event": {}}).outcome(timeout=30)
        assert outcome.state == "failed" and outcome.error["kind"] == "unknown_lambda"
        assert "lambda_handler" in outcome.error["message"]


def test_a_task_whose_nodes_are_gone_waits_and_says_why(fabric: Fabric, tmp_path: Path) -> None:
    fabric.master()
    fabric.node("plain")
    special = fabric.node("special", "--task", "support.tasks:record")
    with fabric.client() as client:
        wait_ready(client, "plain", "special")
        assert special.terminate() == 0  # offline: its name is known, no live node has it
        wait_until(lambda: {n["node_id"]: n["status"] for n in client.nodes()}["special"]
                   == "offline", 15, message="special offline")
        handle = client.submit("record", [str(tmp_path / "log"), "late"])
        status = wait_until(lambda: (s := client.status())["waiting"] == 1 and s, 15,
                            message="the task waiting, with its reason")
        assert status["waiting_for"] == "record"
        outcome = client.submit("no_such_task").outcome(timeout=15)  # never offered: at once
        assert outcome.error["kind"] == "unknown_task" and "record" in outcome.error["message"]
        fabric.node("special", "--task", "support.tasks:record")
        assert handle.result(timeout=30) == "late"
        assert client.status()["waiting"] == 0


def test_short_tasks_never_wait_behind_a_busy_node(fabric: Fabric, tmp_path: Path) -> None:
    fabric.master()
    for node_id in ("a", "b"):
        fabric.node(node_id, "--capacity", "1", "--task", "support.tasks:wait_for_file")
    release = tmp_path / "release"
    with fabric.client() as client:
        wait_ready(client, "a", "b")
        long = client.submit("wait_for_file", [str(release), 60])
        busy = wait_until(lambda: [n["node_id"] for n in client.nodes() if n["workload"] == 1],
                          15, message="the long task running")[0]
        short = client.submit_many([("echo", [i], {}, 5) for i in range(4)])
        outcomes = [h.outcome(timeout=30) for h in short]
        # all done while the long task still runs: none waited for it
        assert not long.done()
        assert [o.value for o in outcomes] == [0, 1, 2, 3]
        assert {o.node_id for o in outcomes} == {"b" if busy == "a" else "a"}
        release.touch()
        assert long.outcome(timeout=30).node_id == busy


def test_a_node_that_lies_is_rejected_and_the_client_gets_the_real_values(
        fabric: Fabric, tmp_path: Path) -> None:
    fabric.master()
    fabric.node("honest", "--capacity", "1", "--task", "support.tasks:wait_for_file")
    root = fabric.root
    liar = MqttSession(broker=parse_broker_url(fabric.broker_url), client_id="liar",
                       will=Will(f"{root}/nodes/liar/status", NodeStatus("liar", "dead").encode()))
    liar.start()
    try:
        # a node in good standing, offering nothing that will be sent to it
        liar.publish(f"{root}/nodes/liar/status", NodeStatus(
            "liar", "ready", heartbeat=30, tasks="nothing_here").encode(), retain=True)
        with fabric.client() as client:
            wait_ready(client, "honest", "liar")
            flags = [tmp_path / f"go{i}" for i in range(3)]
            handles = [client.submit("wait_for_file", [str(f), 60]) for f in flags]
            wait_until(lambda: client.status()["in_flight"] >= 1, 15, message="dispatched")
            before = client.status()["rejected"]
            # results for the honest node's running and prefetched tasks and for queued ones,
            # with every attempt and token it could guess
            forged = tuple(TaskResult(h.id, True, "forged", attempt=a, token=t)
                           for h in handles for a, t in ((0, ""), (1, "0" * 16), (2, "guess")))
            liar.publish(f"{root}/results/liar", ResultBatch(node_id="liar",
                                                             results=forged).encode())
            wait_until(lambda: client.status()["rejected"] >= before + len(forged), 15,
                       message="every forged result rejected")
            assert client.status()["rejected"] == before + len(forged)
            assert not any(h.done() for h in handles)
            for flag in flags:
                flag.touch()
            assert [h.result(timeout=30) for h in handles] == [True, True, True]
            assert {h.outcome(timeout=1).node_id for h in handles} == {"honest"}
    finally:
        liar.stop(timeout=2.0)


def test_the_seed_api_tells_the_truth(fabric: Fabric, observer: Observer,
                                      tmp_path: Path) -> None:
    master = MasterNodeTransport(broker_url=fabric.broker_url, root=fabric.root,
                                 state_dir=tmp_path / "master", node_timeout=2.0)
    dead: list[str] = []
    lock = threading.Lock()

    def on_dead(node_ids: list[str]) -> None:
        with lock:
            dead.extend(node_ids)

    master.set_dead_nodes_callback(on_dead)
    master.start()
    try:
        assert master.get_results() == []  # results are kept from here on
        worker = fabric.node("w1", "--capacity", "2")
        wait_until(lambda: "w1" in master.get_nodes_by_status("ready"), 30, message="w1 ready")
        with pytest.raises(NodeUnavailable, match="ghost"):
            master.send_task("ghost", {"name": "echo", "args": [1]})
        task_id = master.send_task("w1", {"name": "echo", "args": ["pinned"]}, priority=9)
        found = wait_until(lambda: [r for r in master.get_results(["w1"])
                                    if r["task_id"] == task_id], 30, message="w1's result")
        assert found[0]["value"] == "pinned" and found[0]["node_id"] == "w1"
        assert master.get_results(["elsewhere"]) == []
        assert len(master.get_results(["w1"], disposable=True)) == 1
        assert master.get_results(["w1"]) == []
        info = wait_until(lambda: (i := master.get_node_info("w1"))["tasks_done"] >= 1 and i, 10,
                          message="w1 counting its task")
        assert info["status"] == "ready" and info["capacity"] == 2
        assert [i["node_id"] for i in master.get_node_info()] == ["w1"]

        last = master.get_node_info("w1")
        worker.kill()  # the broker sends its will
        wait_until(lambda: dead == ["w1"], 15, message="the dead-nodes callback")
        record = master.get_node_info("w1")
        assert record["status"] == "dead"
        assert record["tasks_done"] == last["tasks_done"] >= 1  # not the will's zeros
        assert record["last_seen"] >= last["last_seen"] > 0
        assert master.get_nodes_by_status("dead") == ["w1"]
        with pytest.raises(NodeUnavailable, match="dead"):
            master.send_task("w1", {"name": "echo", "args": [2]})
        assert master.get_dead_nodes(disposable=True) == ["w1"]
        assert master.get_dead_nodes() == []

        status_topic = f"{fabric.root}/nodes/w1/status"
        master.forget_node("w1")
        assert master.get_node_info("w1") is None
        wait_until(lambda: observer.retained.get(status_topic, b"x") == b"", 10,
                   message="w1's retained status cleared")
    finally:
        master.stop()


def test_publish_status_stays_until_the_node_changes(fabric: Fabric, observer: Observer) -> None:
    node = ComputeNodeTransport(broker_url=fabric.broker_url, root=fabric.root,
                                node_id="chooser", heartbeat=0.1)
    node.start()
    try:
        wait_until(lambda: (observer.node_status("chooser") or {}).get("status") == "ready", 10,
                   message="birth")
        node.publish_status("busy")
        first = wait_until(lambda: (s := observer.node_status("chooser")) and
                           s["status"] == "busy" and s, 10, message="busy")
        # ten heartbeats later it still says what it was told to
        later = wait_until(lambda: (s := observer.node_status("chooser"))["ts"] >= first["ts"] + 1
                           and s, 10, message="ten heartbeats")
        assert later["status"] == "busy"
        node.publish_status("ready")
        wait_until(lambda: observer.node_status("chooser")["status"] == "ready", 10,
                   message="the next call")
    finally:
        node.stop(graceful=True)
        node.wait(5.0)
