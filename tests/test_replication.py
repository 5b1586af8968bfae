"""Replicated masters as a user runs them: three `master-node serve --replica` processes on
one broker (the embedded one as its own process, and mosquitto), real compute nodes, real
clients. Killed or frozen, the active master is replaced, nothing it acknowledged is lost,
and a replaced master never gets work accepted again."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import sympy

from support.fabric import REPO, Fabric, Proc, child_env, wait_until
from support.replication import ReplicaWatch, primes_command, start_masters


@pytest.fixture
def watch(fabric: Fabric) -> Iterator[ReplicaWatch]:
    w = ReplicaWatch(fabric.broker_url, fabric.root)
    yield w
    w.close()


@pytest.fixture(scope="module")
def prime_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[str]]:
    """Three files of 64-bit numbers (with duplicates and small primes), and the exact
    `primes.txt` expected, from sympy."""
    directory = tmp_path_factory.mktemp("inputs")
    rng = random.Random(4)
    found: set[int] = set()
    paths = []
    for index in range(3):
        numbers = [rng.getrandbits(64) for _ in range(120_000)] + [rng.randrange(10_000)
                                                                   for _ in range(2_000)]
        rng.shuffle(numbers)
        path = directory / f"input_{index + 1}.txt"
        path.write_text("\n".join(map(str, numbers)) + "\n")
        paths.append(path)
        found.update(n for n in set(numbers) if sympy.isprime(n))
    return paths, [str(n) for n in sorted(found)]


def test_acknowledged_tasks_survive_killing_the_active_master(fabric: Fabric,
                                                              watch: ReplicaWatch) -> None:
    masters = start_masters(fabric)
    first, epoch = watch.wait_active(20)
    wait_until(lambda: sorted(watch.roles().values()) == ["active", "standby", "standby"], 20,
               message="two standbys in sync")
    with fabric.client() as client:
        handles = client.submit_many([("echo", [i], {}, 1 + i % 10) for i in range(300)])
        masters[first].kill()  # every submission above was acknowledged: none may be lost
        second, second_epoch = watch.wait_active(20, after_epoch=epoch)
        assert second != first and second_epoch == epoch + 1
        fabric.node("n1", "--capacity", "4")
        assert [h.result(timeout=60) for h in handles] == list(range(300))
        assert client.status()["completed"] == 300
    assert watch.dispatchers() == [(second_epoch, second)]


def test_a_primes_job_finishes_exactly_while_the_active_master_is_killed_twice(
        fabric: Fabric, watch: ReplicaWatch, prime_inputs: tuple[list[Path], list[str]]) -> None:
    files, expected = prime_inputs
    masters = start_masters(fabric)
    holder, epoch = watch.wait_active(20)
    wait_until(lambda: sorted(watch.roles().values()) == ["active", "standby", "standby"], 20,
               message="two standbys in sync")
    for node in ("n1", "n2"):
        fabric.node(node, "--capacity", "1")
    output = fabric.tmp / "primes.txt"
    log = open(fabric.tmp / "job.log", "wb")
    job = subprocess.Popen(primes_command(fabric, files, output, "--shard-size", "1000"),
                           cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True)
    try:
        takeovers = []
        for _kill in range(2):
            watch.wait_dispatch(holder, epoch, 20, timeout=60)
            assert job.poll() is None, "the job ended before the master could be killed"
            masters[holder].kill()
            killed_at = time.monotonic()
            holder, epoch = watch.wait_active(20, after_epoch=epoch)
            first = watch.wait_dispatch(holder, epoch, 1, timeout=30)
            takeovers.append(first.at - killed_at)
        assert job.wait(180) == 0, (fabric.tmp / "job.log").read_text()[-3000:]
    finally:
        if job.poll() is None:
            job.kill()
            job.wait(10)
        log.close()
    assert ": complete" in (fabric.tmp / "job.log").read_text()
    assert output.read_text().split() == expected
    epochs = [e for e, _m in watch.dispatchers()]
    assert len(epochs) == 3 and epochs == sorted(set(epochs))  # three masters, one after another
    print(f"take-over times (kill -9 to the new master's first dispatch): "
          f"{', '.join(f'{t:.2f} s' for t in takeovers)}")
    assert max(takeovers) < 10.0


def test_frozen_masters_do_not_dispatch_or_claim_after_a_take_over(fabric: Fabric,
                                                                  watch: ReplicaWatch) -> None:
    masters = start_masters(fabric)
    active, epoch = watch.wait_active(20)
    wait_until(lambda: sorted(watch.roles().values()) == ["active", "standby", "standby"], 20,
               message="two standbys in sync")
    standby, spare = sorted(name for name in masters if name != active)
    for node in ("n1", "n2"):
        fabric.node(node, "--capacity", "2")
    with fabric.client() as client:
        handles = client.submit_many([("sleep", [0.05], {}, 5) for _ in range(300)])
        watch.wait_dispatch(active, epoch, 30, timeout=30)
        frozen = [masters[active], masters[standby]]
        for proc in frozen:  # the active master and a standby: only `spare` can take over
            proc.signal(signal.SIGSTOP)
        new, new_epoch = watch.wait_active(30, after_epoch=epoch)
        assert new == spare and new_epoch == epoch + 1
        taken_over = watch.wait_dispatch(new, new_epoch, 1, timeout=30).at
        resumed_at = time.monotonic()
        for proc in frozen:
            proc.signal(signal.SIGCONT)
        assert [h.result(timeout=90) for h in handles] == [0.05] * 300
        wait_until(lambda: watch.roles() == {active: "standby", standby: "standby",
                                             spare: "active"}, 30,
                   message="both resumed masters standing by, the spare active")
    stale = [b for b in watch.dispatched(active, epoch) if b.at > taken_over]
    assert [b for b in stale if b.at > resumed_at] == []   # the resumed master sent nothing
    wait_until(lambda: watch.rejected() == len(stale), 10,
               message="every stale batch refused by the nodes")
    assert watch.holder() == (spare, new_epoch)            # nobody claimed after resuming
    assert [e for e, _m in watch.dispatchers()] == [epoch, new_epoch]
    assert f"master {active} steps down" in masters[active].output()


def test_replicas_refuse_an_embedded_broker_and_pipelines(tmp_path: Path) -> None:
    serve = [sys.executable, "-m", "master.cli", "serve", "--replica", "--state", str(tmp_path)]
    for extra, message in ((["--port", "1"], "need a broker that outlives"),
                           (["--broker", "mqtt://127.0.0.1:1", "--pipelines",
                             str(REPO / "examples" / "pipelines.toml")], "cannot be combined")):
        proc = Proc([*serve, *extra], tmp_path / "serve.log")
        assert proc.popen.wait(30) == 2
        assert message in proc.output()
        proc.cleanup()


def test_replicated_masters_take_the_retention_retry_and_rate_options(fabric: Fabric,
                                                                      watch: ReplicaWatch) -> None:
    from core.errors import ConfigError
    start_masters(fabric, 2, "--result-ttl", "8s", "--forget-nodes-after", "1m",
                  "--backoff", "0.1", "--rate-limit", "echo=20/s")
    watch.wait_active(20)
    fabric.node("n1", "--capacity", "4")
    with fabric.client() as client:
        handles = client.submit_many([("echo", [i], {}, 5) for i in range(30)])
        assert [h.result(timeout=60) for h in handles] == list(range(30))
        starts = sorted(client.task(h.id)["started"] for h in handles)
        assert starts[-1] - starts[0] >= 29 / 20 * 0.9  # 20 starts a second at most

        def expired() -> bool:
            try:
                client.result(handles[0].id, timeout=5)
            except ConfigError as e:
                return "no task with id" in str(e)
            return False
        wait_until(expired, 30, message="the active master to expire a result after 8 s")
