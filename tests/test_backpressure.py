"""Backpressure: a bounded master queue slows submitters or tells them it is full, and the
work it accepted still completes exactly once. The full-size measurement (100,000 tasks,
peak memory of master and broker) is `python scripts/backpressure.py`; here a smaller run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import QueueFull
from support.fabric import REPO, Fabric, child_env
from support.faults import BROKER_KINDS, MOSQUITTO, JournalView


@pytest.mark.parametrize("kind", BROKER_KINDS)
def test_twenty_thousand_tasks_through_a_bound_of_two_thousand(kind: str, tmp_path: Path) -> None:
    if kind == "mosquitto" and not MOSQUITTO.is_file():
        pytest.skip("mosquitto is not installed")
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "backpressure.py"), "--tasks", "20000",
         "--max-queued", "2000", "--broker", kind, "--nodes", "2", "--hold", "1",
         "--ack-timeout", "150", "--timeout", "150", "--workdir", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=240, env=child_env(), cwd=REPO)
    assert run.stdout.strip(), run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    print(json.dumps(report["rss_mib"]), report["refused"], report["drain_seconds"])
    # the bound held the whole time, and was reached: the submitter was refused and resent
    assert report["max_queued_seen"] == 2000, report
    assert report["refused"] > 0
    assert report["submit_errors"] == []
    # and then everything completed, each once, with its own value
    assert (report["completed"], report["lost"], report["wrong"]) == (20000, 0, 0), report
    assert report["conflicts"] == 0
    rows = JournalView(tmp_path / "state").rows()
    assert len(rows) == 20000 and {r.state for r in rows.values()} == {2}
    assert run.returncode == 0, run.stderr[-3000:]


def test_a_full_queue_is_reported_after_the_ack_timeout(fabric: Fabric) -> None:
    fabric.master("--max-queued", "500")
    with fabric.client() as client:
        handles = client.submit_many([("echo", [i], {}, 5) for i in range(1500)], ack_timeout=3)
        refused = [h for h in handles if h.done() and isinstance(h.future.exception(), QueueFull)]
        accepted = [h for h in handles if h not in refused]
        assert len(refused) == 1000 and len(accepted) == 500
        assert client.status()["queued"] == 500
        assert "queue_full" in str(refused[0].future.exception())
        fabric.node("late", "--capacity", "2", "--prefetch", "50")
        values = [h.result(timeout=60) for h in accepted]
    assert values == [handles.index(h) for h in accepted]
    rows = JournalView(fabric.state).rows()
    assert len(rows) == 500 and {r.state for r in rows.values()} == {2}
    assert set(rows) == {h.id for h in accepted}
