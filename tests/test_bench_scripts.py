"""The benchmark scripts run end to end with tiny counts and say what they measured.

Speed is what the scripts report, not what these tests check: they check that a short run
finishes, cleans up, and produces well-formed figures and tables.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from support.fabric import REPO, child_env

MOSQUITTO = shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()
BROKERS = "embedded,mosquitto" if MOSQUITTO else "embedded"


def run_script(args: list[str], timeout: float = 300.0) -> tuple[dict[str, Any], str]:
    """Run a script to completion (SIGTERM on overrun, so it stops its own children)."""
    proc = subprocess.Popen([sys.executable, *args], cwd=str(REPO), env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"{args[0]} overran {timeout:g}s:\n{err.decode()[-3000:]}")
    assert proc.returncode == 0, f"{args[0]} exited {proc.returncode}:\n{err.decode()[-3000:]}"
    return json.loads(out), err.decode()


def _latency(summary: dict[str, Any], count: int) -> None:
    assert summary["count"] == count
    assert 0 < summary["p50_ms"] <= summary["p99_ms"] <= summary["max_ms"]


def test_bench_fabric_short_run_reports_every_figure() -> None:
    report, progress = run_script(["scripts/bench_fabric.py", "--tasks", "500", "--rtt-count",
                                   "20", "--cli-count", "1", "--brokers", BROKERS,
                                   "--no-prime-job", "--json"])
    assert progress.count("[bench") >= 8  # a progress line per step
    assert set(report["brokers"]) == set(BROKERS.split(","))
    for kind, figures in report["brokers"].items():
        assert "error" not in figures, figures
        throughput = figures["throughput"]
        assert throughput["tasks"] == 500 and throughput["tasks_per_s"] > 0
        assert set(throughput["cpu_cores"]) == {"master", "broker", "nodes", "client"}
        _latency(figures["round_trip_api"], 20)
        _latency(figures["round_trip_master_api"], 20)
        _latency(figures["raw_request_reply"], 20)
        _latency(figures["cli"]["subprocess"], 1)
        _latency(figures["cli"]["in_process"], 20)
        assert figures["rtt_ratio_p50"] > 0 and figures["rtt_ratio_master_api_p50"] > 0
    verdicts = report["verdicts"]
    assert {f"{name}_{kind}" for name in ("rtt_p99_over_p50", "cli_submit_p50_ms")
            for kind in BROKERS.split(",")} <= set(verdicts)
    assert all(isinstance(v["met"], bool) for v in verdicts.values())

    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from bench_fabric import format_table
    finally:
        sys.path.remove(str(REPO / "scripts"))
    table = format_table(report)
    assert "no-op tasks/s" in table and "fabric p50 / raw p50" in table and "Targets:" in table


def test_verdicts_hold_the_fabric_to_the_peers_figures_of_the_same_run() -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from bench_fabric import verdicts
    finally:
        sys.path.remove(str(REPO / "scripts"))

    def rtt(p50: float, p99: float) -> dict[str, float]:
        return {"p50_ms": p50, "p99_ms": p99}

    report = {"peers": {"dramatiq": {"tasks_per_s": 3000, "round_trip": rtt(4.0, 9.0)},
                        "huey": {"tasks_per_s": 4000, "round_trip": rtt(1.0, 1.5)}},
              "brokers": {"embedded": {"throughput": {"tasks_per_s": 61_000},
                                       "round_trip_api": rtt(1.2, 2.0),
                                       "cli": {"subprocess": rtt(90.0, 120.0)}},
                          "mosquitto": {"round_trip_api": rtt(0.9, 2.0),
                                        "cli": {"subprocess": rtt(101.0, 130.0)}}}}
    out = verdicts(report)
    assert {name: v["met"] for name, v in out.items()} == {
        "throughput_embedded_vs_best_peer": True,   # 61,000 / 4,000 = 15.25
        "rtt_p50_ms_embedded_vs_huey_p50": False, "rtt_p99_over_p50_embedded": True,
        "rtt_p50_ms_mosquitto_vs_huey_p50": True, "rtt_p99_over_p50_mosquitto": False,
        "cli_submit_p50_ms_embedded": True, "cli_submit_p50_ms_mosquitto": False}
    assert out["throughput_embedded_vs_best_peer"]["figure"] == 15.25
    assert out["rtt_p50_ms_embedded_vs_huey_p50"]["target"] == 1.0


def test_prime_job_verdicts_hold_the_job_to_both_routines_and_to_a_right_count() -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from bench_fabric import verdicts
    finally:
        sys.path.remove(str(REPO / "scripts"))

    def judged(vs_pure: float, vs_gmpy2: float, correct: bool) -> dict[str, bool]:
        job = {"reference": "is_prime (gmpy2)", "jobs": [
            {"nodes": 1, "vs_pure_routine": 9.0, "vs_routine": 9.0, "correct": True},
            {"nodes": 2, "vs_pure_routine": vs_pure, "vs_routine": vs_gmpy2,
             "correct": correct}]}
        out = verdicts({"brokers": {}, "prime_job": job})
        return {name: v["met"] for name, v in out.items()}

    assert judged(2.3, 0.5, True) == {"prime_job_2_nodes_vs_pure_routine": True,
                                      "prime_job_2_nodes_vs_gmpy2_routine": False}
    assert judged(1.6, 1.8, True) == {"prime_job_2_nodes_vs_pure_routine": False,
                                      "prime_job_2_nodes_vs_gmpy2_routine": True}
    assert judged(2.3, 1.8, False) == {"prime_job_2_nodes_vs_pure_routine": False,
                                       "prime_job_2_nodes_vs_gmpy2_routine": False}


def test_simulate_nodes_short_run_counts_every_node() -> None:
    report, progress = run_script(["scripts/simulate_nodes.py", "--nodes", "50", "--idle", "1",
                                   "--tasks", "500", "--brokers", BROKERS, "--json"])
    assert "[simulate" in progress
    for kind, figures in report["brokers"].items():
        assert "error" not in figures, figures
        assert figures["nodes"] == 50 and figures["connect_s"] >= 0
        idle = figures["idle"]
        assert idle["nodes_ready"] == 50
        assert set(idle["cores"]) == {"master", "broker", "swarm"}
        assert idle["master_rss_mb"] > 0
        assert figures["tasks"]["tasks"] == 500 and figures["tasks"]["tasks_per_s"] > 0
        assert figures["master_status"]["completed"] >= 500
        assert figures["master_status"]["duplicates"] == 0
        assert isinstance(figures["target_met"], bool)
    targets = report["targets"]
    assert targets["duplicates"] == {kind: 0 for kind in report["brokers"]}
    assert targets["duplicates_met"] is True
    assert set(targets["idle_master_cores"]) == set(report["brokers"])
    assert "target: embedded/mosquitto tasks/s" in progress
    if "mosquitto" in report["brokers"]:
        assert targets["throughput_ratio"] > 0
        assert isinstance(targets["throughput_met"], bool)


def test_simulate_nodes_target_line_judges_one_run() -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from simulate_nodes import target_line, targets
    finally:
        sys.path.remove(str(REPO / "scripts"))

    def broker(tasks_per_s: float, duplicates: int, idle: float) -> dict[str, Any]:
        return {"tasks": {"tasks_per_s": tasks_per_s}, "master_status": {
            "duplicates": duplicates}, "idle": {"cores": {"master": idle}}}

    met = targets({"embedded": broker(900, 0, 0.2), "mosquitto": broker(1000, 0, 0.1)})
    assert met["throughput_ratio"] == 0.9 and met["throughput_met"] and met["duplicates_met"]
    assert met["idle_met"]
    line = target_line({"targets": met})
    assert "tasks/s 0.90 (>= 0.8: met)" in line and "NOT" not in line
    missed = targets({"embedded": broker(700, 3, 0.6), "mosquitto": broker(1000, 0, 0.1)})
    assert not (missed["throughput_met"] or missed["duplicates_met"] or missed["idle_met"])
    assert target_line({"targets": missed}).count("NOT met") == 3
    failed = targets({"embedded": {"error": "no"}, "mosquitto": broker(1000, 0, 0.1)})
    assert failed["throughput_ratio"] is None and not failed["throughput_met"]
    assert not failed["duplicates_met"] and not failed["idle_met"]


@pytest.mark.parametrize("script", ["scripts/bench_fabric.py", "scripts/simulate_nodes.py"])
def test_scripts_explain_themselves(script: str) -> None:
    done = subprocess.run([sys.executable, script, "--help"], cwd=str(REPO), env=child_env(),
                          capture_output=True, timeout=60)
    assert done.returncode == 0 and b"--json" in done.stdout
    assert Path(REPO, script).read_text().startswith('"""')
