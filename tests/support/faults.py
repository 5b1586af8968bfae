"""Fault injection and measurement helpers for the reliability scripts and tests.

A broker that can be killed and started again on the same port (so every client reconnects
to the same URL), memory readings of other processes (current and peak RSS), a client that
records every outcome it is told about (to count repeats), and read-only views of the
master's journal. Used by scripts/fault_run.py, scripts/backpressure.py and their tests.
"""

from __future__ import annotations

import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

REPO = Path(__file__).resolve().parents[2]
for _path in (REPO, REPO / "tests"):  # scripts import this module from a checkout
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from core.protocol import MasterStatus, TaskOutcome  # noqa: E402
from master.client import FabricClient  # noqa: E402

__all__ = ["REPO", "MOSQUITTO", "BROKER_KINDS", "free_port", "rss_bytes", "peak_rss_bytes",
           "RestartableBroker", "RecordingClient", "JournalView", "JournalRow", "mib", "log",
           "stop_all", "wait_for", "oversized_value"]

MOSQUITTO = Path("/usr/sbin/mosquitto")
BROKER_KINDS = ("embedded", "mosquitto")
_LISTENER = re.compile(r"^listener +\d+.*$", re.MULTILINE)


def log(message: str, *, start: float | None = None) -> None:
    """Progress for long runs goes to stderr, stamped with seconds since `start`."""
    stamp = f"[{time.monotonic() - start:7.1f}s] " if start is not None else ""
    print(f"{stamp}{message}", file=sys.stderr, flush=True)


def mib(count: int) -> float:
    return round(count / 2**20, 1)


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _proc_status_kib(pid: int, field: str) -> int:
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM); 0 if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field}:\s+(\d+) kB$", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def rss_bytes(pid: int) -> int:
    """Resident memory of a process now."""
    return _proc_status_kib(pid, "VmRSS") * 1024


def peak_rss_bytes(pid: int) -> int:
    """The most resident memory the process has had since it started (the kernel's VmHWM)."""
    return _proc_status_kib(pid, "VmHWM") * 1024


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


class RestartableBroker:
    """The embedded broker or mosquitto, run from the project's broker.conf on a fixed
    loopback port, so it can be killed and started again where every client expects it."""

    def __init__(self, kind: str, workdir: Path, *, port: int | None = None,
                 config: Path = REPO / "broker.conf") -> None:
        if kind not in BROKER_KINDS:
            raise ValueError(f"broker kind must be one of {BROKER_KINDS}, got {kind!r}")
        if kind == "mosquitto" and not MOSQUITTO.is_file():
            raise FileNotFoundError(f"{MOSQUITTO} is not installed")
        self.kind = kind
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.config = config
        self.starts = 0
        self._popen: subprocess.Popen[bytes] | None = None
        self._process: Any = None  # broker.BrokerProcess for the embedded broker
        self._log = open(self.workdir / f"broker-{kind}.log", "ab")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self._process is not None:
            return self._process.pid
        assert self._popen is not None, "broker not started"
        return self._popen.pid

    def running(self) -> bool:
        popen = self._process.popen if self._process is not None else self._popen
        return popen is not None and popen.poll() is None

    def start(self, timeout: float = 15.0) -> None:
        """Start on our port; retries (bounded) while the old socket is still being released."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._start_once(max(1.0, deadline - time.monotonic()))
                self.starts += 1
                return
            except Exception:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)

    def _start_once(self, timeout: float) -> None:
        if self.kind == "embedded":
            from broker import start_broker_process
            self._process = start_broker_process(self.config, port=self.port, stderr=self._log,
                                                 cwd=self.workdir, timeout=timeout)
            return
        text = _LISTENER.sub(f"listener {self.port} 127.0.0.1", self.config.read_text(), count=1)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(text)
        self._popen = subprocess.Popen([str(MOSQUITTO), "-c", str(conf)], cwd=self.workdir,
                                       stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not _listening(self.port):
            if self._popen.poll() is not None:
                raise RuntimeError(f"mosquitto exited at start ({self._popen.returncode})")
            if time.monotonic() > deadline:
                self._popen.kill()
                self._popen.wait(10)
                raise RuntimeError(f"mosquitto did not listen on {self.port} in {timeout:g}s")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: the broker vanishes with whatever it held in memory."""
        if self._process is not None:
            self._process.kill()
            self._process = None
        elif self._popen is not None:
            if self._popen.poll() is None:
                self._popen.kill()
            self._popen.wait(10)
            self._popen = None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers (both bounded)."""
        if self._process is not None:
            self._process.stop(timeout=10.0)
            self._process = None
        elif self._popen is not None:
            if self._popen.poll() is None:
                self._popen.terminate()
                try:
                    self._popen.wait(10)
                except subprocess.TimeoutExpired:
                    self._popen.kill()
                    self._popen.wait(10)
            self._popen = None

    def restart(self, *, hard: bool = True, down_for: float = 0.0) -> None:
        """Kill (or stop) and start again on the same port after `down_for` seconds."""
        if hard:
            self.kill()
        else:
            self.stop()
        if down_for > 0:
            time.sleep(down_for)  # an outage of a chosen length, not a synchronisation
        self.start()

    def close(self) -> None:
        self.stop()
        self._log.close()


class RecordingClient(FabricClient):
    """A FabricClient that records every final outcome it receives, repeats included, the
    refusals it was sent, and the master's retained status as it changes. It listens in on
    FabricClient's own hooks (`_resolve`, `_submit_once`, `_on_master_status`), so what it
    counts is exactly what the client acted on."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.outcomes: dict[str, list[TaskOutcome]] = {}
        self.refused = 0          # tasks the master refused (queue full), resends included
        self.master_states: list[MasterStatus] = []
        self._record_lock = threading.Lock()

    def _resolve(self, outcomes: Iterable[TaskOutcome]) -> None:
        outcomes = list(outcomes)
        with self._record_lock:
            for outcome in outcomes:
                if outcome.state in ("completed", "failed"):
                    self.outcomes.setdefault(outcome.id, []).append(outcome)
        super()._resolve(outcomes)

    def _submit_once(self, specs: list, deadline: float) -> Any:
        reply = super()._submit_once(specs, deadline)
        with self._record_lock:
            self.refused += len(reply.rejected)
        return reply

    def _on_master_status(self, topic: str, payload: bytes) -> None:
        try:
            status = MasterStatus.decode(payload) if payload else None
        except Exception:
            status = None
        if status is not None:
            with self._record_lock:
                self.master_states.append(status)
                del self.master_states[:-10_000]  # bounded: enough to sum incarnations
        super()._on_master_status(topic, payload)

    def note_status(self, status: dict) -> None:
        """Add a status read by a query (the last word of the master still running)."""
        with self._record_lock:
            self.master_states.append(MasterStatus.from_dict(status))

    def resolved_count(self) -> int:
        with self._record_lock:
            return len(self.outcomes)

    def master_duplicates(self) -> int:
        """Duplicates the master dropped, summed over its incarnations (each restart starts
        its counters at zero; an incarnation ends with a `dead` or `offline` status)."""
        total = current = 0
        with self._record_lock:
            states = list(self.master_states)
        for status in states:
            if status.status == "running":
                if status.duplicates < current:  # counters restarted without a will seen
                    total += current
                current = status.duplicates
            else:
                total += current
                current = 0
        return total + current


@dataclass(frozen=True)
class JournalRow:
    id: str
    state: int
    node: str
    attempts: int
    errors: list


class JournalView:
    """Read-only looks into `<state>/master.sqlite3`, safe while the master writes it."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "master.sqlite3"

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5.0)
        return db

    def queued(self) -> int:
        """Tasks journalled as queued (state 0) right now."""
        if not self.path.exists():
            return 0
        db = self._connect()
        try:
            return db.execute("SELECT COUNT(*) FROM tasks WHERE state = 0").fetchone()[0]
        except sqlite3.OperationalError:  # the master has not created the table yet
            return 0
        finally:
            db.close()

    def rows(self) -> dict[str, JournalRow]:
        import json
        db = self._connect()
        try:
            return {i: JournalRow(i, s, n, a, json.loads(e)) for i, s, n, a, e in db.execute(
                "SELECT id, state, node, attempts, errors FROM tasks")}
        finally:
            db.close()

    def outcomes(self, ids: Iterable[str]) -> dict[str, TaskOutcome]:
        """Final outcomes as the master reads them back (its own decoding of stored values);
        only once the master has stopped."""
        from master.journal import Journal
        journal = Journal(self.path)
        try:
            return journal.outcomes(ids)
        finally:
            journal.close()


def stop_all(procs: Iterable[Any], *, timeout: float = 30.0) -> None:
    """SIGCONT then SIGTERM each process handle; SIGKILL one that outlives `timeout`."""
    for proc in procs:
        if proc.popen.poll() is None:
            proc.signal(signal.SIGCONT)
            proc.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_for(predicate: Callable[[], Any], timeout: float, *, interval: float = 0.05) -> Any:
    """Poll until `predicate()` is truthy or `timeout` passes; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)



def oversized_value(size: int) -> str:
    """A task for nodes (`--task support.faults:oversized_value`): a result of `size` bytes."""
    return "x" * int(size)
