"""Cancelling tasks a board holds (real MicroPython, 100K heap, both brokers).

A queued task is dropped and answered `cancelled` at once (it never starts); a running
`sleep` ends early, since it reads messages while it waits; a running task that does not stop
has its late result replaced by `cancelled`. Through the real master: a task cancelled on a
board ends `cancelled` for its submitter, and the board's slot is free for the next task
long before the cancelled task would have ended.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from core.errors import TaskFailed  # noqa: E402
from core.protocol import TaskSpec  # noqa: E402
from esp32_support import (Harness, boards, broker, harness, micropython,  # noqa: E402,F401
                           root, umqtt_file)
from support.brokers import BrokerHandle  # noqa: E402
from support.fabric import Fabric, wait_until  # noqa: E402

pytestmark = pytest.mark.timeout(120)

# A firmware lambda that waits through the board's poll but never stops when told: its
# result, when it comes, must be replaced by `cancelled`.
STUBBORN = '''
import time

def stubborn(event, context):
    end = time.ticks_add(time.ticks_ms(), int(event * 1000))
    while time.ticks_diff(end, time.ticks_ms()) > 0:
        context["poll"](50)
    return "finished"

LAMBDAS = {"stubborn": stubborn}
'''


def running(h: Harness, node_id: str) -> None:
    h.wait(lambda: any(s.message.node_id == node_id and s.message.workload >= 1
                       for s in h.statuses), 15, f"{node_id} running a task")


def test_a_queued_task_is_dropped_and_a_running_sleep_ends_early(
        broker: BrokerHandle, root: str, harness: Harness, boards) -> None:
    boards(broker, "cx-1", root)
    harness.wait_status("cx-1", "ready", 30)
    harness.send("cx-1", [TaskSpec(id="run", name="sleep", args=[30], priority=10,
                                   attempt=1, token="a" * 16)])
    running(harness, "cx-1")
    harness.send("cx-1", [TaskSpec(id=i, name="echo", args=[i], priority=1, attempt=1,
                                   token="b" * 16) for i in ("q1", "q2")])
    sent = time.monotonic()
    harness.control("cx-1", "cancel", ids=["q1", "run", "gone", 5])
    got = harness.wait_results(["q1", "run", "q2"], 10)
    assert time.monotonic() - sent < 5  # not the 30 s the sleep asked for
    for task_id in ("q1", "run"):
        result = got[task_id]
        assert not result.ok and result.error["kind"] == "cancelled", result
        assert (result.attempt, result.token) == (1, ("a" if task_id == "run" else "b") * 16)
    assert got["q2"].ok and got["q2"].value == "q2"
    assert harness.result_order("cx-1").count("q1") == 1  # answered once, never run
    state = harness.snapshot("cx-1")
    assert state["held"] == [] and state["rejected"] == 1  # the id that is not a string
    assert (state["tasks_done"], state["tasks_failed"]) == (1, 0)  # cancels count in neither
    harness.control("cx-1", "cancel", ids="run")  # malformed: counted, nothing else
    assert harness.snapshot("cx-1")["rejected"] == 2
    assert not harness.undecodable


def test_a_running_task_that_does_not_stop_has_its_late_result_replaced(
        broker: BrokerHandle, root: str, harness: Harness, boards) -> None:
    boards(broker, "cx-2", root, files={"lambdas.py": STUBBORN})
    harness.wait_status("cx-2", "ready", 30)
    harness.send("cx-2", [TaskSpec(id="st", name="lambda",
                                   kwargs={"name": "stubborn", "event": 1.5})])
    running(harness, "cx-2")
    harness.control("cx-2", "cancel", ids=["st"])
    result = harness.wait_results(["st"], 15)["st"]
    assert not result.ok and result.error["kind"] == "cancelled" and result.value is None
    assert harness.snapshot("cx-2")["tasks_failed"] == 0


@pytest.fixture
def fab(broker: BrokerHandle, tmp_path: Path) -> Iterator[Fabric]:
    fabric = Fabric(broker.url, tmp_path)
    yield fabric
    fabric.cleanup()


def test_the_master_cancels_a_task_on_a_board_and_its_slot_is_free_again(
        fab: Fabric, broker: BrokerHandle, boards) -> None:
    fab.master()
    board = boards(broker, "cx-3", fab.root)
    with fab.client() as client:
        wait_until(lambda: any(n["node_id"] == "cx-3" and n["status"] == "ready"
                               for n in client.nodes()), 30, message="the board ready")
        slow = client.submit("sleep", [30])
        wait_until(lambda: client.task(slow.id)["state"] == "running", 15,
                   message="the sleep running on the board")
        started = time.monotonic()
        assert [v["was"] for v in client.cancel(slow.id)] == ["running"]
        with pytest.raises(TaskFailed, match="cancelled"):
            slow.result(timeout=10)
        # the board answered, so the master sends it work again: long before 30 s
        assert client.submit("echo", ["next"]).result(timeout=15) == "next"
        assert time.monotonic() - started < 10
        history = client.task(slow.id)["history"]
        assert [h["node_id"] for h in history] == ["cx-3"] and board.running()
