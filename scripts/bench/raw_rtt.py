"""The broker alone: a QoS 1 request/reply round trip between two clients of the fabric's own
MQTT session (paho, TCP_NODELAY), the floor under any task round trip through that broker."""

from __future__ import annotations

import threading
import time
import uuid

from core.mqtt import MqttSession
from core.url import parse_broker_url

__all__ = ["RequestReply", "request_reply"]


class RequestReply:
    """A requester and a responder on one broker, kept connected between measurements so
    they can be taken in turns with other round trips (the same moments of the machine)."""

    def __init__(self, broker_url: str, *, payload_size: int = 64, timeout: float = 10.0
                 ) -> None:
        url = parse_broker_url(broker_url)
        tag = uuid.uuid4().hex[:8]
        self.timeout = timeout
        self._request_topic = f"bench-raw/{tag}/request"
        reply_topic = f"bench-raw/{tag}/reply"
        self._padding = b"x" * max(0, payload_size - 8)
        self._responder = MqttSession(broker=url, client_id=f"raw-responder-{tag}")
        self._requester = MqttSession(broker=url, client_id=f"raw-requester-{tag}")
        self._answered = threading.Event()
        self._expected = b"probe"  # the request a reply must echo to count (late probes do not)
        self._sent = 0
        responder = self._responder

        def reply(_topic: str, payload: bytes) -> None:
            responder.publish(reply_topic, payload, qos=1)

        def on_reply(_topic: str, payload: bytes) -> None:
            if payload == self._expected:
                self._answered.set()

        responder.subscribe(self._request_topic, reply, qos=1)
        self._requester.subscribe(reply_topic, on_reply, qos=1)

    def __enter__(self) -> "RequestReply":
        self._responder.start(timeout=self.timeout)
        self._requester.start(timeout=self.timeout)
        self._await_subscriptions()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._requester.stop(timeout=2.0)
        self._responder.stop(timeout=2.0)

    def measure(self, count: int) -> list[float]:
        """Seconds per round trip, `count` of them, one at a time."""
        out: list[float] = []
        for _ in range(count):
            self._sent += 1
            payload = self._sent.to_bytes(8, "big") + self._padding
            self._expected = payload
            self._answered.clear()
            started = time.perf_counter()
            self._requester.publish(self._request_topic, payload, qos=1)
            if not self._answered.wait(self.timeout):
                raise TimeoutError(f"no reply within {self.timeout:g}s")
            out.append(time.perf_counter() - started)
        return out

    def _await_subscriptions(self) -> None:
        """Subscriptions are asynchronous: ask until the first answer comes (bounded)."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            self._requester.publish(self._request_topic, b"probe", qos=1)
            if self._answered.wait(0.2):
                return
        raise TimeoutError("the raw request/reply pair never answered")


def request_reply(broker_url: str, count: int, *, payload_size: int = 64, warmup: int = 50,
                  timeout: float = 10.0) -> list[float]:
    """Seconds per round trip, `count` of them, after `warmup` uncounted ones."""
    with RequestReply(broker_url, payload_size=payload_size, timeout=timeout) as pair:
        pair.measure(warmup)
        return pair.measure(count)
