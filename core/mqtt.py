"""The MQTT session: the only module that imports paho.

It turns paho's callbacks into a small API where every wait is bounded: connect with a
deadline, reconnect with backoff, re-subscribe after a reconnect, TCP_NODELAY on the socket
(paho never sets it; without it a QoS 1 round trip costs 40-90 ms), and paho's integer
return codes translated into fabric errors at this boundary.

The session drives paho's socket itself (paho's external-loop interface) instead of paho's
own thread: a publish is written to the socket by the thread that publishes, at once, rather
than queued for the network thread to be woken through a socket pair and write it later.
That saves two thread switches and a system call per message, which is most of a message's
cost on a small machine. The session's thread reads, sends acknowledgements, keeps the
connection alive and reconnects; writers take turns under one lock, never waiting on it.

A broker list (the members of one clustered broker) is tried in order: the session connects
to the first member that answers and, when it loses its member, reconnects to the next. The
backoff between attempts doubles and resets only once a session has stayed up for a while
(`stable_after`), so a member that accepts connections and drops them at once (a dying
cluster member, a load balancer in front of one) gets a few attempts, never a storm.

On a list, a clean session takes a client id of its own per member: `<id>` on the first,
`<id>~<n>` on member n (`~` never appears in a fabric id). A clustered broker may keep what a
client id's last session left on the member that died with it: RabbitMQ keeps the QoS 1
subscription queue of a client id homed on its member and refuses every later subscription
under that id, on every member, while that member is down. With one id per member, what a
session leaves lives on the member it names.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from core.errors import BrokerUnavailable, FabricError, FabricTimeout
from core.tls import TlsSettings
from core.topic_filter import topic_matches
from core.url import BrokerUrl

__all__ = ["MqttSession", "Will", "TlsSettings", "Handler", "topic_matches", "connect_failure"]

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], None]


@dataclass(frozen=True)
class Will:
    """The message the broker publishes for us if we vanish."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


_BROKER_HINT = ("is the broker running? `master-node serve` starts one; else give "
                "--broker mqtt://HOST:PORT or set $FABRIC_BROKER")


def _is_definite(error: Exception | None) -> bool:
    """A first attempt's error that waiting would not change."""
    return isinstance(error, (ConnectionRefusedError, socket.gaierror, UnicodeError,
                              ssl.SSLError, ssl.CertificateError)) or _handshake_timeout(error)


def _handshake_timeout(error: Exception | None) -> bool:
    """TCP connected but TLS got no answer: a plain listener does not speak TLS."""
    return isinstance(error, TimeoutError) and "handshake" in str(error)


def connect_failure(broker: BrokerUrl, *, refused: str | None,
                    error: Exception | None) -> tuple[str, str]:
    """(reason, hint) for a connection that did not come up, in a person's words."""
    if refused is not None:
        lowered = refused.lower()
        if "authori" in lowered or "password" in lowered:
            return (f"not authorized ({refused})",
                    "check user:password in the broker URL against the broker's "
                    "password_file and acl_file")
        return f"the broker refused the connection ({refused})", "see the broker's log"
    if isinstance(error, ConnectionRefusedError):
        return f"connection refused: nothing listens on {broker.host}:{broker.port}", _BROKER_HINT
    if isinstance(error, socket.gaierror):
        return (f"unknown host {broker.host!r} ({error.strerror or error})",
                "check the host name in --broker / $FABRIC_BROKER")
    if isinstance(error, UnicodeError):  # the name cannot even be looked up
        return (f"unknown host {broker.host!r} (not a valid host name)",
                "check the host name in --broker / $FABRIC_BROKER")
    if isinstance(error, (ssl.SSLError, ssl.CertificateError)) or _handshake_timeout(error):
        detail = ("the listener did not answer the handshake: a plain mqtt:// port?"
                  if _handshake_timeout(error) else getattr(error, "reason", None) or str(error))
        return (f"TLS handshake failed ({detail})",
                "check mqtts:// against the listener, the CA file that signs the broker's "
                "certificate, and that the certificate names this host")
    if error is not None:
        return f"no answer ({error})", _BROKER_HINT
    return "no answer", _BROKER_HINT


def _member_failures(failures: dict[BrokerUrl, tuple[str | None, Exception | None]]) -> str:
    """Each member's reason, for a list none of whose members would take us."""
    return "; ".join(f"{member}: {connect_failure(member, refused=r, error=e)[0]}"
                     for member, (r, e) in failures.items())


class MqttSession:
    """One MQTT connection with bounded waits, automatic reconnect and re-subscription."""

    def __init__(self, *, broker: BrokerUrl, client_id: str, clean_session: bool = True,
                 keepalive: int = 10, will: Will | None = None, tls: TlsSettings | None = None,
                 max_inflight: int = 1000, reconnect_min: float = 0.05,
                 reconnect_max: float = 2.0, stable_after: float | None = None,
                 connack_timeout: float = 10.0) -> None:
        self.broker = broker
        self._members = broker.members
        self._member_index = 0
        self._clean_session = clean_session
        self.client_id = client_id
        self._subscriptions: dict[str, tuple[int, Handler]] = {}
        self._on_connect_hooks: list[Callable[[bool], None]] = []
        self._on_disconnect_hooks: list[Callable[[], None]] = []
        self._connected = threading.Event()
        self._attempted = threading.Event()  # an attempt ended (accepted or failed): start() wakes
        self._acked = threading.Event()      # a publish acknowledged or the connection lost
        self._flushing = 0                   # flush() calls waiting (under _flush_lock)
        self._flush_lock = threading.Lock()
        self._lock = threading.Lock()
        self._refused: str | None = None                # the broker's CONNACK refusal
        self._connect_error: Exception | None = None    # the last failed connection attempt
        self._stopping = False
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_lock = threading.Lock()   # one writer of the socket at a time
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._reconnect_min = reconnect_min
        self._reconnect_max = reconnect_max
        # back to the minimum only once a session has stayed up `stable_after` seconds
        self._backoff = reconnect_min
        self._stable_after = max(2.0, 2 * keepalive) if stable_after is None else stable_after
        self._connack_timeout = connack_timeout
        self._up_since: float | None = None      # when the current session was accepted
        self._attempt_since = 0.0                # when the current attempt opened its socket
        # each member's last failure while starting: (refused, error)
        self._failures: dict[BrokerUrl, tuple[str | None, Exception | None]] = {}
        self.connects = 0       # sessions accepted, over all members
        self.attempts = 0       # connection attempts made, over all members
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             clean_session=clean_session, protocol=paho.MQTTv311)
        if broker.username:
            client.username_pw_set(broker.username, broker.password)
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        self._client_tls = bool(broker.tls or tls is not None)
        if broker.tls or tls is not None:
            tls = tls or TlsSettings()
            client.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file,
                           cert_reqs=ssl.CERT_NONE if tls.insecure else ssl.CERT_REQUIRED)
            if tls.insecure:
                client.tls_insecure_set(True)
        client.max_inflight_messages_set(max_inflight)
        client.max_queued_messages_set(0)
        client.connect_timeout = 2.0
        self._keepalive = keepalive
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_socket_open = self._handle_socket_open
        # With this set, paho never writes by itself: this session decides who writes when.
        client.on_socket_register_write = self._handle_register_write
        client.on_message = self._handle_unmatched
        self._client = client

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, *, timeout: float = 10.0) -> None:
        """Connect and start the network thread.

        Raises BrokerUnavailable at once when the first attempt gets a definite answer (the
        connection refused, an unknown host, a TLS failure, the broker refusing our
        credentials), else after `timeout` with the last reason seen; either way with a hint.
        Once connected, losing the broker only means reconnecting.

        With a broker list, a member's definite failure moves on to the next member at once;
        BrokerUnavailable comes when every member failed definitely, naming each one's reason.
        """
        self._client.on_log = self._handle_log  # until the first CONNACK: see _handle_log
        self._client.connect_async(self.member.host, self.member.port, keepalive=self._keepalive)
        self._attempt_since = time.monotonic()
        self._thread = threading.Thread(target=self._network_loop, name=f"mqtt-{self.client_id}",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        # `connects`, not only the flag: a session accepted and lost at once was connected
        while not self._connected.is_set() and not self.connects:
            if len(self._members) == 1:
                definite = self._refused is not None or _is_definite(self._connect_error)
            else:
                failures = dict(self._failures)
                definite = len(failures) == len(self._members) and all(
                    r is not None or _is_definite(e) for r, e in failures.values())
            left = deadline - time.monotonic()
            if definite or left <= 0:
                break
            self._attempted.wait(left)  # what an attempt found is written before it is set
            self._attempted.clear()
        if self._connected.is_set() or self.connects:
            return
        self._halt_thread(timeout=2.0)
        if len(self._members) > 1:
            failures = dict(self._failures)
            detail = _member_failures(failures) if failures else "no answer"
            hint = connect_failure(self._members[0], refused=None, error=None)[1]
            every = len(failures) == len(self._members) and all(
                r is not None or _is_definite(e) for r, e in failures.values())
            within = "" if every else f" within {timeout:g}s"
            raise BrokerUnavailable(f"cannot connect to any member of {self.broker}{within}: "
                                    f"{detail} ({hint})")
        reason, hint = connect_failure(self.broker, refused=self._refused,
                                       error=self._connect_error)
        within = "" if reason != "no answer" else f" within {timeout:g}s"
        raise BrokerUnavailable(f"cannot connect to {self.broker}{within}: {reason} ({hint})")

    def stop(self, *, timeout: float = 5.0) -> None:
        """Wait (bounded) for queued QoS>0 publishes, disconnect cleanly, stop the thread."""
        self._stopping = True
        self.flush(timeout=timeout)
        try:
            self._client.disconnect()
            with self._write_lock:  # say DISCONNECT before the thread stops (else: our will)
                self._client.loop_write()
        except Exception:  # already gone: nothing left to close
            pass
        self._halt_thread(timeout=2.0)
        self._connected.clear()

    def abort(self) -> None:
        """Drop the connection without DISCONNECT, so the broker sends our will (tests, faults)."""
        self._stopping = True
        sock = self._client.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._halt_thread(timeout=2.0)

    def _halt_thread(self, *, timeout: float) -> None:
        self._halt.set()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        with self._write_lock:
            for sock in (self._client.socket(), self._wake_r, self._wake_w):
                if sock is not None:
                    try:
                        sock.close()
                    except OSError:
                        pass

    @property
    def member(self) -> BrokerUrl:
        """The member of the broker list this session is (or was last) connected or connecting to."""
        return self._members[self._member_index]

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def on_connect(self, hook: Callable[[bool], None]) -> None:
        """Call `hook(session_present)` after every (re)connect, once subscriptions are back."""
        self._on_connect_hooks.append(hook)

    def on_disconnect(self, hook: Callable[[], None]) -> None:
        self._on_disconnect_hooks.append(hook)

    # -- messaging -----------------------------------------------------------------------------

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1) -> None:
        """Route messages matching `topic_filter` to `handler(topic, payload)`.

        Handlers run on the network thread: keep them short. Subscriptions survive reconnects.
        """
        with self._lock:
            self._subscriptions[topic_filter] = (qos, handler)
        self._client.message_callback_add(topic_filter, self._wrap(handler))
        if self.connected:
            self._client.subscribe(topic_filter, qos)
            self._write()

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._subscriptions.pop(topic_filter, None)
        self._client.message_callback_remove(topic_filter)
        if self.connected:
            self._client.unsubscribe(topic_filter)
            self._write()

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> "paho.MQTTMessageInfo":
        """Send a publish now (or queue it while disconnected: QoS 1 messages survive a
        reconnect, paho resends them)."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise FabricError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        self._write()
        return info

    # -- the socket ----------------------------------------------------------------------------

    def _write(self) -> None:
        """Write what paho has queued, from this thread, unless another writer is at it.

        Never waits for the lock: its holder writes everything queued, and if it may have
        missed what we queued just now (or the socket is full), the network thread is woken
        to finish the job.
        """
        client = self._client
        if self._write_lock.acquire(False):
            try:
                client.loop_write()
            finally:
                self._write_lock.release()
            if not client.want_write():
                return
        self._wake()

    def set_will(self, will: Will) -> None:
        """The will for the next (re)connection; the current one keeps the will it has."""
        with self._write_lock:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # already signalled (full), or closed
            pass

    def _network_loop(self) -> None:
        """Read, acknowledge, keep alive, reconnect with backoff: until halted."""
        client = self._client
        tick = max(0.05, min(1.0, self._keepalive / 4)) if self._keepalive else 1.0
        wake_r = self._wake_r
        first = True
        while not self._halt.is_set():
            sock = client.socket()
            if sock is None:
                if self._stopping:
                    self._halt.wait(0.05)
                    continue
                if not first:  # lost, refused or unreachable: the next member, after a pause
                    if self._halt.wait(self._next_delay()):
                        break
                    self._next_member()
                first = False
                self._attempt()
                continue
            if not self._connected.is_set() and \
                    time.monotonic() - self._attempt_since > self._connack_timeout:
                # the member took the connection but never answered it: try another
                self._connect_error = TimeoutError(
                    f"no CONNACK within {self._connack_timeout:g}s")
                self._note_failure()
                self._lost(client)
                continue
            pending = sock.pending() if hasattr(sock, "pending") else 0
            try:
                readable, writable, _ = select.select(
                    [sock, wake_r], [sock] if client.want_write() else [], [],
                    0.0 if pending else tick)
            except (OSError, ValueError):  # the socket was closed under us: reconnect
                self._lost(client)
                continue
            if wake_r in readable:
                try:
                    wake_r.recv(4096)
                except (BlockingIOError, OSError):
                    pass
            if sock in readable or pending:
                client.loop_read()
            if client.socket() is not None:
                if writable or client.want_write():
                    with self._write_lock:
                        client.loop_write()
                client.loop_misc()
                if client.want_write():  # a ping, or acknowledgements queued just now
                    with self._write_lock:
                        client.loop_write()

    def _attempt(self) -> None:
        """One connection attempt to the current member (the network thread's)."""
        client = self._client
        self.attempts += 1
        self._attempt_since = time.monotonic()
        with self._write_lock:
            try:
                client.reconnect()
            except (OSError, ValueError) as e:
                self._connect_error = e
                self._note_failure()
                log.debug("cannot reach %s yet: %s", self.member, e)

    def _next_delay(self) -> float:
        """The pause before the next attempt: none right after losing a session that had
        stayed up (another member may take us at once), else the backoff, doubling."""
        up_since, self._up_since = self._up_since, None
        if up_since is not None and time.monotonic() - up_since >= self._stable_after:
            self._backoff = self._reconnect_min
            return 0.0
        delay = self._backoff
        self._backoff = min(self._backoff * 2, self._reconnect_max)
        return delay

    def _next_member(self) -> None:
        """Point paho at the next member of the list (a single broker: the same one)."""
        if len(self._members) == 1:
            return
        self._member_index = (self._member_index + 1) % len(self._members)
        member = self.member
        with self._write_lock:
            # connect_async only records where to go; reconnect() goes there
            self._client.connect_async(member.host, member.port, keepalive=self._keepalive)
            if self._clean_session:  # paho has no public setter for the client id
                self._client._client_id = self.member_client_id.encode()

    @property
    def member_client_id(self) -> str:
        """The client id used on the current member (see the module's docstring)."""
        if not self._clean_session or self._member_index == 0:
            return self.client_id
        return f"{self.client_id}~{self._member_index}"

    def _note_failure(self) -> None:
        if not self._connected.is_set():
            self._failures[self.member] = (self._refused, self._connect_error)
        self._attempted.set()

    def _lost(self, client: paho.Client) -> None:
        """A select on a dead socket: close it the way paho does, so hooks run once."""
        try:
            client._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)  # paho's own clean-up path
        except Exception:
            log.debug("closing a lost connection failed", exc_info=True)

    def publish_and_wait(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                         timeout: float = 5.0) -> None:
        """Publish and wait (bounded) for the broker's acknowledgement."""
        deadline = time.monotonic() + timeout
        if qos and not self._connected.wait(timeout):
            raise FabricTimeout(f"publish to {topic} not sent within {timeout:g}s: not connected "
                                f"to {self.broker}")
        info = self.publish(topic, payload, qos=qos, retain=retain)
        if qos == 0:
            return
        try:
            while not info.is_published():
                if time.monotonic() > deadline:
                    raise FabricTimeout(f"publish to {topic} not acknowledged within {timeout:g}s")
                info.wait_for_publish(timeout=min(0.1, max(0.001, deadline - time.monotonic())))
        except (RuntimeError, ValueError) as e:  # paho's word for "the connection dropped"
            raise FabricError(f"publish to {topic} failed: {e}") from e

    def flush(self, *, timeout: float = 5.0) -> bool:
        """Wait until every queued QoS>0 publish is acknowledged; False if time ran out.

        Woken by each acknowledgement (paho's on_publish, set only while a flush waits, so
        the hot path calls no Python per acknowledgement) and by a lost connection."""
        deadline = time.monotonic() + timeout
        client = self._client
        with self._flush_lock:
            self._flushing += 1
            client.on_publish = self._handle_publish
        try:
            while True:
                self._acked.clear()
                with client._out_message_mutex:  # paho has no public "pending publishes" view
                    pending = len(client._out_messages)
                if pending == 0 or not self.connected:
                    return pending == 0
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._acked.wait(left)
        finally:
            with self._flush_lock:
                self._flushing -= 1
                if not self._flushing:
                    client.on_publish = None

    def _handle_publish(self, _client: paho.Client, _userdata: object, _mid: int,
                        _reason_code: object, _properties: object) -> None:
        # paho calls this with the message still counted; flush() reads the count after it
        # is taken off, under the same paho lock
        self._acked.set()

    # -- paho callbacks ------------------------------------------------------------------------

    def _wrap(self, handler: Handler) -> Callable:
        def deliver(_client: paho.Client, _userdata: object, message: paho.MQTTMessage) -> None:
            try:
                handler(message.topic, message.payload)
            except Exception:  # a handler bug must not kill the network thread
                log.exception("handler for %s failed", message.topic)
        return deliver

    def _handle_unmatched(self, _client: paho.Client, _userdata: object,
                          message: paho.MQTTMessage) -> None:
        log.debug("message on %s matched no handler", message.topic)

    def _handle_register_write(self, _client: paho.Client, _userdata: object,
                               _sock: object) -> None:
        """paho has something to send: whoever queued it writes it (see `_write`)."""

    def _handle_log(self, _client: paho.Client, _userdata: object, level: int, text: str) -> None:
        """A TLS 1.3 broker refuses a missing or untrusted client certificate only after the
        handshake, on the first read, which paho reports in its log alone: keep it as this
        attempt's error, so start() fails at once saying so instead of 'no answer'."""
        if level == paho.MQTT_LOG_ERR and not self._connected.is_set() and (
                "SSL" in text or "alert" in text):
            self._tls_refused(text.partition("socket: ")[2] or text)

    def _tls_refused(self, reason: str) -> None:
        error = ssl.SSLError()
        error.reason = reason  # what connect_failure shows
        self._connect_error = error
        self._note_failure()

    def _handle_socket_open(self, _client: paho.Client, _userdata: object, sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):  # TLS wrappers and unix sockets may refuse
            pass

    def _handle_connect(self, client: paho.Client, _userdata: object, flags: paho.ConnectFlags,
                        reason_code: object, _properties: object) -> None:
        if getattr(reason_code, "is_failure", False):
            self._refused = str(reason_code)
            self._note_failure()
            log.warning("broker %s refused connection: %s", self.member, reason_code)
            return
        self._refused = None
        self._connect_error = None
        client.on_log = None  # paho formats every log line while one is set: not on the hot path
        self._failures.clear()
        self._up_since = time.monotonic()  # the backoff resets once this session lasts
        self.connects += 1
        with self._lock:
            subscriptions = list(self._subscriptions.items())
        if subscriptions:
            client.subscribe([(topic, qos) for topic, (qos, _h) in subscriptions])
        self._connected.set()
        self._attempted.set()
        for hook in list(self._on_connect_hooks):
            try:
                hook(bool(flags.session_present))
            except Exception:
                log.exception("on_connect hook failed")

    def _handle_disconnect(self, client: paho.Client, _userdata: object, _flags: object,
                           reason_code: object, _properties: object) -> None:
        was_connected = self._connected.is_set()
        if not was_connected and client.on_log is not None and self._client_tls and \
                self._refused is None and self._connect_error is None:
            # closed without a word after the handshake, before any CONNACK: what a TLS 1.3
            # listener without a TLS alert does to a client certificate it does not accept
            self._tls_refused("the broker closed the TLS connection before answering CONNECT "
                              "(require_certificate true? give --cert-file and --key-file, "
                              "signed by the listener's cafile)")
        self._connected.clear()
        self._acked.set()  # a flush waiting for acknowledgements stops at once
        if was_connected and not self._stopping:
            log.warning("lost connection to %s (%s); reconnecting%s", self.member, reason_code,
                        " to the next member" if len(self._members) > 1 else "")
        for hook in list(self._on_disconnect_hooks):
            try:
                hook()
            except Exception:
                log.exception("on_disconnect hook failed")
