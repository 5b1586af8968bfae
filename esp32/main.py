# main.py: the node's loop, run by the firmware after boot.py.
#
# Connect (Wi-Fi, then MQTT), serve tasks until anything goes wrong, drop the session,
# wait with a growing backoff and connect again. Every error is caught, counted and
# logged: the board never reboots itself into a loop. Ctrl-C (KeyboardInterrupt) ends
# the loop cleanly, so a tool such as mpremote can always reach the REPL.
import gc

import config

# The receive buffer comes first, while the heap is still whole: compiling the modules
# below leaves it in pieces, and a message of MAX_PAYLOAD needs one piece that size.
gc.collect()
RX = bytearray(getattr(config, "MAX_PAYLOAD", 8192))

# The node's modules are compiled one at a time, collecting after each: a compile's garbage
# is freed before the next one's bytecode is placed, so the heap keeps large free runs, which
# the lists of a big decoded batch need (measured on the unix port: 12 KB instead of 4.5 KB).
for _name in ("mqtt_client", "lease", "tasks", "task_queue", "node_info", "link", "wifi"):
    __import__(_name)
    gc.collect()

import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import wifi  # noqa: E402
from compute_node import ComputeNode, log  # noqa: E402

IDLE_WAIT_MS = 20   # longest wait for a message when there is nothing to run
LINK_CHECK_MS = 250


def setting(name, default=None):
    return getattr(config, name, default)


def build():
    return ComputeNode(
        broker_host=config.MQTT_HOST,
        broker_port=setting("MQTT_PORT", 1883),
        broker_keepalive=setting("MQTT_KEEPALIVE", 30),
        node_id=setting("NODE_ID"),
        user=setting("MQTT_USER"),
        password=setting("MQTT_PASSWORD"),
        root=setting("TOPIC_ROOT", "fabric"),
        heartbeat=setting("HEARTBEAT_S", 5),
        max_payload=setting("MAX_PAYLOAD", 8192),
        queue_size=setting("QUEUE_SIZE", 8),
        queue_bytes=setting("QUEUE_BYTES"),
        prefetch=setting("PREFETCH", 0),
        io_timeout=setting("IO_TIMEOUT_S", 10),
        wlan=wifi.wlan(),
        wifi_up=lambda: wifi.up(config),
        rx=RX,
        ca_file=setting("MQTT_CA_FILE"),
        tls_hostname=setting("MQTT_TLS_HOSTNAME"),
    )


def serve(node):
    """Poll, run, send, until the link fails (raises)."""
    node.start_keepalive_thread()
    checked = time.ticks_ms()
    while True:
        node.check_messages(0 if node.queue.items else IDLE_WAIT_MS)
        t = time.ticks_ms()
        if time.ticks_diff(t, checked) >= LINK_CHECK_MS:
            checked = t
            if not node.is_connected():
                raise OSError("link lost")
        task = node.get_task()
        if task is not None:
            node.execute(task)
            task = None
        node.flush()


def main():
    gc.collect()
    gc.threshold(gc.mem_free() // 4 + gc.mem_alloc())  # collect early: less fragmentation
    node = build()
    log("node", node.node_id, "instance", node.instance, "heap free", gc.mem_free())
    low = setting("RECONNECT_MIN_S", 1)
    high = setting("RECONNECT_MAX_S", 30)
    delay = low
    clock_set = False
    while True:
        began = time.ticks_ms()
        try:
            if node.connect():
                if not clock_set:
                    clock_set = wifi.sync_clock(config)
                serve(node)
        except KeyboardInterrupt:
            log("stopping")
            node.shutdown()
            return
        except Exception as e:  # MemoryError included: count, report, go on
            node.errors += 1
            log("error:", repr(e))
            sys.print_exception(e)
        node.handle_disconnect()
        # A session that lasted resets the backoff; one that failed at once grows it.
        if time.ticks_diff(time.ticks_ms(), began) > 60000:
            delay = low
        try:
            time.sleep(delay * (0.5 + random.random() / 2))
        except KeyboardInterrupt:
            log("stopping")
            return
        delay = min(delay * 2, high)


if __name__ == "__main__":
    main()
