"""One call, in a child forked from the zygote: apply the limits, run the handler, write one
result frame, exit. Everything here runs after fork and ends in `os._exit`, so the child never
returns into the zygote's loop whatever the handler does."""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys
import time
import traceback
from collections.abc import Iterable
from typing import Any, NoReturn

from node.lambdas import framing
from node.lambdas.context import LambdaContext
from node.lambdas.environment import call_environment
from node.lambdas.outcome import EXCEPTION, MEMORY
from node.lambdas.registry import Handler

__all__ = ["run_child", "EXIT_OUT_OF_MEMORY", "EXIT_INTERNAL"]

EXIT_OUT_OF_MEMORY = 86
"""Exit status when even reporting a MemoryError failed: the zygote reads it as "memory"."""
EXIT_INTERNAL = 70

_MIB = 1024 * 1024
_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()  # resolved once in the zygote, not on every fork


def _address_space_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def _limit_memory(memory_mb: int) -> None:
    """Cap the address space at what the process already has plus `memory_mb`.

    The baseline is the zygote's image shared copy-on-write (interpreter, imported modules);
    counting it against the handler would make a small limit depend on what else was imported.
    Soft and hard limits are both lowered so the handler cannot lift its own cap.
    """
    limit = _address_space_bytes() + memory_mb * _MIB
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _isolate(parent_pid: int, close_fds: Iterable[int]) -> None:
    os.setpgid(0, 0)  # own process group: a timeout kills whatever the handler started too
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # die with the zygote
    if os.getppid() != parent_pid:  # the zygote died before prctl took effect
        os._exit(EXIT_INTERNAL)
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a user exception whose __str__ fails still deserves a report
        return f"<{type(exc).__name__} with an unprintable message>"


def _format_traceback(exc: BaseException) -> str:
    tb = exc.__traceback__
    if tb is not None and tb.tb_next is not None:
        tb = tb.tb_next  # drop this module's frame: the user's code starts at the handler
    try:
        return "".join(traceback.format_exception(type(exc), exc, tb))
    except MemoryError:
        return ""


def _failure(kind: str, exc: BaseException, message: str, duration_s: float) -> bytes:
    error = {
        "kind": kind,
        "type": type(exc).__name__,
        "message": message,
        "traceback": _format_traceback(exc),
    }
    exc.__traceback__ = None  # free the handler's frames (and whatever they hold) before packing
    return framing.pack({"ok": False, "value": None, "error": error, "duration_s": duration_s})


def _run(call: dict[str, Any], handler: Handler, deadline: float) -> bytes:
    name = call["name"]
    context = LambdaContext(
        function_name=name,
        memory_limit_mb=call["memory_mb"],
        timeout_s=call["timeout_s"],
        request_id=call.get("request_id"),
        deadline=deadline,
    )
    start = time.monotonic()
    try:
        value = handler(call["event"], context)
    except MemoryError as e:
        detail = _safe_str(e)
        message = f"{name!r} ran out of memory under its {call['memory_mb']} MB limit"
        return _failure(MEMORY, e, f"{message}: {detail}" if detail else message, time.monotonic() - start)
    except BaseException as e:  # SystemExit and KeyboardInterrupt from user code are results too
        return _failure(EXCEPTION, e, _safe_str(e), time.monotonic() - start)
    duration_s = time.monotonic() - start
    try:
        return framing.pack({"ok": True, "value": value, "error": None, "duration_s": duration_s})
    except framing.FrameError as e:
        message = (
            f"the return value of {name!r} ({type(value).__name__}) cannot be serialised "
            f"for the wire: {e}; return only dicts, lists, strings, numbers, bytes, bools and None"
        )
        cause = e.__cause__ if e.__cause__ is not None else e
        return framing.pack(
            {
                "ok": False,
                "value": None,
                "error": {"kind": EXCEPTION, "type": type(cause).__name__, "message": message, "traceback": ""},
                "duration_s": duration_s,
            }
        )


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def run_child(
    call: dict[str, Any],
    handler: Handler,
    *,
    result_fd: int,
    parent_pid: int,
    deadline: float,
    close_fds: Iterable[int],
    output_fd: int | None = None,
) -> NoReturn:
    """Body of the forked child; never returns. Its stdout and stderr go to `output_fd`
    (a pipe the zygote keeps a bounded tail of), when given."""
    status = EXIT_INTERNAL
    try:
        _isolate(parent_pid, close_fds)
        if output_fd is not None:
            os.dup2(output_fd, 1)
            os.dup2(output_fd, 2)
            os.close(output_fd)
        _limit_memory(call["memory_mb"])
        # this child's copy only, gone when the call ends: the base plus the call's variables,
        # never the node's (the zygote was started with the base alone)
        os.environ.clear()
        os.environ.update(call_environment(call["env"]))
        payload = _run(call, handler, deadline)
        _write_all(result_fd, framing.frame(payload))
        status = 0
    except MemoryError:
        status = EXIT_OUT_OF_MEMORY
    except BaseException:  # anything else here is the runner's own failure: report by status
        status = EXIT_INTERNAL
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(status)
