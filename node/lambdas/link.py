"""The node's side of one zygote process: spawn it, send calls, match replies to callers.

Callbacks become futures keyed by call id; one reader thread owns the socket's receiving side,
senders share a lock. Every wait is bounded. When the zygote dies, calls that had not started
fail with `LinkDown(started=False)`, so the runner may safely send them to a new zygote; calls
that had started end as "crashed" (their process died with the zygote).
"""

from __future__ import annotations

import itertools
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from node.lambdas import framing
from node.lambdas.environment import BASE_ENV
from node.lambdas.errors import LambdaError, LinkDown, LinkHung
from node.lambdas.outcome import CRASHED, LambdaOutcome

__all__ = ["ZygoteLink", "LinkDown", "LinkHung"]

_ROOT = str(Path(__file__).resolve().parents[2])
_BOOTSTRAP = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from node.lambdas.zygote import main; main(int(sys.argv[2]))"
)
_POLL_S = 0.5
_EXIT_WAIT_S = 5.0
_READ_CHUNK = 1 << 16


class _Pending:
    __slots__ = ("future", "started", "pid")

    def __init__(self) -> None:
        self.future: Future[LambdaOutcome] = Future()
        self.started = False
        self.pid: int | None = None


def _reap(process: subprocess.Popen[bytes], *, timeout_s: float = _EXIT_WAIT_S) -> None:
    """Wait for the zygote to exit, bounded; kill it if it does not."""
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout_s)


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "stopped answering"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class ZygoteLink:
    """A running zygote; build one with `ZygoteLink.spawn`."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        sock: socket.socket,
        inbox: framing.FrameBuffer,
        *,
        names: frozenset[str],
    ) -> None:
        self._process = process
        self._sock = sock
        self._inbox = inbox
        self.names = names
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # guards _pending and _alive
        self._send_lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._alive = True
        self._closing = False
        self._reader = threading.Thread(target=self._read_loop, name=f"lambda-zygote-{process.pid}", daemon=True)
        self._reader.start()

    @classmethod
    def spawn(cls, hello: dict[str, Any], *, start_timeout_s: float) -> ZygoteLink:
        """Start a zygote, have it import the lambdas in `hello`, and wait until it is ready."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, _ROOT, str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env=dict(BASE_ENV),  # the node's own variables stay in the node
                start_new_session=True,  # terminal signals go to the node, which stops calls itself
            )
        except OSError as e:
            ours.close()
            raise LambdaError(f"could not start the lambda worker process: {e}") from e
        finally:
            theirs.close()
        inbox = framing.FrameBuffer()
        try:
            ours.sendall(framing.frame(framing.pack(hello)))
            reply = cls._await_reply(ours, inbox, process, start_timeout_s)
            if reply.get("op") != "ready":
                raise LambdaError(str(reply.get("message", "the lambda worker process failed to start")))
        except BaseException as e:
            ours.close()
            process.kill()  # it has no calls yet: nothing to lose
            _reap(process)
            if isinstance(e, OSError):
                raise LambdaError(f"the lambda worker process could not be reached: {e}") from e
            raise
        return cls(process, ours, inbox, names=frozenset(reply.get("names", ())))

    @staticmethod
    def _await_reply(
        sock: socket.socket, inbox: framing.FrameBuffer, process: subprocess.Popen[bytes], timeout_s: float
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([sock], [], [], remaining)
            if not readable:
                continue
            data = sock.recv(_READ_CHUNK)
            if not data:
                _reap(process)
                raise LambdaError(
                    f"the lambda worker process {_describe_exit(process.returncode)} while loading lambdas"
                )
            payloads = inbox.feed(data)
            if payloads:
                return framing.unpack(payloads[0])
        raise LambdaError(f"the lambda worker process was not ready within {timeout_s:g} s")

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def alive(self) -> bool:
        return self._alive

    # -- calls -------------------------------------------------------------------------------
    def call(self, fields: dict[str, Any], *, wait_s: float) -> LambdaOutcome:
        """Run one call and wait for its outcome, at most `wait_s` seconds.

        Raises FrameError (the event cannot be sent), LinkDown or LinkHung.
        """
        with self._lock:
            if not self._alive:
                raise LinkDown("the lambda worker process is not running", started=False)
            call_id = next(self._ids)
            pending = _Pending()
            self._pending[call_id] = pending
        try:
            data = framing.frame(framing.pack({"op": "call", "id": call_id, **fields}))
            with self._send_lock:
                self._sock.sendall(data)
        except framing.FrameError:
            self._forget(call_id)
            raise
        except OSError as e:
            with self._lock:
                self._pending.pop(call_id, None)
                self._alive = False  # the reader will see EOF too; callers must not wait for it
            raise LinkDown(f"could not reach the lambda worker process: {e}", started=False) from e
        try:
            return pending.future.result(timeout=wait_s)
        except FutureTimeout:
            self._forget(call_id)
            raise LinkHung(f"the lambda worker process did not answer within {wait_s:g} s") from None

    def _forget(self, call_id: int) -> None:
        with self._lock:
            self._pending.pop(call_id, None)

    # -- replies -----------------------------------------------------------------------------
    def _read_loop(self) -> None:
        try:
            while True:
                readable, _, _ = select.select([self._sock], [], [], _POLL_S)
                if not readable:
                    continue
                data = self._sock.recv(_READ_CHUNK)
                if not data:
                    return
                for payload in self._inbox.feed(data):
                    self._handle(framing.unpack(payload))
        except (OSError, ValueError, framing.FrameError):
            return  # socket closed under us or garbage from the zygote: treat as its death
        finally:
            self._down()

    def _handle(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        with self._lock:
            if op == "started":
                pending = self._pending.get(msg.get("id"))
                if pending is not None:
                    pending.started = True
                    pending.pid = msg.get("pid")
                return
            if op != "done":
                return
            pending = self._pending.pop(msg.get("id"), None)
        if pending is not None:
            try:
                outcome = LambdaOutcome.from_dict(framing.unpack(msg["result"]))
            except (KeyError, TypeError, framing.FrameError) as e:
                outcome = LambdaOutcome.failure(
                    CRASHED, f"malformed result from the worker: {e}", type="ProtocolError"
                )
            pending.future.set_result(outcome)

    def _down(self) -> None:
        """The zygote is gone (or going): reap it, then settle every call still waiting."""
        with self._lock:
            self._alive = False
        _reap(self._process)
        how = "closed" if self._closing else _describe_exit(self._process.returncode)
        with self._lock:
            orphans, self._pending = self._pending, {}
        for pending in orphans.values():
            if pending.started:
                pending.future.set_result(
                    LambdaOutcome.failure(
                        CRASHED,
                        f"the lambda worker process {how} while the call was running",
                        type="WorkerLost",
                    )
                )
            else:
                pending.future.set_exception(
                    LinkDown(f"the lambda worker process {how} before the call started", started=False)
                )

    def close(self, *, timeout_s: float = _EXIT_WAIT_S) -> None:
        """Stop the zygote (it kills any call still running) and wait for it, bounded."""
        self._closing = True
        try:
            self._sock.shutdown(socket.SHUT_WR)  # EOF tells the zygote to stop
        except OSError:
            pass
        _reap(self._process, timeout_s=timeout_s)
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=timeout_s + _EXIT_WAIT_S)
        self._sock.close()

    def kill(self) -> None:
        """Kill the zygote at once (it is hung); its children die with it (parent-death signal)."""
        self._process.kill()  # Popen skips the signal if it has already reaped the process
        self.close()

