"""Broker lists: parsing, connecting to the first member that answers, failing over when a
member dies, and a backoff that a member accepting-then-dropping cannot turn into a storm.

Against real brokers (the embedded one as its own process); the member that accepts a
connection and drops it at once is a small TCP listener here, the fault a dying cluster
member (or a load balancer in front of one) shows its clients."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from core.errors import BrokerUnavailable, ConfigError
from core.mqtt import MqttSession
from core.topics import validate_id
from core.url import parse_broker_url
from support.brokers import free_port, start_embedded
from support.fabric import wait_until

# -- parsing -------------------------------------------------------------------------------------


def test_a_list_parses_in_order_sharing_scheme_and_user() -> None:
    url = parse_broker_url("mqtt://node@10.0.0.1,10.0.0.2:1884 mqtt://10.0.0.3:1885")
    assert [(m.host, m.port) for m in url.members] == [("10.0.0.1", 1883), ("10.0.0.2", 1884),
                                                       ("10.0.0.3", 1885)]
    assert {m.username for m in url.members} == {"node"}
    assert str(url) == "mqtt://node:***@10.0.0.1:1883,mqtt://10.0.0.2:1884,mqtt://10.0.0.3:1885"
    tls = parse_broker_url("mqtts://a,b")
    assert [(m.port, m.tls) for m in tls.members] == [(8883, True), (8883, True)]
    assert parse_broker_url(["mqtt://a:1", "b:2"]).alternates == (("b", 2),)
    assert parse_broker_url(None, env={"FABRIC_BROKER": "a:1,b:2"}).alternates == (("b", 2),)
    single = parse_broker_url("mqtt://a:1")
    assert single.members == (single,) and str(single) == "mqtt://a:1"


@pytest.mark.parametrize("text, words", [
    ("mqtt://a,mqtts://b", "mixes mqtt:// and mqtts://"),
    ("mqtt://u@a,mqtt://v@b", "credentials of its own"),
    ("mqtt://a:1,a:1", "named twice"),
    ("mqtt://a,ftp://b", "scheme must be"),
])
def test_a_bad_list_says_which_member_and_why(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_broker_url(text)
    with pytest.raises(ConfigError, match="empty"):
        parse_broker_url([])


def test_ids_refuse_a_dot_and_say_why() -> None:
    with pytest.raises(ConfigError, match=r"RabbitMQ.*'lab-pi'"):
        validate_id("lab.pi", what="node id")
    assert validate_id("lab-pi:1_a", what="node id") == "lab-pi:1_a"


# -- connecting and failing over -----------------------------------------------------------------


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[list]:
    started = [start_embedded(directory=tmp_path / f"b{i}") for i in range(2)]
    yield started
    for broker in started:
        broker.stop()


def test_the_first_member_that_answers_takes_the_session(brokers: list) -> None:
    dead = f"mqtt://127.0.0.1:{free_port()}"
    session = MqttSession(broker=parse_broker_url(f"{dead},{brokers[0].url}"), client_id="first")
    session.start(timeout=5)
    try:
        assert session.member.port == brokers[0].port
        assert session.member_client_id == "first~1"  # one client id per member
    finally:
        session.stop()


def test_a_single_url_still_fails_at_once_and_a_list_names_every_member() -> None:
    port_a, port_b = free_port(), free_port()
    began = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=f"nothing listens on 127.0.0.1:{port_a}"):
        MqttSession(broker=parse_broker_url(f"mqtt://127.0.0.1:{port_a}"),
                    client_id="one").start(timeout=10)
    with pytest.raises(BrokerUnavailable) as refused:
        MqttSession(broker=parse_broker_url(f"127.0.0.1:{port_a},127.0.0.1:{port_b}"),
                    client_id="two").start(timeout=10)
    assert time.monotonic() - began < 5  # definite refusals: no waiting out the timeout
    text = str(refused.value)
    assert "any member" in text and f"127.0.0.1:{port_a}" in text \
        and f"127.0.0.1:{port_b}" in text and "within" not in text


def test_a_session_fails_over_to_the_next_member_and_keeps_its_subscriptions(
        brokers: list) -> None:
    url = parse_broker_url(f"{brokers[0].url},{brokers[1].url}")
    got: list[bytes] = []
    session = MqttSession(broker=url, client_id="mover", keepalive=2)
    session.subscribe("lists/t", lambda _t, p: got.append(p))
    session.start(timeout=5)
    publisher = MqttSession(broker=parse_broker_url(brokers[1].url), client_id="pub")
    publisher.start(timeout=5)
    try:
        assert session.member.port == brokers[0].port
        brokers[0].kill()
        wait_until(lambda: session.connected and session.member.port == brokers[1].port, 10,
                   message="the session on the second member")
        wait_until(lambda: (publisher.publish("lists/t", b"x"), got)[1], 5, interval=0.1,
                   message="a message through the second member")
        assert session.connects == 2
    finally:
        publisher.stop()
        session.stop()


class _AcceptThenDrop:
    """A listener that answers CONNECT with CONNACK (accepted) and closes at once."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(1024)                      # the CONNECT
                    conn.sendall(b"\x20\x02\x00\x00")    # CONNACK: accepted
                    self.accepted += 1
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_a_member_that_accepts_and_drops_gets_no_storm_of_reconnects() -> None:
    """Before, the backoff went back to its minimum at every accepted connection: 20 a
    second. Now it resets only once a session stayed up, so it doubles to its cap."""
    flaky = _AcceptThenDrop()
    session = MqttSession(broker=parse_broker_url(f"mqtt://127.0.0.1:{flaky.port}"),
                          client_id="storm", reconnect_min=0.05, reconnect_max=1.0)
    try:
        session.start(timeout=5)
        window_end = time.monotonic() + 4.0
        wait_until(lambda: time.monotonic() >= window_end, 5, interval=0.1)
        connects = session.connects
    finally:
        session.stop()
        flaky.close()
    # 0.05 + 0.1 + 0.2 + 0.4 + 1 + 1 + ... : at most about 7 in 4 s (a storm would be ~80)
    assert 3 <= connects <= 9, connects
