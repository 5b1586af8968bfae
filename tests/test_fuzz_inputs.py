"""Bad input on every topic the master and a node read.

Random bytes, valid JSON/msgpack of the wrong shape, the right type tag with wrong field types
or out-of-range values, huge numbers, deep nesting, wrong schema versions, ids in the topic
that differ from the ids in the payload, payloads of several MB and floods of thousands of
messages. What a user relies on: the master and the node stay up, every message they refuse
is counted where a person looks (`rejected` in the master's and the node's retained status),
their memory stays bounded, and valid work submitted during and after the abuse completes
with the right values.

The fuzz sends FABRIC_FUZZ_EXAMPLES messages (default 300) per broker; FABRIC_FUZZ_SEED
replays a run. A long run: FABRIC_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz_inputs.py -k fuzzed

Pretending to be a live node or the master (a well-formed status for another node's id, task
batches for a node) is stopped by the broker's ACL, not by these checks; the fuzz keeps to
what a broken or confused peer sends. Input that exposed a defect has a test of its own below
the fuzz (each names the input) and is kept out of the random mix so the fuzz stays a
regression check for everything else.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import msgpack
import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from core.codec import CODECS
from core.errors import DecodeError, FabricError
from core.protocol import (NODE_STATES, Control, MasterStatus, NodeReport, NodeStatus,
                           OutcomeBatch, Query, QueryReply, ResultBatch, Submission,
                           SubmitReply, TaskBatch, decode_message)
from support.fabric import Fabric, Observer, wait_until
from support.faults import RestartableBroker, rss_bytes

FUZZ_EXAMPLES = int(os.environ.get("FABRIC_FUZZ_EXAMPLES", "300"))
FUZZ_SEED = int(os.environ.get("FABRIC_FUZZ_SEED", str(random.randrange(2**32))))
NODE = "tough"
GHOSTS = ("ghost-1", "ghost-2")
CLIENTS = ("fuzz-c1", "fuzz-c2")
MASTER_TOPICS = ("status", "results", "submit", "query")
# RSS growth allowed per process over a whole test; a leak of even a few hundred bytes per
# message would show in the long run, several MB payloads leave at most a few copies behind
RSS_GROWTH_LIMIT = 64 * 2**20


# -- the publisher ---------------------------------------------------------------------------

class Fuzzer:
    """A plain paho client that publishes whatever it is given, QoS 1, waiting for each ack."""

    def __init__(self, broker_url: str) -> None:
        from core.url import parse_broker_url
        url = parse_broker_url(broker_url)
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"fuzzer-{os.getpid()}")
        self.client.max_inflight_messages_set(200)
        self.connected = threading.Event()
        self.dropped = threading.Event()
        self.client.on_connect = lambda *_a: self.connected.set()
        self.client.on_disconnect = lambda *_a: (self.connected.clear(), self.dropped.set())
        self.client.connect(url.host, url.port)
        self.client.loop_start()
        assert self.connected.wait(10), "fuzzer could not connect"

    def publish(self, topic: str, payload: bytes, *, timeout: float = 10.0) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout)
        assert info.is_published(), f"{topic}: not acknowledged within {timeout}s"

    def publish_or_refused(self, topic: str, payload: bytes, *, timeout: float = 20.0) -> bool:
        """True once acknowledged; False as soon as the broker hangs up on us instead."""
        self.dropped.clear()
        info = self.client.publish(topic, payload, qos=1)
        deadline = time.monotonic() + timeout
        while not info.is_published() and not self.dropped.is_set():
            assert time.monotonic() < deadline, f"{topic}: neither acknowledged nor refused"
            self.dropped.wait(0.05)
        return info.is_published()

    def publish_many(self, messages: list[tuple[str, bytes]], *, timeout: float = 60.0) -> None:
        """A flood: everything queued at once, then every acknowledgement awaited."""
        infos = [self.client.publish(topic, payload, qos=1) for topic, payload in messages]
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        assert all(i.is_published() for i in infos), "flood not acknowledged in time"

    def close(self) -> None:
        self.client.loop_stop()  # first: no reconnect that would resend a refused message
        self.client.disconnect()


# -- what a message must come to -----------------------------------------------------------

def master_rejects(kind: str, topic_id: str, payload: bytes) -> int:
    """How many refusals the master must count for this payload on `<root>/<kind>/<id>`: one
    for a message it cannot take, one per result in a well-formed result batch (no dispatch
    ever went to the fuzzer's ghost nodes, so none of their results answers one)."""
    if kind == "status" and not payload:
        return False  # a cleared retained status, not a message
    try:
        message = decode_message(payload)
    except DecodeError:
        return True
    if kind == "status":
        return not (isinstance(message, NodeStatus) and message.node_id == topic_id)
    if kind == "results":
        if isinstance(message, NodeReport):
            return False
        if isinstance(message, ResultBatch) and message.node_id == topic_id:
            return len(message.results)
        return True
    if kind == "submit":
        return not (isinstance(message, Submission) and message.client_id == topic_id)
    return not (isinstance(message, Query) and message.client_id == topic_id)


def node_rejects(payload: bytes) -> bool:
    """Whether the node must refuse (and count) this payload on its task topic (epoch 0)."""
    try:
        message = decode_message(payload)
    except DecodeError:
        return True
    if isinstance(message, TaskBatch):
        return message.epoch < 0
    if isinstance(message, Control):
        count = message.params.get("count")
        return not (message.command == "snapshot" or (message.command == "release"
                                                     and type(count) is int and count >= 1))
    return True


# -- strategies --------------------------------------------------------------------------------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
HUGE = st.sampled_from([2**64, -2**63 - 1, 10**30, -10**30, 10**300, 10**4000])
SMALL_LIST = st.lists(SCALARS, max_size=2)
SMALL_DICT = st.dictionaries(st.text(max_size=4), SCALARS, max_size=2)
WRONG = {  # values that stay of the wrong type through either codec
    "str": st.one_of(st.integers(), st.floats(), st.booleans(), st.none(), SMALL_LIST, SMALL_DICT),
    "int": st.one_of(st.text(max_size=6), st.floats(), st.booleans(), st.none(), SMALL_LIST,
                     SMALL_DICT),
    "num": st.one_of(st.text(max_size=6), st.booleans(), st.none(), SMALL_LIST, SMALL_DICT),
    "bool": st.one_of(st.integers(), st.floats(), st.text(max_size=6), st.none(), SMALL_LIST),
    "list": st.one_of(st.text(max_size=6), st.integers(), st.floats(), st.booleans(), st.none(),
                      SMALL_DICT),
    "dict": st.one_of(st.text(max_size=6), st.integers(), st.floats(), st.booleans(), st.none(),
                      SMALL_LIST),
}
WRONG_VERSIONS = st.sampled_from([0, 2, -1, "1", 1.0, True, None, 2**64 - 1, 10**40, [1]])
IDS = st.text(alphabet="abcdef0123456789-", min_size=1, max_size=12)


@dataclass(frozen=True)
class Field:
    kind: str                 # str int num bool list dict any records
    valid: Any                # strategy of valid values (for records: the inner schema)
    out_of_range: Any = None  # strategy of right-typed values the decoder must refuse
    required: bool = False


TASK = {
    "id": Field("str", IDS, st.sampled_from(["", "i" * 129]), True),
    "name": Field("str", st.sampled_from(["echo", "noop", "fail", "no-such-task"]), None, True),
    "args": Field("list", st.lists(st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000),
                                             st.text(max_size=8)), max_size=2)),
    "priority": Field("int", st.integers(1, 10),
                      st.one_of(st.integers(max_value=0), st.integers(min_value=11), HUGE)),
}
RESULT = {
    "id": Field("str", IDS, None, True),
    "ok": Field("bool", st.just(True), None, True),
    "value": Field("any", VALUES),
    "ts": Field("num", st.floats(0, 2e9)),
}
COUNT = st.integers(0, 100)
NEGATIVE = st.integers(max_value=-1)
SCHEMAS: dict[str, dict[str, Field]] = {
    "tasks": {
        "tasks": Field("records", TASK, None, True),
        "epoch": Field("int", st.just(0), NEGATIVE),  # higher epochs: see the epoch test
        "master": Field("str", st.text(max_size=8)),
    },
    "control": {
        "command": Field("str", st.sampled_from(["snapshot", "reboot"]) | st.text(max_size=6),
                         None, True),
        "request_id": Field("str", IDS),
        "params": Field("dict", st.just({})),
        "epoch": Field("int", st.just(0), NEGATIVE),
    },
    "results": {
        "node_id": Field("str", st.sampled_from((NODE, *GHOSTS)), None, True),
        "results": Field("records", RESULT),
        "released": Field("list", st.lists(IDS, max_size=2)),
        "instance": Field("str", st.text(max_size=8)),
    },
    "report": {
        "node_id": Field("str", st.sampled_from((NODE, *GHOSTS)), None, True),
        "request_id": Field("str", IDS, None, True),
        "state": Field("dict", st.just({})),
    },
    "status": {  # heartbeats and counters stay small: see the heartbeat and counter tests
        "node_id": Field("str", st.sampled_from(GHOSTS), None, True),
        "status": Field("str", st.sampled_from(NODE_STATES),
                        st.text(max_size=6).filter(lambda s: s not in NODE_STATES), True),
        "codec": Field("str", st.sampled_from(CODECS),
                       st.text(max_size=6).filter(lambda s: s not in CODECS)),
        "capacity": Field("int", st.integers(0, 4),
                          st.one_of(NEGATIVE, st.integers(min_value=1_000_001))),
        "prefetch": Field("int", st.integers(0, 4),
                          st.one_of(NEGATIVE, st.integers(min_value=1_000_001))),
        "workload": Field("int", COUNT, NEGATIVE),
        "tasks_done": Field("int", COUNT, NEGATIVE),
        "rejected": Field("int", COUNT, NEGATIVE),
        "instance": Field("str", st.text(max_size=8)),
        "heartbeat": Field("num", st.floats(0.1, 1.0)),
        "ts": Field("num", st.floats(0, 2e9)),
    },
    "submit": {
        "client_id": Field("str", st.sampled_from(CLIENTS), None, True),
        "request_id": Field("str", IDS, None, True),
        "tasks": Field("records", TASK, None, True),
    },
    "query": {
        "client_id": Field("str", st.sampled_from(CLIENTS), None, True),
        "request_id": Field("str", IDS, None, True),
        "what": Field("str", st.sampled_from(["status", "outcomes", "nope"]), None, True),
        "params": Field("dict", st.just({}) | st.fixed_dictionaries(
            {"ids": st.lists(IDS, max_size=3) | SCALARS})),
    },
}
OTHER_TYPES = [SubmitReply(request_id="r").wire(), OutcomeBatch(outcomes=()).wire(),
               QueryReply(request_id="r", ok=True).wire(),
               MasterStatus(master_id="m", status="running").wire()]
TOPIC_TYPES = {"status": "status", "results": "results", "submit": "submit", "query": "query",
               "tasks": "tasks"}


@st.composite
def records(draw: Any, schema: dict[str, Field], *, broken: bool) -> tuple[dict, bool]:
    """A map following `schema`; with `broken`, one field made wrong. (map, must be refused)"""
    out: dict[str, Any] = {}
    for name, spec in schema.items():
        if spec.kind == "records":
            out[name] = [draw(records(spec.valid, broken=False))[0]
                         for _ in range(draw(st.integers(0, 2)))]
        elif spec.required or draw(st.booleans()):
            out[name] = draw(spec.valid)
    if not broken:
        return out, False
    name = draw(st.sampled_from(sorted(schema)))
    spec = schema[name]
    if spec.kind == "any":
        return out, False  # every value is a valid value
    ways = ["type"] + (["range"] if spec.out_of_range is not None else []) \
        + (["missing"] if spec.required else []) + (["inner"] if spec.kind == "records" else [])
    way = draw(st.sampled_from(ways))
    if way == "type":
        out[name] = draw(WRONG["list" if spec.kind == "records" else spec.kind])
    elif way == "range":
        out[name] = draw(spec.out_of_range)
    elif way == "missing":
        out.pop(name, None)
    else:
        inner, inner_broken = draw(records(spec.valid, broken=True))
        out[name] = list(out.get(name) or []) + [inner]
        return out, inner_broken
    return out, True


def encode(obj: Any, codec: str) -> bytes:
    """msgpack or JSON (JSON with NaN/Infinity tokens); JSON when msgpack cannot carry it."""
    if codec == "msgpack":
        try:
            return msgpack.packb(obj, use_bin_type=True)
        except (OverflowError, ValueError, TypeError):
            pass
    return json.dumps(obj, allow_nan=True).encode()


def deep_payload(depth: int, codec: str, node_id: str) -> bytes:
    """A result batch whose one value is nested `depth` lists deep."""
    if codec == "json":
        return (b'{"type":"results","v":1,"node_id":"' + node_id.encode()
                + b'","results":[{"id":"deep","ok":true,"value":' + b"[" * depth
                + b"]" * depth + b"}]}")
    head = msgpack.packb({"type": "results", "v": 1, "node_id": node_id})
    result = b"\x83\xa2id\xa4deep\xa2ok\xc3\xa5value" + b"\x91" * depth + b"\x90"
    return bytes([head[0] + 1]) + head[1:] + b"\xa7results\x91" + result


@dataclass(frozen=True)
class Sample:
    kind: str            # status results submit query tasks
    topic_id: str
    payload: bytes
    must_reject: bool    # known from how it was made, independently of the decoder
    label: str


@st.composite
def samples(draw: Any) -> Sample:
    kind = draw(st.sampled_from(MASTER_TOPICS + ("tasks", "tasks")))
    if kind in ("status", "results"):
        topic_id = draw(st.sampled_from((NODE, *GHOSTS, "n-x")))
    elif kind in ("submit", "query"):
        topic_id = draw(st.sampled_from((*CLIENTS, "c-x")))
    else:
        topic_id = NODE
    codec = draw(st.sampled_from(["msgpack", "json"]))
    category = draw(st.sampled_from(["bytes", "shape", "version", "tag", "deep", "typed",
                                     "typed", "typed", "typed", "typed"]))
    must = False
    if category == "bytes":
        payload = draw(st.binary(max_size=300))
        must = not payload or payload[:1] not in b"{ \t\r\n" and not (
            0x80 <= payload[0] <= 0x8F or payload[0] in (0xDE, 0xDF))
        must = must and not (kind == "status" and not payload)
    elif category == "shape":
        obj = draw(st.one_of(VALUES.filter(lambda v: not isinstance(v, dict)),
                             st.dictionaries(st.text(max_size=6), VALUES, max_size=4)
                             .filter(lambda d: "type" not in d)))
        payload, must = encode(obj, codec), True
    elif category in ("version", "tag"):
        obj = dict(draw(records(SCHEMAS[draw(st.sampled_from(sorted(SCHEMAS)))],
                                broken=False))[0])
        if category == "version":
            obj["type"] = draw(st.sampled_from(sorted(SCHEMAS)))
            if draw(st.booleans()):
                obj["v"] = draw(WRONG_VERSIONS)
        else:
            obj["type"] = draw(st.text(max_size=8).filter(lambda t: t not in SCHEMAS)
                               | st.integers() | st.none())
            obj["v"] = 1
        payload, must = encode(obj, codec), True
    elif category == "deep":
        depth = draw(st.sampled_from([10, 500, 5000, 100_000]))  # far from 1000: stack depth
        payload = deep_payload(depth, codec, draw(st.sampled_from(GHOSTS)))
        must = depth >= 5000
    else:
        if draw(st.integers(0, 9)) < 8:
            type_name = TOPIC_TYPES[kind] if kind != "tasks" else draw(
                st.sampled_from(["tasks", "tasks", "control"]))
        else:
            type_name = draw(st.sampled_from(sorted(SCHEMAS) + ["other"]))
        if type_name == "other":
            obj, must = dict(draw(st.sampled_from(OTHER_TYPES))), True
        else:
            broken = draw(st.booleans())
            obj, must = draw(records(SCHEMAS[type_name], broken=broken))
            obj = {"type": type_name, "v": 1, **obj}
            # an id in the topic that the payload does not carry, often
            id_key = {"status": "node_id", "results": "node_id", "report": "node_id",
                      "submit": "client_id", "query": "client_id"}.get(type_name)
            if id_key and isinstance(obj.get(id_key), str) and draw(st.integers(0, 9)) < 6:
                obj[id_key] = topic_id
            if type_name == "status" and obj.get("node_id") == NODE:
                obj["node_id"] = GHOSTS[0]  # impersonating a live node is the ACL's business
            if draw(st.booleans()):  # unknown keys are ignored, however odd their values
                obj[draw(st.text(min_size=1, max_size=6).filter(lambda k: k not in obj))] = \
                    draw(HUGE | VALUES)
        payload = encode(obj, codec)
    return Sample(kind, topic_id, payload, must, category)


# -- the fabric under test -------------------------------------------------------------------

@dataclass
class Target:
    fabric: Fabric
    observer: Observer
    client: Any
    master_pid: int
    node_pid: int

    def alive(self) -> None:
        for proc in self.fabric.procs:
            assert proc.popen.poll() is None, f"{proc.args[2]} died:\n{proc.output()[-3000:]}"

    def master_rejected(self) -> int:
        payload = self.observer.retained.get(f"{self.fabric.root}/master/status")
        return json.loads(payload)["rejected"] if payload else -1

    def node_rejected(self) -> int:
        return (self.observer.node_status(NODE) or {}).get("rejected", -1)

    def topic(self, kind: str, topic_id: str) -> str:
        root = self.fabric.root
        return {"status": f"{root}/nodes/{topic_id}/status", "results": f"{root}/results/{topic_id}",
                "submit": f"{root}/submit/{topic_id}", "query": f"{root}/query/{topic_id}",
                "tasks": f"{root}/nodes/{topic_id}/tasks"}[kind]


@pytest.fixture
def target(fabric: Fabric, observer: Observer) -> Iterator[Target]:
    """A master and one node, warmed up (so memory readings compare like with like)."""
    master = fabric.master("--node-timeout", "1", "--max-attempts", "20")
    node = fabric.node(NODE, "--capacity", "2")
    with fabric.client() as client:
        wait_until(lambda: any(n["node_id"] == NODE and n["status"] == "ready"
                               for n in client.nodes()), 20, message="node ready")
        handles = client.submit_many([("echo", [i], {}, 5) for i in range(200)])
        assert [h.result(timeout=30) for h in handles] == list(range(200))
        wait_until(lambda: observer.node_status(NODE) and
                   f"{fabric.root}/master/status" in observer.retained, 10,
                   message="retained statuses")
        yield Target(fabric, observer, client, master.pid, node.pid)


def submit_and_check(client: Any, label: str, count: int) -> list:
    """Valid work: `count` echo tasks whose values name them."""
    return [(h, f"{label}-{i}") for i, h in enumerate(
        client.submit_many([("echo", [f"{label}-{i}"], {}, 1 + i % 10) for i in range(count)]))]


def wait_count(read: Any, expected: int, what: str, timeout: float = 20.0, *,
               slack: int = 0) -> None:
    """Wait (bounded) until a published counter reaches `expected`; it must not pass it by
    more than `slack`."""
    try:
        wait_until(lambda: read() >= expected, timeout, message=f"{what} to reach {expected}")
    except AssertionError as e:
        raise AssertionError(f"{e}: it stayed at {read()}") from None
    assert expected <= read() <= expected + slack, \
        f"{what}: {read()} counted, {expected}{f' to {expected + slack}' if slack else ''} expected"


def answered_by_node(payload: bytes) -> int:
    """At most how many results the real node sends for a fuzzed task batch it accepts: one
    per task. The master never dispatched those, so it must reject each result that comes
    (fewer come when the batch repeats ids the node still holds)."""
    try:
        message = decode_message(payload)
    except DecodeError:
        return 0
    return len(message.tasks) if isinstance(message, TaskBatch) and message.epoch >= 0 else 0


def assert_completed(pending: list, timeout: float = 60.0) -> None:
    for handle, expected in pending:
        assert handle.result(timeout=timeout) == expected


# -- tests -------------------------------------------------------------------------------------

def test_fuzzed_payloads_are_refused_and_counted_and_work_goes_on(target: Target,
                                                                  tmp_path: Path) -> None:
    before = {"master": rss_bytes(target.master_pid), "node": rss_bytes(target.node_pid)}
    rejected_before = (target.master_rejected(), target.node_rejected())
    fuzzer = Fuzzer(target.fabric.broker_url)
    sent: list[Sample] = []
    violations: list[Sample] = []
    pending: list = []
    trace = open(tmp_path / "fuzz.trace", "w")

    @seed(FUZZ_SEED)
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(sample=samples())
    def publish_one(sample: Sample) -> None:
        topic = target.topic(sample.kind, sample.topic_id)
        trace.write(f"{topic} {sample.label} {sample.payload[:200].hex()}\n")
        fuzzer.publish(topic, sample.payload)
        sent.append(sample)
        rejects = (node_rejects(sample.payload) if sample.kind == "tasks"
                   else master_rejects(sample.kind, sample.topic_id, sample.payload))
        if sample.must_reject and not rejects:
            violations.append(sample)
        if len(sent) % 100 == 50:
            pending.extend(submit_and_check(target.client, f"during{len(sent)}", 20))

    try:
        publish_one()
    finally:
        trace.close()
        fuzzer.close()
    context = f"(seed {FUZZ_SEED}, {len(sent)} messages; trace in {tmp_path / 'fuzz.trace'})"
    assert len(sent) >= FUZZ_EXAMPLES * 0.9, context
    assert not violations, f"decoder accepted broken messages {context}: " \
                           f"{[(v.label, v.payload[:80]) for v in violations[:5]]}"
    target.alive()
    expect_master = rejected_before[0] + sum(
        master_rejects(s.kind, s.topic_id, s.payload) for s in sent if s.kind != "tasks")
    expect_node = rejected_before[1] + sum(node_rejects(s.payload) for s in sent
                                           if s.kind == "tasks")
    node_answers = sum(answered_by_node(s.payload) for s in sent if s.kind == "tasks")
    # the ghosts the fuzz announced time out; then valid work must flow to the real node
    wait_until(lambda: target.client.status()["nodes_total"] == 1, 15, message="ghosts gone")
    pending.extend(submit_and_check(target.client, "after", 100))
    assert_completed(pending)
    wait_count(target.master_rejected, expect_master, f"master rejected {context}",
               slack=node_answers)
    wait_count(target.node_rejected, expect_node, f"node rejected {context}")
    target.alive()
    after = {"master": rss_bytes(target.master_pid), "node": rss_bytes(target.node_pid)}
    print(f"fuzz {context}: master rejected {expect_master - rejected_before[0]}, node rejected "
          f"{expect_node - rejected_before[1]}, RSS before {before} after {after}")
    for name in before:
        assert after[name] - before[name] < RSS_GROWTH_LIMIT, (name, before, after)


def test_oversized_payloads_and_a_flood_leave_master_and_node_working(target: Target) -> None:
    before = {"master": rss_bytes(target.master_pid), "node": rss_bytes(target.node_pid)}
    m0, n0 = target.master_rejected(), target.node_rejected()
    rng = random.Random(7)
    # several MB: garbage, and a well-formed result batch carrying a 4 MB value
    big_garbage = b"\x93" + os.urandom(4 * 2**20)
    big_result = msgpack.packb({"type": "results", "v": 1, "node_id": GHOSTS[0], "results": [
        {"id": "big", "ok": True, "value": "x" * (4 * 2**20), "ts": 0.0}]})
    oversized = [(kind, topic_id, big_garbage) for kind, topic_id in
                 [("results", GHOSTS[0]), ("submit", CLIENTS[0]), ("query", CLIENTS[0]),
                  ("status", GHOSTS[1]), ("tasks", NODE)]]
    oversized.append(("results", GHOSTS[0], big_result))
    delivered = 0
    for kind, topic_id, payload in oversized:
        fuzzer = Fuzzer(target.fabric.broker_url)
        try:
            # a broker with a packet limit hangs up instead: the publisher's problem, not ours
            delivered += fuzzer.publish_or_refused(target.topic(kind, topic_id), payload)
        finally:
            fuzzer.close()
    target.alive()
    pending = submit_and_check(target.client, "mid", 50)
    # a flood: thousands of refused messages as fast as the broker takes them
    flood = []
    for i in range(3000):
        kind = rng.choice(MASTER_TOPICS + ("tasks",))
        topic_id = NODE if kind == "tasks" else rng.choice(GHOSTS if kind in ("status", "results")
                                                           else CLIENTS)
        flood.append((kind, topic_id, rng.choice([os.urandom(rng.randint(1, 64)),
                                                  b'{"type":"results","v":9}', b"\x91\xc0",
                                                  b"[]", b'{"type":"status","v":1}'])))
    fuzzer = Fuzzer(target.fabric.broker_url)
    try:
        fuzzer.publish_many([(target.topic(k, i), p) for k, i, p in flood])
    finally:
        fuzzer.close()
    target.alive()
    pending.extend(submit_and_check(target.client, "after", 100))
    assert_completed(pending)
    flood_master = sum(master_rejects(k, i, p) for k, i, p in flood if k != "tasks")
    flood_node = sum(node_rejects(p) for k, _i, p in flood if k == "tasks")
    big_master = sum(master_rejects(k, i, p) for k, i, p in oversized if k != "tasks")
    big_node = sum(node_rejects(p) for k, _i, p in oversized if k == "tasks")
    if delivered:  # no packet limit: the master and node refused the garbage themselves
        assert delivered == len(oversized)
        expect_master, expect_node = m0 + flood_master + big_master, n0 + flood_node + big_node
    else:
        expect_master, expect_node = m0 + flood_master, n0 + flood_node
    after = {"master": rss_bytes(target.master_pid), "node": rss_bytes(target.node_pid)}
    print(f"oversized delivered {delivered}/{len(oversized)}, flood {len(flood)}; "
          f"RSS {before} -> {after}")
    for name in before:
        assert after[name] - before[name] < RSS_GROWTH_LIMIT, (name, before, after)
    # every refused message counted: none lost between the broker's ack and the count
    wait_count(target.master_rejected, expect_master, "master rejected")
    wait_count(target.node_rejected, expect_node, "node rejected")


# -- inputs that exposed defects: one test each, on the embedded broker --------------------

@pytest.fixture
def solo(tmp_path: Path) -> Iterator[tuple[Fabric, Observer]]:
    """A fabric on a broker of its own run from broker.conf (with its 1 MiB packet limit)."""
    broker = RestartableBroker("embedded", tmp_path / "broker")
    broker.start()
    fabric = Fabric(broker.url, tmp_path)
    observer = Observer(broker.url, fabric.root)
    try:
        yield fabric, observer
    finally:
        observer.close()
        fabric.cleanup()
        broker.close()


def ready_client(fabric: Fabric, *node_ids: str) -> Any:
    client = fabric.client()
    wait_until(lambda: {n["node_id"] for n in client.nodes() if n["status"] == "ready"}
               >= set(node_ids), 20, message=f"nodes {node_ids} ready")
    return client


def test_a_task_batch_from_a_later_epoch_does_not_blind_the_node(solo: tuple) -> None:
    """A stale or stray batch stamped with a higher epoch than the master's (here 7, the
    master's is 0) must not make the node refuse every later batch of the real master."""
    fabric, observer = solo
    fabric.master()
    fabric.node(NODE)
    with ready_client(fabric, NODE) as client:
        assert client.submit("echo", ["before"]).result(timeout=10) == "before"
        observer.publish(f"{fabric.root}/nodes/{NODE}/tasks",
                         TaskBatch(tasks=(), epoch=7, master="elsewhere").encode())
        assert client.submit("echo", ["after"]).result(timeout=10) == "after"


def test_a_result_msgpack_cannot_carry_does_not_stall_the_master(solo: tuple) -> None:
    """A JSON-speaking node (as an ESP32 is) returns an integer above 2**64: the master must
    still tell the submitter something and keep dispatching."""
    from node.builtin_tasks import with_builtins
    from node.registry import default_registry
    from node.transport import ComputeNodeTransport
    fabric, _observer = solo
    fabric.master()
    registry = with_builtins(default_registry)
    registry.add("huge", lambda: 2**70)
    node = ComputeNodeTransport(broker_url=fabric.broker_url, node_id="json-node",
                                root=fabric.root, codec_name="json", registry=registry,
                                heartbeat=0.5)
    node.start()
    try:
        with ready_client(fabric, "json-node") as client:
            outcome = client.submit("huge").outcome(timeout=10)
            assert outcome.state == "failed" or outcome.value == 2**70
            assert client.submit("echo", ["next"]).result(timeout=10) == "next"
    finally:
        node.stop(graceful=False)


def test_a_json_submission_with_a_huge_integer_ends_instead_of_hanging(solo: tuple) -> None:
    """A submission in JSON (MQTT Explorer, a MicroPython client) may carry integers msgpack
    cannot: that task may fail, but it must end (not sit in flight forever), and the master
    must keep dispatching everything else."""
    fabric, observer = solo
    fabric.master()
    fabric.node(NODE)
    with ready_client(fabric, NODE) as client:
        observer.publish(f"{fabric.root}/submit/json-client", json.dumps({
            "type": "submit", "v": 1, "client_id": "json-client", "request_id": "r1",
            "tasks": [{"id": "huge-arg", "name": "echo", "args": [10**30]}]}).encode())
        assert client.submit("echo", ["next"]).result(timeout=10) == "next"
        wait_until(lambda: client.query("outcomes", {"ids": ["huge-arg"]})[0]["state"]
                   in ("completed", "failed"), 10, message="the huge task ends")


def test_a_status_with_huge_counters_does_not_break_queries(solo: tuple) -> None:
    """A node status (JSON) whose counters exceed 2**64 must not make the master unable to
    answer `nodes` queries, nor drop the other messages it was handling."""
    fabric, observer = solo
    fabric.master()
    fabric.node(NODE)
    with ready_client(fabric, NODE) as client:
        observer.publish(f"{fabric.root}/nodes/{GHOSTS[0]}/status", json.dumps({
            "type": "status", "v": 1, "node_id": GHOSTS[0], "status": "offline",
            "tasks_done": 10**30}).encode())
        assert client.submit("echo", ["next"]).result(timeout=10) == "next"
        assert NODE in {n["node_id"] for n in client.nodes(timeout=8)}


def test_a_status_with_an_endless_heartbeat_cannot_hold_tasks_forever(solo: tuple) -> None:
    """A node that announces a heartbeat of 1e300 seconds (it would never be found dead) is
    refused and counted, so no task is ever given to it; the work runs on the real node."""
    fabric, observer = solo
    fabric.master("--node-timeout", "1")
    fabric.node(NODE)
    with ready_client(fabric, NODE) as client:
        rejected = client.status()["rejected"]
        observer.publish(f"{fabric.root}/nodes/{GHOSTS[0]}/status",
                         b'{"type":"status","v":1,"node_id":"ghost-1","status":"ready",'
                         b'"capacity":5,"prefetch":5,"heartbeat":1e300}')
        wait_until(lambda: client.status()["rejected"] == rejected + 1, 5,
                   message="endless heartbeat refused")
        assert client.status()["nodes_total"] == 1
        handles = client.submit_many([("echo", [i], {}, 5) for i in range(20)])
        assert [h.result(timeout=15) for h in handles] == list(range(20))


def test_a_result_over_the_broker_packet_limit_fails_that_task_not_the_node(solo: tuple) -> None:
    """broker.conf refuses packets over 1 MiB. A task whose result is larger must fail with
    a reason; the node must stay connected and keep working (a client that resends a packet
    the broker refuses is disconnected again on every reconnect)."""
    fabric, _observer = solo
    fabric.master("--node-timeout", "2")
    fabric.node(NODE, "--task", "support.faults:oversized_value")
    with ready_client(fabric, NODE) as client:
        outcome = client.submit("oversized_value", [2 * 2**20]).outcome(timeout=15)
        assert outcome.state == "failed"
        assert client.submit("echo", ["next"]).result(timeout=10) == "next"
        assert {n["node_id"]: n["status"] for n in client.nodes()}[NODE] in ("ready", "busy")


def test_a_bug_in_one_messages_handling_costs_that_message_not_the_turn(solo: tuple) -> None:
    """Whatever one message's handling raises (here a query whose answer hits a bug), the
    asker is told at once, and the submissions and results handled in the same turn go on."""
    from master.client import FabricClient
    from master.transport import MasterNodeTransport
    fabric, _observer = solo
    master = MasterNodeTransport(broker_url=fabric.broker_url, root=fabric.root,
                                 state_dir=fabric.tmp / "inproc-state")
    master.start()
    fabric.node(NODE)

    def broken(params: dict) -> dict:
        raise ZeroDivisionError("a bug")
    master._task_info = broken  # type: ignore[method-assign]
    try:
        with FabricClient(broker_url=fabric.broker_url, root=fabric.root).start() as client:
            wait_until(lambda: NODE in {n["node_id"] for n in client.nodes()}, 20,
                       message="the node ready")
            handles = client.submit_many([("echo", [i], {}, 5) for i in range(50)])
            started = time.monotonic()
            with pytest.raises(FabricError, match="failed to answer 'task'.*a bug"):
                client.task(handles[0].id, timeout=8)
            assert time.monotonic() - started < 5  # told, not left to time out
            assert [h.result(timeout=20) for h in handles] == list(range(50))
    finally:
        master.stop()
