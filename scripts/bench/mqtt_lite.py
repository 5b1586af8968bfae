"""A minimal MQTT 3.1.1 client over asyncio streams, to simulate many devices in one process.

Only what a simulated node needs: CONNECT (clean session, will, keepalive), SUBSCRIBE,
PUBLISH at QoS 0 and 1 both ways (what arrives at QoS 1 is acknowledged), PINGREQ and
DISCONNECT. One coroutine per connection reads; a publish is written to the stream at once
(TCP_NODELAY), without waiting for its acknowledgement. A thousand of these cost about what
a thousand sockets cost: no thread each, as paho would need.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct
import time
from typing import Callable

__all__ = ["MqttLite", "MqttLiteError"]

_CONNECT, _CONNACK, _PUBLISH, _PUBACK = 0x10, 0x20, 0x30, 0x40
_SUBSCRIBE, _SUBACK, _PINGREQ, _PINGRESP, _DISCONNECT = 0x82, 0x90, 0xC0, 0xD0, 0xE0

OnMessage = Callable[[str, bytes], None]


class MqttLiteError(Exception):
    """The broker refused us, broke the protocol, or did not answer in time."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _text(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(raw)) + raw


def _packet(header: int, body: bytes) -> bytes:
    return bytes([header]) + _varint(len(body)) + body


class MqttLite:
    """One MQTT connection driven by the running asyncio loop."""

    def __init__(self, client_id: str, *, on_message: OnMessage | None = None,
                 keepalive: int = 60, will: tuple[str, bytes, int, bool] | None = None) -> None:
        self.client_id = client_id
        self.keepalive = keepalive
        self.will = will
        self.on_message = on_message
        self.sent = 0
        self.received = 0
        self.unacknowledged = 0
        self._ids = itertools.cycle(range(1, 65536))
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task] = []
        self._subacks: dict[int, asyncio.Future] = {}
        self._last_out = 0.0
        self.closed = asyncio.Event()

    async def connect(self, host: str, port: int, *, timeout: float = 10.0) -> None:
        """Open the connection and wait (bounded) for the broker's CONNACK."""
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(host, port), timeout)
        sock = self._writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        flags = 0x02  # clean session
        payload = _text(self.client_id)
        if self.will is not None:
            topic, message, qos, retain = self.will
            flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
            payload += _text(topic) + _text(message)
        body = _text("MQTT") + bytes([4, flags]) + struct.pack("!H", self.keepalive) + payload
        self._write(_packet(_CONNECT, body))
        header, body = await asyncio.wait_for(self._read_packet(), timeout)
        if header & 0xF0 != _CONNACK or len(body) != 2 or body[1] != 0:
            raise MqttLiteError(f"{self.client_id}: connection refused ({body.hex()})")
        self._tasks = [asyncio.create_task(self._read_loop()),
                       asyncio.create_task(self._keep_alive())]

    async def subscribe(self, topic_filter: str, *, qos: int = 1, timeout: float = 10.0) -> None:
        """Subscribe and wait (bounded) for the SUBACK."""
        packet_id = next(self._ids)
        done = asyncio.get_running_loop().create_future()
        self._subacks[packet_id] = done
        self._write(_packet(_SUBSCRIBE, struct.pack("!H", packet_id) + _text(topic_filter)
                            + bytes([qos])))
        granted = await asyncio.wait_for(done, timeout)
        if granted == 0x80:
            raise MqttLiteError(f"{self.client_id}: subscription to {topic_filter} refused")

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Write a PUBLISH now; a QoS 1 one counts as unacknowledged until its PUBACK."""
        header = _PUBLISH | (qos << 1) | (1 if retain else 0)
        body = _text(topic)
        if qos:
            body += struct.pack("!H", next(self._ids))
            self.unacknowledged += 1
        self._write(_packet(header, body + payload))
        self.sent += 1

    async def disconnect(self) -> None:
        """Say DISCONNECT (no will) and close."""
        if self._writer is not None and not self._writer.is_closing():
            self._write(bytes([_DISCONNECT, 0]))
        await self.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._writer is not None and not self._writer.is_closing():
            self._writer.close()
            try:
                await asyncio.wait_for(self._writer.wait_closed(), 2.0)
            except (asyncio.TimeoutError, OSError):
                pass
        self.closed.set()

    # -- internals -------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._writer is None or self._writer.is_closing():
            raise MqttLiteError(f"{self.client_id}: not connected")
        self._writer.write(data)
        self._last_out = time.monotonic()

    async def _read_packet(self) -> tuple[int, bytes]:
        assert self._reader is not None
        header = (await self._reader.readexactly(1))[0]
        length, shift = 0, 0
        for _ in range(4):
            digit = (await self._reader.readexactly(1))[0]
            length |= (digit & 0x7F) << shift
            shift += 7
            if not digit & 0x80:
                break
        else:
            raise MqttLiteError(f"{self.client_id}: malformed remaining length")
        return header, await self._reader.readexactly(length) if length else b""

    async def _read_loop(self) -> None:
        try:
            while True:
                header, body = await self._read_packet()
                kind = header & 0xF0
                if kind == _PUBLISH:
                    self._on_publish(header, body)
                elif kind == _PUBACK:
                    self.unacknowledged -= 1
                elif kind == _SUBACK:
                    packet_id = struct.unpack("!H", body[:2])[0]
                    waiter = self._subacks.pop(packet_id, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(body[2] if len(body) > 2 else 0x80)
        except (asyncio.IncompleteReadError, ConnectionError, MqttLiteError, OSError):
            pass
        finally:
            self.closed.set()

    def _on_publish(self, header: int, body: bytes) -> None:
        qos = (header >> 1) & 0x03
        length = struct.unpack("!H", body[:2])[0]
        topic = body[2:2 + length].decode()
        start = 2 + length
        if qos:
            packet_id = body[start:start + 2]
            start += 2
            self._write(bytes([_PUBACK, 2]) + packet_id)
        self.received += 1
        if self.on_message is not None:
            self.on_message(topic, body[start:])

    async def _keep_alive(self) -> None:
        """PINGREQ when we have been silent for half the keepalive."""
        if not self.keepalive:
            return
        while True:
            await asyncio.sleep(self.keepalive / 4)
            if time.monotonic() - self._last_out >= self.keepalive / 2:
                self._write(bytes([_PINGREQ, 0]))
