"""In-process events of pipelines and jobs, so the master can react to them and forward them.

Three ways to listen, all fed by `publish`:

- `subscribe(name)` returns an `asyncio.Event` that is set on every publish of that name (clear it
  to wait for the next one; `last(name)` gives the data of the latest publish);
- `on(name, callback)` calls `callback(data)`;
- `add_listener(listener)` calls `listener(name, data)` for every event, which is how the master
  forwards all of them to MQTT.

Callbacks and listeners may be plain functions or coroutine functions; a coroutine is scheduled
on the running event loop, not awaited, so `publish` never blocks. A callback that raises is
logged and the others still run: a broken listener must not break a pipeline. `publish` and
every other method must be called from the thread that runs the event loop.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import Any

__all__ = [
    "EventSystem",
    "Callback",
    "Listener",
    "JOB_STARTED",
    "JOB_COMPLETED",
    "JOB_FAILED",
    "JOB_RETRYING",
    "PIPELINE_STARTED",
    "PIPELINE_COMPLETED",
    "PIPELINE_FAILED",
    "PIPELINE_PAUSED",
    "PIPELINE_RESUMED",
    "EVENT_NAMES",
]

logger = logging.getLogger(__name__)

JOB_STARTED = "job_started"
JOB_COMPLETED = "job_completed"
JOB_FAILED = "job_failed"
JOB_RETRYING = "job_retrying"
PIPELINE_STARTED = "pipeline_started"
PIPELINE_COMPLETED = "pipeline_completed"
PIPELINE_FAILED = "pipeline_failed"
PIPELINE_PAUSED = "pipeline_paused"
PIPELINE_RESUMED = "pipeline_resumed"
EVENT_NAMES: tuple[str, ...] = (
    JOB_STARTED, JOB_COMPLETED, JOB_FAILED, JOB_RETRYING,
    PIPELINE_STARTED, PIPELINE_COMPLETED, PIPELINE_FAILED, PIPELINE_PAUSED, PIPELINE_RESUMED,
)

Callback = Callable[[Any], Any]
Listener = Callable[[str, Any], Any]
_Predicate = Callable[[Any], bool]


class EventSystem:
    """Named events with optional data, delivered to subscribers, callbacks and listeners."""

    def __init__(self) -> None:
        self.events: dict[str, list[asyncio.Event]] = {}
        self._callbacks: dict[str, list[Callback]] = {}
        self._listeners: list[Listener] = []
        self._waiters: dict[str, list[tuple[_Predicate | None, asyncio.Future[Any]]]] = {}
        self._last: dict[str, Any] = {}
        self._scheduled: set[asyncio.Future[Any]] = set()

    def subscribe(self, event_name: str) -> asyncio.Event:
        """An `asyncio.Event` of its own for this subscriber, set on each publish of the name."""
        event = asyncio.Event()
        self.events.setdefault(event_name, []).append(event)
        return event

    def unsubscribe(self, event_name: str, event: asyncio.Event) -> None:
        """Stop setting `event`; unknown events are ignored."""
        subscribers = self.events.get(event_name, [])
        if event in subscribers:
            subscribers.remove(event)

    def on(self, event_name: str, callback: Callback) -> None:
        """Call `callback(data)` on each publish of `event_name`."""
        self._callbacks.setdefault(event_name, []).append(callback)

    def off(self, event_name: str, callback: Callback) -> None:
        """Remove a callback added with `on`; unknown callbacks are ignored."""
        callbacks = self._callbacks.get(event_name, [])
        if callback in callbacks:
            callbacks.remove(callback)

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(event_name, data)` for every event published."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Remove a listener added with `add_listener`; unknown listeners are ignored."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def last(self, event_name: str, default: Any = None) -> Any:
        """The data of the latest publish of `event_name`, or `default` if there was none."""
        return self._last.get(event_name, default)

    def publish(self, event_name: str, data: Any = None) -> None:
        """Notify everyone interested in `event_name`; never raises because of a listener."""
        self._last[event_name] = data
        for event in list(self.events.get(event_name, ())):
            event.set()
        waiters = self._waiters.get(event_name, [])
        for entry in list(waiters):
            predicate, future = entry
            if future.done():
                waiters.remove(entry)
                continue
            try:
                matched = predicate is None or predicate(data)
            except Exception:
                logger.exception("predicate waiting for event %r failed", event_name)
                continue
            if matched:
                waiters.remove(entry)
                future.set_result(data)
        for callback in list(self._callbacks.get(event_name, ())):
            self._call(callback, event_name, data)
        for listener in list(self._listeners):
            self._call(listener, event_name, event_name, data)

    async def wait_for(
        self, event_name: str, *, timeout: float, predicate: _Predicate | None = None
    ) -> Any:
        """The data of the next publish of `event_name` (matching `predicate`, if given).

        Raises `TimeoutError` (asyncio's) when none comes within `timeout` seconds.
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        entry = (predicate, future)
        waiters = self._waiters.setdefault(event_name, [])
        waiters.append(entry)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            if entry in waiters:
                waiters.remove(entry)

    def _call(self, function: Callable[..., Any], event_name: str, *args: Any) -> None:
        try:
            outcome = function(*args)
        except Exception:
            logger.exception("handler %r of event %r failed", function, event_name)
            return
        if not inspect.isawaitable(outcome):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no running loop: nothing can run the coroutine
            if inspect.iscoroutine(outcome):
                outcome.close()
            logger.error("async handler %r of event %r needs a running event loop",
                         function, event_name)
            return
        scheduled = asyncio.ensure_future(outcome, loop=loop)
        self._scheduled.add(scheduled)
        scheduled.add_done_callback(lambda done: self._finished(done, function, event_name))

    def _finished(self, done: asyncio.Future[Any], function: Callable[..., Any],
                  event_name: str) -> None:
        self._scheduled.discard(done)
        if not done.cancelled() and done.exception() is not None:
            logger.error("async handler %r of event %r failed", function, event_name,
                         exc_info=done.exception())
