"""Real brokers for tests: the embedded one and mosquitto, each a subprocess on a free port,
and a RabbitMQ cluster (`start_rabbitmq_cluster`: members of its own, never the system service).

    handle = start_embedded(config_text_or_path)       # port=None: the broker picks one
    handle = start_mosquitto(config_text)               # port=None: a free port is found
    handle = start_broker("mosquitto", text, directory=tmp_path)
    ... handle.host, handle.port, handle.url, handle.log_text() ...
    handle.stop()

Config text is mosquitto syntax; the port of its first `listener` line is replaced by the
chosen one (a text without listener gets a loopback listener, as mosquitto's local-only mode
would). Relative paths in the text resolve against `directory`, where both brokers run.

`Probe` (a paho client that records what it receives) and `RawClient` (a bare socket that
connects and then stays silent, like a frozen device) are the clients tests talk through.
Every wait is bounded. Set BROKER_TEST_UNPATCHED=1 to run the "embedded" broker as plain
amqtt 0.12.1 with the same plugins and listeners but none of `FabricBroker`'s fixes: the
tests of tests/test_broker_promises.py must then fail on the embedded broker.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Iterable

__all__ = [
    "MOSQUITTO", "BROKER_KINDS", "mosquitto_available", "free_port", "with_listener_port",
    "BrokerHandle", "start_embedded", "start_mosquitto", "start_broker", "broker_params",
    "Probe", "Received", "RawClient", "connect_packet", "publish_packet", "wait_until",
    "RABBITMQ_BIN", "rabbitmq_available", "RabbitCluster", "RabbitMember",
    "start_rabbitmq_cluster",
]

MOSQUITTO = Path("/usr/sbin/mosquitto")
BROKER_KINDS = ("embedded", "mosquitto")
REPO_ROOT = Path(__file__).resolve().parents[2]
_LISTENER = re.compile(r"^listener +(\d+)(.*)$", re.MULTILINE)
_UNPATCHED = os.environ.get("BROKER_TEST_UNPATCHED") == "1"


def mosquitto_available() -> bool:
    return MOSQUITTO.is_file() and os.access(MOSQUITTO, os.X_OK)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], Any], timeout: float, *, interval: float = 0.02) -> Any:
    """Poll `condition` until it is truthy or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def with_listener_port(config_text: str, port: int, host: str = "127.0.0.1") -> str:
    """The config with its first listener on `port`; a loopback listener if it has none."""
    match = _LISTENER.search(config_text)
    if match is None:
        extra = "" if re.search(r"^allow_anonymous ", config_text, re.MULTILINE) else \
            "allow_anonymous true\n"
        return f"listener {port} {host}\n{extra}{config_text}"
    return config_text[:match.start(1)] + str(port) + config_text[match.end(1):]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: SIGTERM the child if the test process dies, so no broker outlives a crash."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class BrokerHandle:
    """A broker subprocess: where to reach it, its log, and how to stop it."""

    def __init__(self, kind: str, popen: subprocess.Popen[bytes], *, host: str, port: int,
                 directory: Path, log_path: Path, owns_directory: bool, tls: bool = False
                 ) -> None:
        self.kind = kind
        self.popen = popen
        self.host = host
        self.port = port
        self.directory = directory
        self.log_path = log_path
        self.tls = tls
        self._owns_directory = owns_directory

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, SIGKILL after `timeout`; returns the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None and not stream.closed:
                stream.close()
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)

    def __enter__(self) -> BrokerHandle:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"BrokerHandle({self.kind}, pid={self.popen.pid}, {self.url})"


def _workdir(directory: str | os.PathLike[str] | None, kind: str) -> tuple[Path, bool]:
    if directory is not None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        return path, False
    return Path(tempfile.mkdtemp(prefix=f"{kind}-")), True


def _config_source(config: str | os.PathLike[str]) -> tuple[str | None, Path | None]:
    """(text, None) for config text; (None, path) for a file."""
    if isinstance(config, os.PathLike):
        return None, Path(config)
    if "\n" not in config and config.strip() and Path(config).is_file():
        return None, Path(config)
    return config, None


def start_embedded(config: str | os.PathLike[str] = "", port: int | None = None, *,
                   directory: str | os.PathLike[str] | None = None, timeout: float = 10.0,
                   extra_args: Iterable[str] = (), unpatched: bool | None = None
                   ) -> BrokerHandle:
    """The embedded broker as `python -m broker`; port None lets it pick a free one.
    `unpatched=True` (default: $BROKER_TEST_UNPATCHED) runs plain amqtt instead."""
    unpatched = _UNPATCHED if unpatched is None else unpatched
    workdir, owned = _workdir(directory, "embedded")
    text, path = _config_source(config)
    if path is None:
        path = workdir / f"embedded-{os.getpid()}-{time.monotonic_ns()}.conf"
        path.write_text(text or "")
    log_path = workdir / f"{path.stem}.log"
    code = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
            "import support.brokers as b; b._run_unpatched()" if unpatched else
            "from broker.cli import main; raise SystemExit(main())")
    command = [sys.executable, "-c", code]
    if unpatched:
        command.append(str(REPO_ROOT / "tests"))
    command += ["--config", str(path.resolve()), "--port", str(0 if port is None else port),
                "--parent-pid", str(os.getpid()), *extra_args]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=log, cwd=workdir, env=env)
    line = _first_line(popen, timeout)
    if not line.startswith("READY "):
        popen.kill()
        popen.wait(10)
        if popen.stdout is not None:
            popen.stdout.close()
        log_text = log_path.read_text(errors="replace")
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)
        raise RuntimeError(f"embedded broker did not start ({line or 'no output'}):\n{log_text}")
    host, _, port_text = line[len("READY "):].rpartition(":")
    tls = bool(re.search(r"^certfile ", text or path.read_text(), re.MULTILINE))
    return BrokerHandle("amqtt" if unpatched else "embedded", popen, host=host.strip("[]"),
                        port=int(port_text),
                        directory=workdir, log_path=log_path, owns_directory=owned, tls=tls)


def _first_line(popen: subprocess.Popen[bytes], timeout: float) -> str:
    import selectors
    assert popen.stdout is not None
    buffer = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(popen.stdout, selectors.EVENT_READ)
        while b"\n" not in buffer and time.monotonic() < deadline:
            if selector.select(max(0.0, deadline - time.monotonic())):
                chunk = os.read(popen.stdout.fileno(), 4096)
                if not chunk:
                    break
                buffer += chunk
    return buffer.split(b"\n", 1)[0].decode(errors="replace").strip()


def start_mosquitto(config: str | os.PathLike[str] = "", port: int | None = None, *,
                    directory: str | os.PathLike[str] | None = None, timeout: float = 10.0
                    ) -> BrokerHandle:
    """mosquitto -c <config> on `port` (a free one if None); ready once it accepts TCP."""
    if not mosquitto_available():
        raise RuntimeError(f"{MOSQUITTO} is not installed")
    workdir, owned = _workdir(directory, "mosquitto")
    text, path = _config_source(config)
    if text is None:
        assert path is not None
        text = path.read_text()
    for _attempt in range(5):
        chosen = free_port() if port is None else port
        conf = workdir / f"mosquitto-{chosen}.conf"
        conf.write_text(_as_test_user(with_listener_port(text, chosen)))
        log_path = workdir / f"mosquitto-{chosen}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen([str(MOSQUITTO), "-c", str(conf)], stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=log, cwd=workdir,
                                     preexec_fn=_die_with_parent)
        if wait_until(lambda: popen.poll() is not None or _accepts(chosen), timeout) and \
                popen.poll() is None:
            return BrokerHandle("mosquitto", popen, host="127.0.0.1", port=chosen,
                                directory=workdir, log_path=log_path, owns_directory=owned,
                                tls=bool(re.search(r"^certfile ", text, re.MULTILINE)))
        popen.kill()
        popen.wait(10)
        log_text = log_path.read_text(errors="replace")
        if port is None and "in use" in log_text:
            continue  # lost a race for the free port
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)
        raise RuntimeError(f"mosquitto did not start:\n{log_text}")
    raise RuntimeError("mosquitto: no free port after 5 attempts")


def _as_test_user(config_text: str) -> str:
    """Run as root, mosquitto drops to the `mosquitto` user, which cannot read a test's
    private temporary directory: keep it as the user running the tests."""
    if os.geteuid() != 0 or re.search(r"^user ", config_text, re.MULTILINE):
        return config_text
    return f"user root\n{config_text}"


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def start_broker(kind: str, config: str | os.PathLike[str] = "", port: int | None = None, *,
                 directory: str | os.PathLike[str] | None = None, timeout: float = 10.0
                 ) -> BrokerHandle:
    if kind == "embedded":
        return start_embedded(config, port, directory=directory, timeout=timeout)
    if kind == "mosquitto":
        return start_mosquitto(config, port, directory=directory, timeout=timeout)
    raise ValueError(f"unknown broker kind {kind!r}")


def broker_params() -> list[Any]:
    """pytest params for BROKER_KINDS; mosquitto is skipped only when it is not installed."""
    import pytest
    return [pytest.param(kind, marks=pytest.mark.skipif(
        kind == "mosquitto" and not mosquitto_available(), reason=f"{MOSQUITTO} not installed"))
        for kind in BROKER_KINDS]


# -- clients ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool


# paho 2 reports MQTT 3.1.1 CONNACK codes as MQTT 5 reason codes; tests speak 3.1.1
_CONNACK_CODES = {"Success": 0, "Unsupported protocol version": 1,
                  "Client identifier not valid": 2, "Server unavailable": 3,
                  "Bad user name or password": 4, "Not authorized": 5}


class Probe:
    """A paho client that records what it receives; never reconnects on its own."""

    def __init__(self, host: str, port: int, client_id: str, *, username: str | None = None,
                 password: str | None = None, clean_session: bool = True,
                 will: tuple[str, bytes, int, bool] | None = None, keepalive: int = 60,
                 tls: ssl.SSLContext | None = None, timeout: float = 5.0) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        self.client_id = client_id
        self.messages: list[Received] = []
        self.connect_rc: int | None = None  # the MQTT 3.1.1 CONNACK return code
        self.session_present: bool | None = None
        self.disconnected = threading.Event()
        self._connected = threading.Event()
        self._lock = threading.Condition()
        self._subacks: dict[int, list[int]] = {}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=clean_session, protocol=mqtt.MQTTv311,
                                  reconnect_on_failure=False)
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            self.client.will_set(*will)
        if tls is not None:
            self.client.tls_set_context(tls)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.client.connect(host, port, keepalive)
        self.client.loop_start()
        if not self._connected.wait(timeout) and not self.disconnected.is_set():
            self.close()
            raise TimeoutError(f"{client_id}: no CONNACK within {timeout} s")

    @property
    def accepted(self) -> bool:
        return self.connect_rc == 0

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        self.connect_rc = _CONNACK_CODES.get(str(reason), 128)
        self.session_present = bool(flags.session_present)
        self._connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        self.disconnected.set()
        self._connected.set()
        with self._lock:
            self._lock.notify_all()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self._lock:
            self.messages.append(Received(message.topic, message.payload, message.qos,
                                          bool(message.retain)))
            self._lock.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:
        with self._lock:
            self._subacks[mid] = [r.value if hasattr(r, "value") else int(r) for r in reasons]
            self._lock.notify_all()

    def subscribe(self, topics: str | list[tuple[str, int]], qos: int = 1,
                  timeout: float = 5.0) -> list[int]:
        """Subscribe and wait for the SUBACK; returns the granted QoS (128 = refused)."""
        items = [(topics, qos)] if isinstance(topics, str) else topics
        _, mid = self.client.subscribe(items)
        with self._lock:
            if not self._lock.wait_for(lambda: mid in self._subacks, timeout):
                raise TimeoutError(f"{self.client_id}: no SUBACK within {timeout} s")
            return self._subacks.pop(mid)

    def publish(self, topic: str, payload: bytes | str = b"", qos: int = 0, retain: bool = False,
                timeout: float = 5.0) -> None:
        """Publish; for QoS > 0 wait until the broker acknowledged it."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos:
            info.wait_for_publish(timeout)
            if not info.is_published():
                raise TimeoutError(f"{self.client_id}: {topic} not acknowledged in {timeout} s")

    def wait_for(self, predicate: Callable[[list[Received]], Any], timeout: float = 5.0) -> Any:
        """Wait until `predicate(messages)` is truthy; returns its value (falsy on timeout)."""
        with self._lock:
            return self._lock.wait_for(lambda: predicate(self.messages), timeout)

    def received(self, topic: str) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def wait_message(self, topic: str, timeout: float = 5.0) -> Received | None:
        found = self.wait_for(lambda msgs: [m for m in msgs if m.topic == topic], timeout)
        return found[0] if found else None

    def close(self) -> None:
        """Disconnect cleanly (no will) and stop the network thread."""
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_packet(client_id: str, *, keepalive: int = 60, clean_session: bool = True,
                   will: tuple[str, bytes, int, bool] | None = None,
                   username: str | None = None, password: str | None = None) -> bytes:
    """An MQTT 3.1.1 CONNECT packet."""
    def text(value: str | bytes) -> bytes:
        data = value.encode() if isinstance(value, str) else value
        return struct.pack("!H", len(data)) + data
    flags = 0x02 if clean_session else 0
    payload = text(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += text(topic) + text(message)
    if username is not None:
        flags |= 0x80
        payload += text(username)
    if password is not None:
        flags |= 0x40
        payload += text(password)
    body = text("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + payload
    return bytes([0x10]) + _remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes) -> bytes:
    """An MQTT 3.1.1 QoS 0 PUBLISH packet."""
    name = topic.encode()
    body = struct.pack("!H", len(name)) + name + payload
    return bytes([0x30]) + _remaining_length(len(body)) + body


def _remaining_length(length: int) -> bytes:
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


class RawClient:
    """A bare TCP client: sends CONNECT, reads CONNACK, then says nothing, like a device that
    froze or lost power. The broker alone decides when the connection ends."""

    def __init__(self, host: str, port: int, client_id: str, *, keepalive: int = 60,
                 clean_session: bool = True, will: tuple[str, bytes, int, bool] | None = None,
                 username: str | None = None, password: str | None = None,
                 timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.sendall(connect_packet(client_id, keepalive=keepalive,
                                         clean_session=clean_session, will=will,
                                         username=username, password=password))
        connack = self._read_exactly(4, timeout)
        if len(connack) != 4 or connack[0] != 0x20:
            raise ConnectionError(f"{client_id}: no CONNACK (got {connack!r})")
        self.connack_code = connack[3]
        self.connected_at = time.monotonic()

    def _read_exactly(self, count: int, timeout: float) -> bytes:
        self.sock.settimeout(timeout)
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def wait_closed(self, timeout: float) -> bool:
        """True once the broker has closed the connection (EOF or reset) within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.sock.settimeout(remaining)
            try:
                if not self.sock.recv(4096):
                    return True
            except (ConnectionResetError, BrokenPipeError):
                return True
            except (socket.timeout, TimeoutError):
                return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- a RabbitMQ cluster: members of our own on free loopback ports --------------------------

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
EPMD = Path("/usr/bin/epmd")


def rabbitmq_available() -> bool:
    return (RABBITMQ_BIN / "rabbitmq-server").is_file() and EPMD.is_file()


@dataclass
class RabbitMember:
    """One member: its Erlang node name, MQTT port, and the `beam.smp` process."""

    name: str
    mqtt_port: int
    amqp_port: int
    dist_port: int
    popen: subprocess.Popen[bytes]
    log_path: Path
    config_path: Path

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


class RabbitCluster:
    """A RabbitMQ cluster started from the Debian package's scripts, never its system service.

    Its own epmd (the Erlang port mapper) on a free port, so nothing is shared with other runs;
    each member runs `rabbitmq-server` in the foreground (exec'ed into `beam.smp`, so its PID is
    the broker's), with data, logs and Erlang cookie under `directory`. Members after the first
    join it with `rabbitmqctl join_cluster`.
    """

    def __init__(self, directory: Path, *, owns_directory: bool) -> None:
        self.directory = directory
        self._owns_directory = owns_directory
        self.members: list[RabbitMember] = []
        self.epmd_port = free_port()
        self.tag = f"f{os.getpid()}x{time.monotonic_ns() % 100_000}"
        self.home = directory / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(f"cookie{os.urandom(12).hex()}")
        cookie.chmod(0o400)
        (directory / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        self._epmd_log = open(directory / "epmd.log", "wb")
        self.epmd = subprocess.Popen([str(EPMD), "-port", str(self.epmd_port)],
                                     stdin=subprocess.DEVNULL, stdout=self._epmd_log,
                                     stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        self.started_in: float | None = None

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.members]

    @property
    def broker_list(self) -> str:
        """Every member's URL, as one `--broker` value."""
        return ",".join(self.urls)

    def env(self, name: str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(HOME=str(self.home), ERL_EPMD_PORT=str(self.epmd_port),
                   RABBITMQ_ENABLED_PLUGINS_FILE=str(self.directory / "enabled_plugins"),
                   RUNNING_UNDER_SYSTEMD="true")  # exec beam.smp in the foreground, -noinput
        if name is not None:
            env.update(RABBITMQ_NODENAME=name)
        return env

    def spawn(self, index: int) -> RabbitMember:
        """Start member `index` (not yet clustered, or again after it died: then on its old
        ports and data, so it rejoins the cluster by itself): returns at once."""
        name = f"{self.tag}m{index}@localhost"
        if index < len(self.members):
            old = self.members[index]
            mqtt_port, amqp_port, dist_port = old.mqtt_port, old.amqp_port, old.dist_port
        else:
            mqtt_port, amqp_port, dist_port = free_port(), free_port(), free_port()
        base = self.directory / f"m{index}"
        base.mkdir(exist_ok=True)
        config = base / "rabbitmq.conf"
        config.write_text(
            f"listeners.tcp.default = 127.0.0.1:{amqp_port}\n"
            f"mqtt.listeners.tcp.default = 127.0.0.1:{mqtt_port}\n"
            "mqtt.allow_anonymous = true\n"
            "loopback_users = none\n"
            "log.console = false\n"
            "log.file.level = warning\n")
        env = self.env(name)
        env.update(RABBITMQ_CONFIG_FILE=str(config), RABBITMQ_DIST_PORT=str(dist_port),
                   RABBITMQ_MNESIA_BASE=str(base / "mnesia"), RABBITMQ_LOG_BASE=str(base / "log"),
                   RABBITMQ_PID_FILE=str(base / "pid"))
        log_path = base / "stdout.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen([str(RABBITMQ_BIN / "rabbitmq-server")],
                                     stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, cwd=base, env=env,
                                     preexec_fn=_die_with_parent)
        member = RabbitMember(name=name, mqtt_port=mqtt_port, amqp_port=amqp_port,
                              dist_port=dist_port, popen=popen, log_path=log_path,
                              config_path=config)
        if index < len(self.members):
            self.members[index] = member
        else:
            self.members.append(member)
        return member

    def wait_mqtt(self, member: RabbitMember, timeout: float) -> None:
        """Until the member's MQTT listener accepts; an error with its log if it died."""
        deadline = time.monotonic() + timeout
        while not _accepts(member.mqtt_port):
            if not member.alive:
                raise RuntimeError(f"RabbitMQ member {member.name} exited "
                                   f"({member.popen.returncode}):\n{self.log_of(member)}")
            if time.monotonic() >= deadline:
                raise RuntimeError(f"RabbitMQ member {member.name} not listening on MQTT port "
                                   f"{member.mqtt_port} within {timeout:g}s:\n"
                                   f"{self.log_of(member)}")
            time.sleep(0.1)

    def ctl(self, member: RabbitMember, *args: str, timeout: float = 60.0) -> str:
        """`rabbitmqctl -n <member> ARGS`; an error with its output if it fails."""
        done = subprocess.run([str(RABBITMQ_BIN / "rabbitmqctl"), "-q", "-n", member.name,
                               *args], env=self.env(), capture_output=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {member.name} failed "
                               f"({done.returncode}): {done.stdout.decode(errors='replace')}"
                               f"{done.stderr.decode(errors='replace')}")
        return done.stdout.decode(errors="replace")

    def join(self, member: RabbitMember, timeout: float = 60.0) -> None:
        """Make `member` a member of the first member's cluster."""
        self.ctl(member, "stop_app")
        self.ctl(member, "join_cluster", self.members[0].name)
        self.ctl(member, "start_app")
        self.wait_mqtt(member, timeout)

    def running_members(self) -> str:
        """`cluster_status` as the first live member sees it."""
        live = [m for m in self.members if m.alive]
        return self.ctl(live[0], "cluster_status", "--formatter", "json") if live else ""

    def kill(self, index: int) -> None:
        """SIGKILL one member (a crash: no goodbye to its clients or peers)."""
        member = self.members[index]
        if member.alive:
            member.popen.kill()
        member.popen.wait(10)

    def restart(self, index: int, timeout: float = 90.0) -> RabbitMember:
        """Start a killed member again; returns once its MQTT listener accepts."""
        if self.members[index].alive:
            raise RuntimeError(f"member {index} is still running")
        member = self.spawn(index)
        self.wait_mqtt(member, timeout)
        return member

    def log_bytes(self) -> int:
        """How much every member has written to its logs (a reconnect storm shows here)."""
        return sum(path.stat().st_size for path in self.directory.glob("m*/log/*.log"))

    def log_of(self, member: RabbitMember) -> str:
        texts = []
        for path in [member.log_path, *sorted((member.log_path.parent / "log").glob("*.log"))]:
            try:
                texts.append(path.read_text(errors="replace")[-4000:])
            except OSError:
                pass
        return "\n".join(texts)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every member (SIGKILL after `timeout`), then epmd; remove the directory."""
        for member in self.members:
            if member.alive:
                member.popen.terminate()
        deadline = time.monotonic() + timeout
        for member in self.members:
            try:
                member.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                member.popen.kill()
                member.popen.wait(10)
        if self.epmd.poll() is None:
            self.epmd.terminate()
            try:
                self.epmd.wait(5)
            except subprocess.TimeoutExpired:
                self.epmd.kill()
                self.epmd.wait(5)
        self._epmd_log.close()
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RabbitCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_rabbitmq_cluster(members: int = 3, *, directory: str | os.PathLike[str] | None = None,
                           timeout: float = 120.0) -> RabbitCluster:
    """A running `members`-member RabbitMQ cluster with the MQTT plugin, on loopback.

    Members boot in parallel (a boot takes 10-20 s of CPU on a small machine), then join the
    first one. Raises, naming the cause, when RabbitMQ is not installed or a member fails.
    """
    if not rabbitmq_available():
        raise RuntimeError(f"RabbitMQ is not installed ({RABBITMQ_BIN / 'rabbitmq-server'} or "
                           f"{EPMD} missing): run scripts/install_test_deps.sh (Debian package "
                           "rabbitmq-server)")
    workdir, owned = _workdir(directory, "rabbitmq")
    cluster = RabbitCluster(workdir, owns_directory=owned)
    began = time.monotonic()
    try:
        spawned = [cluster.spawn(i) for i in range(members)]
        for member in spawned:
            cluster.wait_mqtt(member, max(1.0, began + timeout - time.monotonic()))
        for member in spawned[1:]:
            cluster.join(member, timeout=max(1.0, began + timeout - time.monotonic()))
    except BaseException:
        cluster.stop()
        raise
    cluster.started_in = time.monotonic() - began
    return cluster


# -- plain amqtt, for showing that the promise tests fail without the fixes -----------------

def _run_unpatched() -> None:  # pragma: no cover - runs in a broker subprocess
    """`python -m broker` with amqtt's own `Broker` in place of `FabricBroker`: same
    listeners and mosquitto-file plugins, none of the fixes. Anonymous access is granted by
    amqtt's AnonymousAuthPlugin, as a plain amqtt config grants it."""
    import asyncio
    from functools import partial

    from amqtt.broker import Broker

    import broker.embedded as embedded
    from broker.cli import main

    class UnpatchedBroker(Broker):
        def __init__(self, config: dict[str, Any], *, servers: dict[str, Any],
                     **_ignored: Any) -> None:
            auth = config["plugins"]["broker.plugins.PasswordFileAuthPlugin"]
            if auth["allow_anonymous"]:
                config["plugins"]["amqtt.plugins.authentication.AnonymousAuthPlugin"] = {
                    "allow_anonymous": True}
                if auth["passwords"] is None:
                    del config["plugins"]["broker.plugins.PasswordFileAuthPlugin"]
            super().__init__(config)
            self._specs = servers

        async def _create_server_instance(self, listener_name: str, *args: Any) -> Any:
            spec = self._specs[listener_name]
            return await asyncio.start_server(
                partial(self.stream_connected, listener_name=listener_name), spec.host,
                spec.port, reuse_address=True, ssl=spec.ssl_context)

        def bound_addresses(self) -> list[tuple[str, str, int]]:
            return [(name, *sock.getsockname()[:2]) for name, server in self._servers.items()
                    for sock in server.instance.sockets]

    embedded.FabricBroker = UnpatchedBroker  # type: ignore[misc,assignment]
    sys.argv[0] = "broker (unpatched)"
    raise SystemExit(main())
