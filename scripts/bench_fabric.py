"""Speed of the fabric in one run, side by side on the embedded broker and on mosquitto.

For each broker, with `master-node serve` and 2 compute nodes (defaults: capacity 1, adaptive
prefetch) started as a user starts them:

1. throughput: N no-op tasks through FabricClient.submit_many, tasks/s from the first submit
   to the last result in the submitter, and the CPU each process spent;
2. single-task round trip, p50/p99 over sequential tasks: FabricClient.submit(...).result()
   (client -> broker -> master -> broker -> node and back: four trips through the broker),
   and MasterNodeTransport.submit(...).result() in this process, a master of its own on the
   same broker with its own nodes (master -> broker -> node and back: two trips, as many as
   the raw request/reply below);
3. the CLI: `master-node submit noop` as a subprocess (per invocation, interpreter start
   included), and the same command's code path run in this process;
4. the broker alone: a QoS 1 request/reply round trip between two clients of the same MQTT
   session code, so the fabric's overhead over its own transport shows as a ratio. The three
   round trips (raw, FabricClient, master API) are taken in turns, in blocks, so a machine
   whose speed drifts during the run weighs on each alike.

Then, with --peers, Dramatiq and Huey over Redis on the same workload (installed on demand,
for the benchmark only), and the prime job of scripts/bench_prime_job.py (1,000,000 numbers,
1 and 2 nodes, against the routine alone in pure Python and, when installed, with gmpy2). A progress line per step goes to stderr; a table (or --json) to
stdout at the end.

    python scripts/bench_fabric.py [--tasks 100000] [--rtt-count 2000] [--cli-count 10]
        [--nodes 2] [--brokers embedded,mosquitto] [--peers] [--peer-tasks 20000]
        [--peer-rtt-count 500] [--prime-count 1000000 | --no-prime-job] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

_SCRIPTS = Path(__file__).resolve().parent
for _path in (str(_SCRIPTS.parent), str(_SCRIPTS)):
    if _path not in sys.path:  # run as a script from a checkout
        sys.path.insert(0, _path)

from bench.fabric_run import BROKERS, each_broker, start_master  # noqa: E402
from bench.procs import (REPO, Children, console_script, cpu_seconds, rss_bytes,  # noqa: E402
                         wait_for)
from bench.raw_rtt import RequestReply  # noqa: E402
from bench.stats import Progress, latency_summary, machine, stop_on_sigterm  # noqa: E402

# the performance targets: throughput at least 15x the best peer, a FabricClient round trip
# no slower than Huey's p50 with p99 at most 2x p50, `master-node submit` under 100 ms, the
# prime job on 2 nodes at least 1.7x the routine alone (1,000 simulated nodes: simulate_nodes.py)
TARGETS = {"peer_factor": 15.0, "rtt_p99_factor": 2.0, "cli_p50_ms": 100.0,
           "prime_job_factor": 1.7}


# -- one broker ------------------------------------------------------------------------------

class FabricUnderTest:
    """`master-node serve` and compute nodes on one broker, stopped by their handles."""

    def __init__(self, kind: str, *, nodes: int, work: Path, children: Children) -> None:
        self.kind = kind
        self.root = f"bench{uuid.uuid4().hex[:6]}"
        self.children = children
        started = start_master(kind, children, root=self.root, state=work / f"state-{kind}",
                               log_dir=work)
        self.master, self.url, self.broker_pids = (started.master, started.url,
                                                   started.broker_pids)
        node_cmd = console_script("compute-node", "node.cli") + ["--log-level", "WARNING"]
        self.nodes = [children.start(f"node-{kind}-{i}", node_cmd + [
            "--broker", self.url, "--root", self.root, "--id", f"bench-{i}"])
            for i in range(nodes)]

    def pids(self) -> dict[str, list[int]]:
        return {"master": [self.master.pid], "broker": self.broker_pids,
                "nodes": [n.pid for n in self.nodes]}


def _cpu(pids: dict[str, list[int]]) -> dict[str, float]:
    return {name: sum(cpu_seconds(p) for p in group) for name, group in pids.items()}


def measure_broker(kind: str, args: argparse.Namespace, work: Path,
                   progress: Progress) -> dict[str, Any]:
    from master.client import FabricClient

    out: dict[str, Any] = {"broker": kind}
    log_dir = work / kind
    log_dir.mkdir(exist_ok=True)
    with Children(log_dir) as children:
        progress.step(f"{kind}: starting master-node serve and {args.nodes} compute nodes")
        fabric = FabricUnderTest(kind, nodes=args.nodes, work=work, children=children)
        out["url"] = fabric.url
        client = FabricClient(broker_url=fabric.url, root=fabric.root).start(timeout=20)
        try:
            wait_for(lambda: sum(n["status"] == "ready" for n in client.nodes()) >= args.nodes,
                     60, f"{args.nodes} ready nodes", interval=0.1)
            out["throughput"] = _throughput(client, fabric, args.tasks, progress)
            out.update(_round_trips(client, fabric, args, work, progress))
        finally:
            client.close()
        out["cli"] = _cli_round_trips(fabric, args, progress)
        raw = out["raw_request_reply"]["p50_ms"]
        out["rtt_ratio_p50"] = round(out["round_trip_api"]["p50_ms"] / raw, 2)
        out["rtt_ratio_master_api_p50"] = round(out["round_trip_master_api"]["p50_ms"] / raw, 2)
    return out


def _throughput(client: Any, fabric: FabricUnderTest, tasks: int,
                progress: Progress) -> dict[str, Any]:
    progress.step(f"{fabric.kind}: {tasks:,} no-op tasks through FabricClient.submit_many")
    pids = fabric.pids()
    before = _cpu(pids)
    client_cpu = time.process_time()  # this process: the submitter's threads
    started = time.perf_counter()
    handles = client.submit_many([("noop", [], {}, 5)] * tasks, ack_timeout=max(60.0, tasks / 500))
    submitted = time.perf_counter()
    deadline = time.monotonic() + max(120.0, tasks / 200)
    for handle in handles:
        handle.result(timeout=max(0.1, deadline - time.monotonic()))
    finished = time.perf_counter()
    wall = finished - started
    spent = {name: round(cpu - before[name], 2) for name, cpu in _cpu(pids).items()}
    spent["client"] = round(time.process_time() - client_cpu, 2)
    figures = {"tasks": tasks, "tasks_per_s": round(tasks / wall, 1),
               "submit_s": round(submitted - started, 3), "total_s": round(wall, 3),
               "cpu_s": spent, "cpu_cores": {k: round(v / wall, 2) for k, v in spent.items()},
               "master_rss_mb": round(rss_bytes(fabric.master.pid) / 2**20, 1)}
    progress.step(f"{fabric.kind}: {figures['tasks_per_s']:,.0f} tasks/s "
                  f"(CPU cores: {', '.join(f'{k} {v}' for k, v in figures['cpu_cores'].items())})")
    return figures


def _round_trips(client: Any, fabric: FabricUnderTest, args: argparse.Namespace, work: Path,
                 progress: Progress) -> dict[str, Any]:
    """Sequential single-task round trips three ways, taken in turns in blocks so that each
    sees the same moments of a machine whose speed drifts: the raw broker request/reply,
    FabricClient.submit().result(), and MasterNodeTransport.submit().result() in this process
    (a master of its own on the same broker, with its own nodes: a program embedding the
    master skips the client's two trips through the broker)."""
    from master.transport import MasterNodeTransport

    kind, count = fabric.kind, args.rtt_count
    root = f"{fabric.root}-api"
    master = MasterNodeTransport(broker_url=fabric.url, root=root, master_id="bench-master",
                                 state_dir=work / f"state-{kind}-api")
    master.start(timeout=20)
    node_cmd = console_script("compute-node", "node.cli") + ["--log-level", "WARNING"]
    nodes = [fabric.children.start(f"api-node-{kind}-{i}", node_cmd + [
        "--broker", fabric.url, "--root", root, "--id", f"api-{i}"]) for i in range(args.nodes)]

    def timed(submit: Any, times: int) -> list[float]:
        out = []
        for _ in range(times):
            started = time.perf_counter()
            submit("noop").result(timeout=30)
            out.append(time.perf_counter() - started)
        return out

    samples: dict[str, list[float]] = {"raw_request_reply": [], "round_trip_api": [],
                                       "round_trip_master_api": []}
    try:
        wait_for(lambda: len(master.get_nodes_by_status("ready")) >= args.nodes, 60,
                 f"{args.nodes} ready nodes", interval=0.1)
        with RequestReply(fabric.url) as raw:
            ways = {"raw_request_reply": raw.measure,
                    "round_trip_api": lambda n: timed(client.submit, n),
                    "round_trip_master_api": lambda n: timed(master.submit, n)}
            for way in ways.values():  # warm-up, not counted
                way(min(50, count))
            blocks = max(1, min(10, count // 100))
            progress.step(f"{kind}: {count:,} sequential round trips each way, in {blocks} "
                          "turns: raw broker, FabricClient, master API")
            for block in range(blocks):
                size = count // blocks + (1 if block < count % blocks else 0)
                for name, way in ways.items():
                    samples[name] += way(size)
    finally:
        for node in nodes:
            node.stop()
        master.stop(quiet=True)
    out = {name: latency_summary(values) for name, values in samples.items()}
    progress.step(f"{kind}: p50/p99 ms: raw {out['raw_request_reply']['p50_ms']}/"
                  f"{out['raw_request_reply']['p99_ms']}, FabricClient "
                  f"{out['round_trip_api']['p50_ms']}/{out['round_trip_api']['p99_ms']}, "
                  f"master API {out['round_trip_master_api']['p50_ms']}/"
                  f"{out['round_trip_master_api']['p99_ms']}")
    return out


def _cli_round_trips(fabric: FabricUnderTest, args: argparse.Namespace,
                     progress: Progress) -> dict[str, Any]:
    from master.cli import main as cli_main

    command = ["submit", "noop", "--broker", fabric.url, "--root", fabric.root]
    out: dict[str, Any] = {}
    if args.cli_count > 0:
        progress.step(f"{fabric.kind}: `master-node submit noop` as a subprocess "
                      f"x {args.cli_count}")
        argv = console_script("master-node", "master.cli") + command
        latencies = []
        for _ in range(args.cli_count):
            started = time.perf_counter()
            done = subprocess.run(argv, cwd=str(REPO), capture_output=True, timeout=60)
            latencies.append(time.perf_counter() - started)
            if done.returncode != 0:
                raise RuntimeError(f"master-node submit failed: {done.stderr.decode()[-500:]}")
        out["subprocess"] = latency_summary(latencies)
        progress.step(f"{fabric.kind}: CLI subprocess p50 {out['subprocess']['p50_ms']} ms")
    count = max(0, min(args.rtt_count, 100))
    if count:
        latencies = []
        for _ in range(count + 3):
            started = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                code = cli_main(["--log-level", "WARNING"] + command)
            latencies.append(time.perf_counter() - started)
            if code != 0:
                raise RuntimeError(f"master-node submit (in process) exited {code}")
        out["in_process"] = latency_summary(latencies[3:])
        progress.step(f"{fabric.kind}: CLI code path in process p50 "
                      f"{out['in_process']['p50_ms']} ms (connect, submit, wait, disconnect)")
    return out


# -- extras ----------------------------------------------------------------------------------

def prime_job(count: int, progress: Progress) -> dict[str, Any] | None:
    script = _SCRIPTS / "bench_prime_job.py"
    if not script.is_file():
        progress.step("prime job: scripts/bench_prime_job.py not present, skipped")
        return None
    progress.step(f"prime job: bench_prime_job.py --count {count:,}")
    try:
        done = subprocess.run([sys.executable, str(script), "--count", str(count), "--json"],
                              cwd=str(REPO), capture_output=True, timeout=1800)
        report = json.loads(done.stdout)
    except (subprocess.TimeoutExpired, ValueError) as e:
        return {"error": f"bench_prime_job.py failed: {e}"}
    summary: dict[str, Any] = {"count": count}
    try:
        routines = report["routine"]["routines"]
        summary["routine_per_s"] = round(routines[report["reference"]]["per_second"], 1)
        summary["reference"] = report["reference"]
        summary["pure_routine_per_s"] = round(routines["is_prime_pure"]["per_second"], 1)
        summary["jobs"] = [{"nodes": j["nodes"], "per_s": round(j["per_second"], 1),
                            "vs_routine": round(j["ratio_vs_routine"], 3),
                            "vs_pure_routine": round(j["ratio_vs_pure_routine"], 3),
                            "correct": j.get("correct")} for j in report["jobs"]]
    except (KeyError, TypeError) as e:
        summary["error"] = f"unexpected report shape: {e}"
    return summary


# -- verdicts and the table --------------------------------------------------------------------

def verdicts(report: dict[str, Any]) -> dict[str, Any]:
    """Each target of the performance work with its figure from this run and whether it was
    met: throughput against the best peer, the FabricClient round trip against Huey's p50 on
    each broker with its p99 within twice its p50, the CLI under 100 ms, and the prime job on
    2 nodes against the routine alone (pure Python, and gmpy2 when installed)."""
    out: dict[str, Any] = {}
    embedded = report["brokers"].get("embedded", {})
    peers = report.get("peers") or {}
    best = max((p["tasks_per_s"] for p in peers.values()
                if isinstance(p, dict) and "tasks_per_s" in p), default=None)
    if "throughput" in embedded and best:
        factor = round(embedded["throughput"]["tasks_per_s"] / best, 2)
        out["throughput_embedded_vs_best_peer"] = {
            "figure": factor, "target": TARGETS["peer_factor"],
            "met": factor >= TARGETS["peer_factor"]}
    huey = peers.get("huey", {}).get("round_trip")
    for kind, figures in report["brokers"].items():
        rtt = figures.get("round_trip_api")
        if rtt:
            if huey:
                out[f"rtt_p50_ms_{kind}_vs_huey_p50"] = {
                    "figure": rtt["p50_ms"], "target": huey["p50_ms"],
                    "met": rtt["p50_ms"] <= huey["p50_ms"]}
            spread = round(rtt["p99_ms"] / rtt["p50_ms"], 2)
            out[f"rtt_p99_over_p50_{kind}"] = {"figure": spread,
                                               "target": TARGETS["rtt_p99_factor"],
                                               "met": spread <= TARGETS["rtt_p99_factor"]}
        cli = (figures.get("cli") or {}).get("subprocess")
        if cli:
            out[f"cli_submit_p50_ms_{kind}"] = {"figure": cli["p50_ms"],
                                                "target": TARGETS["cli_p50_ms"],
                                                "met": cli["p50_ms"] < TARGETS["cli_p50_ms"]}
    job = report.get("prime_job") or {}
    two = next((j for j in job.get("jobs", []) if j["nodes"] == 2), None)
    if two is not None:
        factor = TARGETS["prime_job_factor"]
        out["prime_job_2_nodes_vs_pure_routine"] = {
            "figure": two["vs_pure_routine"], "target": factor,
            "met": two["vs_pure_routine"] >= factor and two.get("correct", True)}
        if "gmpy2" in str(job.get("reference")):
            out["prime_job_2_nodes_vs_gmpy2_routine"] = {
                "figure": two["vs_routine"], "target": factor,
                "met": two["vs_routine"] >= factor and two.get("correct", True)}
    return out


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def format_table(report: dict[str, Any]) -> str:
    kinds = [k for k in report["brokers"]]
    width = 46
    head = f"{'':<{width}}" + "".join(f"{k:>16}" for k in kinds)
    m = report["machine"]
    lines = [f"Fabric benchmark: {report['args']['nodes']} compute nodes (defaults), "
             f"{report['args']['tasks']:,} no-op tasks, {report['args']['rtt_count']:,} round "
             f"trips; {m['cpus']} CPUs, load average {m['load_average']} at start, "
             f"{report.get('load_average_end')} at end", "", head]

    def row(label: str, pick: Any) -> None:
        cells = []
        for kind in kinds:
            try:
                cells.append(_fmt(pick(report["brokers"][kind])))
            except (KeyError, TypeError):
                cells.append("-")
        lines.append(f"{label:<{width}}" + "".join(f"{c:>16}" for c in cells))

    row("no-op tasks/s (2 nodes, first submit..last)", lambda b: b["throughput"]["tasks_per_s"])
    row("  CPU cores: master", lambda b: b["throughput"]["cpu_cores"]["master"])
    row("  CPU cores: broker", lambda b: b["throughput"]["cpu_cores"]["broker"])
    row("  CPU cores: nodes (sum)", lambda b: b["throughput"]["cpu_cores"]["nodes"])
    row("  CPU cores: client (submitter)", lambda b: b["throughput"]["cpu_cores"]["client"])
    row("round trip p50 ms, FabricClient", lambda b: b["round_trip_api"]["p50_ms"])
    row("round trip p99 ms, FabricClient", lambda b: b["round_trip_api"]["p99_ms"])
    row("round trip p50 ms, master API (in master)",
        lambda b: b["round_trip_master_api"]["p50_ms"])
    row("round trip p99 ms, master API (in master)",
        lambda b: b["round_trip_master_api"]["p99_ms"])
    row("raw broker QoS1 request/reply p50 ms", lambda b: b["raw_request_reply"]["p50_ms"])
    row("raw broker QoS1 request/reply p99 ms", lambda b: b["raw_request_reply"]["p99_ms"])
    row("fabric p50 / raw p50, FabricClient", lambda b: b["rtt_ratio_p50"])
    row("fabric p50 / raw p50, master API", lambda b: b["rtt_ratio_master_api_p50"])
    row("CLI subprocess p50 ms (incl. interpreter)", lambda b: b["cli"]["subprocess"]["p50_ms"])
    row("CLI code path in process p50 ms", lambda b: b["cli"]["in_process"]["p50_ms"])
    for kind in kinds:
        if "error" in report["brokers"][kind]:
            lines.append(f"  {kind}: {report['brokers'][kind]['error']}")
    peers = report.get("peers")
    if peers:
        lines += ["", f"Peers over Redis, {peers.get('workers')} worker processes, "
                      f"{peers.get('tasks', 0):,} no-op tasks:",
                  f"{'':<{width}}{'tasks/s':>16}{'p50 ms':>16}{'p99 ms':>16}"]
        for name in ("dramatiq", "huey"):
            p = peers.get(name) or {}
            if "error" in p:
                lines.append(f"{name:<{width}}  failed: {p['error']}")
                continue
            rt = p.get("round_trip", {})
            lines.append(f"{name:<{width}}{_fmt(p.get('tasks_per_s')):>16}"
                         f"{_fmt(rt.get('p50_ms')):>16}{_fmt(rt.get('p99_ms')):>16}")
    job = report.get("prime_job")
    if job:
        lines += ["", f"Prime job (bench_prime_job.py, {job.get('count', 0):,} numbers):"]
        if "error" in job:
            lines.append(f"  {job['error']}")
        else:
            lines.append(f"  routine alone: {_fmt(job.get('pure_routine_per_s'))} numbers/s "
                         f"in pure Python, {_fmt(job.get('routine_per_s'))} with "
                         f"{job.get('reference')}")
            for j in job.get("jobs", []):
                lines.append(f"  fabric, {j['nodes']} node(s): {_fmt(j['per_s'])} numbers/s, "
                             f"{j['vs_pure_routine']}x the pure routine, "
                             f"{j['vs_routine']}x {job.get('reference')}"
                             + ("" if j.get("correct", True) else "  (wrong count!)"))
    lines += ["", "Targets:"]
    for name, v in report["verdicts"].items():
        lines.append(f"  {name:<40} {_fmt(v['figure']):>12}  target {_fmt(v['target']):>8}  "
                     f"{'met' if v['met'] else 'NOT met'}")
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------

def run(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": machine(), "args": {
        "tasks": args.tasks, "rtt_count": args.rtt_count, "cli_count": args.cli_count,
        "nodes": args.nodes, "brokers": args.brokers}, "brokers": {}}
    report["brokers"] = each_broker(
        args.brokers, lambda kind, work: measure_broker(kind, args, work, progress),
        prefix="bench-fabric-", progress=progress)
    if args.peers:
        from bench.peers import run_peers
        report["peers"] = run_peers(tasks=args.peer_tasks, rtt_count=args.peer_rtt_count,
                                    workers=args.nodes, progress=progress)
    if not args.no_prime_job:
        report["prime_job"] = prime_job(args.prime_count, progress)
    report["load_average_end"] = machine()["load_average"]
    report["verdicts"] = verdicts(report)
    return report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=100_000, help="no-op tasks for throughput")
    p.add_argument("--rtt-count", type=int, default=2_000, help="sequential round trips")
    p.add_argument("--cli-count", type=int, default=10,
                   help="`master-node submit` subprocess invocations (0 to skip)")
    p.add_argument("--nodes", type=int, default=2, help="compute nodes (and peer workers)")
    p.add_argument("--brokers", default=",".join(BROKERS),
                   help="comma-separated: embedded, mosquitto (default both)")
    p.add_argument("--peers", action="store_true",
                   help="also measure Dramatiq and Huey over Redis (installs them if missing)")
    p.add_argument("--peer-tasks", type=int, default=20_000)
    p.add_argument("--peer-rtt-count", type=int, default=500)
    p.add_argument("--prime-count", type=int, default=1_000_000,
                   help="numbers for bench_prime_job.py when present")
    p.add_argument("--no-prime-job", action="store_true", help="skip the prime job")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    args.brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    unknown = set(args.brokers) - set(BROKERS)
    if unknown:
        p.error(f"unknown broker(s): {', '.join(sorted(unknown))}")
    if args.tasks < 1 or args.rtt_count < 1 or args.nodes < 1:
        p.error("--tasks, --rtt-count and --nodes must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    progress = Progress("bench", quiet=args.quiet)
    report = run(args, progress)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    failed = [k for k, b in report["brokers"].items() if "error" in b]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
