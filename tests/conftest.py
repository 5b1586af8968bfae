"""Fixtures shared by the fabric tests: real brokers on free loopback ports, real processes."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.fabric import REPO, Fabric, Observer, wait_until  # noqa: E402

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto"
                                          if Path("/usr/sbin/mosquitto").exists() else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Mosquitto:
    def __init__(self, tmp: Path) -> None:
        self.port = _free_port()
        conf = tmp / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
                        "max_queued_messages 100000\n")
        self.popen = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        self.url = f"mqtt://127.0.0.1:{self.port}"

        def listening() -> bool:
            if self.popen.poll() is not None:
                raise AssertionError("mosquitto exited at start")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return True
            except OSError:
                return False
        wait_until(listening, 10, message="mosquitto to listen")

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)


class _Embedded:
    def __init__(self) -> None:
        from master.broker import start_broker_process
        self.process = start_broker_process(REPO / "broker.conf", port=_free_port())
        self.url = self.process.url

    def stop(self) -> None:
        self.process.stop()


def start_broker(kind: str, tmp: Path):
    if kind == "mosquitto":
        if MOSQUITTO is None:
            pytest.skip("mosquitto is not installed")
        return _Mosquitto(tmp)
    return _Embedded()


@pytest.fixture(scope="module", params=["embedded", "mosquitto"])
def broker_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A broker shared by a module's tests (each test gets its own topic root)."""
    broker = start_broker(request.param, tmp_path_factory.mktemp(request.param))
    yield broker.url
    broker.stop()


@pytest.fixture
def fabric(broker_url: str, tmp_path: Path) -> Iterator[Fabric]:
    fab = Fabric(broker_url, tmp_path)
    yield fab
    fab.cleanup()


@pytest.fixture
def observer(fabric: Fabric) -> Iterator[Observer]:
    obs = Observer(fabric.broker_url, fabric.root)
    yield obs
    obs.close()
