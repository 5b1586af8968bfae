#!/usr/bin/env python3
"""Run a small busy fabric and photograph its dashboard with headless Chromium.

    python scripts/dashboard_screenshot.py --output docs/dashboard.png

Starts `master-node serve` (embedded broker, the example pipelines, the dashboard), three
compute nodes, a stream of tasks at every priority with a few that fail, a pipeline run and
a prime job; kills one node so it shows dead; after `--seconds` takes the screenshot. Every
process it starts is stopped by its own pid; nothing outside a temporary directory is
written but the picture.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from master.client import FabricClient  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


class Fleet:
    """The processes this script starts, each stopped by its own pid."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{name}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=log,
                                stderr=subprocess.STDOUT, cwd=self.work, env=self.env)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.work / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _feed(client: FabricClient, stop: threading.Event) -> None:
    """Tasks at every priority, more than the nodes keep up with, and now and then a failure."""
    rng = random.Random(7)
    reasons = ["disk full on /data", "input file is not a PNG", "upstream timed out"]
    while not stop.is_set():
        calls = [("sleep", [rng.choice([0.01, 0.02, 0.05])], {}, rng.randint(1, 10))
                 for _ in range(100)]
        client.submit_many(calls)
        if rng.random() < 0.3:
            client.submit("fail", [rng.choice(reasons)], priority=rng.randint(1, 10))
        stop.wait(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "dashboard.png")
    parser.add_argument("--seconds", type=float, default=45.0,
                        help="how long the fabric runs before the picture")
    parser.add_argument("--window", default="1280,900", help="browser window WIDTH,HEIGHT")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is not installed (apt-get install chromium)")
    work = Path(tempfile.mkdtemp(prefix="dashboard-shot-"))
    fleet = Fleet(work)
    stop = threading.Event()
    try:
        port, web = _free_port(), _free_port()
        fleet.start("master", ["master.cli", "serve", "--port", str(port), "--state", "state",
                               "--pipelines", str(REPO / "examples" / "pipelines.toml"),
                               "--snapshot-interval", "0", "--dashboard", f"127.0.0.1:{web}"])
        _wait(lambda: "dashboard on" in fleet.log("master"), 30, "the master and its dashboard")
        broker = f"mqtt://127.0.0.1:{port}"
        for index, capacity in ((1, 2), (2, 2), (3, 1)):
            fleet.start(f"worker-{index}", ["node.cli", "--broker", broker, "--id",
                                            f"worker-{index}", "--capacity", str(capacity)])
        url = f"http://127.0.0.1:{web}/"

        def state() -> dict[str, Any]:
            with urllib.request.urlopen(url + "api/state", timeout=5) as response:
                return json.load(response)

        _wait(lambda: sum(n["status"] in ("ready", "busy") for n in state()["nodes"]) == 3, 30,
              "three nodes")
        started = time.monotonic()
        with FabricClient(broker_url=broker) as client:
            feeder = threading.Thread(target=_feed, args=(client, stop), daemon=True)
            feeder.start()
            client.query("pipelines", {"op": "run", "name": "nightly"})
            numbers = work / "numbers.txt"
            rng = random.Random(3)
            numbers.write_text("\n".join(str(rng.getrandbits(62)) for _ in range(400_000)))
            time.sleep(max(0.0, args.seconds * 0.5 - (time.monotonic() - started)))
            fleet.procs["worker-3"].kill()  # dies without a word: its heartbeats stop
            fleet.start("job", ["master.cli", "primes", str(numbers), "--output", "primes.txt",
                                "--job-id", "primes-400k", "--priority", "3", "--no-progress",
                                "--broker", broker])
            time.sleep(max(0.0, args.seconds - (time.monotonic() - started)))
            args.output.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([chromium, *FLAGS, f"--user-data-dir={work / 'profile'}",
                            f"--window-size={args.window}", "--virtual-time-budget=2500",
                            f"--screenshot={args.output.resolve()}", url],
                           check=True, capture_output=True, timeout=120)
            stop.set()
            feeder.join(10)
        print(f"wrote {args.output}")
        return 0
    finally:
        stop.set()
        fleet.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
