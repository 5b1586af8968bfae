"""An ESP32 board (MicroPython unix port, 100K heap) in a fleet of replicated masters: the
active master is killed, a standby takes the lease, and the board takes work only from the
new holder (a batch stamped with the deposed lease, or with none, is handed back), while
every result it sends is kept. Both brokers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from core.protocol import TaskSpec  # noqa: E402
from esp32_support import Harness, boards, broker, micropython, umqtt_file  # noqa: E402,F401
from support.brokers import BrokerHandle  # noqa: E402
from support.fabric import Fabric, wait_until  # noqa: E402
from support.replication import ReplicaWatch, start_masters  # noqa: E402

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def fab(broker: BrokerHandle, tmp_path: Path) -> Iterator[Fabric]:
    fabric = Fabric(broker.url, tmp_path)
    yield fabric
    fabric.cleanup()


@pytest.fixture
def watch(fab: Fabric) -> Iterator[ReplicaWatch]:
    w = ReplicaWatch(fab.broker_url, fab.root)
    yield w
    w.close()


def test_a_board_follows_the_lease_when_the_active_master_is_killed(
        fab: Fabric, broker: BrokerHandle, watch: ReplicaWatch, boards,
        record_property) -> None:
    masters = start_masters(fab, 2)
    first, epoch = watch.wait_active(30)
    wait_until(lambda: sorted(watch.roles().values()) == ["active", "standby"], 30,
               message="a standby in sync")
    board = boards(broker, "mp-lease", fab.root, HEARTBEAT_S=1)
    with Harness(broker, fab.root) as h, fab.client() as client:
        h.wait_status(board.node_id, "ready", 30)
        wait_until(lambda: any(n["node_id"] == board.node_id and n["status"] == "ready"
                               for n in client.nodes()), 30, message="the master knows the board")
        handles = client.submit_many([("echo", [i], {}, 5) for i in range(40)]
                                     + [("sleep", [0.1], {}, 5) for _ in range(20)])
        wait_until(lambda: sum(h.done() for h in handles) >= 5, 60,
                   message="the board's first results through the first master")
        before = {r_id for r_id in h.results(board.node_id)}
        masters[first].kill()
        second, second_epoch = watch.wait_active(30, after_epoch=epoch)
        assert second != first and second_epoch == epoch + 1
        values = [handle.result(timeout=120) for handle in handles]
        assert values == list(range(40)) + [0.1] * 20
        status = client.status()
        after_takeover = {r_id for r_id in h.results(board.node_id)} - before
        assert after_takeover, "the board did no work for the new holder"
        assert status["rejected"] == 0, status  # every result the board sent was kept

        # Batches stamped with the deposed lease, or with none, are handed back unrun.
        state = h.snapshot(board.node_id, epoch=second_epoch)
        assert state["lease"] == [second_epoch, second, True]
        rejected = state["rejected"]
        h.send(board.node_id, [TaskSpec(id="from-deposed", name="echo", args=["no"])],
               epoch=epoch, master=first)
        h.send(board.node_id, [TaskSpec(id="from-nobody", name="echo", args=["no"])])
        h.wait(lambda: {"from-deposed", "from-nobody"} <= set(h.released(board.node_id)), 15,
               "the stale batches handed back")
        state = h.snapshot(board.node_id, epoch=second_epoch)
        assert state["rejected"] == rejected + 2
        assert not {"from-deposed", "from-nobody"} & h.results(board.node_id).keys()
        assert not h.undecodable
    to_board = [b for b in watch.batches if b.node == board.node_id]
    senders = {(b.epoch, b.master) for b in to_board}
    assert senders <= {(epoch, first), (second_epoch, second), (epoch, "harness"),
                     (0, "harness")}, senders
    assert (second_epoch, second) in senders
    record_property("board_results_after_takeover", len(after_takeover))
    print(f"{broker.kind}: {first} killed, {second} took epoch {second_epoch}; the board "
          f"ran {len(after_takeover)} tasks for it, all {len(handles)} results kept")
