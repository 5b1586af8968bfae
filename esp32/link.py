"""Link: the MQTT half of ComputeNode (compute_node.py), a base class of its own module.

connect (with the will), is_connected, handle_disconnect, check_messages and the
keepalive thread, over umqtt.simple with bounded waits (mqtt_client). It uses the
attributes ComputeNode.__init__ sets and its status and message handlers. Kept apart
because compiling one big .py file on the board needs more heap than two halves.
"""

import gc
import time

import _thread
import select

import sys

from mqtt_client import PINGRESP, BoundedClient, Tls


def log(*args):
    print("[%d]" % time.ticks_ms(), *args)


class Link:
    # -- connection ------------------------------------------------------------------------

    def connect(self):
        """Wi-Fi (through wifi_up), MQTT with the will `dead`, subscribe, birth. True if online."""
        self.handle_disconnect()
        if self.wifi_up is not None and not self.wifi_up():
            return False
        c = self._client()
        try:
            self._session(c)
            poller = select.poll()
            poller.register(c.sock, select.POLLIN)
        except Exception:
            try:
                c.sock.close()
            except Exception:
                pass
            raise
        with self.lock:
            self.client = c
            self.poller = poller
            self.broken = False
            self.last_ping = self.last_beat = time.ticks_ms()
        self.reconnects += 1
        self.publish_status(self.state())
        log("online as", self.node_id, "at", self.broker_host, self.broker_port)
        return True

    # Small functions: each one's bytecode is one piece of heap, and a piece that size must
    # be free while the module compiles.

    def _client(self):
        """A BoundedClient with the will of this session (TLS when a CA is configured)."""
        tls = None
        if self.ca_file:
            with open(self.ca_file, "rb") as f:
                tls = Tls(f.read(), self.tls_hostname or self.broker_host, self.io_timeout)
            sys.modules["ussl"] = tls  # umqtt.simple 1.3 imports `ussl` to wrap its socket
        c = BoundedClient(self.node_id, self.broker_host, self.broker_port, self.user,
                          self.password, self.broker_keepalive, tls)
        c.tls = tls
        c.limit = self.max_payload
        c.rx = self.rx
        c.io_timeout = self.io_timeout
        c.set_callback(self._on_message)
        self.seq += 1
        c.set_last_will(self.status_topic, self._status_json("dead"), True, 1)
        return c

    def _session(self, c):
        """CONNECT (bounded), socket options, the subscriptions."""
        try:
            c.connect(self.clean_session, self.io_timeout)
        except TypeError:  # umqtt.simple before 1.4: no connect timeout
            c.connect(self.clean_session)
        if c.tls is not None:
            c.raw = c.tls.raw
        c.settimeout(self.io_timeout)
        try:  # umqtt writes a message in pieces: without this, Nagle adds ~40 ms
            (c.raw or c.sock).setsockopt(6, 1, 1)  # IPPROTO_TCP, TCP_NODELAY
        except Exception:
            pass
        c.last_rx = time.ticks_ms()
        c.subscribe(self.lease_topic, 1)  # first: the retained lease precedes any task
        c.subscribe(self.task_topic, 1)

    def is_connected(self):
        """True while the MQTT session is up and (when known) the Wi-Fi link too."""
        if self.client is None or self.broken:
            return False
        return self.wlan is None or self.wlan.isconnected()

    def handle_disconnect(self):
        """Drop the session without DISCONNECT (the broker sends the will); keep all tasks."""
        with self.lock:
            c = self.client
            self.client = None
            self.poller = None
        if c is not None:
            try:
                c.sock.close()
            except Exception:
                pass
        gc.collect()


    # -- receiving ---------------------------------------------------------------------------

    def check_messages(self, wait_ms=0):
        """Take waiting messages into the queue, waiting up to wait_ms for the first.

        Raises OSError when the connection is gone or the broker stopped answering pings.
        """
        c = self.client
        poller = self.poller
        if c is None:
            raise OSError("not connected")
        if wait_ms > 0 and poller is not None:
            poller.poll(wait_ms)
        with self.lock:
            for _ in range(16):
                op = c.check_msg()
                if op is None:
                    break
                if op != PINGRESP and op & 0xF0 != 0x30:
                    raise OSError("unexpected MQTT packet 0x%02x" % op)
        if self.broker_keepalive:
            limit = (self.broker_keepalive * 3 // 2 + self.io_timeout) * 1000
            if time.ticks_diff(time.ticks_ms(), c.last_rx) > limit:
                raise OSError("broker stopped answering")


    # -- sending -----------------------------------------------------------------------------

    def _publish(self, topic, msg, retain=False, qos=1):
        c = self.client
        if c is None:
            raise OSError("not connected")
        with self.lock:
            c.publish(topic, msg, retain, qos)


    # -- keepalive and heartbeat ------------------------------------------------------------

    def mqtt_keepalive_loop(self):
        """Ping the broker and publish the heartbeat, also while a long task runs.

        Only writes (ping, QoS 0 status) under the socket lock: reading stays with the main
        loop, so message callbacks never run on this thread.
        """
        while True:
            try:
                time.sleep_ms(100)
                c = self.client
                if c is None or self.broken:
                    continue
                t = time.ticks_ms()
                if (self.broker_keepalive
                        and time.ticks_diff(t, self.last_ping) >= self.broker_keepalive * 500):
                    with self.lock:
                        if self.client is c:
                            c.ping()
                    self.last_ping = t
                if time.ticks_diff(t, self.last_beat) >= int(self.heartbeat * 1000):
                    msg = self._status_json(self.state())
                    with self.lock:
                        if self.client is c and not self.stopping:
                            c.publish(self.status_topic, msg, True, 0)
                    self.last_beat = t
            except Exception as e:
                self.broken = True  # the main loop reconnects
                self.errors += 1
                log("keepalive:", repr(e))

    def start_keepalive_thread(self):
        """Start mqtt_keepalive_loop once per boot; it idles while disconnected."""
        if not self.thread_started:
            self.thread_started = True
            _thread.start_new_thread(self.mqtt_keepalive_loop, ())
