"""A shortened fault-injection run on each broker: one node killed, one frozen past its
timeout, one broker restart, one master kill -9, while 300 tasks run. Every task must end
exactly once, as the journal and the client agree. The long run is
`python scripts/fault_run.py --tasks 10000`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support.fabric import REPO, child_env
from support.faults import BROKER_KINDS, MOSQUITTO, JournalView


@pytest.mark.parametrize("kind", BROKER_KINDS)
def test_every_task_ends_once_through_node_broker_and_master_faults(kind: str,
                                                                   tmp_path: Path) -> None:
    if kind == "mosquitto" and not MOSQUITTO.is_file():
        pytest.skip("mosquitto is not installed")
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fault_run.py"), "--tasks", "300",
         "--rounds", "1", "--broker", kind, "--seed", "3", "--nodes", "2",
         "--sleep-share", "0.9", "--sleeps", "0.05,0.1,0.2", "--fail-rate", "0.03",
         "--timeout", "120", "--workdir", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=200, env=child_env(), cwd=REPO)
    assert run.stdout.strip(), run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    context = json.dumps({k: v for k, v in report.items() if k != "fault_log"})
    # every fault happened, each while work was still outstanding
    assert report["faults"] == {"node_kill": 1, "node_freeze": 1, "broker_restart": 1,
                                "master_kill": 1}, context
    assert all(f["outstanding"] > 0 for f in report["fault_log"]), report["fault_log"]
    # nothing lost, nothing told two ways, the journal agrees with the client and the tasks
    assert not report["timed_out"] and report["submit_errors"] == [], context
    assert report["lost"] == 0, context
    assert report["client_conflicts"] == 0 and report["journal_mismatch"] == 0, context
    assert report["completed"] + report["failed"] == 300, context
    # the only failures are the planned ones, each with its reasons
    assert report["unexpected_failures"] == 0, context
    assert report["failed"] == report["failed_expected"] > 0, context
    rows = JournalView(tmp_path / "state").rows()
    assert len(rows) == 300 and {r.state for r in rows.values()} <= {2, 3}
    assert sum(r.state == 3 for r in rows.values()) == report["failed"]
    assert all(r.errors for r in rows.values() if r.state == 3)
    assert run.returncode == 0, run.stderr[-3000:]
