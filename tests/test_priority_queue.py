"""One order for every task queue: the cases of tests/priority_cases.py run on core's queue,
the node's work queue, the master's scheduler (its dispatch order), and the board's own queue
(esp32/task_queue.py) under CPython and under the MicroPython unix port."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from core.priority_queue import PriorityQueue  # noqa: E402
from core.protocol import NodeStatus, TaskResult, TaskSpec  # noqa: E402
from esp32_support import ESP32_DIR, micropython_command  # noqa: E402
from master.scheduler import Scheduler  # noqa: E402
from node.work_queue import PriorityTaskQueue  # noqa: E402
from priority_cases import CASES, Case, board_cases  # noqa: E402

pytestmark = pytest.mark.timeout(120)

Ops = list[list[Any]]


def run_core(ops: Ops) -> list[str]:
    q: PriorityQueue[str] = PriorityQueue()
    out: list[str] = []
    for op in ops:
        if op[0] in ("push", "front"):
            q.push(op[1], op[2], front=op[0] == "front")
        elif op[0] == "pop" and q:
            out.append(q.pop())
        elif op[0] == "release":
            out += q.take_least_urgent(op[1])
        elif op[0] == "remove":
            out += q.remove(lambda item: item == op[1])
    return out + q.drain()


def run_node(ops: Ops) -> list[str]:
    q = PriorityTaskQueue()
    out: list[str] = []

    def spec(op: list[Any]) -> TaskSpec:
        return TaskSpec(id=op[1], name="echo", priority=op[2])

    for op in ops:
        if op[0] == "push":
            q.put(spec(op))
        elif op[0] == "front":
            q.put_front([spec(op)])
        elif op[0] == "pop":
            out += [t.id for t in q.get_many(1)]
        elif op[0] == "release":
            out += [t.id for t in q.take_least_urgent(op[1])]
        elif op[0] == "remove":
            out += [t.id for t in q.remove({op[1]})]
    while (task := q.get()) is not None:
        out.append(task.id)
    return out


def run_scheduler(ops: Ops) -> list[str]:
    """Popped means dispatched to the one node, whose single slot is freed by its result."""
    s = Scheduler()
    s.node_status(NodeStatus(node_id="n", status="ready", capacity=1, prefetch=0,
                             instance="i"), 0.0)
    out: list[str] = []

    def pop() -> bool:
        sent = s.assign(now=0.0).get("n", [])
        for record in sent:
            out.append(record.id)
            assert s.result("n", TaskResult(id=record.id, ok=True, attempt=record.dispatch,
                                            token=record.token))[0] == "completed"
        return bool(sent)

    for op in ops:
        if op[0] == "push":
            s.submit(TaskSpec(id=op[1], name="echo", priority=op[2]))
        elif op[0] == "pop":
            pop()
        elif op[0] == "remove" and s.cancel(op[1], "removed", 0.0)[0] == "queued":
            out.append(op[1])
    while pop():
        pass
    return out


# the scheduler's queue is core's: it is driven here through dispatch, which has no
# "release" of queued tasks and whose "front" is a requeue of a dispatched task
SCHEDULER_CASES = [c for c in CASES if all(op[0] in ("push", "pop", "remove") for op in c[1])]


@pytest.mark.parametrize("run", [run_core, run_node], ids=["core", "node"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_core_and_node_queues_follow_the_cases(run: Callable[[Ops], list[str]],
                                               case: Case) -> None:
    _name, ops, expected = case
    assert run(ops) == expected


@pytest.mark.parametrize("case", SCHEDULER_CASES, ids=[c[0] for c in SCHEDULER_CASES])
def test_the_scheduler_dispatches_in_the_same_order(case: Case) -> None:
    _name, ops, expected = case
    assert run_scheduler(ops) == expected


def test_every_case_runs_somewhere_with_each_operation() -> None:
    ops = {op[0] for _n, case_ops, _e in CASES for op in case_ops}
    assert ops == {"push", "front", "pop", "release", "remove"}
    board_ops = {op[0] for _n, case_ops, _e in board_cases() for op in case_ops}
    assert board_ops == {"push", "pop", "release", "remove"}
    assert len(SCHEDULER_CASES) >= 5


# -- the board ----------------------------------------------------------------------------------

BOARD_DRIVER = """
import json
import time
if not hasattr(time, "ticks_ms"):  # CPython: the one MicroPython call the queue makes here
    time.ticks_ms = lambda: int(time.time() * 1000)
from task_queue import TaskQueue

out = []
for name, ops, _expected in json.loads(open("cases.json").read()):
    q = TaskQueue(64, max_bytes=1 << 20)
    left = []
    for op in ops + [["pop"]] * 64:
        if op[0] == "push":
            q.accept({"id": op[1], "name": "echo", "priority": op[2]}, 10)
        elif op[0] == "pop":
            t = q.get()
            if t is not None:
                left.append(t["id"])
                q.finish({"id": t["id"], "ok": True, "value": None}, True, t)
        elif op[0] == "release":
            n = len(q.released)
            q.release(op[1])
            left.extend(q.released[n:])
        elif op[0] == "remove":
            if q.find(op[1]) >= 0:
                left.append(op[1])
            q.cancel([op[1]])
    out.append([name, left])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def board_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The board's queue and the two modules it imports, with the cases beside them."""
    board = tmp_path_factory.mktemp("board-queue")
    for name in ("task_queue.py", "lease.py", "tasks.py"):
        shutil.copyfile(ESP32_DIR / name, board / name)
    (board / "cases.json").write_text(json.dumps(board_cases()))
    (board / "driver.py").write_text(textwrap.dedent(BOARD_DRIVER))
    return board


def _interpreter(name: str) -> list[str]:
    if name == "cpython":
        return [sys.executable, "-c"]
    return [*micropython_command(), "-X", "heapsize=100K", "-c"]


@pytest.mark.parametrize("interpreter", ["cpython", "micropython"])
def test_the_boards_queue_follows_the_cases(board_dir: Path, interpreter: str) -> None:
    proc = subprocess.run(
        [*_interpreter(interpreter),
         "import sys; sys.path.insert(0, ''); exec(open('driver.py').read())"],
        cwd=board_dir, capture_output=True, text=True, timeout=60,
        env=dict(os.environ, MICROPYPATH=":.frozen"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    expected = {name: order for name, _ops, order in board_cases()}
    assert got == expected
    assert len(expected) >= 7


# -- what only core's queue does -----------------------------------------------------------------

def test_a_batch_put_back_keeps_its_order_ahead_of_its_priority() -> None:
    q: PriorityQueue[TaskSpec] = PriorityQueue()
    q.push_many([TaskSpec(id=i, name="echo", priority=p) for i, p in [("a", 5), ("b", 9)]])
    q.push_front_many([TaskSpec(id=i, name="echo", priority=5) for i in ("r1", "r2")])
    q.push_front_many([TaskSpec(id="s", name="echo", priority=5)])
    assert [t.id for t in q.drain()] == ["b", "s", "r1", "r2", "a"]


def test_start_times_wait_apart_earliest_first_then_by_sequence() -> None:
    q: PriorityQueue[str] = PriorityQueue()
    late = q.push("late", 9, due=5.0)
    first = q.push("first", 1, due=2.0)
    second = q.push("second", 1, due=2.0)
    q.push("now", 5)
    assert q.next_due() == 2.0 and len(q) == 1 and q.peek() == "now"
    assert list(q.due_items(1.9)) == []
    assert list(q.due_items(2.0)) == [(first, "first"), (second, "second")]
    assert q.next_due() == 5.0
    assert list(q.due_items(10.0)) == [(late, "late")]
    assert q.next_due() is None and q.drain() == ["now"]
