"""Run lambdas in worker processes, each call under a memory limit and killed at its timeout.

A `LambdaRunner` owns one zygote process (see `zygote`) that has imported every lambda; each
call is a child forked from it. Per-call problems never raise: they come back as a
`LambdaOutcome` whose error says what happened, and the runner keeps serving. If the zygote
dies it is started again on the next call, and a call it had not yet started is sent there.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from node.lambdas.errors import LambdaError
from node.lambdas.framing import FrameError
from node.lambdas.link import LinkDown, LinkHung, ZygoteLink
from node.lambdas.outcome import BAD_REQUEST, CRASHED, TIMEOUT, UNKNOWN_LAMBDA, LambdaOutcome
from node.lambdas.registry import LambdaRegistry, default_registry, parse_spec, spec_of
from node.lambdas.request import BadRequest, LambdaCall, LambdaLimits, call_from_lambda_data, validate_call

__all__ = ["LambdaRunner"]

log = logging.getLogger(__name__)

_HANG_GRACE_S = 10.0  # past a call's timeout, the zygote itself is presumed hung
_CLOSE_TIMEOUT_S = 5.0


class LambdaRunner:
    """Runs registered lambdas by name; `invoke` is blocking and safe to call from many threads,
    and calls run concurrently, each in its own process.

    Serves the functions of `registry` (the default registry unless given) and those named by
    `specs` ("module:function", known by the function part). A call's memory limit is the
    address space it may add on top of the worker's own image (interpreter and imported
    lambdas, shared copy-on-write), so a limit means the same whatever else was imported.
    """

    def __init__(
        self,
        *,
        registry: LambdaRegistry | None = None,
        specs: Sequence[str] = (),
        default_timeout_s: float = 30.0,
        default_memory_mb: int = 256,
        max_timeout_s: float = 86_400.0,
        max_memory_mb: int = 1_048_576,
        start_timeout_s: float = 30.0,
    ) -> None:
        if isinstance(specs, str):
            raise LambdaError("specs must be a list of 'module:function' strings, not one string")
        for spec in specs:
            parse_spec(spec)
        self._registry = default_registry if registry is None else registry
        self._specs = tuple(specs)
        self.limits = LambdaLimits(
            default_timeout_s=default_timeout_s,
            default_memory_mb=default_memory_mb,
            max_timeout_s=max_timeout_s,
            max_memory_mb=max_memory_mb,
        )
        self._start_timeout_s = start_timeout_s
        self._lock = threading.Lock()  # guards _link, _started, _closed, _restarts
        self._link: ZygoteLink | None = None
        self._started = False
        self._closed = False
        self._restarts = 0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker process and import every lambda; LambdaError if any fails to load."""
        with self._lock:
            if self._closed:
                raise LambdaError("this LambdaRunner is closed")
            if self._started:
                return
            self._link = ZygoteLink.spawn(self._hello(), start_timeout_s=self._start_timeout_s)
            self._started = True

    def close(self) -> None:
        """Stop the worker process; calls still running end as "crashed". Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            link, self._link = self._link, None
        if link is not None:
            link.close(timeout_s=_CLOSE_TIMEOUT_S)

    def __enter__(self) -> LambdaRunner:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def names(self) -> frozenset[str]:
        """Names the running worker serves (empty before `start`)."""
        link = self._link
        return frozenset() if link is None else link.names

    @property
    def worker_pid(self) -> int | None:
        """Pid of the zygote process, or None when none is running."""
        link = self._link
        return None if link is None or not link.alive else link.pid

    @property
    def restarts(self) -> int:
        """How many times the worker process had to be started again after it died."""
        return self._restarts

    # -- calls -----------------------------------------------------------------------------
    def invoke(
        self,
        name: str,
        event: Any = None,
        *,
        env: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        memory_mb: int | None = None,
        request_id: str | None = None,
    ) -> LambdaOutcome:
        """Run lambda `name` on `event` and wait for its outcome (bounded by its timeout)."""
        self._check_usable()
        try:
            call = validate_call(
                name, event, env=env, timeout_s=timeout_s, memory_mb=memory_mb,
                request_id=request_id, limits=self.limits,
            )
        except BadRequest as e:
            return LambdaOutcome.failure(BAD_REQUEST, str(e), type="BadRequest")
        return self._run(call)

    def dispatch_lambda(self, lambda_data: dict[str, Any]) -> dict[str, Any]:
        """Run a call given in the dispatch shape {"name", "event", "env", "timeout", "memory"}
        and return a flat result dict: ok, value, error, duration_s, name, request_id."""
        self._check_usable()
        try:
            call = call_from_lambda_data(lambda_data, limits=self.limits)
        except BadRequest as e:
            outcome = LambdaOutcome.failure(BAD_REQUEST, str(e), type="BadRequest")
        else:
            outcome = self._run(call)
        result = outcome.to_dict()
        data = lambda_data if isinstance(lambda_data, Mapping) else {}
        name, request_id = data.get("name"), data.get("request_id")
        result["name"] = name if isinstance(name, str) else None
        result["request_id"] = request_id if isinstance(request_id, str) else None
        return result

    def _check_usable(self) -> None:
        if self._closed:
            raise LambdaError("this LambdaRunner is closed")
        if not self._started:
            raise LambdaError("call LambdaRunner.start() before running lambdas")

    def _run(self, call: LambdaCall) -> LambdaOutcome:
        fields = {
            "name": call.name,
            "event": call.event,
            "env": dict(call.env),
            "timeout_s": call.timeout_s,
            "memory_mb": call.memory_mb,
            "request_id": call.request_id,
        }
        for attempt in (1, 2):
            try:
                link = self._live_link()
            except LambdaError as e:
                return LambdaOutcome.failure(CRASHED, str(e), type="WorkerUnavailable")
            if call.name not in link.names:
                known = ", ".join(sorted(link.names)[:20]) or "none"
                return LambdaOutcome.failure(
                    UNKNOWN_LAMBDA, f"no lambda named {call.name!r} on this node (known: {known})",
                    type="UnknownLambda",
                )
            try:
                return link.call(fields, wait_s=call.timeout_s + _HANG_GRACE_S)
            except FrameError as e:
                return LambdaOutcome.failure(
                    BAD_REQUEST, f"the event cannot be serialised: {e}", type="BadRequest"
                )
            except LinkHung as e:
                self._discard(link)
                return LambdaOutcome.failure(
                    TIMEOUT, f"{e}; it was stopped and will be restarted", type="WorkerHung"
                )
            except LinkDown as e:
                if e.started or attempt == 2:
                    return LambdaOutcome.failure(CRASHED, str(e), type="WorkerLost")
                # It never reached a process: safe to send it to a fresh zygote.
        raise AssertionError("unreachable")

    def _live_link(self) -> ZygoteLink:
        """The running zygote, started again first if the last one died."""
        with self._lock:
            if self._closed:
                raise LambdaError("this LambdaRunner was closed")
            link = self._link
            if link is not None and link.alive:
                return link
            if link is not None:
                log.warning("lambda worker process %d died; starting a new one", link.pid)
                link.close(timeout_s=_CLOSE_TIMEOUT_S)
                self._link = None
            self._link = ZygoteLink.spawn(self._hello(), start_timeout_s=self._start_timeout_s)
            self._restarts += 1
            return self._link

    def _discard(self, link: ZygoteLink) -> None:
        with self._lock:
            if self._link is link:
                self._link = None
        link.kill()

    def _hello(self) -> dict[str, Any]:
        entries: list[list[str]] = []
        for name, fn in self._registry.items():
            if getattr(fn, "__module__", None) == "__main__":
                raise LambdaError(
                    f"lambda {name!r} is defined in the __main__ script; worker processes import "
                    "lambdas by module name, so move it into a module or load it with "
                    "--lambda module:function"
                )
            entries.append([name, spec_of(fn)])
        return {
            "op": "load",
            "sys_path": [p for p in sys.path if isinstance(p, str)],
            "entries": entries,
            "specs": list(self._specs),
            "include_default": self._registry is default_registry,
        }
