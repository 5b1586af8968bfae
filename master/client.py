"""FabricClient: submit tasks and ask questions over MQTT, as the CLI and any program do.

A client needs nothing but a broker connection. Task ids are chosen here, so a submission
resent after a lost acknowledgement is harmless; outcomes are pushed to the client's own
topic, and asked for again after a reconnect or a master restart, so a waiting submitter
gets its result through either.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Iterable

from core import codec, states
from core.defaults import DEFAULT_WAIT
from core.errors import ConfigError, DecodeError, EncodeError, FabricError, FabricTimeout, QueueFull, TaskRefused
from core.mqtt import MqttSession, TlsSettings
from core.protocol import (DEFAULT_PRIORITY, QUEUE_FULL, MasterStatus, Message, OutcomeBatch, Query,
                           QueryReply, Submission, SubmitReply, TaskOutcome, TaskSpec,
                           decode_message, make_task, new_task_id)
from core.topics import DEFAULT_ROOT, Topics
from core.url import BrokerUrl, parse_broker_url
from master.handles import TaskHandle
from master.start_time import not_before

if TYPE_CHECKING:
    from master.canvas import ChainHandle, GroupHandle

__all__ = ["FabricClient"]

log = logging.getLogger(__name__)

_SUBMIT_CHUNK = 1000
_SUBMIT_WINDOW = 4  # submissions awaiting their acknowledgement at once
_FINAL = states.FINAL_STATES


class FabricClient:
    """A connection to the fabric for submitting tasks and querying the master."""

    def __init__(self, *, broker_url: BrokerUrl | str | None = None, root: str = DEFAULT_ROOT,
                 client_id: str | None = None, tls: TlsSettings | None = None,
                 resend_after: float = 2.0, max_payload: int = codec.PAYLOAD_LIMIT) -> None:
        if not isinstance(broker_url, BrokerUrl):
            broker_url = parse_broker_url(broker_url)
        self.topics = Topics(root)
        self.client_id = client_id or f"client-{uuid.uuid4().hex[:10]}"
        self.resend_after = resend_after
        # a submission's bytes stay under this (the broker's max_packet_size less the MQTT
        # header): the broker disconnects a client whose packet is larger
        self.max_payload = max_payload
        self._lock = threading.Lock()
        self._handles: dict[str, TaskHandle] = {}
        self._unacked: dict[str, tuple[Submission, float, threading.Event]] = {}
        self._replies: dict[str, tuple[threading.Event, list]] = {}
        self._master_state: str | None = None
        self._stop = threading.Event()
        self._session = MqttSession(broker=broker_url, client_id=self.client_id, tls=tls)
        self._session.subscribe(self.topics.client(self.client_id), self._on_message)
        self._session.subscribe(self.topics.master_status, self._on_master_status)
        self._session.on_connect(lambda _present: self._recover_soon())
        self._watchdog = threading.Thread(target=self._watch, name="client-watch", daemon=True)

    def start(self, *, timeout: float = 10.0) -> "FabricClient":
        if not self._watchdog.is_alive():
            self._session.start(timeout=timeout)
            self._watchdog.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._session.stop(timeout=2.0)

    def __enter__(self) -> "FabricClient":
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- submitting ------------------------------------------------------------------------------

    def submit(self, name: str, args: Iterable[Any] = (), kwargs: dict | None = None, *,
               priority: int = DEFAULT_PRIORITY, task_id: str | None = None,
               max_attempts: int = 0, timeout: float = 0.0,
               ack_timeout: float = 10.0, backoff: float | None = None,
               backoff_max: float | None = None, retry_on: Iterable[str] | None = None,
               countdown: float = 0.0, eta: Any = None) -> TaskHandle:
        """Submit one task; returns once the master has journalled it. A `task_id` of your
        own names this work: submitting it again is harmless, binding it to other work is
        refused (TaskRefused). `max_attempts`: real runs allowed (0: the master's default).
        `timeout`: seconds one run may take on its node, else it ends `timeout` (0: none).
        `backoff`, `backoff_max`, `retry_on`: its retry policy (master.retry_policy; None:
        the master's). `countdown` (seconds) or `eta` (epoch seconds, ISO 8601 or datetime):
        it starts no earlier than that."""
        return self.submit_many([(name, list(args), dict(kwargs or {}), priority, task_id,
                                  max_attempts, timeout)], ack_timeout=ack_timeout,
                                backoff=backoff, backoff_max=backoff_max, retry_on=retry_on,
                                countdown=countdown, eta=eta)[0]

    def dispatch_lambda(self, lambda_data: dict, *, priority: int = DEFAULT_PRIORITY) -> TaskHandle:
        """Run a named lambda (`name`, `event`, `env`, `timeout`, `memory`) on some node."""
        return self.submit("lambda", kwargs=lambda_data, priority=priority)

    def group(self, calls: Iterable[Any], *, ack_timeout: float = 30.0) -> GroupHandle:
        """Submit `call(...)`s (or submit_many tuples) at once, to run in parallel; the
        handle's `result(timeout)` is their values in order (master.canvas)."""
        from master.canvas import group
        return group(self, calls, ack_timeout=ack_timeout)

    def chain(self, calls: Iterable[Any], *, ack_timeout: float = 10.0) -> ChainHandle:
        """Run `call(...)`s one after another, each given the previous value as its first
        argument; the handle's `result(timeout)` is the last value (master.canvas)."""
        from master.canvas import chain
        return chain(self, calls, ack_timeout=ack_timeout)

    def dispatch_pipeline(self, pipeline_data: dict, *, timeout: float = 10.0) -> str:
        """Run a pipeline given as data (`name`, `jobs`, optional `metadata` and `tasks`) once
        on the fabric, now; its run id. The master validates it like a pipelines file."""
        return self.query("pipelines", {"op": "dispatch", "pipeline": pipeline_data},
                          timeout=timeout)["run_id"]

    def submit_many(self, calls: Iterable[tuple], *,
                    ack_timeout: float = 30.0,
                    on_progress: Callable[[int], None] | None = None,
                    backoff: float | None = None, backoff_max: float | None = None,
                    retry_on: Iterable[str] | None = None, countdown: float = 0.0,
                    eta: Any = None) -> list[TaskHandle]:
        """Submit (name, args, kwargs, priority[, task_id[, max_attempts[, timeout]]]) calls in
        batches; each id once, journalled. A caller-chosen task id makes a resubmission after
        a crash harmless.

        Tasks the master refuses because its queue is full are resent with backoff until
        `ack_timeout` passes, then their handles fail with QueueFull; a task refused for any
        other reason fails at once with TaskRefused.

        The retry policy and start time keywords (as for `submit`) apply to every call.
        """
        start = not_before(countdown=countdown, eta=eta, now=time.time())
        policy = {"backoff": backoff, "backoff_max": backoff_max, "retry_on": retry_on,
                  "not_before": start}
        specs = [make_task(c[0], c[1], c[2], priority=c[3], task_id=c[4] if len(c) > 4 else None,
                           max_attempts=c[5] if len(c) > 5 else 0,
                           timeout=c[6] if len(c) > 6 else 0.0, **policy)
                 for c in calls]  # every call checked before any is sent
        deadline = time.monotonic() + ack_timeout
        chunks = self._chunks_within(specs)
        if len(chunks) <= 1:
            handles = []
            for chunk in chunks:
                handles = self._send_chunk(chunk, deadline)
                if on_progress is not None:
                    on_progress(len(chunk))
            return handles
        # Several submissions in flight at once, so the master journals one while the next is
        # made and travels; each still waits for its own acknowledgement, resent on silence.
        handles, done = [], 0
        with ThreadPoolExecutor(max_workers=_SUBMIT_WINDOW,
                                thread_name_prefix="client-submit") as pool:
            futures = [pool.submit(self._send_chunk, chunk, deadline) for chunk in chunks]
            try:
                for chunk, future in zip(chunks, futures):
                    handles.extend(future.result())
                    done += len(chunk)
                    if on_progress is not None:
                        on_progress(done)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
        return handles

    def _chunks_within(self, specs: list[TaskSpec]) -> list[list[TaskSpec]]:
        """Up to `_SUBMIT_CHUNK` tasks a submission, split further so each is under
        `max_payload` bytes; a task too big alone is refused (EncodeError naming its size and
        the limit) before anything is sent."""
        def payload(part: list) -> bytes:
            return Submission(client_id=self.client_id, request_id=new_task_id(),
                              tasks=tuple(part)).encode()
        chunks: list[list[TaskSpec]] = []
        for start in range(0, len(specs), _SUBMIT_CHUNK):
            for part, data in codec.encode_within(specs[start:start + _SUBMIT_CHUNK], payload,
                                                  limit=self.max_payload):
                if len(data) > self.max_payload:
                    raise EncodeError(
                        f"task {part[0].id} ({part[0].name}) is {len(data):,} bytes encoded, "
                        f"over the {self.max_payload:,}-byte limit of one message (the "
                        "broker's max_packet_size): nothing was submitted; pass large data "
                        "by reference (a path or URL) instead")
                chunks.append(part)
        return chunks

    def _send_chunk(self, specs: list[TaskSpec], deadline: float) -> list[TaskHandle]:
        """Handles for `specs`, registered before the submission goes, then sent."""
        handles = [TaskHandle(s.id) for s in specs]
        with self._lock:
            register = self._handles
            for handle in handles:
                register[handle.id] = handle
        self._send_until_accepted(specs, deadline)
        return handles

    def _send_until_accepted(self, specs: list[TaskSpec], deadline: float) -> None:
        pending = specs
        backoff = 0.05
        while pending:
            reply = self._submit_once(pending, deadline)
            refused = {task_id for task_id, reason in reply.rejected
                       if reason.startswith(QUEUE_FULL)}
            self._reject({task_id: TaskRefused(f"task {task_id} refused: {reason}")
                          for task_id, reason in reply.rejected
                          if not reason.startswith(QUEUE_FULL)})
            pending = [s for s in pending if s.id in refused]
            if not pending:
                return
            if time.monotonic() + backoff > deadline:
                reasons = dict(reply.rejected)
                self._reject({spec.id: QueueFull(reasons.get(spec.id, "refused"))
                              for spec in pending})
                return
            time.sleep(backoff)  # the master's queue is full: slow down, then resend
            backoff = min(backoff * 2, 1.0)

    def _reject(self, errors: dict[str, FabricError]) -> None:
        """Fail these tasks' handles (taken off the register under its lock, like `_resolve`)."""
        if not errors:
            return
        with self._lock:
            pop = self._handles.pop
            handles = [(pop(task_id, None), error) for task_id, error in errors.items()]
        for handle, error in handles:
            if handle is not None:
                handle.reject(error)

    def _submit_once(self, specs: list[TaskSpec], deadline: float) -> SubmitReply:
        return self._request(
            self.topics.submit(self.client_id),
            lambda request_id: Submission(client_id=self.client_id, request_id=request_id,
                                          tasks=tuple(specs)),
            deadline, f"the master did not acknowledge {len(specs)} tasks in time")

    # -- asking ----------------------------------------------------------------------------------

    def query(self, what: str, params: dict | None = None, *, timeout: float = 10.0) -> Any:
        """Ask the master (`nodes`, `status`, `outcomes`, ...); raises on error or silence."""
        reply: QueryReply = self._request(
            self.topics.query(self.client_id),
            lambda request_id: Query(client_id=self.client_id, request_id=request_id, what=what,
                                     params=params or {}),
            time.monotonic() + timeout,
            f"no answer from the master to {what!r} within {timeout:g}s")
        if not reply.ok:
            raise FabricError(reply.error)
        return reply.data

    def _request(self, topic: str, make: Callable[[str], Message], deadline: float,
                 silence: str) -> Any:
        """Publish a request, again after each `resend_after` of silence, and return the
        master's reply to it; FabricTimeout saying `silence` once `deadline` passes."""
        request_id = new_task_id()  # unique like a task id, without a system call
        event = threading.Event()
        slot: list = []
        with self._lock:
            self._replies[request_id] = (event, slot)
        payload = make(request_id).encode()
        try:
            while True:
                self._session.publish(topic, payload)
                if event.wait(min(self.resend_after, max(0.0, deadline - time.monotonic()))):
                    return slot[0]
                if time.monotonic() >= deadline:
                    raise FabricTimeout(f"{silence} (is master-node serve running on this "
                                        "broker and root?)")
        finally:
            with self._lock:
                self._replies.pop(request_id, None)

    def nodes(self, *, timeout: float = 10.0) -> list[dict]:
        return self.query("nodes", timeout=timeout)

    # -- tasks by id (whoever submitted them) ----------------------------------------------------

    def handle(self, task_id: str, *, timeout: float = 10.0) -> TaskHandle:
        """A handle on any task by its id (submitted by this client or another, earlier or
        from another process): the master pushes its outcome here when it ends.
        ConfigError if the master knows no task with that id."""
        if not isinstance(task_id, str) or not 0 < len(task_id) <= 128:
            raise ConfigError(f"a task id must be a string of 1-128 characters, got {task_id!r}")
        with self._lock:
            handle = self._handles.get(task_id)
            if handle is None:
                handle = self._handles[task_id] = TaskHandle(task_id)
        try:
            data = self.query("outcomes", {"ids": [task_id], "watch": True}, timeout=timeout)
        except BaseException:
            self._drop_handle(handle)
            raise
        outcome = TaskOutcome.from_dict(data[0])
        if outcome.state == states.UNKNOWN:  # the master says why (never submitted, or expired)
            self._drop_handle(handle)
            raise ConfigError(str((outcome.error or {}).get("message") or
                                  f"no task with id {task_id!r} is known to the master"))
        self._resolve([outcome])
        return handle

    def outcome(self, task_id: str, timeout: float | None = DEFAULT_WAIT) -> TaskOutcome:
        """The final outcome of the task with this id, waiting up to `timeout` seconds
        (`DEFAULT_WAIT`, 300, unless told; None: until it ends); FabricTimeout if it is still
        queued or running then."""
        handle = self.handle(task_id)
        try:
            return handle.outcome(timeout)
        except FabricTimeout:
            self._drop_handle(handle)
            raise

    def result(self, task_id: str, timeout: float | None = DEFAULT_WAIT) -> Any:
        """The value of the task with this id (waiting as `outcome` does); TaskFailed if it
        failed or was cancelled."""
        handle = self.handle(task_id)
        try:
            return handle.result(timeout)
        except FabricTimeout:
            self._drop_handle(handle)
            raise

    def _drop_handle(self, handle: TaskHandle) -> None:
        """Stop waiting on a handle nobody waits on any more."""
        with self._lock:
            if self._handles.get(handle.id) is handle:
                del self._handles[handle.id]

    def task(self, task_id: str, *, timeout: float = 10.0) -> dict:
        """Everything the master knows about one task: its call, state, times, and each
        attempt (`history`: node, started, ended, outcome, message). ConfigError if unknown."""
        info = self.query("task", {"id": task_id}, timeout=timeout)
        if info is None:
            raise ConfigError(f"no task with id {task_id!r} is known to the master")
        return info

    def tasks(self, *, state: str | None = None, name: str | None = None, limit: int = 50,
              timeout: float = 10.0) -> list[dict]:
        """The latest tasks, newest first: optionally only one state (queued, running,
        completed, failed, cancelled) and/or task name."""
        params: dict[str, Any] = {"limit": limit}
        if state is not None:
            params["state"] = state
        if name is not None:
            params["name"] = name
        return self.query("tasks", params, timeout=timeout)

    def cancel(self, task_ids: str | Iterable[str], *, timeout: float = 10.0) -> list[dict]:
        """Cancel tasks by id: a queued one never starts, a running one is stopped on its
        node; each ends `cancelled`, once. One verdict per id: `was` (queued, running, or
        the final state of a task that had ended already: then nothing changed) and `state`."""
        ids = [task_ids] if isinstance(task_ids, str) else list(task_ids)
        return self.query("cancel", {"ids": ids}, timeout=timeout)

    def status(self, *, timeout: float = 10.0) -> dict:
        return self.query("status", timeout=timeout)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish on the fabric's broker (e.g. a job's own progress, retained)."""
        self._session.publish(topic, payload, retain=retain)

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up right now (it reconnects by itself)."""
        return self._session.connected

    def subscribe(self, topic_filter: str, handler: Callable[[str, bytes], None]) -> None:
        """Watch topics of the fabric (e.g. retained statuses) on the client's connection;
        `handler(topic, payload)` runs on the network thread, so keep it short."""
        self._session.subscribe(topic_filter, handler)

    def pending(self) -> int:
        with self._lock:
            return len(self._handles)

    # -- incoming --------------------------------------------------------------------------------

    def _on_message(self, _topic: str, payload: bytes) -> None:
        try:
            message = decode_message(payload)
        except DecodeError as e:
            log.warning("ignored a malformed reply: %s", e)
            return
        if isinstance(message, OutcomeBatch):
            self._resolve(message.outcomes)
        elif isinstance(message, (SubmitReply, QueryReply)):
            with self._lock:
                waiter = self._replies.get(message.request_id)
            if waiter is not None:
                waiter[1].append(message)
                waiter[0].set()

    def _resolve(self, outcomes: Iterable[TaskOutcome]) -> None:
        final = [o for o in outcomes if o.state in _FINAL]
        with self._lock:  # once per batch: a batch holds up to a thousand outcomes
            pop = self._handles.pop
            resolved = [(pop(o.id, None), o) for o in final]
        for handle, outcome in resolved:
            if handle is not None:
                handle.resolve(outcome)

    def _on_master_status(self, _topic: str, payload: bytes) -> None:
        try:
            status = MasterStatus.decode(payload) if payload else None
        except DecodeError:
            return
        state = status.status if status else None
        restarted = state == "running" and self._master_state not in (None, "running")
        self._master_state = state
        if restarted:
            self._recover_soon()

    def _recover_soon(self) -> None:
        # never wait for a reply on the network thread that would deliver it
        threading.Thread(target=self._recover, name="client-recover", daemon=True).start()

    def _recover(self) -> None:
        """Ask again for every outcome still awaited (after a reconnect or master restart)."""
        with self._lock:
            ids = list(self._handles)
        for start in range(0, len(ids), _SUBMIT_CHUNK):
            try:
                data = self.query("outcomes", {"ids": ids[start:start + _SUBMIT_CHUNK],
                                               "watch": True}, timeout=10.0)
                self._resolve(TaskOutcome.from_dict(o) for o in data)
            except FabricError as e:
                log.info("could not re-query outcomes yet: %s", e)
                return

    def _watch(self) -> None:
        """A slow safety net: re-ask for outcomes now and then while some are awaited."""
        while not self._stop.wait(10.0):
            if self.pending() and self._session.connected:
                self._recover()

