"""Wire messages of replicated masters: the lease, presence, and the journal copied to standbys.

They register with `core.protocol`'s registry, so `decode_message` knows them wherever this
module is imported (masters, and nodes, which read the lease to know whose work to take).

    <root>/master/lease           retained JSON `Lease`: who is the active master, its epoch
    <root>/masters/<id>           retained JSON `MasterPresence`: role and journal position of
                                  one master (will: `dead`); a standby's copy is its ack
    <root>/master/journal         `JournalDelta`s: the rows one loop turn of the active changed
    <root>/master/resync          `ResyncRequest`: a standby asks the active for a full copy
    <root>/masters/<id>/dump      `JournalDump` chunks: that full copy, for one standby

Journal rows travel as plain values (None, int, float, str, bytes) under column names that
are checked against the receiver's own table: nothing from the wire becomes SQL text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from core import codec as _codec
from core.defaults import DEFAULT_LEASE_TTL
from core.errors import DecodeError
from core.protocol import Message, _get, _int, _num, _register

__all__ = [
    "HELD", "CLAIM", "EXPIRED", "LEASE_STATES", "ROLES", "JOURNAL_TABLES", "OP_KINDS",
    "Lease", "MasterPresence", "JournalOp", "JournalDelta", "ResyncRequest", "JournalDump",
    "lease_key",
]

HELD, CLAIM, EXPIRED = "held", "claim", "expired"
LEASE_STATES = (HELD, CLAIM, EXPIRED)
ROLES = ("active", "standby", "syncing", "claiming", "dead", "offline")
JOURNAL_TABLES = ("tasks", "meta")
OP_KINDS = ("upsert", "update", "delete")
_COLUMN = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")
_VALUE_TYPES = (type(None), int, float, str, bytes)


def lease_key(epoch: int, holder: str) -> tuple[int, str]:
    """How leases compare: the higher epoch wins, then the higher holder id (a tie only two
    simultaneous claims can produce). Masters and nodes use this one order."""
    return (epoch, holder)


@_register
@dataclass(frozen=True, slots=True)
class Lease(Message):
    """Retained on `<root>/master/lease`: `held` (renewed every ttl/3 by the active master),
    `claim` (a standby asking for the next epoch) or `expired` (the holder's will, or its
    release on a clean stop). `seq` counts the holder's renewals; `journal_*` say how far the
    sender's journal goes, which decides between simultaneous claims."""

    TYPE: ClassVar[str] = "lease"
    holder: str
    epoch: int
    state: str
    ttl: float = DEFAULT_LEASE_TTL
    seq: int = 0
    journal_seq: int = 0
    journal_epoch: int = 0
    ts: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"holder": self.holder, "epoch": self.epoch, "state": self.state, "ttl": self.ttl,
                "seq": self.seq, "journal_seq": self.journal_seq,
                "journal_epoch": self.journal_epoch, "ts": self.ts}

    def encode(self, codec: str = _codec.JSON) -> bytes:
        return _codec.encode(self.wire(), codec)

    @property
    def key(self) -> tuple[int, str]:
        return lease_key(self.epoch, self.holder)

    @property
    def position(self) -> tuple[int, int]:
        return (self.journal_epoch, self.journal_seq)

    @classmethod
    def from_dict(cls, d: dict) -> "Lease":
        w = "lease"
        state = _get(d, "state", str, w)
        if state not in LEASE_STATES:
            raise DecodeError(f"lease: unknown state {state!r}")
        holder = _get(d, "holder", str, w)
        if not holder:
            raise DecodeError("lease: empty holder")
        ttl = _num(d, "ttl", w, 3.0)
        if not ttl > 0:
            raise DecodeError("lease: ttl must be positive")
        return cls(holder=holder, epoch=_int(d, "epoch", w, lo=1), state=state, ttl=ttl,
                   seq=_int(d, "seq", w, 0, 0), journal_seq=_int(d, "journal_seq", w, 0, 0),
                   journal_epoch=_int(d, "journal_epoch", w, 0, 0), ts=_num(d, "ts", w, 0.0))


@_register
@dataclass(frozen=True, slots=True)
class MasterPresence(Message):
    """Retained on `<root>/masters/<id>`: a master's role and how far its journal goes.

    A standby publishes it after applying each journal delta: that is its acknowledgement,
    and what the others rank themselves by when the lease lapses."""

    TYPE: ClassVar[str] = "master_presence"
    master_id: str
    role: str
    epoch: int = 0
    journal_seq: int = 0
    journal_epoch: int = 0
    ts: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"master_id": self.master_id, "role": self.role, "epoch": self.epoch,
                "journal_seq": self.journal_seq, "journal_epoch": self.journal_epoch,
                "ts": self.ts}

    def encode(self, codec: str = _codec.JSON) -> bytes:
        return _codec.encode(self.wire(), codec)

    @property
    def position(self) -> tuple[int, int]:
        return (self.journal_epoch, self.journal_seq)

    @classmethod
    def from_dict(cls, d: dict) -> "MasterPresence":
        w = "master_presence"
        role = _get(d, "role", str, w)
        if role not in ROLES:
            raise DecodeError(f"master_presence: unknown role {role!r}")
        return cls(master_id=_get(d, "master_id", str, w), role=role,
                   epoch=_int(d, "epoch", w, 0, 0), journal_seq=_int(d, "journal_seq", w, 0, 0),
                   journal_epoch=_int(d, "journal_epoch", w, 0, 0), ts=_num(d, "ts", w, 0.0))


@dataclass(frozen=True, slots=True)
class JournalOp:
    """Rows of one journal table: `upsert` (whole rows), `update` (the named columns of
    existing rows) or `delete`; the first column is the row's key (`rowid`, or `key` in meta)."""

    table: str
    kind: str
    columns: tuple[str, ...]
    rows: tuple[list, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "kind": self.kind, "columns": list(self.columns),
                "rows": list(self.rows)}

    @classmethod
    def from_dict(cls, d: Any) -> "JournalOp":
        if not isinstance(d, dict):
            raise DecodeError("journal op must be a map")
        w = "journal op"
        table = _get(d, "table", str, w)
        kind = _get(d, "kind", str, w)
        if table not in JOURNAL_TABLES:
            raise DecodeError(f"journal op: unknown table {table!r}")
        if kind not in OP_KINDS:
            raise DecodeError(f"journal op: unknown kind {kind!r}")
        columns = _get(d, "columns", list, w)
        if not columns or not all(isinstance(c, str) and _COLUMN.match(c) for c in columns) \
                or len(set(columns)) != len(columns):
            raise DecodeError("journal op: columns must be distinct lower-case names")
        width = len(columns)
        rows = _get(d, "rows", list, w)
        for row in rows:
            if not isinstance(row, list) or len(row) != width:
                raise DecodeError(f"journal op: each row must hold {width} values")
            for value in row:
                if type(value) not in _VALUE_TYPES:
                    raise DecodeError(f"journal op: unsupported value type {type(value).__name__}")
        return cls(table=table, kind=kind, columns=tuple(columns), rows=tuple(rows))


def _ops(d: dict, what: str) -> tuple[JournalOp, ...]:
    return tuple(JournalOp.from_dict(op) for op in _get(d, "ops", list, what, []))


@_register
@dataclass(frozen=True, slots=True)
class JournalDelta(Message):
    """Active → standbys: what one loop turn changed in the journal (msgpack, QoS 1).

    `prev_seq`/`prev_epoch` name the delta this one follows: a standby applies it only on top
    of exactly that position, so a missed or foreign delta is noticed, never applied."""

    TYPE: ClassVar[str] = "journal_delta"
    master: str
    epoch: int
    seq: int
    prev_seq: int
    prev_epoch: int
    ops: tuple[JournalOp, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"master": self.master, "epoch": self.epoch, "seq": self.seq,
                "prev_seq": self.prev_seq, "prev_epoch": self.prev_epoch,
                "ops": [op.to_dict() for op in self.ops]}

    @property
    def position(self) -> tuple[int, int]:
        return (self.epoch, self.seq)

    @property
    def previous(self) -> tuple[int, int]:
        return (self.prev_epoch, self.prev_seq)

    @classmethod
    def from_dict(cls, d: dict) -> "JournalDelta":
        w = "journal_delta"
        return cls(master=_get(d, "master", str, w), epoch=_int(d, "epoch", w, lo=1),
                   seq=_int(d, "seq", w, lo=1), prev_seq=_int(d, "prev_seq", w, lo=0),
                   prev_epoch=_int(d, "prev_epoch", w, lo=0), ops=_ops(d, w))


@_register
@dataclass(frozen=True, slots=True)
class ResyncRequest(Message):
    """Standby → active: send me a full copy of your journal (I started late, missed a
    delta, or followed another master)."""

    TYPE: ClassVar[str] = "journal_resync"
    requester: str
    request_id: str
    holder: str
    epoch: int

    def to_dict(self) -> dict[str, Any]:
        return {"requester": self.requester, "request_id": self.request_id,
                "holder": self.holder, "epoch": self.epoch}

    @classmethod
    def from_dict(cls, d: dict) -> "ResyncRequest":
        w = "journal_resync"
        return cls(requester=_get(d, "requester", str, w), request_id=_get(d, "request_id", str, w),
                   holder=_get(d, "holder", str, w), epoch=_int(d, "epoch", w, lo=0))


@_register
@dataclass(frozen=True, slots=True)
class JournalDump(Message):
    """Active → one standby: chunk `index` of a full copy of the journal as it was at
    (`seq_epoch`, `seq`); the chunk with `last` set ends it."""

    TYPE: ClassVar[str] = "journal_dump"
    master: str
    epoch: int
    request_id: str
    index: int
    last: bool
    seq: int
    seq_epoch: int
    ops: tuple[JournalOp, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"master": self.master, "epoch": self.epoch, "request_id": self.request_id,
                "index": self.index, "last": self.last, "seq": self.seq,
                "seq_epoch": self.seq_epoch, "ops": [op.to_dict() for op in self.ops]}

    @property
    def position(self) -> tuple[int, int]:
        return (self.seq_epoch, self.seq)

    @classmethod
    def from_dict(cls, d: dict) -> "JournalDump":
        w = "journal_dump"
        return cls(master=_get(d, "master", str, w), epoch=_int(d, "epoch", w, lo=1),
                   request_id=_get(d, "request_id", str, w), index=_int(d, "index", w, lo=0),
                   last=_get(d, "last", bool, w), seq=_int(d, "seq", w, lo=0),
                   seq_epoch=_int(d, "seq_epoch", w, lo=0), ops=_ops(d, w))
