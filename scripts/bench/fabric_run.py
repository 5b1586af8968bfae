"""What the fabric benchmarks share: a master on the embedded broker or on mosquitto, started
as a user starts it, and one measurement per broker where a failure on one still reports the
other."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from bench.procs import (REPO, Child, Children, child_pids, console_script, free_port,
                         mosquitto_config, mosquitto_path, wait_listening)
from bench.stats import Progress

__all__ = ["BROKERS", "MasterUnderTest", "start_master", "each_broker"]

BROKERS = ("embedded", "mosquitto")


@dataclass
class MasterUnderTest:
    master: Child
    url: str
    broker_pids: list[int]


def start_master(kind: str, children: Children, *, root: str, state: Path,
                 log_dir: Path) -> MasterUnderTest:
    """`master-node serve`: with its embedded broker (`embedded`), or beside a mosquitto
    running the project's broker.conf on a free port (`mosquitto`)."""
    master_cmd = console_script("master-node", "master.cli") + ["--log-level", "WARNING"]
    if kind == "embedded":
        master = children.start("master-embedded", master_cmd + [
            "serve", "--config", str(REPO / "broker.conf"), "--port", str(free_port()),
            "--state", str(state), "--root", root], stdout_pipe=True)
        line = master.read_line_with("master ready on", 60)
        return MasterUnderTest(master, line.split("master ready on", 1)[1].strip(),
                               child_pids(master.pid))
    executable = mosquitto_path()
    if executable is None:
        raise RuntimeError("mosquitto is not installed")
    port = free_port()
    broker = children.start("mosquitto", [executable, "-c", str(mosquitto_config(port, log_dir))])
    wait_listening(port)
    url = f"mqtt://127.0.0.1:{port}"
    master = children.start("master-mosquitto", master_cmd + [
        "serve", "--broker", url, "--state", str(state), "--root", root], stdout_pipe=True)
    master.read_line_with("master ready on", 60)
    return MasterUnderTest(master, url, [broker.pid])


def each_broker(kinds: Iterable[str], measure: Callable[[str, Path], dict[str, Any]], *,
                prefix: str, progress: Progress) -> dict[str, dict[str, Any]]:
    """`measure(kind, work_dir)` for each broker, in one scratch directory; a broker that
    fails is reported as `{"error": ...}` and the next one still runs."""
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        for kind in kinds:
            try:
                out[kind] = measure(kind, Path(tmp))
            except Exception as e:  # report the other broker's figures even so
                progress.step(f"{kind}: failed: {e}")
                out[kind] = {"broker": kind, "error": str(e)}
    return out
