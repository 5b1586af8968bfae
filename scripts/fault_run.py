"""Fault-injection run: tasks keep flowing while nodes, the broker and the master are hurt.

A broker this script owns (the embedded one or mosquitto, from broker.conf, on a fixed port),
a master run with `--broker URL`, a few compute nodes, and one client that submits the
tasks (echo, short sleeps and a few that fail on purpose, priorities 1-10) in waves. While
the work runs, the script injects, in a seeded order spread over the run:

    node_kill       kill -9 a node, start it again with the same id
    node_freeze     SIGSTOP a node past the master's node timeout, then SIGCONT
    broker_restart  kill -9 the broker, start it again on the same port
    master_kill     kill -9 the master, start it again with the same state directory

At the end it checks what a user relies on: every submitted task has exactly one final
record in the journal (completed, or failed with its reasons), none is missing or still
pending, the client was told one outcome per task (repeats of the same outcome are counted,
a conflicting one is an error), and the journal's values are the ones the client received
and the ones the tasks compute. Exit status 0 only if all of that holds.

    python scripts/fault_run.py [--tasks 10000] [--broker embedded|mosquitto] [--seed 1]
                                [--rounds 3] [--nodes 3] [--timeout 900] [--json]

Progress goes to stderr; the summary (or one JSON object with --json) to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO / "tests") not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(_REPO / "tests"))

from support.fabric import Proc  # noqa: E402
from support.faults import (BROKER_KINDS, JournalView, RecordingClient,  # noqa: E402
                            RestartableBroker, log, stop_all, wait_for)


FAULT_KINDS = ("node_kill", "node_freeze", "broker_restart", "master_kill")
SLEEPS = (0.0, 0.002, 0.005, 0.01, 0.02)


def _seconds_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds separated by commas, got {text!r}")
    if not values or any(not 0 <= v <= 60 for v in values):
        raise argparse.ArgumentTypeError("sleeps must be 0-60 seconds")
    return values


@dataclass(frozen=True)
class PlannedTask:
    """One task to submit and what it must end as."""

    name: str
    args: list
    priority: int
    expect_failure: bool
    expected: Any


def plan_tasks(count: int, rng: random.Random, *, fail_rate: float, sleep_share: float,
               sleeps: tuple[float, ...], tag: str) -> list[PlannedTask]:
    """A seeded mix of echo tasks, short sleeps and a few deliberate failures."""
    out = []
    for i in range(count):
        priority = rng.randint(1, 10)
        roll = rng.random()
        if roll < fail_rate:
            out.append(PlannedTask("fail", [f"planned failure {i}"], priority, True, None))
        elif roll < fail_rate + sleep_share:
            seconds = rng.choice(sleeps)
            out.append(PlannedTask("sleep", [seconds], priority, False, seconds))
        else:
            value = [i, f"{tag}-{i}"]
            out.append(PlannedTask("echo", [value], priority, False, value))
    return out


@dataclass
class FaultRun:
    """The processes of one run and the faults done to them."""

    args: argparse.Namespace
    workdir: Path
    start: float = field(default_factory=time.monotonic)
    root: str = field(default_factory=lambda: f"fault{uuid.uuid4().hex[:6]}")
    broker: RestartableBroker | None = None
    master: Proc | None = None
    nodes: dict[str, Proc] = field(default_factory=dict)
    retired: list[Proc] = field(default_factory=list)
    master_starts: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {k: 0 for k in FAULT_KINDS})
    fault_log: list[dict] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    def say(self, message: str) -> None:
        log(message, start=self.start)

    # -- processes ---------------------------------------------------------------------------

    def start_broker(self) -> None:
        self.broker = RestartableBroker(self.args.broker, self.workdir / "broker")
        self.broker.start()
        self.say(f"{self.args.broker} broker on {self.broker.url} (pid {self.broker.pid})")

    def start_master(self) -> None:
        assert self.broker is not None
        if self.master is not None:
            self.retired.append(self.master)
        self.master_starts += 1
        self.master = Proc([sys.executable, "-m", "master.cli", "serve", "--broker",
                            self.broker.url, "--root", self.root, "--state", str(self.state_dir),
                            "--node-timeout", str(self.args.node_timeout),
                            "--max-attempts", str(self.args.max_attempts)],
                           self.workdir / f"master-{self.master_starts}.log")
        self.master.wait_for_output("master ready", timeout=30)

    def start_node(self, node_id: str) -> None:
        assert self.broker is not None
        old = self.nodes.get(node_id)
        if old is not None:
            self.retired.append(old)
        index = sum(1 for p in self.retired if p.args[-1] == node_id)
        self.nodes[node_id] = Proc([sys.executable, "-m", "node.cli", "--broker", self.broker.url,
                                    "--root", self.root, "--capacity", "2", "--heartbeat", "0.5",
                                    "--log-level", "WARNING", "--id", node_id],
                                   self.workdir / f"node-{node_id}-{index}.log")

    def stop(self) -> None:
        """Nodes and master leave gracefully (the master commits its journal), then the broker."""
        stop_all(list(self.nodes.values()))
        if self.master is not None:
            stop_all([self.master])
        for proc in [*self.retired, *self.nodes.values(), *([self.master] if self.master else [])]:
            proc.cleanup()
        if self.broker is not None:
            self.broker.close()

    # -- faults ------------------------------------------------------------------------------

    def inject(self, kind: str, rng: random.Random, outstanding: int) -> None:
        started = time.monotonic()
        detail = ""
        if kind == "node_kill":
            node_id = rng.choice(sorted(self.nodes))
            self.nodes[node_id].kill()
            time.sleep(rng.uniform(0.2, 1.0))  # how long the node stays down
            self.start_node(node_id)
            detail = node_id
        elif kind == "node_freeze":
            node_id = rng.choice(sorted(self.nodes))
            frozen_for = self.args.node_timeout + 1.5  # long enough to be declared dead
            self.nodes[node_id].signal(signal.SIGSTOP)
            time.sleep(frozen_for)
            self.nodes[node_id].signal(signal.SIGCONT)
            detail = f"{node_id} for {frozen_for:g}s"
        elif kind == "broker_restart":
            assert self.broker is not None
            self.broker.restart(hard=True, down_for=rng.uniform(0.2, 1.0))
            detail = f"pid {self.broker.pid}"
        elif kind == "master_kill":
            assert self.master is not None
            self.master.kill()
            self.start_master()
        self.counts[kind] += 1
        entry = {"kind": kind, "at": round(started - self.start, 2), "detail": detail,
                 "outstanding": outstanding, "took": round(time.monotonic() - started, 2)}
        self.fault_log.append(entry)
        self.say(f"fault {kind} {detail} with {outstanding} tasks outstanding "
                 f"(took {entry['took']:g}s)")


def fault_schedule(rounds: int, rng: random.Random) -> list[str]:
    """Each round does every kind of fault once, in a seeded order."""
    out: list[str] = []
    for _ in range(rounds):
        kinds = list(FAULT_KINDS)
        rng.shuffle(kinds)
        out += kinds
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fault-run-"))
    workdir.mkdir(parents=True, exist_ok=True)
    fr = FaultRun(args, workdir)
    planned = plan_tasks(args.tasks, rng, fail_rate=args.fail_rate, sleep_share=args.sleep_share,
                         sleeps=args.sleeps, tag=f"s{args.seed}")
    schedule = fault_schedule(args.rounds, rng)
    duration = args.duration or 4.0 * len(schedule) + 5.0
    rate = args.tasks / duration  # tasks released per second, so work spans every fault
    window = args.window or max(100, args.tasks // 5)
    chunk = max(1, min(window // 2, math.ceil(rate * 0.5)))
    fault_at = [(j + 0.5) * duration / max(1, len(schedule)) for j in range(len(schedule))]
    handles: list[Any] = []
    submit_errors: list[str] = []
    client: RecordingClient | None = None
    timed_out = False
    try:
        fr.start_broker()
        fr.start_master()
        for k in range(args.nodes):
            fr.start_node(f"fn{k + 1}")
        assert fr.broker is not None
        client = RecordingClient(broker_url=fr.broker.url, root=fr.root).start()
        if not wait_for(lambda: sum(n["status"] == "ready" for n in client.nodes()) >= args.nodes,
                        30, interval=0.2):
            raise RuntimeError("nodes did not become ready")
        fr.say(f"{args.tasks} tasks over about {duration:g}s, {args.nodes} nodes, faults in "
               f"order: {', '.join(schedule)}")
        deadline = fr.start + args.timeout

        t0 = time.monotonic()

        def submitter() -> None:
            for k, start in enumerate(range(0, len(planned), chunk)):
                while (time.monotonic() < t0 + start / rate
                       or len(handles) - client.resolved_count() > window):
                    if time.monotonic() > deadline:
                        return
                    time.sleep(0.02)
                part = planned[start:start + chunk]
                try:
                    handles.extend(client.submit_many(
                        [(t.name, t.args, {}, t.priority) for t in part],
                        ack_timeout=max(1.0, deadline - time.monotonic())))
                except Exception as e:  # reported as lost tasks below
                    submit_errors.append(f"{type(e).__name__}: {e}")
                    return

        thread = threading.Thread(target=submitter, name="submitter", daemon=True)
        thread.start()
        next_fault = 0
        next_report = time.monotonic() + 5.0
        while True:
            resolved = client.resolved_count()
            if resolved >= args.tasks or (not thread.is_alive() and submit_errors):
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            if (next_fault < len(schedule) and time.monotonic() >= t0 + fault_at[next_fault]
                    and len(handles) > resolved):
                fr.inject(schedule[next_fault], rng, len(handles) - resolved)
                next_fault += 1
                continue
            if time.monotonic() >= next_report:
                fr.say(f"{resolved}/{args.tasks} outcomes, {len(handles)} submitted")
                next_report = time.monotonic() + 5.0
            time.sleep(0.05)
        thread.join(timeout=5.0)
        elapsed = time.monotonic() - fr.start
        fr.say(f"run over after {elapsed:.1f}s ({client.resolved_count()} outcomes); checking")
        try:
            client.note_status(client.status(timeout=10.0))
        except Exception as e:
            fr.say(f"no final master status: {e}")
        client.close()
        fr.stop()
        report = check(planned, handles, client, JournalView(fr.state_dir), args)
        report.update({"broker": args.broker, "seed": args.seed, "seconds": round(elapsed, 1),
                       "faults": dict(fr.counts), "fault_log": fr.fault_log,
                       "timed_out": timed_out, "submit_errors": submit_errors,
                       "workdir": str(workdir)})
        report["ok"] = (not timed_out and not submit_errors and report["lost"] == 0
                        and report["client_conflicts"] == 0 and report["journal_mismatch"] == 0
                        and report["unexpected_failures"] == 0)
        return report
    finally:
        if client is not None:
            client.close()
        fr.stop()
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def check(planned: list[PlannedTask], handles: list[Any], client: RecordingClient,
          journal: JournalView, args: argparse.Namespace) -> dict[str, Any]:
    """Compare what was planned, what the client heard and what the journal holds."""
    rows = journal.rows()
    ids = [h.id for h in handles]
    stored = journal.outcomes(ids)
    missing = unfinished = lost = repeats = conflicts = mismatch = 0
    completed = failed = failed_expected = unexpected_failures = 0
    examples: list[str] = []
    for task, task_id in zip(planned, ids):
        heard = client.outcomes.get(task_id, [])
        row = rows.get(task_id)
        if row is None:
            missing += 1
        elif row.state < 2:
            unfinished += 1
        if not heard or row is None or row.state < 2:
            lost += 1
            if len(examples) < 5:
                examples.append(f"{task_id} ({task.name}): heard {len(heard)}, journal "
                                f"{'missing' if row is None else row.state}")
            continue
        first = heard[0]
        if len(heard) > 1:
            repeats += 1
            if any((o.state, o.value) != (first.state, first.value) for o in heard[1:]):
                conflicts += 1
        outcome = stored.get(task_id)
        if outcome is None or (outcome.state, outcome.value) != (first.state, first.value):
            mismatch += 1
        if first.state == "completed":
            completed += 1
            if task.expect_failure or first.value != task.expected:
                mismatch += 1
        else:
            failed += 1
            reasons = (first.error or {}).get("reasons") or []
            if task.expect_failure and reasons:
                failed_expected += 1
            else:
                unexpected_failures += 1
                if len(examples) < 5:
                    examples.append(f"{task_id} ({task.name}) failed: {reasons}")
    extra = len(set(rows) - set(ids))
    return {"tasks": len(planned), "submitted": len(ids), "completed": completed,
            "failed": failed, "failed_expected": failed_expected,
            "unexpected_failures": unexpected_failures,
            "lost": lost + (len(planned) - len(ids)), "missing_in_journal": missing,
            "unfinished_in_journal": unfinished, "unexpected_journal_rows": extra,
            "client_repeats": repeats, "client_conflicts": conflicts,
            "journal_mismatch": mismatch, "master_duplicates": client.master_duplicates(),
            "client_refused": client.refused, "examples": examples,
            "max_attempts": args.max_attempts}


def summary(report: dict[str, Any]) -> str:
    f = report["faults"]
    kills = f["node_kill"] + f["master_kill"] + f["broker_restart"]
    lines = [
        f"broker {report['broker']}, seed {report['seed']}, {report['seconds']}s",
        f"tasks {report['tasks']}: completed {report['completed']}, failed {report['failed']} "
        f"(planned failures {report['failed_expected']}, other {report['unexpected_failures']})",
        f"faults: kills (-9) {kills} (nodes {f['node_kill']}, master {f['master_kill']}, "
        f"broker {f['broker_restart']}), freezes {f['node_freeze']}, "
        f"broker restarts {f['broker_restart']}, master restarts {f['master_kill']}",
        f"lost {report['lost']} (missing in journal {report['missing_in_journal']}, "
        f"unfinished {report['unfinished_in_journal']})",
        f"duplicated: outcomes told twice to the client {report['client_repeats']} "
        f"(conflicting {report['client_conflicts']}), duplicate results dropped by the master "
        f"{report['master_duplicates']}",
        f"journal disagrees with the client or the task {report['journal_mismatch']}",
        "OK" if report["ok"] else "FAILED " + "; ".join(report["examples"] + report["submit_errors"]
                                                          + (["timed out"] if report["timed_out"]
                                                             else [])),
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Run tasks through a real fabric while killing, freezing and restarting its "
                    "nodes, broker and master; check that every task ends exactly once.")
    p.add_argument("--tasks", type=int, default=10_000, help="tasks to run (default %(default)s)")
    p.add_argument("--broker", choices=BROKER_KINDS, default="embedded",
                   help="broker the script runs and restarts (default %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="seed of the task mix and the faults")
    p.add_argument("--rounds", type=int, default=3,
                   help="each round injects every kind of fault once (default %(default)s)")
    p.add_argument("--nodes", type=int, default=3, help="compute nodes, capacity 2 each")
    p.add_argument("--node-timeout", type=float, default=2.0, metavar="SECONDS",
                   help="the master's node timeout (default %(default)s)")
    p.add_argument("--max-attempts", type=int, default=5,
                   help="the master's attempts per task (default %(default)s)")
    p.add_argument("--fail-rate", type=float, default=0.01,
                   help="share of tasks that fail on purpose (default %(default)s)")
    p.add_argument("--sleep-share", type=float, default=0.35,
                   help="share of tasks that sleep; the rest echo (default %(default)s)")
    p.add_argument("--sleeps", type=_seconds_list, default=SLEEPS, metavar="S,S,...",
                   help="durations the sleep tasks draw from (default "
                        f"{','.join(f'{v:g}' for v in SLEEPS)})")
    p.add_argument("--window", type=int, default=0,
                   help="tasks submitted ahead of outcomes (default: tasks/5, at least 100)")
    p.add_argument("--duration", type=float, default=0.0, metavar="SECONDS",
                   help="spread submissions and faults over this long (default: 4 s per "
                        "fault + 5 s)")
    p.add_argument("--timeout", type=float, default=900.0, metavar="SECONDS",
                   help="give up after this long (default %(default)s)")
    p.add_argument("--workdir", help="keep logs and the journal here (default: a temporary "
                                     "directory, removed afterwards)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tasks < 1 or args.rounds < 0 or args.nodes < 1:
        print("fault_run: --tasks and --nodes must be at least 1, --rounds at least 0",
              file=sys.stderr)
        return 2
    report = run(args)
    print(json.dumps(report) if args.json else summary(report), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
