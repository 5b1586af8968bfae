"""Speed of the whole prime job through the fabric, against the prime routine alone.

In one run, on the same N random 64-bit numbers (uniform below 2**64):

1. the prime routine alone, in one process (``measure_routine`` of bench_primes.py):
   ``is_prime_pure``, ``is_prime`` (gmpy2 where installed) and ``sympy.isprime``, and
   ``filter_primes`` over the whole list (the batch form the nodes run);
2. the job's work without the fabric: the numbers read from a file and tested in one process;
3. the whole job through the fabric, as a user runs it: ``master-node primes`` against
   ``master-node serve`` (embedded broker), with 1 and then 2 compute nodes.

It prints numbers/s of each, the ratio of each fabric run to the routine alone (the faster
of ``is_prime`` and ``filter_primes``, measured in the same run), the target (2 nodes at
1.7 x the routine alone) with its figure, reference and ratio, and the CPU seconds each
process spent (client, master, broker, nodes): where the time goes.

``--without-gmpy2`` runs everything (this process, the master, the nodes, the client) with
gmpy2 unimportable, so the nodes and the routine alone both take the pure-Python path.

    python scripts/bench_prime_job.py [--count 1000000] [--nodes 1,2] [--capacity 1]
        [--shard-size N] [--seed 1] [--broker URL] [--repeat 3] [--without-gmpy2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

_ROOT = Path(__file__).resolve().parent.parent
for _path in (str(_ROOT), str(_ROOT / "scripts")):
    if _path not in sys.path:  # run as a script from a checkout
        sys.path.insert(0, _path)

from bench_primes import environment, measure_routine  # noqa: E402
from core.primality import HAS_GMPY2, filter_primes, is_prime  # noqa: E402
from master.primes_job.numbers import read_numbers  # noqa: E402

_TICKS = os.sysconf("SC_CLK_TCK")
_READY_S = 60.0
TARGET_FACTOR = 1.7  # the job on 2 nodes against the routine alone, in one process
_NO_GMPY2_ENV = "BENCH_PRIME_JOB_NO_GMPY2"
BATCH = "filter_primes (batch)"


def _without_gmpy2(argv: Sequence[str]) -> int:
    """Run this script again with gmpy2 unimportable in it and in every child it starts."""
    with tempfile.TemporaryDirectory(prefix="bench-no-gmpy2-") as shim:
        package = Path(shim) / "gmpy2"
        package.mkdir()
        (package / "__init__.py").write_text(
            "raise ImportError('gmpy2 hidden by bench_prime_job.py --without-gmpy2')\n")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [shim, env.get("PYTHONPATH")]))
        env[_NO_GMPY2_ENV] = "1"
        return subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv],
                              env=env).returncode


def measure_batch(numbers: Sequence[int], repeat: int = 1) -> Dict[str, float]:
    """``filter_primes`` over the whole list in one call (best of `repeat` passes): the
    routine as the nodes run it."""
    items = list(numbers)
    best, cpu, found = float("inf"), float("inf"), []
    for _ in range(max(1, repeat)):
        start, start_cpu = time.perf_counter(), time.process_time()
        found = filter_primes(items)
        best = min(best, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return {"seconds": best, "per_second": len(items) / best, "primes": len(found),
            "cpu_seconds": cpu}


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def single_process(path: Path) -> Dict[str, float]:
    """Read the file and test every number in this process: the job without the fabric."""
    start = time.perf_counter()
    count = primes = 0
    for chunk in read_numbers([path]):
        if isinstance(chunk, list):
            count += len(chunk)
            primes += sum(1 for n in chunk if is_prime(n))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "per_second": count / seconds, "primes": primes}


class _Fabric:
    """`master-node serve` with its embedded broker and `nodes` compute nodes, in `work`."""

    def __init__(self, work: Path, nodes: int, capacity: int, broker: Optional[str]) -> None:
        self.work = work
        self.root = f"bench{os.getpid()}{work.name.replace('-', '')}"
        self.url = broker or f"mqtt://127.0.0.1:{_free_port()}"
        where = ["--broker", broker] if broker else ["--port", self.url.rsplit(":", 1)[1]]
        self.procs: List[subprocess.Popen] = []
        self.logs: List[Any] = []
        self.master = self._start("master", [sys.executable, "-m", "master.cli", "serve",
                                             *where, "--root", self.root, "--state",
                                             str(work / "state"), "--snapshot-interval", "0",
                                             "--snapshots", str(work / "snapshots")])
        _wait_for(lambda: "master ready" in (work / "master.log").read_text()
                  or self.master.poll() is not None, _READY_S, "the master")
        if self.master.poll() is not None:
            raise RuntimeError("the master exited:\n" + (work / "master.log").read_text()[-2000:])
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.master.pid)],
                                  capture_output=True, text=True).stdout.split()
        self.broker_pid = int(children[0]) if children and not broker else 0
        self.nodes = [self._start(f"node-{i}", [sys.executable, "-m", "node.cli", "--broker",
                                                self.url, "--root", self.root, "--id",
                                                f"bench-{i}", "--capacity", str(capacity)])
                      for i in range(1, nodes + 1)]
        from master.client import FabricClient
        with FabricClient(broker_url=self.url, root=self.root).start() as client:
            _wait_for(lambda: sum(n["status"] == "ready" for n in client.nodes()) == nodes,
                      _READY_S, f"{nodes} ready nodes")

    def _start(self, name: str, args: List[str]) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "wb")
        self.logs.append(log)
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=_env(),
                                cwd=str(self.work))
        self.procs.append(proc)
        return proc

    def cpu(self) -> Dict[str, float]:
        out = {"master": _cpu_seconds(self.master.pid)}
        if self.broker_pid:  # the embedded broker (an external one is not ours to measure)
            out["broker"] = _cpu_seconds(self.broker_pid)
        for i, node in enumerate(self.nodes, 1):
            out[f"node-{i}"] = _cpu_seconds(node.pid)
        return out

    def stop(self) -> None:
        for proc in reversed(self.procs):  # nodes first, then the master (and its broker)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        for log in self.logs:
            log.close()


def fabric_job(path: Path, work: Path, *, nodes: int, capacity: int,
               shard_size: Optional[int], broker: Optional[str] = None) -> Dict[str, Any]:
    """The whole job through the fabric; its numbers/s and every process's CPU seconds."""
    work.mkdir(parents=True)
    fabric = _Fabric(work, nodes, capacity, broker)
    try:
        before = fabric.cpu()
        args = [sys.executable, "-m", "master.cli", "primes", str(path), "--broker", fabric.url,
                "--root", fabric.root, "--output", str(work / "primes.txt"), "--json", "--no-progress",
                "--timeout", "60"]
        if shard_size:
            args += ["--shard-size", str(shard_size)]
        reaped = _reaped_cpu_seconds()
        start = time.perf_counter()
        client = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=_env(), cwd=str(work))
        stdout, stderr = client.communicate(timeout=3600)
        wall = time.perf_counter() - start
        client_cpu = _reaped_cpu_seconds() - reaped
        after = fabric.cpu()
    finally:
        fabric.stop()
    if client.returncode != 0:
        raise RuntimeError(f"the primes command failed ({client.returncode}):\n"
                           f"{stderr.decode(errors='replace')[-3000:]}")
    summary = json.loads(stdout)
    cpu = {name: round(after[name] - before[name], 3) for name in after}
    cpu["client"] = round(client_cpu, 3)
    return {"nodes": nodes, "capacity": capacity, "seconds": summary["seconds"],
            "wall_seconds": round(wall, 3),
            "per_second": summary["numbers_tested"] / summary["seconds"],
            "primes": summary["primes"], "shards": summary["shards"],
            "shard_size": summary["plan"]["shard_size"], "nodes_used": summary["nodes"],
            "cpu_seconds": cpu}


def _reaped_cpu_seconds() -> float:
    """CPU seconds of every child process reaped so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(count: int, seed: int, node_counts: Sequence[int], capacity: int,
        shard_size: Optional[int], broker: Optional[str] = None, repeat: int = 3
        ) -> Dict[str, Any]:
    rng = random.Random(seed)
    numbers = [rng.getrandbits(64) for _ in range(count)]
    with tempfile.TemporaryDirectory(prefix="bench-prime-job-") as tmp:
        path = Path(tmp) / "numbers.txt"
        path.write_text("\n".join(map(str, numbers)) + "\n")
        routine = measure_routine(numbers, repeat=repeat)
        routine["routines"][BATCH] = measure_batch(numbers, repeat)
        unique_primes = len({n for n in numbers if is_prime(n)})
        local = single_process(path)
        jobs = [fabric_job(path, Path(tmp) / f"fabric-{k}", nodes=k, capacity=capacity,
                           shard_size=shard_size, broker=broker) for k in node_counts]
    single = "is_prime (gmpy2)" if HAS_GMPY2 else "is_prime (pure)"
    fast = max((single, BATCH), key=lambda name: routine["routines"][name]["per_second"])
    reference = routine["routines"][fast]["per_second"]
    pure = routine["routines"]["is_prime_pure"]["per_second"]
    for job in jobs:
        job["ratio_vs_routine"] = job["per_second"] / reference
        job["ratio_vs_pure_routine"] = job["per_second"] / pure
        job["ratio_vs_is_prime"] = job["per_second"] / routine["routines"][single]["per_second"]
        job["correct"] = job["primes"] == unique_primes
    return {"count": count, "seed": seed, "broker": broker or "embedded",
            "environment": environment(),
            "load_average": os.getloadavg(), "routine": routine, "reference": fast,
            "single_process_file": local, "jobs": jobs, "targets": targets(jobs, reference,
                                                                           fast)}


def targets(jobs: List[Dict[str, Any]], reference: float, name: str) -> List[Dict[str, Any]]:
    """Each target with its figure, its reference from the same run, the ratio, and whether
    it was met."""
    out = []
    for job in jobs:
        if job["nodes"] == 2:
            out.append({"what": f"fabric job, 2 nodes, vs {name} alone",
                        "figure": round(job["per_second"], 1), "reference": round(reference, 1),
                        "ratio": round(job["ratio_vs_routine"], 3), "target": TARGET_FACTOR,
                        "met": job["ratio_vs_routine"] >= TARGET_FACTOR and job["correct"]})
    return out


def cpu_bound(report: Dict[str, Any], job: Dict[str, Any]) -> Dict[str, float]:
    """CPU seconds of the whole job (every process) against the batch routine's alone: what
    the job costs whatever the machine's load, and the best ratio that leaves on 2 cores."""
    routine = report["routine"]["routines"][BATCH]["cpu_seconds"]
    total = sum(job["cpu_seconds"].values())
    return {"routine_cpu_s": round(routine, 3), "job_cpu_s": round(total, 3),
            "best_ratio_on_2_cores": round(2 * routine / total, 2) if total else 0.0}


def format_table(report: Dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"{report['count']:,} random 64-bit numbers, seed {report['seed']}, broker "
             f"{report['broker']}; python "
             f"{env['python']}, gmpy2 {env['gmpy2'] or 'absent'}; load average at the end "
             f"{report['load_average'][0]:.2f} on {os.cpu_count()} cores", "",
             f"{'what':<44} {'numbers/s':>12} {'seconds':>9} {'vs ' + report['reference']:>22}"]
    reference = report["routine"]["routines"][report["reference"]]["per_second"]
    for name, r in report["routine"]["routines"].items():
        lines.append(f"{'routine alone: ' + name:<44} {r['per_second']:>12,.0f} "
                     f"{r['seconds']:>9.2f} {r['per_second'] / reference:>21.2f}x")
    local = report["single_process_file"]
    lines.append(f"{'one process: read the file + is_prime':<44} {local['per_second']:>12,.0f} "
                 f"{local['seconds']:>9.2f} {local['per_second'] / reference:>21.2f}x")
    for job in report["jobs"]:
        label = (f"fabric job: {job['nodes']} node{'s' if job['nodes'] > 1 else ''} x "
                 f"capacity {job['capacity']}")
        lines.append(f"{label:<44} {job['per_second']:>12,.0f} {job['seconds']:>9.2f} "
                     f"{job['ratio_vs_routine']:>21.2f}x" + ("" if job["correct"] else
                                                              "  !! wrong prime count"))
    lines.append("")
    for t in report.get("targets", []):
        lines.append(f"target: {t['what']} >= {t['target']:g} x: {t['figure']:,.0f} numbers/s "
                     f"vs {t['reference']:,.0f} in this run = {t['ratio']:.2f} x: "
                     f"{'met' if t['met'] else 'NOT met'}")
    lines += ["", "CPU seconds per process during each fabric job (shards of "
              f"{report['jobs'][0]['shard_size'] if report['jobs'] else '-'} numbers):"]
    for job in report["jobs"]:
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in job["cpu_seconds"].items())
        bound = cpu_bound(report, job)
        lines.append(f"  {job['nodes']} node(s), {job['seconds']:.2f} s wall: {cpu}; "
                     f"{bound['job_cpu_s']:.2f} in all against {bound['routine_cpu_s']:.2f} "
                     f"for {BATCH} alone: at best {bound['best_ratio_on_2_cores']:.2f} x on "
                     "2 idle cores")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000,
                        help="random 64-bit numbers (default 1,000,000)")
    parser.add_argument("--nodes", default="1,2",
                        help="comma-separated node counts to run the job with (default 1,2)")
    parser.add_argument("--capacity", type=int, default=1, help="tasks per node at once (default 1)")
    parser.add_argument("--shard-size", type=int, help="numbers per task (default: the job's own)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--broker", metavar="URL",
                        help="run the fabric on this broker (e.g. a mosquitto) instead of the "
                             "master's embedded one")
    parser.add_argument("--repeat", type=int, default=3,
                        help="passes of each routine alone; the best counts, so a slow spell "
                             "of a shared machine does not flatter the job (default 3)")
    parser.add_argument("--without-gmpy2", action="store_true",
                        help="hide gmpy2 from this run and every process it starts: the nodes "
                             "and the routine alone both run the pure-Python test")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.without_gmpy2 and not os.environ.get(_NO_GMPY2_ENV):
        return _without_gmpy2(list(sys.argv[1:] if argv is None else argv))
    try:
        node_counts = [int(n) for n in args.nodes.split(",") if n.strip()]
    except ValueError:
        parser.error("--nodes takes comma-separated integers, e.g. 1,2")
    if args.count < 1 or args.capacity < 1 or not node_counts or min(node_counts) < 1:
        parser.error("--count, --capacity and every node count must be at least 1")
    try:
        report = run(args.count, args.seed, node_counts, args.capacity, args.shard_size,
                     args.broker, args.repeat)
    except RuntimeError as e:
        print(f"bench_prime_job: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0 if all(job["correct"] for job in report["jobs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
