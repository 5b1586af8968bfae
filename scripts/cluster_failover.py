"""Long failover run on a real RabbitMQ cluster: prime jobs exact while members die.

Starts a three-member RabbitMQ cluster of its own on loopback ports (the Debian package's
`rabbitmq-server`, never its system service; data in a temporary directory), a master and
compute nodes, each given the members as a broker list in its own order, so each is homed on
another member. First one prime job on the embedded broker and one on the quiet cluster, for
their speeds side by side; then, round after round, a job runs while one member (in turn,
the master's too) is killed with kill -9 and started again. Each round checks the job's
primes against sympy and counts the reconnects of the nodes (their birth sequence), how long
the nodes homed on the dead member took to be back, and how much the brokers logged.

    python scripts/cluster_failover.py [--rounds 6] [--numbers 200000] [--nodes 2] [--json]

Exit status 0 only if every job was exact and no node reconnected more than --max-reconnects
times in a round. Progress goes to stderr; the summary (or one JSON object) to stdout. The
test suite runs the same steps once (tests/test_cluster.py, the member killed mid-job).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]
for _path in (_REPO, _REPO / "tests"):  # run as a script from a checkout
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import sympy  # noqa: E402

from core.mqtt import MqttSession  # noqa: E402
from core.url import parse_broker_url  # noqa: E402
from support.brokers import RabbitCluster, start_embedded, start_rabbitmq_cluster  # noqa: E402
from support.fabric import Proc, child_env  # noqa: E402
from support.faults import log, stop_all, wait_for  # noqa: E402


def make_numbers(path: Path, count: int, seed: int) -> list[str]:
    """A file of `count` numbers (64-bit and small ones) and its primes, ascending."""
    rng = random.Random(seed)
    numbers = [rng.getrandbits(64) if i % 4 else rng.randrange(100_000) for i in range(count)]
    path.write_text("".join(f"{n}\n" for n in numbers))
    return [str(n) for n in sorted({n for n in numbers if sympy.isprime(n)})]


class Run:
    """One fabric (a master and nodes) on one broker list, under its own topic root."""

    def __init__(self, workdir: Path, lists: list[str], *, nodes: int, root: str) -> None:
        self.workdir = workdir
        self.lists = lists
        self.root = root
        self.procs: list[Proc] = []
        self.node_ids = [f"n{i + 1}" for i in range(nodes)]
        self.master = self._start("master", ["master.cli", "serve", "--broker", lists[0],
                                             "--root", root, "--state", str(workdir / "state")])
        self.master.wait_for_output("master ready", timeout=60)
        for i, node in enumerate(self.node_ids):
            home = lists[(i + 1) % len(lists)]
            self._start(node, ["node.cli", "--broker", home, "--root", root, "--id", node,
                               "--heartbeat", "0.5"])
        self.seqs: dict[str, list[tuple[float, int]]] = {n: [] for n in self.node_ids}
        self.done: dict[str, int] = {n: 0 for n in self.node_ids}
        self._lock = threading.Lock()
        self.watcher = MqttSession(broker=parse_broker_url(lists[0]), client_id=f"{root}-watch")
        for node in self.node_ids:  # exact topics: a clustered broker's wildcards miss retained
            self.watcher.subscribe(f"{root}/nodes/{node}/status", self._on_status)
        self.watcher.start(timeout=30)
        wait_for(lambda: all(self.seqs.values()), 60)

    def _start(self, name: str, args: list[str]) -> Proc:
        proc = Proc([sys.executable, "-m", *args], self.workdir / f"{name}.log")
        self.procs.append(proc)
        return proc

    def _on_status(self, _topic: str, payload: bytes) -> None:
        if payload:
            status = json.loads(payload)
            with self._lock:
                self.seqs[status["node_id"]].append((time.monotonic(), int(status.get("seq", 0))))
                self.done[status["node_id"]] = int(status.get("tasks_done", 0))

    def seq(self, node: str) -> int:
        with self._lock:
            return max((s for _t, s in self.seqs[node]), default=0)

    def job(self, numbers: Path, output: Path, job_id: str) -> subprocess.Popen[bytes]:
        out = open(self.workdir / f"{job_id}.json", "wb")
        err = open(self.workdir / f"{job_id}.err", "wb")
        return subprocess.Popen(
            [sys.executable, "-m", "master.cli", "primes", str(numbers), "--broker",
             self.lists[-1], "--root", self.root, "--output", str(output), "--json",
             "--no-progress", "--job-id", job_id, "--shard-size", "500", "--timeout", "60"],
            stdout=out, stderr=err, cwd=str(self.workdir), env=child_env(),
            start_new_session=True)

    def finish(self, job: subprocess.Popen[bytes], job_id: str, timeout: float) -> dict[str, Any]:
        try:
            job.wait(timeout)
        except subprocess.TimeoutExpired:
            job.kill()
            job.wait(10)
            raise RuntimeError(f"job {job_id} did not finish in {timeout:g}s:\n"
                               + (self.workdir / f"{job_id}.err").read_text()[-2000:])
        text = (self.workdir / f"{job_id}.json").read_text()
        if job.returncode != 0 or not text.strip():
            raise RuntimeError(f"job {job_id} exited {job.returncode}:\n"
                               + (self.workdir / f"{job_id}.err").read_text()[-2000:])
        return json.loads(text)

    def close(self) -> None:
        self.watcher.stop()
        stop_all(self.procs)
        for proc in self.procs:
            proc.cleanup()


def timed_job(run: Run, numbers: Path, expected: list[str], name: str) -> dict[str, Any]:
    output = run.workdir / f"{name}.txt"
    began = time.monotonic()
    summary = run.finish(run.job(numbers, output, name), name, 600)
    seconds = time.monotonic() - began
    exact = output.read_text().split() == expected
    return {"seconds": round(seconds, 2), "numbers_per_s": round(summary["numbers_tested"] / seconds),
            "exact": exact, "retries": summary["retries"]}


def failover_round(run: Run, cluster: RabbitCluster, victim: int, numbers: Path,
                   expected: list[str], name: str) -> dict[str, Any]:
    """A job with member `victim` killed mid-way and started again after the job."""
    homed = [n for i, n in enumerate(run.node_ids) if (i + 1) % len(cluster.members) == victim]
    output = run.workdir / f"{name}.txt"
    before = {n: run.seq(n) for n in run.node_ids}
    log_before = cluster.log_bytes()
    done_before = sum(run.done.values())
    job = run.job(numbers, output, name)
    # kill once the nodes have a few shards behind them: mid-job
    wait_for(lambda: job.poll() is not None or sum(run.done.values()) >= done_before + 5, 120)
    if job.poll() is not None:
        raise RuntimeError(f"{name}: the job ended before member {victim} could be killed")
    cluster.kill(victim)
    killed = time.monotonic()
    back: dict[str, float] = {}
    for node in homed:
        if wait_for(lambda: run.seq(node) > before[node], 60):
            with run._lock:
                first = min(t for t, s in run.seqs[node] if s > before[node])
            back[node] = round(first - killed, 2)
    summary = run.finish(job, name, 600)
    cluster.restart(victim)
    time.sleep(3.0)  # a few heartbeats after the member returned: a storm would show here
    reconnects = {n: run.seq(n) - before[n] for n in run.node_ids}
    return {"victim": victim, "exact": output.read_text().split() == expected,
            "nodes_back_in_s": back, "reconnects": reconnects, "retries": summary["retries"],
            "broker_log_bytes": cluster.log_bytes() - log_before}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6, help="members killed, one per round")
    p.add_argument("--numbers", type=int, default=200_000, help="numbers per job")
    p.add_argument("--nodes", type=int, default=2, help="compute nodes")
    p.add_argument("--max-reconnects", type=int, default=3,
                   help="most reconnects a node may take in one round")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = p.parse_args(argv)
    start = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="cluster-failover-"))
    numbers = workdir / "numbers.txt"
    expected = make_numbers(numbers, args.numbers, args.seed)
    result: dict[str, Any] = {"numbers": args.numbers, "primes": len(expected)}
    cluster = embedded = run = None
    try:
        embedded = start_embedded(_REPO / "broker.conf", directory=workdir / "embedded")
        (workdir / "e").mkdir()
        run = Run(workdir / "e", [embedded.url], nodes=args.nodes, root="fo-e")
        result["embedded"] = timed_job(run, numbers, expected, "embedded")
        log(f"embedded broker: {result['embedded']}", start=start)
        run.close()
        run = None
        embedded.stop()
        embedded = None

        began = time.monotonic()
        cluster = start_rabbitmq_cluster(3, directory=workdir / "rabbitmq")
        result["cluster_start_s"] = round(time.monotonic() - began, 1)
        log(f"RabbitMQ cluster of 3 up in {result['cluster_start_s']}s", start=start)
        urls = cluster.urls
        lists = [",".join(urls[(k + i) % 3] for i in range(3)) for k in range(3)]
        (workdir / "c").mkdir()
        run = Run(workdir / "c", lists, nodes=args.nodes, root="fo-c")
        result["cluster"] = timed_job(run, numbers, expected, "cluster")
        log(f"cluster: {result['cluster']}", start=start)
        rounds = []
        for r in range(args.rounds):
            victim = [1, 2, 0][r % 3]
            outcome = failover_round(run, cluster, victim, numbers, expected, f"round{r}")
            log(f"round {r}: {outcome}", start=start)
            rounds.append(outcome)
        result["rounds"] = rounds
    finally:
        if run is not None:
            run.close()
        if embedded is not None:
            embedded.stop()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    ok = result["embedded"]["exact"] and result["cluster"]["exact"] and all(
        r["exact"] and max(r["reconnects"].values()) <= args.max_reconnects
        for r in result["rounds"])
    result["ok"] = ok
    result["seconds"] = round(time.monotonic() - start, 1)
    if args.json:
        print(json.dumps(result))
    else:
        e, c = result["embedded"], result["cluster"]
        print(f"embedded broker: {e['numbers_per_s']} numbers/s; RabbitMQ cluster of 3: "
              f"{c['numbers_per_s']} numbers/s ({c['numbers_per_s'] / e['numbers_per_s']:.2f}x); "
              f"cluster up in {result['cluster_start_s']}s")
        for i, r in enumerate(result["rounds"]):
            print(f"round {i}: member {r['victim']} killed; exact={r['exact']}; back in "
                  f"{r['nodes_back_in_s']}; reconnects {r['reconnects']}; broker log "
                  f"+{r['broker_log_bytes']} bytes")
        print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
