"""The ESP32 node's modules in MicroPython itself (unix port, 100K heap), without a broker:
the task queue's order and bounds, the bounded MQTT reader, and Wi-Fi bring-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from esp32_support import (SHIMS_DIR, install_board_files, micropython,  # noqa: E402,F401
                           micropython_command, umqtt_file)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def board_dir(tmp_path: Path, umqtt_file: Path, micropython: list[str]) -> Path:
    install_board_files(tmp_path / "board", umqtt_file, {"WIFI_SSID": "lab",
                                                        "WIFI_PASSWORD": "pw",
                                                        "WIFI_TIMEOUT_S": 0.3})
    return tmp_path / "board"


def run_mpy(board: Path, code: str, env: dict[str, str] | None = None) -> Any:
    """Run `code` on the imitated board; it prints one JSON value last."""
    script = board / "_check.py"
    script.write_text(textwrap.dedent(code))
    proc = subprocess.run(
        [*micropython_command(), "-X", "heapsize=100K", "-c",
         "import sys; sys.path[0] = ''; exec(open('_check.py').read())"],
        cwd=board, capture_output=True, text=True, timeout=60,
        env=dict(os.environ, MICROPYPATH=f":.frozen:lib:{SHIMS_DIR}", **(env or {})))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_queue_orders_by_priority_then_arrival(board_dir: Path) -> None:
    out = run_mpy(board_dir, """
        import json
        from task_queue import TaskQueue
        q = TaskQueue(8)
        q.handle(json.dumps({"type": "tasks", "v": 1, "tasks": [
            {"id": "a", "name": "echo", "priority": 3}, {"id": "b", "name": "echo", "priority": 9},
            {"id": "c", "name": "echo"}, {"id": "d", "name": "echo", "priority": 9},
            {"id": "e", "name": "echo", "priority": 3}]}))
        order = []
        while True:
            t = q.get()
            if t is None:
                break
            order.append(t["id"])
            q.running = None
        print(json.dumps(order))
    """)
    assert out == ["b", "d", "c", "a", "e"]


def test_queue_hands_back_by_count_and_by_bytes(board_dir: Path) -> None:
    out = run_mpy(board_dir, """
        import json
        from task_queue import TaskQueue
        q = TaskQueue(3, max_bytes=10000)
        for i, p in enumerate([5, 5, 5, 1, 7, 5]):
            q.accept({"id": "t%d" % i, "name": "echo", "priority": p}, 10)
        by_count = (q.released[:], [item[2]["id"] for item in q.items])
        q = TaskQueue(8, max_bytes=1000)
        q.accept({"id": "big", "name": "echo", "priority": 5}, 5000)   # alone: always fits
        q.accept({"id": "next", "name": "echo", "priority": 5}, 100)   # over budget: back
        q.accept({"id": "urgent", "name": "echo", "priority": 9}, 100) # evicts "big"
        by_bytes = (q.released[:], [item[2]["id"] for item in q.items])
        print(json.dumps([by_count, by_bytes]))
    """)
    by_count, by_bytes = out
    assert by_count == [["t3", "t2", "t5"], ["t0", "t1", "t4"]]
    assert by_bytes == [["next", "big"], ["urgent"]]


def test_queue_counts_what_it_cannot_use(board_dir: Path) -> None:
    out = run_mpy(board_dir, """
        import json
        from task_queue import TaskQueue
        q = TaskQueue(8)
        for msg in [b"{", b"3", b'{"type": "tasks", "v": 1.0, "tasks": []}',
                    b'{"type": "tasks", "v": 1, "tasks": [null, {"id": ""}, {"id": 3}]}',
                    b'{"type": "tasks", "v": 1, "epoch": -1, "tasks": []}',
                    b'{"type": "control", "v": 1, "command": "snapshot", "request_id": "r1"}']:
            q.handle(msg)
        bad = {"id": "x", "name": "echo", "args": {}}
        y = {"id": "y", "name": "echo"}
        q.handle(json.dumps({"type": "tasks", "v": 1, "tasks": [bad]}))
        q.handle(json.dumps({"type": "tasks", "v": 1, "tasks": [y, y]}))
        print(json.dumps({"rejected": q.rejected, "duplicates": q.duplicates,
                          "snapshots": q.snapshots,
                          "errors": [r["error"]["kind"] for r in q.outbox], "held": q.held()}))
    """)
    assert out == {"rejected": 7, "duplicates": 1, "snapshots": ["r1"],
                   "errors": ["bad_request"], "held": ["y"]}


def test_reader_drains_an_oversized_message_and_keeps_the_stream(board_dir: Path) -> None:
    out = run_mpy(board_dir, """
        import json
        from mqtt_client import BoundedClient

        def publish(topic, payload, pid):
            body = (bytes([len(topic) >> 8, len(topic) & 255]) + topic
                    + bytes([pid >> 8, pid & 255]) + payload)
            n = len(body)
            head = bytearray([0x32])
            while True:
                b = n & 0x7F
                n >>= 7
                head.append(b | (0x80 if n else 0))
                if not n:
                    return bytes(head) + body

        class Sock:
            def __init__(self, data):
                self.data = data
                self.pos = 0
                self.sent = b""
            def read(self, n):
                if self.pos >= len(self.data):
                    return None
                chunk = self.data[self.pos:self.pos + n]
                self.pos += len(chunk)
                return chunk
            def readinto(self, buf):
                chunk = self.data[self.pos:self.pos + len(buf)]
                buf[:len(chunk)] = chunk
                self.pos += len(chunk)
                return len(chunk)
            def write(self, b):
                self.sent += bytes(b)
            def settimeout(self, t):
                pass
            def setblocking(self, b):
                pass

        got = []
        c = BoundedClient("t", "127.0.0.1", 1883)
        c.limit = 100
        c.set_callback(lambda topic, msg: got.append(None if msg is None else bytes(msg).decode()))
        c.sock = Sock(publish(b"a/b", b"x" * 5000, 7) + publish(b"a/b", b"small", 8)
                      + b"\\xd0\\x00")
        ops = [c.check_msg(), c.check_msg(), c.check_msg(), c.check_msg()]
        print(json.dumps({"got": got, "ops": ops, "acks": list(c.sock.sent), "rx": len(c.rx)}))
    """)
    assert out["got"] == [None, "small"]
    assert out["ops"] == [0x32, 0x32, 0xD0, None]
    assert out["acks"] == [0x40, 2, 0, 7, 0x40, 2, 0, 8]
    assert out["rx"] == 100


def test_wifi_static_ip_drop_and_reconnect(board_dir: Path, tmp_path: Path) -> None:
    wifi_file = tmp_path / "ap"
    wifi_file.write_text("up")
    out = run_mpy(board_dir, f"""
        import json
        import wifi

        class Config:
            WIFI_SSID = "lab"
            WIFI_PASSWORD = "pw"
            STATIC_IP = "10.9.8.50"
            WIFI_TIMEOUT_S = 0.3

        def ap(state):
            with open({str(wifi_file)!r}, "w") as f:
                f.write(state)

        first = wifi.up(Config)
        w = wifi.wlan()
        address = list(w.ifconfig())
        ap("down")
        dropped = w.isconnected()
        while_down = wifi.up(Config)
        ap("up")
        still_down = w.isconnected()   # a drop needs a new connect()
        back = wifi.up(Config)
        print(json.dumps({{"first": first, "address": address, "dropped": dropped,
                           "while_down": while_down, "still_down": still_down, "back": back,
                           "options": w._options, "connects": w.connects}}))
    """, env={"FAKE_WIFI_FILE": str(wifi_file)})
    assert out["first"] is True
    assert out["address"] == ["10.9.8.50", "255.255.255.0", "10.9.8.1", "10.9.8.1"]
    assert out["dropped"] is False and out["while_down"] is False and out["still_down"] is False
    assert out["back"] is True
    assert out["options"] == {"pm": 0, "reconnects": -1}
    assert out["connects"] == 3


def test_node_modules_compile_within_the_heap(board_dir: Path) -> None:
    """What main.py imports fits a 100K heap with room to work (compiling .py on the board)."""
    out = run_mpy(board_dir, """
        import gc, json
        import config
        rx = bytearray(8192)
        import wifi
        from compute_node import ComputeNode
        node = ComputeNode("127.0.0.1", 1883, node_id="n", rx=rx)
        gc.collect()
        print(json.dumps({"free": gc.mem_free(), "alloc": gc.mem_alloc()}))
    """)
    assert out["free"] > 40_000


def test_ids_of_an_undecodable_batch_are_handed_back(board_dir: Path) -> None:
    out = run_mpy(board_dir, """
        import json
        from task_queue import TaskQueue
        q = TaskQueue(8)
        q.accept({"id": "held", "name": "echo"}, 10)
        raw = b'{"type": "tasks", "v": 1, "tasks": [{"id": "a-1", "name": "primes", "args": ' \\
              b'[[1, 2]]}, {"priority": 3, "id" : "b-2", "kwargs": {"request_id": "no"}},' \\
              b'{"id":"held","name":"echo"}, {"id": 5}]}'
        buf = bytearray(len(raw) + 40)
        buf[:len(raw)] = raw
        q.hand_back_unread(buf, len(raw))
        print(json.dumps(q.released))
    """)
    assert out == ["a-1", "b-2"]
