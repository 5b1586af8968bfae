"""`DeliveryHandler`: amqtt 0.12.1's broker-side protocol handler with at-least-once QoS 1
and exactly-once QoS 2 delivery to subscribers (QoS 2 below follows the same rules, through
PUBREC/PUBREL/PUBCOMP).

amqtt waits 5 s for a subscriber's PUBACK, then forgets the message: a subscriber slow to
acknowledge (a busy master) leaves no record of what it is still owed, and a message in
flight when a persistent-session client drops is never sent again. amqtt also fails with an
error once 65,535 messages to one client are unacknowledged (no packet id is left).

Here a QoS 1 message stays in the session's `inflight_out` until its PUBACK arrives, however
long that takes: whether the connection is alive is the keepalive watchdog's business, not a
per-message timer's. Nothing is resent on a live connection: TCP already carries it, resending
to a subscriber that is merely slow only deepens its backlog, and MQTT 5 forbids it (mosquitto
does not either). When the connection ends first, the message stays in flight for a persistent
session and goes out again, DUP set, same packet id, as soon as the client is back
(MQTT-4.4.0-1); for a clean session it ends with the session.

Publishing waits, in order, for a free packet id instead of failing. The one bound, as in
mosquitto: once `MAX_INFLIGHT` messages to a client are unacknowledged, at most `max_queued`
more wait for an id; beyond that they are dropped with a warning rather than held in memory
without end.

Per packet this handler does less than amqtt's: a packet is read whole, a PUBACK and a QoS 0
or 1 PUBLISH from the client are taken in place rather than in a task each, and a broadcast
to this client is written at once (`post`) unless that would overtake an earlier delivery
still waiting for the socket, the write lock or a packet id.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Awaitable, Callable

from amqtt.adapters import BufferReader
from amqtt.errors import MQTTError
from amqtt.events import MQTTEvents
from amqtt.mqtt import packet_class
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.packet import (CONNECT, DISCONNECT, PINGREQ, PINGRESP, PUBACK, PUBCOMP, PUBLISH,
                               PUBREC, PUBREL, RESERVED_0, RESERVED_15, SUBACK, SUBSCRIBE,
                               UNSUBACK, UNSUBSCRIBE, MQTTFixedHeader)
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.publish import PublishPacket, PublishPayload, PublishVariableHeader
from amqtt.mqtt.pubrel import PubrelPacket
from amqtt.session import OUTGOING, IncomingApplicationMessage, OutgoingApplicationMessage, Session

__all__ = ["DeliveryHandler", "MAX_INFLIGHT", "RETRY_QOS2_TIMEOUT", "decode_publish",
           "encode_publish"]

log = logging.getLogger("broker")

# Packet ids are 1..65535, shared (in amqtt) by messages in flight both ways: leave some room
# for incoming QoS 2 messages.
MAX_INFLIGHT = 65_000
# amqtt's bound on resuming a QoS 2 exchange at reconnect, kept as it was.
RETRY_QOS2_TIMEOUT = 10.0

Undelivered = Callable[[Session, "DeliveryHandler", OutgoingApplicationMessage], None]

_HANDLERS = {SUBSCRIBE: "handle_subscribe", UNSUBSCRIBE: "handle_unsubscribe",
             SUBACK: "handle_suback", UNSUBACK: "handle_unsuback", PUBACK: "handle_puback",
             PUBREC: "handle_pubrec", PUBREL: "handle_pubrel", PUBCOMP: "handle_pubcomp",
             PINGREQ: "handle_pingreq", PINGRESP: "handle_pingresp", PUBLISH: "handle_publish",
             DISCONNECT: "handle_disconnect"}


# The publish packet of a message `post` wrote: it says only that the message went out once
# (so a resend sets DUP, MQTT-3.3.1-1); a resend builds the real packet.
_WRITTEN = PublishPacket.build("-", b"", 1, False, QOS_1, False)


def encode_publish(topic: str, data: bytes | bytearray, qos: int, packet_id: int | None
                   ) -> bytes:
    """A PUBLISH (retain=0, DUP=0) as amqtt would write it, without its packet objects."""
    name = topic.encode("utf-8")
    body = b"".join((len(name).to_bytes(2, "big"), name,
                     packet_id.to_bytes(2, "big") if qos and packet_id is not None else b"",
                     data))
    length = len(body)
    encoded = bytearray((0x30 | (qos << 1),))
    while True:
        byte, length = length & 0x7F, length >> 7
        encoded.append(byte | 0x80 if length else byte)
        if not length:
            break
    return bytes(encoded) + body


def decode_publish(first: int, body: bytes) -> PublishPacket:
    """A PUBLISH packet from its first byte and body, decoded as amqtt decodes it (a topic
    that is not UTF-8 becomes the text of its bytes; one with a wildcard is an MQTTError)."""
    flags = first & 0x0F
    length = int.from_bytes(body[:2], "big")
    if len(body) < 2 + length:
        raise MQTTError("PUBLISH shorter than its topic")
    raw = body[2:2 + length]
    try:
        topic = raw.decode("utf-8")
    except UnicodeDecodeError:
        topic = str(raw)
    start = 2 + length
    packet_id = None
    if (flags >> 1) & 0x03:
        if len(body) < start + 2:
            raise MQTTError("PUBLISH without its packet id")
        packet_id = int.from_bytes(body[start:start + 2], "big")
        start += 2
    return PublishPacket(MQTTFixedHeader(PUBLISH, flags, len(body)),
                         PublishVariableHeader(topic, packet_id), PublishPayload(body[start:]))


class ReceivedMessage(IncomingApplicationMessage):
    """A message from a client, with how many of its SUBSCRIBE/UNSUBSCRIBE packets came
    before it: the broker applies those first."""

    __slots__ = ("after_subscriptions",)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.after_subscriptions = 0


class DeliveryHandler(BrokerProtocolHandler):
    """The handler of one client connection. `on_undelivered` hears of every QoS 1 message
    whose connection ended before its PUBACK came: it is still in the session's
    `inflight_out`, or, if it never got a packet id, has `packet_id` None."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_undelivered: Undelivered | None = None
        # the broker's handling of a message from this client, in place of its queue
        self.on_message: Callable[[IncomingApplicationMessage], Awaitable[Any]] | None = None
        self.max_queued = 0  # messages waiting for a packet id, beyond which they are dropped
        self._stopped = False
        self._resumed = False  # messages in flight from an earlier connection were resent
        self._resending: set[asyncio.Task[Any]] = set()
        self._delivering: set[int] = set()  # packet ids with a flow running on this connection
        self._id_waiters: deque[asyncio.Future[None]] = deque()
        self._dropped = 0
        self._quiet = False  # no plugin hears of single packets: the fast paths may be taken
        self._posted: dict[int, OutgoingApplicationMessage] = {}  # by `post`, until PUBACK
        self._behind = 0  # publishes handed to `publish_behind` that have not started yet
        # SUBSCRIBE/UNSUBSCRIBE packets read, and applied by the broker: a publish read after
        # one must not overtake it (the client may be subscribed to its topic)
        self.subscriptions_read = 0
        self.subscriptions_applied = 0

    # -- reading: a packet at a time, acknowledgements without a task each ------------------

    async def _reader_loop(self) -> None:
        """amqtt's loop over the client's packets, reading each packet whole
        (`ConnectionReader.read_packet`) instead of a field at a time, and taking a PUBACK
        or a QoS 0/1 PUBLISH in place instead of starting a task for each. Packets are
        handled as amqtt handles them otherwise; QoS 2 flows still get their own task (they
        wait for packets this loop reads)."""
        read_packet = getattr(self.reader, "read_packet", None)
        session = self.session
        if read_packet is None or session is None or self._reader_ready is None or \
                (session.keep_alive or 0) > 0:
            await super()._reader_loop()  # no watchdog on this reader: amqtt's own timeouts
            return
        callbacks = getattr(self.plugins_manager, "_event_plugin_callbacks", None)
        quiet = callbacks is not None and MQTTEvents.PACKET_RECEIVED not in callbacks and \
            MQTTEvents.PACKET_SENT not in callbacks
        self._quiet = quiet
        running: deque[asyncio.Task[None]] = deque()
        try:
            while True:
                self._reader_ready.set()
                while running and running[0].done():
                    running.popleft()
                try:
                    packet = await read_packet()
                    if packet is None:
                        break  # end of stream
                    first, body = packet
                    kind = first >> 4
                    if quiet and kind == PUBACK and len(body) == 2:
                        self._acknowledged(int.from_bytes(body, "big"))
                    elif kind == PUBLISH:
                        publish = decode_publish(first, body)
                        if not quiet:
                            await self.plugins_manager.fire_event(
                                MQTTEvents.PACKET_RECEIVED, packet=publish, session=session)
                        if quiet and publish.qos in (QOS_0, QOS_1):
                            await self._received(session, publish)
                        else:
                            running.append(asyncio.create_task(self.handle_publish(publish)))
                    else:
                        task = await self._dispatch(session, first, body)
                        if task is not None:
                            running.append(task)
                except MQTTError:
                    log.debug("%s: message discarded", session.client_id)
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
        except asyncio.CancelledError:
            pass
        except Exception as e:  # as amqtt: a packet it cannot handle ends the connection
            log.warning("%s: unhandled exception reading from %s: %r", type(self).__name__,
                        session.client_id, e)
        while running:
            running.popleft().cancel()
        await self.handle_connection_closed()
        self._reader_stopped.set()
        await self.stop()

    def _acknowledged(self, packet_id: int) -> None:
        posted = self._posted.pop(packet_id, None)
        if posted is not None:
            self._delivering.discard(packet_id)
            session = self.session
            if session is not None and session.inflight_out.get(packet_id) is posted:
                del session.inflight_out[packet_id]
                self._release_packet_id()
            return
        waiter = self._puback_waiters.get(packet_id)
        if waiter is None or waiter.done():
            log.warning("PUBACK for unknown pending message id %d", packet_id)
            return
        waiter.set_result(PubackPacket.build(packet_id))

    async def _received(self, session: Session, publish: PublishPacket) -> None:
        """A QoS 0 or 1 message from the client: handed to the broker at once (`on_message`)
        when nothing of this client's is queued before it, else queued for the broker's loop
        of this client as amqtt queues it; then (QoS 1) acknowledged. A topic the broker
        refuses always takes the queue, where refusing it ends the session as in amqtt."""
        header = publish.variable_header
        payload = publish.payload
        if header is None or payload is None or payload.data is None:
            return
        topic = header.topic_name
        message = ReceivedMessage(header.packet_id, topic, publish.qos, payload.data,
                                  publish.retain_flag)
        message.publish_packet = publish
        queue = session.delivered_message_queue
        if self.on_message is None or not queue.empty() or self.subscribing or not topic \
                or topic[0] == "$":
            message.after_subscriptions = self.subscriptions_read  # see `subscribing`
            queue.put_nowait(message)
        else:
            await self.on_message(message)
        if publish.qos == QOS_1 and header.packet_id is not None and self.writer is not None:
            # written at once, not after the writes waiting for the socket to drain: reading
            # this client's packets never waits on what is being sent to it
            self.writer.write(b"\x40\x02" + header.packet_id.to_bytes(2, "big"))

    async def _dispatch(self, session: Session, first: int, body: bytes
                        ) -> asyncio.Task[None] | None:
        """Any other packet, decoded and handled by amqtt's own code, as its loop does."""
        kind, flags = first >> 4, first & 0x0F
        if kind in (RESERVED_0, RESERVED_15):
            log.warning("%s sent a reserved packet type: closing the connection",
                        session.client_id)
            await self.handle_connection_closed()
            return None
        fixed = MQTTFixedHeader(kind, flags, len(body))
        packet = await packet_class(fixed).from_stream(BufferReader(body), fixed_header=fixed)
        await self.plugins_manager.fire_event(MQTTEvents.PACKET_RECEIVED, packet=packet,
                                              session=session)
        if kind == CONNECT and isinstance(packet, ConnectPacket):
            await self.handle_connect(packet)
            return None
        name = _HANDLERS.get(kind)
        if name is None:
            log.warning("%s: unhandled packet type %d", session.client_id, kind)
            return None
        if kind in (SUBSCRIBE, UNSUBSCRIBE):
            self.subscriptions_read += 1  # until the broker applied it (`subscription_applied`)
            return asyncio.create_task(self._queue_subscription(getattr(self, name), packet))
        return asyncio.create_task(getattr(self, name)(packet))

    async def _queue_subscription(self, handle: Callable[[Any], Awaitable[None]],
                                  packet: Any) -> None:
        try:
            await handle(packet)
        except BaseException:
            self.subscription_applied()  # never queued for the broker: nothing to wait for
            raise

    @property
    def subscribing(self) -> int:
        """SUBSCRIBE/UNSUBSCRIBE packets read and not applied yet."""
        return self.subscriptions_read - self.subscriptions_applied

    def subscription_applied(self) -> None:
        """The broker applied a SUBSCRIBE or UNSUBSCRIBE of this client's (or dropped it):
        a message queued after it may go out (`after_subscriptions`), and once none is
        outstanding, later publishes may take the direct path again."""
        if self.subscriptions_applied < self.subscriptions_read:
            self.subscriptions_applied += 1

    async def stop(self) -> None:
        # set before amqtt cancels the PUBACK waiters (synchronously, in the same step), so a
        # flow either has its waiter cancelled or sees the handler stopped: none waits forever
        self._stopped = True
        session = self.session
        posted, self._posted = self._posted, {}
        for packet_id, message in posted.items():  # kept in flight, as `_deliver_qos1` does
            self._delivering.discard(packet_id)
            if session is not None:
                self._undelivered(session, message)
        for waiter in self._id_waiters:  # they hand their message on (`on_undelivered`)
            if not waiter.done():
                waiter.set_result(None)
        await super().stop()

    # -- publishing: wait for a packet id rather than fail ---------------------------------

    async def mqtt_publish(self, topic: str, data: bytes | bytearray, qos: int | None,
                           retain: bool, ack_timeout: int | None = None
                           ) -> OutgoingApplicationMessage:
        session = self.session
        if session is None or qos not in (QOS_1, QOS_2):
            return await super().mqtt_publish(topic, data, qos, retain, ack_timeout)
        if self._id_waiters or len(session.inflight_out) >= MAX_INFLIGHT:
            if self.max_queued and len(self._id_waiters) >= self.max_queued:
                if self._dropped % 1000 == 0:
                    log.warning("%s: %d messages unacknowledged and %d more waiting: dropping "
                                "messages (%d so far)", session.client_id,
                                len(session.inflight_out), len(self._id_waiters),
                                self._dropped + 1)
                self._dropped += 1
                return OutgoingApplicationMessage(None, topic, qos, data, retain)
            await self._wait_for_packet_id()
            if self._stopped:  # no packet id came before the connection ended
                message = OutgoingApplicationMessage(None, topic, qos, data, retain)
                self._undelivered(session, message)
                return message
        message = OutgoingApplicationMessage(session.next_packet_id, topic, qos, data, retain)
        await (self._deliver_qos1(message) if qos == QOS_1 else self._deliver_qos2(message))
        return message

    async def _wait_for_packet_id(self) -> None:
        """First come, first served, so messages keep their order."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._id_waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            self._id_waiters.remove(waiter)
            if waiter.done() and not waiter.cancelled():
                self._release_packet_id()  # woken, then cancelled: the id goes to the next
            raise
        self._id_waiters.remove(waiter)

    def _release_packet_id(self) -> None:
        session = self.session
        if self._id_waiters and session is not None and \
                len(session.inflight_out) < MAX_INFLIGHT:
            for waiter in self._id_waiters:
                if not waiter.done():
                    waiter.set_result(None)
                    return

    # -- delivery without a task: written now, in flight until its PUBACK --------------------

    def post(self, topic: str, data: bytes | bytearray, qos: int) -> bool:
        """Deliver a QoS 0 or 1 message (retain=0) by writing it now, without the task and
        the PUBACK future amqtt's flow costs per delivery. False when it cannot go out now
        without overtaking an earlier delivery to this client (one waiting for the socket,
        the write lock or a packet id, or handed to `publish_behind`): deliver it with
        `publish_behind` then, which keeps the order."""
        session = self.session
        writer = self.writer
        lock = self._write_lock
        if not self._quiet or session is None or self._stopped or qos not in (QOS_0, QOS_1) \
                or self._behind or self._id_waiters or lock.locked() or \
                getattr(lock, "_waiters", None) or self._keepalive_task is not None:
            return False
        congested = getattr(writer, "congested", None)  # a `ConnectionWriter`'s
        if writer is None or congested is None or congested():
            return False
        if qos == QOS_0:
            writer.write(encode_publish(topic, data, QOS_0, None))
            return True
        if len(session.inflight_out) >= MAX_INFLIGHT:
            return False
        message = OutgoingApplicationMessage(session.next_packet_id, topic, qos, data, False)
        packet_id = message.packet_id
        session.inflight_out[packet_id] = message
        self._posted[packet_id] = message
        self._delivering.add(packet_id)
        message.publish_packet = _WRITTEN
        writer.write(encode_publish(topic, data, QOS_1, packet_id))
        return True

    def publish_behind(self, topic: str, data: bytes | bytearray, qos: int, *,
                       retain: bool = False) -> Any:
        """`mqtt_publish` for a message `post` refused, or a retained message sent on a
        new subscription: later posts wait until it has started, so it cannot be
        overtaken. Returns the coroutine to run."""
        self._behind += 1
        return self._publish_behind(topic, data, qos, retain)

    async def _publish_behind(self, topic: str, data: bytes | bytearray, qos: int,
                              retain: bool) -> None:
        self._behind -= 1  # from here on it holds its place (lock, packet id) by itself
        await self.mqtt_publish(topic, data, qos, retain=retain)

    # -- QoS 1 to the client: keep it until acknowledged -------------------------------------

    async def _handle_qos1_message_flow(
            self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage) -> None:
        if app_message.direction != OUTGOING:
            await super()._handle_qos1_message_flow(app_message)
            return
        await self._deliver_qos1(app_message)  # type: ignore[arg-type]

    async def _deliver_qos1(self, message: OutgoingApplicationMessage) -> None:
        session = self.session
        packet_id = message.packet_id
        if session is None or packet_id is None:
            raise ValueError(f"QoS 1 message without session or packet id: {message!r}")
        session.inflight_out[packet_id] = message
        self._delivering.add(packet_id)
        if self._stopped:  # the connection ended before this message's turn came
            self._delivering.discard(packet_id)
            self._undelivered(session, message)
            return
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._puback_waiters[packet_id] = waiter
        try:
            # DUP only if it may have reached the client before (MQTT-3.3.1-1)
            packet = message.build_publish_packet(dup=message.publish_packet is not None)
            message.publish_packet = packet
            await self._send_packet(packet)
            message.puback_packet = await waiter
        except asyncio.CancelledError:
            if not waiter.cancelled():
                raise  # this task is being cancelled (broker shutdown): nothing to redeliver
            self._undelivered(session, message)  # the connection ended first
            return
        finally:
            self._delivering.discard(packet_id)
            if self._puback_waiters.get(packet_id) is waiter:
                del self._puback_waiters[packet_id]
        if session.inflight_out.get(packet_id) is message:
            del session.inflight_out[packet_id]
            self._release_packet_id()

    # -- QoS 2 to the client: the same, through PUBREC and PUBCOMP ---------------------------

    async def _handle_qos2_message_flow(
            self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage) -> None:
        if app_message.direction != OUTGOING:
            await super()._handle_qos2_message_flow(app_message)
            return
        await self._deliver_qos2(app_message)  # type: ignore[arg-type]

    async def _deliver_qos2(self, message: OutgoingApplicationMessage) -> None:
        """amqtt gave up after 5 s without PUBREC or PUBCOMP and forgot the message as soon
        as PUBREC came, so a drop before PUBCOMP lost the PUBREL. Here the message stays in
        flight until PUBCOMP: resumed before PUBREC it is published again (DUP), after PUBREC
        only the PUBREL is sent again (MQTT-4.4.0-1)."""
        session = self.session
        packet_id = message.packet_id
        if session is None or packet_id is None:
            raise ValueError(f"QoS 2 message without session or packet id: {message!r}")
        session.inflight_out[packet_id] = message
        self._delivering.add(packet_id)
        if self._stopped:
            self._delivering.discard(packet_id)
            self._undelivered(session, message)
            return
        loop = asyncio.get_running_loop()
        try:
            if message.pubrec_packet is None:
                received: asyncio.Future[Any] = loop.create_future()
                self._pubrec_waiters[packet_id] = received
                try:
                    packet = message.build_publish_packet(dup=message.publish_packet is not None)
                    message.publish_packet = packet
                    await self._send_packet(packet)
                    message.pubrec_packet = await received
                finally:
                    if self._pubrec_waiters.get(packet_id) is received:
                        del self._pubrec_waiters[packet_id]
            completed: asyncio.Future[Any] = loop.create_future()
            self._pubcomp_waiters[packet_id] = completed
            try:
                message.pubrel_packet = PubrelPacket.build(packet_id)
                await self._send_packet(message.pubrel_packet)
                message.pubcomp_packet = await completed
            finally:
                if self._pubcomp_waiters.get(packet_id) is completed:
                    del self._pubcomp_waiters[packet_id]
        except asyncio.CancelledError:
            if not self._stopped:
                raise  # the broker is shutting down: nothing to redeliver
            self._undelivered(session, message)  # the connection ended first
            return
        finally:
            self._delivering.discard(packet_id)
        if session.inflight_out.get(packet_id) is message:
            del session.inflight_out[packet_id]
            self._release_packet_id()

    def _undelivered(self, session: Session, message: OutgoingApplicationMessage) -> None:
        log.debug("%s: message %s on %s not acknowledged before the connection ended",
                  session.client_id, message.packet_id, message.topic)
        if self.on_undelivered is not None:
            self.on_undelivered(session, self, message)

    # -- reconnect: resend what is still in flight --------------------------------------------

    async def _retry_deliveries(self) -> None:
        """MQTT-4.4.0-1: resend unacknowledged messages (DUP set, same packet id) without
        holding up the connection; amqtt waited up to 10 s for them, then dropped them."""
        session = self.session
        if session is None:
            return
        self._resumed = True
        for message in tuple(session.inflight_out.values()):
            self.resend(message)
        for incoming in tuple(session.inflight_in.values()):
            self._spawn(asyncio.wait_for(self._handle_message_flow(incoming), RETRY_QOS2_TIMEOUT))

    def resend(self, message: OutgoingApplicationMessage) -> bool:
        """Send a message still in flight in this session again, unless this connection is
        not ready for it (not yet resumed: it goes out then; or already stopped) or it is
        already being delivered here."""
        if not self._resumed or self._stopped or message.packet_id in self._delivering:
            return False
        self._delivering.add(message.packet_id)  # claimed now, though the flow starts later
        self._spawn(self._deliver_qos2(message) if message.qos == QOS_2
                    else self._deliver_qos1(message))
        return True

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._resending.add(task)
        task.add_done_callback(self._resent)

    def _resent(self, task: asyncio.Task[Any]) -> None:
        self._resending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("redelivery failed: %r", task.exception())
