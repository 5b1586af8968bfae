"""Overrides of amqtt that no broker-neutral promise shows: the bounds of delivery to a slow
or absent subscriber, and the per-packet fast paths, checked inside the broker's own event
loop with bare MQTT packets (the map of every override to its test is in
tests/test_broker_promises.py)."""

from __future__ import annotations

import asyncio
import struct
from typing import Any, Awaitable, Callable

import pytest

import broker.delivery as delivery
from broker import EmbeddedBroker, parse_config
from broker.delivery import DeliveryHandler
from broker.fixes import FabricBroker
from support.brokers import connect_packet

TIMEOUT = 10.0


class Client:
    """A bare MQTT 3.1.1 client on asyncio streams: it acknowledges only when told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._next_id = 0

    @classmethod
    async def connect(cls, address: tuple[str, int], client_id: str, *,
                      clean_session: bool = True) -> Client:
        reader, writer = await asyncio.open_connection(*address)
        writer.write(connect_packet(client_id, clean_session=clean_session))
        connack = await asyncio.wait_for(reader.readexactly(4), TIMEOUT)
        assert connack[0] == 0x20 and connack[3] == 0, connack
        return cls(reader, writer)

    def packet_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def read(self) -> tuple[int, bytes]:
        """The next packet: its type and flags byte, and its body."""
        first = (await asyncio.wait_for(self.reader.readexactly(1), TIMEOUT))[0]
        length, multiplier = 0, 1
        while True:
            byte = (await asyncio.wait_for(self.reader.readexactly(1), TIMEOUT))[0]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            if not byte & 0x80:
                break
        return first, await asyncio.wait_for(self.reader.readexactly(length), TIMEOUT)

    async def subscribe(self, topic: str, qos: int) -> None:
        name = topic.encode()
        body = struct.pack("!HH", self.packet_id(), len(name)) + name + bytes([qos])
        self.writer.write(bytes([0x82, len(body)]) + body)
        first, suback = await self.read()
        assert first == 0x90 and suback[-1] == qos, suback

    async def publish(self, topic: str, payload: bytes) -> None:
        """QoS 1, waiting for the broker's PUBACK."""
        name = topic.encode()
        packet_id = self.packet_id()
        body = struct.pack("!H", len(name)) + name + struct.pack("!H", packet_id) + payload
        self.writer.write(bytes([0x32, len(body)]) + body)
        first, puback = await self.read()
        assert first == 0x40 and puback == struct.pack("!H", packet_id)

    async def message(self) -> tuple[bytes, int | None]:
        """The next PUBLISH: its payload and (QoS 1) packet id, not acknowledged yet."""
        first, body = await self.read()
        assert first >> 4 == 3, first
        start = 2 + struct.unpack("!H", body[:2])[0]
        if (first >> 1) & 0x03:
            return body[start + 2:], struct.unpack("!H", body[start:start + 2])[0]
        return body[start:], None

    def acknowledge(self, packet_id: int | None) -> None:
        assert packet_id is not None
        self.writer.write(b"\x40\x02" + struct.pack("!H", packet_id))

    async def disconnect(self) -> None:
        self.writer.write(b"\xe0\x00")
        await self.writer.drain()
        self.writer.close()


def _run(config_text: str, scenario: Callable[[tuple[str, int]], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        config = parse_config(config_text).with_port(0)
        async with EmbeddedBroker(config) as embedded:
            return await scenario(embedded.addresses[0])
    return asyncio.run(asyncio.wait_for(main(), 60))


CONFIG = "listener 1883 127.0.0.1\nallow_anonymous true\n"


def test_a_subscriber_out_of_packet_ids_gets_the_rest_in_order_and_the_excess_dropped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`DeliveryHandler.mqtt_publish`, `post`: once `MAX_INFLIGHT` messages wait for their
    PUBACK, later ones wait for a packet id, in order (amqtt failed once 65,535 were
    unacknowledged), and beyond `max_queued_messages` waiting they are dropped."""
    monkeypatch.setattr(delivery, "MAX_INFLIGHT", 4)

    async def scenario(address: tuple[str, int]) -> list[bytes]:
        subscriber = await Client.connect(address, "slow")
        await subscriber.subscribe("t", 1)
        publisher = await Client.connect(address, "fast")
        for number in range(12):
            await publisher.publish("t", b"m%d" % number)
        unacknowledged = [await subscriber.message() for _ in range(4)]
        received = [payload for payload, _ in unacknowledged]
        for _, packet_id in unacknowledged:
            subscriber.acknowledge(packet_id)
        await publisher.publish("t", b"end")
        while received[-1] != b"end":
            payload, packet_id = await subscriber.message()
            subscriber.acknowledge(packet_id)
            received.append(payload)
        await publisher.disconnect()
        await subscriber.disconnect()
        return received
    # 4 in flight, 3 waiting for an id (max_queued_messages 3), m7..m11 dropped
    assert _run(CONFIG + "max_queued_messages 3\n", scenario) == \
        [b"m%d" % number for number in range(7)] + [b"end"]


def test_an_offline_persistent_session_queues_up_to_max_queued_messages() -> None:
    """`FabricBroker._retain_broadcast_message`, `_publish_session_retained_messages`: a
    persistent session away keeps the oldest `max_queued_messages` (amqtt kept them all),
    delivered with retain=0 before anything published after it is back."""
    async def scenario(address: tuple[str, int]) -> list[tuple[bytes, int]]:
        subscriber = await Client.connect(address, "away", clean_session=False)
        await subscriber.subscribe("q", 1)
        await subscriber.disconnect()
        publisher = await Client.connect(address, "pub")
        for number in range(6):
            await publisher.publish("q", b"m%d" % number)
        back = await Client.connect(address, "away", clean_session=False)
        await publisher.publish("q", b"live")
        received: list[tuple[bytes, int]] = []
        while not received or received[-1][0] != b"live":
            first, body = await back.read()
            assert first >> 4 == 3, first
            start = 2 + struct.unpack("!H", body[:2])[0]
            received.append((body[start + 2:], first & 0x01))
            back.acknowledge(struct.unpack("!H", body[start:start + 2])[0])
        await publisher.disconnect()
        await back.disconnect()
        return received
    assert _run(CONFIG + "max_queued_messages 3\n", scenario) == \
        [(b"m0", 0), (b"m1", 0), (b"m2", 0), (b"live", 0)]


def test_a_quiet_connection_takes_the_fast_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """`DeliveryHandler._reader_loop`, `post`, `_acknowledged`, and the broker's
    `_message_in_place`: with no plugin listening to single packets, a QoS 1 publish is
    handed to the broker by its reader, broadcast by a direct write, and its subscriber's
    PUBACK taken in place, with no task and no queue for any of them, in order."""
    counts = {"in_place": 0, "posted": 0, "acknowledged": 0}
    post, in_place, acknowledged = (DeliveryHandler.post, FabricBroker._message_in_place,
                                    DeliveryHandler._acknowledged)

    def counting_post(self: DeliveryHandler, *args: Any) -> bool:
        done = post(self, *args)
        counts["posted"] += done
        return done

    async def counting_in_place(self: FabricBroker, *args: Any) -> None:
        counts["in_place"] += 1
        await in_place(self, *args)

    def counting_acknowledged(self: DeliveryHandler, packet_id: int) -> None:
        counts["acknowledged"] += 1
        acknowledged(self, packet_id)
    monkeypatch.setattr(DeliveryHandler, "post", counting_post)
    monkeypatch.setattr(FabricBroker, "_message_in_place", counting_in_place)
    monkeypatch.setattr(DeliveryHandler, "_acknowledged", counting_acknowledged)

    async def scenario(address: tuple[str, int]) -> list[bytes]:
        subscriber = await Client.connect(address, "sub")
        await subscriber.subscribe("f", 1)
        publisher = await Client.connect(address, "pub")
        received = []
        for number in range(20):
            await publisher.publish("f", b"m%d" % number)
            payload, packet_id = await subscriber.message()
            subscriber.acknowledge(packet_id)
            received.append(payload)
        await publisher.publish("f", b"end")  # the last PUBACK is in before this one
        received.append((await subscriber.message())[0])
        await publisher.disconnect()
        await subscriber.disconnect()
        return received
    assert _run(CONFIG, scenario) == [b"m%d" % number for number in range(20)] + [b"end"]
    assert counts == {"in_place": 21, "posted": 21, "acknowledged": 20}
