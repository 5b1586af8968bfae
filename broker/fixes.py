"""`FabricBroker`: amqtt 0.12.1's `Broker` with the bugs the fabric cannot live with fixed.

Each fix is one small override, named after the bug it answers; the amqtt internals they
rely on are listed in `broker.amqtt_privates`, which checks them when the broker starts:

- `KEEPALIVE` -- amqtt never disconnects a silent client, so the will of a frozen or
  unplugged node is never sent (Yakifo/amqtt#308). A watchdog per connection closes it after
  1.5 x keepalive without a byte, as mosquitto does; the will follows.
- `RETAINED_ACL` -- on connect amqtt sends the client every retained message matching *any*
  client's subscription, and on subscribe it ignores the ACL. Retained messages now go out
  only when the client subscribes, only for that filter, only where it may read.
- `TAKEOVER` -- a second connection with a client id already connected leaves the first one
  open. The first connection is now closed before the second is served, and only once the
  second has authenticated, so a stranger cannot evict a node. Its will is published, except
  when the session continues (both connections clean_session=0), as mosquitto 2.0 does.
- `QOS_DOWNGRADE` -- amqtt delivers every message at the subscription's QoS, upgrading QoS 0
  publishes. Delivery is now at min(publish QoS, subscription QoS).
- `PERSISTENT_SESSIONS` -- amqtt's anonymous plugin marks every client anonymous when
  anonymous access is on, and anonymous sessions are never kept. Sessions with
  clean_session=0 are now kept for every client, as mosquitto keeps them; messages queued
  while offline are delivered with retain=0 (amqtt set retain=1), at most
  `max_queued_messages` per client.

- `WILL_ACL` -- amqtt publishes a will without asking the ACL, so a node could forge another
  node's status. A will on a topic the client may not write is dropped at CONNECT (the
  connection is accepted), which is what mosquitto 2.0 ends up doing.
- `ACKED_DELIVERED` -- amqtt acknowledges a QoS 1 publish as soon as it is queued for its
  client's message loop, and drops that queue when the client disconnects: a publisher that
  floods and disconnects loses whatever the broker had acknowledged but not yet broadcast
  (thousands of messages when the broker is busy). The queue is now broadcast before the
  session ends (and before the will); a session being replaced keeps it for its loop, and
  the sweep of ended sessions no longer removes one that reconnected meanwhile.
- `AT_LEAST_ONCE` -- amqtt forgets a QoS 1 or 2 message its subscriber has not acknowledged
  within 5 s (a QoS 2 one even as soon as PUBREC came), never resends one in flight when a
  persistent session reconnects, and fails once 65,535 are unacknowledged.
  `broker.delivery.DeliveryHandler` keeps each in flight until acknowledged and resends it
  (DUP) when the session resumes; queued and retained messages no longer hold up the
  client's message loop until acknowledged.

- `IDENTITY` -- amqtt lets any authenticated client take any client id, so one node's
  credentials could evict another node (its will sent). `use_username_as_clientid` is
  honoured as in mosquitto, and with a password file a client id held by another user's
  session is refused.
- `CONNECT_DEADLINE` / `MAX_CONNECTIONS` -- a CONNECT trickling in a byte at a time held a
  socket as long as it liked, and connections were not capped. The CONNECT must now be
  complete within `CONNECT_TIMEOUT` of the TCP accept, and a listener's `max_connections`
  refuses connections beyond it.

And the plumbing those need, also small: unauthenticated clients are refused before they
touch any session; a client that sends no CONNECT within `CONNECT_TIMEOUT` is dropped; packets
over `max_packet_size` close the connection; every socket is closed when its connection ends
(amqtt leaves the socket of a refused handshake open); TCP_NODELAY is set on every accepted
socket; and the per-message path skips work amqtt does for nothing (a task per ACL check, a
filter scan and debug f-strings per subscription per message).

What a message costs does not grow with the number of clients: matching filters come from a
`broker.index.FilterIndex` (amqtt compared every publish with every filter, which
made a thousand nodes' heartbeats a thousand comparisons each), and the retained message of
a filter without wildcards is one lookup. Per packet, packets are read whole, acknowledged
and delivered without a task each where order allows (`DeliveryHandler`); a message nothing
is queued before is broadcast by its publisher's reader itself, not after turns of the
client's loop and the broadcast loop; and what one turn of the event loop writes to a
connection goes out in one send (`ConnectionWriter`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter, WriterAdapter
from amqtt.broker import AMQTT_MAGIC_VALUE_RET_SUBSCRIBED, Broker, Server
from amqtt.contexts import Action, ListenerConfig, ListenerType
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.constants import QOS_0
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.session import OutgoingApplicationMessage, Session
from amqtt.utils import gen_client_id

from broker.delivery import DeliveryHandler
from broker.index import FilterIndex, has_wildcard
from broker.plugins import TRUSTED, AclFilePlugin, is_trusted

__all__ = ["FabricBroker", "ServerSpec", "CONNECT_TIMEOUT", "KEEPALIVE_FACTOR"]

log = logging.getLogger("broker")

KEEPALIVE_FACTOR = 1.5
CONNECT_TIMEOUT = 10.0
TAKEOVER_TIMEOUT = 5.0
SESSION_SWEEP_INTERVAL = 1.0
_MATCH_CACHE_SIZE = 16_384
_DELIVERY_BURST = 64
_READ_SIZE = 65_536
_VERIFIED = "broker.verified"
_PUBLISH_QOS: ContextVar[int | None] = ContextVar("publish_qos", default=None)


@dataclass(frozen=True)
class ServerSpec:
    """Where one listener binds; amqtt's own bind parsing mangles IPv6 and knows no CA check."""

    host: str | None
    port: int
    ssl_context: ssl.SSLContext | None = None
    max_connections: int | None = None  # None: no cap


class ConnectionReader(StreamReaderAdapter):
    """amqtt's stream reader plus what the broker must know of the connection under it: its
    listener, when it last sent a byte (KEEPALIVE), the size of the packet being read."""

    def __init__(self, reader: asyncio.StreamReader, transport: asyncio.Transport, *,
                 listener: str, max_packet_size: int | None) -> None:
        super().__init__(reader)
        self._stream = reader
        self._transport = transport
        self.listener = listener
        self.last_activity = time.monotonic()
        self.finished = asyncio.Event()
        self._limit = max_packet_size
        self._idle_limit = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._connect_deadline: asyncio.TimerHandle | None = None
        self._buffered = b""  # what `read_packet` has read and not yet cut into packets
        self._position = 0
        self._needed = 0  # the size of the packet being cut, once its header is in
        self._stage = 0  # 0: next byte starts a packet, 1: remaining length, 2: body
        self._length = self._multiplier = self._length_bytes = self._body_left = 0

    async def read(self, n: int = -1) -> bytes:
        data = await (self._stream.readexactly(n) if n != -1 else self._stream.read(n))
        self.last_activity = time.monotonic()
        if self._limit is not None:
            self._track_packet(data)
        return data

    async def read_packet(self) -> tuple[int, bytes] | None:
        """One whole packet, its first byte and its body, cut from reads of whatever has
        arrived (amqtt awaits a read per field, ten for a PUBLISH); None at the end of the
        stream. A packet over `max_packet_size` closes the connection before its body is
        read."""
        while True:
            packet = self._cut_packet()
            if packet is not None:
                return packet
            missing = self._needed - (len(self._buffered) - self._position)
            try:  # the rest of a big packet in one read, not a copy of the buffer per chunk
                chunk = await (self._stream.readexactly(missing) if missing > _READ_SIZE
                               else self._stream.read(_READ_SIZE))
            except asyncio.IncompleteReadError:
                return None
            if not chunk:
                return None
            self.last_activity = time.monotonic()
            buffered, position = self._buffered, self._position
            self._buffered = buffered[position:] + chunk if position < len(buffered) else chunk
            self._position = 0

    def _cut_packet(self) -> tuple[int, bytes] | None:
        buffered, position = self._buffered, self._position
        available = len(buffered) - position
        self._needed = 0
        if available < 2:
            return None
        length, multiplier, index = 0, 1, position + 1
        while True:
            if index >= len(buffered):
                return None  # the remaining length is not all here yet
            byte = buffered[index]
            length += (byte & 0x7F) * multiplier
            index += 1
            if not byte & 0x80:
                break
            multiplier *= 128
            if index - position > 4:
                raise MQTTError("malformed remaining length")
        size = index - position + length
        if self._limit is not None and size > self._limit:
            log.warning("closing %s: packet of %d bytes exceeds max_packet_size %d",
                        self.peer, size, self._limit)
            self.abort()
            raise ConnectionResetError("packet exceeds max_packet_size")
        if available < size:
            self._needed = size
            return None
        self._position = index + length
        return buffered[position], buffered[index:index + length]

    def _track_packet(self, data: bytes) -> None:
        """Follow the MQTT framing amqtt reads, to refuse a packet before buffering it."""
        if self._stage == 2:
            self._body_left -= len(data)
            if self._body_left <= 0:
                self._stage = 0
            return
        for byte in data:
            if self._stage == 0:
                self._stage, self._length, self._multiplier, self._length_bytes = 1, 0, 1, 0
                continue
            self._length += (byte & 0x7F) * self._multiplier
            self._multiplier *= 128
            self._length_bytes += 1
            if byte & 0x80:
                continue
            size = 1 + self._length_bytes + self._length
            if self._limit is not None and size > self._limit:
                log.warning("closing %s: packet of %d bytes exceeds max_packet_size %d",
                            self.peer, size, self._limit)
                self.abort()
                raise ConnectionResetError("packet exceeds max_packet_size")
            self._stage, self._body_left = (2, self._length) if self._length else (0, 0)

    @property
    def peer(self) -> str:
        peer = self._transport.get_extra_info("peername")
        return f"{peer[0]}:{peer[1]}" if peer else "client"

    # -- KEEPALIVE: a timer per connection, re-armed only when it fires

    def watch_idle(self, seconds: float) -> None:
        """Close the connection once it has been silent for `seconds` (0: never)."""
        self.stop_watch()
        self._idle_limit = seconds
        if seconds > 0:
            self._arm(seconds)

    def _arm(self, delay: float) -> None:
        self._watchdog = asyncio.get_running_loop().call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        idle = time.monotonic() - self.last_activity
        if idle >= self._idle_limit:
            log.info("closing %s: silent for %.1f s (keepalive limit %.1f s)", self.peer, idle,
                     self._idle_limit)
            self.abort()
        else:
            self._arm(self._idle_limit - idle)

    def stop_watch(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    # -- CONNECT_DEADLINE: the whole CONNECT within a bound, however it trickles in

    def connect_within(self, seconds: float) -> None:
        """Close the connection unless `connected` is called within `seconds` of now: the
        idle watchdog alone let a CONNECT sent a byte at a time hold a socket for minutes."""
        self._connect_deadline = asyncio.get_running_loop().call_later(seconds,
                                                                       self._connect_late)

    def connected(self) -> None:
        if self._connect_deadline is not None:
            self._connect_deadline.cancel()
            self._connect_deadline = None

    def _connect_late(self) -> None:
        self._connect_deadline = None
        log.info("closing %s: no complete CONNECT within %.1f s", self.peer, CONNECT_TIMEOUT)
        self.abort()

    def abort(self) -> None:
        """Drop the connection now, unsent data included: a frozen peer reads nothing."""
        self.stop_watch()
        self._transport.abort()


class ConnectionWriter(StreamWriterAdapter):
    """amqtt's stream writer, but the packets written to one connection in one turn of the
    event loop go out in one send: amqtt wrote each packet on its own, a system call per
    PUBACK and per delivery, which cost the broker a fifth of its time under a swarm.
    `drain` still waits while the socket's buffer is over its high-water mark."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        super().__init__(writer)
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if self.is_closed:
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)
        self._pending_size += len(data)

    def congested(self) -> bool:
        """Over the socket's high-water mark: a writer should wait (`drain`) before more."""
        transport = self._writer.transport
        size = transport.get_write_buffer_size() + self._pending_size
        return transport.is_closing() or size > transport.get_write_buffer_limits()[1]

    def flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        self._pending = []
        self._pending_size = 0
        try:
            self._writer.write(pending[0] if len(pending) == 1 else b"".join(pending))
        except (OSError, RuntimeError) as e:  # the connection is ending: the reader sees it
            log.debug("write failed: %r", e)

    async def close(self) -> None:
        self.flush()
        await super().close()


def _log_failure(task: asyncio.Task[Any]) -> None:
    """A delivery that failed (a subscriber gone, an ack that never came) is logged, never
    allowed to stop the broadcast loop."""
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        log.debug("delivery failed: %r", error)


class _FilterTable(dict):  # type: ignore[type-arg]
    """amqtt's subscription table (filter -> subscribers), keeping a `FilterIndex` of its
    filters for matching, and counting changes so matches can be cached between them."""

    def __init__(self) -> None:
        super().__init__()
        self.index = FilterIndex()
        self.version = 0

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self:
            self.version += 1
            self.index.add(key)
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self.version += 1
        self.index.discard(key)

    def pop(self, key: str, *default: Any) -> Any:
        if key in self:
            self.version += 1
            self.index.discard(key)
        return super().pop(key, *default)

    def popitem(self) -> Any:
        key, value = super().popitem()
        self.version += 1
        self.index.discard(key)
        return key, value

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return super().__getitem__(key)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def clear(self) -> None:
        self.version += 1
        self.index.clear()
        super().clear()


class FabricBroker(Broker):
    """amqtt's broker with the fixes above; listeners are given as `ServerSpec`s by name."""

    def __init__(self, config: dict[str, Any], *, servers: dict[str, ServerSpec],
                 max_packet_size: int | None = None, max_queued_messages: int = 1000,
                 connection_messages: bool = True, use_username_as_clientid: bool = False,
                 bind_identity: bool = False) -> None:
        super().__init__(config)
        self._use_username_as_clientid = use_username_as_clientid
        self._bind_identity = bind_identity
        self._open_connections: dict[str, int] = {}
        self._server_specs = servers
        self._max_packet_size = max_packet_size
        self._max_queued_messages = max_queued_messages
        self._connection_messages = connection_messages
        self._subscriptions: _FilterTable = _FilterTable()  # type: ignore[assignment]
        self._match_cache: dict[str, tuple[str, ...]] = {}
        self._match_version = -1
        self._deliveries: set[asyncio.Task[Any]] = set()
        self._broadcasting = 0  # broadcasts under way (loop or in place): others queue
        self._filters_of: dict[str, set[str]] = {}  # client id -> its subscription filters
        self._topic_plugins: tuple[BaseTopicPlugin, ...] = tuple(
            p for p in self.plugins_manager.plugins if isinstance(p, BaseTopicPlugin))

    # -- listeners -------------------------------------------------------------------------

    async def _create_server_instance(self, listener_name: str, listener_type: ListenerType,
                                      address: str | None, port: int,
                                      ssl_context: ssl.SSLContext | None) -> asyncio.Server:
        spec = self._server_specs[listener_name]
        return await asyncio.start_server(
            partial(self.stream_connected, listener_name=listener_name), spec.host, spec.port,
            reuse_address=True, ssl=spec.ssl_context)

    def bound_addresses(self) -> list[tuple[str, str, int]]:
        """(listener name, host, port) of every listening socket, ports resolved."""
        found = []
        for name, server in self._servers.items():
            for sock in getattr(server.instance, "sockets", ()) or ():
                host, port = sock.getsockname()[:2]
                found.append((name, host, port))
        return found

    async def stream_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               listener_name: str) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport: asyncio.Transport = writer.transport  # type: ignore[assignment]
        cap = self._server_specs[listener_name].max_connections
        open_now = self._open_connections.get(listener_name, 0)
        if cap is not None and open_now >= cap:  # MAX_CONNECTIONS, as mosquitto's directive
            peer = writer.get_extra_info("peername")
            log.warning("refusing a connection from %s: listener %s has max_connections %d",
                        f"{peer[0]}:{peer[1]}" if peer else "a client", listener_name, cap)
            transport.abort()
            return
        self._open_connections[listener_name] = open_now + 1
        connection = ConnectionReader(reader, transport, listener=listener_name,
                                      max_packet_size=self._max_packet_size)
        connection.watch_idle(CONNECT_TIMEOUT)
        connection.connect_within(CONNECT_TIMEOUT)
        output = ConnectionWriter(writer)
        try:
            await self._client_connected(listener_name, connection, output)
        finally:
            self._open_connections[listener_name] -= 1
            connection.stop_watch()
            connection.connected()
            connection.finished.set()
            if not writer.is_closing():
                output.flush()  # a refusal's CONNACK, the last acknowledgements
                writer.close()

    # -- connect: authenticate, TAKEOVER, session adoption, KEEPALIVE ----------------------

    async def _initialize_client_session(self, reader: ReaderAdapter, writer: WriterAdapter,
                                         remote_address: str, remote_port: int
                                         ) -> tuple[BrokerProtocolHandler, Session]:
        try:
            connected, incoming = await DeliveryHandler.init_from_connect(
                reader, writer, self.plugins_manager)
        except (AMQTTError, MQTTError, NoDataError) as e:
            raise AMQTTError(f"no valid CONNECT from {remote_address}:{remote_port}: {e}") from e
        except Exception as e:  # garbage on the wire must not reach the event loop
            raise AMQTTError(f"bad CONNECT from {remote_address}:{remote_port}: {e!r}") from e
        if isinstance(reader, ConnectionReader):
            reader.connected()
        if not incoming.client_id:
            incoming.client_id = gen_client_id()
        handler = cast(DeliveryHandler, connected)
        handler.on_undelivered = self._undelivered
        handler.max_queued = self._max_queued_messages
        listener = getattr(reader, "listener", "default")
        if not await super()._authenticate(incoming, self.listeners_config[listener]):
            await self._refuse(incoming, writer, remote_address, remote_port, "not authorised")
        refusal = self._bind_client_id(incoming)
        if refusal is not None:
            await self._refuse(incoming, writer, remote_address, remote_port, refusal)
        incoming.is_anonymous = False  # PERSISTENT_SESSIONS: amqtt drops "anonymous" sessions
        if incoming.will_flag and self._topic_plugins and not await self._topic_filtering(
                incoming, topic=incoming.will_topic or "", action=Action.PUBLISH):
            log.info("client %s may not write its will topic %s: the will is dropped",
                     incoming.client_id, incoming.will_topic)
            incoming.will_flag = False  # WILL_ACL
        await self._take_over(incoming)
        session = await self._adopt_session(incoming)
        keepalive = incoming.keep_alive
        if isinstance(reader, ConnectionReader):
            reader.watch_idle(keepalive * KEEPALIVE_FACTOR)
            session.keep_alive = 0  # the watchdog enforces it; amqtt's per-read timeout did not
        session.attributes[_VERIFIED] = True
        handler.on_message = partial(self._message_in_place, session, handler)
        if self._connection_messages:
            log.info("client %s connected from %s:%s (c%d, k%d%s)", session.client_id,
                     remote_address, remote_port, int(bool(incoming.clean_session)), keepalive,
                     f", u'{incoming.username}'" if incoming.username else "")
        return handler, session

    async def _refuse(self, incoming: Session, writer: WriterAdapter, remote_address: str,
                      remote_port: int, why: str) -> None:
        if self._connection_messages:
            log.info("client %s from %s:%s refused: %s", incoming.client_id, remote_address,
                     remote_port, why)
        with contextlib.suppress(OSError):
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
        raise AMQTTError(f"client {incoming.client_id} refused: {why}")

    def _bind_client_id(self, incoming: Session) -> str | None:
        """IDENTITY: with `use_username_as_clientid` the client id is the username (a client
        without one is refused), as in mosquitto; and with a password file, a client id in
        use by another user's session is never handed over, so one user's credentials cannot
        evict another user's node. The master's own trusted session keeps its ids. Returns
        why the client is refused, or None."""
        if is_trusted(incoming):
            return None
        if self._use_username_as_clientid:
            if incoming.username is None:
                return "use_username_as_clientid needs a username"
            incoming.client_id = incoming.username
        if self._bind_identity:
            existing = self._sessions.get(incoming.client_id or "", (None, None))[0]
            if existing is not None and existing.username != incoming.username:
                return (f"client id {incoming.client_id!r} belongs to another user's session")
        return None

    async def _authenticate(self, session: Session, listener: ListenerConfig) -> bool:
        """Authentication already ran before the session was touched; don't run it twice."""
        if session.attributes.pop(_VERIFIED, False):
            return True
        return await super()._authenticate(session, listener)

    async def _take_over(self, incoming: Session) -> None:
        """TAKEOVER: close the connection already using this client id."""
        client_id = incoming.client_id or ""
        old_session, old_handler = self._sessions.get(client_id, (None, None))
        if old_session is None or old_session.transitions.state != "connected":
            return
        old_reader = getattr(old_handler, "reader", None)
        if not isinstance(old_reader, ConnectionReader):
            return
        log.info("client %s already connected, closing old connection", client_id)
        if not incoming.clean_session and not old_session.clean_session:
            old_session.will_flag = False  # the session goes on: no will, as in mosquitto
        old_reader.abort()
        try:
            await asyncio.wait_for(old_reader.finished.wait(), TAKEOVER_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("old connection of %s did not end within %.0f s", client_id,
                        TAKEOVER_TIMEOUT)

    async def _adopt_session(self, incoming: Session) -> Session:
        """PERSISTENT_SESSIONS: resume a kept session, or start clean, as MQTT 3.1.1 says."""
        client_id = incoming.client_id or ""
        existing = self._sessions.get(client_id, (None, None))[0]
        if incoming.clean_session or existing is None or existing.clean_session:
            await self._delete_session(client_id)
            incoming.parent = 0
            return incoming
        for name in ("clean_session", "will_flag", "will_message", "will_topic", "will_qos",
                     "will_retain", "keep_alive", "username", "password", "remote_address",
                     "remote_port", "ssl_object"):
            setattr(existing, name, getattr(incoming, name))
        existing.attributes[TRUSTED] = is_trusted(incoming)
        existing.parent = 1
        return existing

    async def _handle_client_session(self, reader: ReaderAdapter, writer: WriterAdapter,
                                     client_session: Session, handler: BrokerProtocolHandler,
                                     server: Server, listener_name: str) -> None:
        try:
            await super()._handle_client_session(reader, writer, client_session, handler, server,
                                                 listener_name)
            if client_session.transitions.state == "connected" and \
                    self._sessions.get(client_session.client_id or "", (None, None))[1] is handler:
                # amqtt leaves its message loop on a protocol error (a publish to a `$` topic)
                # without ending the session: end it as an abnormal disconnect, will included
                ended: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                ended.set_result(None)
                await self._handle_disconnect(client_session, handler, ended)
        finally:
            if self._connection_messages:
                log.info("client %s disconnected", client_session.client_id)

    # -- ACKED_DELIVERED --------------------------------------------------------------------

    async def _client_message_loop(self, client_session: Session,
                                   handler: BrokerProtocolHandler) -> None:
        """amqtt's loop over one client's packets, but a disconnect comes last: the messages
        the client published before it go out first (`_handle_disconnect`), will after them."""
        disconnect = asyncio.ensure_future(handler.wait_disconnect())
        subscribe = asyncio.ensure_future(handler.get_next_pending_subscription())
        unsubscribe = asyncio.ensure_future(handler.get_next_pending_unsubscription())
        deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
        try:
            while True:
                # a message read after a SUBSCRIBE waits for it: amqtt's queues of
                # subscriptions and messages are separate, so both may be ready at once
                held = deliver.done() and _behind_subscriptions(handler, deliver)
                await asyncio.wait((disconnect, subscribe, unsubscribe) if held else
                                   (disconnect, subscribe, unsubscribe, deliver),
                                   return_when=asyncio.FIRST_COMPLETED)
                if subscribe.done():
                    await self._handle_subscription(client_session, handler, subscribe)
                    subscribe = asyncio.ensure_future(handler.get_next_pending_subscription())
                if unsubscribe.done():
                    await self._handle_unsubscription(client_session, handler, unsubscribe)
                    unsubscribe = asyncio.ensure_future(
                        handler.get_next_pending_unsubscription())
                if deliver.done() and not _behind_subscriptions(handler, deliver):
                    if not await self._handle_message_delivery(client_session, handler, deliver):
                        return  # a protocol error: `_handle_client_session` ends the session
                    if not await self._deliver_queued(client_session, handler, disconnect):
                        return
                    deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
                if disconnect.done():
                    deliver.cancel()  # a message it already took is still handled, in order
                    taken = (await asyncio.gather(deliver, return_exceptions=True))[0]
                    if taken is not None and not isinstance(taken, BaseException):
                        await self._handle_message_delivery(client_session, handler, deliver)
                    await self._handle_disconnect(client_session, handler, disconnect)
                    return
        except asyncio.CancelledError:
            log.debug("message loop of %s cancelled", client_session.client_id)
        finally:
            waiters = (disconnect, subscribe, unsubscribe, deliver)
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    async def _deliver_queued(self, session: Session, handler: BrokerProtocolHandler,
                              disconnect: asyncio.Future[Any]) -> bool:
        """Handle what else the client has published meanwhile, up to `_DELIVERY_BURST`
        messages, without a round of `asyncio.wait` over the loop's four waiters for each;
        False on a protocol error."""
        queue = session.delivered_message_queue
        loop = asyncio.get_running_loop()
        for _ in range(_DELIVERY_BURST):
            if queue.empty() or disconnect.done() or \
                    (isinstance(handler, DeliveryHandler) and handler.subscribing):
                break  # a subscription first: the loop waits for it (`_behind_subscriptions`)
            taken: asyncio.Future[Any] = loop.create_future()
            taken.set_result(queue.get_nowait())
            if not await self._handle_message_delivery(session, handler, taken):
                return False
        return True

    async def _message_in_place(self, session: Session, handler: BrokerProtocolHandler,
                                message: Any) -> None:
        """A message its client's reader hands over directly: handled as the client's loop
        handles one, without the queue between them and the wake-up of that loop."""
        taken: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        taken.set_result(message)
        await self._handle_message_delivery(session, handler, taken)

    async def _handle_disconnect(self, client_session: Session, handler: BrokerProtocolHandler,
                                 disconnect_waiter: asyncio.Future[Any]) -> None:
        """Broadcast what the client published and was acknowledged but not yet broadcast
        (amqtt acknowledges a publish when it is queued, and dropped the queue with the
        connection), then end the session as amqtt does, will included."""
        await self._broadcast_acknowledged(client_session, handler)
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)

    async def _broadcast_acknowledged(self, session: Session,
                                      handler: BrokerProtocolHandler) -> None:
        queue = session.delivered_message_queue
        loop = asyncio.get_running_loop()
        while not queue.empty():
            taken: asyncio.Future[Any] = loop.create_future()
            taken.set_result(queue.get_nowait())
            await self._handle_message_delivery(session, handler, taken)

    # -- subscriptions by client: ending a session costs its own filters, not all of them

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        granted = await super().add_subscription(subscription, session)
        if granted != 0x80 and session.client_id:
            self._filters_of.setdefault(session.client_id, set()).add(subscription[0])
        return granted

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        deleted = super()._del_subscription(a_filter, session)
        filters = self._filters_of.get(session.client_id or "")
        if filters is not None:
            filters.discard(a_filter)
            if not filters:
                del self._filters_of[session.client_id or ""]
        return deleted

    async def _del_all_subscriptions(self, session: Session) -> None:
        """amqtt's, over this client's filters only: amqtt went through every filter of
        every client for each session that ended."""
        table = self._subscriptions
        for topic_filter in self._filters_of.pop(session.client_id or "", ()):
            if super()._del_subscription(topic_filter, session) and not table.get(topic_filter):
                table.pop(topic_filter, None)

    async def _delete_session(self, client_id: str) -> None:
        """amqtt's, except that the messages the old connection acknowledged stay queued for
        its own loop to broadcast (amqtt cleared them)."""
        session = self._sessions.pop(client_id, (None, None))[0]
        if session is None:
            return
        await self._del_all_subscriptions(session)
        while not session.retained_messages.empty():
            session.retained_messages.get_nowait()

    async def _session_monitor(self) -> None:
        """amqtt's sweep of ended clean sessions, which could remove a session that had
        meanwhile reconnected under the same client id (and drop its connection)."""
        while True:
            expiry = self.config.session_expiry_interval
            for client_id, (session, _handler) in tuple(self._sessions.items()):
                if self._sessions.get(client_id, (None, None))[0] is not session or \
                        session.transitions.state != "disconnected":
                    continue
                ended = session.last_disconnect_time
                if session.clean_session or session.is_anonymous or (
                        expiry is not None and ended is not None and ended < time.time() - expiry):
                    await self._cleanup_session(client_id)
            await asyncio.sleep(SESSION_SWEEP_INTERVAL)

    # -- AT_LEAST_ONCE ----------------------------------------------------------------------

    def _undelivered(self, session: Session, handler: DeliveryHandler,
                     message: OutgoingApplicationMessage) -> None:
        """A QoS 1 message whose connection ended before its PUBACK: a persistent session
        gets it again (the message is kept in flight, `DeliveryHandler`); a clean session
        ended with the connection, and so did what it was owed."""
        if session.clean_session:
            return
        current = self._get_handler(session)
        online = current is not None and current is not handler and \
            session.transitions.state == "connected"
        if message.packet_id is not None:  # still in flight: the next connection resends it
            if online and isinstance(current, DeliveryHandler):
                current.resend(message)  # or it does so itself when it resumes the session
            return
        if online and current is not None:  # never had a packet id: a message like any other
            self._spawn(current.mqtt_publish(message.topic, message.data, message.qos,
                                             retain=False))
        else:
            broadcast = {"session": None, "topic": message.topic, "data": message.data}
            self._spawn(self._retain_broadcast_message(broadcast, message.qos or 1, session))

    def _spawn(self, coroutine: Any) -> None:
        """A delivery no one waits for: it may wait for its PUBACK as long as the connection
        lasts, so it is forgotten when it ends, not when the deliveries before it have."""
        task = asyncio.ensure_future(coroutine)
        self._deliveries.add(task)
        task.add_done_callback(self._delivered)

    def _delivered(self, task: asyncio.Task[Any]) -> None:
        self._deliveries.discard(task)
        _log_failure(task)

    # -- QOS_DOWNGRADE ----------------------------------------------------------------------

    async def _handle_message_delivery(self, client_session: Session,
                                       handler: BrokerProtocolHandler,
                                       wait_deliver: asyncio.Future[Any]) -> bool:
        """Remember the publish QoS while amqtt validates and broadcasts the message."""
        message = wait_deliver.result()
        token = _PUBLISH_QOS.set(None if message is None else message.qos)
        try:
            return await super()._handle_message_delivery(client_session, handler, wait_deliver)
        finally:
            _PUBLISH_QOS.reset(token)

    async def _broadcast_message(self, session: Session | None, topic: str | None,
                                 data: bytes | bytearray | None,
                                 force_qos: int | None = None) -> None:
        """Deliver at once when nothing is queued or being broadcast, which saves the message
        a wait for the broadcast loop's turn (one per message, twice per task round trip);
        otherwise queue it behind the others, so a publisher's messages keep their order."""
        qos = force_qos if force_qos is not None else _PUBLISH_QOS.get()
        task = self._broadcast_task
        if self._broadcasting or not self._broadcast_queue.empty() or task is None or \
                task.done():
            await super()._broadcast_message(session, topic, data, qos)
            return
        broadcast: dict[str, Any] = {"session": session, "topic": topic, "data": data}
        if qos is not None:
            broadcast["qos"] = qos
        self._broadcasting += 1
        try:
            await self._deliver_broadcast(broadcast)
        except Exception as e:  # one message's failure must not end its publisher's session
            log.warning("broadcast of a message on %s failed: %r", topic, e)
        finally:
            self._broadcasting -= 1

    async def _broadcast_loop(self) -> None:
        """Take broadcasts straight off the queue; amqtt wraps each one in a task of its own
        and an `asyncio.wait`. Shutdown cancels this task (`_shutdown_broadcast_loop`)."""
        try:
            while True:
                await self._run_broadcast(None)
        finally:
            for task in tuple(self._deliveries):
                task.cancel()

    async def _shutdown_broadcast_loop(self) -> None:
        task = self._broadcast_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if not self._broadcast_queue.empty():
            log.warning("%d messages not broadcast at shutdown", self._broadcast_queue.qsize())
        self._broadcast_shutdown_waiter: asyncio.Future[Any] = asyncio.Future()

    async def _run_broadcast(self, running_tasks: Any) -> None:
        """One message to every matching subscription, at min(publish QoS, subscription QoS);
        matching filters are cached per topic, ACL checks are direct calls. Each delivery is
        a task of its own (`_spawn`); `running_tasks` (amqtt's list of them) is not used."""
        broadcast = await self._broadcast_queue.get()
        self._broadcasting += 1
        try:
            await self._deliver_broadcast(broadcast)
        finally:
            self._broadcasting -= 1

    async def _deliver_broadcast(self, broadcast: dict[str, Any]) -> None:
        topic: str = broadcast["topic"]
        publish_qos: int | None = broadcast.get("qos")
        data = broadcast["data"]
        for topic_filter in self._filters_matching(topic):
            for target, subscription_qos in tuple(self._subscriptions.get(topic_filter, ())):
                qos = subscription_qos if publish_qos is None else min(publish_qos,
                                                                       subscription_qos)
                if self._topic_plugins and not await self._topic_filtering(
                        target, topic=topic, action=Action.RECEIVE):
                    continue
                if target.transitions.state != "connected":
                    if not target.clean_session and qos > QOS_0 and not target.is_anonymous:
                        await self._retain_broadcast_message(broadcast, qos, target)
                    continue
                handler = self._get_handler(target)
                if handler is None:
                    continue
                if not isinstance(handler, DeliveryHandler):
                    self._spawn(handler.mqtt_publish(topic, data, qos, retain=False))
                elif not handler.post(topic, data, qos):
                    self._spawn(handler.publish_behind(topic, data, qos))

    def _filters_matching(self, topic: str) -> tuple[str, ...]:
        """The filters matching `topic`, from the index (not a scan of every filter), cached
        per topic until the set of filters changes."""
        table = self._subscriptions
        if table.version != self._match_version:
            self._match_cache.clear()
            self._match_version = table.version
        filters = self._match_cache.get(topic)
        if filters is None:
            filters = tuple(table.index.match(topic))
            if len(self._match_cache) >= _MATCH_CACHE_SIZE:
                self._match_cache.clear()
            self._match_cache[topic] = filters
        return filters

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        """Ask the topic plugins directly instead of through a task per plugin per message."""
        for plugin in self._topic_plugins:
            if isinstance(plugin, AclFilePlugin):
                allowed = plugin.allows(session, topic, action)
            else:
                allowed = await plugin.topic_filtering(session=session, topic=topic,
                                                       action=action)
            if not allowed:
                return False
        return True

    # -- RETAINED_ACL -----------------------------------------------------------------------

    async def _handle_subscription(self, client_session: Session,
                                   handler: BrokerProtocolHandler,
                                   subscribe_waiter: asyncio.Future[Any]) -> None:
        try:
            await self._apply_subscription(client_session, handler, subscribe_waiter)
        finally:
            if isinstance(handler, DeliveryHandler):
                handler.subscription_applied()

    async def _handle_unsubscription(self, client_session: Session,
                                     handler: BrokerProtocolHandler,
                                     unsubscribe_waiter: asyncio.Future[Any]) -> None:
        try:
            await super()._handle_unsubscription(client_session, handler, unsubscribe_waiter)
        finally:
            if isinstance(handler, DeliveryHandler):
                handler.subscription_applied()

    async def _apply_subscription(self, client_session: Session,
                                  handler: BrokerProtocolHandler,
                                  subscribe_waiter: asyncio.Future[Any]) -> None:
        subscriptions = subscribe_waiter.result()
        granted = [await self.add_subscription(item, client_session)
                   for item in subscriptions.topics]
        await handler.mqtt_acknowledge_subscription(subscriptions.packet_id, granted)
        for (topic_filter, requested), qos in zip(subscriptions.topics, granted):
            if qos == AMQTT_MAGIC_VALUE_RET_SUBSCRIBED:
                continue
            await self.plugins_manager.fire_event(BrokerEvents.CLIENT_SUBSCRIBED,
                                                  client_id=client_session.client_id,
                                                  topic=topic_filter, qos=requested)
            await self._send_retained(topic_filter, qos, client_session, handler)

    async def _send_retained(self, topic_filter: str, granted_qos: int, session: Session,
                             handler: BrokerProtocolHandler) -> None:
        """The retained messages one new subscription matches and its client may read: a
        filter without wildcards is one lookup, not a scan of every retained message."""
        if has_wildcard(topic_filter):
            candidates = [(topic, retained) for topic, retained in
                          tuple(self._retained_messages.items())
                          if self._matches(topic, topic_filter)]
        else:
            exact = self._retained_messages.get(topic_filter)
            candidates = [] if exact is None else [(topic_filter, exact)]
        for topic, retained in candidates:
            if self._topic_plugins and not await self._topic_filtering(
                    session, topic=topic, action=Action.RECEIVE):
                continue
            qos = granted_qos if retained.qos is None else min(granted_qos, retained.qos)
            if isinstance(handler, DeliveryHandler):  # held in place: a later post waits
                self._spawn(handler.publish_behind(topic, retained.data, qos, retain=True))
            else:
                self._spawn(handler.mqtt_publish(topic, retained.data, qos, retain=True))

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Session) -> None:
        """amqtt calls this on connect for every filter of every client; MQTT sends retained
        messages only when a subscription is made (`_send_retained`), so this does nothing."""

    # -- PERSISTENT_SESSIONS ----------------------------------------------------------------

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """Deliver what was queued while the client was away, in order, with retain=0 (after
        what was in flight, which the handler resent as it started)."""
        handler = self._get_handler(session)
        if handler is None:
            return
        while not session.retained_messages.empty():
            queued = session.retained_messages.get_nowait()
            self._spawn(handler.mqtt_publish(queued.topic, queued.data, queued.qos,
                                             retain=False))

    async def _retain_broadcast_message(self, broadcast: dict[str, Any], qos: int,
                                        target_session: Session) -> None:
        limit = self._max_queued_messages
        if limit and target_session.retained_messages.qsize() >= limit:
            log.debug("queue of %s full (%d): message on %s dropped", target_session.client_id,
                      limit, broadcast["topic"])
            return
        await super()._retain_broadcast_message(broadcast, qos, target_session)


def _behind_subscriptions(handler: BrokerProtocolHandler, taken: asyncio.Future[Any]) -> bool:
    """Whether the message `taken` from the client's queue was read after a SUBSCRIBE or
    UNSUBSCRIBE the broker has not applied yet."""
    if not isinstance(handler, DeliveryHandler) or taken.cancelled() or taken.exception():
        return False
    after = getattr(taken.result(), "after_subscriptions", 0)
    return handler.subscriptions_applied < after
