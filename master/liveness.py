"""Liveness: which nodes have gone silent. Pure functions, the clock is a parameter."""

from __future__ import annotations

from typing import Iterable

__all__ = ["silent_nodes", "heartbeat_timeout"]


def heartbeat_timeout(heartbeat: float, *, misses: float = 3.0, floor: float = 1.0) -> float:
    """How long a node may stay silent: a few missed heartbeats, never less than `floor`."""
    return max(floor, heartbeat * misses)


def silent_nodes(last_seen: Iterable[tuple[str, float, float]], now: float) -> list[str]:
    """Ids whose last message is older than their own timeout.

    `last_seen` yields (node_id, last_seen_at, timeout) triples; `now` is on the same clock.
    """
    return [node_id for node_id, seen, timeout in last_seen if now - seen > timeout]
