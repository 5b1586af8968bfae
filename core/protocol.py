"""Wire messages: frozen dataclasses with `encode`/`decode`, a type tag and a schema version.

Every message on the wire is a map with `type` and `v` keys. Decoding validates every field
and wraps any failure as `DecodeError`, so a malformed payload never reaches the logic that
acts on it. Keys are plain words without dots, numbers stay numbers: what a person sees in
MQTT Explorer is what the code reads.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Type, TypeVar

from core import codec as _codec
from core.defaults import DEFAULT_CAPACITY, DEFAULT_HEARTBEAT, DEFAULT_PREFETCH
from core.errors import ConfigError, DecodeError
from core.states import NODE_STATES

__all__ = [
    "SCHEMA_VERSION",
    "MIN_PRIORITY",
    "MAX_PRIORITY",
    "DEFAULT_PRIORITY",
    "Message",
    "TaskSpec",
    "TaskResult",
    "TaskOutcome",
    "TaskBatch",
    "ResultBatch",
    "Control",
    "NodeReport",
    "NodeStatus",
    "Submission",
    "SubmitReply",
    "OutcomeBatch",
    "Query",
    "QueryReply",
    "MasterStatus",
    "decode_message",
    "make_task",
    "new_task_id",
    "new_token",
    "result_for",
    "MAX_ATTEMPTS",
    "QUEUE_FULL",
    "ID_CONFLICT",
    "NODE_STATES",
]

SCHEMA_VERSION = 1
MIN_PRIORITY = 1
MAX_PRIORITY = 10
DEFAULT_PRIORITY = 5
MAX_ATTEMPTS = 1000  # a per-task budget past this is a mistake, not a policy
MAX_TIMEOUT = 7 * 24 * 3600.0  # a per-task time limit, seconds (0: none)

M = TypeVar("M", bound="Message")
_ABSENT: Any = object()  # a field the sender left out (None would be a value)


# -- field validation ------------------------------------------------------------------------

def _get(d: dict, key: str, kind: type | tuple, what: str, default: Any = ...) -> Any:
    value = d.get(key, default)
    if value is ...:
        raise DecodeError(f"{what}: missing field {key!r}")
    if value is default and default is not ...:
        return value
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DecodeError(f"{what}: field {key!r} must be {name}, got {type(value).__name__}")
    return value


def _int(d: dict, key: str, what: str, default: Any = ..., lo: int | None = None,
         hi: int | None = None) -> int:
    value = _get(d, key, int, what, default)
    if isinstance(value, bool):
        raise DecodeError(f"{what}: field {key!r} must be int, got bool")
    if value is not default or default is ...:
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise DecodeError(f"{what}: field {key!r}={value} outside {lo}..{hi}")
    return value


def _num(d: dict, key: str, what: str, default: Any = ...) -> float:
    value = _get(d, key, (int, float), what, default)
    if isinstance(value, bool):
        raise DecodeError(f"{what}: field {key!r} must be a number, got bool")
    return value


def _str_list(d: dict, key: str, what: str) -> tuple[str, ...]:
    items = _get(d, key, list, what, [])
    for item in items:
        if not isinstance(item, str):
            raise DecodeError(f"{what}: {key!r} must hold strings only")
    return tuple(items)


# -- base ------------------------------------------------------------------------------------

class Message:
    """Mixin giving every message `encode`, `decode` and its wire dict.

    Each message class defines `to_dict()` (its fields) and the classmethod `from_dict(d)`
    (validating them); `message_from_dict` finds the class by the `type` tag.
    """

    TYPE: ClassVar[str] = ""
    to_dict: Callable[..., dict[str, Any]]
    from_dict: Callable[..., Any]

    def wire(self) -> dict[str, Any]:
        d = self.to_dict()
        d["type"] = self.TYPE
        d["v"] = SCHEMA_VERSION
        return d

    def encode(self, codec: str = _codec.MSGPACK) -> bytes:
        return _codec.encode(self.wire(), codec)

    @classmethod
    def decode(cls: Type[M], payload: bytes) -> M:
        message = decode_message(payload)
        if not isinstance(message, cls):
            raise DecodeError(f"expected a {cls.TYPE!r} message, got {message.TYPE!r}")
        return message


_REGISTRY: dict[str, Type[Message]] = {}


def _register(cls: Type[M]) -> Type[M]:
    _REGISTRY[cls.TYPE] = cls
    return cls


def decode_message(payload: bytes) -> Message:
    """Decode any fabric message; every failure is a DecodeError naming what is wrong."""
    d = _codec.decode(payload)
    return message_from_dict(d)


def message_from_dict(d: dict[str, Any]) -> Message:
    kind = d.get("type")
    cls = _REGISTRY.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise DecodeError(f"unknown message type {kind!r}")
    version = d.get("v")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= SCHEMA_VERSION:
        raise DecodeError(f"{kind}: unsupported schema version {version!r} (this side speaks "
                          f"1..{SCHEMA_VERSION})")
    try:
        return cls.from_dict(d)
    except DecodeError:
        raise
    except Exception as e:  # a validator missed a shape: still the sender's fault
        raise DecodeError(f"{kind}: {e}") from e


# -- tasks and results -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One unit of work: a registered task name called with arguments."""

    id: str
    name: str
    args: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)
    priority: int = DEFAULT_PRIORITY
    attempt: int = 0        # which dispatch of this task this is (0: not dispatched)
    token: str = ""         # unguessable, one per dispatch: a result must echo it
    max_attempts: int = 0   # real runs allowed before it ends failed (0: the master's default)
    timeout: float = 0.0    # seconds one run may take on its node, ending `timeout` (0: none)
    # master-side policy (nodes ignore it): None takes the master's default
    backoff: float | None = None      # seconds before the first retry, doubling for each next
    backoff_max: float | None = None  # the cap on one wait between runs
    retry_on: tuple[str, ...] | None = None  # error kinds retried ("error": any curable one)
    not_before: float = 0.0  # wall-clock seconds (epoch) before which it is not started

    def own_retry(self) -> dict[str, Any]:
        """The retry policy fields this task sets for itself (empty: the master's default)."""
        policy: dict[str, Any] = {}
        if self.backoff is not None:
            policy["backoff"] = self.backoff
        if self.backoff_max is not None:
            policy["backoff_max"] = self.backoff_max
        if self.retry_on is not None:
            policy["retry_on"] = list(self.retry_on)
        return policy

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "name": self.name, "priority": self.priority}
        if self.args:
            d["args"] = list(self.args)
        if self.kwargs:
            d["kwargs"] = self.kwargs
        if self.attempt:
            d["attempt"] = self.attempt
            d["token"] = self.token
        if self.max_attempts:
            d["max_attempts"] = self.max_attempts
        if self.timeout:
            d["timeout"] = self.timeout
        if self.backoff is not None or self.backoff_max is not None or self.retry_on is not None:
            d.update(self.own_retry())
        if self.not_before:
            d["not_before"] = self.not_before
        return d

    def same_work(self, other: "TaskSpec") -> bool:
        """True if `other` asks for the same computation (name and call; not its priority,
        attempt or budget): what a task id is bound to."""
        return self.name == other.name and self.args == other.args \
            and self.kwargs == other.kwargs

    def dispatched(self, attempt: int, token: str) -> dict[str, Any]:
        """This task's wire form for one dispatch."""
        d = self.to_dict()
        d["attempt"] = attempt
        d["token"] = token
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "TaskSpec":
        # The common, well-formed task is checked in one pass (a batch holds thousands);
        # anything else takes the careful path below, which names what is wrong.
        if type(d) is dict:
            task_id = d.get("id")
            name = d.get("name")
            priority = d.get("priority", DEFAULT_PRIORITY)
            args = d.get("args", _ABSENT)
            kwargs = d.get("kwargs", _ABSENT)
            attempt = d.get("attempt", 0)
            token = d.get("token", "")
            budget = d.get("max_attempts", 0)
            limit = d.get("timeout", 0.0)
            if type(task_id) is str and d.get("not_before", _ABSENT) is _ABSENT \
                    and d.get("retry_on", _ABSENT) is _ABSENT \
                    and d.get("backoff", _ABSENT) is _ABSENT \
                    and d.get("backoff_max", _ABSENT) is _ABSENT and 0 < len(task_id) <= 128 and type(name) is str \
                    and type(priority) is int and MIN_PRIORITY <= priority <= MAX_PRIORITY \
                    and (type(args) is list or args is _ABSENT) \
                    and (type(kwargs) is dict or kwargs is _ABSENT) \
                    and type(attempt) is int and 0 <= attempt <= _COUNTER_MAX \
                    and type(token) is str and len(token) <= 64 \
                    and type(budget) is int and 0 <= budget <= MAX_ATTEMPTS \
                    and (limit == 0.0 and type(limit) is float
                         or _timeout_ok(limit)):
                return _new_spec(task_id, name, [] if args is _ABSENT else args,
                                 {} if kwargs is _ABSENT else kwargs, priority, attempt, token,
                                 budget, limit if type(limit) is float else float(limit))
        return cls._checked(d)

    @classmethod
    def _checked(cls, d: Any) -> "TaskSpec":
        if not isinstance(d, dict):
            raise DecodeError("task must be a map")
        task_id = _get(d, "id", str, "task")
        if not task_id or len(task_id) > 128:
            raise DecodeError("task: 'id' must be 1-128 characters")
        token = _get(d, "token", str, "task", "")
        if len(token) > 64:
            raise DecodeError("task: 'token' must be at most 64 characters")
        return cls(
            id=task_id,
            name=_get(d, "name", str, "task"),
            args=_get(d, "args", list, "task", []),
            kwargs=_get(d, "kwargs", dict, "task", {}),
            priority=_int(d, "priority", "task", DEFAULT_PRIORITY, MIN_PRIORITY, MAX_PRIORITY),
            attempt=_int(d, "attempt", "task", 0, 0, _COUNTER_MAX),
            token=token,
            max_attempts=_int(d, "max_attempts", "task", 0, 0, MAX_ATTEMPTS),
            timeout=_task_timeout(d),
            backoff=_delay(d, "backoff"),
            backoff_max=_delay(d, "backoff_max"),
            retry_on=_retry_on(d),
            not_before=_not_before(d),
        )


def _timeout_ok(value: Any) -> bool:
    return type(value) in (int, float) and 0 <= value <= MAX_TIMEOUT


MAX_DELAY = 7 * 24 * 3600.0  # a wait between runs, seconds
_MAX_KINDS = 32


def _delay(d: dict, key: str) -> float | None:
    value = d.get(key)
    if value is None:
        return None
    if type(value) not in (int, float) or not 0 <= value <= MAX_DELAY:
        raise DecodeError(f"task: {key!r} must be 0-{MAX_DELAY:g} seconds, got {value!r}")
    return float(value)


def _retry_on(d: dict) -> tuple[str, ...] | None:
    value = d.get("retry_on")
    if value is None:
        return None
    if type(value) is not list or len(value) > _MAX_KINDS \
            or not all(type(k) is str and 0 < len(k) <= 64 for k in value):
        raise DecodeError(f"task: 'retry_on' must be a list of at most {_MAX_KINDS} error kinds")
    return tuple(value)


def _not_before(d: dict) -> float:
    value = d.get("not_before", 0.0)
    if type(value) not in (int, float) or not 0 <= value < 1e11:  # NaN fails too
        raise DecodeError(f"task: 'not_before' must be epoch seconds, got {value!r}")
    return float(value)


def _task_timeout(d: dict) -> float:
    value = d.get("timeout", 0.0)
    if not _timeout_ok(value):
        raise DecodeError(f"task: 'timeout' must be 0-{MAX_TIMEOUT:g} seconds, got {value!r}")
    return float(value)


class _RandomHex:
    """Hex digits from the system's random source, read 4 KiB at a time (one system call per
    few hundred ids or tokens instead of one each); refilled anew in a forked child."""

    def __init__(self) -> None:
        self._pool = ""
        self._at = 0
        self._lock = threading.Lock()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._drop)

    def _drop(self) -> None:
        self._pool, self._at, self._lock = "", 0, threading.Lock()

    def take(self, digits: int) -> str:
        with self._lock:  # two threads must never get the same digits
            at = self._at
            end = at + digits
            if end > len(self._pool):
                self._pool, at, end = os.urandom(4096).hex(), 0, digits
            self._at = end
            return self._pool[at:end]


_random_hex = _RandomHex()


def new_task_id() -> str:
    """A fresh task id: 32 hex digits, milliseconds first, then 84 random bits.

    Ids that grow with time land next to each other in the journal's index, so a batch of
    inserts touches a few pages instead of one random page per task (a tenfold cheaper
    commit). The random part makes an id unguessable from its neighbours.
    """
    return f"{time.time_ns() // 1_000_000:011x}{_random_hex.take(21)}"


def new_token() -> str:
    """An unguessable dispatch token (64 random bits)."""
    return _random_hex.take(16)


def make_task(name: str, args: Any = (), kwargs: dict | None = None, *,
              priority: int = DEFAULT_PRIORITY, task_id: str | None = None,
              max_attempts: int = 0, timeout: float = 0.0, backoff: float | None = None,
              backoff_max: float | None = None, retry_on: Iterable[str] | None = None,
              not_before: float = 0.0) -> TaskSpec:
    """A new task with a fresh id, checked the way the master will check it."""
    if not isinstance(name, str) or not name:
        raise ConfigError("task name must be a non-empty string")
    if task_id is not None and (not isinstance(task_id, str) or not 0 < len(task_id) <= 128):
        raise ConfigError(f"task id must be a string of 1-128 characters, got {task_id!r}")
    if type(max_attempts) is not int or not 0 <= max_attempts <= MAX_ATTEMPTS:
        raise ConfigError(f"max_attempts must be an integer 1-{MAX_ATTEMPTS} (0: the master's "
                          f"default), got {max_attempts!r}")
    if type(priority) is not int or not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        if isinstance(priority, bool) or not isinstance(priority, int) \
                or not MIN_PRIORITY <= priority <= MAX_PRIORITY:
            raise ConfigError(f"priority must be an integer {MIN_PRIORITY}-{MAX_PRIORITY}, "
                              f"got {priority!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not 0 <= timeout <= MAX_TIMEOUT:
        raise ConfigError(f"timeout must be 0-{MAX_TIMEOUT:g} seconds (0: no limit), "
                          f"got {timeout!r}")
    if kwargs is None:
        kwargs = {}
    elif isinstance(kwargs, dict):
        kwargs = dict(kwargs)
    else:
        raise ConfigError("kwargs must be a dict")
    spec = _new_spec(task_id or new_task_id(), name, list(args), kwargs, priority, 0, "",
                     max_attempts, float(timeout))
    if backoff is None and backoff_max is None and retry_on is None and not not_before:
        return spec
    return _with_policy(spec, backoff=backoff, backoff_max=backoff_max, retry_on=retry_on,
                        not_before=not_before)


def _with_policy(spec: TaskSpec, *, backoff: float | None, backoff_max: float | None,
                 retry_on: Iterable[str] | None, not_before: float) -> TaskSpec:
    """`spec` with a retry policy and start time of its own, checked as the master will."""
    wire: dict[str, Any] = {"not_before": not_before}
    if backoff is not None:
        wire["backoff"] = backoff
    if backoff_max is not None:
        wire["backoff_max"] = backoff_max
    if retry_on is not None:
        wire["retry_on"] = ([k.strip() for k in retry_on.split(",") if k.strip()]
                            if isinstance(retry_on, str) else list(retry_on))
    try:
        checked = (_delay(wire, "backoff"), _delay(wire, "backoff_max"), _retry_on(wire),
                   _not_before(wire))
    except DecodeError as e:
        raise ConfigError(str(e).removeprefix("task: ")) from e
    _s = _SPEC_SET
    for setter, value in zip(_s[9:], checked):
        setter(spec, value)
    return spec


@dataclass(frozen=True, slots=True)
class TaskResult:
    """What a node reports for one task: a value, or a structured error."""

    id: str
    ok: bool
    value: Any = None
    error: dict | None = None
    ts: float = 0.0
    attempt: int = 0   # the dispatch this answers, echoed with its token
    token: str = ""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "ok": self.ok, "ts": self.ts,
                             "attempt": self.attempt, "token": self.token}
        if self.ok:
            d["value"] = self.value
        else:
            d["error"] = self.error or {"kind": "error", "message": ""}
        return d

    def answering(self, task: TaskSpec) -> "TaskResult":
        """This result as the answer to `task`'s dispatch (its attempt and token)."""
        if task.attempt == self.attempt and task.token == self.token:
            return self
        return _new_result(self.id, self.ok, self.value, self.error, self.ts, task.attempt,
                           task.token)

    @classmethod
    def from_dict(cls, d: Any) -> "TaskResult":
        if type(d) is dict:  # the common case in one pass, as for TaskSpec
            task_id = d.get("id")
            ok = d.get("ok")
            ts = d.get("ts", 0.0)
            attempt = d.get("attempt", 0)
            token = d.get("token", "")
            if type(task_id) is str and (type(ts) is float or type(ts) is int) \
                    and type(attempt) is int and type(token) is str:
                if ok is True:
                    return _new_result(task_id, True, d.get("value"), None, ts, attempt, token)
                error = d.get("error")
                if ok is False and type(error) is dict:
                    return _new_result(task_id, False, None, error, ts, attempt, token)
        if not isinstance(d, dict):
            raise DecodeError("result must be a map")
        ok = _get(d, "ok", bool, "result")
        error = None if ok else _get(d, "error", dict, "result")
        return cls(id=_get(d, "id", str, "result"), ok=ok, value=d.get("value") if ok else None,
                   error=error, ts=_num(d, "ts", "result", 0.0),
                   attempt=_int(d, "attempt", "result", 0, 0, _COUNTER_MAX),
                   token=_get(d, "token", str, "result", ""))


@dataclass(frozen=True, slots=True)
class TaskOutcome:
    """The final word on a task, as the master tells its submitter."""

    id: str
    state: str  # core.states: COMPLETED, FAILED, CANCELLED, PENDING or UNKNOWN
    value: Any = None
    error: dict | None = None
    node_id: str = ""
    attempts: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "value": self.value, "error": self.error,
                "node_id": self.node_id, "attempts": self.attempts}

    @classmethod
    def from_dict(cls, d: Any) -> "TaskOutcome":
        if type(d) is dict:  # the common case in one pass, as for TaskSpec
            task_id = d.get("id")
            state = d.get("state")
            error = d.get("error")
            node_id = d.get("node_id", "")
            attempts = d.get("attempts", 0)
            if type(task_id) is str and type(state) is str and type(node_id) is str \
                    and (error is None or type(error) is dict) and type(attempts) is int:
                return _new_outcome(task_id, state, d.get("value"), error, node_id, attempts)
        if not isinstance(d, dict):
            raise DecodeError("outcome must be a map")
        error = d.get("error")
        if error is not None and not isinstance(error, dict):
            raise DecodeError("outcome: 'error' must be a map")
        return cls(id=_get(d, "id", str, "outcome"), state=_get(d, "state", str, "outcome"),
                   value=d.get("value"), error=error,
                   node_id=_get(d, "node_id", str, "outcome", ""),
                   attempts=_int(d, "attempts", "outcome", 0))


# Positional constructors for the three records a task passes through several times per trip.
# A frozen dataclass's own __init__ sets each field through object.__setattr__ (looked up by
# name); setting the slots directly makes the same immutable object in half the time.
def _setters(cls: type, names: tuple[str, ...]) -> tuple:
    return tuple(cls.__dict__[n].__set__ for n in names)


_SPEC_SET = _setters(TaskSpec, ("id", "name", "args", "kwargs", "priority", "attempt", "token",
                                 "max_attempts", "timeout", "backoff", "backoff_max", "retry_on",
                                 "not_before"))
_RESULT_SET = _setters(TaskResult, ("id", "ok", "value", "error", "ts", "attempt", "token"))
_OUTCOME_SET = _setters(TaskOutcome, ("id", "state", "value", "error", "node_id", "attempts"))


def _new_spec(task_id: str, name: str, args: list, kwargs: dict, priority: int,
              attempt: int = 0, token: str = "", max_attempts: int = 0, timeout: float = 0.0,
              *, _new: Any = object.__new__, _s: tuple = _SPEC_SET) -> TaskSpec:
    spec = _new(TaskSpec)
    _s[0](spec, task_id), _s[1](spec, name), _s[2](spec, args), _s[3](spec, kwargs)
    _s[4](spec, priority), _s[5](spec, attempt), _s[6](spec, token), _s[7](spec, max_attempts)
    _s[8](spec, timeout), _s[9](spec, None), _s[10](spec, None), _s[11](spec, None)
    _s[12](spec, 0.0)
    return spec


def _new_result(task_id: str, ok: bool, value: Any, error: dict | None, ts: float,
                attempt: int = 0, token: str = "", *,
                _new: Any = object.__new__, _s: tuple = _RESULT_SET) -> TaskResult:
    result = _new(TaskResult)
    _s[0](result, task_id), _s[1](result, ok), _s[2](result, value), _s[3](result, error)
    _s[4](result, ts), _s[5](result, attempt), _s[6](result, token)
    return result


def result_for(task: TaskSpec, ok: bool, value: Any = None, error: dict | None = None,
               ts: float = 0.0) -> TaskResult:
    """A node's result for one dispatch of `task` (its id, attempt and token)."""
    return _new_result(task.id, ok, value, error, ts, task.attempt, task.token)


def _new_outcome(task_id: str, state: str, value: Any, error: dict | None, node_id: str,
                 attempts: int, *, _new: Any = object.__new__,
                 _s: tuple = _OUTCOME_SET) -> TaskOutcome:
    outcome = _new(TaskOutcome)
    _s[0](outcome, task_id), _s[1](outcome, state), _s[2](outcome, value)
    _s[3](outcome, error), _s[4](outcome, node_id), _s[5](outcome, attempts)
    return outcome


@_register
@dataclass(frozen=True, slots=True)
class TaskBatch(Message):
    """Master → node: tasks to run. `epoch` is the master's lease epoch."""

    TYPE: ClassVar[str] = "tasks"
    tasks: tuple[TaskSpec, ...]
    epoch: int = 0
    master: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": [t.to_dict() for t in self.tasks], "epoch": self.epoch,
                "master": self.master}

    @staticmethod
    def encode_wire(tasks: list[dict[str, Any]], *, epoch: int, master: str,
                    codec: str = _codec.MSGPACK) -> bytes:
        """Encode tasks already in their dispatched wire form (`TaskSpec.dispatched`)."""
        return _codec.encode({"tasks": tasks, "epoch": epoch, "master": master,
                              "type": TaskBatch.TYPE, "v": SCHEMA_VERSION}, codec)

    @classmethod
    def from_dict(cls, d: dict) -> "TaskBatch":
        raw = _get(d, "tasks", list, "tasks")
        return cls(tasks=tuple(map(TaskSpec.from_dict, raw)),
                   epoch=_int(d, "epoch", "tasks", 0, 0), master=_get(d, "master", str, "tasks", ""))


@_register
@dataclass(frozen=True, slots=True)
class ResultBatch(Message):
    """Node → master: results, and tasks handed back unstarted (`released`)."""

    TYPE: ClassVar[str] = "results"
    node_id: str
    results: tuple[TaskResult, ...] = ()
    released: tuple[str, ...] = ()
    instance: str = ""
    prefetch: int = 0  # the node's current prefetch, when it adapts it (0: see its status)

    def to_dict(self) -> dict[str, Any]:
        d = {"node_id": self.node_id, "instance": self.instance,
             "results": [r.to_dict() for r in self.results], "released": list(self.released)}
        if self.prefetch:
            d["prefetch"] = self.prefetch
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ResultBatch":
        raw = _get(d, "results", list, "results", [])
        return cls(node_id=_get(d, "node_id", str, "results"),
                   results=tuple(map(TaskResult.from_dict, raw)),
                   released=_str_list(d, "released", "results"),
                   instance=_get(d, "instance", str, "results", ""),
                   prefetch=_int(d, "prefetch", "results", 0, 0, 1_000_000))


@_register
@dataclass(frozen=True, slots=True)
class Control(Message):
    """Master → node: a command that is not a task (snapshot marker, ...)."""

    TYPE: ClassVar[str] = "control"
    command: str
    request_id: str = ""
    params: dict = field(default_factory=dict)
    epoch: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"command": self.command, "request_id": self.request_id, "params": self.params,
                "epoch": self.epoch}

    @classmethod
    def from_dict(cls, d: dict) -> "Control":
        return cls(command=_get(d, "command", str, "control"),
                   request_id=_get(d, "request_id", str, "control", ""),
                   params=_get(d, "params", dict, "control", {}),
                   epoch=_int(d, "epoch", "control", 0, 0))


@_register
@dataclass(frozen=True, slots=True)
class NodeReport(Message):
    """Node → master: the node's own state, in answer to a Control request."""

    TYPE: ClassVar[str] = "report"
    node_id: str
    request_id: str
    state: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "request_id": self.request_id, "state": self.state}

    @classmethod
    def from_dict(cls, d: dict) -> "NodeReport":
        return cls(node_id=_get(d, "node_id", str, "report"),
                   request_id=_get(d, "request_id", str, "report"),
                   state=_get(d, "state", dict, "report", {}))


@_register
@dataclass(frozen=True, slots=True)
class NodeStatus(Message):
    """Retained per-node status: birth, heartbeat (with workload) and the will `dead`.

    Always JSON on the wire so MQTT Explorer shows it as a flat table and charts its numbers.
    """

    TYPE: ClassVar[str] = "status"
    node_id: str
    status: str
    kind: str = "cpython"
    codec: str = _codec.MSGPACK
    capacity: int = DEFAULT_CAPACITY
    prefetch: int = DEFAULT_PREFETCH
    workload: int = 0
    max_payload: int = 0
    instance: str = ""
    tasks_done: int = 0
    tasks_failed: int = 0
    rejected: int = 0
    heartbeat: float = DEFAULT_HEARTBEAT
    ts: float = 0.0
    tasks: str = ""     # task names it runs, comma-separated ("": not said, runs any)
    lambdas: str = ""   # lambda names it runs, comma-separated ("": none)
    seq: int = 0        # birth sequence: the will carries its birth's number

    def to_dict(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "status": self.status, "kind": self.kind,
                "codec": self.codec, "capacity": self.capacity, "prefetch": self.prefetch,
                "workload": self.workload, "max_payload": self.max_payload,
                "instance": self.instance, "tasks_done": self.tasks_done,
                "tasks_failed": self.tasks_failed, "rejected": self.rejected,
                "heartbeat": self.heartbeat, "ts": self.ts, "tasks": self.tasks,
                "lambdas": self.lambdas, "seq": self.seq}

    def encode(self, codec: str = _codec.JSON) -> bytes:
        return _codec.encode(self.wire(), codec)

    @classmethod
    def from_dict(cls, d: dict) -> "NodeStatus":
        w = "status"
        status = _get(d, "status", str, w)
        if status not in NODE_STATES:
            raise DecodeError(f"status: unknown node state {status!r}")
        codec_name = _get(d, "codec", str, w, _codec.MSGPACK)
        if codec_name not in _codec.CODECS:
            raise DecodeError(f"status: unknown codec {codec_name!r}")
        return cls(node_id=_get(d, "node_id", str, w), status=status,
                   kind=_get(d, "kind", str, w, "cpython"), codec=codec_name,
                   capacity=_int(d, "capacity", w, DEFAULT_CAPACITY, 0, 1_000_000),
                   prefetch=_int(d, "prefetch", w, DEFAULT_PREFETCH, 0, 1_000_000),
                   workload=_int(d, "workload", w, 0, 0, _COUNTER_MAX),
                   max_payload=_int(d, "max_payload", w, 0, 0, _COUNTER_MAX),
                   instance=_get(d, "instance", str, w, ""),
                   tasks_done=_int(d, "tasks_done", w, 0, 0, _COUNTER_MAX),
                   tasks_failed=_int(d, "tasks_failed", w, 0, 0, _COUNTER_MAX),
                   rejected=_int(d, "rejected", w, 0, 0, _COUNTER_MAX),
                   heartbeat=_heartbeat(d), ts=_num(d, "ts", w, 0.0),
                   tasks=_get(d, "tasks", str, w, ""), lambdas=_get(d, "lambdas", str, w, ""),
                   seq=_int(d, "seq", w, 0, 0, _COUNTER_MAX))


_COUNTER_MAX = 2**63 - 1       # what msgpack and sqlite carry; a larger counter is a forgery
MAX_HEARTBEAT = 3600.0         # a node silent for longer than this would never be found dead


def _heartbeat(d: dict) -> float:
    value = _num(d, "heartbeat", "status", DEFAULT_HEARTBEAT)
    if not (0 < value <= MAX_HEARTBEAT):  # also false for NaN and infinity
        raise DecodeError(f"status: heartbeat {value!r} outside 0..{MAX_HEARTBEAT:g} seconds")
    return value


# -- clients -------------------------------------------------------------------------------------

@_register
@dataclass(frozen=True, slots=True)
class Submission(Message):
    """Client → master: tasks to queue. Task ids are chosen by the client, so a resend after a
    lost reply is harmless: the master keeps each id once."""

    TYPE: ClassVar[str] = "submit"
    client_id: str
    request_id: str
    tasks: tuple[TaskSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "request_id": self.request_id,
                "tasks": [t.to_dict() for t in self.tasks]}

    @classmethod
    def from_dict(cls, d: dict) -> "Submission":
        raw = _get(d, "tasks", list, "submit")
        return cls(client_id=_get(d, "client_id", str, "submit"),
                   request_id=_get(d, "request_id", str, "submit"),
                   tasks=tuple(map(TaskSpec.from_dict, raw)))


# Reasons a SubmitReply gives, each at the start of its text: a full queue is worth a resend
# later; an id bound to other work is refused for good.
QUEUE_FULL = "queue_full"
ID_CONFLICT = "id_conflict"


@_register
@dataclass(frozen=True, slots=True)
class SubmitReply(Message):
    """Master → client: which submitted ids are journalled, which were refused and why."""

    TYPE: ClassVar[str] = "submit_reply"
    request_id: str
    accepted: tuple[str, ...] = ()
    rejected: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "accepted": list(self.accepted),
                "rejected": [list(r) for r in self.rejected]}

    @classmethod
    def from_dict(cls, d: dict) -> "SubmitReply":
        rejected = []
        for item in _get(d, "rejected", list, "submit_reply", []):
            if not (isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)):
                raise DecodeError("submit_reply: each rejection must be [id, reason]")
            rejected.append((item[0], item[1]))
        return cls(request_id=_get(d, "request_id", str, "submit_reply"),
                   accepted=_str_list(d, "accepted", "submit_reply"), rejected=tuple(rejected))


@_register
@dataclass(frozen=True, slots=True)
class OutcomeBatch(Message):
    """Master → client: final outcomes of tasks the client submitted or asked about."""

    TYPE: ClassVar[str] = "outcomes"
    outcomes: tuple[TaskOutcome, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"outcomes": [o.to_dict() for o in self.outcomes]}

    @staticmethod
    def encode_wire(outcomes: list[dict[str, Any]], codec: str = _codec.MSGPACK) -> bytes:
        """Encode outcomes already in `TaskOutcome.to_dict()` form, building no objects: the
        master sends one outcome per finished task."""
        return _codec.encode({"outcomes": outcomes, "type": OutcomeBatch.TYPE,
                              "v": SCHEMA_VERSION}, codec)

    @classmethod
    def from_dict(cls, d: dict) -> "OutcomeBatch":
        raw = _get(d, "outcomes", list, "outcomes")
        return cls(outcomes=tuple(map(TaskOutcome.from_dict, raw)))


@_register
@dataclass(frozen=True, slots=True)
class Query(Message):
    """Client → master: a status query (`nodes`, `status`, `outcomes`, `snapshot`, ...)."""

    TYPE: ClassVar[str] = "query"
    client_id: str
    request_id: str
    what: str
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "request_id": self.request_id, "what": self.what,
                "params": self.params}

    @classmethod
    def from_dict(cls, d: dict) -> "Query":
        return cls(client_id=_get(d, "client_id", str, "query"),
                   request_id=_get(d, "request_id", str, "query"),
                   what=_get(d, "what", str, "query"), params=_get(d, "params", dict, "query", {}))


@_register
@dataclass(frozen=True, slots=True)
class QueryReply(Message):
    """Master → client: the answer to a Query."""

    TYPE: ClassVar[str] = "query_reply"
    request_id: str
    ok: bool
    data: Any = None
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "ok": self.ok, "data": self.data,
                "error": self.error}

    @classmethod
    def from_dict(cls, d: dict) -> "QueryReply":
        return cls(request_id=_get(d, "request_id", str, "query_reply"),
                   ok=_get(d, "ok", bool, "query_reply"), data=d.get("data"),
                   error=_get(d, "error", str, "query_reply", ""))


@_register
@dataclass(frozen=True, slots=True)
class MasterStatus(Message):
    """Retained master status: flat JSON counters for people and dashboards."""

    TYPE: ClassVar[str] = "master_status"
    master_id: str
    status: str
    epoch: int = 0
    queued: int = 0
    in_flight: int = 0
    completed: int = 0
    failed: int = 0
    duplicates: int = 0
    rejected: int = 0
    nodes_ready: int = 0
    nodes_total: int = 0
    ts: float = 0.0
    waiting: int = 0       # queued tasks no live node can run now
    waiting_for: str = ""  # why: the task (or lambda:NAME) names no live node offers
    cancelled: int = 0     # counters from here on survive a restart of the master
    expired: int = 0       # finished tasks deleted after the result TTL
    uptime: float = 0.0    # seconds served, over every run on this journal
    throughput: float = 0.0  # tasks ended per second over the last minute

    def to_dict(self) -> dict[str, Any]:
        return {"master_id": self.master_id, "status": self.status, "epoch": self.epoch,
                "queued": self.queued, "in_flight": self.in_flight,
                "completed": self.completed, "failed": self.failed,
                "duplicates": self.duplicates, "rejected": self.rejected,
                "nodes_ready": self.nodes_ready, "nodes_total": self.nodes_total, "ts": self.ts,
                "waiting": self.waiting, "waiting_for": self.waiting_for,
                "cancelled": self.cancelled, "expired": self.expired, "uptime": self.uptime,
                "throughput": self.throughput}

    def encode(self, codec: str = _codec.JSON) -> bytes:
        return _codec.encode(self.wire(), codec)

    @classmethod
    def from_dict(cls, d: dict) -> "MasterStatus":
        w = "master_status"
        return cls(master_id=_get(d, "master_id", str, w), status=_get(d, "status", str, w),
                   **{k: _int(d, k, w, 0, 0) for k in (
                       "epoch", "queued", "in_flight", "completed", "failed", "duplicates",
                       "rejected", "nodes_ready", "nodes_total", "waiting", "cancelled",
                       "expired")},
                   ts=_num(d, "ts", w, 0.0), waiting_for=_get(d, "waiting_for", str, w, ""),
                   uptime=_num(d, "uptime", w, 0.0), throughput=_num(d, "throughput", w, 0.0))
