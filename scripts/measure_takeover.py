"""Take-over time of replicated masters: from the fault to the new master's first dispatch.

A broker this script owns (the embedded one as its own process, or mosquitto), three
`master-node serve --replica` masters, a few compute nodes, and one client that keeps short
tasks queued so the active master dispatches all the time. Each round kills the active
master with SIGKILL (or freezes it with SIGSTOP, `--fault freeze`), and a plain MQTT
watcher on `<root>/master/lease` and `<root>/nodes/+/tasks` times:

    lease     from the fault to the new lease held (retained on <root>/master/lease)
    dispatch  from the fault to the first task batch stamped with the new epoch

Then the hurt master is started again (or resumed) as a standby, so three masters remain
for the next round. At the end every submitted task must have its result.

    python scripts/measure_takeover.py [--rounds 5] [--fault kill|freeze]
        [--broker embedded|mosquitto] [--nodes 2] [--lease-ttl 3] [--json]

Progress goes to stderr; the table (or one JSON object with --json) to stdout.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]
for _path in (str(_REPO), str(_REPO / "tests")):
    if _path not in sys.path:  # run as a script from a checkout
        sys.path.insert(0, _path)

from core.errors import DecodeError  # noqa: E402
from core.mqtt import MqttSession  # noqa: E402
from core.protocol import TaskBatch, decode_message  # noqa: E402
from core.replication import HELD, Lease  # noqa: E402
from core.url import parse_broker_url  # noqa: E402
from master.client import FabricClient  # noqa: E402
from support.fabric import Proc  # noqa: E402
from support.faults import BROKER_KINDS, RestartableBroker, log, stop_all, wait_for  # noqa: E402

ROOT = "takeover"


def need(predicate: Any, timeout: float, what: str) -> Any:
    """wait_for, failing the run with `what` when time runs out."""
    value = wait_for(predicate, timeout)
    if not value:
        raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
    return value


class Watch:
    """Leases held and first task batches per (epoch, master), with arrival times."""

    def __init__(self, broker_url: str) -> None:
        self._lock = threading.Lock()
        self.held: dict[tuple[int, str], float] = {}
        self.first_batch: dict[tuple[int, str], float] = {}
        self.tasks: dict[tuple[int, str], int] = {}
        self._session = MqttSession(broker=parse_broker_url(broker_url),
                                    client_id=f"watch-{uuid.uuid4().hex[:6]}")
        self._session.subscribe(f"{ROOT}/master/lease", self._on_lease)
        self._session.subscribe(f"{ROOT}/nodes/+/tasks", self._on_tasks)
        self._session.start(timeout=10)

    def _on_lease(self, _topic: str, payload: bytes) -> None:
        try:
            lease = Lease.decode(payload) if payload else None
        except DecodeError:
            return
        if lease is not None and lease.state == HELD:
            with self._lock:
                self.held.setdefault(lease.key, time.monotonic())

    def _on_tasks(self, _topic: str, payload: bytes) -> None:
        try:
            message = decode_message(payload)
        except DecodeError:
            return
        if isinstance(message, TaskBatch):
            key = (message.epoch, message.master)
            with self._lock:
                self.first_batch.setdefault(key, time.monotonic())
                self.tasks[key] = self.tasks.get(key, 0) + len(message.tasks)

    def holder(self) -> tuple[int, str] | None:
        with self._lock:
            return max(self.held) if self.held else None

    def dispatched(self, key: tuple[int, str]) -> int:
        with self._lock:
            return self.tasks.get(key, 0)

    def close(self) -> None:
        self._session.stop(timeout=2.0)


class Feeder:
    """Keeps about `backlog` short tasks waiting, and checks each one's result."""

    def __init__(self, client: FabricClient, *, backlog: int, sleep: float) -> None:
        self.client = client
        self.backlog = backlog
        self.sleep = sleep
        self.submitted = 0
        self.handles: list[Any] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                waiting = sum(1 for h in self.handles[-2 * self.backlog:] if not h.done())
                if waiting < self.backlog:
                    batch = self.client.submit_many(
                        [("sleep", [self.sleep], {}, 5) for _ in range(self.backlog - waiting)],
                        ack_timeout=60.0)
                    self.handles += batch
                    self.submitted += len(batch)
                self._stop.wait(0.05)
        except BaseException as e:  # reported by the main thread
            self.error = e

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


def master_proc(workdir: Path, broker_url: str, name: str, ttl: float) -> Proc:
    return Proc([sys.executable, "-m", "master.cli", "serve", "--replica", "--broker", broker_url,
                 "--root", ROOT, "--id", name, "--state", str(workdir / name), "--lease-ttl",
                 str(ttl), "--snapshot-interval", "0"], workdir / f"{name}.log", cwd=_REPO)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="takeover-"))
    broker = RestartableBroker(args.broker, workdir)
    broker.start()
    procs: list[Any] = []
    masters: dict[str, Proc] = {}
    born: dict[Proc, float] = {}
    watch = client = feeder = None
    rounds: list[dict[str, Any]] = []
    try:
        watch = Watch(broker.url)
        for i in (1, 2, 3):
            masters[f"m{i}"] = master_proc(workdir, broker.url, f"m{i}", args.lease_ttl)
            born[masters[f"m{i}"]] = time.monotonic()
        need(lambda: watch.holder(), 60, "a first active master")
        for i in range(args.nodes):
            procs.append(Proc([sys.executable, "-m", "node.cli", "--broker", broker.url, "--root",
                               ROOT, "--id", f"n{i + 1}", "--capacity", "2", "--heartbeat", "0.5"],
                              workdir / f"n{i + 1}.log", cwd=_REPO))
        client = FabricClient(broker_url=broker.url, root=ROOT).start()
        feeder = Feeder(client, backlog=args.backlog, sleep=args.task_seconds)
        feeder.start()
        for number in range(1, args.rounds + 1):
            holder = need(lambda: watch.holder(), 60, "an active master")
            need(lambda: watch.dispatched(holder) >= 20, 60, "the active master to dispatch")
            for proc in masters.values():  # every master up and following before the fault
                proc.wait_for_output("ready on", timeout=60)
            # a master restarted a moment ago watches the lease for a ttl before it may claim:
            # measure the steady state, where every standby has watched long enough
            need(lambda: all(time.monotonic() - born[p] > args.lease_ttl + 1
                             for p in masters.values()), 60, "the standbys to watch for a ttl")
            time.sleep(args.settle)  # let the standbys catch up: a steady state, not a race
            need(lambda: client.status(timeout=5)["queued"] >= 20, 60,
                 "tasks queued at the active master")  # so the new one has work at once
            name = holder[1]
            victim = masters[name]
            hurt_at = time.monotonic()
            victim.signal(signal.SIGKILL if args.fault == "kill" else signal.SIGSTOP)
            new = need(lambda: (lambda h: h if h and h > holder else None)(watch.holder()), 60,
                       "a new lease holder")
            need(lambda: new in watch.first_batch, 60, "the new master's first dispatch")
            lease_s = watch.held[new] - hurt_at
            dispatch_s = watch.first_batch[new] - hurt_at
            rounds.append({"round": number, "fault": args.fault, "from": name, "to": new[1],
                           "epoch": new[0], "lease_s": round(lease_s, 3),
                           "dispatch_s": round(dispatch_s, 3)})
            log(f"round {number}: {args.fault} {name} -> {new[1]} (epoch {new[0]}): lease after "
                f"{lease_s:.2f} s, first dispatch after {dispatch_s:.2f} s", start=started)
            if args.fault == "kill":
                victim.popen.wait(10)
                victim.cleanup()
                masters[name] = master_proc(workdir, broker.url, name, args.lease_ttl)
                born[masters[name]] = time.monotonic()
            else:
                victim.signal(signal.SIGCONT)
        feeder.stop()
        if feeder.error is not None:
            raise feeder.error
        for handle in feeder.handles:
            if handle.result(timeout=120) != args.task_seconds:
                raise AssertionError(f"task {handle.id} returned a wrong value")
        log(f"all {feeder.submitted} tasks returned their value", start=started)
    finally:
        if feeder is not None:
            feeder.stop()
        if client is not None:
            client.close()
        if watch is not None:
            watch.close()
        stop_all([*procs, *masters.values()])
        broker.close()
    return {"broker": args.broker, "lease_ttl": args.lease_ttl, "nodes": args.nodes,
            "tasks": feeder.submitted if feeder else 0, "rounds": rounds, "workdir": str(workdir)}


def summary(result: dict[str, Any]) -> str:
    rounds = result["rounds"]
    lines = [f"take-over of replicated masters ({result['broker']} broker, lease ttl "
             f"{result['lease_ttl']:g} s, {result['nodes']} nodes, {result['tasks']} tasks, all "
             "returned)",
             f"{'round':>5}  {'fault':<6} {'from':<4} {'to':<4} {'epoch':>5}  {'lease':>8}  "
             f"{'first dispatch':>14}"]
    for r in rounds:
        lines.append(f"{r['round']:>5}  {r['fault']:<6} {r['from']:<4} {r['to']:<4} "
                     f"{r['epoch']:>5}  {r['lease_s']:>7.2f}s  {r['dispatch_s']:>13.2f}s")
    if rounds:
        values = [r["dispatch_s"] for r in rounds]
        lines.append(f"first dispatch after the fault: min {min(values):.2f} s, median "
                     f"{statistics.median(values):.2f} s, max {max(values):.2f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="measure_takeover.py",
        description="Measure how long replicated masters take to replace a killed (or frozen) "
                    "active master: from the fault to the new master's first task dispatch.")
    parser.add_argument("--rounds", type=int, default=5, help="faults in a row (default 5)")
    parser.add_argument("--fault", choices=("kill", "freeze"), default="kill",
                        help="kill: SIGKILL the active master (then start it again); freeze: "
                             "SIGSTOP it (then SIGCONT); default kill")
    parser.add_argument("--broker", choices=BROKER_KINDS, default="embedded",
                        help="which broker to run (default embedded)")
    parser.add_argument("--nodes", type=int, default=2, help="compute nodes (default 2)")
    parser.add_argument("--lease-ttl", type=float, default=3.0,
                        help="the masters' --lease-ttl (default 3)")
    parser.add_argument("--backlog", type=int, default=400,
                        help="tasks kept waiting so the master always dispatches (default 400)")
    parser.add_argument("--task-seconds", type=float, default=0.05,
                        help="each task sleeps this long (default 0.05)")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds of steady work before each fault (default 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.nodes < 1:
        parser.error("--rounds and --nodes must be at least 1")
    result = measure(args)
    print(json.dumps(result, indent=2) if args.json else summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
