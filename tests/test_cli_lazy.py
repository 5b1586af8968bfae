"""`master-node COMMAND` loads that command's module only: a one-shot command starts fast."""

from __future__ import annotations

import json
import subprocess
import sys

from master.cli import build_parser, command_in
from master.commands import NAMES
from support.fabric import REPO, child_env

_PROBE = ("import sys\n"
          "from master.cli import build_parser\n"
          "build_parser(sys.argv[1:])\n"
          "print(' '.join(sorted(m for m in sys.modules if m.startswith('master.commands.'))))\n")


def _loaded(*argv: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True,
                         cwd=REPO, env=child_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    return {name.rsplit(".", 1)[1] for name in out.stdout.split()}


def test_a_named_command_loads_its_module_alone() -> None:
    assert _loaded("submit", "noop") == {"submit", "common"}
    assert _loaded("--log-level", "DEBUG", "--broker=mqtt://h:1", "status") == {"status", "common"}
    assert set(NAMES) <= _loaded("--help")  # the full help lists every command


def test_the_command_is_found_past_top_level_options_and_odd_input_loads_all() -> None:
    assert command_in(["--broker", "mqtt://h:1", "submit", "echo"]) == "submit"
    assert command_in(["--log-level=DEBUG", "primes", "f.txt"]) == "primes"
    for argv in ([], ["-h"], ["nope"], ["--log", "DEBUG", "submit"], ["--x", "submit"]):
        assert command_in(argv) is None, argv
    full = build_parser(["--help"])
    assert set(full._subparsers._group_actions[0].choices) == set(NAMES)  # type: ignore[union-attr]
    args = build_parser(["submit", "echo", "5"]).parse_args(["submit", "echo", "5"])
    assert args.command == "submit" and args.args == ["5"]


def test_cli_benchmark_short_run() -> None:
    """scripts/bench_cli.py end to end on a few runs (the long run is by hand)."""
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_cli.py"), "--count", "2",
                          "--json"], capture_output=True, text=True, cwd=REPO, env=child_env(),
                         timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["submit"]["count"] == report["bare"]["count"] == 2
    target = report["target"]
    assert target["target"] == 100.0 and target["figure"] == report["submit"]["p50_ms"] > 0
    assert target["reference_bare_interpreter_p50_ms"] == report["bare"]["p50_ms"]
    assert report["imports_ms"]
