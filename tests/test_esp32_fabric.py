"""ESP32 nodes (MicroPython, 100K heap) working for the real master, beside a CPython node.

The master plans prime shards to fit the smallest `max_payload` a live node states, sends
them over the broker, and collects the results; a board killed mid-job leaves its will
`dead` and the master gives its shards to the others. Both brokers.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import sympy

sys.path.insert(0, str(Path(__file__).resolve().parent))

from esp32_support import (Harness, MicroPythonNode, boards, broker, micropython,  # noqa: E402,F401
                           umqtt_file)
from support.brokers import BrokerHandle  # noqa: E402
from support.fabric import REPO, Fabric, Proc, child_env  # noqa: E402

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def fab(broker: BrokerHandle, tmp_path: Path) -> Iterator[Fabric]:
    fabric = Fabric(broker.url, tmp_path)
    yield fabric
    fabric.cleanup()


def numbers_file(path: Path, count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    numbers = [rng.getrandbits(64) for _ in range(count)]
    numbers += [sympy.nextprime(rng.getrandbits(90)) for _ in range(10)]  # decimal strings
    path.write_text("".join(f"{n}\n" for n in numbers))
    return numbers


def run_primes(fab: Fabric, source: Path, output: Path, timeout: float = 150
               ) -> subprocess.Popen[bytes]:
    log = open(output.with_suffix(".log"), "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "master.cli", "primes", str(source), "-o", str(output),
         "--broker", fab.broker_url, "--root", fab.root, "--timeout", "20",
         "--stall-timeout", "60", "--no-progress"],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=child_env())


def wait_master_knows(fab: Fabric, node_ids: set[str], timeout: float = 30) -> None:
    client = fab.client()
    try:
        deadline = time.monotonic() + timeout
        while True:
            live = {n["node_id"] for n in client.nodes() if n["status"] in ("ready", "busy")}
            if node_ids <= live:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the master knows {sorted(live)}, not {sorted(node_ids)}")
            time.sleep(0.1)
    finally:
        client.close()


def finish(job: subprocess.Popen[bytes], output: Path, timeout: float = 150) -> str:
    try:
        job.wait(timeout)
    except subprocess.TimeoutExpired:
        job.kill()
        job.wait(10)
    log = output.with_suffix(".log").read_text(errors="replace")
    assert job.returncode == 0, log
    return log


def test_cpython_and_micropython_nodes_finish_one_primes_job(fab: Fabric, broker: BrokerHandle,
                                                             boards, tmp_path: Path) -> None:
    fab.master()
    fab.node("cp-1")
    boards(broker, "mp-1", fab.root, HEARTBEAT_S=1)
    boards(broker, "mp-2", fab.root, HEARTBEAT_S=1)
    wait_master_knows(fab, {"cp-1", "mp-1", "mp-2"})
    numbers = numbers_file(tmp_path / "numbers.txt", 6000, seed=41)
    output = tmp_path / "primes.txt"
    with Harness(broker, fab.root) as h:
        log = finish(run_primes(fab, tmp_path / "numbers.txt", output), output)
        by_node = {seen.message.node_id for seen in h.batches if seen.message.results}
    expected = sorted({n for n in numbers if sympy.isprime(n)})
    assert [int(line) for line in output.read_text().split()] == expected
    assert {"mp-1", "mp-2"} <= by_node, log  # the boards did part of the work
    assert not h.undecodable


def test_a_board_killed_mid_job_hands_its_work_to_the_others(fab: Fabric, broker: BrokerHandle,
                                                             boards, tmp_path: Path) -> None:
    fab.master()
    fab.node("cp-1", "--capacity", "1")
    victim: MicroPythonNode = boards(broker, "mp-kill", fab.root, HEARTBEAT_S=1)
    boards(broker, "mp-live", fab.root, HEARTBEAT_S=1)
    wait_master_knows(fab, {"cp-1", "mp-kill", "mp-live"})
    numbers = numbers_file(tmp_path / "numbers.txt", 20000, seed=43)
    output = tmp_path / "primes.txt"
    with Harness(broker, fab.root) as h:
        job = run_primes(fab, tmp_path / "numbers.txt", output)
        h.wait(lambda: any(seen.message.node_id == "mp-kill" and seen.message.results
                           for seen in h.batches), 60, "a first result from the victim")
        victim.kill()
        h.wait_status("mp-kill", "dead", 20)
        log = finish(job, output)
    expected = sorted({n for n in numbers if sympy.isprime(n)})
    assert [int(line) for line in output.read_text().split()] == expected, log


def test_master_submits_reach_a_board(fab: Fabric, broker: BrokerHandle, boards) -> None:
    """Single tasks through `master-node submit`, as a person would send them."""
    fab.master()
    boards(broker, "mp-one", fab.root)
    wait_master_knows(fab, {"mp-one"})
    client = fab.client()
    try:
        handles = [client.submit("primes", [[7, 8, str(2**89 - 1)]]),
                   client.submit("lambda", kwargs={"name": "square", "event": 12}),
                   client.submit("nope")]
        outcomes = [handle.result(timeout=30) if i < 2 else None
                    for i, handle in enumerate(handles)]
        assert outcomes[:2] == [[0, 2], 144]
        with pytest.raises(Exception) as failed:
            handles[2].result(timeout=30)
        assert "unknown_task" in str(failed.value)
    finally:
        client.close()


USER_LAMBDA = '''
def lambda_handler(event, context):
    return {"double": 2 * event["n"]}
'''


def test_a_mixed_fleet_runs_every_call_on_a_node_that_has_it(fab: Fabric, broker: BrokerHandle,
                                                             boards, tmp_path: Path) -> None:
    """A plain node, a node with a user lambda and a board: 20 concurrent calls of each kind
    (a plain task, the user's lambda, a firmware lambda, a built-in CPython lambda), each on a
    node that offers it, none failed."""
    code = tmp_path / "usercode"
    code.mkdir()
    (code / "mymodule.py").write_text(USER_LAMBDA)
    fab.master()
    fab.node("plain", "--capacity", "2")
    user = Proc([sys.executable, "-m", "node.cli", "--broker", fab.broker_url, "--root", fab.root,
                 "--id", "user", "--heartbeat", "0.5", "--capacity", "2",
                 "--lambda", "mymodule:lambda_handler"], tmp_path / "node-user.log", cwd=code)
    fab.procs.append(user)
    boards(broker, "mp-mix", fab.root, HEARTBEAT_S=1)
    wait_master_knows(fab, {"plain", "user", "mp-mix"})
    client = fab.client()
    try:
        nodes = {n["node_id"]: n for n in client.nodes()}
        assert "square" in nodes["mp-mix"]["lambdas"] and "echo" not in nodes["mp-mix"]["lambdas"]
        calls = ([("echo", [i], {}, 5) for i in range(20)]
                 + [("lambda", [], {"name": "lambda_handler", "event": {"n": i}}, 5)
                    for i in range(20)]
                 + [("lambda", [], {"name": "square", "event": i}, 5) for i in range(20)]
                 + [("lambda", [], {"name": "echo", "event": i}, 5) for i in range(20)])
        outcomes = [h.outcome(timeout=120) for h in client.submit_many(calls)]
    finally:
        client.close()
    assert [o.state for o in outcomes] == ["completed"] * 80, \
        [o.error for o in outcomes if o.state != "completed"]
    echo, user_lambda, square, echo_lambda = (outcomes[i:i + 20] for i in range(0, 80, 20))
    assert [o.value for o in echo] == list(range(20))
    assert [o.value for o in user_lambda] == [{"double": 2 * i} for i in range(20)]
    assert {o.node_id for o in user_lambda} == {"user"}
    assert [o.value for o in square] == [i * i for i in range(20)]
    assert {o.node_id for o in square} == {"mp-mix"}
    assert [o.value for o in echo_lambda] == list(range(20))
    assert "mp-mix" not in {o.node_id for o in echo_lambda}
