"""Backpressure: many more tasks than the master may queue, and what that costs in memory.

Starts a broker (embedded or mosquitto, from broker.conf) and a master with `--max-queued`,
then submits `--tasks` echo tasks from one client while no node runs: the master journals
tasks up to its bound and refuses the rest (`queue_full`), and the client resends the refused
ones with backoff, so the submitter is slowed, not failed. Once the queue has sat at its
bound for `--hold` seconds, nodes start, drain the queue, and the submitter gets through.

Measured: how many tasks the journal held as queued (sampled every 50 ms; never above the
bound), refusals, the master's and the broker's peak resident memory (the kernel's VmHWM),
and whether every task completed exactly once with its own value. With `--max-queued` at or
above `--tasks` every task is queued at once: that gives the memory of a full queue.

    python scripts/backpressure.py [--tasks 100000] [--max-queued 10000]
                                   [--broker embedded|mosquitto] [--nodes 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO / "tests") not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(_REPO / "tests"))

from support.fabric import Proc  # noqa: E402
from support.faults import (BROKER_KINDS, JournalView, RecordingClient,  # noqa: E402
                            RestartableBroker, log, mib, peak_rss_bytes, rss_bytes, stop_all,
                            wait_for)


class Sampler:
    """Samples the journal's queued count and the RSS of some processes until stopped."""

    def __init__(self, journal: JournalView, interval: float = 0.05) -> None:
        self.journal = journal
        self.interval = interval
        self.max_queued = 0
        self.samples = 0
        self.pids: dict[str, int] = {}
        self.max_rss: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.max_queued = max(self.max_queued, self.journal.queued())
            self.samples += 1
            for name, pid in list(self.pids.items()):
                self.max_rss[name] = max(self.max_rss.get(name, 0), rss_bytes(pid))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    start = time.monotonic()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="backpressure-"))
    state = workdir / "state"
    root = f"bp{uuid.uuid4().hex[:6]}"
    broker = RestartableBroker(args.broker, workdir / "broker")
    procs: list[Proc] = []
    client: RecordingClient | None = None
    sampler = Sampler(JournalView(state))
    try:
        broker.start()
        master = Proc([sys.executable, "-m", "master.cli", "serve", "--broker", broker.url,
                       "--root", root, "--state", str(state),
                       "--max-queued", str(args.max_queued)], workdir / "master.log")
        procs.append(master)
        master.wait_for_output("master ready", timeout=30)
        sampler.pids = {"master": master.pid, "broker": broker.pid}
        sampler.start()
        base = {"master": rss_bytes(master.pid), "broker": rss_bytes(broker.pid)}
        client = RecordingClient(broker_url=broker.url, root=root).start()
        log(f"{args.broker} broker, master with --max-queued {args.max_queued}; submitting "
            f"{args.tasks} tasks, no nodes yet", start=start)
        handles: list[Any] = []
        errors: list[str] = []
        submit_done = threading.Event()
        submit_seconds = [0.0]

        def submitter() -> None:
            t0 = time.monotonic()
            try:
                handles.extend(client.submit_many([("echo", [i], {}, 1 + i % 10)
                                                   for i in range(args.tasks)],
                                                  ack_timeout=args.ack_timeout))
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
            submit_seconds[0] = time.monotonic() - t0
            submit_done.set()

        threading.Thread(target=submitter, name="submitter", daemon=True).start()
        full = min(args.tasks, args.max_queued)
        if not wait_for(lambda: sampler.max_queued >= full or submit_done.is_set(),
                        args.ack_timeout, interval=0.1):
            raise RuntimeError("the queue never filled")
        log(f"queue at {sampler.max_queued}; holding {args.hold:g}s with no nodes "
            f"({client.refused} refusals so far)", start=start)
        time.sleep(args.hold)  # the bound must hold while the submitter keeps trying
        full_queue_rss = {"master": rss_bytes(master.pid), "broker": rss_bytes(broker.pid)}
        drain_start = time.monotonic()
        for k in range(args.nodes):
            procs.append(Proc([sys.executable, "-m", "node.cli", "--broker", broker.url,
                               "--root", root, "--id", f"bp{k + 1}", "--capacity", "1",
                               "--prefetch", str(args.prefetch), "--log-level", "WARNING"],
                              workdir / f"node-{k + 1}.log"))
        deadline = time.monotonic() + args.timeout
        next_report = time.monotonic() + 5.0
        while client.resolved_count() < args.tasks and time.monotonic() < deadline:
            if submit_done.is_set() and errors:
                break
            if time.monotonic() >= next_report:
                log(f"{client.resolved_count()}/{args.tasks} done, {len(handles) or 'still'} "
                    f"submitted, queued at most {sampler.max_queued}", start=start)
                next_report = time.monotonic() + 5.0
            time.sleep(0.1)
        drain_seconds = time.monotonic() - drain_start
        submit_done.wait(10.0)
        peaks = {"master": peak_rss_bytes(master.pid), "broker": peak_rss_bytes(broker.pid)}
        sampler.stop()
        client.close()
        stop_all(procs)
        broker.stop()
        report = check(args, handles, client, JournalView(state))
        report.update({
            "broker": args.broker, "max_queued_bound": args.max_queued,
            "max_queued_seen": sampler.max_queued, "queue_samples": sampler.samples,
            "refused": client.refused, "submit_errors": errors,
            "submit_seconds": round(submit_seconds[0], 1), "drain_seconds": round(drain_seconds, 1),
            "rss_mib": {
                "master_start": mib(base["master"]), "broker_start": mib(base["broker"]),
                "master_full_queue": mib(full_queue_rss["master"]),
                "broker_full_queue": mib(full_queue_rss["broker"]),
                "master_peak": mib(peaks["master"]), "broker_peak": mib(peaks["broker"]),
                "master_peak_sampled": mib(sampler.max_rss.get("master", 0)),
                "broker_peak_sampled": mib(sampler.max_rss.get("broker", 0))},
            "seconds": round(time.monotonic() - start, 1), "workdir": str(workdir)})
        report["ok"] = (not errors and report["lost"] == 0 and report["wrong"] == 0
                        and report["conflicts"] == 0 and sampler.max_queued <= args.max_queued)
        return report
    finally:
        sampler.stop()
        if client is not None:
            client.close()
        for proc in procs:
            proc.cleanup()
        broker.close()
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def check(args: argparse.Namespace, handles: list[Any], client: RecordingClient,
          journal: JournalView) -> dict[str, Any]:
    rows = journal.rows()
    completed = lost = wrong = repeats = conflicts = 0
    for i, handle in enumerate(handles):
        heard = client.outcomes.get(handle.id, [])
        row = rows.get(handle.id)
        if not heard or row is None or row.state != 2:
            lost += 1
            continue
        if len(heard) > 1:
            repeats += 1
            conflicts += any(o.value != heard[0].value for o in heard[1:])
        if heard[0].state == "completed" and heard[0].value == i:
            completed += 1
        else:
            wrong += 1
    return {"tasks": args.tasks, "submitted": len(handles), "completed": completed,
            "lost": lost + args.tasks - len(handles), "wrong": wrong, "repeats": repeats,
            "conflicts": conflicts, "journal_rows": len(rows)}


def summary(r: dict[str, Any]) -> str:
    m = r["rss_mib"]
    return "\n".join([
        f"{r['tasks']} tasks, --max-queued {r['max_queued_bound']}, {r['broker']} broker",
        f"queued at most {r['max_queued_seen']} ({r['queue_samples']} journal samples); "
        f"{r['refused']} refusals (queue_full) resent by the client",
        f"completed {r['completed']}, lost {r['lost']}, wrong value {r['wrong']}, outcomes told "
        f"twice {r['repeats']} (conflicting {r['conflicts']}), journal rows {r['journal_rows']}",
        f"submitting took {r['submit_seconds']}s, draining {r['drain_seconds']}s",
        f"RSS MiB: master {m['master_start']} at start, {m['master_full_queue']} with the queue "
        f"full, peak {m['master_peak']}; broker {m['broker_start']} at start, "
        f"{m['broker_full_queue']} with the queue full, peak {m['broker_peak']}",
        "OK" if r["ok"] else f"FAILED {r['submit_errors']}",
    ])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Submit far more tasks than the master may queue; measure the bound, the "
                    "refusals, peak memory of master and broker, and that all complete once.")
    p.add_argument("--tasks", type=int, default=100_000, help="tasks (default %(default)s)")
    p.add_argument("--max-queued", type=int, default=10_000,
                   help="the master's queue bound (default %(default)s)")
    p.add_argument("--broker", choices=BROKER_KINDS, default="embedded",
                   help="broker to run (default %(default)s)")
    p.add_argument("--nodes", type=int, default=2, help="nodes started once the queue is full")
    p.add_argument("--prefetch", type=int, default=500,
                   help="tasks each node holds ahead (default %(default)s)")
    p.add_argument("--hold", type=float, default=2.0, metavar="SECONDS",
                   help="how long the full queue waits for nodes (default %(default)s)")
    p.add_argument("--ack-timeout", type=float, default=900.0, metavar="SECONDS",
                   help="the client's limit for getting every task accepted")
    p.add_argument("--timeout", type=float, default=900.0, metavar="SECONDS",
                   help="limit for draining once nodes run (default %(default)s)")
    p.add_argument("--workdir", help="keep logs and the journal here")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tasks < 1 or args.max_queued < 1 or args.nodes < 1:
        print("backpressure: --tasks, --max-queued and --nodes must be at least 1",
              file=sys.stderr)
        return 2
    report = run(args)
    print(json.dumps(report) if args.json else summary(report), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
