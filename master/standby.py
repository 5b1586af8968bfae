"""A standby's copy of the active master's journal.

Deltas are applied in order, and each applied one is confirmed by the standby's presence (its
journal position: the ack the active master waits for). A delta that does not follow, or no
copy at all yet, makes the standby ask the lease holder for a full copy; deltas arriving
meanwhile are buffered and applied after it. A copy that stalls is asked for again.
"""

from __future__ import annotations

import logging
import sqlite3
import uuid
from typing import TYPE_CHECKING, TypeVar

from core.errors import DecodeError
from core.replication import JournalDelta, JournalDump, ResyncRequest
from master.journal_replication import APPLY, DUPLICATE, JournalReplica, ReplicationError
from master.lease import Position

if TYPE_CHECKING:
    from master.replica import ReplicatedMaster

__all__ = ["StandbyReplicator"]

log = logging.getLogger("master.replica")

_COPY_SILENCE = 5.0        # a copy that stalls this long is asked for again
_MAX_BUFFERED = 10_000     # deltas kept while a copy arrives


_Message = TypeVar("_Message", JournalDelta, JournalDump)


def _decode(kind: type[_Message], payload: bytes, what: str) -> _Message | None:
    """The message, or None for a malformed one (logged: it costs that message only)."""
    try:
        return kind.decode(payload)
    except DecodeError as e:
        log.warning("ignored a malformed %s: %s", what, e)
        return None


class StandbyReplicator:
    """The journal copy of one replicated master while it is not active."""

    def __init__(self, owner: ReplicatedMaster) -> None:
        self.owner = owner
        self.replica: JournalReplica | None = None
        self.need_copy = True
        self.copy_request: str | None = None
        self._copy_next = 0
        self._copy_deadline = 0.0
        self._buffer: list[JournalDelta] = []

    @property
    def position(self) -> Position:
        return self.replica.position if self.replica is not None else (0, 0)

    def open(self, *, need_copy: bool = False) -> JournalReplica:
        """(Re)open the journal copy; `need_copy`: what it holds may not be the holder's."""
        self.replica = JournalReplica(self.owner.path)
        if need_copy:
            self.need_copy = True
            self.copy_request = None
        return self.replica

    def close(self) -> None:
        replica, self.replica = self.replica, None
        if replica is not None:
            replica.close()

    def abort_copy(self) -> None:
        """Claiming: a copy under way is dropped (ours is the journal now)."""
        if self.replica is not None:
            self.replica.abort_copy()
        self.copy_request = None

    def on_delta(self, payload: bytes) -> None:
        owner = self.owner
        replica = self.replica
        if owner.role == "active" or replica is None:
            return
        delta = _decode(JournalDelta, payload, "journal delta")
        if delta is None or delta.master == owner.master_id:
            return
        with owner.lock:
            if (delta.epoch, delta.master) < owner.view.best:
                return  # from a master already replaced
        if self.copy_request is not None or replica.in_copy:
            if len(self._buffer) < _MAX_BUFFERED:
                self._buffer.append(delta)
            return
        verdict = replica.apply(delta)
        if verdict == APPLY or verdict == DUPLICATE:
            if owner.role == "syncing" and not self.need_copy:
                owner.role = "standby"
            owner.publish_presence()
        elif not self.need_copy:
            log.warning("journal delta %s does not follow %s: asking %s for a full copy",
                        delta.position, replica.position, delta.master)
            self.need_copy = True
            if owner.role != "claiming":  # a claim in progress settles first
                owner.role = "syncing"
                owner.publish_presence()

    def ask_for_copy(self, holder: str, now: float) -> None:
        """Ask `holder` for a full copy, unless one asked for is still arriving."""
        if self.copy_request is not None and now < self._copy_deadline:
            return
        owner = self.owner
        if self.replica is not None:
            self.replica.abort_copy()
        self._buffer.clear()
        self.copy_request = uuid.uuid4().hex[:12]
        self._copy_next = 0
        self._copy_deadline = now + _COPY_SILENCE
        owner.role = "syncing"
        log.info("asking %s for a full copy of the journal", holder)
        request = ResyncRequest(requester=owner.master_id, request_id=self.copy_request,
                                holder=holder, epoch=owner.view.best[0])
        owner.session.publish(owner.topics.master_resync, request.encode())
        owner.publish_presence()

    def on_copy(self, payload: bytes) -> None:
        owner = self.owner
        replica = self.replica
        if replica is None or owner.role in ("active", "claiming"):
            return
        chunk = _decode(JournalDump, payload, "journal copy")
        if chunk is None or chunk.request_id != self.copy_request:
            return
        try:
            if chunk.index != self._copy_next:
                raise ReplicationError(f"copy chunk {chunk.index} came instead of {self._copy_next}")
            if chunk.index == 0:
                replica.begin_copy()
            replica.copy_chunk(chunk.ops)
        except (ReplicationError, sqlite3.Error) as e:
            log.warning("journal copy failed (%s): asking again", e)
            replica.abort_copy()
            self.copy_request = None
            return
        self._copy_next += 1
        self._copy_deadline = owner.clock() + _COPY_SILENCE
        if not chunk.last:
            return
        replica.finish_copy(chunk.position)
        self.copy_request = None
        self.need_copy = False
        buffered = sorted(self._buffer, key=lambda d: d.position)
        self._buffer.clear()
        for delta in buffered:
            if delta.position > replica.position and replica.apply(delta) not in (APPLY, DUPLICATE):
                self.need_copy = True
                break
        owner.role = "syncing" if self.need_copy else "standby"
        log.info("journal copied from %s: position %s, %s", chunk.master, replica.position,
                 "in sync" if not self.need_copy else "behind again")
        owner.publish_presence()
