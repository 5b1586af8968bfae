"""Retries with backoff, delayed starts and rate limits, with a real broker, master and nodes:
what a submitter relies on is when its task really started on a node (each task here notes
its start time), before and after a master restart."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from support.fabric import Fabric, master_cli, wait_ready, wait_until
from support.retry_tasks import starts

TASKS = ("--task", "support.retry_tasks:stamp", "--task", "support.retry_tasks:flaky_stamp",
         "--task", "support.retry_tasks:registered_flaky")


def test_a_transient_failure_is_retried_after_backoffs_that_grow(fabric: Fabric,
                                                                tmp_path: Path) -> None:
    fabric.master()
    fabric.node("n1", *TASKS)
    with fabric.client() as client:
        wait_ready(client, "n1")
    path = str(tmp_path / "runs")
    done = master_cli(fabric, "submit", "flaky_stamp", path, "3", "--retries", "3", "--backoff", "0.3",
               "--wait", "30")
    assert (done.returncode, done.stdout.strip()) == (0, "4"), done.stderr
    runs = starts(path)
    gaps = [b - a for a, b in zip(runs, runs[1:])]
    assert len(gaps) == 3
    for n, gap in enumerate(gaps):  # 0.3 s doubled per retry, less up to a quarter
        assert gap >= 0.75 * 0.3 * 2 ** n, gaps
    assert gaps[0] < gaps[1] < gaps[2], gaps

    never = str(tmp_path / "never")  # a kind it does not retry ends it after one run
    done = master_cli(fabric, "submit", "flaky_stamp", never, "3", "--retries", "3", "--retry-on",
               "timeout", "--wait", "30")
    assert done.returncode == 1 and len(starts(never)) == 1, done.stderr


def test_a_task_registered_with_a_retry_policy_is_retried_by_it(fabric: Fabric,
                                                                  tmp_path: Path) -> None:
    fabric.master()  # the master's default: 3 runs, no backoff
    fabric.node("n1", *TASKS)
    with fabric.client() as client:
        wait_ready(client, "n1")
        path = str(tmp_path / "runs")
        assert client.submit("registered_flaky", [path, 4]).result(timeout=30) == 5
        runs = starts(path)
        gaps = [b - a for a, b in zip(runs, runs[1:])]
        assert len(gaps) == 4 and all(gap >= 0.75 * 0.2 * 2 ** n for n, gap in enumerate(gaps))
        history = client.task(client.submit("registered_flaky", [str(tmp_path / "once"), 1],
                                            max_attempts=1).id)
        wait_until(lambda: client.task(history["id"])["state"] == "failed", 20,
                   message="the submission's budget of one run to win")
        assert len(starts(str(tmp_path / "once"))) == 1


def test_a_delayed_task_starts_no_earlier_than_asked(fabric: Fabric, tmp_path: Path) -> None:
    fabric.master()
    fabric.node("n1", *TASKS)
    with fabric.client() as client:
        wait_ready(client, "n1")
        asked = time.time()
        later = client.submit("stamp", [str(tmp_path / "countdown")], countdown=1.0)
        eta = client.submit("stamp", [str(tmp_path / "eta")],  # ISO 8601, local time
                            eta=datetime.fromtimestamp(asked + 2.0).isoformat())
        now = client.submit("stamp", [str(tmp_path / "now")])
        assert now.result(timeout=30) < asked + 1.0  # an undelayed task is not held up
        assert asked + 1.0 <= later.result(timeout=30) < asked + 1.0 + 2.0
        assert asked + 2.0 <= eta.result(timeout=30) < asked + 2.0 + 2.0
    bad = master_cli(fabric, "submit", "stamp", "x", "--eta", "next tuesday")
    assert bad.returncode == 2 and "eta 'next tuesday'" in bad.stderr


def test_a_rate_limit_holds_within_ten_percent(fabric: Fabric, tmp_path: Path) -> None:
    fabric.master("--rate-limit", "stamp=20/s")
    fabric.node("n1", "--capacity", "8", *TASKS)
    path = str(tmp_path / "starts")
    with fabric.client() as client:
        wait_ready(client, "n1")
        handles = client.submit_many([("stamp", [path], {}, 5)] * 60)
        for handle in handles:
            handle.result(timeout=30)
        assert client.submit("echo", ["free"]).result(timeout=10) == "free"  # others pass
        # when the master started each (a busy node may run what it holds in a bunch)
        times = sorted(client.task(h.id)["started"] for h in handles)
    assert len(starts(path)) == 60
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 18.0 <= rate <= 22.0, rate
    assert max(sum(1 for t in times if begin <= t < begin + 1.0) for begin in times) <= 22


def test_a_delay_and_a_backoff_survive_a_master_restart(fabric: Fabric, tmp_path: Path) -> None:
    master = fabric.master()
    fabric.node("n1", *TASKS)
    delayed, flaky = str(tmp_path / "delayed"), str(tmp_path / "flaky")
    with fabric.client() as client:
        wait_ready(client, "n1")
        asked = time.time()
        later = client.submit("stamp", [delayed], countdown=3.0)
        retried = client.submit("flaky_stamp", [flaky, 1], backoff=2.5)
        wait_until(lambda: len(starts(flaky)) == 1, 10, message="the first run failed")
        wait_until(lambda: client.task(retried.id)["attempts"] == 1, 10,
                   message="the master knows the run failed")
        assert master.terminate() == 0
        fabric.master()
        assert retried.result(timeout=30) == 2
        assert later.result(timeout=30) >= asked + 3.0
    first, second = starts(flaky)
    assert second - first >= 0.75 * 2.5
    assert starts(delayed)[0] >= asked + 3.0
