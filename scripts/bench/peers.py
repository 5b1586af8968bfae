"""Peers on the same workload: Dramatiq and Huey over Redis, two worker processes each.

Installs what is missing (redis-server with apt-get; dramatiq, huey and redis with pip) for
the benchmark only: none of them is a dependency of the fabric. Each peer is measured like
the fabric: no-op tasks per second from the first submit until the submitter sees the last
one done, and the p50/p99 of one task submitted and awaited at a time.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from bench.procs import Children, child_env, cpu_seconds, free_port, wait_for, wait_listening
from bench.stats import Progress, latency_summary

__all__ = ["ensure_installed", "run_peers"]

_HERE = Path(__file__).resolve().parent


def ensure_installed(progress: Progress) -> None:
    """redis-server, dramatiq, huey and redis-py, installed only if missing."""
    if shutil.which("redis-server") is None:
        progress.step("peers: installing redis-server (apt-get)")
        subprocess.run(["apt-get", "install", "-y", "redis-server"], check=True,
                       stdout=subprocess.DEVNULL, timeout=600)
    missing = [name for name in ("dramatiq", "huey", "redis") if not _importable(name)]
    if missing:
        progress.step(f"peers: installing {', '.join(missing)} (pip)")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "dramatiq[redis]",
                        "huey", "redis"], check=True, timeout=600)
        importlib.invalidate_caches()


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except ImportError:
        return False


def run_peers(*, tasks: int, rtt_count: int, workers: int, progress: Progress) -> dict[str, Any]:
    """Throughput and single-task round trip of each peer; one Redis for all."""
    ensure_installed(progress)
    out: dict[str, Any] = {"workers": workers, "tasks": tasks}
    with Children() as children:
        port = free_port()
        children.start("redis", [shutil.which("redis-server") or "redis-server", "--port",
                                 str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no"])
        wait_listening(port)
        url = f"redis://127.0.0.1:{port}/0"
        os.environ["BENCH_REDIS_URL"] = url
        if str(_HERE) not in sys.path:
            sys.path.insert(0, str(_HERE))
        for name, runner in (("dramatiq", _dramatiq), ("huey", _huey)):
            try:
                out[name] = runner(url, tasks=tasks, rtt_count=rtt_count, workers=workers,
                                   children=children, progress=progress)
            except Exception as e:  # one peer failing must not hide the other's figures
                progress.step(f"peers: {name} failed: {e}")
                out[name] = {"error": str(e)}
    return out


def _peer_env(url: str) -> dict[str, str]:
    env = child_env([_HERE])
    env["BENCH_REDIS_URL"] = url
    return env


def _dramatiq(url: str, *, tasks: int, rtt_count: int, workers: int, children: Children,
              progress: Progress) -> dict[str, Any]:
    import redis

    peer = importlib.import_module("peer_dramatiq")
    progress.step(f"peers: dramatiq, {workers} worker processes")
    worker = children.start("dramatiq", [sys.executable, "-m", "dramatiq", "peer_dramatiq",
                                         "--processes", str(workers)], env=_peer_env(url))
    client = redis.Redis.from_url(url)
    _first_round_trip(lambda: peer.noop.send().get_result(block=True, timeout=60_000))
    client.delete(peer.DONE_KEY)
    figures = _throughput(tasks, lambda: peer.noop_counted.send(),
                          lambda: int(client.get(peer.DONE_KEY) or 0), [worker.pid])
    progress.step(f"peers: dramatiq {figures['tasks_per_s']:,.0f} tasks/s")
    latencies = _round_trips(rtt_count,
                             lambda: peer.noop.send().get_result(block=True, timeout=10_000))
    figures["round_trip"] = latency_summary(latencies)
    progress.step(f"peers: dramatiq round trip p50 {figures['round_trip']['p50_ms']} ms")
    worker.stop()
    return figures


def _huey(url: str, *, tasks: int, rtt_count: int, workers: int, children: Children,
          progress: Progress) -> dict[str, Any]:
    peer = importlib.import_module("peer_huey")
    progress.step(f"peers: huey, {workers} worker processes")
    consumer = shutil.which("huey_consumer") or shutil.which("huey_consumer.py")
    args = [consumer] if consumer else [sys.executable, "-m", "huey.bin.huey_consumer"]
    worker = children.start("huey", args + ["peer_huey.huey", "-w", str(workers), "-k",
                                            "process", "-q"], env=_peer_env(url))
    conn = peer.huey.storage.conn
    _first_round_trip(lambda: peer.noop().get(blocking=True, timeout=60))
    conn.delete(peer.DONE_KEY)
    figures = _throughput(tasks, lambda: peer.noop_counted(),
                          lambda: int(conn.get(peer.DONE_KEY) or 0), [worker.pid])
    progress.step(f"peers: huey {figures['tasks_per_s']:,.0f} tasks/s")
    latencies = _round_trips(rtt_count, lambda: peer.noop().get(blocking=True, timeout=10))
    figures["round_trip"] = latency_summary(latencies)
    progress.step(f"peers: huey round trip p50 {figures['round_trip']['p50_ms']} ms")
    worker.stop()
    return figures


def _first_round_trip(call: Callable[[], object]) -> None:
    """The workers are up once one task comes back (bounded by the call's own timeout)."""
    call()


def _throughput(tasks: int, send: Callable[[], object], done: Callable[[], int],
                pids: list[int]) -> dict[str, Any]:
    cpu_before = sum(cpu_seconds(p) for p in pids)
    started = time.perf_counter()
    for _ in range(tasks):
        send()
    submitted = time.perf_counter()
    wait_for(lambda: done() >= tasks, max(60.0, tasks / 100), "the last task", interval=0.002)
    finished = time.perf_counter()
    return {"tasks_per_s": round(tasks / (finished - started), 1),
            "submit_s": round(submitted - started, 3), "total_s": round(finished - started, 3),
            "worker_parent_cpu_s": round(sum(cpu_seconds(p) for p in pids) - cpu_before, 2)}


def _round_trips(count: int, call: Callable[[], object]) -> list[float]:
    for _ in range(min(20, count)):  # warm up connections and caches
        call()
    out = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        out.append(time.perf_counter() - started)
    return out
