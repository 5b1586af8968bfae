"""The zygote: a single-threaded process that imports every lambda once, then forks one child
per call. Each call starts warm, runs under its own limits and environment, and can be killed
alone. The node itself is never forked: it has an MQTT thread, and fork copies no threads.

Protocol on the node's socket (framed msgpack, see `framing`):
  node -> zygote  {"op": "load", ...} once, then {"op": "call", "id", "name", "event", "env",
                  "timeout_s", "memory_mb", "request_id"}
  zygote -> node  {"op": "ready", "pid", "names"} or {"op": "failed", "message"};
                  {"op": "started", "id", "pid"} once a call has a process, and
                  {"op": "done", "id", "result": <packed outcome dict>} when it ends.
The zygote enforces each timeout itself: it is the children's parent, so it can kill a child
that has not been reaped yet without any risk of hitting a reused pid.
What a call prints (its stdout and stderr, one pipe) is kept as a bounded tail, the last
`OUTPUT_TAIL` bytes, written to the zygote's own stderr with the count when the call ends:
one call never floods the node's log.
"""

from __future__ import annotations

import gc
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from node.lambdas import framing
from node.lambdas.child import EXIT_OUT_OF_MEMORY, run_child
from node.lambdas.errors import LambdaError
from node.lambdas.outcome import CRASHED, MEMORY, TIMEOUT, UNKNOWN_LAMBDA, BAD_REQUEST
from node.lambdas.registry import Handler, default_registry, load_lambda, spec_of

__all__ = ["main", "load_table"]

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 1.0
_HANDSHAKE_TIMEOUT_S = 30.0
_SHUTDOWN_REAP_S = 5.0
_READ_CHUNK = 1 << 16
OUTPUT_TAIL = 4096


def load_table(hello: dict[str, Any]) -> dict[str, Handler]:
    """Import every lambda the node asked for; LambdaError names the first that fails."""
    node_path = [p for p in hello.get("sys_path", []) if isinstance(p, str)]
    sys.path[:] = node_path + [p for p in sys.path if p not in node_path]
    table: dict[str, Handler] = {}
    origins: dict[str, str] = {}

    def add(name: str, fn: Handler, origin: str) -> None:
        known = table.get(name)
        if known is not None and known is not fn and spec_of(known) != spec_of(fn):
            raise LambdaError(f"two lambdas are named {name!r}: {origins[name]} and {origin}")
        table[name] = fn
        origins[name] = origin

    for name, spec in hello.get("entries", []):
        add(name, load_lambda(spec), spec)
    for spec in hello.get("specs", []):
        add(spec.partition(":")[2], load_lambda(spec), spec)
    if hello.get("include_default"):
        for name, fn in default_registry.items():
            add(name, fn, spec_of(fn))
    return table


def _outcome(kind: str, type_: str, message: str, duration_s: float = 0.0) -> bytes:
    error = {"kind": kind, "type": type_, "message": message, "traceback": ""}
    return framing.pack({"ok": False, "value": None, "error": error, "duration_s": duration_s})


@dataclass
class _Child:
    call_id: int
    name: str
    pid: int
    pidfd: int
    pipe: int | None
    started: float
    deadline: float
    timeout_s: float
    memory_mb: int
    output: bytearray = field(default_factory=bytearray)
    timed_out: bool = False
    printed: int | None = None  # the read end of its stdout/stderr pipe
    tail: bytearray = field(default_factory=bytearray)
    printed_bytes: int = 0


class _Zygote:
    def __init__(self, ctl: socket.socket, inbox: framing.FrameBuffer, table: dict[str, Handler]) -> None:
        self._ctl = ctl
        self._inbox = inbox
        self._table = table
        self._children: dict[int, _Child] = {}  # by pid
        self._by_fd: dict[int, tuple[_Child, str]] = {}
        self._pid = os.getpid()

    # -- messages to the node --------------------------------------------------------------
    def _send(self, msg: dict[str, Any]) -> None:
        self._ctl.sendall(framing.frame(framing.pack(msg)))

    def _done(self, call_id: int, result: bytes) -> None:
        self._send({"op": "done", "id": call_id, "result": result})

    # -- calls -----------------------------------------------------------------------------
    def _start(self, msg: dict[str, Any]) -> None:
        call_id = msg.get("id")
        try:
            name = msg["name"]
            timeout_s = float(msg["timeout_s"])
            memory_mb = int(msg["memory_mb"])
            call = {
                "name": name,
                "event": msg.get("event"),
                "env": dict(msg.get("env") or {}),
                "timeout_s": timeout_s,
                "memory_mb": memory_mb,
                "request_id": msg.get("request_id"),
            }
        except (KeyError, TypeError, ValueError) as e:
            self._done(call_id, _outcome(BAD_REQUEST, "BadRequest", f"malformed call: {e!r}"))
            return
        handler = self._table.get(name)
        if handler is None:
            self._done(call_id, _outcome(UNKNOWN_LAMBDA, "UnknownLambda", f"no lambda named {name!r}"))
            return
        read_fd, write_fd = os.pipe()
        printed_fd, output_fd = os.pipe()
        inherited = [self._ctl.fileno(), read_fd, printed_fd, *self._by_fd]
        started = time.monotonic()
        deadline = started + timeout_s
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        try:
            pid = os.fork()
        except OSError as e:
            for fd in (read_fd, write_fd, printed_fd, output_fd):
                os.close(fd)
            self._done(call_id, _outcome(CRASHED, "ForkFailed", f"could not start a process: {e}"))
            return
        if pid == 0:
            run_child(
                call,
                handler,
                result_fd=write_fd,
                parent_pid=self._pid,
                deadline=deadline,
                close_fds=inherited,
                output_fd=output_fd,
            )
        os.close(write_fd)
        os.close(output_fd)
        os.set_blocking(printed_fd, False)
        try:
            os.setpgid(pid, pid)  # also done by the child; whichever runs first wins the race
        except OSError:
            pass
        os.set_blocking(read_fd, False)
        pidfd = os.pidfd_open(pid)
        child = _Child(call_id, name, pid, pidfd, read_fd, started, deadline, timeout_s, memory_mb)
        self._children[pid] = child
        child.printed = printed_fd
        self._by_fd[read_fd] = (child, "pipe")
        self._by_fd[printed_fd] = (child, "printed")
        self._by_fd[pidfd] = (child, "exit")
        self._send({"op": "started", "id": call_id, "pid": pid})

    def _read_output(self, child: _Child) -> None:
        """Take what the child has written so far; close the pipe at EOF."""
        assert child.pipe is not None
        while True:
            try:
                chunk = os.read(child.pipe, _READ_CHUNK)
            except BlockingIOError:
                return
            if not chunk:
                del self._by_fd[child.pipe]
                os.close(child.pipe)
                child.pipe = None
                return
            child.output += chunk

    def _read_printed(self, child: _Child) -> None:
        """Keep the tail of what the child printed; close the pipe at EOF."""
        assert child.printed is not None
        while True:
            try:
                chunk = os.read(child.printed, _READ_CHUNK)
            except BlockingIOError:
                return
            if not chunk:
                self._close_printed(child)
                return
            child.printed_bytes += len(chunk)
            child.tail += chunk
            if len(child.tail) > 2 * OUTPUT_TAIL:
                del child.tail[:-OUTPUT_TAIL]

    def _close_printed(self, child: _Child) -> None:
        if child.printed is not None:
            del self._by_fd[child.printed]
            os.close(child.printed)
            child.printed = None

    def _report_printed(self, child: _Child) -> None:
        """What the call printed, bounded, on the zygote's stderr (the node's, or its
        process-pool worker's, where the task's own output goes)."""
        if not child.printed_bytes:
            return
        kept = min(child.printed_bytes, OUTPUT_TAIL)
        header = f"lambda {child.name!r} printed {child.printed_bytes} bytes"
        header += f"; the last {kept} follow:\n" if kept < child.printed_bytes else ":\n"
        tail = bytes(child.tail[-OUTPUT_TAIL:])
        view = memoryview(header.encode() + tail + (b"" if tail.endswith(b"\n") else b"\n"))
        try:
            while view:
                view = view[os.write(2, view) :]
        except OSError:
            pass

    def _reap(self, child: _Child) -> None:
        try:
            os.killpg(child.pid, signal.SIGKILL)  # leftovers the handler started; leader is a zombie
        except OSError:
            pass
        _, status = os.waitpid(child.pid, 0)  # has exited (pidfd readable): returns at once
        if child.pipe is not None:
            self._read_output(child)
        if child.pipe is not None:  # a leftover grandchild kept the pipe open: stop listening
            del self._by_fd[child.pipe]
            os.close(child.pipe)
            child.pipe = None
        if child.printed is not None:
            self._read_printed(child)
        self._close_printed(child)  # a leftover grandchild may hold it open: stop listening
        del self._by_fd[child.pidfd]
        os.close(child.pidfd)
        del self._children[child.pid]
        self._report_printed(child)
        self._done(child.call_id, self._result(child, status))

    def _result(self, child: _Child, status: int) -> bytes:
        duration_s = time.monotonic() - child.started
        payloads = framing.FrameBuffer().feed(bytes(child.output))
        if len(payloads) == 1:
            return payloads[0]
        if child.timed_out:
            return _outcome(
                TIMEOUT,
                "Timeout",
                f"{child.name!r} ran past its {child.timeout_s:g} s timeout and was killed",
                duration_s,
            )
        code = os.waitstatus_to_exitcode(status)
        if code == EXIT_OUT_OF_MEMORY:
            return _outcome(
                MEMORY,
                "MemoryError",
                f"{child.name!r} ran out of memory under its {child.memory_mb} MB limit",
                duration_s,
            )
        if code == -signal.SIGKILL:
            return _outcome(
                MEMORY,
                "OutOfMemoryKill",
                f"{child.name!r} was killed by SIGKILL, not by the runner: the kernel's "
                "out-of-memory killer does this when the machine runs short of memory",
                duration_s,
            )
        if code < 0:
            signame = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            return _outcome(CRASHED, signame, f"{child.name!r} died from {signame}", duration_s)
        return _outcome(
            CRASHED, "WorkerExited", f"{child.name!r} exited with status {code} without a result", duration_s
        )

    def _enforce_deadlines(self, now: float) -> None:
        for child in self._children.values():
            if not child.timed_out and now >= child.deadline:
                child.timed_out = True
                try:
                    os.killpg(child.pid, signal.SIGKILL)
                except OSError:
                    os.kill(child.pid, signal.SIGKILL)  # not yet its own group leader

    def _next_wait(self, now: float) -> float:
        pending = [c.deadline for c in self._children.values() if not c.timed_out]
        if not pending:
            return _IDLE_WAIT_S
        return max(0.0, min(_IDLE_WAIT_S, min(pending) - now))

    # -- loop ------------------------------------------------------------------------------
    def serve(self) -> None:
        while True:
            now = time.monotonic()
            self._enforce_deadlines(now)
            readable, _, _ = select.select([self._ctl, *self._by_fd], [], [], self._next_wait(now))
            for fd in readable:
                if fd is self._ctl:
                    data = self._ctl.recv(_READ_CHUNK)
                    if not data:
                        return  # the node closed the socket or died
                    for payload in self._inbox.feed(data):
                        msg = framing.unpack(payload)
                        if msg.get("op") == "call":
                            self._start(msg)
                    continue
                entry = self._by_fd.get(fd)
                if entry is None:
                    continue  # closed earlier in this round
                child, what = entry
                if what == "pipe":
                    self._read_output(child)
                elif what == "printed":
                    self._read_printed(child)
                else:
                    self._reap(child)

    def shutdown(self) -> None:
        """Kill every running call and reap them, bounded: the zygote never outlives its calls."""
        for child in list(self._children.values()):
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except OSError:
                try:
                    os.kill(child.pid, signal.SIGKILL)
                except OSError:
                    pass
        deadline = time.monotonic() + _SHUTDOWN_REAP_S
        while self._children and time.monotonic() < deadline:
            fds = {c.pidfd: c for c in self._children.values()}
            readable, _, _ = select.select(list(fds), [], [], max(0.0, deadline - time.monotonic()))
            for fd in readable:
                child = fds[fd]
                os.waitpid(child.pid, 0)
                os.close(child.pidfd)
                if child.pipe is not None:
                    os.close(child.pipe)
                if child.printed is not None:
                    os.close(child.printed)
                del self._children[child.pid]


def _handshake(ctl: socket.socket, inbox: framing.FrameBuffer) -> dict[str, Any] | None:
    deadline = time.monotonic() + _HANDSHAKE_TIMEOUT_S
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        readable, _, _ = select.select([ctl], [], [], remaining)
        if not readable:
            continue
        data = ctl.recv(_READ_CHUNK)
        if not data:
            return None
        payloads = inbox.feed(data)
        if payloads:
            return framing.unpack(payloads[0])


def main(fd: int) -> None:
    """Entry point of the zygote process; `fd` is its end of the node's socket pair."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node decides when calls stop
    ctl = socket.socket(fileno=fd)
    inbox = framing.FrameBuffer()
    hello = _handshake(ctl, inbox)
    if hello is None:
        return
    try:
        table = load_table(hello)
    except LambdaError as e:
        ctl.sendall(framing.frame(framing.pack({"op": "failed", "message": str(e)})))
        return
    if threading.active_count() > 1:
        log.warning("a lambda module started a thread at import; forking per call is unsafe")
    gc.freeze()  # keep the imported objects out of collections, so children share their pages
    zygote = _Zygote(ctl, inbox, table)
    ctl.sendall(framing.frame(framing.pack({"op": "ready", "pid": os.getpid(), "names": sorted(table)})))
    try:
        zygote.serve()
    except (OSError, framing.FrameError) as e:  # the node is gone or sent garbage: stop cleanly
        log.warning("lambda zygote stopping: %s", e)
    finally:
        zygote.shutdown()
