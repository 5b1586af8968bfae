"""The scheduler's own rules, without a broker: master.scheduler.Scheduler driven through a
stub of the master around it (`Stub`: nodes join by status message, the clock is a number the
test moves, results are built from what was dispatched), as dramatiq tests its workers
against a StubBroker. Pure and fast: no thread, no socket, no sleep."""

from __future__ import annotations

from typing import Any

import pytest

from core.errors import QueueFull
from core.protocol import NodeStatus, TaskResult, TaskSpec
from master.rate_limit import RateLimit
from master.retry_policy import RetryPolicy
from master.scheduler import (CANCELLED, COMPLETED, FAILED, QUEUED, RUNNING, Scheduler,
                              TaskRecord, capability)


class Stub:
    """What master.transport does around its scheduler, minus MQTT and the journal."""

    def __init__(self, rand: float = 0.0, **options: Any) -> None:
        self.now = 0.0
        self.s = Scheduler(rand=lambda: rand, **options)
        self.serial = 0

    def join(self, node_id: str, *, capacity: int = 1, prefetch: int = 0, tasks: str = "",
             lambdas: str = "", status: str = "ready", instance: str = "",
             heartbeat: float = 1.0) -> tuple[list[str], list[TaskRecord]]:
        """A status message from `node_id` (ready by default)."""
        return self.s.node_status(NodeStatus(
            node_id=node_id, status=status, capacity=capacity, prefetch=prefetch, tasks=tasks,
            lambdas=lambdas, instance=instance or f"{node_id}-1", heartbeat=heartbeat),
            self.now)

    def submit(self, task_id: str = "", *, name: str = "echo", priority: int = 5,
               due: float = 0.0, pinned: str = "", **spec: Any) -> TaskRecord:
        if not task_id:
            self.serial += 1
            task_id = f"t{self.serial}"
        record = self.s.submit(TaskSpec(id=task_id, name=name, priority=priority, **spec),
                               pinned=pinned, due=due)
        assert record is not None
        return record

    def dispatch(self) -> dict[str, list[str]]:
        """One `assign` at the stub's clock: node -> ids sent to it, in order."""
        return {node: [r.id for r in records]
                for node, records in self.s.assign(now=self.now).items()}

    def sent(self) -> list[str]:
        return [task_id for ids in self.dispatch().values() for task_id in ids]

    def answer(self, record: TaskRecord, *, ok: bool = True, kind: str = "exception",
               node: str = "", token: str | None = None) -> str:
        """The result of `record`'s current dispatch, as its node (or `node`) sends it."""
        result = TaskResult(id=record.id, ok=ok, value=None if not ok else record.id,
                            error=None if ok else {"kind": kind, "message": "boom"},
                            attempt=record.dispatch,
                            token=record.token if token is None else token)
        verdict, _ = self.s.result(node or record.sent_to, result, now=self.now)
        return verdict

    def run_all(self, node: str) -> list[str]:
        """Dispatch and answer until nothing is left: the order `node` ran the tasks in."""
        order: list[str] = []
        while sent := self.s.assign(now=self.now).get(node, []):
            for record in sent:
                order.append(record.id)
                assert self.answer(record) == "completed"
        return order


# -- priority and the queue ----------------------------------------------------------------------

def test_the_highest_priority_goes_first_and_equal_ones_in_submission_order() -> None:
    stub = Stub()
    stub.join("n1")
    for task_id, priority in [("a", 1), ("b", 10), ("c", 5), ("d", 10), ("e", 1)]:
        stub.submit(task_id, priority=priority)
    assert stub.run_all("n1") == ["b", "d", "c", "a", "e"]
    assert (stub.s.completed, stub.s.queued, stub.s.tasks) == (5, 0, {})


def test_a_duplicate_id_is_not_queued_twice_and_the_bound_raises_queue_full() -> None:
    stub = Stub(max_queued=2)
    stub.submit("a")
    assert stub.s.submit(TaskSpec(id="a", name="echo")) is None
    stub.submit("b")
    assert stub.s.room == 0
    with pytest.raises(QueueFull):
        stub.submit("c")
    stub.join("n1")
    assert stub.sent() == ["a"] and stub.s.room == 1  # dispatched tasks leave the bound


# -- credit: capacity and prefetch ---------------------------------------------------------------

def test_a_node_holds_at_most_capacity_plus_prefetch() -> None:
    stub = Stub()
    stub.join("n1", capacity=2, prefetch=1)
    records = [stub.submit() for _ in range(6)]
    assert stub.sent() == [r.id for r in records[:3]]
    assert stub.sent() == []  # no credit left
    assert stub.s.nodes["n1"].credit == 0 and stub.s.queued == 3
    assert stub.answer(records[1]) == "completed"
    assert stub.sent() == [records[3].id]
    stub.s.set_prefetch("n1", 3)  # the node adapted its prefetch
    assert stub.sent() == [r.id for r in records[4:]]


def test_work_goes_to_the_least_loaded_node_by_share_of_capacity() -> None:
    stub = Stub()
    stub.join("big", capacity=4, prefetch=0)
    stub.join("small", capacity=1, prefetch=0)
    for _ in range(5):
        stub.submit()
    sent = stub.dispatch()
    assert (len(sent["big"]), len(sent["small"])) == (4, 1)
    stub2 = Stub()
    stub2.join("n1", capacity=2, prefetch=2)
    stub2.join("n2", capacity=2, prefetch=2)
    stub2.submit("x")
    stub2.submit("y")
    assert sorted(map(len, stub2.dispatch().values())) == [1, 1]  # one each, not both on one


def test_a_dead_or_offline_node_gets_nothing() -> None:
    stub = Stub()
    stub.join("n1", status="offline")
    stub.submit("a")
    assert stub.dispatch() == {}
    stub.join("n1")
    assert stub.dispatch() == {"n1": ["a"]}


# -- capability routing --------------------------------------------------------------------------

def test_tasks_go_only_to_nodes_that_offer_their_name() -> None:
    stub = Stub()
    stub.join("echoes", capacity=4, tasks="echo")
    stub.join("primes", capacity=1, tasks="primes,echo")
    a = stub.submit("p1", name="primes")
    b = stub.submit("p2", name="primes")
    assert stub.dispatch() == {"primes": ["p1"]}  # never to `echoes`, though it is idle
    assert stub.answer(a) == "completed"
    assert stub.dispatch() == {"primes": ["p2"]}
    assert b.state == RUNNING


def test_a_name_no_node_ever_offered_fails_at_once_naming_what_there_is() -> None:
    stub = Stub()
    stub.join("n1", tasks="echo,sleep")
    record = stub.submit("x", name="nope")
    assert stub.dispatch() == {}
    assert record.state == FAILED and stub.s.unknown_failed == [record]
    assert record.errors[-1]["kind"] == "unknown_task"
    assert "'nope'" in record.errors[-1]["message"]
    assert "echo, sleep" in record.errors[-1]["message"]
    assert "x" not in stub.s.tasks and stub.s.failed == 1


def test_a_lambda_needs_a_node_offering_that_lambda() -> None:
    stub = Stub()
    stub.join("n1", capacity=2, tasks="lambda,echo", lambdas="square")
    ok = stub.submit("sq", name="lambda", kwargs={"name": "square"})
    missing = stub.submit("cu", name="lambda", kwargs={"name": "cube"})
    assert capability(missing.spec) == "lambda:cube"
    assert stub.dispatch() == {"n1": ["sq"]}
    assert ok.state == RUNNING
    assert missing.state == FAILED and missing.errors[-1]["kind"] == "unknown_lambda"
    assert "square" in missing.errors[-1]["message"]


def test_a_name_whose_nodes_are_gone_waits_for_them_and_says_so() -> None:
    stub = Stub()
    stub.join("n1", tasks="echo")
    stub.join("p", tasks="primes")
    stub.join("p", tasks="primes", status="offline")
    record = stub.submit("x", name="primes")
    for _ in range(3):
        assert stub.dispatch() == {}
        assert record.state == QUEUED and stub.s.waiting == {"primes": 1}
    stub.join("p", tasks="primes")
    assert stub.dispatch() == {"p": ["x"]}
    assert stub.s.waiting == {}


def test_a_node_that_says_it_lacks_a_task_is_not_offered_it_again() -> None:
    stub = Stub()
    stub.join("liar", capacity=4)  # offers every name
    stub.join("real", capacity=1, tasks="primes")
    stub.join("real", capacity=1, tasks="primes", status="busy")
    record = stub.submit("x", name="primes")
    stub.s.nodes["real"].in_flight.add("elsewhere")  # full for now
    assert stub.dispatch() == {"liar": ["x"]}
    assert stub.answer(record, ok=False, kind="unknown_task") == "retry"
    assert record.attempts == 0  # not a run: that node never had it
    assert stub.dispatch() == {}  # only `real` is left, and it is full
    stub.s.nodes["real"].in_flight.clear()
    assert stub.dispatch() == {"real": ["x"]}


# -- attempts and retries ------------------------------------------------------------------------

def test_a_failing_task_runs_max_attempts_times_with_every_reason_kept() -> None:
    stub = Stub(max_attempts=3)
    stub.join("n1")
    record = stub.submit("x")
    verdicts = []
    for _ in range(3):
        assert stub.sent() == ["x"]
        verdicts.append(stub.answer(record, ok=False))
    assert verdicts == ["retry", "retry", "failed"]
    assert record.state == FAILED and record.attempts == 3
    assert [(e["kind"], e["attempt"], e["node_id"]) for e in record.errors] == [
        ("exception", 1, "n1"), ("exception", 2, "n1"), ("exception", 3, "n1")]
    assert stub.sent() == []


def test_the_tasks_own_max_attempts_wins_and_permanent_errors_are_not_retried() -> None:
    stub = Stub(max_attempts=3)
    stub.join("n1", capacity=3)
    once = stub.submit("once", max_attempts=1)
    bad = stub.submit("bad")
    more = stub.submit("more", max_attempts=5)
    stub.sent()
    assert stub.answer(once, ok=False) == "failed" and once.attempts == 1
    assert stub.answer(bad, ok=False, kind="bad_request") == "failed" and bad.attempts == 1
    for _ in range(4):
        assert stub.answer(more, ok=False) == "retry"
        assert stub.sent() == ["more"]
    assert stub.answer(more, ok=False) == "failed" and more.attempts == 5


def test_a_retry_waits_its_backoff_on_the_schedulers_clock() -> None:
    stub = Stub(retry=RetryPolicy(backoff=2.0, jitter=0.0))
    stub.join("n1")
    stub.now = 10.0
    record = stub.submit("x")
    assert stub.sent() == ["x"]
    assert stub.answer(record, ok=False) == "retry"
    assert record.state == QUEUED and record.due == 12.0
    assert stub.s.next_wake(10.0) == 12.0
    stub.now = 11.99
    assert stub.sent() == []
    stub.now = 12.0
    assert stub.sent() == ["x"]
    assert stub.answer(record, ok=False) == "retry"
    assert record.due == 16.0  # doubled for the second retry
    assert stub.s.next_wake(12.0) == 16.0


def test_the_jitter_of_a_backoff_is_drawn_from_the_given_source() -> None:
    stub = Stub(rand=1.0, retry=RetryPolicy(backoff=2.0, jitter=0.25))
    stub.join("n1")
    record = stub.submit("x")
    stub.sent()
    assert stub.answer(record, ok=False) == "retry"
    assert record.due == pytest.approx(1.5)  # 2 s less a quarter of it


# -- results that count and results that do not -------------------------------------------------

def test_a_late_copy_of_an_answered_dispatch_is_a_duplicate() -> None:
    stub = Stub()
    stub.join("n1")
    record = stub.submit("x")
    stub.sent()
    assert stub.answer(record) == "completed" and record.state == COMPLETED
    assert stub.answer(record) == "duplicate"
    assert (stub.s.completed, stub.s.duplicates, stub.s.rejected) == (1, 1, 0)


def test_a_result_with_a_wrong_token_or_from_another_node_is_rejected() -> None:
    stub = Stub()
    stub.join("n1")
    stub.join("n2")
    record = stub.submit("x")
    (node, _ids), = stub.dispatch().items()
    other = "n2" if node == "n1" else "n1"
    assert stub.answer(record, token="f" * 16) == "rejected"
    assert stub.answer(record, node=other) == "rejected"
    assert record.state == RUNNING and stub.s.rejected == 2
    assert stub.answer(record) == "completed"
    assert stub.answer(record, token="f" * 16) == "rejected"  # a forgery, not a duplicate
    assert (stub.s.duplicates, stub.s.rejected) == (0, 3)


def test_the_result_of_an_earlier_dispatch_is_rejected_after_a_redispatch() -> None:
    stub = Stub()
    stub.join("n1", instance="a")
    record = stub.submit("x")
    stub.sent()
    first = (record.dispatch, record.token)
    stub.join("n1", instance="b")  # restarted: its task is dispatched again
    assert stub.sent() == ["x"]
    assert record.dispatch == first[0] + 1 and record.token != first[1]
    assert stub.answer(record, token=first[1]) == "rejected"
    assert stub.answer(record) == "completed"


def test_complete_many_applies_the_good_results_and_leaves_the_rest() -> None:
    stub = Stub()
    stub.join("n1", capacity=3)
    a, b, c = (stub.submit(i) for i in "abc")
    stub.sent()
    results = [TaskResult(id="a", ok=True, attempt=1, token=a.token),
               TaskResult(id="b", ok=True, attempt=1, token="forged"),
               TaskResult(id="c", ok=False, error={"kind": "exception"}, attempt=1,
                          token=c.token)]
    done, rest = stub.s.complete_many("n1", results)
    assert [record.id for record, _ in done] == ["a"] and a.state == COMPLETED
    assert [r.id for r in rest] == ["b", "c"]
    assert b.state == RUNNING and c.state == RUNNING  # decided by result(), one by one
    assert stub.s.nodes["n1"].in_flight == {"b", "c"} and stub.s.completed == 1


# -- lost nodes ----------------------------------------------------------------------------------

def test_a_dead_nodes_tasks_go_back_in_front_of_their_priority_with_an_attempt_counted() -> None:
    stub = Stub(max_attempts=3)
    stub.join("n1", capacity=2)
    a, b = stub.submit("a"), stub.submit("b")
    stub.submit("c")
    stub.sent()
    requeued, failed = stub.join("n1", status="dead")
    assert sorted(requeued) == ["a", "b"] and failed == []
    for record in (a, b):
        assert record.state == QUEUED and record.attempts == 1
        assert record.errors[-1]["kind"] == "node_lost" and record.errors[-1]["node_id"] == "n1"
    stub.join("n2")
    order = stub.run_all("n2")
    assert sorted(order[:2]) == ["a", "b"] and order[2] == "c"
    assert stub.s.requeued == 2


def test_a_task_that_loses_its_node_max_attempts_times_fails() -> None:
    stub = Stub(max_attempts=2)
    record = stub.submit("x")
    for n in (1, 2):
        stub.join(f"n{n}")
        assert stub.sent() == ["x"]
        _requeued, failed = stub.join(f"n{n}", status="dead")
    assert failed == [record] and record.state == FAILED and record.attempts == 2


def test_the_will_of_a_replaced_connection_is_ignored() -> None:
    stub = Stub()
    stub.join("n1", instance="new")
    record = stub.submit("x")
    stub.sent()
    assert stub.join("n1", status="dead", instance="old") == ([], [])
    assert record.state == RUNNING and stub.s.nodes["n1"].alive


def test_a_node_silent_past_its_timeout_is_lost_and_its_tasks_requeued() -> None:
    stub = Stub(node_timeout=3.0)
    stub.join("n1", heartbeat=2.0)  # 2.5 missed heartbeats: 5 s, above the 3 s floor
    record = stub.submit("x")
    stub.sent()
    stub.s.heard_from("n1", 1.0)
    assert stub.s.silent(5.9) == []
    assert stub.s.silent(6.1) == ["n1"]
    requeued, _ = stub.s.lose_node("n1", "stopped heartbeating")
    assert requeued == ["x"] and record.state == QUEUED and record.attempts == 1
    assert not stub.s.nodes["n1"].alive and stub.s.silent(100.0) == []


def test_tasks_handed_back_unstarted_go_in_front_without_an_attempt() -> None:
    stub = Stub()
    stub.join("n1", capacity=1, prefetch=2)
    a, b, c = (stub.submit(i) for i in "abc")
    stub.submit("d")
    stub.sent()
    assert stub.s.release("n1", ["c", "b", "nope"]) == ["c", "b"]
    assert (b.state, c.state, b.attempts) == (QUEUED, QUEUED, 0)
    assert stub.s.nodes["n1"].in_flight == {"a"}
    assert stub.answer(a) == "completed"
    assert stub.run_all("n1") == ["b", "c", "d"]  # the last one handed back first


# -- pinning -------------------------------------------------------------------------------------

def test_a_pinned_task_waits_for_its_node_and_loses_its_pin_when_the_node_is_gone() -> None:
    stub = Stub()
    stub.join("n1", capacity=4)
    stub.join("n2", capacity=1)
    first = stub.submit("first", pinned="n2")
    stub.submit("second", pinned="n2")
    assert stub.dispatch() == {"n2": ["first"]}  # `second` waits: n2 is full, n1 idle
    assert stub.answer(first) == "completed"
    stub.join("n2", status="offline")
    assert stub.dispatch() == {"n1": ["second"]}


# -- work stealing -------------------------------------------------------------------------------

def test_an_idle_node_gets_prefetched_work_only_once_it_has_waited_a_while() -> None:
    stub = Stub()
    stub.join("holder", capacity=1, prefetch=3)
    for _ in range(4):
        stub.submit()
    assert len(stub.sent()) == 4
    assert stub.s.steals(0.0) == {}  # nobody is idle
    stub.join("idle", capacity=2)
    assert stub.s.steals(0.05, age=0.1) == {}   # the work is too young to move
    assert stub.s.steals(0.2, age=0.1) == {"holder": 2}  # 3 extra, 2 free slots
    assert stub.s.steals(0.25, age=0.1) == {}   # asked once per `age`
    assert stub.s.steals(0.35, age=0.1) == {"holder": 2}


def test_work_is_not_stolen_for_a_node_that_cannot_run_it() -> None:
    stub = Stub()
    stub.join("holder", capacity=1, prefetch=3)
    for _ in range(4):
        stub.submit()
    stub.sent()
    stub.join("other", capacity=2, tasks="primes")
    assert stub.s.steals(1.0) == {}


# -- start times and rate limits -----------------------------------------------------------------

def test_a_task_whose_start_time_came_goes_ahead_of_its_priority() -> None:
    stub = Stub()
    stub.join("n1")
    busy = stub.submit("busy")
    assert stub.sent() == ["busy"]
    stub.submit("waiting", priority=5)
    stub.submit("urgent", priority=6)
    stub.submit("later", priority=5, due=1.0)
    assert stub.s.next_wake(0.0) == 1.0
    stub.now = 1.0
    assert stub.sent() == []  # promoted, but the node is full
    assert stub.answer(busy) == "completed"
    assert stub.run_all("n1") == ["urgent", "later", "waiting"]
    assert stub.s.next_wake(1.0) is None


def test_a_rate_limited_name_is_parked_and_released_as_its_bucket_fills() -> None:
    stub = Stub(rate_limits=[RateLimit("slow", 10.0)])
    stub.join("n1", capacity=10)
    slow = [stub.submit(name="slow", priority=p) for p in (1, 9, 5)]
    fast = stub.submit(name="fast")
    assert sorted(stub.sent()) == sorted([slow[1].id, fast.id])  # one start, the most urgent
    wake = stub.s.next_wake(0.0)
    assert wake == pytest.approx(0.1)
    stub.now = wake
    assert stub.sent() == [slow[2].id]  # parked tasks keep their priority order
    stub.now = wake + 0.1
    assert stub.sent() == [slow[0].id]


# -- cancelling ----------------------------------------------------------------------------------

def test_a_cancelled_queued_task_is_never_dispatched() -> None:
    stub = Stub()
    record = stub.submit("x")
    assert stub.s.cancel("x", "not wanted", 0.0) == ("queued", record)
    assert record.state == CANCELLED and stub.s.queued == 0 and stub.s.cancelled == 1
    stub.join("n1")
    assert stub.dispatch() == {}
    assert stub.s.cancel("x", "again", 0.0) == ("", None)


def test_a_cancelled_running_task_keeps_its_slot_until_its_node_says_it_stopped() -> None:
    stub = Stub()
    stub.join("n1")
    record = stub.submit("x")
    stub.submit("next")
    assert stub.sent() == ["x"]
    assert stub.s.cancel("x", "not wanted", 0.0) == ("running", record)
    assert record.state == CANCELLED and record.errors[-1]["kind"] == "cancelled"
    assert stub.sent() == []  # its slot is still taken
    assert stub.answer(record, ok=False, kind="cancelled") == "duplicate"
    assert stub.sent() == ["next"]


# -- after a take-over, and lost messages --------------------------------------------------------

def test_queued_tasks_a_node_says_it_holds_are_adopted_not_dispatched_again() -> None:
    stub = Stub()
    record = stub.submit("x")  # as a master restored it from its journal after a take-over
    stub.submit("y")
    stub.join("n1", capacity=2)
    assert stub.s.adopt("n1", ["x", "unknown"]) == [record]
    assert record.state == RUNNING and record.token == "" and stub.s.queued == 1
    assert stub.sent() == ["y"]
    assert stub.answer(record, token="whatever-it-got") == "completed"  # any token from n1
    assert stub.s.adopt("gone", ["y"]) == []


def test_a_task_lost_on_the_way_is_sent_again_to_the_same_node_as_the_same_dispatch() -> None:
    stub = Stub()
    stub.join("n1", capacity=2)
    record = stub.submit("x")
    assert stub.sent() == ["x"]
    dispatch = (record.dispatch, record.token)
    stub.now = 0.5
    assert stub.s.stranded("n1", stub.now, age=1.0) == 0  # not overdue yet
    stub.now = 2.0
    assert stub.s.stranded("n1", stub.now, age=1.0) == 1
    assert stub.dispatch() == {"n1": ["x"]}
    assert (record.dispatch, record.token) == dispatch and record.attempts == 0
    assert stub.dispatch() == {}
    assert stub.answer(record) == "completed"
