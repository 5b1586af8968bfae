"""The embedded broker's own PUBLISH encoding and decoding give what amqtt's packet classes
give, byte for byte and field for field (it skips their objects on the hot path)."""

from __future__ import annotations

import pytest
from amqtt.mqtt.publish import PublishPacket

from broker.delivery import decode_publish, encode_publish


@pytest.mark.parametrize("topic, size, qos, packet_id", [
    ("a/b", 5, 1, 7), ("sim/é/status", 300, 0, None), ("t", 20_000, 1, 65_535),
    ("t", 0, 0, None), ("fleet/n1/tasks", 2_100_000, 1, 3), ("", 127, 1, 1),
])
def test_publish_round_trip_matches_amqtt(topic: str, size: int, qos: int,
                                          packet_id: int | None) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    wire = encode_publish(topic, data, qos, packet_id)
    assert wire == PublishPacket.build(topic, data, packet_id, False, qos, False).to_bytes()
    length, shift, index = 0, 0, 1
    while True:  # the remaining length, then the body
        length |= (wire[index] & 0x7F) << shift
        shift += 7
        index += 1
        if not wire[index - 1] & 0x80:
            break
    packet = decode_publish(wire[0], wire[index:])
    assert len(wire[index:]) == length
    assert (packet.topic_name, packet.data, packet.qos, packet.retain_flag) == \
        (topic, data, qos, False)
    assert packet.packet_id == packet_id


def test_a_topic_that_is_not_utf8_reads_as_amqtt_reads_it() -> None:
    body = (3).to_bytes(2, "big") + b"a\xffb" + b"payload"
    assert decode_publish(0x30, body).topic_name == str(b"a\xffb")
