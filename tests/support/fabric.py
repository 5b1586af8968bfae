"""Test harness: real master-node and compute-node processes, and a plain MQTT observer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[2]


def wait_until(predicate: Callable[[], Any], timeout: float, *, interval: float = 0.02,
               message: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {message}")
        time.sleep(interval)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(REPO / "tests"),
                                                env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def master_cli(fabric: "Fabric", *args: str) -> subprocess.CompletedProcess[str]:
    """`master-node ARGS` run as a user runs it, against the test's broker and root."""
    return subprocess.run([sys.executable, "-m", "master.cli", *args, "--broker", fabric.broker_url,
                           "--root", fabric.root], capture_output=True, text=True,
                          env=child_env(), cwd=REPO, timeout=60)


def wait_ready(client: Any, *node_ids: str, timeout: float = 30.0) -> None:
    """Until the master counts every one of `node_ids` as ready or busy (bounded)."""
    wait_until(lambda: set(node_ids) <= {n["node_id"] for n in client.nodes()
                                         if n["status"] in ("ready", "busy")}, timeout,
               message=f"nodes {node_ids} ready")


class Proc:
    """A child process with its output in a log file; stopped by its own handle."""

    def __init__(self, args: list[str], log_path: Path, *, cwd: Path | None = None) -> None:
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                      cwd=str(cwd or REPO), env=child_env(),
                                      start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout: float = 20.0) -> None:
        def seen() -> bool:
            if self.popen.poll() is not None and text not in self.output():
                raise AssertionError(f"{self.args[:3]} exited ({self.popen.returncode}) before "
                                     f"printing {text!r}:\n{self.output()[-3000:]}")
            return text in self.output()
        wait_until(seen, timeout, message=f"{text!r} in {self.log_path.name}")

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def cleanup(self) -> None:
        if self.popen.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGKILL)
            self.popen.wait(10)
        self._log.close()


class Fabric:
    """Starts masters and nodes against one broker under a topic root unique to the test."""

    def __init__(self, broker_url: str, tmp: Path) -> None:
        self.broker_url = broker_url
        self.tmp = tmp
        self.root = f"t{uuid.uuid4().hex[:8]}"
        self.state = tmp / "state"
        self.procs: list[Proc] = []

    def _start(self, args: list[str], name: str) -> Proc:
        proc = Proc(args, self.tmp / f"{name}-{len(self.procs)}.log")
        self.procs.append(proc)
        return proc

    def master(self, *extra: str, wait: bool = True) -> Proc:
        proc = self._start([sys.executable, "-m", "master.cli", "serve", "--broker", self.broker_url,
                            "--root", self.root, "--state", str(self.state), *extra], "master")
        if wait:
            proc.wait_for_output("master ready")
        return proc

    def node(self, node_id: str, *extra: str) -> Proc:
        return self._start([sys.executable, "-m", "node.cli", "--broker", self.broker_url,
                            "--root", self.root, "--id", node_id, "--heartbeat", "0.5", *extra],
                           f"node-{node_id}")

    def client(self) -> Any:
        from master.client import FabricClient
        return FabricClient(broker_url=self.broker_url, root=self.root).start()

    def cleanup(self) -> None:
        for proc in self.procs:
            proc.cleanup()


class Observer:
    """A plain MQTT client on `<root>/#`: what a person sees in MQTT Explorer."""

    def __init__(self, broker_url: str, root: str) -> None:
        from core.url import parse_broker_url
        url = parse_broker_url(broker_url)
        self.root = root
        self.messages: list[tuple[str, bytes, bool]] = []
        self.retained: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"obs-{uuid.uuid4().hex[:8]}")
        self._client.on_message = self._on_message
        connected = threading.Event()
        self._client.on_connect = lambda c, *_: (c.subscribe(f"{root}/#", 1), connected.set())
        self._client.connect(url.host, url.port)
        self._client.loop_start()
        if not connected.wait(10):
            raise AssertionError("observer could not connect")

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload, msg.retain))
            self.retained[msg.topic] = msg.payload

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self._client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def node_status(self, node_id: str) -> dict | None:
        with self._lock:
            payload = self.retained.get(f"{self.root}/nodes/{node_id}/status")
        return json.loads(payload) if payload else None

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()
