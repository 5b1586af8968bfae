"""Many simulated nodes against a real master: what heartbeats and bookkeeping cost it.

One process (the swarm) runs N simulated nodes as asyncio MQTT clients: each publishes its
retained birth status and heartbeats as the fabric's NodeStatus JSON (will `dead`), subscribes
to its task topic and answers every TaskBatch with a ResultBatch (noop and echo). Against it,
on the embedded broker and on mosquitto side by side, a real `master-node serve`:

1. connect: how long until every node is connected and the master counts them all;
2. idle: the master's CPU share (from /proc/<pid>/stat) and memory with only heartbeats;
3. tasks: no-op tasks submitted through FabricClient, spread over all the nodes; tasks/s and
   the master's CPU share meanwhile.

Last comes the target line, from this one run: the embedded broker's tasks/s at least 0.8 x
mosquitto's, no task answered twice (the master's duplicates), the idle master under half a
core.

    python scripts/simulate_nodes.py [--nodes 1000] [--idle 10] [--tasks 20000]
        [--heartbeat 1.0] [--brokers embedded,mosquitto] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
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
from bench.procs import Children, cpu_seconds, rss_bytes, wait_for  # noqa: E402
from bench.stats import Progress, machine, stop_on_sigterm  # noqa: E402

HALF_A_CORE = 0.5
THROUGHPUT_RATIO = 0.8  # the embedded broker's swarm throughput against mosquitto's, at least


# -- the swarm (a child process) -------------------------------------------------------------

class SimulatedNode:
    """A node as the master sees one: status, heartbeats, tasks in, results out."""

    def __init__(self, node_id: str, *, root: str, heartbeat: float, prefetch: int) -> None:
        from core.protocol import NodeStatus
        from core.topics import Topics
        from bench.mqtt_lite import MqttLite

        self.node_id = node_id
        self.topics = Topics(root)
        self.heartbeat = heartbeat
        self.prefetch = prefetch
        self.instance = uuid.uuid4().hex[:12]
        self.done = 0
        self._status_topic = self.topics.node_status(node_id)
        self._results_topic = self.topics.results(node_id)
        dead = NodeStatus(node_id=node_id, status="dead", capacity=1, prefetch=prefetch,
                          instance=self.instance, heartbeat=heartbeat).encode()
        self.client = MqttLite(node_id, on_message=self._on_task, keepalive=60,
                               will=(self._status_topic, dead, 1, True))

    def status(self, state: str) -> bytes:
        from core.protocol import NodeStatus
        return NodeStatus(node_id=self.node_id, status=state, capacity=1, prefetch=self.prefetch,
                          instance=self.instance, tasks_done=self.done, heartbeat=self.heartbeat,
                          ts=round(time.time(), 3), tasks="noop,echo").encode()

    async def join(self, host: str, port: int) -> None:
        await self.client.connect(host, port)
        await self.client.subscribe(self.topics.node_tasks(self.node_id), qos=1)
        self.client.publish(self._status_topic, self.status("ready"), retain=True)

    async def beat(self) -> None:
        await asyncio.sleep(random.uniform(0, self.heartbeat))  # spread the swarm's beats
        while not self.client.closed.is_set():
            self.client.publish(self._status_topic, self.status("ready"), retain=True)
            await asyncio.sleep(self.heartbeat)

    def _on_task(self, _topic: str, payload: bytes) -> None:
        from core.errors import DecodeError
        from core.protocol import ResultBatch, TaskBatch, result_for, decode_message
        try:
            batch = decode_message(payload)
        except DecodeError:
            return
        if not isinstance(batch, TaskBatch):
            return
        now = time.time()
        results = []
        for task in batch.tasks:
            if task.name == "noop":
                results.append(result_for(task, True, None, ts=now))
            elif task.name == "echo":
                results.append(result_for(task, True, task.args[0] if task.args else None,
                                          ts=now))
            else:
                results.append(result_for(task, False, error={
                    "kind": "unknown_task", "message": f"no task named {task.name!r}"}, ts=now))
        self.done += len(results)
        self.client.publish(self._results_topic, ResultBatch(
            node_id=self.node_id, results=tuple(results), instance=self.instance).encode())


async def run_swarm(args: argparse.Namespace) -> int:
    from core.url import parse_broker_url
    url = parse_broker_url(args.broker)
    nodes = [SimulatedNode(f"sim-{i:05d}", root=args.root, heartbeat=args.heartbeat,
                           prefetch=args.prefetch) for i in range(args.nodes)]
    gate = asyncio.Semaphore(args.connect_concurrency)

    async def join(node: SimulatedNode) -> None:
        async with gate:
            await node.join(url.host, url.port)

    started = time.monotonic()
    await asyncio.gather(*(join(n) for n in nodes))
    print(f"swarm ready {len(nodes)} {time.monotonic() - started:.3f}", flush=True)
    beats = [asyncio.create_task(n.beat()) for n in nodes]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for task in beats:
        task.cancel()
    await asyncio.gather(*(n.client.disconnect() for n in nodes), return_exceptions=True)
    print(f"swarm done {sum(n.done for n in nodes)}", flush=True)
    return 0


# -- the coordinator -------------------------------------------------------------------------

def measure(kind: str, args: argparse.Namespace, work: Path, progress: Progress) -> dict[str, Any]:
    from master.client import FabricClient

    root = f"sim{uuid.uuid4().hex[:6]}"
    log_dir = work / kind
    log_dir.mkdir(exist_ok=True)
    out: dict[str, Any] = {"broker": kind, "nodes": args.nodes}
    with Children(log_dir) as children:
        launched = start_master(kind, children, root=root, state=work / f"state-{kind}",
                                log_dir=log_dir)
        master, url, broker_pids = launched.master, launched.url, launched.broker_pids
        progress.step(f"{kind}: connecting {args.nodes} simulated nodes")
        started = time.monotonic()
        swarm = children.start("swarm", [sys.executable, str(Path(__file__).resolve()), "swarm",
                                         "--broker", url, "--root", root, "--nodes",
                                         str(args.nodes), "--heartbeat", str(args.heartbeat),
                                         "--prefetch", str(args.prefetch)], stdout_pipe=True)
        line = swarm.read_line_with("swarm ready", max(60.0, args.nodes / 10))
        out["connect_s"] = round(float(line.split()[3]), 2)
        client = FabricClient(broker_url=url, root=root).start(timeout=20)
        try:
            wait_for(lambda: client.status()["nodes_total"] >= args.nodes,
                     max(60.0, args.nodes / 10), f"the master to count {args.nodes} nodes",
                     interval=0.2)
            out["all_known_s"] = round(time.monotonic() - started, 2)
            progress.step(f"{kind}: {args.nodes} nodes known to the master after "
                          f"{out['all_known_s']} s; idle for {args.idle:g} s")
            pids = {"master": [master.pid], "broker": broker_pids, "swarm": [swarm.pid]}
            out["idle"] = _cpu_share(pids, args.idle)
            out["idle"]["master_rss_mb"] = round(rss_bytes(master.pid) / 2**20, 1)
            out["idle"]["nodes_ready"] = client.status()["nodes_ready"]
            progress.step(f"{kind}: idle master {out['idle']['cores']['master']} cores, "
                          f"RSS {out['idle']['master_rss_mb']} MB")
            if args.tasks:
                out["tasks"] = _tasks(client, args.tasks, pids, progress, kind)
            status = client.status()
            out["master_status"] = {k: status[k] for k in ("nodes_total", "nodes_ready",
                                                         "completed", "failed", "duplicates")}
        finally:
            client.close()
        swarm.stop(timeout=30)
    idle_master = out["idle"]["cores"]["master"]
    out["target_met"] = idle_master < HALF_A_CORE
    return out


def _cpu_share(pids: dict[str, list[int]], seconds: float) -> dict[str, Any]:
    before = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
    started = time.monotonic()
    time.sleep(seconds)  # the measurement window itself, not a synchronisation
    wall = time.monotonic() - started
    return {"seconds": round(wall, 2), "cores": {
        k: round((sum(cpu_seconds(p) for p in v) - before[k]) / wall, 3) for k, v in pids.items()}}


def _tasks(client: Any, count: int, pids: dict[str, list[int]], progress: Progress,
           kind: str) -> dict[str, Any]:
    from core.errors import FabricTimeout
    progress.step(f"{kind}: {count:,} no-op tasks over the swarm")
    before = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
    started = time.perf_counter()
    handles = client.submit_many([("noop", [], {}, 5)] * count, ack_timeout=max(60.0, count / 200))
    deadline = time.monotonic() + max(120.0, count / 50)
    try:
        for handle in handles:
            handle.result(timeout=max(0.1, deadline - time.monotonic()))
    except FabricTimeout as e:
        unfinished = sum(not h.done() for h in handles)
        raise RuntimeError(f"{e}; {unfinished} tasks unfinished; master says "
                           f"{client.status()}") from e
    wall = time.perf_counter() - started
    cores = {k: round((sum(cpu_seconds(p) for p in v) - before[k]) / wall, 3)
             for k, v in pids.items()}
    figures = {"tasks": count, "tasks_per_s": round(count / wall, 1), "seconds": round(wall, 2),
               "cores": cores}
    progress.step(f"{kind}: {figures['tasks_per_s']:,.0f} tasks/s, master {cores['master']} cores")
    return figures


def format_table(report: dict[str, Any]) -> str:
    kinds = list(report["brokers"])
    width = 44
    m = report["machine"]
    args = report["args"]
    lines = [f"{args['nodes']:,} simulated nodes, heartbeat {args['heartbeat']} s; "
             f"{m['cpus']} CPUs, load average {m['load_average']} at start", "",
             f"{'':<{width}}" + "".join(f"{k:>16}" for k in kinds)]

    def row(label: str, pick: Any) -> None:
        cells = []
        for kind in kinds:
            try:
                value = pick(report["brokers"][kind])
            except (KeyError, TypeError):
                value = "-"
            cells.append(f"{value:,}" if isinstance(value, (int, float)) and not
                         isinstance(value, bool) else str(value))
        lines.append(f"{label:<{width}}" + "".join(f"{c:>16}" for c in cells))

    row("seconds until all nodes connected", lambda b: b["connect_s"])
    row("seconds until the master knew them all", lambda b: b["all_known_s"])
    row("idle: master CPU cores (heartbeats)", lambda b: b["idle"]["cores"]["master"])
    row("idle: broker CPU cores", lambda b: b["idle"]["cores"]["broker"])
    row("idle: swarm CPU cores", lambda b: b["idle"]["cores"]["swarm"])
    row("idle: master RSS MB", lambda b: b["idle"]["master_rss_mb"])
    row("idle: nodes ready (master's count)", lambda b: b["idle"]["nodes_ready"])
    row("tasks/s over the swarm", lambda b: b["tasks"]["tasks_per_s"])
    row("  master CPU cores meanwhile", lambda b: b["tasks"]["cores"]["master"])
    row("  broker CPU cores meanwhile", lambda b: b["tasks"]["cores"]["broker"])
    row("tasks answered twice (master's duplicates)",
        lambda b: b["master_status"]["duplicates"])
    row("master under half a core when idle", lambda b: "met" if b["target_met"] else "NOT met")
    for kind in kinds:
        if "error" in report["brokers"][kind]:
            lines.append(f"  {kind}: {report['brokers'][kind]['error']}")
    if "targets" in report:
        lines += ["", target_line(report)]
    return "\n".join(lines)


def targets(brokers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The embedded broker's targets, judged from one run against both brokers: its swarm
    throughput at least `THROUGHPUT_RATIO` of mosquitto's, no task answered twice, and an
    idle master under half a core. A figure a broker did not produce is None, never met."""
    def pick(kind: str, *path: str) -> Any:
        value: Any = brokers.get(kind)
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    embedded, mosquitto = (pick(k, "tasks", "tasks_per_s") for k in ("embedded", "mosquitto"))
    ratio = round(embedded / mosquitto, 2) if embedded and mosquitto else None
    duplicates = {k: pick(k, "master_status", "duplicates") for k in brokers}
    idle = {k: pick(k, "idle", "cores", "master") for k in brokers}
    return {"throughput_ratio": ratio,
            "throughput_met": ratio is not None and ratio >= THROUGHPUT_RATIO,
            "duplicates": duplicates,
            "duplicates_met": bool(duplicates) and all(v == 0 for v in duplicates.values()),
            "idle_master_cores": idle,
            "idle_met": bool(idle) and all(v is not None and v < HALF_A_CORE
                                           for v in idle.values())}


def target_line(report: dict[str, Any]) -> str:
    """One line: embedded/mosquitto throughput, duplicates, idle master CPU, each judged."""
    t = report["targets"]

    def verdict(met: bool) -> str:
        return "met" if met else "NOT met"

    ratio = "-" if t["throughput_ratio"] is None else f"{t['throughput_ratio']:.2f}"
    dups = ", ".join(f"{k} {v if v is not None else '-'}" for k, v in t["duplicates"].items())
    idle = ", ".join(f"{k} {v if v is not None else '-'}"
                     for k, v in t["idle_master_cores"].items())
    return (f"target: embedded/mosquitto tasks/s {ratio} (>= {THROUGHPUT_RATIO}: "
            f"{verdict(t['throughput_met'])}); duplicates {dups or '-'} (0: "
            f"{verdict(t['duplicates_met'])}); idle master cores {idle or '-'} "
            f"(< {HALF_A_CORE}: {verdict(t['idle_met'])})")


def run(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": machine(), "args": {
        "nodes": args.nodes, "idle": args.idle, "tasks": args.tasks,
        "heartbeat": args.heartbeat, "brokers": args.brokers}, "brokers": {}}
    report["brokers"] = each_broker(
        args.brokers, lambda kind, work: measure(kind, args, work, progress),
        prefix="simulate-nodes-", progress=progress)
    report["targets"] = targets(report["brokers"])
    report["load_average_end"] = machine()["load_average"]
    return report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode")
    swarm = sub.add_parser("swarm", help="(internal) run the simulated nodes in this process")
    swarm.add_argument("--broker", required=True)
    swarm.add_argument("--root", required=True)
    swarm.add_argument("--connect-concurrency", type=int, default=50)
    for q in (p, swarm):
        q.add_argument("--nodes", type=int, default=1000, help="simulated nodes")
        q.add_argument("--heartbeat", type=float, default=1.0, help="heartbeat seconds")
        q.add_argument("--prefetch", type=int, default=1, help="prefetch each node announces")
    p.add_argument("--idle", type=float, default=10.0, help="seconds of heartbeats only")
    p.add_argument("--tasks", type=int, default=20_000, help="no-op tasks (0 to skip)")
    p.add_argument("--brokers", default="embedded,mosquitto",
                   help="comma-separated: embedded, mosquitto")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table (the "
                   "target line then goes to stderr)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    if args.mode != "swarm":
        args.brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
        if set(args.brokers) - set(BROKERS):
            p.error("--brokers takes embedded and/or mosquitto")
    if args.nodes < 1 or args.heartbeat <= 0:
        p.error("--nodes and --heartbeat must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode == "swarm":
        return asyncio.run(run_swarm(args))
    stop_on_sigterm()
    progress = Progress("simulate", quiet=args.quiet)
    report = run(args, progress)
    if args.json:
        print(json.dumps(report, indent=2))
        print(target_line(report), file=sys.stderr)  # stdout stays one JSON document
    else:
        print(format_table(report))
    return 1 if any("error" in b for b in report["brokers"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
