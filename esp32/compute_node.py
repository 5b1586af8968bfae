"""ComputeNode: the fabric's compute node for ESP32 boards running MicroPython.

One MQTT session over umqtt.simple, one poll loop, reconnection owned by the caller
(main.py). Topics, all JSON:

    <root>/nodes/<node_id>/status   retained: birth `ready`, heartbeat, will `dead`
    <root>/nodes/<node_id>/tasks    task batches and control messages (QoS 1)
    <root>/results/<node_id>        result batches and snapshot reports (QoS 1)

Nothing a broker or master sends can crash the node (see task_queue and mqtt_client).
The code is split in modules of a few kilobytes because compiling a .py file on the
board needs several times its size in heap.
"""

import gc
import json
import time

import _thread
import select

import tasks
from mqtt_client import PINGRESP, BoundedClient
from task_queue import TaskQueue, now

RESULT_BATCH = 8      # results sent in one message at most
RESULT_WAIT_MS = 200  # how long a finished result may wait for others to share a message
CHEAP = ("noop", "echo")  # tasks quick enough that a result may wait for theirs


def log(*args):
    print("[%d]" % time.ticks_ms(), *args)


def _hex(raw):
    return "".join("%02x" % b for b in raw)


def default_node_id():
    """`esp32-<mac hex>`: stable across reboots, unique per board."""
    raw = None
    try:
        import machine
        raw = machine.unique_id()
    except Exception:
        pass
    if not raw:
        import network
        raw = network.WLAN(network.STA_IF).config("mac")
    return "esp32-" + _hex(raw)


def _random_hex():
    try:
        import os
        return _hex(os.urandom(4))
    except Exception:
        import random
        return "%08x" % random.getrandbits(32)


class ComputeNode:
    """One board on the fabric (seed API: connect, is_connected, handle_disconnect,
    check_messages, mqtt_keepalive_loop, start_keepalive_thread, publish_status,
    send_result, get_task); main.py drives it."""

    def __init__(self, broker_host, broker_port=1883, broker_keepalive=60, node_id=None,
                 user=None, password=None, root="fabric", heartbeat=5, max_payload=8192,
                 queue_size=8, queue_bytes=None, prefetch=0, io_timeout=10,
                 clean_session=True, wlan=None, wifi_up=None, rx=None):
        self.broker_host = broker_host
        self.broker_port = broker_port
        self.broker_keepalive = broker_keepalive
        self.user = user or None  # umqtt sends a password field whenever a user is set
        self.password = (password or "") if self.user else None
        self.heartbeat = heartbeat
        self.max_payload = max_payload
        self.prefetch = prefetch
        self.io_timeout = io_timeout
        self.clean_session = clean_session
        self.wlan = wlan          # has isconnected(); None when the link is not Wi-Fi
        self.wifi_up = wifi_up    # brings Wi-Fi up within a bound; True when up
        self.node_id = node_id or default_node_id()
        base = root + "/nodes/" + self.node_id
        self.task_topic = base + "/tasks"
        self.status_topic = base + "/status"
        self.result_topic = root + "/results/" + self.node_id
        self.instance = _random_hex()
        self.task_names = tasks.names()
        # The master sends up to 1 + prefetch tasks of up to max_payload bytes: hold them all.
        self.queue = TaskQueue(queue_size, queue_bytes or (1 + prefetch) * max_payload)
        # Every message is read into this one buffer; allocate it early (main.py does).
        self.rx = rx if rx is not None and len(rx) >= max_payload else bytearray(max_payload)
        # Every attribute exists from here on: the keepalive thread reads some, and on the
        # unix port (no GIL) an instance dict must not grow under its feet.
        self.client = None
        self.poller = None
        self.lock = _thread.allocate_lock()
        self.broken = False
        self.stopping = False     # set by shutdown(): no more heartbeats
        self.thread_started = False
        self.last_ping = 0
        self.last_beat = 0
        self.reconnects = 0
        self.errors = 0
        self.heap_peak = 0        # highest gc.mem_alloc() seen, garbage included
        self.heap_live_peak = 0   # highest gc.mem_alloc() right after a collection
        self.heap_min_free = 1 << 30
        self.started = time.ticks_ms()

    # -- connection ------------------------------------------------------------------------

    def connect(self):
        """Wi-Fi (through wifi_up), MQTT with the will `dead`, subscribe, birth. True if online."""
        self.handle_disconnect()
        if self.wifi_up is not None and not self.wifi_up():
            return False
        c = BoundedClient(self.node_id, self.broker_host, self.broker_port, self.user,
                          self.password, self.broker_keepalive)
        c.limit = self.max_payload
        c.rx = self.rx
        c.io_timeout = self.io_timeout
        c.set_callback(self._on_message)
        c.set_last_will(self.status_topic, self._status_json("dead"), True, 1)
        try:
            try:
                c.connect(self.clean_session, self.io_timeout)
            except TypeError:  # umqtt.simple before 1.4: no connect timeout
                c.connect(self.clean_session)
            c.sock.settimeout(self.io_timeout)
            try:  # umqtt writes a message in pieces: without this, Nagle adds ~40 ms
                c.sock.setsockopt(6, 1, 1)  # IPPROTO_TCP, TCP_NODELAY (lwIP and Linux)
            except Exception:
                pass
            c.last_rx = time.ticks_ms()
            c.subscribe(self.task_topic, 1)
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

    def shutdown(self):
        """Clean exit: hand back queued tasks, send what is done, say `offline`, DISCONNECT."""
        self.stopping = True
        try:
            self.queue.release_all()
            q = self.queue
            while q.outbox or q.released or q.snapshots:
                self.flush(True)
            self.publish_status("offline")
            with self.lock:
                if self.client is not None:
                    self.client.disconnect()
                    self.client = None
        except Exception as e:
            log("shutdown:", repr(e))
        self.handle_disconnect()

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

    def _on_message(self, topic, msg):
        # Runs inside umqtt's read, also while a publish waits for its PUBACK: it only
        # records; flush() sends what follows from it.
        try:
            if msg is None:
                self.queue.rejected += 1  # longer than max_payload: drained unread
            else:
                self.queue.handle(msg, self.rx)
                self.sample_heap()  # the message and what it decoded to are still allocated
                if len(msg) > 1024:
                    gc.collect()  # parsing big numbers leaves much garbage: free it now
                    self.heap_live_peak = max(self.heap_live_peak, gc.mem_alloc())
        except MemoryError:
            self.queue.rejected += 1
            gc.collect()
        except Exception as e:
            self.queue.rejected += 1
            log("bad message:", repr(e))

    # -- running -----------------------------------------------------------------------------

    def get_task(self):
        """The most urgent queued task (FIFO within a priority), or None."""
        return self.queue.get()

    def execute(self, task):
        """Run a task from get_task(); its result is queued for sending and returned."""
        result, cache = tasks.run(task, {"node_id": self.node_id, "task_id": task["id"],
                                         "instance": self.instance})
        self.queue.running = None
        self.queue.finish(result, cache)
        self.sample_heap()
        return result

    # -- sending -----------------------------------------------------------------------------

    def _publish(self, topic, msg, retain=False, qos=1):
        c = self.client
        if c is None:
            raise OSError("not connected")
        with self.lock:
            c.publish(topic, msg, retain, qos)

    def publish_status(self, status, qos=1):
        """Publish the retained status (`ready`, `busy`, `offline`, ...)."""
        self._publish(self.status_topic, self._status_json(status), True, qos)

    def send_result(self, result_data, released=()):
        """Publish results (a dict or a list) in one batch at QoS 1, each with a timestamp.

        A dict of the older {"task_id", "output"} shape is accepted too.
        """
        if type(result_data) is dict:
            result_data = [result_data]
        ts = now()
        for i in range(len(result_data)):
            r = result_data[i]
            if "id" not in r:
                r = result_data[i] = {"id": str(r.get("task_id")), "ok": True,
                                      "value": r.get("output")}
            if "ts" not in r:
                r["ts"] = ts
        self._publish(self.result_topic, json.dumps({
            "type": "results", "v": 1, "node_id": self.node_id, "instance": self.instance,
            "results": result_data, "released": list(released)}))

    def flush(self, force=False):
        """Send snapshot reports, hand-backs and due results; on failure keep them all.

        A result waits for others (up to RESULT_BATCH or RESULT_WAIT_MS) only while the
        next task is a cheap one, so tiny tasks do not cost a message each and no result
        waits behind a long task.
        """
        q = self.queue
        while q.snapshots:
            self._publish(self.result_topic, json.dumps({
                "type": "report", "v": 1, "node_id": self.node_id,
                "request_id": q.snapshots[0], "state": self.snapshot()}))
            q.snapshots.pop(0)
        n = len(q.outbox)
        k = len(q.released)
        if not (n or k):
            return
        if n and not (force or k or n >= RESULT_BATCH
                      or time.ticks_diff(time.ticks_ms(), q.outbox_since) > RESULT_WAIT_MS):
            nxt = q.peek()
            if nxt is not None and nxt["name"] in CHEAP:
                return
        n = min(n, RESULT_BATCH)
        # The callback may add to both lists while the publish waits for its PUBACK:
        # only what was sent is removed.
        self.send_result(q.outbox[:n], q.released[:k])
        del q.outbox[:n]
        del q.released[:k]
        if q.outbox:
            q.outbox_since = time.ticks_ms()
        gc.collect()

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

    # -- state -------------------------------------------------------------------------------

    def state(self):
        """`busy` while the queue cannot take another task, else `ready`."""
        return "busy" if self.queue.full() else "ready"

    def sample_heap(self):
        """Track the peak heap use, reported in the status and snapshots."""
        alloc = gc.mem_alloc()
        free = gc.mem_free()
        if alloc > self.heap_peak:
            self.heap_peak = alloc
        if free < self.heap_min_free:
            self.heap_min_free = free

    def snapshot(self):
        """Counters and heap for a snapshot report (heap_free/heap_alloc after a collection)."""
        q = self.queue
        gc.collect()
        return {"tasks_processed": q.tasks_done + q.tasks_failed, "tasks_done": q.tasks_done,
                "tasks_failed": q.tasks_failed, "held": q.held(), "heap_free": gc.mem_free(),
                "heap_alloc": gc.mem_alloc(), "heap_peak": self.heap_peak,
                "heap_live_peak": self.heap_live_peak, "heap_min_free": self.heap_min_free,
                "rejected": q.rejected,
                "duplicates": q.duplicates, "reconnects": self.reconnects,
                "errors": self.errors, "queue_size": q.size, "instance": self.instance,
                "uptime": time.ticks_diff(time.ticks_ms(), self.started) // 1000}

    def _status_json(self, status):
        q = self.queue
        return json.dumps({
            "type": "status", "v": 1, "node_id": self.node_id, "status": status,
            "kind": "micropython", "codec": "json", "capacity": 1, "prefetch": self.prefetch,
            "workload": q.workload(), "max_payload": self.max_payload,
            "instance": self.instance, "tasks_done": q.tasks_done,
            "tasks_failed": q.tasks_failed, "rejected": q.rejected,
            "heartbeat": self.heartbeat, "ts": now(), "tasks": self.task_names,
            "duplicates": q.duplicates, "reconnects": self.reconnects,
            "heap_free": gc.mem_free(), "heap_alloc": gc.mem_alloc(),
            "heap_peak": self.heap_peak})
