"""The embedded broker's subscription index matches topics by MQTT 3.1.1's rules, the same as
amqtt's filter-by-filter comparison it replaces, and a broker with many subscribers delivers
each message to exactly the clients whose filters match."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from broker.index import FilterIndex  # noqa: E402
from core.topic_filter import topic_matches  # noqa: E402
from support.brokers import Probe, broker_params, start_broker  # noqa: E402


@pytest.mark.parametrize("topic_filter, topic, matches", [
    ("a/b", "a/b", True), ("a/b", "a/c", False), ("a/b", "a/b/c", False),
    ("a/+", "a/b", True), ("a/+", "a/", True), ("a/+", "a", False), ("a/+", "a/b/c", False),
    ("+/+", "/", True), ("+", "", True), ("+/b", "x/b", True),
    ("a/#", "a", True), ("a/#", "a/b/c", True), ("a/#", "ab", False), ("#", "a/b", True),
    ("#", "/", True), ("a/+/#", "a/b", True), ("a/+/#", "a", False),
    # MQTT-4.7.2-1: a `$` topic is not matched by a filter starting with a wildcard
    ("#", "$SYS/x", False), ("+/x", "$SYS/x", False), ("$SYS/#", "$SYS/x", True),
    ("$SYS/+", "$SYS/x", True), ("$SYS/#", "$SYS", True), ("a/$x", "a/$x", True),
    ("+/$x", "a/$x", True),
    # malformed filters (amqtt refuses them at SUBSCRIBE) match nothing
    ("a/b#", "a/b#", False), ("a+/b", "a+/b", False), ("a/#/b", "a/x/b", False),
])
def test_matching_follows_mqtt(topic_filter: str, topic: str, matches: bool) -> None:
    assert (topic_filter in FilterIndex([topic_filter]).match(topic)) is matches
    if _well_formed(topic_filter):  # the fabric's one matcher agrees (sessions, broker ACL)
        assert topic_matches(topic_filter, topic) is matches


def _well_formed(topic_filter: str) -> bool:
    levels = topic_filter.split("/")
    return all(("+" not in level or level == "+") and ("#" not in level or level == "#")
               for level in levels) and "#" not in levels[:-1]


def test_index_equals_amqtt_matching_on_random_filters() -> None:
    from amqtt.broker import Broker

    class _Quiet:
        logger = __import__("logging").getLogger("test")

    rng = random.Random(7)
    levels = ["a", "b", "", "$SYS", "+", "#", "c+", "$x"]
    names = ["a", "b", "", "$SYS", "$x", "c"]
    for _ in range(200):
        filters = {"/".join(rng.choice(levels) for _ in range(rng.randint(1, 4)))
                   for _ in range(rng.randint(1, 30))}
        index = FilterIndex(filters)
        for gone in list(filters)[:len(filters) // 3]:  # removal prunes, keeps the rest
            index.discard(gone)
            filters.discard(gone)
        assert sorted(index) == sorted(filters) and len(index) == len(filters)
        for _ in range(30):
            topic = "/".join(rng.choice(names) for _ in range(rng.randint(1, 4)))
            expected = sorted(f for f in filters if Broker._matches(_Quiet, topic, f))
            found = index.match(topic)
            assert sorted(found) == expected, (topic, filters)
            assert sorted(f for f in filters if _well_formed(f) and topic_matches(f, topic)) \
                == sorted(f for f in expected if _well_formed(f))
            assert len(found) == len(set(found))  # each filter once


def test_add_is_idempotent_and_discard_of_unknown_is_harmless() -> None:
    index = FilterIndex()
    index.add("a/+")
    index.add("a/+")
    index.discard("b/#")
    index.discard("x")
    assert index.match("a/b") == ["a/+"] and len(index) == 1
    index.discard("a/+")
    assert index.match("a/b") == [] and len(index) == 0 and "a/+" not in index


@pytest.mark.parametrize("broker_kind", broker_params())
def test_many_subscribers_each_get_only_their_own(broker_kind: str, tmp_path: Path) -> None:
    """60 clients on their own topics and one on a wildcard: each publish reaches its own
    client and the wildcard subscriber, once each, and no other client."""
    count = 60
    with start_broker(broker_kind, directory=tmp_path) as broker:
        watcher = Probe(broker.host, broker.port, "watcher")
        clients: list[Probe] = []
        publisher: Probe | None = None
        try:
            watcher.subscribe("fleet/+/tasks", qos=1)
            for i in range(count):
                clients.append(Probe(broker.host, broker.port, f"n{i}"))
                clients[-1].subscribe(f"fleet/n{i}/tasks", qos=1)
            publisher = Probe(broker.host, broker.port, "publisher")
            for i in range(0, count, 7):
                publisher.publish(f"fleet/n{i}/tasks", f"task {i}", qos=1)
            for i in range(count):  # last on each topic: what came before it has arrived
                publisher.publish(f"fleet/n{i}/tasks", b"end", qos=1)
            for i, client in enumerate(clients):
                assert client.wait_for(lambda m: any(r.payload == b"end" for r in m), 10), i
                expected = ([f"task {i}".encode()] if i % 7 == 0 else []) + [b"end"]
                assert [(r.topic, r.payload) for r in client.messages] == \
                    [(f"fleet/n{i}/tasks", p) for p in expected]
            expected_total = count + len(range(0, count, 7))
            assert watcher.wait_for(lambda m: len(m) >= expected_total, 10)
            assert sorted((r.topic, r.payload) for r in watcher.messages) == sorted(
                [(f"fleet/n{i}/tasks", b"end") for i in range(count)]
                + [(f"fleet/n{i}/tasks", f"task {i}".encode()) for i in range(0, count, 7)])
        finally:
            for probe in [watcher, *clients, *([publisher] if publisher else [])]:
                probe.close()


@pytest.mark.parametrize("broker_kind", broker_params())
def test_an_ended_session_takes_its_filters_and_leaves_the_others(broker_kind: str,
                                                                  tmp_path: Path) -> None:
    """A clean session that ends loses its subscriptions; another client's identical filter
    still receives, and the client id connecting again gets nothing it did not subscribe to."""
    with start_broker(broker_kind, directory=tmp_path) as broker:
        stays = Probe(broker.host, broker.port, "stays")
        leaves = Probe(broker.host, broker.port, "leaves")
        stays.subscribe("x/+", qos=1)
        leaves.subscribe("x/+", qos=1)
        leaves.subscribe("y/#", qos=1)
        leaves.close()
        back = Probe(broker.host, broker.port, "leaves")
        publisher = Probe(broker.host, broker.port, "publisher")
        try:
            back.subscribe("z/end", qos=1)
            publisher.publish("x/1", b"one", qos=1)
            publisher.publish("y/2", b"two", qos=1)
            publisher.publish("z/end", b"end", qos=1)  # after the others: they came first
            assert back.wait_message("z/end", timeout=10) is not None
            assert [(m.topic, m.payload) for m in back.messages] == [("z/end", b"end")]
            assert stays.wait_message("x/1", timeout=10) is not None
            assert [(m.topic, m.payload) for m in stays.messages] == [("x/1", b"one")]
        finally:
            for probe in (stays, back, publisher):
                probe.close()
