"""Whose work a compute node takes: the current lease holder's, never a deposed master's.

Replicated masters stamp every task batch with their lease (epoch, master id); the node
reads the retained lease topic and remembers the best lease it has seen held (`lease_key`
order: epoch, then holder). A batch is taken only if it carries exactly that lease: one
from an older lease (a master that was frozen and has not yet noticed it was replaced), a
stray one stamped with any other epoch, or a new holder's first batch overtaking its lease
announcement, is refused (the node hands its tasks back, so a legitimate sender just sends
them again). Only the lease topic moves the fence, so no batch can blind a node. Epoch 0 is a
master of its own (no replication): taken unless a lease is held, as before replication
existed (and again once replicated masters are gone: their lease expired).
"""

from __future__ import annotations

import logging
import threading

from core.errors import DecodeError
from core.protocol import decode_message
from core.replication import CLAIM, HELD, Lease, lease_key

__all__ = ["LeaseFence"]

log = logging.getLogger(__name__)


class LeaseFence:
    """The best master lease a node has seen, and what it admits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._best: tuple[int, str] = (0, "")
        self._held = False  # the best lease was last seen held (not expired)
        self.rejected = 0  # malformed messages on the lease topic, logged and counted

    @property
    def epoch(self) -> int:
        return self._best[0]

    @property
    def holder(self) -> str:
        return self._best[1]

    def observe(self, payload: bytes) -> bool:
        """A message on the lease topic (a cleared or malformed one changes nothing); False
        for a malformed one, which is also counted in `rejected`."""
        if not payload:
            return True
        try:
            lease = decode_message(payload)
            if not isinstance(lease, Lease):
                raise DecodeError(f"a {lease.TYPE!r} message is not a lease")
        except DecodeError as e:
            with self._lock:
                self.rejected += 1
            log.warning("rejected a malformed lease (%d so far): %s", self.rejected, e)
            return False
        if lease.state == CLAIM:  # a claim is not a lease yet
            return True
        with self._lock:
            if lease.key >= self._best:
                if lease.state == HELD:
                    self._best, self._held = lease.key, True
                else:  # expired: its holder is gone; an older lease is still refused
                    self._held = False
        return True

    def admits(self, epoch: int, master: str) -> bool:
        """Take a batch from `master` at `epoch`?"""
        with self._lock:
            if epoch == 0:
                return not self._held
            return self._held and lease_key(epoch, master) == self._best

    def admits_control(self, epoch: int) -> bool:
        """Control messages (state queries) carry an epoch only: none older than the lease."""
        with self._lock:
            return not self._held if epoch == 0 else epoch >= self._best[0]
