"""Replicated masters: the active one holds the lease; standbys copy its journal over MQTT
and take over when it goes, with nothing it acknowledged lost and no two dispatching at once.

Each `master-node serve --replica` process is one `ReplicatedMaster`:

    syncing   asks the lease holder for a full copy of its journal, then follows it
    standby   applies each journal delta in order and confirms it (its presence is the ack)
    claiming  the lease lapsed and this standby ranks first: claims the next epoch, settles
    active    holds the lease (renewed by a thread of its own) and runs an ordinary
              MasterNodeTransport on its copy of the journal, stamped with its epoch

and back to syncing when it finds it was replaced: its own clock shows the lease lapsed, its
lease connection dropped, or a newer lease appeared (see master.lease for the rules).

The active master's loop turns pass its hooks (master.hooks: before_dispatch and
after_commit): after each commit the turn's journal changes go to the standbys, and nothing
of the turn (task batches, acknowledgements, outcomes, status) is published before every
standby in sync confirmed them (bounded: one silent for `ack_timeout` is marked lagging and
no longer waited for until it catches up), and only while the lease is valid. On take-over
the new master restores its journal (in-flight tasks first), asks the nodes what they hold
and leaves those tasks in flight where they are, then dispatches.

`ReplicatedMaster` owns the role and moves between roles; the work of each is a
collaborator's: master.standby (the journal copy), master.lease_holder (the lease session,
its will the lease `expired`: claim, renewals, deposal), master.replica_gate (the active
master's hooks), master.takeover (the transport and the nodes' reconciliation) and
master.replica_session (the replication session: presence with will `dead`, deltas, acks,
copies, the lease and node statuses as this master sees them).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

from core.protocol import MasterStatus
from core.topics import Topics, validate_id
from master.journal_replication import journal_path
from master.lease import (LOST, WON, LeaseView, Position, claim_epoch, clock_jumped,
                          live_candidates, settle_verdict)
from master.lease_holder import LeaseHolder
from master.replica_gate import ActiveGate
from master.replica_options import ReplicaOptions, check_replica_options
from master.replica_session import ReplicationSession
from master.standby import StandbyReplicator
from master.takeover import active_transport, reconcile
from master.transport import MasterNodeTransport

__all__ = ["ReplicaOptions", "ReplicatedMaster", "check_replica_options"]

log = logging.getLogger(__name__)


class ReplicatedMaster:
    """A master that is active while it holds the lease, and a standby otherwise: the role
    and the moves between roles. What each role does is a collaborator's: `standby` (the
    journal copy), `holder` (the lease connection), `gate` (the active master's hooks)."""

    rejected = 0  # malformed messages on the lease topic, logged and counted

    def __init__(self, options: ReplicaOptions, *,
                 on_active: Callable[[MasterNodeTransport], None] | None = None,
                 on_inactive: Callable[[MasterNodeTransport], None] | None = None,
                 on_standby: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.options = options
        self.master_id = validate_id(options.master_id, what="master id")
        self.topics = Topics(options.root)
        self.timing = options.timing
        self.path = journal_path(options.state_dir)
        self.clock = clock
        self._on_active = on_active
        self._on_inactive = on_inactive
        self._on_standby = on_standby
        # shared with the collaborators
        self.lock = threading.RLock()
        self.acks = threading.Condition(self.lock)
        self.stopping = threading.Event()
        self.role = "syncing"
        self.epoch = 0
        self.view = LeaseView(ttl=self.timing.ttl, now=clock())
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._standby_announced = False
        self._transport: MasterNodeTransport | None = None
        self.standby = StandbyReplicator(self)
        self.holder = LeaseHolder(self)
        self.gate = ActiveGate(self)
        self.replication = ReplicationSession(
            self, on_delta=lambda p: self._work.put(("delta", p)),
            on_copy=lambda p: self._work.put(("copy", p)))
        self.session = self.replication.mqtt

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, *, timeout: float = 10.0) -> "ReplicatedMaster":
        """Open the journal copy, connect, and begin as a standby."""
        self.epoch = self.standby.open().epoch
        self.session.start(timeout=timeout)
        self.publish_presence()
        self._thread = threading.Thread(target=self._run, name=f"{self.master_id}-replica",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, *, timeout: float = 10.0) -> None:
        """Leave cleanly: an active master finishes its turn, hands its last changes to the
        standbys and releases the lease, so one of them takes over at once."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.role == "active":
            self._release()
        elif self.role == "claiming":
            self._abandon_claim("stopping")
        self.standby.close()
        self.role = "offline"
        self.replication.leave()

    @property
    def transport(self) -> MasterNodeTransport | None:
        """The running master while this one is active."""
        return self._transport

    @property
    def position(self) -> Position:
        capture = self.gate.capture
        return capture.position if capture is not None else self.standby.position

    def wake(self) -> None:
        """Have the replica thread look at the state again now."""
        self._work.put(("wake", None))

    # -- the replica thread: one state machine ---------------------------------------------------

    def _run(self) -> None:
        last_tick = self.clock()
        while not self.stopping.is_set():
            try:
                kind, payload = self._work.get(timeout=0.05)
            except queue.Empty:
                kind, payload = "wake", None
            now = self.clock()
            if clock_jumped(last_tick, now, limit=max(0.5, self.timing.ttl / 4)) \
                    and self.role != "active":
                log.warning("this master was frozen for %.1fs: watching the lease afresh",
                            now - last_tick)
                with self.lock:
                    self.view.restart_watch(now)
                if self.role == "claiming":
                    self._abandon_claim("frozen while claiming")
            try:
                if kind == "delta":
                    self.standby.on_delta(payload)
                elif kind == "copy":
                    self.standby.on_copy(payload)
                self._tick(self.clock())
            except Exception:  # the replica must survive a bug in one message's handling
                log.exception("replica step failed")
            last_tick = self.clock()

    def _tick(self, now: float) -> None:
        role = self.role
        if role == "active":
            if self.holder.deposed.is_set():
                self._step_down(self.holder.depose_reason or "replaced")
            return
        if role == "claiming":
            self._settle(now)
            return
        replica = self.standby.replica
        if replica is None:
            return
        with self.lock:
            replica.note_epoch(self.view.max_epoch)
            lapsed = self.view.lapsed(now)
            holder = self.view.holder
            candidates = live_candidates(
                ((p.master_id, p.role, p.position)
                 for p in self.replication.presence.values()),
                me=self.master_id)
            epoch = claim_epoch(self.view, now=now, me=self.master_id,
                                position=replica.position, candidates=candidates,
                                timing=self.timing, known_epoch=replica.epoch)
        if not self._standby_announced and (role == "standby" or lapsed):
            self._standby_announced = True
            if self._on_standby is not None:
                self._on_standby()
        if epoch is not None:
            self._start_claim(epoch)
            return
        if self.standby.need_copy and holder and holder != self.master_id and not lapsed:
            self.standby.ask_for_copy(holder, now)

    # -- standby -> claiming -> active, or back ---------------------------------------------------

    def _start_claim(self, epoch: int) -> None:
        self.standby.abort_copy()
        position = self.standby.position
        if not self.holder.open(epoch, position):
            return
        log.info("the lease lapsed (last holder %r): claiming epoch %d with journal %s",
                 self.view.best[1], epoch, position)
        self.role = "claiming"
        self.publish_presence()
        self.holder.send_claim()

    def _settle(self, now: float) -> None:
        claim = self.holder.claim
        if claim is None:
            self._abandon_claim("the lease connection was lost")
            return
        epoch, position, claimed_at = claim
        with self.lock:
            verdict = settle_verdict(self.view, now=now, me=self.master_id, epoch=epoch,
                                     position=position, claimed_at=claimed_at,
                                     echoed=self.holder.claim_echoed, timing=self.timing)
        if verdict == WON:
            self._activate()
        elif verdict == LOST:
            self._abandon_claim(f"epoch {epoch} went to another master, or its holder is alive")

    def _abandon_claim(self, reason: str) -> None:
        log.info("claim withdrawn: %s", reason)
        self.holder.claim = None
        self.holder.close()
        self.role = "syncing" if self.standby.need_copy else "standby"
        self.publish_presence()

    def _activate(self) -> None:
        replica = self.standby.replica
        assert self.holder.claim is not None and replica is not None
        epoch, position, claimed_at = self.holder.claim
        self.epoch = epoch
        confirmed = self.holder.confirm(position)
        with self.lock:
            lost = settle_verdict(self.view, now=self.clock(), me=self.master_id, epoch=epoch,
                                  position=position, claimed_at=claimed_at, echoed=True,
                                  timing=self.timing) == LOST
        if not confirmed or lost:
            self.holder.withdraw(epoch, position)
            self.epoch = replica.epoch
            self._abandon_claim("the lease was not confirmed" if not confirmed else
                                "another master won at the last moment")
            return
        self.role = "active"
        self.holder.claim = None
        log.info("master %s is active at epoch %d (journal %s)", self.master_id, epoch, position)
        self.holder.start_renewing()
        try:
            self.session.publish(self.topics.master_status,
                                 MasterStatus(master_id=self.master_id, status="starting",
                                              epoch=epoch, ts=round(time.time(), 3)).encode(),
                                 retain=True)
            replica.note_epoch(epoch)
            self.standby.close()
            self.gate.open(epoch, self.replication.presence)
            transport = active_transport(self.options, master_id=self.master_id, epoch=epoch)
            transport.add_hooks(self.gate)
            self.gate.dispatching = False
            self.replication.follow_journal(False)
            self._transport = transport
            transport.start()
            self.publish_presence()
            reconcile(transport, expected=self.replication.live_nodes(),
                      timeout=self.options.reconcile_timeout, clock=self.clock,
                      stopping=self.stopping, deposed=self.holder.deposed)
            self.gate.dispatching = True
        except Exception as e:
            log.exception("taking over failed")
            self.holder.depose(f"taking over failed: {e}")
            self._step_down(self.holder.depose_reason)
            return
        if self._on_active is not None:
            self._on_active(transport)

    def _step_down(self, reason: str) -> None:
        """Replaced (or failed to take over): stop acting, publish nothing more, and become a
        standby that copies the new holder's journal (ours may hold unconfirmed changes)."""
        log.warning("master %s steps down: %s", self.master_id, reason)
        self.gate.dispatching = False
        self.holder.deposed.set()
        self.holder.stop_renewing()
        self._stop_transport(quiet=True)
        self.gate.close()
        self.holder.close()
        self.holder.claim = None
        self.replication.follow_journal(True)
        replica = self.standby.open(need_copy=True)
        with self.acks:
            self.view.restart_watch(self.clock())
        self.gate.forget_standbys()
        self.role = "syncing"
        self.epoch = replica.epoch
        self.holder.deposed.clear()
        self.publish_presence()

    def _release(self) -> None:
        """Clean stop of the active master: last changes out, lease released."""
        self._stop_transport(quiet=False)
        self.gate.ship_last()
        self.gate.dispatching = False
        self.holder.deposed.set()
        self.holder.stop_renewing()
        self.gate.close()
        self.holder.withdraw(self.epoch, self.position)
        self.holder.close()
        self.standby.open()

    def _stop_transport(self, *, quiet: bool) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            if self._on_inactive is not None:
                self._on_inactive(transport)
            transport.stop(quiet=quiet)

    def publish_presence(self) -> None:
        """This master's retained presence: its role and journal position (a standby's ack)."""
        self.replication.publish_presence()
