"""Waits that end by default, and shared state touched only under its lock.

No broker: the master and the client are built but not started, their session replaced by a
stub, so each test drives exactly the code path it is about.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import threading
import time
from typing import Any

import pytest

from core.defaults import DEFAULT_WAIT
from core.errors import FabricTimeout, QueueFull, TaskRefused
from core.protocol import QUEUE_FULL, NodeReport, SubmitReply, TaskOutcome, make_task
from master.canvas import ChainHandle, GroupHandle
from master.client import FabricClient
from master.handles import TaskHandle
from master.transport import MasterNodeTransport

UNUSED_BROKER = "mqtt://127.0.0.1:1"  # never connected to: nothing here starts a session


class StubSession:
    """Takes publishes and does nothing else."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, **_kw: Any) -> None:
        self.published.append((topic, payload))


class LockedDict(dict):
    """A dict that raises when changed without `lock` held (a Lock or an RLock)."""

    def __init__(self, lock: Any, *args: Any) -> None:
        super().__init__(*args)
        self._guard = lock

    def _check(self) -> None:
        owned = getattr(self._guard, "_is_owned", None)
        if not (owned() if owned is not None else self._guard.locked()):
            raise AssertionError("changed without the lock held")

    def __setitem__(self, key: Any, value: Any) -> None:
        self._check()
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self._check()
        super().__delitem__(key)

    def pop(self, *args: Any) -> Any:
        self._check()
        return super().pop(*args)


# -- bounded by default ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", [TaskHandle.outcome, TaskHandle.result, TaskHandle.wait,
                                    FabricClient.outcome, FabricClient.result,
                                    GroupHandle.result, GroupHandle.outcomes, GroupHandle.wait,
                                    ChainHandle.outcome, ChainHandle.result, ChainHandle.wait])
def test_outcome_waits_end_by_default(method: Any) -> None:
    assert inspect.signature(method).parameters["timeout"].default == DEFAULT_WAIT
    assert 0 < DEFAULT_WAIT < float("inf")


def test_a_handle_waited_on_too_long_raises_and_none_still_waits_to_the_end() -> None:
    handle = TaskHandle("t-1")
    with pytest.raises(FabricTimeout, match="t-1 did not finish within 0.05s"):
        handle.result(0.05)
    asked = threading.Event()
    outcome = TaskOutcome(id="t-1", state="completed", value=7)

    def resolve() -> None:
        asked.wait(5.0)
        handle.resolve(outcome)

    thread = threading.Thread(target=resolve)
    thread.start()
    asked.set()
    assert handle.result(None) == 7  # None: until it ends (here: at once, once resolved)
    thread.join(5.0)


def test_an_awaited_handle_times_out_and_leaves_its_future_to_the_others() -> None:
    handle = TaskHandle("t-2")

    async def give_up() -> None:
        with pytest.raises(FabricTimeout, match="t-2 did not finish within 0.05s"):
            await handle.wait(0.05)

    asyncio.run(give_up())
    assert not handle.future.cancelled()
    handle.resolve(TaskOutcome(id="t-2", state="completed", value="late"))
    assert handle.future.result(0).value == "late"

    async def awaited() -> Any:
        return await handle

    assert asyncio.run(awaited()) == "late"


# -- the client's handles --------------------------------------------------------------------------

def test_refused_submissions_leave_the_register_under_its_lock() -> None:
    client = FabricClient(broker_url=UNUSED_BROKER)
    client._handles = LockedDict(client._lock)
    specs = [make_task("echo", [i]) for i in range(3)]
    reply = SubmitReply(request_id="r", accepted=(),
                        rejected=((specs[0].id, "unknown task"),
                                  (specs[1].id, f"{QUEUE_FULL}: 10 queued"),
                                  (specs[2].id, f"{QUEUE_FULL}: 10 queued")))
    client._submit_once = lambda _specs, _deadline: reply  # type: ignore[method-assign]
    handles = client._send_chunk(specs, deadline=0.0)  # past: the full queue is not retried
    with pytest.raises(TaskRefused):
        handles[0].outcome(0)
    for handle in handles[1:]:
        with pytest.raises(QueueFull):
            handle.outcome(0)
    assert client.pending() == 0


# -- the master's report waiters -----------------------------------------------------------------

def _master(clock: Any = None) -> MasterNodeTransport:
    master = MasterNodeTransport(broker_url=UNUSED_BROKER, **({"clock": clock} if clock else {}))
    master._session = StubSession()  # type: ignore[assignment]
    return master


def test_broadcast_control_registers_its_waiter_under_the_loops_lock() -> None:
    master = _master()
    master._report_waiters = LockedDict(master._lock)
    try:
        master.broadcast_control("report", on_report=lambda _report: None)
        assert len(master._report_waiters) == 1
    finally:
        master.journal.close()


def test_a_report_window_is_measured_on_the_masters_clock() -> None:
    now = [1000.0]
    master = _master(clock=lambda: now[0])
    reports: list[NodeReport] = []
    try:
        request_id = master.broadcast_control("report", on_report=reports.append,
                                              report_window=30.0)
        report = NodeReport(node_id="n1", request_id=request_id).encode()
        deliver = master._inbound("results")
        deliver(master.topics.results("n1"), report)
        assert [r.node_id for r in reports] == ["n1"]
        now[0] += 31.0  # past the window on the master's clock, not on time.monotonic's
        deliver(master.topics.results("n1"), report)
        assert len(reports) == 1
    finally:
        master.journal.close()


def test_waiters_added_while_the_loop_expires_them_are_neither_lost_nor_an_error(
        caplog: pytest.LogCaptureFixture) -> None:
    """broadcast_control from several threads while turns expire waiters on the loop (before
    the lock, a turn iterating the waiters failed with "dictionary changed size" in most runs
    with threads switched this often)."""
    now = [0.0]
    master = _master(clock=lambda: now[0])
    kept: list[str] = []
    stop = threading.Event()

    def broadcaster() -> None:
        for _ in range(1000):
            master.broadcast_control("report", on_report=lambda _r: None, report_window=0.0)
            kept.append(master.broadcast_control("report", on_report=lambda _r: None,
                                                 report_window=1e9))

    def loop() -> None:
        while not stop.is_set():
            now[0] += 1.0  # every turn checks liveness and expires the lapsed waiters
            master._wake()

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch mid-iteration: the race shows if it is there
    try:
        looper = threading.Thread(target=loop)
        looper.start()
        senders = [threading.Thread(target=broadcaster) for _ in range(3)]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join(30.0)
        stop.set()
        looper.join(30.0)
        now[0] += 1.0
        master._wake()
        assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
        assert set(master._report_waiters) == set(kept) and len(kept) == 3000
    finally:
        sys.setswitchinterval(switch)
        master.journal.close()


# -- waits on events, not polls -----------------------------------------------------------------

def test_a_graceful_stop_waits_for_the_running_task_and_sends_its_result(fabric: Any) -> None:
    from node.transport import ComputeNodeTransport
    from support.fabric import wait_ready, wait_until

    fabric.master()
    node = ComputeNodeTransport(broker_url=fabric.broker_url, root=fabric.root, node_id="drainer",
                                heartbeat=0.2, drain_timeout=60.0)
    node.start()
    try:
        with fabric.client() as client:
            wait_ready(client, "drainer")
            handle = client.submit("sleep", [1.0])
            wait_until(lambda: client.task(handle.id)["state"] == "running", 30,
                       message="the task running on the node")
            started = time.monotonic()
            node.stop(graceful=True)
            took = time.monotonic() - started
            assert handle.result(timeout=30) == 1.0  # its own result, not a second run's
            assert len(client.task(handle.id)["history"]) == 1
            assert took < 30.0  # woken when the task ended, long before the drain bound
    finally:
        node.stop(graceful=False)


def test_flush_returns_once_every_publish_is_acknowledged(fabric: Any) -> None:
    from core.mqtt import MqttSession
    from core.url import parse_broker_url

    session = MqttSession(broker=parse_broker_url(fabric.broker_url), client_id="flusher")
    session.start(timeout=10.0)
    try:
        for i in range(500):
            session.publish(f"{fabric.root}/test/flush", str(i).encode(), qos=1)
        assert session.flush(timeout=30.0)
        with session._client._out_message_mutex:
            assert not session._client._out_messages
    finally:
        session.stop(timeout=5.0)
