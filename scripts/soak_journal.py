#!/usr/bin/env python3
"""Soak of the master's journal: many tasks through a real master and nodes, with a short
result TTL, and the journal's size over time.

`master-node serve --result-ttl` deletes finished tasks from the journal a TTL after they end
and hands the freed pages back, so in a long run the journal holds about (rate x TTL) tasks
however many went through. This script pushes `--tasks` no-op tasks (1,000,000 by default)
through `master-node serve` (its embedded broker, or `--broker`) and `--nodes` compute nodes,
keeping two windows of tasks in flight, and prints at every `--every` seconds: tasks done,
the rate, the journal's rows, database and log sizes, and the master's memory. At the end it
waits for the last tasks to expire and prints the peak and final figures (JSON with --json).

    python3 scripts/soak_journal.py --tasks 20000 --ttl 1s
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

for _path in (str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)):
    if _path not in sys.path:  # run as a script from a checkout: this checkout's packages
        sys.path.insert(0, _path)

from bench.procs import (REPO, Children, console_script, free_port, rss_bytes,  # noqa: E402
                         wait_for)

__all__ = ["journal_figures", "main"]


def journal_figures(path: Path) -> dict[str, int]:
    """Rows, database and log bytes of a journal another process writes (read-only)."""
    wal = Path(f"{path}-wal")
    rows = -1
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
        try:
            rows = db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        pass  # not there yet, or busy: the next sample reads it
    return {"rows": rows, "db_bytes": path.stat().st_size if path.exists() else 0,
            "wal_bytes": wal.stat().st_size if wal.exists() else 0}


def _mib(n: int) -> str:
    return f"{n / 2**20:7.2f}"


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from master.client import FabricClient
    from master.retention import parse_duration

    ttl = parse_duration(args.ttl, option="--ttl")
    root = f"soak{uuid.uuid4().hex[:6]}"
    state = work / "state"
    journal = state / "master.sqlite3"
    live = not args.json  # a line per sample as it comes
    with Children(work) as children:
        master_cmd = console_script("master-node", "master.cli") + [
            "--log-level", "WARNING", "serve", "--state", str(state), "--root", root,
            "--result-ttl", args.ttl, "--snapshot-interval", "0"]
        if args.broker:
            master_cmd += ["--broker", args.broker]
        else:
            master_cmd += ["--config", str(REPO / "broker.conf"), "--port", str(free_port())]
        master = children.start("master", master_cmd, stdout_pipe=True)
        url = args.broker or master.read_line_with("master ready on", 60).split(
            "master ready on", 1)[1].strip()
        if args.broker:
            master.read_line_with("master ready on", 60)
        node_cmd = console_script("compute-node", "node.cli") + ["--log-level", "WARNING"]
        for i in range(args.nodes):
            children.start(f"node-{i}", node_cmd + ["--broker", url, "--root", root,
                                                    "--id", f"soak-{i}", "--capacity",
                                                    str(args.capacity)])
        samples: list[dict[str, Any]] = []
        started = time.monotonic()
        done = 0

        def sample() -> dict[str, Any]:
            now = time.monotonic() - started
            figures = journal_figures(journal)
            last = samples[-1] if samples else {"t": 0.0, "done": 0}
            span = now - last["t"]
            entry = {"t": round(now, 2), "done": done,
                     "rate": round((done - last["done"]) / span, 1) if span > 0 else 0.0,
                     **figures, "master_rss_bytes": rss_bytes(master.pid)}
            samples.append(entry)
            if live:
                print(f"{entry['t']:8.1f}s {done:>10,} done {entry['rate']:>9,.0f}/s "
                      f"rows {figures['rows']:>9,}  db {_mib(figures['db_bytes'])} MiB  "
                      f"wal {_mib(figures['wal_bytes'])} MiB  master rss "
                      f"{_mib(entry['master_rss_bytes'])} MiB", flush=True)
            return entry

        client = FabricClient(broker_url=url, root=root).start(timeout=20)
        try:
            wait_for(lambda: sum(n["status"] in ("ready", "busy") for n in client.nodes())
                     >= args.nodes, 60, f"{args.nodes} ready nodes", interval=0.1)
            sample()
            next_sample = time.monotonic() + args.every
            in_flight: list[list[Any]] = []
            submitted = 0
            while done < args.tasks:
                while submitted < args.tasks and len(in_flight) < 2:
                    count = min(args.window, args.tasks - submitted)
                    in_flight.append(client.submit_many([("noop", [], {}, 5)] * count,
                                                        ack_timeout=120.0))
                    submitted += count
                for handle in in_flight.pop(0):
                    handle.result(timeout=120.0)
                    done += 1
                if time.monotonic() >= next_sample:
                    sample()
                    next_sample = time.monotonic() + args.every
            wall = time.monotonic() - started
            sample()
            # the last tasks expire a TTL after they end (plus a sweep): wait for it, bounded
            deadline = time.monotonic() + ttl + 30.0
            while ttl > 0 and time.monotonic() < deadline:
                if journal_figures(journal)["rows"] == 0:
                    break
                time.sleep(0.2)
            final = sample()
            status = client.status()
        finally:
            client.close()
    body = samples[1:]
    return {"tasks": args.tasks, "ttl_s": ttl, "nodes": args.nodes, "seconds": round(wall, 1),
            "tasks_per_s": round(args.tasks / wall, 1),
            "peak_rows": max(s["rows"] for s in body),
            "peak_db_bytes": max(s["db_bytes"] for s in body),
            "peak_wal_bytes": max(s["wal_bytes"] for s in body),
            "peak_master_rss_bytes": max(s["master_rss_bytes"] for s in body),
            "final": final, "status": status, "samples": samples}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=1_000_000, help="no-op tasks (default %(default)s)")
    p.add_argument("--ttl", default="5s",
                   help="the master's --result-ttl (default %(default)s)")
    p.add_argument("--nodes", type=int, default=2, help="compute nodes (default %(default)s)")
    p.add_argument("--capacity", type=int, default=1,
                   help="worker threads per node (default %(default)s)")
    p.add_argument("--window", type=int, default=5000,
                   help="tasks per submission; two are in flight (default %(default)s)")
    p.add_argument("--every", type=float, default=5.0, metavar="SECONDS",
                   help="seconds between samples (default %(default)s)")
    p.add_argument("--broker", metavar="URL",
                   help="an external broker for the master and nodes (default: the embedded one)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON at the end")
    args = p.parse_args(argv)
    if args.tasks < 1 or args.window < 1 or args.nodes < 1 or args.every <= 0:
        p.error("--tasks, --window and --nodes must be at least 1, --every above 0")
    with tempfile.TemporaryDirectory(prefix="soak-journal-") as tmp:
        out = run(args, Path(tmp))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{out['tasks']:,} tasks in {out['seconds']} s ({out['tasks_per_s']:,.0f}/s), "
              f"TTL {args.ttl}: peak {out['peak_rows']:,} rows, db {_mib(out['peak_db_bytes'])} "
              f"MiB, wal {_mib(out['peak_wal_bytes'])} MiB, master rss "
              f"{_mib(out['peak_master_rss_bytes'])} MiB; after the last expired: "
              f"{out['final']['rows']:,} rows, db {_mib(out['final']['db_bytes'])} MiB "
              f"(expired {out['status'].get('expired', 0):,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
