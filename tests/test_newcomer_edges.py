"""What a newcomer meets first: connection errors that say why at once, one line for a busy
port, tasks imported from the working directory, options anywhere, map_shards as README
shows it, and a word in the log when serve or a node is told to stop."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from core.errors import BrokerUnavailable
from broker.passwd import add_user
from master.client import FabricClient
from master.shards import map_shards
from support.brokers import free_port, start_embedded
from support.fabric import REPO, Fabric, Proc, child_env, wait_until

MASTER = [sys.executable, "-m", "master.cli"]
NODE = [sys.executable, "-m", "node.cli"]
# a 64-character label is longer than DNS allows: the resolver refuses it without asking anyone
UNKNOWN_HOST = "a" * 64 + ".invalid"


def _run(args: list[str], *, cwd: Path | None = None, timeout: float = 60) -> tuple[
        subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    result = subprocess.run(args, capture_output=True, text=True, env=child_env(),
                            cwd=str(cwd or REPO), timeout=timeout)
    return result, time.monotonic() - start


def _closed_port() -> int:
    """A loopback port nothing listens on (taken from the kernel, then released)."""
    return free_port()


@pytest.fixture
def busy_port() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


# -- connection errors --------------------------------------------------------------------------

def test_a_refused_connection_fails_in_under_a_second_with_a_hint() -> None:
    port = _closed_port()
    client = FabricClient(broker_url=f"mqtt://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(BrokerUnavailable) as caught:
        client.start(timeout=10)
    elapsed = time.monotonic() - start
    assert elapsed < 1.0, elapsed
    assert f"connection refused: nothing listens on 127.0.0.1:{port}" in str(caught.value)
    assert "master-node serve" in str(caught.value)  # the hint


@pytest.mark.parametrize("command", [MASTER + ["status"], MASTER + ["submit", "echo", "1"], NODE])
def test_commands_fail_fast_on_a_refused_connection(command: list[str]) -> None:
    port = _closed_port()
    result, elapsed = _run(command + ["--broker", f"mqtt://127.0.0.1:{port}"])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "connection refused" in lines[0] and "is the broker running?" in lines[0]
    assert elapsed < 5.0, elapsed  # an interpreter's start-up included; 10 s before


def test_an_unknown_host_is_named() -> None:
    result, elapsed = _run(MASTER + ["status", "--broker", f"mqtt://{UNKNOWN_HOST}:1883"])
    assert result.returncode == 2
    assert f"unknown host '{UNKNOWN_HOST}'" in result.stderr
    assert "check the host name" in result.stderr
    assert elapsed < 5.0, elapsed


def test_tls_to_a_plain_listener_says_tls() -> None:
    with start_embedded("listener 1883 127.0.0.1\nallow_anonymous true\n") as broker:
        client = FabricClient(broker_url=f"mqtts://127.0.0.1:{broker.port}")
        start = time.monotonic()
        with pytest.raises(BrokerUnavailable) as caught:
            client.start(timeout=10)
        assert time.monotonic() - start < 5.0
    assert "TLS handshake failed" in str(caught.value)
    assert "mqtts://" in str(caught.value)


def test_a_wrong_password_says_not_authorized(tmp_path: Path) -> None:
    add_user(tmp_path / "passwd", "alice", "right")
    config = "listener 1883 127.0.0.1\nallow_anonymous false\npassword_file passwd\n"
    with start_embedded(config, directory=tmp_path) as broker:
        url = f"mqtt://alice:wrong@127.0.0.1:{broker.port}"
        result, elapsed = _run(MASTER + ["status", "--broker", url])
        node, node_elapsed = _run(NODE + ["--broker", url, "--id", "alice"])
    assert result.returncode == 2 and node.returncode == 2
    for stderr in (result.stderr, node.stderr):
        assert "not authorized" in stderr, stderr
        assert "password_file" in stderr
    assert elapsed < 5.0 and node_elapsed < 5.0, (elapsed, node_elapsed)


# -- a busy port --------------------------------------------------------------------------------

def test_serve_on_a_busy_port_says_so_in_one_line(busy_port: int, tmp_path: Path) -> None:
    result, _ = _run(MASTER + ["serve", "--port", str(busy_port), "--state", str(tmp_path / "s")],
                     cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"master-node serve: error: embedded broker did not start: 127.0.0.1:"
                     f"{busy_port}: address already in use (is another broker or master-node serve "
                     "running? stop it, or pick another port with --port)"], result.stderr


def test_the_broker_on_a_busy_port_says_so_in_one_line(busy_port: int, tmp_path: Path) -> None:
    result, _ = _run(MASTER + ["broker", "--port", str(busy_port)], cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "address already in use" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_a_dashboard_on_a_busy_port_says_so(busy_port: int) -> None:
    with start_embedded("listener 1883 127.0.0.1\nallow_anonymous true\n") as broker:
        result, _ = _run(MASTER + ["dashboard", "--listen", f"127.0.0.1:{busy_port}",
                                   "--broker", broker.url])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"master-node dashboard: error: cannot serve the dashboard on 127.0.0.1:{busy_port}: "
        "the port is already in use (choose another with --listen HOST:PORT)")


# -- tasks from the working directory, options anywhere, map_shards ----------------------------

def test_task_module_is_found_in_the_working_directory(fabric: Fabric, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "mytasks.py").write_text("def resize(path, width):\n    return [path, width * 2]\n")
    fabric.master()
    node = Proc(NODE + ["--broker", fabric.broker_url, "--root", fabric.root, "--id", "w1",
                        "--task", "mytasks:resize"], tmp_path / "node.log", cwd=work)
    fabric.procs.append(node)
    node.wait_for_output("ready on")
    with fabric.client() as client:
        assert client.submit("resize", ["/data/a.png", 640]).result(timeout=30) == \
            ["/data/a.png", 1280]


def test_a_missing_task_module_names_where_it_looked(tmp_path: Path) -> None:
    result, elapsed = _run(NODE + ["--task", "nosuchmodule:resize"], cwd=tmp_path)
    assert result.returncode == 2
    assert ("no module named 'nosuchmodule' (looked in sys.path and the current directory "
            f"{tmp_path})") in result.stderr
    assert elapsed < 5.0


def test_log_level_and_broker_anywhere(fabric: Fabric) -> None:
    fabric.master()
    common = ["--root", fabric.root, "--timeout", "20"]
    for args in (["--log-level", "DEBUG", "status", "--broker", fabric.broker_url, *common],
                 ["status", "--log-level", "WARNING", "--broker", fabric.broker_url, *common],
                 ["--broker", fabric.broker_url, "status", "--json", *common],
                 ["--broker", fabric.broker_url, "pipelines", "list", "--log-level", "ERROR",
                  *common]):
        result, _ = _run(MASTER + args)
        assert "unrecognized arguments" not in result.stderr, (args, result.stderr)
        if args[:2] != ["--broker", fabric.broker_url] or args[2] == "status":
            assert result.returncode == 0, (args, result.stderr)
    result, _ = _run(MASTER + ["--log-level", "LOUD", "status"])
    assert result.returncode == 2 and "use DEBUG, INFO, WARNING or ERROR" in result.stderr
    node, _ = _run(NODE + ["--log-level", "LOUD"])
    assert node.returncode == 2 and "use DEBUG, INFO, WARNING or ERROR" in node.stderr


def test_map_shards_as_readme_shows_it(fabric: Fabric) -> None:
    fabric.master()
    fabric.node("w1")
    with fabric.client() as client:
        wait_until(lambda: client.status()["nodes_ready"] >= 1, 30, message="a ready node")
        assert map_shards(client, "echo", list(range(10)), 3) == list(range(10))


# -- stopping -----------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_and_node_say_stopping_and_stopped(fabric: Fabric, sig: int) -> None:
    master = fabric.master()
    node = fabric.node("w1")
    node.wait_for_output("ready on")
    node.signal(sig)
    assert node.popen.wait(30) == 0
    master.signal(sig)
    assert master.popen.wait(30) == 0
    node_log, master_log = node.output(), master.output()
    assert "node w1 stopping" in node_log and "node w1 stopped" in node_log
    assert node_log.index("node w1 stopping") < node_log.index("node w1 stopped")
    assert "master master stopping" in master_log and "master master stopped" in master_log
