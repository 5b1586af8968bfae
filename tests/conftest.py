"""Fixtures shared by the fabric tests: real brokers on free loopback ports, real processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Generator, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.brokers import mosquitto_available, start_broker  # noqa: E402
from support.fabric import REPO, Fabric, Observer  # noqa: E402

# -- a skip is a failure where it counts ---------------------------------------------------------
# In CI (env CI set) and under `--fail-on-skip` (scripts/run_tests.sh passes it), a skipped or
# xfailed test fails the run unless tests/skip_allowlist.txt names it with a reason: a test that
# does not run proves nothing, and a green run must mean every test ran.

SKIP_ALLOWLIST = Path(__file__).resolve().parent / "skip_allowlist.txt"
_ALLOWED = pytest.StashKey[dict]()
_STRICT = pytest.StashKey[bool]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fail-on-skip", action="store_true", default=False,
                     help="a skipped or xfailed test fails unless tests/skip_allowlist.txt "
                          "lists it with a reason (on by default when env CI is set)")


def read_skip_allowlist(path: Path = SKIP_ALLOWLIST) -> dict[str, str]:
    """node id -> reason; an entry without a reason is a usage error."""
    allowed: dict[str, str] = {}
    if not path.exists():
        return allowed
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        node_id, _, reason = line.partition(" ")
        if not reason.strip():
            raise pytest.UsageError(f"{path.name}:{number}: {node_id!r} has no reason")
        allowed[node_id] = reason.strip()
    return allowed


def ci_env() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_STRICT] = bool(config.getoption("--fail-on-skip")) or ci_env()
    config.stash[_ALLOWED] = read_skip_allowlist() if config.stash[_STRICT] else {}


def _fail_skip(config: pytest.Config, report: Any) -> None:
    if not config.stash.get(_STRICT, False) or not report.skipped:
        return
    if report.nodeid in config.stash[_ALLOWED]:
        return
    if hasattr(report, "wasxfail"):
        why = f"xfailed ({report.wasxfail or 'no reason given'})"
        del report.wasxfail
    else:
        longrepr = report.longrepr
        why = f"skipped ({longrepr[2] if isinstance(longrepr, tuple) else longrepr})"
    report.outcome = "failed"
    report.longrepr = (f"{report.nodeid} {why}: a skip fails this run (CI or --fail-on-skip); "
                       f"make it run, or list it with a reason in tests/{SKIP_ALLOWLIST.name}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Generator:
    report = yield
    _fail_skip(item.config, report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator:
    report = yield
    _fail_skip(collector.config, report)
    return report



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
