"""start_system.sh / stop_system.sh / run_prime_demo.sh as a user runs them, in a scratch
working directory on a free port: the quick tests of the prime finder this follows (1: start
with one worker, primes.txt appears; 2: kill the primary of the replicated masters, the job
goes on; 3: kill a worker, the others go on, restart it by hand), and nothing left running
after stop_system.sh."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import sympy

from support.fabric import REPO, child_env, wait_until

SCRIPTS = REPO / "scripts"
STARTED = re.compile(r"\bpid (\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def running(pid: int) -> bool:
    """A live process (a zombie waiting to be reaped has stopped running)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
    except OSError:
        return "?"


class Workdir:
    """A scratch working directory with generated input and the scripts' environment."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.port = free_port()
        self.broker = f"mqtt://127.0.0.1:{self.port}"
        self.env = child_env()
        self.env.update(FABRIC_PORT=str(self.port), FABRIC_BROKER=self.broker,
                        FABRIC_STOP_TIMEOUT="20")
        self.pids: set[int] = set()
        self.extra: list[subprocess.Popen] = []

    def run(self, script: str, *args: str, timeout: float = 120, **env: str
            ) -> subprocess.CompletedProcess:
        result = subprocess.run(["bash", str(SCRIPTS / script), *args], cwd=self.path,
                                env={**self.env, **env}, capture_output=True, text=True,
                                timeout=timeout)
        self.pids |= {int(p) for p in STARTED.findall(result.stdout)}
        self.pids |= {int(p.read_text()) for p in self.path.glob("logs/*.pid")
                      if p.read_text().strip().isdigit()}
        return result

    def generate(self, *args: str) -> list[Path]:
        subprocess.run([sys.executable, str(SCRIPTS / "generate_numbers.py"), "data/input",
                        *args], cwd=self.path, check=True, capture_output=True, timeout=60)
        return sorted((self.path / "data/input").glob("*.txt"))

    def pid(self, name: str) -> int:
        return int((self.path / "logs" / f"{name}.pid").read_text())

    def client(self):
        from master.client import FabricClient
        return FabricClient(broker_url=self.broker).start()


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Workdir]:
    work = Workdir(tmp_path / "work")
    work.path.mkdir()
    try:
        yield work
    finally:
        if (work.path / "logs").exists():
            work.run("stop_system.sh", timeout=120)
        for proc in work.extra:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        left = [pid for pid in work.pids if running(pid)]
        for pid in left:  # a failed test must not leave its processes behind
            os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left running: {left}"


def expected_primes(files: list[Path]) -> list[str]:
    found = set()
    for path in files:
        for line in path.read_text().split("\n"):
            text = line.strip()
            if re.fullmatch(r"[+-]?[0-9]+", text) and sympy.isprime(int(text)):
                found.add(int(text))
    return [str(n) for n in sorted(found)]


def job_finished(work: Workdir) -> bool:
    pid_file = work.path / "logs/job.pid"
    return not pid_file.exists() or not running(int(pid_file.read_text()))


def stop_and_check_nothing_left(work: Workdir) -> None:
    started = set(work.pids)
    assert started, "the scripts reported no processes"
    result = work.run("stop_system.sh")
    assert result.returncode == 0, result.stderr
    left = {pid: command_line(pid) for pid in started if running(pid)}
    assert left == {}, result.stdout + result.stderr
    assert list((work.path / "logs").glob("*.pid")) == []


def test_quick_test_1_one_worker_writes_primes_txt(workdir: Workdir) -> None:
    files = workdir.generate("--files", "3", "--count", "1000", "--bits", "20", "--blank", "1",
                             "--bad", "1")
    result = workdir.run("start_system.sh", "simple", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "started worker-1" in result.stdout and "started the prime job" in result.stdout
    broker_pid = workdir.pid("broker")
    wait_until(lambda: job_finished(workdir), 60, message="the prime job to finish")
    job_log = (workdir.path / "logs/job.log").read_text()
    assert ": complete" in job_log, job_log[-2000:]
    assert (workdir.path / "primes.txt").read_text().split() == expected_primes(files)
    assert (workdir.path / "logs/master.log").stat().st_size > 0
    assert running(broker_pid)
    stop_and_check_nothing_left(workdir)
    assert not running(broker_pid)


def test_quick_test_3_a_killed_worker_is_restarted_by_hand(workdir: Workdir) -> None:
    files = workdir.generate("--files", "3", "--count", "30000", "--bits", "64")
    result = workdir.run("start_system.sh", "simple", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    with workdir.client() as client:
        wait_until(lambda: sum(n["status"] == "ready" for n in client.nodes()) == 3, 30,
                   message="3 workers ready")
        os.kill(workdir.pid("worker-2"), signal.SIGKILL)  # the seed's `pkill -f worker-2`
        wait_until(lambda: any(n["node_id"] == "worker-2" and n["status"] == "dead"
                               for n in client.nodes()), 20, message="worker-2 found dead")
        wait_until(lambda: job_finished(workdir), 90, message="the job to finish without it")
        assert ": complete" in (workdir.path / "logs/job.log").read_text()
        assert (workdir.path / "primes.txt").read_text().split() == expected_primes(files)
        statuses = {n["node_id"]: n["status"] for n in client.nodes()}
        assert statuses["worker-1"] == statuses["worker-3"] == "ready"

        # restart it by hand, as written: `compute-node --id worker-2` ($FABRIC_BROKER set)
        command = [shutil.which("compute-node")] if shutil.which("compute-node") else \
            [sys.executable, "-m", "node.cli"]
        log = open(workdir.path / "logs/worker-2-by-hand.log", "wb")
        by_hand = subprocess.Popen([*command, "--id", "worker-2"], cwd=workdir.path,
                                   env=workdir.env, stdout=log, stderr=subprocess.STDOUT)
        workdir.extra.append(by_hand)
        wait_until(lambda: any(n["node_id"] == "worker-2" and n["status"] == "ready"
                               for n in client.nodes()), 30, message="worker-2 back")
        handles = client.submit_many([("sleep", [0.2], {}, 5) for _ in range(12)])
        nodes = {h.outcome(timeout=60).node_id for h in handles}
    assert "worker-2" in nodes  # it takes work again
    by_hand.terminate()  # the user's own process: stopped by the user
    assert by_hand.wait(30) == 0
    log.close()
    stop_and_check_nothing_left(workdir)


def test_quick_test_2_the_job_goes_on_when_the_primary_is_killed(workdir: Workdir) -> None:
    files = workdir.generate("--files", "3", "--count", "100000", "--bits", "64")
    result = workdir.run("start_system.sh", "replicated", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "started master-1 (active" in result.stdout and "started the prime job" in result.stdout
    broker_pid = workdir.pid("broker")
    with workdir.client() as client:
        wait_until(lambda: client.status()["completed"] >= 1, 60, message="the job under way")
        assert not job_finished(workdir)
        os.kill(workdir.pid("master-1"), signal.SIGKILL)  # the seed's `pkill -f server1`
        wait_until(lambda: job_finished(workdir), 120, message="the job to finish")
        status = client.status()
    assert ": complete" in (workdir.path / "logs/job.log").read_text()
    assert (workdir.path / "primes.txt").read_text().split() == expected_primes(files)
    assert status["master_id"] in ("master-2", "master-3") and status["epoch"] == 2
    assert running(broker_pid)  # the broker runs on its own: a master's death leaves it be
    stop_and_check_nothing_left(workdir)
    assert not running(broker_pid)


def test_stop_without_a_running_system_is_harmless(workdir: Workdir) -> None:
    (workdir.path / "logs").mkdir()
    (workdir.path / "logs/worker-9.pid").write_text(str(os.getpid()))  # not a node: untouched
    result = workdir.run("stop_system.sh")
    assert result.returncode == 0 and "not worker-9 any more" in result.stderr
    assert not (workdir.path / "logs/worker-9.pid").exists()
    workdir.pids.discard(os.getpid())


def test_demo_runs_the_whole_job_and_stops_everything(workdir: Workdir) -> None:
    result = workdir.run("run_prime_demo.sh", timeout=180, DEMO_DIR=str(workdir.path / "demo"),
                         DEMO_FILES="2", DEMO_COUNT="3000")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"job primes-\w+: complete", result.stdout)
    assert "== the first primes of" in result.stdout and "stopped master" in result.stdout
    files = sorted((workdir.path / "demo/data/input").glob("*.txt"))
    assert (workdir.path / "demo/primes.txt").read_text().split() == expected_primes(files)
    assert workdir.pids and [pid for pid in workdir.pids if running(pid)] == []
