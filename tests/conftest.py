"""Fixtures shared by the fabric tests: real brokers on free loopback ports, real processes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.brokers import mosquitto_available, start_broker  # noqa: E402
from support.fabric import REPO, Fabric, Observer  # noqa: E402


@pytest.fixture(scope="module", params=["embedded", "mosquitto"])
def broker_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A broker shared by a module's tests (each test gets its own topic root), both kinds
    configured by the repository's broker.conf on a free port."""
    if request.param == "mosquitto" and not mosquitto_available():
        pytest.skip("mosquitto is not installed")
    broker = start_broker(request.param, REPO / "broker.conf",
                          directory=tmp_path_factory.mktemp(request.param))
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
