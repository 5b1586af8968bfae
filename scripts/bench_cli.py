"""How long a one-shot command takes: `master-node submit noop` as a subprocess, end to end.

Against `master-node serve` (embedded broker) and one compute node, started as a user starts
them, it times COUNT runs of `master-node submit noop` (interpreter start, imports, connect,
submit, the result, exit) and, in the same run and in turns with it, the references: the
bare interpreter (`python -c pass`) and `master-node submit --help` (start and imports, no
broker). It prints each figure's p50 and p99, the target (p50 under 100 ms) with the ratio of
the figure to it, and the import time of the command (`-X importtime`) by top-level package.

    python scripts/bench_cli.py [--count 30] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

_SCRIPTS = Path(__file__).resolve().parent
for _path in (str(_SCRIPTS.parent), str(_SCRIPTS)):
    if _path not in sys.path:  # run as a script from a checkout
        sys.path.insert(0, _path)

from bench.fabric_run import start_master  # noqa: E402
from bench.procs import REPO, Children, child_env, console_script  # noqa: E402
from bench.stats import latency_summary  # noqa: E402

TARGET_P50_MS = 100.0


def _timed(argv: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=str(REPO), capture_output=True, timeout=60, env=child_env())
    took = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[-4:])} failed: {done.stderr.decode()[-500:]}")
    return took


def import_profile(argv: list[str]) -> dict[str, float]:
    """Milliseconds of import per top-level package for `argv` (its own -X importtime)."""
    done = subprocess.run([sys.executable, "-X", "importtime", *argv], cwd=str(REPO),
                          capture_output=True, text=True, timeout=60, env=child_env())
    by_package: Counter = Counter()
    for line in done.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if m:
            by_package[m.group(2).split(".")[0]] += int(m.group(1))
    return {name: round(us / 1000, 2) for name, us in by_package.most_common(12)}


def run(count: int) -> dict[str, Any]:
    cli = console_script("master-node", "master.cli")
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp, \
            Children(Path(tmp)) as children:
        root = f"benchcli{uuid.uuid4().hex[:6]}"
        started = start_master("embedded", children, root=root, state=Path(tmp) / "state",
                               log_dir=Path(tmp))
        children.start("node", console_script("compute-node", "node.cli") + [
            "--log-level", "WARNING", "--broker", started.url, "--root", root, "--id", "b1"])
        submit = cli + ["submit", "noop", "--broker", started.url, "--root", root,
                        "--timeout", "30"]
        _timed(submit)  # waits for the node to be there; warms the caches
        runs: dict[str, list[float]] = {"submit": [], "help": [], "bare": []}
        for _ in range(count):  # in turns: a slow spell weighs on each alike
            runs["submit"].append(_timed(submit))
            runs["help"].append(_timed(cli + ["submit", "--help"]))
            runs["bare"].append(_timed([sys.executable, "-c", "pass"]))
    out: dict[str, Any] = {name: latency_summary(values) for name, values in runs.items()}
    p50 = out["submit"]["p50_ms"]
    out["target"] = {"what": "master-node submit noop, subprocess p50 (ms)", "figure": p50,
                     "target": TARGET_P50_MS, "ratio": round(p50 / TARGET_P50_MS, 3),
                     "met": p50 < TARGET_P50_MS,
                     "reference_bare_interpreter_p50_ms": out["bare"]["p50_ms"],
                     "vs_bare_interpreter": round(p50 / out["bare"]["p50_ms"], 2)}
    out["imports_ms"] = import_profile(["-m", "master.cli", "submit", "--help"])
    out["count"] = count
    out["load_average"] = os.getloadavg()
    out["command"] = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(cli))
    return out


def format_table(r: dict[str, Any]) -> str:
    lines = [f"{r['count']} runs each, in turns; load average at the end "
             f"{r['load_average'][0]:.2f} on {os.cpu_count()} cores", "",
             f"{'what':<52} {'p50 ms':>8} {'p99 ms':>8}"]
    for key, label in (("submit", f"`{r['command']} submit noop` (connect, run, result)"),
                       ("help", f"`{r['command']} submit --help` (start + imports)"),
                       ("bare", "bare interpreter: python -c pass")):
        lines.append(f"{label:<52} {r[key]['p50_ms']:>8.1f} {r[key]['p99_ms']:>8.1f}")
    t = r["target"]
    lines += ["", f"target: {t['what']} < {t['target']:g}: {t['figure']:.1f} "
                  f"({t['ratio']:.2f} x the target, {t['vs_bare_interpreter']:.2f} x the bare "
                  f"interpreter's {t['reference_bare_interpreter_p50_ms']:.1f} in this run): "
                  f"{'met' if t['met'] else 'NOT met'}",
              "imports of `submit --help` by package (ms): "
              + ", ".join(f"{k} {v}" for k, v in r["imports_ms"].items())]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=30,
                        help="runs of each command (default 30)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    try:
        report = run(args.count)
    except RuntimeError as e:
        print(f"bench_cli: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
