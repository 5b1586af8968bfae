"""ComputeNode: the fabric's compute node for ESP32 boards running MicroPython.

One MQTT session over umqtt.simple, one poll loop, reconnection owned by the caller
(main.py). Topics, all JSON:

    <root>/nodes/<node_id>/status   retained: birth `ready`, heartbeat, will `dead`
                                    (birth and will carry the same `seq`, one per connect)
    <root>/nodes/<node_id>/tasks    task batches and control messages (QoS 1)
    <root>/results/<node_id>        result batches and snapshot reports (QoS 1)
    <root>/master/lease             retained: the replicated masters' lease (read only)

Nothing a broker or master sends can crash the node (see task_queue and mqtt_client).
The code is split in modules of a few kilobytes because compiling a .py file on the
board needs several times its size in heap.
"""

import gc
import json
import time

import _thread

import node_info
import tasks
from link import Link, log
from task_queue import TaskQueue, now

RESULT_BATCH = 8      # results sent in one message at most
RESULT_WAIT_MS = 200  # how long a finished result may wait for others to share a message
CHEAP = ("noop", "echo")  # tasks quick enough that a result may wait for theirs


class ComputeNode(Link):
    """One board on the fabric (seed API: connect, is_connected, handle_disconnect,
    check_messages, mqtt_keepalive_loop, start_keepalive_thread, publish_status,
    send_result, get_task); main.py drives it. The MQTT half is link.Link."""

    def __init__(self, broker_host, broker_port=1883, broker_keepalive=60, node_id=None,
                 user=None, password=None, root="fabric", heartbeat=5, max_payload=8192,
                 queue_size=8, queue_bytes=None, prefetch=0, io_timeout=10,
                 clean_session=True, wlan=None, wifi_up=None, rx=None, ca_file=None,
                 tls_hostname=None):
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
        self.ca_file = ca_file    # a CA certificate (PEM or DER) on the board: TLS, verified
        self.tls_hostname = tls_hostname  # the name in the broker's certificate (default host)
        self.wlan = wlan          # has isconnected(); None when the link is not Wi-Fi
        self.wifi_up = wifi_up    # brings Wi-Fi up within a bound; True when up
        self.node_id = node_id or node_info.default_node_id()
        base = root + "/nodes/" + self.node_id
        self.task_topic = base + "/tasks"
        self.status_topic = base + "/status"
        self.result_topic = root + "/results/" + self.node_id
        self.lease_topic = root + "/master/lease"
        self.lease_key = self.lease_topic.encode()  # umqtt hands topics over as bytes
        self.instance = node_info.random_hex()
        self.task_names = tasks.names()
        self.lambda_names = tasks.lambda_names()
        self.seq = 0              # birth sequence: +1 per connect, in the birth and the will
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

    def _on_message(self, topic, msg):
        # Runs inside umqtt's read, also while a publish waits for its PUBACK: it only
        # records; flush() sends what follows from it.
        try:
            if msg is None:
                self.queue.rejected += 1  # longer than max_payload: drained unread
            elif topic == self.lease_key:
                self.queue.fence.observe(msg)
            else:
                if len(msg) > 1024:
                    # decoding a big batch needs large free runs: merge the garbage's holes
                    # first (a collection on a failed allocation comes too late to help)
                    gc.collect()
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
                                         "instance": self.instance, "poll": self.poll})
        self.queue.finish(result, cache, task)
        self.sample_heap()
        return result

    def poll(self, wait_ms):
        """For a task that waits (`sleep`, a lambda): read messages for up to wait_ms and
        send what is due, so a `cancel` reaches it; True once the running task is cancelled.
        A link that fails here is left for the main loop to reconnect."""
        try:
            if self.broken:
                time.sleep_ms(wait_ms)
            else:
                self.check_messages(wait_ms)  # OSError when not connected
                self.flush()
        except Exception as e:
            self.broken = True
            log("link lost during a task:", repr(e))
        q = self.queue
        return q.cancelled is not None and q.cancelled == q.running

    # -- sending -----------------------------------------------------------------------------

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
                                      "value": r.get("output"),
                                      "attempt": r.get("attempt", 0), "token": r.get("token", "")}
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
        return node_info.snapshot(self)

    def _status_json(self, status):
        return node_info.status_json(self, status)
