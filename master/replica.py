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

Connections: the replication session (presence with will `dead`, deltas, acks, copies, the
lease and node statuses as seen by this master), the lease session of a claiming or active
master (its will: the lease `expired`), and the transport's own.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from core.errors import ConfigError, DecodeError, FabricError
from core.mqtt import MqttSession, TlsSettings, Will
from core.protocol import MasterStatus, NodeReport, NodeStatus, decode_message
from core.replication import (CLAIM, EXPIRED, HELD, JournalDelta, JournalDump, Lease,
                              MasterPresence, ResyncRequest)
from core.topics import DEFAULT_ROOT, Topics, validate_id
from core.url import BrokerUrl
from master.journal_replication import (APPLY, DUPLICATE, ChangeCapture, JournalReplica,
                                        JournalSnapshot, ReplicationError, journal_path)
from master.rate_limit import RateLimit
from master.retention import DEFAULT_FORGET_NODES_AFTER, DEFAULT_RESULT_TTL
from master.retry_policy import RetryPolicy
from master.lease import (LOST, WON, LeaseTiming, LeaseView, Position, claim_epoch,
                          clock_jumped, holder_valid, live_candidates, outranks, settle_verdict)
from master.hooks import MasterHooks
from master.transport import MasterNodeTransport

__all__ = ["ReplicaOptions", "ReplicatedMaster", "check_replica_options"]

log = logging.getLogger(__name__)

_LIVE_NODE = ("connected", "ready", "busy")
_COPY_SILENCE = 5.0        # a copy that stalls this long is asked for again
_MAX_BUFFERED = 10_000     # deltas kept while a copy arrives
_MAX_COPIES = 2            # copies sent at once by the active master


@dataclass(frozen=True)
class ReplicaOptions:
    """One replicated master: where it talks, where its journal copy lives, its timings."""

    broker_url: BrokerUrl
    state_dir: Path
    master_id: str = "master"
    root: str = DEFAULT_ROOT
    timing: LeaseTiming = field(default_factory=LeaseTiming)
    node_timeout: float = 3.0
    max_attempts: int = 3
    max_queued: int = 1_000_000
    keepalive: int = 5
    reconcile_timeout: float = 1.5   # for nodes to say what they hold after a take-over
    tls: TlsSettings | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)  # the default for tasks
    rate_limits: tuple[RateLimit, ...] = ()
    result_ttl: float = DEFAULT_RESULT_TTL
    forget_nodes_after: float = DEFAULT_FORGET_NODES_AFTER


class ReplicatedMaster:
    """A master that is active while it holds the lease, and a standby otherwise."""

    def __init__(self, options: ReplicaOptions, *,
                 on_active: Callable[[MasterNodeTransport], None] | None = None,
                 on_inactive: Callable[[MasterNodeTransport], None] | None = None,
                 on_standby: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.options = options
        self.master_id = validate_id(options.master_id, what="master id")
        self.topics = Topics(options.root)
        self.timing = options.timing
        self._path = journal_path(options.state_dir)
        self._on_active = on_active
        self._on_inactive = on_inactive
        self._on_standby = on_standby
        self._clock = clock
        self._lock = threading.RLock()
        self._acks = threading.Condition(self._lock)
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.role = "syncing"
        self.epoch = 0
        self._view = LeaseView(ttl=self.timing.ttl, now=clock())
        self._presence: dict[str, MasterPresence] = {}
        self._nodes: dict[str, str] = {}
        self._standby_announced = False
        # standby
        self._replica: JournalReplica | None = None
        self._need_copy = True
        self._copy_request: str | None = None
        self._copy_next = 0
        self._copy_deadline = 0.0
        self._buffer: list[JournalDelta] = []
        # claiming
        self._claim: tuple[int, Position, float] | None = None
        self._claim_echoed = False
        self._lease_session: MqttSession | None = None
        # active
        self._transport: MasterNodeTransport | None = None
        self._capture: ChangeCapture | None = None
        self._base: Position = (0, 0)
        self._dispatching = False
        self._deposed = threading.Event()
        self._depose_reason = ""
        self._renew_now = threading.Event()
        self._renewer: threading.Thread | None = None
        self._renewal_seq = 0
        self._renewals: dict[int, float] = {}
        self._confirmed_sent_at: float | None = None
        self._in_sync: set[str] = set()
        self._lagging: dict[str, Position] = {}
        self._claimants: set[str] = set()          # standbys claiming while we are active
        self._unconfirmed: Position | None = None  # shipped, not yet confirmed by all in sync
        self._acked: dict[str, Position] = {}
        self._resyncs: list[ResyncRequest] = []
        self._copies: list[threading.Thread] = []
        self._session = self._replication_session()

    # -- lifecycle -------------------------------------------------------------------------------

    rejected = 0  # malformed messages on the lease topic, logged and counted

    def start(self, *, timeout: float = 10.0) -> "ReplicatedMaster":
        """Open the journal copy, connect, and begin as a standby."""
        self._replica = JournalReplica(self._path)
        self.epoch = self._replica.epoch
        self._session.start(timeout=timeout)
        self._publish_presence()
        self._thread = threading.Thread(target=self._run, name=f"{self.master_id}-replica",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, *, timeout: float = 10.0) -> None:
        """Leave cleanly: an active master finishes its turn, hands its last changes to the
        standbys and releases the lease, so one of them takes over at once."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._work.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout)
        if self.role == "active":
            self._release()
        elif self.role == "claiming":
            self._abandon_claim("stopping")
        if self._replica is not None:
            self._replica.close()
            self._replica = None
        self.role = "offline"
        try:
            self._session.publish_and_wait(self.topics.master_presence(self.master_id),
                                           self._presence_payload("offline"), retain=True,
                                           timeout=2.0)
        except FabricError:
            pass
        self._session.stop(timeout=2.0)

    @property
    def transport(self) -> MasterNodeTransport | None:
        """The running master while this one is active."""
        return self._transport

    @property
    def position(self) -> Position:
        if self._capture is not None:
            return self._capture.position
        return self._replica.position if self._replica is not None else (0, 0)

    # -- the replication session (network thread) ------------------------------------------------

    def _replication_session(self) -> MqttSession:
        topics = self.topics
        session = MqttSession(
            broker=self.options.broker_url, keepalive=self.options.keepalive, tls=self.options.tls,
            client_id=f"{self.master_id}-replica-{uuid.uuid4().hex[:6]}",
            will=Will(topics.master_presence(self.master_id),
                      MasterPresence(master_id=self.master_id, role="dead").encode()))
        session.subscribe(topics.master_lease, self._on_lease)
        session.subscribe(topics.all_master_presence, self._on_presence)
        session.subscribe(topics.master_journal, lambda _t, p: self._work.put(("delta", p)))
        session.subscribe(topics.master_dump(self.master_id),
                          lambda _t, p: self._work.put(("copy", p)))
        session.subscribe(topics.master_resync, self._on_resync)
        session.subscribe(topics.all_node_status, self._on_node_status)
        session.on_connect(self._on_connected)
        return session

    def _on_connected(self, _session_present: bool) -> None:
        with self._lock:
            self._view.restart_watch(self._clock())  # what happened meanwhile is unknown
        self._publish_presence()

    def _on_lease(self, _topic: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            lease = Lease.decode(payload)
        except DecodeError as e:
            self.rejected += 1
            transport = self._transport
            if transport is not None:  # the active master's own count, in its status
                transport.rejected += 1
            log.warning("rejected a malformed lease (%d so far): %s", self.rejected, e)
            return
        with self._lock:
            event = self._view.observe(lease, self._clock())
            active = self.role == "active"
        if lease.holder == self.master_id:
            return
        if active and outranks(lease, (self.epoch, self.master_id)):
            self._depose(f"{lease.holder} holds the lease at epoch {lease.epoch}")
        elif active and event == "claim":
            self._renew_now.set()  # show the claimant this lease is alive
        elif event in ("new_holder", "expired"):
            log.info("lease: %s at epoch %d is %s", lease.holder, lease.epoch, lease.state)
        self._work.put(("wake", None))

    def _on_presence(self, topic: str, payload: bytes) -> None:
        name = self.topics.level(topic, 1)
        if name is None or name == self.master_id:
            return
        if not payload:
            with self._acks:
                self._presence.pop(name, None)
                self._in_sync.discard(name)
            return
        try:
            presence = MasterPresence.decode(payload)
        except DecodeError as e:
            log.warning("ignored malformed presence on %s: %s", topic, e)
            return
        if presence.master_id != name:
            return
        with self._acks:
            self._presence[name] = presence
            if self.role == "active":
                self._note_ack(name, presence)
                self._acks.notify_all()

    def _note_ack(self, name: str, presence: MasterPresence) -> None:
        """A standby's presence while we are active: its ack, and whether it is in sync."""
        position = presence.position
        if presence.role == "claiming":  # it thinks our lease lapsed: it must have it all
            self._claimants.add(name)
            self._acked[name] = position
            return
        self._claimants.discard(name)
        follows = presence.role == "standby" and (position[0] == self.epoch or position == self._base)
        if not follows:
            self._in_sync.discard(name)
            return
        self._acked[name] = position
        mark = self._lagging.get(name)
        if name not in self._in_sync and (mark is None or position >= mark):
            self._lagging.pop(name, None)
            self._in_sync.add(name)
            log.info("standby %s is in sync (journal %s)", name, position)

    def _on_resync(self, _topic: str, payload: bytes) -> None:
        try:
            request = ResyncRequest.decode(payload)
        except DecodeError as e:
            log.warning("ignored a malformed resync request: %s", e)
            return
        if request.holder != self.master_id:
            return
        with self._lock:  # kept even while still taking over: served once active
            self._resyncs = [r for r in self._resyncs if r.requester != request.requester]
            self._resyncs.append(request)
            self._in_sync.discard(request.requester)

    def _on_node_status(self, topic: str, payload: bytes) -> None:
        node_id = self.topics.level(topic, 1)
        if node_id is None:
            return
        if not payload:
            self._nodes.pop(node_id, None)
            return
        try:
            status = decode_message(payload)
        except DecodeError:
            return
        if isinstance(status, NodeStatus):
            self._nodes[node_id] = status.status

    # -- the replica thread ------------------------------------------------------------------------

    def _run(self) -> None:
        last_tick = self._clock()
        while not self._stop.is_set():
            try:
                kind, payload = self._work.get(timeout=0.05)
            except queue.Empty:
                kind, payload = "wake", None
            now = self._clock()
            if clock_jumped(last_tick, now, limit=max(0.5, self.timing.ttl / 4)) \
                    and self.role != "active":
                log.warning("this master was frozen for %.1fs: watching the lease afresh",
                            now - last_tick)
                with self._lock:
                    self._view.restart_watch(now)
                if self.role == "claiming":
                    self._abandon_claim("frozen while claiming")
            try:
                if kind == "delta":
                    self._on_delta(payload)
                elif kind == "copy":
                    self._on_copy(payload)
                self._tick(self._clock())
            except Exception:  # the replica must survive a bug in one message's handling
                log.exception("replica step failed")
            last_tick = self._clock()

    def _tick(self, now: float) -> None:
        role = self.role
        if role == "active":
            if self._deposed.is_set():
                self._step_down(self._depose_reason or "replaced")
            return
        if role == "claiming":
            self._settle(now)
            return
        replica = self._replica
        if replica is None:
            return
        with self._lock:
            replica.note_epoch(self._view.max_epoch)
            lapsed = self._view.lapsed(now)
            holder = self._view.holder
            candidates = live_candidates(
                ((p.master_id, p.role, p.position) for p in self._presence.values()),
                me=self.master_id)
            epoch = claim_epoch(self._view, now=now, me=self.master_id,
                                position=replica.position, candidates=candidates,
                                timing=self.timing, known_epoch=replica.epoch)
        if not self._standby_announced and (role == "standby" or lapsed):
            self._standby_announced = True
            if self._on_standby is not None:
                self._on_standby()
        if epoch is not None:
            self._start_claim(epoch, now)
            return
        if self._need_copy and holder and holder != self.master_id and not lapsed:
            self._ask_for_copy(holder, now)

    # -- standby: deltas and copies ------------------------------------------------------------------

    def _on_delta(self, payload: bytes) -> None:
        if self.role == "active" or self._replica is None:
            return
        try:
            delta = JournalDelta.decode(payload)
        except DecodeError as e:
            log.warning("ignored a malformed journal delta: %s", e)
            return
        if delta.master == self.master_id:
            return
        with self._lock:
            if (delta.epoch, delta.master) < self._view.best:
                return  # from a master already replaced
        replica = self._replica
        if self._copy_request is not None or replica.in_copy:
            if len(self._buffer) < _MAX_BUFFERED:
                self._buffer.append(delta)
            return
        verdict = replica.apply(delta)
        if verdict == APPLY or verdict == DUPLICATE:
            if self.role == "syncing" and not self._need_copy:
                self.role = "standby"
            self._publish_presence()
        elif not self._need_copy:
            log.warning("journal delta %s does not follow %s: asking %s for a full copy",
                        delta.position, replica.position, delta.master)
            self._need_copy = True
            if self.role != "claiming":  # a claim in progress settles first
                self.role = "syncing"
                self._publish_presence()

    def _ask_for_copy(self, holder: str, now: float) -> None:
        if self._copy_request is not None and now < self._copy_deadline:
            return
        if self._replica is not None:
            self._replica.abort_copy()
        self._buffer.clear()
        self._copy_request = uuid.uuid4().hex[:12]
        self._copy_next = 0
        self._copy_deadline = now + _COPY_SILENCE
        self.role = "syncing"
        log.info("asking %s for a full copy of the journal", holder)
        request = ResyncRequest(requester=self.master_id, request_id=self._copy_request,
                                holder=holder, epoch=self._view.best[0])
        self._session.publish(self.topics.master_resync, request.encode())
        self._publish_presence()

    def _on_copy(self, payload: bytes) -> None:
        replica = self._replica
        if replica is None or self.role in ("active", "claiming"):
            return
        try:
            chunk = JournalDump.decode(payload)
        except DecodeError as e:
            log.warning("ignored a malformed journal copy: %s", e)
            return
        if chunk.request_id != self._copy_request:
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
            self._copy_request = None
            return
        self._copy_next += 1
        self._copy_deadline = self._clock() + _COPY_SILENCE
        if not chunk.last:
            return
        replica.finish_copy(chunk.position)
        self._copy_request = None
        self._need_copy = False
        buffered = sorted(self._buffer, key=lambda d: d.position)
        self._buffer.clear()
        for delta in buffered:
            if delta.position > replica.position and replica.apply(delta) not in (APPLY, DUPLICATE):
                self._need_copy = True
                break
        self.role = "syncing" if self._need_copy else "standby"
        log.info("journal copied from %s: position %s, %s", chunk.master, replica.position,
                 "in sync" if not self._need_copy else "behind again")
        self._publish_presence()

    # -- claiming ----------------------------------------------------------------------------------

    def _start_claim(self, epoch: int, now: float) -> None:
        replica = self._replica
        assert replica is not None
        replica.abort_copy()
        self._copy_request = None
        position = replica.position
        will = Lease(holder=self.master_id, epoch=epoch, state=EXPIRED, ttl=self.timing.ttl,
                     journal_seq=position[1], journal_epoch=position[0])
        session = MqttSession(broker=self.options.broker_url, keepalive=self.options.keepalive,
                              tls=self.options.tls,
                              client_id=f"{self.master_id}-lease-{uuid.uuid4().hex[:6]}",
                              will=Will(self.topics.master_lease, will.encode()))
        session.subscribe(self.topics.master_lease, self._on_own_lease)
        session.on_disconnect(lambda: self._lease_connection_lost(session))
        try:
            session.start(timeout=self.timing.ttl)
        except FabricError as e:
            log.warning("cannot open the lease connection: %s", e)
            return
        log.info("the lease lapsed (last holder %r): claiming epoch %d with journal %s",
                 self._view.best[1], epoch, position)
        self._lease_session = session
        self._claim = (epoch, position, self._clock())
        self._claim_echoed = False
        self.role = "claiming"
        self._publish_presence()
        claim = Lease(holder=self.master_id, epoch=epoch, state=CLAIM, ttl=self.timing.ttl,
                      journal_seq=position[1], journal_epoch=position[0], ts=round(time.time(), 3))
        session.publish(self.topics.master_lease, claim.encode())

    def _settle(self, now: float) -> None:
        if self._claim is None:
            self._abandon_claim("the lease connection was lost")
            return
        epoch, position, claimed_at = self._claim
        with self._lock:
            verdict = settle_verdict(self._view, now=now, me=self.master_id, epoch=epoch,
                                     position=position, claimed_at=claimed_at,
                                     echoed=self._claim_echoed, timing=self.timing)
        if verdict == WON:
            self._activate()
        elif verdict == LOST:
            self._abandon_claim(f"epoch {epoch} went to another master, or its holder is alive")

    def _abandon_claim(self, reason: str) -> None:
        log.info("claim withdrawn: %s", reason)
        self._claim = None
        self._close_lease_session()
        self.role = "syncing" if self._need_copy else "standby"
        self._publish_presence()

    def _on_own_lease(self, _topic: str, payload: bytes) -> None:
        """The lease topic as the lease connection sees it: echoes of our own messages."""
        try:
            lease = Lease.decode(payload) if payload else None
        except DecodeError:
            return
        if lease is None:
            return
        if lease.holder != self.master_id:
            if self.role == "active" and outranks(lease, (self.epoch, self.master_id)):
                self._depose(f"{lease.holder} holds the lease at epoch {lease.epoch}")
            return
        claim = self._claim
        if lease.state == CLAIM and claim is not None and lease.epoch == claim[0]:
            self._claim_echoed = True
        elif lease.state == HELD and lease.epoch == self.epoch:
            with self._lock:
                sent = self._renewals.pop(lease.seq, None)
                if sent is not None:
                    for seq in [s for s in self._renewals if s < lease.seq]:
                        del self._renewals[seq]
                    if self._confirmed_sent_at is None or sent > self._confirmed_sent_at:
                        self._confirmed_sent_at = sent

    def _lease_connection_lost(self, session: MqttSession) -> None:
        if session is not self._lease_session:
            return  # an old lease connection closing
        if self.role == "active":
            self._depose("the lease connection was lost")
        elif self.role == "claiming":
            self._work.put(("wake", None))
            self._claim = None  # _settle() then gives up

    def _withdraw_lease(self, epoch: int, position: Position) -> None:
        """Say at once that our lease of `epoch` is gone (others need not wait for it to lapse)."""
        session = self._lease_session
        if session is None:
            return
        gone = Lease(holder=self.master_id, epoch=epoch, state=EXPIRED, ttl=self.timing.ttl,
                     journal_seq=position[1], journal_epoch=position[0], ts=round(time.time(), 3))
        try:
            session.publish_and_wait(self.topics.master_lease, gone.encode(), retain=True,
                                     timeout=2.0)
        except FabricError:
            pass

    def _close_lease_session(self) -> None:
        session, self._lease_session = self._lease_session, None
        if session is not None:
            session.stop(timeout=2.0)  # a clean disconnect: the will is not sent

    # -- becoming active ---------------------------------------------------------------------------

    def _activate(self) -> None:
        assert self._claim is not None and self._replica is not None
        epoch, position, claimed_at = self._claim
        self.epoch = epoch
        self._deposed.clear()
        self._depose_reason = ""
        with self._lock:
            self._renewals.clear()
            self._renewal_seq = 0
            self._confirmed_sent_at = None
        self._renew(self._clock(), position)
        deadline = self._clock() + self.timing.claim_grace
        while self._confirmed_sent_at is None and self._clock() < deadline \
                and self._lease_session is not None and not self._stop.wait(0.01):
            pass
        with self._lock:
            confirmed = self._confirmed_sent_at is not None
            lost = settle_verdict(self._view, now=self._clock(), me=self.master_id, epoch=epoch,
                                  position=position, claimed_at=claimed_at, echoed=True,
                                  timing=self.timing) == LOST
        if not confirmed or lost:
            self._withdraw_lease(epoch, position)
            self.epoch = self._replica.epoch
            self._abandon_claim("the lease was not confirmed" if not confirmed else
                                "another master won at the last moment")
            return
        self.role = "active"
        self._claim = None
        log.info("master %s is active at epoch %d (journal %s)", self.master_id, epoch, position)
        self._renewer = threading.Thread(target=self._renew_loop, daemon=True,
                                         name=f"{self.master_id}-lease")
        self._renewer.start()
        try:
            self._session.publish(self.topics.master_status,
                                  MasterStatus(master_id=self.master_id, status="starting",
                                               epoch=epoch, ts=round(time.time(), 3)).encode(),
                                  retain=True)
            self._replica.note_epoch(epoch)
            self._replica.close()
            self._replica = None
            self._capture = ChangeCapture(self._path, epoch=epoch)
            self._base = self._capture.position
            options = self.options
            transport = MasterNodeTransport(
                broker_url=options.broker_url, root=options.root, state_dir=options.state_dir,
                master_id=self.master_id, max_attempts=options.max_attempts,
                max_queued=options.max_queued, node_timeout=options.node_timeout,
                keepalive=options.keepalive, tls=options.tls, retry=options.retry,
                rate_limits=options.rate_limits, result_ttl=options.result_ttl,
                forget_nodes_after=options.forget_nodes_after)
            transport.epoch = epoch
            transport.add_hooks(_ActiveGate(self))
            with self._acks:
                self._in_sync = {name for name, p in self._presence.items()
                                 if p.role == "standby" and p.position == self._base}
                self._lagging.clear()
                self._acked.clear()
                self._claimants.clear()
                self._unconfirmed = None
            self._dispatching = False
            self._session.unsubscribe(self.topics.master_journal)
            self._transport = transport
            transport.start()
            self._publish_presence()
            self._reconcile(transport)
            self._dispatching = True
        except Exception as e:
            log.exception("taking over failed")
            self._depose(f"taking over failed: {e}")
            self._step_down(self._depose_reason)
            return
        if self._on_active is not None:
            self._on_active(transport)

    def _reconcile(self, transport: MasterNodeTransport) -> None:
        """Ask the live nodes what they hold; those tasks stay in flight where they are."""
        deadline = self._clock() + self.options.reconcile_timeout
        expected = {n for n, status in list(self._nodes.items()) if status in _LIVE_NODE}
        while self._clock() < deadline and not self._deposed.is_set():
            known = set(transport.get_nodes_by_status("ready") + transport.get_nodes_by_status("busy")
                        + transport.get_nodes_by_status("connected"))
            if expected <= known:
                break
            self._stop.wait(0.02)
        alive = set(transport.get_nodes_by_status("ready") + transport.get_nodes_by_status("busy")
                    + transport.get_nodes_by_status("connected"))
        reports: dict[str, NodeReport] = {}
        answered = threading.Event()

        def on_report(report: NodeReport) -> None:
            reports[report.node_id] = report
            if alive <= set(reports):
                answered.set()

        if alive:
            transport.broadcast_control("snapshot", {"reason": "take-over"}, on_report=on_report)
            answered.wait(max(0.0, deadline - self._clock()) + 0.5)
        adopted = 0
        for node_id, report in list(reports.items()):
            held = report.state.get("held")
            if isinstance(held, list) and all(isinstance(t, str) for t in held):
                adopted += transport.adopt(node_id, held)
        log.info("take-over: %d of %d nodes said what they hold; %d tasks stay in flight on them",
                 len(reports), len(alive), adopted)

    # -- active: the lease ----------------------------------------------------------------------------

    def _renew(self, now: float, position: Position | None = None) -> None:
        session = self._lease_session
        if session is None:
            return
        with self._lock:
            self._renewal_seq += 1
            seq = self._renewal_seq
            self._renewals[seq] = now
        position = position or self.position
        lease = Lease(holder=self.master_id, epoch=self.epoch, state=HELD, ttl=self.timing.ttl,
                      seq=seq, journal_seq=position[1], journal_epoch=position[0],
                      ts=round(time.time(), 3))
        try:
            session.publish(self.topics.master_lease, lease.encode(), retain=True)
        except FabricError as e:
            log.warning("lease renewal not sent: %s", e)

    def _lease_valid(self) -> bool:
        session = self._lease_session
        return (not self._deposed.is_set() and session is not None and session.connected
                and holder_valid(now=self._clock(), confirmed_sent_at=self._confirmed_sent_at,
                                 ttl=self.timing.ttl))

    def _renew_loop(self) -> None:
        next_renew = self._clock() + self.timing.renew_every
        while self.role == "active" and not self._deposed.is_set():
            if not self._lease_valid():
                self._depose("the lease lapsed by this master's own clock" if
                             self._lease_session is not None and self._lease_session.connected
                             else "the lease connection was lost")
                return
            now = self._clock()
            if now >= next_renew or self._renew_now.is_set():
                self._renew_now.clear()
                self._renew(now)
                self._publish_presence()
                next_renew = now + self.timing.renew_every
            self._renew_now.wait(min(0.05, max(0.0, next_renew - now)))

    def _depose(self, reason: str) -> None:
        if not self._deposed.is_set():
            self._depose_reason = reason
            self._deposed.set()
            log.warning("master %s stops acting: %s", self.master_id, reason)
        with self._acks:
            self._acks.notify_all()
        self._work.put(("wake", None))

    # -- active: the gates on the transport's loop ------------------------------------------------

    def _may_dispatch(self) -> bool:
        return self._dispatching and self._lease_valid()

    def _turn_done(self) -> bool:
        """After the turn's commit: copy its changes to the standbys, wait for them, start
        requested copies; the turn is published only if the lease is still ours."""
        capture = self._capture
        if capture is None or self._deposed.is_set():
            return False
        try:
            deltas = capture.drain(epoch=self.epoch)
        except sqlite3.Error as e:
            log.warning("journal changes not read yet: %s", e)
            return False
        if deltas:
            topic = self.topics.master_journal
            for previous, new, ops in deltas:
                delta = JournalDelta(master=self.master_id, epoch=self.epoch, seq=new[1],
                                     prev_seq=previous[1], prev_epoch=previous[0], ops=tuple(ops))
                self._session.publish(topic, delta.encode())
            self._unconfirmed = deltas[-1][1]
        if self._unconfirmed is not None:
            if not self._wait_for_acks(self._unconfirmed):
                return False  # a standby is claiming the lease: publish nothing until settled
            self._unconfirmed = None
        if self._resyncs:
            self._send_copies(capture)
        return self._lease_valid()

    def _wait_for_acks(self, target: Position) -> bool:
        """Until every standby in sync confirmed `target` (True); one silent for ack_timeout
        is dropped from the sync set, except one claiming the lease: then False, and the turn
        waits (if that standby wins, this master was replaced and must have told nobody)."""
        began = self._clock()
        deadline = began + self.timing.ack_timeout
        with self._acks:
            while not self._deposed.is_set():
                waiting = [n for n in self._in_sync | self._claimants
                           if self._acked.get(n, (0, 0)) < target]
                if not waiting:
                    if self._clock() - began > self.timing.ack_timeout / 4:
                        log.info("standbys confirmed journal %s after %.2fs", target,
                                 self._clock() - began)
                    return True
                remaining = deadline - self._clock()
                if remaining <= 0:
                    if self._claimants & set(waiting):
                        log.warning("standby %s claims the lease: holding back journal %s",
                                    ", ".join(sorted(self._claimants & set(waiting))), target)
                        return False
                    for name in waiting:
                        self._in_sync.discard(name)
                        self._lagging[name] = target
                        log.warning("standby %s did not confirm journal %s within %gs: not "
                                    "waited for until it catches up", name, target,
                                    self.timing.ack_timeout)
                    return True
                self._acks.wait(remaining)
        return False

    def _send_copies(self, capture: ChangeCapture) -> None:
        with self._lock:
            requests, self._resyncs = self._resyncs, []
        self._copies = [t for t in self._copies if t.is_alive()]
        for request in requests:
            if request.epoch != self.epoch:
                continue  # asked of an earlier lease of ours
            if len(self._copies) >= _MAX_COPIES:
                break  # the requester asks again
            snapshot = capture.snapshot()
            thread = threading.Thread(target=self._send_copy, args=(request, snapshot),
                                      name=f"copy-{request.requester}", daemon=True)
            thread.start()
            self._copies.append(thread)

    def _send_copy(self, request: ResyncRequest, snapshot: JournalSnapshot) -> None:
        topic = self.topics.master_dump(request.requester)
        position = snapshot.position
        index = 0
        try:
            for ops in snapshot.chunks():
                if self._deposed.is_set() or self._stop.is_set():
                    return
                chunk = JournalDump(master=self.master_id, epoch=self.epoch,
                                    request_id=request.request_id, index=index, last=False,
                                    seq=position[1], seq_epoch=position[0], ops=tuple(ops))
                self._session.publish_and_wait(topic, chunk.encode(), timeout=10.0)
                index += 1
            last = JournalDump(master=self.master_id, epoch=self.epoch,
                               request_id=request.request_id, index=index, last=True,
                               seq=position[1], seq_epoch=position[0])
            self._session.publish_and_wait(topic, last.encode(), timeout=10.0)
            log.info("sent %s a copy of the journal at %s (%d chunks)", request.requester,
                     position, index)
        except (FabricError, sqlite3.Error) as e:
            log.warning("copy for %s failed: %s", request.requester, e)
        finally:
            snapshot.close()

    # -- leaving the active role ------------------------------------------------------------------

    def _step_down(self, reason: str) -> None:
        """Replaced (or failed to take over): stop acting, publish nothing more, and become a
        standby that copies the new holder's journal (ours may hold unconfirmed changes)."""
        log.warning("master %s steps down: %s", self.master_id, reason)
        self._dispatching = False
        self._deposed.set()
        self._stop_renewer()
        transport, self._transport = self._transport, None
        if transport is not None:
            if self._on_inactive is not None:
                self._on_inactive(transport)
            transport.stop(quiet=True)
        self._close_capture()
        self._close_lease_session()
        self._claim = None
        self._session.subscribe(self.topics.master_journal, lambda _t, p: self._work.put(("delta", p)))
        self._replica = JournalReplica(self._path)
        self._need_copy = True
        self._copy_request = None
        with self._acks:
            self._view.restart_watch(self._clock())
            self._in_sync.clear()
            self._acked.clear()
            self._resyncs.clear()
        self.role = "syncing"
        self.epoch = self._replica.epoch
        self._deposed.clear()
        self._publish_presence()

    def _release(self) -> None:
        """Clean stop of the active master: last changes out, lease released."""
        transport, self._transport = self._transport, None
        if transport is not None:
            if self._on_inactive is not None:
                self._on_inactive(transport)
            transport.stop()
        capture = self._capture
        if capture is not None and not self._deposed.is_set():
            try:
                for previous, new, ops in capture.drain(epoch=self.epoch):
                    self._session.publish(self.topics.master_journal, JournalDelta(
                        master=self.master_id, epoch=self.epoch, seq=new[1],
                        prev_seq=previous[1], prev_epoch=previous[0], ops=tuple(ops)).encode())
                    self._wait_for_acks(new)
            except sqlite3.Error as e:
                log.warning("last journal changes not copied: %s", e)
        self._dispatching = False
        self._deposed.set()
        self._stop_renewer()
        self._close_capture()
        self._withdraw_lease(self.epoch, self.position)
        self._close_lease_session()
        self._replica = JournalReplica(self._path)

    def _stop_renewer(self) -> None:
        self._renew_now.set()
        renewer, self._renewer = self._renewer, None
        if renewer is not None and renewer is not threading.current_thread():
            renewer.join(2.0)
        self._renew_now.clear()

    def _close_capture(self) -> None:
        capture, self._capture = self._capture, None
        if capture is not None:
            try:
                capture.close()
            except sqlite3.Error as e:
                log.warning("closing the change capture: %s", e)

    # -- presence ----------------------------------------------------------------------------------

    def _presence_payload(self, role: str) -> bytes:
        position = self.position
        return MasterPresence(master_id=self.master_id, role=role,
                              epoch=max(self.epoch, self._view.max_epoch),
                              journal_seq=position[1], journal_epoch=position[0],
                              ts=round(time.time(), 3)).encode()

    def _publish_presence(self) -> None:
        try:
            self._session.publish(self.topics.master_presence(self.master_id),
                                  self._presence_payload(self.role), retain=True)
        except FabricError as e:
            log.warning("presence not published: %s", e)


class _ActiveGate(MasterHooks):
    """The active master's turns: dispatch while the lease is ours, publish once the standbys
    have the turn's changes."""

    def __init__(self, replica: ReplicatedMaster) -> None:
        self.replica = replica

    def before_dispatch(self, master: MasterNodeTransport) -> bool:
        return self.replica._may_dispatch()

    def after_commit(self, master: MasterNodeTransport) -> bool:
        return self.replica._turn_done()


def check_replica_options(*, broker: str | None, pipelines: Path | None) -> None:
    """What `serve --replica` needs: a broker of its own, and no pipelines (their state
    lives beside one master and is not replicated)."""
    if not broker:
        raise ConfigError("replicated masters need a broker that outlives each of them: start "
                          "one (python -m broker --config broker.conf --port 1883, or "
                          "mosquitto) and give every master --broker URL")
    if pipelines:
        raise ConfigError("--pipelines cannot be combined with --replica: pipeline state is "
                          "kept beside one master and is not replicated")
