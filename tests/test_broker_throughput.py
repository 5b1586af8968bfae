"""Throughput of one paho publisher and one paho subscriber (another process) through a broker.

As a test: a burst at each QoS arrives complete and in order on both brokers. As a script, the
measurement quoted for the embedded broker, against plain amqtt 0.12.1 and mosquitto:

    python tests/test_broker_throughput.py --messages 10000 --repeat 5 [--filters 500]

It prints msg/s (wall clock: publisher's first publish to subscriber's last message) and the
broker's own CPU time per message, read from /proc, which stays comparable on a busy machine
where msg/s does not. `--filters N` adds an idle client holding N subscription filters.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.brokers import (BrokerHandle, broker_params, start_broker,  # noqa: E402
                             start_embedded, start_mosquitto)

CONFIG = ("listener 1883 127.0.0.1\nallow_anonymous true\nlog_dest none\n"
          "max_queued_messages 0\n")  # mosquitto drops QoS 1 beyond 1000 queued otherwise
TOPIC = "bench/t"


def _client(client_id: str):  # type: ignore[no-untyped-def]
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                       protocol=mqtt.MQTTv311)


def _subscriber(host: str, port: int, qos: int, count: int) -> None:
    """Child process: subscribe, say so, count `count` messages, report order and end time."""
    got: list[int] = []
    done = threading.Event()
    subscribed = threading.Event()
    client = _client(f"bench-sub-{os.getpid()}")

    def on_message(_c: object, _u: object, message: object) -> None:
        got.append(int.from_bytes(message.payload[:4], "big"))  # type: ignore[attr-defined]
        if len(got) >= count:
            done.set()

    client.on_message = on_message
    client.on_subscribe = lambda *_: subscribed.set()
    client.connect(host, port)
    client.loop_start()
    client.subscribe(TOPIC, qos)
    subscribed.wait(10)
    print("SUBSCRIBED", flush=True)
    done.wait(300)
    end = time.time()
    print(json.dumps({"got": len(got), "ordered": got == sorted(got), "end": end}), flush=True)
    client.disconnect()
    client.loop_stop()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_burst(broker: BrokerHandle, qos: int, count: int) -> dict[str, float]:
    """Publish `count` messages as fast as paho allows; wait (bounded) for all to arrive."""
    child = subprocess.Popen([sys.executable, __file__, "--subscriber", broker.host,
                              str(broker.port), str(qos), str(count)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "SUBSCRIBED"
        publisher = _client(f"bench-pub-{os.getpid()}")
        publisher.max_inflight_messages_set(100)
        publisher.connect(broker.host, broker.port)
        publisher.loop_start()
        padding = b"x" * 60
        cpu_before = _cpu_seconds(broker.pid)
        start = time.time()
        for index in range(count):
            publisher.publish(TOPIC, index.to_bytes(4, "big") + padding, qos=qos)
        report = json.loads(child.stdout.readline())
        cpu = _cpu_seconds(broker.pid) - cpu_before
        publisher.disconnect()
        publisher.loop_stop()
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        if child.stdout is not None:
            child.stdout.close()
    return {"got": report["got"], "ordered": report["ordered"],
            "rate": report["got"] / (report["end"] - start), "cpu_us": cpu / count * 1e6}


# -- as a test -------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=broker_params())
def broker(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerHandle]:
    handle = start_broker(request.param, CONFIG,
                          directory=tmp_path_factory.mktemp(request.param))
    yield handle
    handle.stop()


@pytest.mark.parametrize("qos", [0, 1])
def test_burst_arrives_complete_and_in_order(broker: BrokerHandle, qos: int) -> None:
    result = run_burst(broker, qos, 2000)
    assert result["got"] == 2000
    assert result["ordered"]
    print(f"{broker.kind} qos{qos}: {result['rate']:.0f} msg/s, "
          f"{result['cpu_us']:.0f} us broker CPU per message")


# -- as a script -----------------------------------------------------------------------------

def _hold_filters(broker: BrokerHandle, count: int):  # type: ignore[no-untyped-def]
    client = _client("bench-idle-filters")
    acked = threading.Event()
    client.on_subscribe = lambda *_: acked.set()
    client.connect(broker.host, broker.port)
    client.loop_start()
    for index in range(count):
        acked.clear()
        client.subscribe(f"other/{index}/+", 0)
        acked.wait(10)
    return client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--filters", type=int, default=0)
    parser.add_argument("--brokers", default="amqtt,embedded,mosquitto")
    args = parser.parse_args()
    starters = {"amqtt": lambda: start_embedded(CONFIG, unpatched=True),
                "embedded": lambda: start_embedded(CONFIG, unpatched=False),
                "mosquitto": lambda: start_mosquitto(CONFIG)}
    for name in args.brokers.split(","):
        with starters[name]() as broker:
            idle = _hold_filters(broker, args.filters) if args.filters else None
            for qos in (0, 1):
                runs = [run_burst(broker, qos, args.messages) for _ in range(args.repeat)]
                rates = [r["rate"] for r in runs]
                costs = [r["cpu_us"] for r in runs]
                print(f"{name:9} filters={args.filters} qos{qos}: "
                      f"{statistics.median(rates):6.0f} msg/s, "
                      f"{statistics.median(costs):5.0f} us CPU/msg (median of {args.repeat}; "
                      f"msg/s {min(rates):.0f}-{max(rates):.0f})", flush=True)
            if idle is not None:
                idle.disconnect()
                idle.loop_stop()


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--subscriber":
        _subscriber(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
