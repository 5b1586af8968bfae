"""Watching replicated masters from outside: a plain MQTT client on the lease, the masters'
presence, the nodes' task topics and statuses, and job progress, with arrival times."""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from core.protocol import TaskBatch, decode_message
from core.url import parse_broker_url
from support.fabric import Fabric, Proc, wait_until


@dataclass(frozen=True)
class SeenBatch:
    at: float          # time.monotonic() on arrival
    node: str
    master: str
    epoch: int
    task_ids: tuple[str, ...]


class ReplicaWatch:
    """What MQTT Explorer would show of the masters and the nodes' task topics."""

    def __init__(self, broker_url: str, root: str) -> None:
        url = parse_broker_url(broker_url)
        self.root = root
        self._lock = threading.Lock()
        self.leases: list[tuple[float, dict]] = []
        self.presence: dict[str, dict] = {}
        self.node_status: dict[str, dict] = {}
        self.progress: dict[str, dict] = {}
        self.batches: list[SeenBatch] = []
        self._client = paho.Client(CallbackAPIVersion.VERSION2,
                                   client_id=f"watch-{uuid.uuid4().hex[:8]}")
        self._client.on_message = self._on_message
        connected = threading.Event()
        topics = [(f"{root}/master/lease", 1), (f"{root}/masters/+", 1),
                  (f"{root}/nodes/+/tasks", 1), (f"{root}/nodes/+/status", 1),
                  (f"{root}/jobs/+/progress", 1)]
        self._client.on_connect = lambda c, *_: (c.subscribe(topics), connected.set())
        self._client.connect(url.host, url.port)
        self._client.loop_start()
        if not connected.wait(10):
            raise AssertionError("watcher could not connect")

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        now = time.monotonic()
        parts = msg.topic.split("/")
        with self._lock:
            if msg.topic.endswith("/master/lease"):
                if msg.payload:
                    self.leases.append((now, json.loads(msg.payload)))
            elif parts[1] == "masters" and len(parts) == 3:
                if msg.payload:
                    self.presence[parts[2]] = json.loads(msg.payload)
            elif parts[1] == "nodes" and parts[3] == "tasks":
                message = decode_message(msg.payload)
                if isinstance(message, TaskBatch):
                    self.batches.append(SeenBatch(now, parts[2], message.master, message.epoch,
                                                  tuple(t.id for t in message.tasks)))
            elif parts[1] == "nodes" and parts[3] == "status":
                if msg.payload:
                    self.node_status[parts[2]] = json.loads(msg.payload)
            elif parts[1] == "jobs":
                self.progress[parts[2]] = json.loads(msg.payload)

    # -- views ---------------------------------------------------------------------------------

    def holder(self) -> tuple[str, int] | None:
        """The best lease seen held (epoch, then holder), as the nodes rank them."""
        with self._lock:
            held = [(d["epoch"], d["holder"]) for _t, d in self.leases if d["state"] == "held"]
        if not held:
            return None
        epoch, holder = max(held)
        return holder, epoch

    def roles(self) -> dict[str, str]:
        with self._lock:
            return {name: p["role"] for name, p in self.presence.items()}

    def dispatched(self, master: str, epoch: int) -> list[SeenBatch]:
        with self._lock:
            return [b for b in self.batches if b.master == master and b.epoch == epoch]

    def dispatchers(self) -> list[tuple[int, str]]:
        """(epoch, master) of every master seen dispatching, in order of their first batch."""
        seen: list[tuple[int, str]] = []
        with self._lock:
            for b in self.batches:
                if (b.epoch, b.master) not in seen:
                    seen.append((b.epoch, b.master))
        return seen

    def rejected(self) -> int:
        with self._lock:
            return sum(s.get("rejected", 0) for s in self.node_status.values())

    # -- waits ---------------------------------------------------------------------------------

    def wait_active(self, timeout: float, *, after_epoch: int = 0) -> tuple[str, int]:
        """The lease holder, once one holds a lease newer than `after_epoch`."""
        def found() -> tuple[str, int] | None:
            current = self.holder()
            return current if current and current[1] > after_epoch else None
        return wait_until(found, timeout, message=f"a master to hold a lease after epoch {after_epoch}")

    def wait_dispatch(self, master: str, epoch: int, tasks: int, timeout: float) -> SeenBatch:
        """The first batch of `master` at `epoch`, once it has dispatched `tasks` tasks."""
        def enough() -> SeenBatch | None:
            batches = self.dispatched(master, epoch)
            return batches[0] if sum(len(b.task_ids) for b in batches) >= tasks else None
        return wait_until(enough, timeout, message=f"{master} (epoch {epoch}) to dispatch {tasks} tasks")

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def start_masters(fabric: Fabric, count: int = 3, *extra: str) -> dict[str, Proc]:
    """`count` replicated masters m1..mN, each with its own state directory; returns once
    each says it is ready (active or standing by)."""
    masters = {}
    for i in range(1, count + 1):
        name = f"m{i}"
        masters[name] = fabric.master("--replica", "--id", name, "--state",
                                      str(fabric.tmp / name / "state"), "--snapshot-interval",
                                      "0", *extra, wait=False)
    for proc in masters.values():
        proc.wait_for_output("ready on", timeout=30)
    return masters


def primes_command(fabric: Fabric, files: list[Path], output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "master.cli", "primes", *map(str, files), "--broker",
            fabric.broker_url, "--root", fabric.root, "--output", str(output), "--no-progress",
            "--timeout", "30", *extra]
