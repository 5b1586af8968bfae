"""Worker processes for a node's tasks: a task past its time limit, or cancelled, is killed.

A thread cannot be stopped from outside; a process can. With `pool="process"` each capacity
slot owns one worker process, reused from task to task. A task past its time limit is killed
and ends `timeout`; a cancelled one is killed at once; a worker that is killed or dies is
replaced by a fresh one before its slot's next task.

Workers are forked from the node (Linux, the fork start method), so every registered task
reaches them as the node has it: built-ins, `--task`/`--lambda` modules, functions defined in
the calling script, closures. Register tasks before `start`: a worker forked earlier does not
see later ones until it is replaced. Each worker leads its own process group (a kill takes
whatever the task started too), ignores Ctrl-C (the node decides when tasks stop), dies with
the node, and closes every descriptor it inherited but its own: the node's MQTT connection
stays the node's. Its stdout and stderr are one pipe the node reads while a task runs, kept
as a bounded tail (see node.task_output).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import pickle
import select
import signal
import struct
import sys
import threading
import time
from typing import Any, Callable, Iterable

from core.errors import ConfigError
from core.protocol import TaskResult, TaskSpec, result_for
from node import task_context
from node.task_output import OutputTail

__all__ = ["ProcessPool", "POOLS"]

POOLS = ("thread", "process")

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!I")
_READ = 1 << 16
_PR_SET_PDEATHSIG = 1
_EXIT_WAIT = 5.0


class _Never:
    """The holder a task's context asks in a worker process: a task there is never told to
    stop, it is killed."""

    _event = threading.Event()

    def is_cancelled(self, task_id: str) -> bool:
        return False

    def cancel_event(self, task_id: str) -> threading.Event:
        return self._event


class _Worker:
    """The node's handle on one worker process (its pid stays ours until we reap it)."""

    __slots__ = ("pid", "pidfd", "sock", "output", "task_id", "killed_for")

    def __init__(self, pid: int, pidfd: int, sock: int, output: int) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.sock = sock
        self.output = output
        self.task_id: str | None = None
        self.killed_for: str | None = None  # "cancelled" / "timeout" once the node killed it


class ProcessPool:
    """`size` worker processes that run `call(task) -> TaskResult` in the child.

    `run` is called from at most `size` threads at once (the node's worker threads), each
    waiting for its task's result; `cancel` and `close` may come from any thread.
    """

    def __init__(self, *, size: int, call: Callable[[TaskSpec], TaskResult],
                 node_id: str = "", clock: Callable[[], float] = time.time) -> None:
        if not hasattr(os, "fork") or not hasattr(os, "pidfd_open"):
            raise ConfigError("a process pool needs Linux (fork and pidfd); use the thread pool")
        if not isinstance(size, int) or size < 1:
            raise ConfigError(f"a process pool needs at least one worker, got {size!r}")
        self.size = size
        self.node_id = node_id
        self._call = call
        self._clock = clock
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._busy: dict[str, _Worker] = {}  # by the id of the task it runs
        self._closed = False
        self.started = 0   # worker processes forked, replacements included
        self.killed = 0    # killed for a time limit or a cancel

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Fork the workers now, so the first tasks start warm."""
        workers = [self._fork() for _ in range(self.size)]
        with self._lock:
            self._idle.extend(workers)

    def close(self) -> None:
        """Kill every worker, running or not, and reap them (bounded). Idempotent."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            for worker in idle + list(self._busy.values()):
                self._kill(worker, "closed")
        for worker in idle:  # a running one is reaped by the thread waiting on it
            self._reap(worker)

    # -- tasks -----------------------------------------------------------------------------

    def run(self, task: TaskSpec, *, cancelled: Callable[[str], bool]
            ) -> tuple[TaskResult, OutputTail]:
        """Run `task` in a worker and wait for its result: killed at `task.timeout` seconds
        (kind `timeout`) or when `cancel` names it (kind `cancelled`)."""
        output = OutputTail()
        worker = self._take()
        if worker is None:
            return self._failure(task, "crashed", "WorkerUnavailable",
                                 "the node is stopping its worker processes"), output
        with self._lock:
            worker.task_id = task.id
            self._busy[task.id] = worker
        if cancelled(task.id):  # cancelled before it reached the worker (see `cancel`)
            self._give_back(worker, task.id, alive=True)
            return self._failure(task, **_CANCELLED), output
        try:
            _send(worker.sock, task)
        except OSError:
            pass  # it died meanwhile: the wait below finds it gone
        deadline = time.monotonic() + task.timeout if task.timeout else None
        reply = self._wait(worker, deadline, output)
        if reply is None:  # killed (time limit, cancel) or died on its own
            self._reap(worker, output)
            self._give_back(worker, task.id, alive=False)
            return self._lost(task, worker), output
        self._give_back(worker, task.id, alive=True)
        ok, value, error = reply
        return result_for(task, ok, value, error, ts=self._clock()), output

    def cancel(self, task_ids: Iterable[str]) -> int:
        """Kill the workers running these tasks; how many were killed."""
        count = 0
        with self._lock:
            for task_id in task_ids:
                worker = self._busy.get(task_id)
                if worker is not None and worker.killed_for is None:
                    self._kill(worker, "cancelled")
                    count += 1
        return count

    # -- internals -------------------------------------------------------------------------

    def _take(self) -> _Worker | None:
        """An idle worker that is still alive (a dead one is reaped and replaced)."""
        with self._lock:
            if self._closed:
                return None
            worker = self._idle.pop() if self._idle else None
        if worker is not None and _exited(worker):
            self._reap(worker)
            worker = None
        if worker is None:
            worker = self._fork()
            with self._lock:
                if self._closed:
                    self._kill(worker, "closed")
                    closing = True
                else:
                    closing = False
            if closing:
                self._reap(worker)
                return None
        return worker

    def _give_back(self, worker: _Worker, task_id: str, *, alive: bool) -> None:
        with self._lock:
            self._busy.pop(task_id, None)
            worker.task_id = None
            if alive and not self._closed:
                self._idle.append(worker)
                return
        if alive:  # closed while it ran: close() left it to us
            self._reap(worker)

    def _wait(self, worker: _Worker, deadline: float | None, output: OutputTail
              ) -> tuple[bool, Any, dict | None] | None:
        """The worker's reply, reading its output meanwhile; None if it ended first, or
        was killed when the deadline passed."""
        received = bytearray()
        poller = select.poll()
        for fd in (worker.sock, worker.output, worker.pidfd):
            poller.register(fd, select.POLLIN)
        while True:
            if deadline is None:
                wait = None
            else:
                wait = max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
            events = dict(poller.poll(wait))
            if not events:
                if deadline is not None and time.monotonic() >= deadline:
                    with self._lock:
                        self._kill(worker, "timeout")
                    return None
                continue
            if worker.output in events:
                _drain(worker.output, output)
            if worker.sock in events:
                try:
                    chunk = os.read(worker.sock, _READ)
                except OSError:
                    chunk = b""
                if not chunk:
                    return None
                received += chunk
                reply = _unframe(received)
                if reply is not None:
                    _drain(worker.output, output)
                    return reply
            elif worker.pidfd in events:
                return None

    def _fork(self) -> _Worker:
        parent_sock, child_sock = _socketpair()
        out_read, out_write = os.pipe()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child never returns)
            _child(child_sock, out_write, parent, self._call)
        os.close(child_sock)
        os.close(out_write)
        try:
            os.setpgid(pid, pid)  # the child does it too; whichever is first
        except OSError:
            pass
        os.set_blocking(out_read, False)
        self.started += 1
        return _Worker(pid, os.pidfd_open(pid), parent_sock, out_read)

    def _kill(self, worker: _Worker, why: str) -> None:
        """Kill a worker and its process group (called with the lock held, before its reap)."""
        if worker.killed_for is not None:
            return
        worker.killed_for = why
        if why in ("timeout", "cancelled"):
            self.killed += 1
        try:
            os.killpg(worker.pid, signal.SIGKILL)  # unreaped: its group id cannot be reused
        except OSError:
            pass
        try:
            signal.pidfd_send_signal(worker.pidfd, signal.SIGKILL)
        except OSError:
            pass

    def _reap(self, worker: _Worker, output: OutputTail | None = None) -> None:
        """Wait for a worker that was killed or exited (bounded), then close its ends."""
        with self._lock:
            if worker.killed_for is None:
                self._kill(worker, "died")
        if _exited(worker, _EXIT_WAIT):
            try:
                os.waitpid(worker.pid, 0)
            except ChildProcessError:
                pass
        if output is not None:
            _drain(worker.output, output)
        for fd in (worker.sock, worker.output, worker.pidfd):
            try:
                os.close(fd)
            except OSError:
                pass

    def _lost(self, task: TaskSpec, worker: _Worker) -> TaskResult:
        why = worker.killed_for
        if why == "timeout":
            log.warning("task %s (%s) ran past its %gs limit: its worker process was killed",
                        task.id, task.name, task.timeout)
            return self._failure(
                task, "timeout", "Timeout",
                f"the task ran past its {task.timeout:g}s limit on node {self.node_id}; its "
                "worker process was killed")
        if why == "cancelled":
            return self._failure(task, **_CANCELLED)
        return self._failure(task, "crashed", "WorkerLost",
                             f"the worker process running it on node {self.node_id} died "
                             "without a result")

    def _failure(self, task: TaskSpec, kind: str, type: str, message: str) -> TaskResult:
        return result_for(task, False, error={"kind": kind, "type": type, "message": message},
                          ts=self._clock())


_CANCELLED = {"kind": "cancelled", "type": "Cancelled", "message": "cancelled"}


def _socketpair() -> tuple[int, int]:
    import socket
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return a.detach(), b.detach()


def _exited(worker: _Worker, wait: float = 0.0) -> bool:
    poller = select.poll()
    poller.register(worker.pidfd, select.POLLIN)
    return bool(poller.poll(int(wait * 1000)))


def _drain(fd: int, output: OutputTail) -> None:
    while True:
        try:
            chunk = os.read(fd, _READ)
        except (BlockingIOError, OSError):
            return
        if not chunk:
            return
        output.feed(chunk)


def _frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def _unframe(buffer: bytearray) -> Any:
    """The object in `buffer` once it is complete (None before)."""
    if len(buffer) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack_from(buffer)
    if len(buffer) < _HEADER.size + size:
        return None
    return pickle.loads(bytes(buffer[_HEADER.size:_HEADER.size + size]))


def _send(fd: int, obj: Any) -> None:
    view = memoryview(_frame(obj))
    while view:
        view = view[os.write(fd, view):]


def _recv(fd: int) -> Any:
    """The next framed object from the node (None when the node closed its end)."""
    buffer = bytearray()
    while True:
        chunk = os.read(fd, _READ)
        if not chunk:
            return None
        buffer += chunk
        obj = _unframe(buffer)
        if obj is not None:
            return obj


# -- the worker process ------------------------------------------------------------------------

def _child(sock: int, out: int, parent: int, call: Callable[[TaskSpec], TaskResult]) -> None:
    """Body of a worker process: take tasks from the node, run them, answer; never returns."""
    status = 70
    try:
        gc.freeze()  # what it inherited is never collected: no stale descriptor closed twice
        _isolate(parent, keep={sock, out})
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        sys.stdout = open(1, "w", buffering=1, errors="backslashreplace", closefd=False)
        sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)
        running = task_context.running
        running.node = _Never()
        while True:
            task = _recv(sock)
            if task is None:
                status = 0
                return
            running.task = task
            result = call(task)
            running.task = None
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            try:
                frame = _frame((result.ok, result.value, result.error))
            except Exception as e:  # a value pickle cannot carry (msgpack took it)
                frame = _frame((False, None, {"kind": "bad_result", "type": type(e).__name__,
                                              "message": f"the result cannot be sent: {e}"}))
            view = memoryview(frame)
            while view:
                view = view[os.write(sock, view):]
    except BaseException:
        status = 70
    finally:
        os._exit(status)


def _load_prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()  # resolved once here, not in every forked worker


def _isolate(parent: int, *, keep: set[int]) -> None:
    os.setpgid(0, 0)
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # die with the node
    if os.getppid() != parent:  # the node died before prctl took effect
        os._exit(70)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
