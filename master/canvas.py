"""Groups and chains of task calls, from code, on top of `submit`/`submit_many` and handles.

- `call("name", *args, priority=..., **kwargs)` describes one task call (a `Call`); a tuple as
  `submit_many` takes it, `(name, args[, kwargs[, priority[, task_id[, max_attempts[,
  timeout]]]]])`, is read as one too.
- `group(fabric, calls)` (`fabric.group(calls)`) submits every call at once, in one
  `submit_many`, so they run in parallel; its handle's result is the list of their values in
  call order. A member that fails or is cancelled fails the group at once (`GroupFailed`
  naming it); the others are left to run (`handle.cancel()` stops them).
- `chain(fabric, calls)` (`fabric.chain(calls)`) runs the calls one after another, the value
  of each given to the next as its first positional argument (as Celery's chains do; a call
  made with `ignore_previous=True` is given nothing). A step that fails, is cancelled or cannot
  be submitted stops the chain (`ChainFailed` naming the step); the rest never run.

The next step of a chain is submitted when the master pushes the previous outcome: from a
short-lived thread, never from the network thread that delivered it (a submission waits for
the master's acknowledgement, which that thread brings). Every wait is bounded by its
`timeout` (`DEFAULT_WAIT`, 300 s, unless told); `None` means until the outcome arrives.
`fabric` is a `FabricClient`, or the master's own `MasterNodeTransport` inside the master
process.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterable, Sequence

from core.defaults import DEFAULT_WAIT
from core.errors import ChainFailed, ConfigError, FabricError, FabricTimeout, GroupFailed
from core import states
from core.protocol import DEFAULT_PRIORITY, TaskOutcome, make_task
from master.handles import TaskHandle, wait_future

__all__ = ["Call", "call", "as_call", "group", "chain", "GroupHandle", "ChainHandle"]

log = logging.getLogger(__name__)

_GROUP_ACK_TIMEOUT = 30.0   # seconds the master has to acknowledge a group's submission
_STEP_ACK_TIMEOUT = 10.0    # ... and each step of a chain


@dataclass(frozen=True)
class Call:
    """One task call: what `submit` takes, as a value. `ignore_previous`: in a chain, this
    step is not given the previous step's value."""

    name: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    priority: int = DEFAULT_PRIORITY
    task_id: str | None = None
    max_attempts: int = 0
    timeout: float = 0.0
    ignore_previous: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.args, (list, tuple)):
            raise ConfigError(f"call {self.name!r}: args must be a list or tuple, got "
                              f"{type(self.args).__name__}")
        if not isinstance(self.kwargs, dict):
            raise ConfigError(f"call {self.name!r}: kwargs must be a dict, got "
                              f"{type(self.kwargs).__name__}")
        object.__setattr__(self, "args", tuple(self.args))
        object.__setattr__(self, "kwargs", dict(self.kwargs))
        # checked now, as the master will check it, so a bad call fails where it is written
        make_task(self.name, self.args, self.kwargs, priority=self.priority,
                  task_id=self.task_id, max_attempts=self.max_attempts, timeout=self.timeout)

    def with_previous(self, value: Any) -> Call:
        """This call given `value` as its first positional argument (unless it ignores it)."""
        if self.ignore_previous:
            return self
        return Call(self.name, (value, *self.args), self.kwargs, self.priority, self.task_id,
                    self.max_attempts, self.timeout)

    def as_tuple(self) -> tuple:
        """The call as `submit_many` takes it."""
        return (self.name, list(self.args), dict(self.kwargs), self.priority, self.task_id,
                self.max_attempts, self.timeout)


def call(name: str, *args: Any, priority: int = DEFAULT_PRIORITY, task_id: str | None = None,
         max_attempts: int = 0, timeout: float = 0.0, ignore_previous: bool = False,
         **kwargs: Any) -> Call:
    """`call("resize", path, 640, priority=8)`: a task call for `group` and `chain`. The
    keywords named here are options of the call; every other keyword goes to the task (for a
    task keyword with one of these names, build `Call(name, args, kwargs)` directly)."""
    return Call(name, args, kwargs, priority, task_id, max_attempts, timeout, ignore_previous)


def as_call(item: Any, *, where: str = "call") -> Call:
    """A `Call`, or a tuple as `submit_many` takes it, as a `Call`; ConfigError otherwise."""
    if isinstance(item, Call):
        return item
    if isinstance(item, tuple) and 1 <= len(item) <= 7:
        name, args, kwargs, priority, task_id, max_attempts, timeout = (
            *item, *(None, None, DEFAULT_PRIORITY, None, 0, 0.0)[len(item) - 1:])
        try:
            return Call(name, () if args is None else args, kwargs or {}, priority, task_id,
                        max_attempts, timeout)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    raise ConfigError(f"{where}: expected call(name, *args, ...) or a (name, args, kwargs, "
                      f"priority, ...) tuple, got {item!r}")


def _calls(calls: Iterable[Any], what: str) -> tuple[Call, ...]:
    if isinstance(calls, (str, bytes, Call)) or not isinstance(calls, Iterable):
        raise ConfigError(f"{what} takes a list of calls, got {calls!r}")
    return tuple(as_call(item, where=f"{what} item {i}") for i, item in enumerate(calls))


def _is_client(fabric: Any) -> bool:
    from master.client import FabricClient
    return isinstance(fabric, FabricClient)


def _submit(fabric: Any, one: Call, ack_timeout: float) -> TaskHandle:
    options: dict[str, Any] = {"priority": one.priority, "task_id": one.task_id,
                               "max_attempts": one.max_attempts, "timeout": one.timeout}
    if _is_client(fabric):
        options["ack_timeout"] = ack_timeout
    return fabric.submit(one.name, list(one.args), dict(one.kwargs), **options)


def _settled(handle: TaskHandle) -> TaskOutcome:
    """The outcome of a handle that is done; a submission the master refused, as a failed
    outcome carrying the reason."""
    try:
        return handle.outcome(0)
    except FabricError as e:
        return TaskOutcome(id=handle.id, state=states.FAILED,
                           error={"kind": "refused", "type": type(e).__name__,
                                  "message": str(e)})


# -- groups --------------------------------------------------------------------------------------

def group(fabric: Any, calls: Iterable[Any], *,
          ack_timeout: float = _GROUP_ACK_TIMEOUT) -> GroupHandle:
    """Submit every call at once (they run in parallel); a handle on all of them."""
    members = _calls(calls, "group")
    if not members:
        return GroupHandle(fabric, members, [])
    if _is_client(fabric):
        handles = fabric.submit_many([c.as_tuple() for c in members], ack_timeout=ack_timeout)
    else:
        handles = [_submit(fabric, c, ack_timeout) for c in members]
    return GroupHandle(fabric, members, handles)


class GroupHandle:
    """The members of a group: `.result(timeout)` is their values in call order, or
    `GroupFailed` as soon as one fails; `.outcomes(timeout)` every member's outcome once all
    ended; `await handle`; `.cancel()` the members still going."""

    def __init__(self, fabric: Any, calls: Sequence[Call], handles: list[TaskHandle]) -> None:
        self.calls = tuple(calls)
        self.handles = list(handles)
        self._fabric = fabric
        self._lock = threading.Lock()
        self._ended = 0
        self._failed: list[int] = []
        self._all = concurrent.futures.Future()      # set when every member ended
        self._settled = concurrent.futures.Future()  # ... or at the first failure
        if not handles:
            self._all.set_result(None)
            self._settled.set_result(None)
        for index, handle in enumerate(self.handles):
            handle.future.add_done_callback(partial(self._member_ended, index))

    @property
    def ids(self) -> list[str]:
        return [h.id for h in self.handles]

    def __len__(self) -> int:
        return len(self.handles)

    def done(self) -> bool:
        """Every member ended."""
        return self._all.done()

    def _member_ended(self, index: int, _future: concurrent.futures.Future) -> None:
        # on whichever thread resolved the member (the network thread, usually): bookkeeping
        failed = _settled(self.handles[index]).state != states.COMPLETED
        with self._lock:
            self._ended += 1
            if failed:
                self._failed.append(index)
            every = self._ended == len(self.handles)
        if failed or every:
            _set(self._settled, None)
        if every:
            _set(self._all, None)

    def _wait(self, future: concurrent.futures.Future, timeout: float | None) -> None:
        try:
            future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise self._timed_out(timeout) from None

    def _timed_out(self, timeout: float | None) -> FabricTimeout:
        with self._lock:
            ended = self._ended
        return FabricTimeout(f"group: {ended} of {len(self.handles)} members ended within "
                             f"{timeout:g}s")

    def _values(self) -> list[Any]:
        with self._lock:
            failed = sorted(self._failed)
        if failed:
            failures = []
            for index in failed:
                outcome = _settled(self.handles[index])
                failures.append((index, outcome.id, self.calls[index].name,
                                 outcome.error or {"kind": outcome.state, "message": ""}))
            raise GroupFailed(len(self.handles), failures)
        return [h.outcome(0).value for h in self.handles]

    def result(self, timeout: float | None = DEFAULT_WAIT) -> list[Any]:
        """The members' values in call order; GroupFailed naming the first failed member as
        soon as one fails, FabricTimeout if they have not all ended within `timeout`."""
        self._wait(self._settled, timeout)
        return self._values()

    def outcomes(self, timeout: float | None = DEFAULT_WAIT) -> list[TaskOutcome]:
        """Every member's outcome in call order, once all ended (a submission the master
        refused is a failed outcome with kind `refused`)."""
        self._wait(self._all, timeout)
        return [_settled(h) for h in self.handles]

    async def wait(self, timeout: float | None = DEFAULT_WAIT) -> list[Any]:
        """`result()` for asyncio code (`await handle.wait()` or `await handle`)."""
        await wait_future(self._settled, timeout, lambda: self._timed_out(timeout))
        return self._values()

    def __await__(self):
        return self.wait().__await__()

    def cancel(self, *, timeout: float = 10.0) -> list[dict]:
        """Cancel the members that have not ended; the master's verdicts (none if all did)."""
        ids = [h.id for h in self.handles if not h.done()]
        return _cancel(self._fabric, ids, timeout) if ids else []


# -- chains --------------------------------------------------------------------------------------

def chain(fabric: Any, calls: Iterable[Any], *,
          ack_timeout: float = _STEP_ACK_TIMEOUT) -> ChainHandle:
    """Run the calls one after another, each given the previous value (see the module
    docstring); the first is submitted before this returns."""
    steps = _calls(calls, "chain")
    if not steps:
        raise ConfigError("a chain needs at least one call")
    handle = ChainHandle(fabric, steps, ack_timeout=ack_timeout)
    handle._run_step(0, None)
    return handle


class ChainHandle:
    """A chain under way: `.result(timeout)` is the last step's value, or `ChainFailed`
    naming the step that stopped it; `.handles` the steps submitted so far; `await handle`;
    `.cancel()` stops it (the step running is cancelled, none after it is submitted)."""

    def __init__(self, fabric: Any, calls: Sequence[Call], *, ack_timeout: float) -> None:
        self.calls = tuple(calls)
        self.ack_timeout = ack_timeout
        self._fabric = fabric
        self._lock = threading.Lock()
        self._handles: list[TaskHandle] = []
        self._cancelled = False
        self._done: concurrent.futures.Future[TaskOutcome] = concurrent.futures.Future()

    @property
    def handles(self) -> list[TaskHandle]:
        with self._lock:
            return list(self._handles)

    @property
    def ids(self) -> list[str]:
        return [h.id for h in self.handles]

    def done(self) -> bool:
        return self._done.done()

    # -- driving ---------------------------------------------------------------------------------

    def _fail(self, index: int, task_id: str, error: dict) -> None:
        _set(self._done, ChainFailed(len(self.calls), index, task_id, self.calls[index].name,
                                     error), error=True)

    def _run_step(self, index: int, previous: Any) -> None:
        """Submit step `index` (given `previous`) and have its outcome drive the next."""
        step = self.calls[index]
        if index:
            step = step.with_previous(previous)
        with self._lock:
            cancelled = self._cancelled
        if cancelled:
            self._fail(index, "", {"kind": "cancelled",
                                   "message": "the chain was cancelled before this step"})
            return
        try:
            handle = _submit(self._fabric, step, self.ack_timeout)
        except FabricError as e:  # bad arguments for this step, refused, no acknowledgement
            self._fail(index, step.task_id or "", {"kind": "refused", "type": type(e).__name__,
                                                   "message": str(e)})
            return
        with self._lock:
            self._handles.append(handle)
            cancelled = self._cancelled
        if cancelled:  # cancelled while this step was being submitted
            try:
                _cancel(self._fabric, [handle.id], self.ack_timeout)
            except FabricError as e:  # its outcome still ends the chain, when it comes
                log.warning("chain step %d (task %s): could not cancel it: %s", index + 1,
                            handle.id, e)
        handle.future.add_done_callback(lambda _f: threading.Thread(
            target=self._step_ended, args=(index, handle), name="chain-step",
            daemon=True).start())

    def _step_ended(self, index: int, handle: TaskHandle) -> None:
        outcome = _settled(handle)
        if outcome.state != states.COMPLETED:
            self._fail(index, handle.id, outcome.error or {"kind": outcome.state,
                                                           "message": ""})
        elif index + 1 == len(self.calls):
            _set(self._done, outcome)
        else:
            try:
                self._run_step(index + 1, outcome.value)
            except BaseException as e:  # never leave the chain waiting on a dead thread
                self._fail(index + 1, "", {"kind": "exception", "type": type(e).__name__,
                                           "message": str(e)})

    # -- waiting ---------------------------------------------------------------------------------

    def outcome(self, timeout: float | None = DEFAULT_WAIT) -> TaskOutcome:
        """The last step's outcome; ChainFailed if a step stopped the chain, FabricTimeout
        if it has not ended within `timeout`."""
        try:
            return self._done.result(timeout)
        except concurrent.futures.TimeoutError:
            raise self._timed_out(timeout) from None

    def result(self, timeout: float | None = DEFAULT_WAIT) -> Any:
        """The last step's value (see `outcome`)."""
        return self.outcome(timeout).value

    async def wait(self, timeout: float | None = DEFAULT_WAIT) -> Any:
        """`result()` for asyncio code (`await handle.wait()` or `await handle`)."""
        return (await wait_future(self._done, timeout, lambda: self._timed_out(timeout))).value

    def _timed_out(self, timeout: float | None) -> FabricTimeout:
        return FabricTimeout(f"chain: {len(self.handles)} of {len(self.calls)} steps "
                             f"submitted, the last not ended within {timeout:g}s")

    def __await__(self):
        return self.wait().__await__()

    def cancel(self, *, timeout: float = 10.0) -> list[dict]:
        """Stop the chain: the step under way is cancelled on the fabric and no later step is
        submitted; `result` then raises ChainFailed (kind `cancelled`) for that step. The
        master's verdicts on the step cancelled (none between steps)."""
        with self._lock:
            self._cancelled = True
            running = [h.id for h in self._handles if not h.done()]
        return _cancel(self._fabric, running, timeout) if running else []


def _cancel(fabric: Any, ids: list[str], timeout: float) -> list[dict]:
    if _is_client(fabric):
        return fabric.cancel(ids, timeout=timeout)
    return fabric.cancel(ids)


def _set(future: concurrent.futures.Future, value: Any, *, error: bool = False) -> None:
    """Settle `future` once; later calls are ignored."""
    try:
        if error:
            future.set_exception(value)
        else:
            future.set_result(value)
    except concurrent.futures.InvalidStateError:
        pass
