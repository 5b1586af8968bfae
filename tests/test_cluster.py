"""The fabric on a real clustered broker: three RabbitMQ members on loopback ports.

One cluster for the module (a member takes 10-20 s of CPU to boot); each test has its own
topic root. The master sits on one member, nodes on the others, each process given a broker
list so it can fail over. What a cluster changes, measured here: retained messages are neither
shared across members nor sent on wildcard subscriptions (the master must find nodes by their
live heartbeats), `.` in a topic level is mangled, and a member can die under its clients.

Run alone with `python3 -m pytest -q -m cluster tests/test_cluster.py`.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from core.errors import BrokerUnavailable
from core.mqtt import MqttSession
from core.url import parse_broker_url
from support.brokers import Probe, RabbitCluster, start_rabbitmq_cluster
from support.fabric import Fabric, Proc, wait_until
from support.workloads import SLOW_PRIMES
from test_primes_job import expected_primes, finish, make_inputs, primes_command

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    rabbit = start_rabbitmq_cluster(3, directory=tmp_path_factory.mktemp("rabbitmq"))
    print(f"\nRabbitMQ cluster of 3 up in {rabbit.started_in:.1f}s", file=sys.stderr)
    yield rabbit
    rabbit.stop()


def rotated(cluster: RabbitCluster, first: int) -> str:
    """The live members as one broker list, starting at member `first`."""
    urls = cluster.urls
    order = [urls[(first + i) % len(urls)] for i in range(len(urls))]
    return ",".join(url for url, m in zip(order, [cluster.members[(first + i) % len(urls)]
                                                  for i in range(len(urls))]) if m.alive)


class ClusterFabric(Fabric):
    """A Fabric whose processes each get a broker of their own (a member, or a list)."""

    def master_on(self, broker: str, *extra: str) -> Proc:
        proc = self._start([sys.executable, "-m", "master.cli", "serve", "--broker", broker,
                            "--root", self.root, "--state", str(self.state), *extra], "master")
        proc.wait_for_output("master ready", timeout=30)
        return proc

    def node_on(self, broker: str, node_id: str, *extra: str) -> Proc:
        return self._start([sys.executable, "-m", "node.cli", "--broker", broker, "--root",
                            self.root, "--id", node_id, "--heartbeat", "0.5", *extra],
                           f"node-{node_id}")

    def client_on(self, broker: str):  # type: ignore[no-untyped-def]
        from master.client import FabricClient
        return FabricClient(broker_url=broker, root=self.root).start()


@pytest.fixture
def fabric(cluster: RabbitCluster, tmp_path: Path) -> Iterator[ClusterFabric]:
    fab = ClusterFabric(cluster.urls[0], tmp_path)
    yield fab
    fab.cleanup()


def live_nodes(client, count: int, timeout: float = 30) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    def seen() -> dict[str, dict]:
        nodes = {n["node_id"]: n for n in client.nodes() if n["status"] in ("ready", "busy")}
        return nodes if len(nodes) >= count else {}
    return wait_until(seen, timeout, interval=0.2, message=f"{count} live nodes")


# -- what the cluster does to MQTT, measured -----------------------------------------------------

def test_retained_messages_stay_on_their_member_and_off_wildcards(cluster: RabbitCluster) -> None:
    """Why the fabric must not need retained state: a retained message reaches a late
    subscriber only on its own member and only on an exact topic, never on a wildcard."""
    a, b = cluster.members[0], cluster.members[1]
    root = f"ret{time.monotonic_ns() % 10**9}"
    with Probe("127.0.0.1", a.mqtt_port, f"{root}-pub") as pub:
        pub.publish(f"{root}/nodes/x/status", b"up", qos=1, retain=True)
    with Probe("127.0.0.1", a.mqtt_port, f"{root}-same") as same, \
            Probe("127.0.0.1", b.mqtt_port, f"{root}-other") as other, \
            Probe("127.0.0.1", a.mqtt_port, f"{root}-wild") as wild:
        same.subscribe(f"{root}/nodes/x/status")
        other.subscribe(f"{root}/nodes/x/status")
        wild.subscribe(f"{root}/nodes/+/status")
        assert same.wait_message(f"{root}/nodes/x/status", 5) is not None
        # the others are given the same time to show nothing arrives
        assert other.wait_message(f"{root}/nodes/x/status", 1.0) is None
        assert wild.wait_message(f"{root}/nodes/x/status", 0.2) is None
        # live publishes cross members and match wildcards as usual
        with Probe("127.0.0.1", cluster.members[2].mqtt_port, f"{root}-live") as live:
            live.publish(f"{root}/nodes/x/status", b"again", qos=1)
        assert other.wait_message(f"{root}/nodes/x/status", 5) is not None
        assert wild.wait_message(f"{root}/nodes/x/status", 5) is not None
        same.publish(f"{root}/nodes/x/status", b"", qos=1, retain=True)


def test_a_dot_in_a_topic_level_is_mangled_so_ids_refuse_it(cluster: RabbitCluster,
                                                            fabric: ClusterFabric) -> None:
    member = cluster.members[0]
    root = f"dot{time.monotonic_ns() % 10**9}"
    with Probe("127.0.0.1", member.mqtt_port, f"{root}-sub") as sub, \
            Probe("127.0.0.1", member.mqtt_port, f"{root}-pub") as pub:
        sub.subscribe(f"{root}/nodes/+/status")
        sub.subscribe(f"{root}/#")
        pub.publish(f"{root}/nodes/a.b/status", b"x", qos=1)
        got = sub.wait_for(lambda msgs: list(msgs), 5)
        assert got, "the dotted publish never arrived"
        topics = {m.topic for m in got}
    assert f"{root}/nodes/a.b/status" not in topics, topics  # what a master would never see
    # so a node id with a dot is refused up front, with the reason and a way out
    proc = fabric.node_on(cluster.urls[0], "lab.pi-1")
    assert proc.popen.wait(30) == 2
    output = proc.output()
    assert "invalid node id 'lab.pi-1'" in output and "RabbitMQ" in output \
        and "'lab-pi-1'" in output, output


# -- the fabric on the cluster ---------------------------------------------------------------------

def test_prime_job_exact_with_master_and_nodes_on_different_members(
        cluster: RabbitCluster, fabric: ClusterFabric) -> None:
    files, truth = make_inputs(fabric.tmp / "input", seed=17)
    fabric.master_on(cluster.urls[0])
    fabric.node_on(rotated(cluster, 1), "n1", "--capacity", "2")
    fabric.node_on(rotated(cluster, 2), "n2", "--capacity", "2")
    with fabric.client_on(rotated(cluster, 1)) as client:
        live_nodes(client, 2)
    fabric.broker_url = rotated(cluster, 2)  # the job's client on a member of its own
    output = fabric.tmp / "primes.txt"
    began = time.monotonic()
    rc, summary, stderr = finish(primes_command(fabric, files, output, "--shard-size", "100"))
    took = time.monotonic() - began
    assert rc == 0, stderr
    assert output.read_text().split() == expected_primes(truth["numbers"])
    assert summary["complete"] is True
    assert summary["numbers_tested"] == len(truth["numbers"])
    assert set(summary["nodes"]) == {"n1", "n2"}
    print(f"\nprime job on the cluster: {len(truth['numbers'])} numbers in {took:.2f}s",
          file=sys.stderr)


def test_replicated_masters_on_different_members_survive_the_active_ones_death(
        cluster: RabbitCluster, fabric: ClusterFabric) -> None:
    """Three `serve --replica` masters, each homed on another member; the lease is found
    through its live renewals (a retained lease stays on the member it was published on)."""
    from support.replication import ReplicaWatch
    files, truth = make_inputs(fabric.tmp / "input", seed=19)
    masters = {}
    for i in range(3):
        name = f"m{i}"
        masters[name] = fabric._start(
            [sys.executable, "-m", "master.cli", "serve", "--replica", "--id", name,
             "--broker", rotated(cluster, i), "--root", fabric.root, "--state",
             str(fabric.tmp / name / "state"), "--snapshot-interval", "0"], f"master-{name}")
    for proc in masters.values():
        proc.wait_for_output("ready on", timeout=40)
    watch = ReplicaWatch(cluster.urls[0], fabric.root)
    try:
        holder, epoch = watch.wait_active(20)
        fabric.node_on(rotated(cluster, 1), "n1", *SLOW_PRIMES)
        fabric.node_on(rotated(cluster, 2), "n2", *SLOW_PRIMES)
        fabric.broker_url = rotated(cluster, 2)
        output = fabric.tmp / "primes.txt"
        job = primes_command(fabric, files, output, "--shard-size", "25", "--timeout", "30")
        watch.wait_dispatch(holder, epoch, 10, timeout=60)
        assert job.poll() is None, "the job ended before the master could be killed"
        masters[holder].kill()
        killed = time.monotonic()
        new_holder, new_epoch = watch.wait_active(30, after_epoch=epoch)
        watch.wait_dispatch(new_holder, new_epoch, 1, timeout=30)
        takeover = time.monotonic() - killed
        rc, summary, stderr = finish(job, 120)
    finally:
        watch.close()
    assert rc == 0, stderr
    assert new_holder != holder
    assert output.read_text().split() == expected_primes(truth["numbers"])
    assert summary["numbers_tested"] == len(truth["numbers"])
    print(f"\ntake-over on the cluster (kill -9 to the new master's first dispatch): "
          f"{takeover:.2f}s", file=sys.stderr)


# -- a member killed mid-job (last: the module's cluster runs on with two members) -------------

def test_member_killed_mid_job_nodes_fail_over_without_a_storm(
        cluster: RabbitCluster, fabric: ClusterFabric) -> None:
    files, truth = make_inputs(fabric.tmp / "input", seed=23)
    victim_index = 1
    fabric.master_on(rotated(cluster, 0))
    fabric.node_on(rotated(cluster, victim_index), "n1", *SLOW_PRIMES)
    fabric.node_on(rotated(cluster, 2), "n2", *SLOW_PRIMES)
    seqs: dict[str, list[int]] = {"n1": [], "n2": []}
    lock = threading.Lock()

    def on_status(_topic: str, payload: bytes) -> None:
        if payload:
            status = json.loads(payload)
            with lock:
                seqs[status["node_id"]].append(status["seq"])

    # the watcher sits on the member that stays, subscribed to exact topics
    watcher = MqttSession(broker=parse_broker_url(cluster.urls[0]), client_id=f"{fabric.root}-w")
    for node in seqs:
        watcher.subscribe(f"{fabric.root}/nodes/{node}/status", on_status)
    watcher.start()
    try:
        with fabric.client_on(rotated(cluster, 0)) as client:
            live_nodes(client, 2)
            fabric.broker_url = rotated(cluster, 0)
            output = fabric.tmp / "primes.txt"
            job = primes_command(fabric, files, output, "--shard-size", "25", "--timeout", "30")
            wait_until(lambda: client.nodes() and {n["node_id"]: n for n in client.nodes()}
                       ["n1"]["tasks_done"] >= 5 or job.poll() is not None, 60, interval=0.2,
                       message="n1 at work")
            assert job.poll() is None, "the job ended before the member could be killed"
            with lock:
                before = max(seqs["n1"])
            cluster.kill(victim_index)
            killed = time.monotonic()
            wait_until(lambda: max(seqs["n1"]) > before, 30, interval=0.1,
                       message="n1 back through another member")
            back_in = time.monotonic() - killed
            rc, summary, stderr = finish(job, 120)
            # a few more heartbeats' time: a storm would show as births piling up
            settle_until = time.monotonic() + 5.0
            wait_until(lambda: time.monotonic() >= settle_until, 6, interval=0.2)
            nodes = {n["node_id"]: n for n in client.nodes()}
    finally:
        watcher.stop()
    assert rc == 0, stderr
    assert output.read_text().split() == expected_primes(truth["numbers"])
    assert summary["numbers_tested"] == len(truth["numbers"])
    assert {"n1", "n2"} <= set(nodes) and all(nodes[n]["status"] in ("ready", "busy")
                                              for n in ("n1", "n2"))
    with lock:
        reconnects = max(seqs["n1"]) - before
    print(f"\nmember killed: n1 back in {back_in:.2f}s after {reconnects} reconnect(s)",
          file=sys.stderr)
    assert reconnects <= 3, seqs["n1"]
