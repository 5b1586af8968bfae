"""Interpreter settings for the fabric's long-running processes (master, compute node).

CPython's cyclic garbage collector runs its youngest generation every 700 net allocations.
A master or node moving tens of thousands of small messages a second allocates that many
objects every few dozen messages, and almost none of them are cyclic garbage, so the default
spends a large share of a core walking live objects. Objects created at start-up (modules,
registries, the journal's restored state) are frozen out of collection altogether; a higher
threshold keeps collections rare without turning them off, so real cycles are still freed.

The switch interval is how long a thread that wants the GIL waits before the holder is asked
to let go. A network thread handing a message to the worker thread waits up to that long when
the other thread is busy; 5 ms (the default) is a whole round trip of this fabric.
"""

from __future__ import annotations

import gc
import sys

__all__ = ["tune_for_messaging"]

GC_THRESHOLD = (50_000, 20, 20)
SWITCH_INTERVAL = 0.001


def tune_for_messaging(*, gc_threshold: tuple[int, int, int] = GC_THRESHOLD,
                       switch_interval: float = SWITCH_INTERVAL) -> None:
    """Freeze what start-up allocated, collect rarely, hand the GIL over sooner."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*gc_threshold)
    sys.setswitchinterval(switch_interval)
