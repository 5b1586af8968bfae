"""The live dashboard: its bookkeeping, and the page a person sees in a real browser (headless
Chromium) while a real master and nodes run tasks and a prime job."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from core.errors import ConfigError
from core.protocol import make_task
from master.dashboard import FabricView, parse_listen, queue_summary
from master.scheduler import QUEUED, RUNNING
from support.brokers import free_port
from support.fabric import Fabric, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


# -- pure bookkeeping -----------------------------------------------------------------------------

class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_view_merges_node_statuses_with_the_masters_view_and_flags_silence() -> None:
    clock = _Clock()
    view = FabricView(root="fabric", broker="mqtt://x", clock=clock)
    view.node_status("a", {"node_id": "a", "status": "ready", "capacity": 2, "heartbeat": 1.0})
    view.node_status("b", {"node_id": "b", "status": "dead", "heartbeat": 1.0})
    view.master_nodes([{"node_id": "a", "in_flight": 3}, {"node_id": "c", "status": "ready"},
                       "not a node"])
    nodes = {n["node_id"]: n for n in view.snapshot()["nodes"]}
    assert set(nodes) == {"a", "b", "c"}
    assert nodes["a"]["in_flight"] == 3 and not nodes["a"]["dead"]
    assert nodes["b"]["dead"]
    clock.now += 10  # a's heartbeats stopped: it shows dead although its retained status is not
    nodes = {n["node_id"]: n for n in view.snapshot()["nodes"]}
    assert nodes["a"]["silent"] and nodes["a"]["dead"] and nodes["a"]["age"] == 10.0
    view.node_status("a", None)  # cleared from the broker
    assert "a" not in {n["node_id"] for n in view.snapshot()["nodes"] if n.get("status") != "unknown"}


def test_view_turns_counters_into_throughput_and_keeps_failures_bounded() -> None:
    clock = _Clock()
    view = FabricView(root="r", broker="b", clock=clock)
    for completed in (0, 100, 300):
        view.master_status({"completed": completed, "failed": 1, "queued": 5})
        clock.now += 2
    points = view.snapshot()["throughput"]
    assert [p["completed"] for p in points] == [50.0, 100.0]
    assert all(p["failed"] == 0.0 for p in points)
    for i in range(100):
        view.failed_result("n1", f"t{i}", {"kind": "exception", "message": "boom"}, 1.0)
    failures = view.snapshot()["failures"]
    assert len(failures) == 25 and failures[0]["task_id"] == "t99"
    assert failures[0]["kind"] == "exception" and failures[0]["message"] == "boom"
    json.dumps(view.snapshot(), allow_nan=False)  # what the page receives is plain JSON


def test_view_job_rate_comes_from_successive_progress() -> None:
    clock = _Clock()
    view = FabricView(root="r", broker="b", clock=clock)
    view.job_progress("j", {"state": "running", "numbers_tested": 0, "percent": 0.0})
    clock.now += 2
    view.job_progress("j", {"state": "running", "numbers_tested": 5000, "percent": 150})
    (job,) = view.snapshot()["jobs"]
    assert job["live_rate"] == 2500.0 and job["percent"] == 100.0


@dataclass
class _Record:  # the two fields of a scheduler record the summary reads
    spec: Any
    state: int


def test_queue_summary_counts_by_priority_most_urgent_first() -> None:
    records = [_Record(make_task("a", [], {}, priority=p), QUEUED) for p in (1, 9, 9, 5)]
    records.append(_Record(make_task("b", [], {}, priority=9), RUNNING))
    summary = queue_summary(records)
    assert summary["queued"] == 4 and summary["running"] == 1
    assert summary["by_priority"] == [{"priority": 9, "queued": 2, "running": 1},
                                      {"priority": 5, "queued": 1, "running": 0},
                                      {"priority": 1, "queued": 1, "running": 0}]
    assert summary["by_name"] == [{"name": "a", "queued": 4}]


def test_parse_listen() -> None:
    assert parse_listen("0.0.0.0:9000") == ("0.0.0.0", 9000)
    assert parse_listen(":9000") == ("127.0.0.1", 9000)
    assert parse_listen("localhost") == ("localhost", 8080)
    assert parse_listen("[::1]:81") == ("::1", 81)
    for bad in ("host:port", "h:70000"):
        with pytest.raises(ConfigError):
            parse_listen(bad)


# -- the page in a browser -----------------------------------------------------------------------

def _chromium() -> str:
    if CHROMIUM is None:
        raise RuntimeError("chromium is not installed: scripts/install_test_deps.sh installs it "
                           "(apt-get install chromium)")
    return CHROMIUM


def _dump_dom(url: str, profile: Path) -> str:
    """The page as the browser built it, after its script ran for a few (virtual) seconds."""
    result = subprocess.run(
        [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom",
         "--virtual-time-budget=2500", url],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _state(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "api/state", timeout=10) as response:
        return json.load(response)


def _text(dom: str, element_id: str) -> str:
    found = re.search(rf'id="{element_id}"[^>]*>(.*?)</div>', dom, re.S)
    assert found, f"#{element_id} not on the page"
    return html.unescape(re.sub(r"<[^>]+>", "", found.group(1))).strip()


def _row(dom: str, attribute: str, value: str) -> str:
    found = re.search(rf'<tr[^>]*{attribute}="{re.escape(value)}"[^>]*>.*?</tr>', dom, re.S)
    assert found, f"no row with {attribute}={value!r} on the page"
    return found.group(0)


def test_the_page_shows_nodes_counts_failures_and_a_jobs_progress(fabric: Fabric,
                                                                   tmp_path: Path) -> None:
    fabric.master()
    nodes = {name: fabric.node(name, "--capacity", "2") for name in ("w1", "w2", "w3")}
    port = free_port()
    dashboard = fabric._start([sys.executable, "-m", "master.cli", "dashboard", "--listen",
                               f"127.0.0.1:{port}", "--broker", fabric.broker_url, "--root",
                               fabric.root], "dashboard")
    dashboard.wait_for_output("dashboard on http://127.0.0.1:")
    url = f"http://127.0.0.1:{port}/"
    wait_until(lambda: len([n for n in _state(url)["nodes"] if n["status"] == "ready"]) == 3,
               30, message="three ready nodes on the dashboard")

    numbers = tmp_path / "numbers.txt"
    numbers.write_text("\n".join(str(n) for n in range(10_000, 12_000)) + "\n")
    with fabric.client() as client:
        handles = client.submit_many([("sleep", [0.01], {}, 1 + i % 10) for i in range(150)])
        client.submit("fail", ["disk full"], priority=10)
        # the page while tasks run: every node by id, the queue, the master
        running = _dump_dom(url, tmp_path / "profile-1")
        for name in nodes:
            assert "ready" in _row(running, "data-node", name) or \
                "busy" in _row(running, "data-node", name)
        assert "master " in _text(running, "masterline")
        for handle in handles:
            handle.result(timeout=60)
    job = subprocess.run([sys.executable, "-m", "master.cli", "primes", str(numbers), "--output",
                          str(tmp_path / "primes.txt"), "--job-id", "prime-demo", "--no-progress",
                          "--broker", fabric.broker_url, "--root", fabric.root],
                         capture_output=True, text=True, timeout=120)
    assert job.returncode == 0, job.stderr
    nodes["w3"].kill()  # silent from now on: the page must show it dead

    def settled() -> dict[str, Any] | None:
        state = _state(url)
        by_id = {n["node_id"]: n for n in state["nodes"]}
        done = state["master"].get("completed", 0) >= 151 and state["master"].get("failed") == 1
        charted = len(state["throughput"]) > 1  # the chart draws a line from two rates on
        return state if done and charted and by_id["w3"]["dead"] and state["jobs"] and \
            state["failures"] else None

    state = wait_until(settled, 60, interval=0.2, message="the dashboard's state to settle")
    dom = _dump_dom(url, tmp_path / "profile-2")
    completed = state["master"]["completed"]
    assert _text(dom, "count-completed") == f"{completed:,}"
    assert _text(dom, "count-failed") == "1"
    assert _text(dom, "count-nodes") == "2 / 3"
    assert 'class="dead"' in _row(dom, "data-node", "w3")
    for name in ("w1", "w2"):
        assert 'class="dead"' not in _row(dom, "data-node", name)
    job_row = _row(dom, "data-job", "prime-demo")
    assert 'aria-valuenow="100"' in job_row and "100%" in job_row
    failure = re.search(r'<div id="failures">.*?</table>', dom, re.S)
    assert failure and "disk full" in failure.group(0)
    assert "<svg" in dom and 'class="done"' in dom  # the throughput chart, drawn inline
    assert "no pipeline" in dom  # this master runs none
