"""The event system: subscribers, callbacks with data, catch-all listeners, broken handlers."""

from __future__ import annotations

import asyncio
import logging

import pytest

from pipelines import EventSystem


def test_subscribe_returns_an_event_set_by_publish() -> None:
    async def scenario() -> None:
        events = EventSystem()
        completed = events.subscribe("job_completed")
        other = events.subscribe("job_failed")
        events.publish("job_completed", {"job": "a"})
        await asyncio.wait_for(completed.wait(), timeout=1)
        assert not other.is_set()
        assert events.last("job_completed") == {"job": "a"}

    asyncio.run(scenario())


def test_unsubscribed_events_are_no_longer_set() -> None:
    events = EventSystem()
    event = events.subscribe("x")
    events.unsubscribe("x", event)
    events.publish("x")
    assert not event.is_set()


def test_callbacks_receive_the_data_and_listeners_every_event() -> None:
    events = EventSystem()
    received: list[object] = []
    forwarded: list[tuple[str, object]] = []
    events.on("job_started", received.append)
    events.add_listener(lambda name, data: forwarded.append((name, data)))
    events.publish("job_started", {"job": "a"})
    events.publish("pipeline_failed", {"pipeline": "p"})
    assert received == [{"job": "a"}]
    assert forwarded == [("job_started", {"job": "a"}), ("pipeline_failed", {"pipeline": "p"})]


def test_removed_callbacks_and_listeners_are_not_called() -> None:
    events = EventSystem()
    calls: list[object] = []
    events.on("x", calls.append)
    events.off("x", calls.append)
    listener = lambda name, data: calls.append(name)  # noqa: E731
    events.add_listener(listener)
    events.remove_listener(listener)
    events.publish("x", 1)
    assert calls == []


def test_a_failing_callback_is_logged_and_does_not_stop_the_others(
        caplog: pytest.LogCaptureFixture) -> None:
    events = EventSystem()
    received: list[object] = []

    def broken(data: object) -> None:
        raise RuntimeError("broken handler")

    events.on("x", broken)
    events.on("x", received.append)
    events.add_listener(lambda name, data: 1 / 0)
    events.add_listener(lambda name, data: received.append(name))
    with caplog.at_level(logging.ERROR, logger="pipelines.events"):
        events.publish("x", 7)
    assert received == [7, "x"]
    assert "broken handler" in caplog.text
    assert "ZeroDivisionError" in caplog.text


def test_async_callbacks_are_scheduled_and_their_failures_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        events = EventSystem()
        got = asyncio.Event()
        seen: list[object] = []

        async def handler(data: object) -> None:
            seen.append(data)
            got.set()

        entered = asyncio.Event()

        async def broken(name: str, data: object) -> None:
            entered.set()
            raise ValueError("async handler broke")

        events.on("x", handler)
        events.add_listener(broken)
        events.publish("x", "payload")
        await asyncio.wait_for(got.wait(), timeout=1)
        assert seen == ["payload"]
        await asyncio.wait_for(entered.wait(), timeout=1)
        for _ in range(10):  # the failure is logged by a done-callback: let it run, bounded
            if "async handler broke" in caplog.text:
                break
            await asyncio.sleep(0)

    with caplog.at_level(logging.ERROR, logger="pipelines.events"):
        asyncio.run(scenario())
    assert "async handler broke" in caplog.text


def test_wait_for_returns_matching_data_and_is_bounded() -> None:
    async def scenario() -> None:
        events = EventSystem()
        waiting = asyncio.ensure_future(
            events.wait_for("job_completed", timeout=1, predicate=lambda d: d["job"] == "b"))
        await asyncio.sleep(0)
        events.publish("job_completed", {"job": "a"})
        events.publish("job_completed", {"job": "b"})
        assert await waiting == {"job": "b"}
        with pytest.raises(asyncio.TimeoutError):
            await events.wait_for("job_completed", timeout=0.01)

    asyncio.run(scenario())
