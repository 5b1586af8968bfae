"""The active replicated master's hooks on its transport's loop (master.hooks).

before_dispatch: tasks go out only after the take-over settled and while the lease is ours.
after_commit: the turn's journal changes go to the standbys as deltas, and the turn is
published only once every standby in sync confirmed them (bounded: one silent for
`ack_timeout` is marked lagging and no longer waited for until it catches up; one claiming
the lease is waited for, since if it wins this master was replaced and must have told
nobody), and only while the lease is still valid. Copies of the journal that standbys asked
for are sent from here too, on threads of their own.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from typing import TYPE_CHECKING

from core.errors import DecodeError, FabricError
from core.replication import JournalDelta, JournalDump, MasterPresence, ResyncRequest
from master.hooks import MasterHooks
from master.journal_replication import ChangeCapture, JournalSnapshot
from master.lease import Position

if TYPE_CHECKING:
    from master.replica import ReplicatedMaster
    from master.transport import MasterNodeTransport

__all__ = ["ActiveGate"]

log = logging.getLogger("master.replica")

_MAX_COPIES = 2            # copies sent at once by the active master


class ActiveGate(MasterHooks):
    """What the active master ships to its standbys, and what it waits for from them."""

    def __init__(self, owner: ReplicatedMaster) -> None:
        self.owner = owner
        self.capture: ChangeCapture | None = None
        self.base: Position = (0, 0)     # the journal position this master took over at
        self.dispatching = False
        self._in_sync: set[str] = set()
        self._lagging: dict[str, Position] = {}
        self._claimants: set[str] = set()          # standbys claiming while we are active
        self._unconfirmed: Position | None = None  # shipped, not yet confirmed by all in sync
        self._acked: dict[str, Position] = {}
        self._resyncs: list[ResyncRequest] = []
        self._copies: list[threading.Thread] = []

    # -- taking over and letting go --------------------------------------------------------------

    def open(self, epoch: int, presence: dict[str, MasterPresence]) -> None:
        """Capture the journal's changes from here on; the standbys at our base are in sync."""
        self.capture = ChangeCapture(self.owner.path, epoch=epoch)
        self.base = self.capture.position
        with self.owner.acks:
            self._in_sync = {name for name, p in presence.items()
                             if p.role == "standby" and p.position == self.base}
            self._lagging.clear()
            self._acked.clear()
            self._claimants.clear()
            self._unconfirmed = None

    def ship_last(self) -> None:
        """A clean stop: the changes not shipped yet go out, each waited for."""
        capture = self.capture
        owner = self.owner
        if capture is None or owner.holder.deposed.is_set():
            return
        try:
            for previous, new, ops in capture.drain(epoch=owner.epoch):
                self._ship(previous, new, ops)
                self.wait_for_acks(new)
        except sqlite3.Error as e:
            log.warning("last journal changes not copied: %s", e)

    def close(self) -> None:
        capture, self.capture = self.capture, None
        if capture is not None:
            try:
                capture.close()
            except sqlite3.Error as e:
                log.warning("closing the change capture: %s", e)

    def forget_standbys(self) -> None:
        """Stepped down: nobody is in sync with us, and copies asked of us are void."""
        with self.owner.acks:
            self._in_sync.clear()
            self._acked.clear()
            self._resyncs.clear()

    # -- the standbys (replication session thread) ----------------------------------------------

    def note_gone(self, name: str) -> None:
        """`name`'s presence was cleared (called with owner.acks held)."""
        self._in_sync.discard(name)

    def note_ack(self, name: str, presence: MasterPresence) -> None:
        """A standby's presence while we are active: its ack, and whether it is in sync
        (called with owner.acks held)."""
        position = presence.position
        if presence.role == "claiming":  # it thinks our lease lapsed: it must have it all
            self._claimants.add(name)
            self._acked[name] = position
            return
        self._claimants.discard(name)
        follows = presence.role == "standby" and (position[0] == self.owner.epoch
                                                  or position == self.base)
        if not follows:
            self._in_sync.discard(name)
            return
        self._acked[name] = position
        mark = self._lagging.get(name)
        if name not in self._in_sync and (mark is None or position >= mark):
            self._lagging.pop(name, None)
            self._in_sync.add(name)
            log.info("standby %s is in sync (journal %s)", name, position)

    def on_resync(self, _topic: str, payload: bytes) -> None:
        try:
            request = ResyncRequest.decode(payload)
        except DecodeError as e:
            log.warning("ignored a malformed resync request: %s", e)
            return
        if request.holder != self.owner.master_id:
            return
        with self.owner.lock:  # kept even while still taking over: served once active
            self._resyncs = [r for r in self._resyncs if r.requester != request.requester]
            self._resyncs.append(request)
            self._in_sync.discard(request.requester)

    # -- the hooks (the transport's loop thread) -------------------------------------------------

    def before_dispatch(self, master: MasterNodeTransport) -> bool:
        return self.dispatching and self.owner.holder.valid()

    def after_commit(self, master: MasterNodeTransport) -> bool:
        """Copy the turn's changes to the standbys, wait for them, start requested copies;
        the turn is published only if the lease is still ours."""
        capture = self.capture
        owner = self.owner
        if capture is None or owner.holder.deposed.is_set():
            return False
        try:
            deltas = capture.drain(epoch=owner.epoch)
        except sqlite3.Error as e:
            log.warning("journal changes not read yet: %s", e)
            return False
        if deltas:
            for previous, new, ops in deltas:
                self._ship(previous, new, ops)
            self._unconfirmed = deltas[-1][1]
        if self._unconfirmed is not None:
            if not self.wait_for_acks(self._unconfirmed):
                return False  # a standby is claiming the lease: publish nothing until settled
            self._unconfirmed = None
        if self._resyncs:
            self._send_copies(capture)
        return owner.holder.valid()

    def _ship(self, previous: Position, new: Position, ops: list) -> None:
        owner = self.owner
        delta = JournalDelta(master=owner.master_id, epoch=owner.epoch, seq=new[1],
                             prev_seq=previous[1], prev_epoch=previous[0], ops=tuple(ops))
        owner.session.publish(owner.topics.master_journal, delta.encode())

    def wait_for_acks(self, target: Position) -> bool:
        """Until every standby in sync confirmed `target` (True); one silent for ack_timeout
        is dropped from the sync set, except one claiming the lease: then False, and the turn
        waits (if that standby wins, this master was replaced and must have told nobody)."""
        owner = self.owner
        timeout = owner.timing.ack_timeout
        began = owner.clock()
        deadline = began + timeout
        with owner.acks:
            while not owner.holder.deposed.is_set():
                waiting = [n for n in self._in_sync | self._claimants
                           if self._acked.get(n, (0, 0)) < target]
                if not waiting:
                    if owner.clock() - began > timeout / 4:
                        log.info("standbys confirmed journal %s after %.2fs", target,
                                 owner.clock() - began)
                    return True
                remaining = deadline - owner.clock()
                if remaining <= 0:
                    if self._claimants & set(waiting):
                        log.warning("standby %s claims the lease: holding back journal %s",
                                    ", ".join(sorted(self._claimants & set(waiting))), target)
                        return False
                    for name in waiting:
                        self._in_sync.discard(name)
                        self._lagging[name] = target
                        log.warning("standby %s did not confirm journal %s within %gs: not "
                                    "waited for until it catches up", name, target, timeout)
                    return True
                owner.acks.wait(remaining)
        return False

    # -- copies ----------------------------------------------------------------------------------

    def _send_copies(self, capture: ChangeCapture) -> None:
        owner = self.owner
        with owner.lock:
            requests, self._resyncs = self._resyncs, []
        self._copies = [t for t in self._copies if t.is_alive()]
        for request in requests:
            if request.epoch != owner.epoch:
                continue  # asked of an earlier lease of ours
            if len(self._copies) >= _MAX_COPIES:
                break  # the requester asks again
            snapshot = capture.snapshot()
            thread = threading.Thread(target=self._send_copy, args=(request, snapshot),
                                      name=f"copy-{request.requester}", daemon=True)
            thread.start()
            self._copies.append(thread)

    def _send_copy(self, request: ResyncRequest, snapshot: JournalSnapshot) -> None:
        owner = self.owner
        topic = owner.topics.master_dump(request.requester)
        position = snapshot.position
        index = 0
        try:
            for ops in snapshot.chunks():
                if owner.holder.deposed.is_set() or owner.stopping.is_set():
                    return
                chunk = JournalDump(master=owner.master_id, epoch=owner.epoch,
                                    request_id=request.request_id, index=index, last=False,
                                    seq=position[1], seq_epoch=position[0], ops=tuple(ops))
                owner.session.publish_and_wait(topic, chunk.encode(), timeout=10.0)
                index += 1
            last = JournalDump(master=owner.master_id, epoch=owner.epoch,
                               request_id=request.request_id, index=index, last=True,
                               seq=position[1], seq_epoch=position[0])
            owner.session.publish_and_wait(topic, last.encode(), timeout=10.0)
            log.info("sent %s a copy of the journal at %s (%d chunks)", request.requester,
                     position, index)
        except (FabricError, sqlite3.Error) as e:
            log.warning("copy for %s failed: %s", request.requester, e)
        finally:
            snapshot.close()
