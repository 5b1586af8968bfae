"""Replicated masters, the parts without a broker: the lease and election rules (the clock is
a parameter, nothing sleeps), the node's fence, the wire messages, and the journal copied
through sqlite change capture into a standby's file that a master then opens as its own."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from core.errors import ConfigError, DecodeError
from core.protocol import decode_message, make_task
from core.replication import (CLAIM, EXPIRED, HELD, JournalDelta, JournalDump, JournalOp, Lease,
                              MasterPresence, ResyncRequest)
from master.journal import Journal
from master.journal_replication import (APPLY, DUPLICATE, GAP, ChangeCapture, JournalReplica,
                                        delta_verdict)
from master.lease import (LOST, WAIT, WON, LeaseTiming, LeaseView, claim_epoch, clock_jumped,
                          election_rank, holder_valid, live_candidates, outranks, settle_verdict)
from master.scheduler import COMPLETED, FAILED, RUNNING, TaskRecord
from node.lease_fence import LeaseFence

TIMING = LeaseTiming(ttl=3.0)


def lease(holder: str, epoch: int, state: str = HELD, position: tuple[int, int] = (0, 0)) -> Lease:
    return Lease(holder=holder, epoch=epoch, state=state, ttl=3.0,
                 journal_epoch=position[0], journal_seq=position[1])


# -- the lease, seen by a standby ---------------------------------------------------------------

def test_a_renewed_lease_never_lapses_and_a_silent_one_lapses_after_ttl() -> None:
    view = LeaseView(ttl=3.0, now=0.0)
    for t in range(0, 20):
        view.observe(lease("a", 1), float(t))
        assert not view.lapsed(t + 2.9)
    assert view.holder == "a"
    assert not view.lapsed(19 + 2.99)
    assert view.lapsed(19 + 3.0)


def test_the_holders_will_ends_the_lease_at_once_for_a_standby_that_has_watched_long() -> None:
    view = LeaseView(ttl=3.0, now=0.0)
    view.observe(lease("a", 1), 10.0)
    assert view.observe(lease("a", 1, EXPIRED), 10.5) == "expired"
    assert view.lapsed(10.5) and view.holder is None
    assert view.observe(lease("a", 1, EXPIRED), 12.0) == "stale"  # the retained copy again
    assert view.lapsed_at() == 10.5


def test_a_standby_that_just_started_or_was_frozen_watches_for_ttl_before_it_may_claim() -> None:
    fresh = LeaseView(ttl=3.0, now=100.0)
    fresh.observe(lease("a", 4, EXPIRED), 100.01)  # a stale retained will, seen on connect
    assert not fresh.lapsed(102.9) and fresh.lapsed(103.0)
    frozen = LeaseView(ttl=3.0, now=0.0)
    frozen.observe(lease("a", 1), 1.0)
    assert frozen.lapsed(50.0)  # what it would conclude right after resuming...
    assert clock_jumped(1.0, 50.0, limit=0.75)
    frozen.restart_watch(50.0)  # ...so it starts watching again instead
    assert not frozen.lapsed(52.9)
    frozen.observe(lease("b", 2), 50.1)  # the backlog shows the new holder
    assert frozen.holder == "b" and not frozen.lapsed(53.0)


def test_older_leases_are_stale_and_newer_holders_replace_the_best() -> None:
    view = LeaseView(ttl=3.0, now=0.0)
    assert view.observe(lease("a", 2), 1.0) == "new_holder"
    assert view.observe(lease("a", 2), 2.0) == "renewal"
    assert view.observe(lease("z", 1), 2.5) == "stale"        # a deposed master's renewal
    assert view.observe(lease("a", 1, EXPIRED), 2.6) == "stale"  # its will, arriving late
    assert view.holder == "a" and not view.lapsed(4.9)
    assert view.observe(lease("b", 3), 3.0) == "new_holder"
    assert view.best == (3, "b") and view.max_epoch == 3


def test_standbys_rank_by_journal_then_id_the_same_way_everywhere() -> None:
    candidates = {"m1": (2, 40), "m2": (2, 41), "m3": (1, 99), "m0": (2, 40)}
    assert [election_rank(m, candidates) for m in ("m2", "m0", "m1", "m3")] == [0, 1, 2, 3]
    presences = [("m1", "standby", (1, 1)), ("m2", "dead", (9, 9)), ("m3", "active", (2, 2)),
                 ("m4", "syncing", (0, 5)), ("me", "standby", (1, 1)), ("m5", "offline", (8, 8))]
    assert live_candidates(presences, me="me") == {"m1": (1, 1), "m4": (0, 5)}


def test_the_first_ranked_claims_at_once_the_next_one_later_and_not_while_a_claim_settles() -> None:
    view = LeaseView(ttl=3.0, now=0.0)
    view.observe(lease("a", 5), 10.0)
    view.observe(lease("a", 5, EXPIRED), 11.0)
    others = {"b": (5, 10)}
    assert claim_epoch(view, now=11.0, me="c", position=(5, 12), candidates=others,
                       timing=TIMING) == 6                                      # rank 0
    assert claim_epoch(view, now=11.0, me="b", position=(5, 10),
                       candidates={"c": (5, 12)}, timing=TIMING) is None        # rank 1 waits
    assert claim_epoch(view, now=11.0 + TIMING.rank_step, me="b", position=(5, 10),
                       candidates={"c": (5, 12)}, timing=TIMING) == 6
    view.observe(lease("c", 6, CLAIM, (5, 12)), 11.1)                           # c claimed
    assert claim_epoch(view, now=11.6, me="b", position=(5, 10),
                       candidates={"c": (5, 12)}, timing=TIMING) is None
    late = 11.1 + TIMING.settle + TIMING.claim_grace                           # c never won
    assert claim_epoch(view, now=late, me="b", position=(5, 10),
                       candidates={"c": (5, 12)}, timing=TIMING) == 7
    assert claim_epoch(view, now=9.0, me="b", position=(0, 0), candidates={},
                       timing=TIMING, known_epoch=40) is None                  # still held
    held = LeaseView(ttl=3.0, now=0.0)
    assert claim_epoch(held, now=3.0, me="b", position=(0, 0), candidates={}, timing=TIMING,
                       known_epoch=40) == 41  # never below an epoch this master knew before


def test_a_claim_wins_only_after_settling_unopposed_and_echoed() -> None:
    view = LeaseView(ttl=3.0, now=0.0)
    view.observe(lease("a", 1), 0.0)
    view.observe(lease("a", 1, EXPIRED), 5.0)
    view.observe(lease("b", 2, CLAIM, (1, 7)), 5.0)
    args = dict(me="b", epoch=2, position=(1, 7), claimed_at=5.0, timing=TIMING)
    assert settle_verdict(view, now=5.5, echoed=True, **args) == WAIT
    assert settle_verdict(view, now=5.0 + TIMING.settle, echoed=True, **args) == WON
    assert settle_verdict(view, now=5.0 + TIMING.settle, echoed=False, **args) == WAIT
    assert settle_verdict(view, now=5.0 + TIMING.settle + TIMING.claim_grace, echoed=False,
                          **args) == LOST
    alive = LeaseView(ttl=3.0, now=0.0)
    alive.observe(lease("a", 1), 0.0)
    alive.observe(lease("a", 1), 5.8)  # the holder renewed during the settle: it lives
    assert settle_verdict(alive, now=7.0, echoed=True, **args) == LOST
    rival = LeaseView(ttl=3.0, now=0.0)
    rival.observe(lease("c", 2, CLAIM, (1, 9)), 5.2)  # a more complete journal wins
    assert settle_verdict(rival, now=7.0, echoed=True, **args) == LOST
    weaker = LeaseView(ttl=3.0, now=0.0)
    weaker.observe(lease("b", 2, CLAIM, (1, 7)), 5.0)
    weaker.observe(lease("c", 2, CLAIM, (1, 3)), 5.2)
    assert settle_verdict(weaker, now=7.0, echoed=True, **args) == WON
    assert settle_verdict(weaker, now=7.0, echoed=True, **{**args, "me": "c", "position": (1, 3),
                                                            "claimed_at": 5.2}) == LOST


def test_the_holder_acts_only_within_ttl_of_its_last_confirmed_renewal() -> None:
    assert holder_valid(now=12.9, confirmed_sent_at=10.0, ttl=3.0)
    assert not holder_valid(now=13.0, confirmed_sent_at=10.0, ttl=3.0)
    assert not holder_valid(now=0.0, confirmed_sent_at=None, ttl=3.0)
    assert outranks(lease("b", 4), (3, "z")) and outranks(lease("b", 3, EXPIRED), (3, "a"))
    assert not outranks(lease("b", 9, CLAIM), (3, "a"))  # a claim is not a lease
    assert not outranks(lease("a", 3), (3, "a"))


def test_lease_timings_are_checked() -> None:
    assert TIMING.renew_every == 1.0 and TIMING.settle == 1.5
    with pytest.raises(ConfigError):
        LeaseTiming(ttl=0)
    with pytest.raises(ConfigError):
        LeaseTiming(ttl=3.0, settle=0.5)  # must outlast a renewal interval


# -- the node's fence ----------------------------------------------------------------------------

def test_a_node_takes_work_only_from_the_lease_holder_and_no_batch_moves_that() -> None:
    fence = LeaseFence()
    assert fence.admits(0, "master") and fence.admits(0, "other")  # unreplicated: as before
    assert fence.admits(7, "elsewhere") is False   # a stray batch with an epoch...
    assert fence.admits(0, "master")               # ...does not blind the node
    fence.observe(lease("m1", 1).encode())
    assert not fence.admits(0, "master") and not fence.admits_control(0)
    assert fence.admits(1, "m1") and not fence.admits(1, "m0") and not fence.admits(2, "m1")
    fence.observe(lease("m9", 7, CLAIM).encode())  # a claim is not a lease yet
    assert fence.admits(1, "m1")
    assert not fence.admits(2, "m2")   # a new holder's batch before its lease: sent again later
    fence.observe(lease("m2", 2).encode())
    assert fence.admits(2, "m2")
    assert not fence.admits(1, "m1")   # the old holder, resumed after a freeze
    fence.observe(lease("m1", 1).encode())  # its renewal, sent on resuming: changes nothing
    assert fence.admits(2, "m2") and not fence.admits(1, "m1")
    assert fence.admits_control(2) and fence.admits_control(3) and not fence.admits_control(1)
    fence.observe(lease("m1", 1, EXPIRED).encode())  # an older will changes nothing either
    assert not fence.admits(0, "master") and fence.epoch == 2
    fence.observe(b"")
    fence.observe(b"{garbage")
    assert fence.holder == "m2"
    fence.observe(lease("m2", 2, EXPIRED).encode())  # the replicated masters are gone:
    assert fence.admits(0, "master") and fence.admits_control(0)  # a master of its own works
    assert not fence.admits(2, "m2") and not fence.admits(1, "m1")


# -- wire messages -------------------------------------------------------------------------------

def test_replication_messages_round_trip_and_reject_bad_shapes() -> None:
    ops = (JournalOp("tasks", "upsert", ("rowid", "id", "call"), ([1, "t", b"\x93\x01"],)),)
    for message in (lease("m1", 3, HELD, (2, 9)),
                    MasterPresence(master_id="m1", role="standby", journal_seq=4),
                    JournalDelta(master="m1", epoch=2, seq=5, prev_seq=4, prev_epoch=2, ops=ops),
                    ResyncRequest(requester="m2", request_id="r", holder="m1", epoch=2),
                    JournalDump(master="m1", epoch=2, request_id="r", index=0, last=True, seq=5,
                                seq_epoch=2, ops=ops)):
        assert decode_message(message.encode()) == message
    assert lease("m1", 1).encode().startswith(b"{")  # people read the lease in MQTT Explorer
    bad = [{"type": "lease", "v": 1, "holder": "m", "epoch": 0, "state": "held"},
           {"type": "lease", "v": 1, "holder": "m", "epoch": 1, "state": "mine"},
           {"type": "master_presence", "v": 1, "master_id": "m", "role": "king"},
           {"type": "journal_delta", "v": 1, "master": "m", "epoch": 1, "seq": 1, "prev_seq": 0,
            "prev_epoch": 0, "ops": [{"table": "sqlite_master", "kind": "upsert",
                                      "columns": ["rowid"], "rows": [[1]]}]},
           {"type": "journal_delta", "v": 1, "master": "m", "epoch": 1, "seq": 1, "prev_seq": 0,
            "prev_epoch": 0, "ops": [{"table": "tasks", "kind": "upsert",
                                      "columns": ["rowid", "id; DROP TABLE tasks"],
                                      "rows": [[1, "x"]]}]},
           {"type": "journal_delta", "v": 1, "master": "m", "epoch": 1, "seq": 1, "prev_seq": 0,
            "prev_epoch": 0, "ops": [{"table": "tasks", "kind": "upsert",
                                      "columns": ["rowid", "id"], "rows": [[1, {"a": 1}]]}]}]
    import msgpack
    for d in bad:
        with pytest.raises(DecodeError):
            decode_message(msgpack.packb(d))


# -- the journal, copied -------------------------------------------------------------------------

def records(n: int, start: int = 0) -> list[TaskRecord]:
    return [TaskRecord(spec=make_task("echo", [i, "x" * 50], priority=1 + i % 10,
                                      task_id=f"task-{i:05d}"), client="c1")
            for i in range(start, start + n)]


def rows(path: Path) -> list[tuple]:
    db = sqlite3.connect(str(path))
    try:
        return db.execute("SELECT rowid, * FROM tasks ORDER BY rowid").fetchall()
    finally:
        db.close()


def ship(capture: ChangeCapture, replica: JournalReplica, epoch: int) -> list[JournalDelta]:
    deltas = [JournalDelta(master="m1", epoch=epoch, seq=new[1], prev_seq=prev[1],
                           prev_epoch=prev[0], ops=tuple(ops))
              for prev, new, ops in capture.drain(epoch=epoch)]
    for delta in deltas:
        assert replica.apply(decode_message(delta.encode())) == APPLY
    return deltas


def test_every_committed_write_reaches_the_standby_as_rows_a_master_then_restores(tmp_path: Path) -> None:
    active_path, standby_path = tmp_path / "a" / "master.sqlite3", tmp_path / "b" / "master.sqlite3"
    journal = Journal(active_path)
    capture = ChangeCapture(active_path, epoch=1)
    capture.max_bytes = 8 * 1024  # small messages: one turn spans several deltas
    replica = JournalReplica(standby_path)
    assert capture.drain(epoch=1) == []  # nothing changed: nothing to send

    batch = records(300)
    journal.submitted(batch)
    journal.commit()
    deltas = ship(capture, replica, 1)
    assert len(deltas) > 1 and deltas[0].previous == (0, 0)
    assert [d.seq for d in deltas] == list(range(1, len(deltas) + 1))

    for r in batch[:100]:
        r.node, r.state = "n1", RUNNING
    journal.dispatched(batch[:100])
    for r in batch[:40]:
        r.state = COMPLETED
    journal.finished([(r, {"value": r.id, "big": 2 ** 70}) for r in batch[:40]])
    batch[40].state, batch[40].errors = FAILED, [{"kind": "exception", "message": "boom"}]
    journal.finished([(batch[40], None)])
    journal.submitted(records(5, start=300))
    journal.set_meta("job", "primes")
    journal.commit()
    ship(capture, replica, 1)
    assert rows(standby_path) == rows(active_path)
    assert capture.position == replica.position

    replica.close()
    capture.close()
    journal.close()
    taken_over = Journal(standby_path)  # what the standby's master opens on take-over
    unfinished = taken_over.unfinished()
    assert len(unfinished) == 305 - 41
    assert [r.id for r, running in unfinished if running] == [r.id for r in batch[41:100]]
    outcome = taken_over.outcomes(["task-00007", "task-00040"])
    assert outcome["task-00007"].value == {"value": "task-00007", "big": 2 ** 70}
    assert outcome["task-00040"].state == "failed"
    assert taken_over.meta("job") == "primes"
    taken_over.close()


def test_a_standby_applies_only_the_delta_that_follows_its_position(tmp_path: Path) -> None:
    assert delta_verdict((1, 5), (1, 5), (1, 6)) == APPLY
    assert delta_verdict((1, 5), (1, 3), (1, 4)) == DUPLICATE
    assert delta_verdict((1, 5), (1, 6), (1, 7)) == GAP            # one was missed
    assert delta_verdict((1, 5), (1, 5), (2, 6)) == APPLY          # a new master built on it
    assert delta_verdict((1, 6), (1, 5), (2, 6)) == GAP            # it lacks what we have
    journal = Journal(tmp_path / "a.sqlite3")
    capture = ChangeCapture(tmp_path / "a.sqlite3", epoch=1)
    replica = JournalReplica(tmp_path / "b.sqlite3")
    journal.submitted(records(3))
    journal.commit()
    (first,) = [JournalDelta(master="m1", epoch=1, seq=n[1], prev_seq=p[1], prev_epoch=p[0],
                             ops=tuple(o)) for p, n, o in capture.drain(epoch=1)]
    batch = records(1, start=3)
    journal.submitted(batch)
    journal.commit()
    (second,) = [JournalDelta(master="m1", epoch=1, seq=n[1], prev_seq=p[1], prev_epoch=p[0],
                              ops=tuple(o)) for p, n, o in capture.drain(epoch=1)]
    assert replica.apply(second) == GAP and replica.position == (0, 0)
    assert replica.apply(first) == APPLY and replica.apply(first) == DUPLICATE
    assert replica.apply(second) == APPLY and len(rows(tmp_path / "b.sqlite3")) == 4
    foreign = JournalDelta(master="m9", epoch=1, seq=3, prev_seq=2, prev_epoch=1, ops=(
        JournalOp("tasks", "update", ("rowid", "state"), ([999, 2],)),))
    assert replica.apply(foreign) == GAP and replica.position == (1, 2)  # nothing half-applied
    unknown = JournalDelta(master="m1", epoch=1, seq=3, prev_seq=2, prev_epoch=1, ops=(
        JournalOp("tasks", "upsert", ("rowid", "not_a_column"), ([5, 1],)),))
    assert replica.apply(unknown) == GAP
    for closing in (replica, capture, journal):
        closing.close()


def test_a_full_copy_is_the_journal_at_one_position_while_writes_go_on(tmp_path: Path) -> None:
    active_path = tmp_path / "a.sqlite3"
    journal = Journal(active_path)
    capture = ChangeCapture(active_path, epoch=3)
    journal.submitted(records(500))
    journal.commit()
    capture.drain(epoch=3)
    snapshot = capture.snapshot()
    expected = rows(active_path)
    journal.submitted(records(10, start=500))  # the master goes on meanwhile
    journal.commit()
    later = capture.drain(epoch=3)
    replica = JournalReplica(tmp_path / "b.sqlite3")
    assert rows(tmp_path / "b.sqlite3") == []
    replica.begin_copy()
    chunks = list(snapshot.chunks(max_bytes=16 * 1024))
    assert len(chunks) > 3
    for ops in chunks:
        replica.copy_chunk(tuple(ops))
    replica.finish_copy(snapshot.position)
    snapshot.close()
    assert rows(tmp_path / "b.sqlite3") == expected
    for prev, new, ops in later:  # the deltas after the copy's position follow it
        assert replica.apply(JournalDelta(master="m1", epoch=3, seq=new[1], prev_seq=prev[1],
                                          prev_epoch=prev[0], ops=tuple(ops))) == APPLY
    assert len(rows(tmp_path / "b.sqlite3")) == 510
    replica.begin_copy()  # an aborted copy changes nothing
    replica.copy_chunk(tuple(chunks[0]))
    replica.abort_copy()
    assert len(rows(tmp_path / "b.sqlite3")) == 510
    for closing in (replica, capture, journal):
        closing.close()
