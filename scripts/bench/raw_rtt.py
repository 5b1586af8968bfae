"""The broker alone: a QoS 1 request/reply round trip between two clients of the fabric's own
MQTT session (paho, TCP_NODELAY), the floor under any task round trip through that broker."""

from __future__ import annotations

import threading
import time
import uuid

from core.mqtt import MqttSession
from core.url import parse_broker_url

__all__ = ["request_reply"]


def request_reply(broker_url: str, count: int, *, payload_size: int = 64, warmup: int = 50,
                  timeout: float = 10.0) -> list[float]:
    """Seconds per round trip, `count` of them, one at a time."""
    url = parse_broker_url(broker_url)
    tag = uuid.uuid4().hex[:8]
    request_topic, reply_topic = f"bench-raw/{tag}/request", f"bench-raw/{tag}/reply"
    responder = MqttSession(broker=url, client_id=f"raw-responder-{tag}")
    requester = MqttSession(broker=url, client_id=f"raw-requester-{tag}")
    answered = threading.Event()
    expected = [b""]  # the request a reply must echo to count (late probes do not)

    def reply(_topic: str, payload: bytes) -> None:
        responder.publish(reply_topic, payload, qos=1)

    def on_reply(_topic: str, payload: bytes) -> None:
        if payload == expected[0]:
            answered.set()

    responder.subscribe(request_topic, reply, qos=1)
    requester.subscribe(reply_topic, on_reply, qos=1)
    responder.start(timeout=timeout)
    requester.start(timeout=timeout)
    try:
        padding = b"x" * max(0, payload_size - 8)
        expected[0] = b"probe"
        _await_subscriptions(requester, request_topic, b"probe", answered, timeout)
        out: list[float] = []
        for i in range(warmup + count):
            payload = i.to_bytes(8, "big") + padding
            expected[0] = payload
            answered.clear()
            started = time.perf_counter()
            requester.publish(request_topic, payload, qos=1)
            if not answered.wait(timeout):
                raise TimeoutError(f"no reply within {timeout:g}s")
            if i >= warmup:
                out.append(time.perf_counter() - started)
        return out
    finally:
        requester.stop(timeout=2.0)
        responder.stop(timeout=2.0)


def _await_subscriptions(requester: MqttSession, topic: str, payload: bytes,
                         answered: threading.Event, timeout: float) -> None:
    """Subscriptions are asynchronous: ask until the first answer comes (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        requester.publish(topic, payload, qos=1)
        if answered.wait(0.2):
            return
    raise TimeoutError("the raw request/reply pair never answered")
