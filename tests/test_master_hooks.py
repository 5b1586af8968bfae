"""The master's hooks protocol (master.hooks): the order hooks are asked in and how their
answers combine, without a broker (a HookChain is what MasterNodeTransport's loop calls);
then the hooks on a running master with a real node."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from core.errors import FabricTimeout
from core.protocol import NodeReport
from master.hooks import HookChain, MasterHooks, NodeLostCallback
from master.transport import MasterNodeTransport
from support.fabric import Fabric, wait_until

MASTER: Any = object()  # the hooks get the master; these ones never look at it


class Recorder(MasterHooks):
    """Answers as told and writes down every call, in one log shared by all of them."""

    def __init__(self, name: str, log: list[tuple[str, str]], *, dispatch: bool = True,
                 publish: bool = True) -> None:
        self.name, self.log, self.dispatch, self.publish = name, log, dispatch, publish

    def before_dispatch(self, master: Any) -> bool:
        self.log.append((self.name, "before_dispatch"))
        return self.dispatch

    def after_commit(self, master: Any) -> bool:
        self.log.append((self.name, "after_commit"))
        return self.publish

    def node_lost(self, master: Any, node_ids: list[str]) -> None:
        self.log.append((self.name, "node_lost " + ",".join(node_ids)))

    def node_report(self, master: Any, report: NodeReport) -> None:
        self.log.append((self.name, f"node_report {report.node_id}"))


class DispatchOnly(MasterHooks):
    def __init__(self, allow: bool) -> None:
        self.allow = allow

    def before_dispatch(self, master: Any) -> bool:
        return self.allow


def test_no_hooks_dispatch_publish_and_keep_the_fast_path() -> None:
    chain = HookChain()
    assert chain.before_dispatch(MASTER) and chain.after_commit(MASTER)
    assert not chain.gated


def test_the_base_class_lets_everything_through() -> None:
    hooks = MasterHooks()
    assert hooks.before_dispatch(MASTER) and hooks.after_commit(MASTER)
    assert hooks.node_lost(MASTER, ["n1"]) is None
    chain = HookChain([hooks])
    assert not chain.gated, "a hook that does not override after_commit gates nothing"


def test_only_a_hook_overriding_after_commit_gates_the_turns() -> None:
    chain = HookChain([DispatchOnly(True), NodeLostCallback(lambda ids: None)])
    assert not chain.gated
    gate = Recorder("gate", [])
    chain.add(gate)
    assert chain.gated
    chain.remove(gate)
    assert not chain.gated


def test_hooks_are_asked_in_the_order_added_and_one_no_stops_dispatch() -> None:
    log: list[tuple[str, str]] = []
    chain = HookChain([Recorder("a", log), Recorder("b", log, dispatch=False),
                       Recorder("c", log)])
    assert chain.before_dispatch(MASTER) is False
    assert log == [("a", "before_dispatch"), ("b", "before_dispatch")]


def test_every_hook_hears_of_each_commit_and_any_no_holds_the_turn_back() -> None:
    log: list[tuple[str, str]] = []
    chain = HookChain([Recorder("a", log, publish=False), Recorder("b", log)])
    assert chain.after_commit(MASTER) is False
    assert log == [("a", "after_commit"), ("b", "after_commit")]
    log.clear()
    assert HookChain([Recorder("a", log), Recorder("b", log)]).after_commit(MASTER) is True


def test_a_failing_node_lost_hook_does_not_keep_the_others_from_hearing() -> None:
    log: list[tuple[str, str]] = []

    def broken(node_ids: list[str]) -> None:
        raise RuntimeError("bug in a callback")

    chain = HookChain([NodeLostCallback(broken), Recorder("b", log)])
    chain.node_lost(MASTER, ["n1", "n2"])
    chain.node_report(MASTER, NodeReport(node_id="n1", request_id="r1", state={}))
    assert log == [("b", "node_lost n1,n2"), ("b", "node_report n1")]


def test_replace_swaps_one_hook_for_another_in_one_step() -> None:
    seen: list[tuple[str, list[str]]] = []
    first = NodeLostCallback(lambda ids: seen.append(("first", ids)))
    second = NodeLostCallback(lambda ids: seen.append(("second", ids)))
    chain = HookChain([first])
    chain.replace(first, second)
    chain.replace(None, None)
    chain.node_lost(MASTER, ["n1"])
    assert seen == [("second", ["n1"])]
    assert list(chain) == [second]


def test_a_hook_must_be_a_master_hooks() -> None:
    with pytest.raises(TypeError, match="MasterHooks"):
        HookChain().add(lambda master: True)  # type: ignore[arg-type]


class Watch(MasterHooks):
    """Holds dispatch until `open` is set; counts commits; keeps reports and lost nodes."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.commits = 0
        self.reports: list[NodeReport] = []
        self.lost: list[str] = []
        self.masters: set[int] = set()

    def before_dispatch(self, master: Any) -> bool:
        self.masters.add(id(master))
        return self.open.is_set()

    def after_commit(self, master: Any) -> bool:
        self.commits += 1
        return True

    def node_lost(self, master: Any, node_ids: list[str]) -> None:
        self.lost.extend(node_ids)

    def node_report(self, master: Any, report: NodeReport) -> None:
        self.reports.append(report)


def test_hooks_on_a_running_master(fabric: Fabric, tmp_path: Path) -> None:
    master = MasterNodeTransport(broker_url=fabric.broker_url, root=fabric.root,
                                 state_dir=tmp_path / "master", node_timeout=2.0)
    watch = Watch()
    dead: list[str] = []
    master.add_hooks(watch)
    master.set_dead_nodes_callback(lambda ids: dead.append("first"))
    master.set_dead_nodes_callback(dead.extend)  # replaces the first one
    master.start()
    try:
        worker = fabric.node("h1")
        wait_until(lambda: "h1" in master.get_nodes_by_status("ready"), 30, message="h1 ready")
        handle = master.submit("echo", ["held"])
        with pytest.raises(FabricTimeout):
            handle.outcome(timeout=1.0)  # before_dispatch says no: it stays queued
        assert master.status()["queued"] == 1 and watch.masters == {id(master)}
        watch.open.set()
        assert handle.result(timeout=30) == "held"
        assert watch.commits > 0  # a gating hook: every turn commits, then asks it

        request_id = master.broadcast_control("snapshot", {"reason": "test"})
        wait_until(lambda: any(r.request_id == request_id for r in watch.reports), 15,
                   message="h1's report through node_report")
        assert {r.node_id for r in watch.reports} == {"h1"}

        master.remove_hooks(watch)
        commits = watch.commits
        assert master.submit("echo", ["free"]).result(timeout=30) == "free"
        assert watch.commits == commits  # removed: no longer asked

        worker.kill()  # the broker sends its will
        wait_until(lambda: dead == ["h1"], 15, message="the dead-nodes callback")
        assert watch.lost == []
    finally:
        master.stop()
