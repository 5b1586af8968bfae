"""Groups and chains from code (`fabric.group`, `fabric.chain`) against a real broker, a real
master and a real node: values in order, each step given the previous value, and a failing
or cancelled member or step named in the error, with nothing after a failed step run."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from core.errors import ChainFailed, ConfigError, FabricTimeout, GroupFailed, TaskFailed
from master import Call, call
from support.fabric import Fabric, wait_until

TASKS = [arg for name in ("add", "mul", "divide", "note", "hold")
         for arg in ("--task", f"support.canvas_tasks:{name}")]
BOUND = 30.0

pytestmark = pytest.mark.timeout(120)


def start(fabric: Fabric):
    fabric.master()
    fabric.node("n1", "--capacity", "4", *TASKS)
    client = fabric.client()
    wait_until(lambda: any(n["node_id"] == "n1" and n["status"] == "ready"
                           for n in client.nodes()), 20, message="node n1 ready")
    return client


def test_groups_run_in_parallel_and_give_values_in_order(fabric: Fabric) -> None:
    with start(fabric) as client:
        # a failing member: the group fails, saying which member and why
        failing = client.group([call("echo", 1), call("divide", 1, 0), call("add", 1, 1)])
        with pytest.raises(GroupFailed) as failed:
            failing.result(timeout=BOUND)
        error = failed.value
        assert isinstance(error, TaskFailed)
        assert (error.index, error.name, error.task_id) == (1, "divide", failing.ids[1])
        assert "group member 2 of 3 (divide" in str(error) and "ZeroDivisionError" in str(error)
        outcomes = failing.outcomes(timeout=BOUND)
        assert [o.state for o in outcomes] == ["completed", "failed", "completed"]

        # a member cancelled by anyone (here by its id, as `master-node cancel ID` does), and
        # the members still going cancelled through the group's handle
        waiting = client.group([call("echo", 1), call("hold", 60), call("hold", 60)])
        wait_until(lambda: client.task(waiting.ids[1])["state"] == "running", BOUND,
                   message="the held member running")
        client.cancel(waiting.ids[1])
        with pytest.raises(GroupFailed) as cancelled:
            waiting.result(timeout=BOUND)
        assert cancelled.value.index == 1 and "(cancelled)" in str(cancelled.value)
        verdicts = {v["id"]: v["was"] for v in waiting.cancel(timeout=10)}
        assert verdicts[waiting.ids[2]] == "running" and waiting.ids[1] not in verdicts
        states = [o.state for o in waiting.outcomes(timeout=BOUND)]
        assert states[1:] == ["cancelled", "cancelled"] and states[0] in ("completed",
                                                                          "cancelled")

        # a slow member first: the values still come back in call order
        handle = client.group([call("sleep", 0.3), call("add", 1, 2), ("echo", ["x"], {}, 9),
                               call("mul", 3, b=4, priority=2)])
        assert len(handle) == 4 and len(set(handle.ids)) == 4
        assert handle.result(timeout=BOUND) == [0.3, 3, "x", 12]
        assert [o.state for o in handle.outcomes(timeout=1)] == ["completed"] * 4

        many = client.group([call("add", i, 1) for i in range(300)])
        assert many.result(timeout=BOUND) == [i + 1 for i in range(300)]
        assert asyncio.run(asyncio.wait_for(
            client.group([call("echo", 5), call("add", 2, 2)]).wait(), BOUND)) == [5, 4]
        assert client.group([]).result(timeout=1) == []

        with pytest.raises(FabricTimeout):
            client.group([call("hold", 2)]).result(timeout=0.2)
        with pytest.raises(ConfigError, match="group item 1"):
            client.group([call("echo", 1), ("echo", [1], {}, 11)])


def test_chains_pass_each_value_on_and_stop_at_a_failed_step(fabric: Fabric,
                                                             tmp_path: Path) -> None:
    ran = tmp_path / "ran.txt"
    with start(fabric) as client:
        # echo(2) -> add(2, 3) -> mul(5, 4) -> note(20, path); a step may ignore the value
        handle = client.chain([call("echo", 2), call("add", 3), call("mul", b=4),
                               call("note", str(ran))])
        assert handle.result(timeout=BOUND) == 20
        assert ran.read_text() == "20\n" and len(handle.handles) == 4
        assert client.chain([call("echo", 1), call("echo", "fresh", ignore_previous=True)]
                            ).result(timeout=BOUND) == "fresh"
        assert asyncio.run(asyncio.wait_for(
            client.chain([("add", [1, 1]), Call("mul", (10,))]).wait(), BOUND)) == 20

        # step 2 fails: the chain says which step, and step 3 never runs
        ran.unlink()
        broken = client.chain([call("echo", 1), call("divide", 0), call("note", str(ran))])
        with pytest.raises(ChainFailed) as failed:
            broken.result(timeout=BOUND)
        error = failed.value
        assert (error.index, error.name, error.task_id) == (1, "divide", broken.ids[1])
        assert "chain step 2 of 3 (divide" in str(error)
        assert "ZeroDivisionError" in str(error) and "1 step after it did not run" in str(error)
        assert len(broken.handles) == 2 and not ran.exists()

        # cancelled while a step runs: that step ends cancelled, none after it is submitted
        held = client.chain([call("hold", 60), call("note", str(ran))])
        wait_until(lambda: client.task(held.ids[0])["state"] == "running", BOUND,
                   message="the first step running")
        assert [v["was"] for v in held.cancel(timeout=10)] == ["running"]
        with pytest.raises(ChainFailed) as cancelled:
            held.result(timeout=BOUND)
        assert cancelled.value.index == 0 and "(cancelled)" in str(cancelled.value)
        assert len(held.handles) == 1 and not ran.exists()

        # a step the master refuses (its value does not fit the call) stops the chain too
        with pytest.raises(ChainFailed, match="chain step 2 of 2 \\(nope"):
            client.chain([call("echo", 1), call("nope")]).result(timeout=BOUND)
        with pytest.raises(FabricTimeout):
            client.chain([call("hold", 2), call("echo")]).result(timeout=0.2)
        with pytest.raises(ConfigError, match="at least one"):
            client.chain([])
