"""Lambdas on a CPython node: real worker processes, real limits, real kills."""

from __future__ import annotations

import math
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.lambdas import (
    ERROR_KINDS,
    LambdaContext,
    LambdaError,
    LambdaOutcome,
    LambdaRegistry,
    LambdaRunner,
    default_registry,
    lambda_function,
    load_lambda,
)
from node.lambdas import builtin

BUILTINS = ("echo", "sleep", "allocate", "fail", "env")
BOUND_S = 10.0  # upper bound for anything that should take a moment

USER_MODULE = textwrap.dedent(
    '''
    import os
    import socket
    import subprocess
    import time

    NOT_CALLABLE = 42


    def lambda_handler(event, context):
        return {
            "function_name": context.function_name,
            "memory_limit_mb": context.memory_limit_mb,
            "timeout_s": context.timeout_s,
            "request_id": context.request_id,
            "remaining_ms": context.get_remaining_time_in_millis(),
            "total": sum(event["numbers"]),
        }


    def returns_set(event, context):
        return {1, 2, 3}


    def _tell(path, text):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(text.encode(), path)


    def hang_with_helper(event, context):
        """Start a helper process, report both pids, then never return."""
        helper = subprocess.Popen(["sleep", "60"])
        _tell(event["report_to"], f"{os.getpid()} {helper.pid}")
        time.sleep(60)


    def rendezvous(event, context):
        """Report arrival, then wait (bounded) for the test to release this call."""
        mine = event["report_to"] + "." + str(event["me"])
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.bind(mine)
            s.settimeout(event["wait_s"])
            _tell(event["report_to"], str(event["me"]))
            s.recv(16)
        return event["me"]
    '''
)


# -- helpers -------------------------------------------------------------------------------
def wait_exited(pid: int, timeout_s: float = BOUND_S) -> bool:
    """True once `pid` has exited (a zombie counts), waiting at most `timeout_s`."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout_s)
        return bool(readable)
    finally:
        os.close(fd)


def assert_serving(runner: LambdaRunner) -> None:
    outcome = runner.invoke("echo", {"still": "serving"})
    assert outcome.ok, outcome.error
    assert outcome.value == {"still": "serving"}


def builtin_registry() -> LambdaRegistry:
    registry = LambdaRegistry()
    for name in BUILTINS:
        registry.add(getattr(builtin, name), name=name)
    return registry


class Listener:
    """A datagram socket a lambda can report to; every receive is bounded."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "r")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(BOUND_S)

    def receive(self) -> str:
        return self.sock.recv(256).decode()

    def send_to(self, path: str, text: str) -> None:
        self.sock.sendto(text.encode(), path)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def user_module() -> Iterator[str]:
    """A user's lambda module in a directory of its own, importable by name."""
    name = f"user_lambdas_{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as directory:
        Path(directory, f"{name}.py").write_text(USER_MODULE)
        sys.path.insert(0, directory)
        try:
            yield name
        finally:
            sys.path.remove(directory)
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def runner(user_module: str) -> Iterator[LambdaRunner]:
    specs = [f"{user_module}:{fn}" for fn in ("lambda_handler", "returns_set", "hang_with_helper", "rendezvous")]
    with LambdaRunner(
        registry=builtin_registry(), specs=specs, default_timeout_s=BOUND_S, default_memory_mb=128
    ) as r:
        yield r


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A directory with a short path: Unix socket paths are limited to 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="lam", dir="/tmp") as directory:
        yield directory


# -- results -------------------------------------------------------------------------------
def test_echo_returns_the_event_unchanged(runner: LambdaRunner) -> None:
    event = {"text": "grüße", "n": [1, -2, 3.5, None, True], "raw": b"\x00\xff", "nested": {"k": []}}
    outcome = runner.invoke("echo", event)
    assert outcome == LambdaOutcome(ok=True, value=event, error=None)


def test_runner_serves_builtins_and_spec_loaded_functions(runner: LambdaRunner) -> None:
    assert set(BUILTINS) <= runner.names
    assert {"lambda_handler", "returns_set", "rendezvous"} <= runner.names


def test_spec_loaded_handler_receives_event_and_context(runner: LambdaRunner) -> None:
    outcome = runner.invoke(
        "lambda_handler", {"numbers": [1, 2, 3]}, timeout_s=7, memory_mb=100, request_id="task-42"
    )
    assert outcome.ok, outcome.error
    value = outcome.value
    assert value["total"] == 6
    assert value["function_name"] == "lambda_handler"
    assert value["memory_limit_mb"] == 100
    assert value["timeout_s"] == 7
    assert value["request_id"] == "task-42"
    assert 0 < value["remaining_ms"] <= 7000


def test_call_past_its_timeout_is_killed_quickly_with_its_helpers(
    runner: LambdaRunner, short_dir: str
) -> None:
    listener = Listener(short_dir)
    pids: list[int] = []
    try:
        with ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            future = pool.submit(runner.invoke, "hang_with_helper", {"report_to": listener.path}, timeout_s=1.0)
            pids = [int(p) for p in listener.receive().split()]
            outcome = future.result(timeout=BOUND_S)
            elapsed = time.monotonic() - started
        assert outcome.kind == "timeout"
        assert "1 s timeout" in outcome.error["message"]
        assert elapsed < 5.0
        call_pid, helper_pid = pids
        assert wait_exited(call_pid), "the call's process outlived its timeout"
        assert wait_exited(helper_pid), "a process the handler started outlived the call"
    finally:
        listener.close()
        for pid in pids:
            if not wait_exited(pid, 0):
                os.kill(pid, signal.SIGKILL)
    assert_serving(runner)


def test_builtin_sleep_past_timeout(runner: LambdaRunner) -> None:
    started = time.monotonic()
    outcome = runner.invoke("sleep", {"seconds": 60}, timeout_s=0.5)
    assert outcome.kind == "timeout"
    assert time.monotonic() - started < 5.0
    assert runner.invoke("sleep", {"seconds": 0.01}, timeout_s=5).value == {"slept_s": 0.01}


def test_allocation_past_memory_limit_is_a_memory_error(runner: LambdaRunner) -> None:
    outcome = runner.invoke("allocate", {"mb": 512}, memory_mb=64)
    assert outcome.kind == "memory"
    assert "64 MB" in outcome.error["message"]
    assert_serving(runner)


def test_allocation_within_memory_limit_succeeds(runner: LambdaRunner) -> None:
    assert runner.invoke("allocate", {"mb": 16}, memory_mb=64).value == {"allocated_mb": 16}


def test_memory_limit_is_per_call(runner: LambdaRunner) -> None:
    assert runner.invoke("allocate", {"mb": 300}, memory_mb=64).kind == "memory"
    assert runner.invoke("allocate", {"mb": 300}, memory_mb=512).ok


def test_exception_comes_back_with_type_message_and_traceback(runner: LambdaRunner) -> None:
    outcome = runner.invoke("fail", {"message": "disk on fire"})
    assert not outcome.ok
    assert outcome.error["kind"] == "exception"
    assert outcome.error["type"] == "ValueError"
    assert outcome.error["message"] == "disk on fire"
    assert "builtin.py" in outcome.error["traceback"]
    assert outcome.error["traceback"].rstrip().endswith("ValueError: disk on fire")
    assert_serving(runner)


def test_unserialisable_return_value_is_a_clear_exception(runner: LambdaRunner) -> None:
    outcome = runner.invoke("returns_set", None)
    assert outcome.kind == "exception"
    assert "cannot be serialised" in outcome.error["message"]
    assert "set" in outcome.error["message"]
    assert_serving(runner)


def test_unknown_name_is_an_error_result(runner: LambdaRunner) -> None:
    outcome = runner.invoke("no_such_lambda", {})
    assert outcome.kind == "unknown_lambda"
    assert "no_such_lambda" in outcome.error["message"]
    assert_serving(runner)


def test_env_vars_exist_only_inside_their_call(runner: LambdaRunner) -> None:
    variable = f"FABRIC_TEST_{uuid.uuid4().hex[:6].upper()}"
    assert runner.invoke("env", {"name": variable}, env={variable: "inside"}).value == "inside"
    assert runner.invoke("env", {"name": variable}).value is None
    assert variable not in os.environ


# -- concurrency ---------------------------------------------------------------------------
def test_calls_run_at_the_same_time(runner: LambdaRunner, short_dir: str) -> None:
    parties = 3
    listener = Listener(short_dir)
    try:
        with ThreadPoolExecutor(parties) as pool:
            futures = [
                pool.submit(
                    runner.invoke, "rendezvous", {"report_to": listener.path, "me": i, "wait_s": BOUND_S}
                )
                for i in range(parties)
            ]
            # All of them report in while none has returned: they run concurrently.
            arrived = sorted(int(listener.receive()) for _ in range(parties))
            assert arrived == list(range(parties))
            assert not any(f.done() for f in futures)
            for i in range(parties):
                listener.send_to(f"{listener.path}.{i}", "go")
            outcomes = [f.result(timeout=BOUND_S) for f in futures]
    finally:
        listener.close()
    assert [o.value for o in outcomes] == list(range(parties))


def test_concurrent_callers_each_get_their_own_result(runner: LambdaRunner) -> None:
    def caller(worker: int) -> list[Any]:
        return [runner.invoke("echo", {"worker": worker, "i": i}).value for i in range(8)]

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(caller, range(6), timeout=60))
    for worker, values in enumerate(results):
        assert values == [{"worker": worker, "i": i} for i in range(8)]


# -- worker process lifecycle ----------------------------------------------------------------
@pytest.fixture
def own_runner(user_module: str) -> Iterator[LambdaRunner]:
    with LambdaRunner(
        registry=builtin_registry(), specs=[f"{user_module}:hang_with_helper"], default_timeout_s=BOUND_S
    ) as r:
        yield r


def test_worker_process_is_restarted_after_it_is_killed(own_runner: LambdaRunner) -> None:
    first = own_runner.worker_pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    assert wait_exited(first)
    assert_serving(own_runner)
    assert own_runner.worker_pid not in (None, first)
    assert own_runner.restarts == 1


def test_calls_right_after_the_worker_process_dies_still_run(own_runner: LambdaRunner) -> None:
    for _ in range(5):
        pid = own_runner.worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert_serving(own_runner)  # no wait: the call may reach the dying process first
    assert own_runner.restarts == 5


def test_call_running_when_worker_process_dies_is_crashed(own_runner: LambdaRunner, short_dir: str) -> None:
    listener = Listener(short_dir)
    pids: list[int] = []
    try:
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(own_runner.invoke, "hang_with_helper", {"report_to": listener.path}, timeout_s=60)
            pids = [int(p) for p in listener.receive().split()]
            os.kill(own_runner.worker_pid, signal.SIGKILL)
            outcome = future.result(timeout=BOUND_S)
        assert outcome.kind == "crashed"
        assert wait_exited(pids[0]), "the call's process outlived the worker process"
    finally:
        listener.close()
        for pid in pids:
            if not wait_exited(pid, 0):
                os.kill(pid, signal.SIGKILL)
    assert_serving(own_runner)


NODE_SCRIPT = """
import socket, sys
sys.path[:0] = {paths!r}
from node.lambdas import LambdaRegistry, LambdaRunner
runner = LambdaRunner(registry=LambdaRegistry(), specs=["{module}:hang_with_helper"])
runner.start()
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    s.sendto(str(runner.worker_pid).encode(), {report_to!r})
runner.invoke("hang_with_helper", {{"report_to": {report_to!r}}}, timeout_s=60)
"""


def test_killing_the_node_ends_every_process_it_started(user_module: str, short_dir: str) -> None:
    listener = Listener(short_dir)
    script = NODE_SCRIPT.format(paths=[p for p in sys.path if p], module=user_module, report_to=listener.path)
    node = subprocess.Popen([sys.executable, "-c", script])
    pids: list[int] = []
    try:
        pids.append(int(listener.receive()))  # the worker process
        pids.extend(int(p) for p in listener.receive().split())  # the call and its helper
        node.kill()
        node.wait(timeout=BOUND_S)
        for pid in pids:
            assert wait_exited(pid), f"process {pid} outlived the node that started it"
    finally:
        listener.close()
        if node.poll() is None:
            node.kill()
            node.wait(timeout=BOUND_S)
        for pid in pids:
            if not wait_exited(pid, 0):
                os.kill(pid, signal.SIGKILL)


def test_close_stops_the_worker_process(user_module: str) -> None:
    runner = LambdaRunner(registry=builtin_registry())
    runner.start()
    pid = runner.worker_pid
    assert pid is not None
    runner.close()
    assert wait_exited(pid, 0)
    with pytest.raises(LambdaError, match="closed"):
        runner.invoke("echo", 1)
    runner.close()  # idempotent


def test_invoke_before_start_is_an_error() -> None:
    with pytest.raises(LambdaError, match="start"):
        LambdaRunner(registry=builtin_registry()).invoke("echo", 1)


def test_start_fails_clearly_when_a_spec_cannot_load(user_module: str) -> None:
    runner = LambdaRunner(registry=LambdaRegistry(), specs=[f"{user_module}:NOT_CALLABLE"])
    with pytest.raises(LambdaError, match="NOT_CALLABLE.*not a function"):
        runner.start()
    runner.close()


def test_malformed_spec_is_refused_at_construction() -> None:
    with pytest.raises(LambdaError, match="module:function"):
        LambdaRunner(specs=["no_colon_here"])


# -- requests in the dispatch shape ---------------------------------------------------------
def test_dispatch_lambda_runs_the_seed_shape(runner: LambdaRunner) -> None:
    result = runner.dispatch_lambda(
        {"name": "echo", "event": {"x": 1}, "env": {"A": "b"}, "timeout": 5, "memory": 64, "request_id": "t-1"}
    )
    assert result["ok"] is True
    assert result["value"] == {"x": 1}
    assert result["error"] is None
    assert result["name"] == "echo"
    assert result["request_id"] == "t-1"


@pytest.mark.parametrize(
    "lambda_data",
    [
        "echo",
        None,
        {"event": 1},
        {"name": 5},
        {"name": "echo", "timeout": "10"},
        {"name": "echo", "timeout": -1},
        {"name": "echo", "timeout": 0},
        {"name": "echo", "timeout": math.nan},
        {"name": "echo", "timeout": math.inf},
        {"name": "echo", "timeout": True},
        {"name": "echo", "memory": 0},
        {"name": "echo", "memory": 10**9},
        {"name": "echo", "memory": "64"},
        {"name": "echo", "memory": 1.5},
        {"name": "echo", "env": {"A": 1}},
        {"name": "echo", "env": ["A"]},
        {"name": "echo", "env": {"": "x"}},
        {"name": "echo", "env": {"A=B": "x"}},
        {"name": "echo", "request_id": 7},
    ],
)
def test_dispatch_lambda_refuses_bad_requests(runner: LambdaRunner, lambda_data: Any) -> None:
    result = runner.dispatch_lambda(lambda_data)
    assert result["ok"] is False
    assert result["error"]["kind"] == "bad_request"
    assert result["error"]["message"]


def test_unserialisable_event_is_a_bad_request(runner: LambdaRunner) -> None:
    assert runner.invoke("echo", {1, 2}).kind == "bad_request"
    assert_serving(runner)


_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["name", "event", "env", "timeout", "memory", "request_id"]),
        _junk | st.sampled_from(["echo", "fail", "env"]),
    )
)
def test_dispatch_lambda_never_raises_on_junk(runner: LambdaRunner, lambda_data: dict[str, Any]) -> None:
    result = runner.dispatch_lambda(lambda_data)
    assert isinstance(result["ok"], bool)
    if not result["ok"]:
        assert result["error"]["kind"] in ERROR_KINDS


# -- registry and spec loading ----------------------------------------------------------------
def sample_handler(event: Any, context: Any) -> Any:
    return event


def other_handler(event: Any, context: Any) -> Any:
    return None


def test_register_uses_function_name_or_given_name() -> None:
    registry = LambdaRegistry()
    assert registry.register()(sample_handler) is sample_handler
    registry.register("renamed")(sample_handler)
    assert registry.names() == ["renamed", "sample_handler"]
    assert registry.get("renamed") is sample_handler


def test_register_refuses_a_taken_name() -> None:
    registry = LambdaRegistry()
    registry.register("x")(sample_handler)
    registry.register("x")(sample_handler)  # the same function again is fine
    with pytest.raises(LambdaError, match="already taken"):
        registry.register("x")(other_handler)


def test_register_refuses_functions_a_worker_cannot_import() -> None:
    def local(event: Any, context: Any) -> None:
        return None

    registry = LambdaRegistry()
    with pytest.raises(LambdaError, match="top level"):
        registry.register()(local)
    with pytest.raises(LambdaError, match="top level"):
        registry.add(lambda event, context: None, name="anon")
    with pytest.raises(LambdaError, match="parentheses"):
        registry.register(sample_handler)
    with pytest.raises(LambdaError, match="invalid lambda name"):
        registry.register("has space")(sample_handler)


def test_builtins_are_registered_by_an_explicit_call_not_by_an_import() -> None:
    fresh = LambdaRegistry()
    assert builtin.register_builtins(fresh) is fresh
    assert fresh.names() == sorted(BUILTINS)
    builtin.register_builtins()  # what the node does; a second call is harmless
    builtin.register_builtins()
    for name in BUILTINS:
        assert default_registry.get(name) is getattr(builtin, name)
    assert lambda_function.__module__ == "node.lambdas.registry"
    code = ("import node.lambdas.builtin, node.transport\n"
            "from node.lambdas import default_registry\n"
            "from node.registry import default_registry as tasks\n"
            "print(len(default_registry), tasks.names())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True, cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.split() == ["0", "[]"]


@pytest.mark.parametrize("spec", ["no_colon", "mod:", ":fn", "a:b:c", "mod:fn()", "1mod:fn", "mod: fn"])
def test_load_lambda_refuses_malformed_specs(spec: str) -> None:
    with pytest.raises(LambdaError, match="expected 'module:function'"):
        load_lambda(spec)


def test_load_lambda_reports_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    tag = uuid.uuid4().hex[:8]
    (tmp_path / f"good_{tag}.py").write_text("def handler(event, context):\n    return 1\nVALUE = 3\n")
    (tmp_path / f"needs_dep_{tag}.py").write_text(f"import missing_dependency_{tag}\n")
    (tmp_path / f"broken_{tag}.py").write_text("raise RuntimeError('bad config')\n")
    try:
        assert load_lambda(f"good_{tag}:handler")(None, None) == 1
        with pytest.raises(LambdaError, match=f"no module named 'absent_{tag}'"):
            load_lambda(f"absent_{tag}:handler")
        with pytest.raises(LambdaError, match=f"needs module 'missing_dependency_{tag}'"):
            load_lambda(f"needs_dep_{tag}:handler")
        with pytest.raises(LambdaError, match="raised RuntimeError: bad config"):
            load_lambda(f"broken_{tag}:handler")
        (tmp_path / f"taken_{tag}.py").write_text(
            "from node.lambdas import LambdaError\nraise LambdaError('name taken')\n")
        with pytest.raises(LambdaError, match="raised LambdaError: name taken"):
            load_lambda(f"taken_{tag}:handler")  # the module's own error, worded as the spec's
        with pytest.raises(LambdaError, match="has no attribute 'nothing'"):
            load_lambda(f"good_{tag}:nothing")
        with pytest.raises(LambdaError, match="'VALUE' is a int, not a function"):
            load_lambda(f"good_{tag}:VALUE")
    finally:
        for name in ("good", "needs_dep", "broken"):
            sys.modules.pop(f"{name}_{tag}", None)


def test_load_lambda_finds_a_module_in_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tag = uuid.uuid4().hex[:8]
    (tmp_path / f"here_{tag}.py").write_text("def lambda_handler(event, context):\n    return event * 2\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        assert load_lambda(f"here_{tag}:lambda_handler")(21, None) == 42
    finally:
        sys.modules.pop(f"here_{tag}", None)


# -- small values ---------------------------------------------------------------------------
def test_context_counts_down_to_zero() -> None:
    now = time.monotonic()
    live = LambdaContext(function_name="f", memory_limit_mb=64, timeout_s=2, request_id=None, deadline=now + 2)
    assert 0 < live.get_remaining_time_in_millis() <= 2000
    past = LambdaContext(function_name="f", memory_limit_mb=64, timeout_s=2, request_id=None, deadline=now - 1)
    assert past.get_remaining_time_in_millis() == 0


def test_outcome_round_trips_through_its_dict_form() -> None:
    failed = LambdaOutcome.failure("timeout", "too slow", type="Timeout", duration_s=1.5)
    assert LambdaOutcome.from_dict(failed.to_dict()) == failed
    assert LambdaOutcome.from_dict(LambdaOutcome.success([1]).to_dict()).value == [1]
    assert LambdaOutcome.from_dict({"ok": False}).kind == "crashed"
