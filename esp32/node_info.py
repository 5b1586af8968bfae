"""What the board says about itself: its node id, its retained status and its snapshot."""

import gc
import json
import time

from task_queue import now


def hexlify(raw):
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
    return "esp32-" + hexlify(raw)


def random_hex():
    """8 hex digits: the instance id of this boot."""
    try:
        import os
        return hexlify(os.urandom(4))
    except Exception:
        import random
        return "%08x" % random.getrandbits(32)


def snapshot(node):
    """Counters and heap for a snapshot report (heap_free/heap_alloc after a collection)."""
    q = node.queue
    gc.collect()
    return {"tasks_processed": q.tasks_done + q.tasks_failed, "tasks_done": q.tasks_done,
            "tasks_failed": q.tasks_failed, "held": q.held(), "heap_free": gc.mem_free(),
            "heap_alloc": gc.mem_alloc(), "heap_peak": node.heap_peak,
            "heap_live_peak": node.heap_live_peak, "heap_min_free": node.heap_min_free,
            "rejected": q.rejected,
            "duplicates": q.duplicates, "reconnects": node.reconnects,
            "errors": node.errors, "queue_size": q.size, "instance": node.instance,
            "seq": node.seq, "lease": [q.fence.best[0], q.fence.best[1], q.fence.held],
            "uptime": time.ticks_diff(time.ticks_ms(), node.started) // 1000}


def status_json(node, status):
    """The retained status message (birth, heartbeat, will) as JSON."""
    q = node.queue
    return json.dumps({
        "type": "status", "v": 1, "node_id": node.node_id, "status": status,
        "kind": "micropython", "codec": "json", "capacity": 1, "prefetch": node.prefetch,
        "workload": q.workload(), "max_payload": node.max_payload,
        "instance": node.instance, "tasks_done": q.tasks_done,
        "tasks_failed": q.tasks_failed, "rejected": q.rejected,
        "heartbeat": node.heartbeat, "ts": now(), "tasks": node.task_names,
        "lambdas": node.lambda_names, "seq": node.seq,
        "duplicates": q.duplicates, "reconnects": node.reconnects,
        "heap_free": gc.mem_free(), "heap_alloc": gc.mem_alloc(),
        "heap_peak": node.heap_peak})
