"""Shards: balanced pieces, spread over the least-loaded nodes, put back together in order,
even when a node dies holding some of them."""

from __future__ import annotations

import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import ConfigError, FabricTimeout, TaskFailed
from master.shards import assign_shards, map_shards, shard_data
from support.fabric import Fabric, wait_until

SQUARE = ("--task", "support.workloads:square_all")


# -- pure -------------------------------------------------------------------------------------------

@given(st.lists(st.integers(), max_size=200), st.integers(1, 50))
def test_shard_data_is_balanced_and_keeps_order(data: list[int], num_shards: int) -> None:
    shards = shard_data(data, num_shards)
    assert [x for shard in shards for x in shard] == data
    assert len(shards) == min(num_shards, len(data))
    assert all(shards)
    sizes = [len(s) for s in shards]
    assert not sizes or max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the longer pieces come first


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "3"])
def test_shard_data_refuses_a_bad_count(bad: object) -> None:
    with pytest.raises(ConfigError):
        shard_data([1, 2, 3], bad)  # type: ignore[arg-type]


class _Recorder:
    """Records what would be submitted (pure: no fabric)."""

    def __init__(self) -> None:
        self.calls: list = []

    def submit_many(self, calls):
        self.calls = list(calls)
        return list(range(len(self.calls)))


def test_assign_shards_submits_one_task_per_shard_in_order() -> None:
    fabric = _Recorder()
    handles = assign_shards(fabric, {"task": "square_all", "data": list(range(10)),
                                     "num_shards": 3, "kwargs": {"delay": 0}, "priority": 7})
    assert handles == [0, 1, 2]
    assert fabric.calls == [("square_all", [[0, 1, 2, 3]], {"delay": 0}, 7),
                            ("square_all", [[4, 5, 6]], {"delay": 0}, 7),
                            ("square_all", [[7, 8, 9]], {"delay": 0}, 7)]


@pytest.mark.parametrize("job", [{}, {"task": "x"}, {"task": "", "data": [1]},
                                 {"task": "x", "data": "abc"}, {"task": "x", "data": [1],
                                                                "priority": 11},
                                 {"task": "x", "data": [1], "num_shards": 0}])
def test_assign_shards_refuses_bad_job_data(job: dict) -> None:
    with pytest.raises(ConfigError):
        assign_shards(_Recorder(), job)


# -- on the fabric ------------------------------------------------------------------------------------

def wait_ready(client, count: int) -> None:
    wait_until(lambda: sum(n["status"] == "ready" for n in client.nodes()) >= count, 30,
               message=f"{count} ready nodes")


def test_map_of_1000_items_in_10_shards_is_in_order_while_a_node_is_killed(fabric: Fabric) -> None:
    fabric.master()
    victim = fabric.node("victim", *SQUARE)
    fabric.node("survivor", *SQUARE)
    data = list(range(1000))
    with fabric.client() as client, ThreadPoolExecutor(1) as pool:
        wait_ready(client, 2)
        running = pool.submit(map_shards, client, "square_all", data, 10, timeout=90,
                              kwargs={"delay": 0.4})
        wait_until(lambda: any(n["node_id"] == "victim" and n["in_flight"] > 0
                               for n in client.nodes()), 30, message="victim holding shards")
        victim.kill()
        result = running.result(timeout=120)
    assert result == [x * x for x in data]
    db = sqlite3.connect(fabric.state / "master.sqlite3")
    try:
        rows = db.execute("SELECT node, attempts, errors FROM tasks").fetchall()
    finally:
        db.close()
    assert len(rows) == 10
    moved = [r for r in rows if "node_lost" in r[2]]
    assert moved and all(node == "survivor" for node, _a, _e in moved)  # re-run elsewhere


def test_assign_shards_uses_every_idle_node(fabric: Fabric) -> None:
    fabric.master()
    fabric.node("a", *SQUARE, "--prefetch", "0")
    fabric.node("b", *SQUARE, "--prefetch", "0")
    with fabric.client() as client:
        wait_ready(client, 2)
        handles = assign_shards(client, {"task": "square_all", "data": list(range(40)),
                                         "num_shards": 4, "kwargs": {"delay": 0.3}})
        outcomes = [h.outcome(timeout=30) for h in handles]
    assert [o.value for o in outcomes] == [[x * x for x in range(i * 10, i * 10 + 10)]
                                           for i in range(4)]
    assert {o.node_id for o in outcomes} == {"a", "b"}


def test_map_shards_inside_the_master_process(fabric: Fabric, tmp_path: Path) -> None:
    from master.transport import MasterNodeTransport
    fabric.node("n1", *SQUARE)
    master = MasterNodeTransport(broker_url=fabric.broker_url, root=fabric.root,
                                 state_dir=tmp_path / "inproc")
    master.start()
    try:
        wait_until(lambda: master.get_nodes_by_status("ready"), 30, message="node ready")
        assert map_shards(master, "square_all", list(range(100)), 4, timeout=30) == \
            [x * x for x in range(100)]
    finally:
        master.stop()


def test_map_shards_reports_a_failed_shard_and_a_timeout(fabric: Fabric) -> None:
    fabric.master("--max-attempts", "1")
    fabric.node("n1", *SQUARE, "--capacity", "2")
    with fabric.client() as client:
        wait_ready(client, 1)
        with pytest.raises(TaskFailed) as failed:
            map_shards(client, "square_all", [1, 2, "x", 4], 2, timeout=30)
        assert failed.value.error["kind"] == "exception"
        with pytest.raises(FabricTimeout, match=r"shards \[0\]"):
            map_shards(client, "square_all", [1], 1, timeout=0.5, kwargs={"delay": 3})
