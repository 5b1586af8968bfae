"""The master's extension points: one `MasterHooks` base class with no-op methods, as a
dramatiq Middleware, instead of nullable gates and callbacks.

A `MasterNodeTransport` keeps its hooks in the order added (`add_hooks`) and calls them on
its loop thread, with its lock held (hooks may be added and removed from any thread):

    before_dispatch   each turn, before tasks are assigned: every hook must agree
    after_commit      after each journal commit of a turn: every hook is called, and the
                      turn's messages are published only if every one returned True
    node_lost         nodes found dead (each hook; a failing hook is logged, not fatal)
    node_report       a node's report (its answer to a control message), to each hook

A master whose hooks do not override `after_commit` keeps its fast path (turns run where a
message arrives, journal writes wait for a turn that commits anyway); one hook overriding it
makes every turn commit, on the loop thread, and publish only after that hook allowed it.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

if TYPE_CHECKING:
    from core.protocol import NodeReport
    from master.transport import MasterNodeTransport

__all__ = ["MasterHooks", "HookChain", "NodeLostCallback"]

log = logging.getLogger(__name__)


class MasterHooks:
    """Override what you need; every method is a no-op that lets the master go on."""

    def before_dispatch(self, master: MasterNodeTransport) -> bool:
        """May tasks be dispatched this turn? False holds them queued until a later turn."""
        return True

    def after_commit(self, master: MasterNodeTransport) -> bool:
        """The turn's journal changes are committed; may the turn's messages be published?
        Overriding this puts the master on its gated path (see the module docstring)."""
        return True

    def node_lost(self, master: MasterNodeTransport, node_ids: list[str]) -> None:
        """`node_ids` were found dead (their tasks are requeued already)."""

    def node_report(self, master: MasterNodeTransport, report: NodeReport) -> None:
        """A node answered a control message (`MasterNodeTransport.broadcast_control`)."""


class NodeLostCallback(MasterHooks):
    """The seed's `set_dead_nodes_callback(cb)`: `cb(node_ids)` on nodes found dead."""

    def __init__(self, callback: Callable[[list[str]], None]) -> None:
        self.callback = callback

    def node_lost(self, master: MasterNodeTransport, node_ids: list[str]) -> None:
        self.callback(node_ids)


_METHODS = ("before_dispatch", "after_commit", "node_lost", "node_report")


def _overrides(hooks: MasterHooks, name: str) -> bool:
    return getattr(type(hooks), name) is not getattr(MasterHooks, name)


class HookChain:
    """The hooks of one master, in order, and the rules for combining their answers. Only
    hooks overriding a method are asked, so a master with no such hook pays nothing."""

    def __init__(self, hooks: Iterable[MasterHooks] = ()) -> None:
        self._lock = threading.Lock()  # for changes; the loop reads without it
        self._hooks: list[MasterHooks] = []
        self._by_method: dict[str, list[MasterHooks]] = {name: [] for name in _METHODS}
        for each in hooks:
            self.add(each)

    def add(self, hooks: MasterHooks) -> None:
        """Call `hooks` after those added before."""
        self.replace(None, hooks)

    def remove(self, hooks: MasterHooks) -> None:
        """Take `hooks` out (absent: nothing happens)."""
        self.replace(hooks, None)

    def replace(self, old: MasterHooks | None, new: MasterHooks | None) -> None:
        """Take `old` out (if given and present) and add `new` (if given) last, at once."""
        if new is not None and not isinstance(new, MasterHooks):
            raise TypeError(f"master hooks must be a MasterHooks, got {type(new).__name__}")
        with self._lock:
            kept = [h for h in self._hooks if h is not old]
            self._hooks = kept + [new] if new is not None else kept
            # new lists, never changed in place: the loop thread may be going through the old
            self._by_method = {name: [h for h in self._hooks if _overrides(h, name)]
                               for name in _METHODS}

    def __iter__(self) -> Iterator[MasterHooks]:
        return iter(list(self._hooks))

    @property
    def gated(self) -> bool:
        """Does a hook need every turn committed and its publishing held until it agrees?"""
        return bool(self._by_method["after_commit"])

    def before_dispatch(self, master: MasterNodeTransport) -> bool:
        """True unless a hook says no (the hooks after it are not asked)."""
        return all(h.before_dispatch(master) for h in self._by_method["before_dispatch"])

    def after_commit(self, master: MasterNodeTransport) -> bool:
        """Every hook is told of the commit; True only if every one allowed publishing."""
        allowed = True
        for hooks in self._by_method["after_commit"]:
            allowed = hooks.after_commit(master) and allowed
        return allowed

    def node_lost(self, master: MasterNodeTransport, node_ids: list[str]) -> None:
        for hooks in self._by_method["node_lost"]:
            try:
                hooks.node_lost(master, node_ids)
            except Exception:
                log.exception("node_lost hook %s failed", type(hooks).__name__)

    def node_report(self, master: MasterNodeTransport, report: NodeReport) -> None:
        for hooks in self._by_method["node_report"]:
            try:
                hooks.node_report(master, report)
            except Exception:
                log.exception("node_report hook %s failed", type(hooks).__name__)
