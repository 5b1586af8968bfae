"""This replicated master's own side of the lease (the rules are in master.lease).

A claiming or active master has a lease connection of its own, whose will says the lease
`expired`: if the process dies, the broker tells the standbys at once. On it the master
claims an epoch and waits for the broker's echo of that claim, then renews the lease (a
`Renewer` thread) and notes which renewals the broker echoed back: it may act only while the
last confirmed one was sent less than a ttl ago. Being deposed (a newer lease seen, the lease
lapsed by this master's clock, the lease connection lost) is an event the master's loop and
gate wait on.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING

from core.errors import DecodeError, FabricError
from core.mqtt import MqttSession, Will
from core.replication import CLAIM, EXPIRED, HELD, Lease
from master.lease import Position, holder_valid, outranks
from master.renewal import Renewer

if TYPE_CHECKING:
    from master.replica import ReplicatedMaster

__all__ = ["LeaseHolder"]

log = logging.getLogger("master.replica")


class LeaseHolder:
    """The lease connection of one replicated master: claim, renewals, withdrawal, deposal."""

    def __init__(self, owner: ReplicatedMaster) -> None:
        self.owner = owner
        self.session: MqttSession | None = None
        self.claim: tuple[int, Position, float] | None = None  # (epoch, position, claimed at)
        self.claim_echoed = False
        self.deposed = threading.Event()
        self.depose_reason = ""
        self.confirmed_sent_at: float | None = None  # the last renewal the broker echoed
        self._renewal_seq = 0
        self._renewals: dict[int, float] = {}       # renewal seq -> when it was sent
        self._renewer = Renewer(self._renew_and_announce, every=owner.timing.renew_every,
                                check=self._may_go_on, poll=0.05, clock=owner.clock,
                                name=f"{owner.master_id}-lease")

    # -- claiming ----------------------------------------------------------------------------------

    def open(self, epoch: int, position: Position) -> bool:
        """Connect the lease session for a claim of `epoch`; False if the broker is not there."""
        owner = self.owner
        will = Lease(holder=owner.master_id, epoch=epoch, state=EXPIRED, ttl=owner.timing.ttl,
                     journal_seq=position[1], journal_epoch=position[0])
        options = owner.options
        session = MqttSession(broker=options.broker_url, keepalive=options.keepalive,
                              tls=options.tls,
                              client_id=f"{owner.master_id}-lease-{uuid.uuid4().hex[:6]}",
                              will=Will(owner.topics.master_lease, will.encode()))
        session.subscribe(owner.topics.master_lease, self._on_own_lease)
        session.on_disconnect(lambda: self._connection_lost(session))
        try:
            session.start(timeout=owner.timing.ttl)
        except FabricError as e:
            log.warning("cannot open the lease connection: %s", e)
            return False
        self.session = session
        self.claim = (epoch, position, owner.clock())
        self.claim_echoed = False
        return True

    def send_claim(self) -> None:
        """Publish the claim opened by `open` (its echo is noted as `claim_echoed`)."""
        assert self.session is not None and self.claim is not None
        epoch, position, _claimed_at = self.claim
        owner = self.owner
        claim = Lease(holder=owner.master_id, epoch=epoch, state=CLAIM, ttl=owner.timing.ttl,
                      journal_seq=position[1], journal_epoch=position[0], ts=round(time.time(), 3))
        self.session.publish(owner.topics.master_lease, claim.encode())

    def _on_own_lease(self, _topic: str, payload: bytes) -> None:
        """The lease topic as the lease connection sees it: echoes of our own messages."""
        try:
            lease = Lease.decode(payload) if payload else None
        except DecodeError:
            return
        if lease is None:
            return
        owner = self.owner
        if lease.holder != owner.master_id:
            if owner.role == "active" and outranks(lease, (owner.epoch, owner.master_id)):
                self.depose(f"{lease.holder} holds the lease at epoch {lease.epoch}")
            return
        claim = self.claim
        if lease.state == CLAIM and claim is not None and lease.epoch == claim[0]:
            self.claim_echoed = True
        elif lease.state == HELD and lease.epoch == owner.epoch:
            with owner.lock:
                sent = self._renewals.pop(lease.seq, None)
                if sent is not None:
                    for seq in [s for s in self._renewals if s < lease.seq]:
                        del self._renewals[seq]
                    if self.confirmed_sent_at is None or sent > self.confirmed_sent_at:
                        self.confirmed_sent_at = sent

    def _connection_lost(self, session: MqttSession) -> None:
        if session is not self.session:
            return  # an old lease connection closing
        owner = self.owner
        if owner.role == "active":
            self.depose("the lease connection was lost")
        elif owner.role == "claiming":
            owner.wake()
            self.claim = None  # settling the claim then gives up

    # -- holding ----------------------------------------------------------------------------------

    def confirm(self, position: Position) -> bool:
        """The claim won: the first renewal, and whether the broker echoed it within
        claim_grace (until then this master must not act)."""
        owner = self.owner
        self.deposed.clear()
        self.depose_reason = ""
        with owner.lock:
            self._renewals.clear()
            self._renewal_seq = 0
            self.confirmed_sent_at = None
        self.renew(owner.clock(), position)
        deadline = owner.clock() + owner.timing.claim_grace
        while self.confirmed_sent_at is None and owner.clock() < deadline \
                and self.session is not None and not owner.stopping.wait(0.01):
            pass
        with owner.lock:
            return self.confirmed_sent_at is not None

    def renew(self, now: float, position: Position | None = None) -> None:
        session = self.session
        if session is None:
            return
        owner = self.owner
        with owner.lock:
            self._renewal_seq += 1
            seq = self._renewal_seq
            self._renewals[seq] = now
        position = position or owner.position
        lease = Lease(holder=owner.master_id, epoch=owner.epoch, state=HELD,
                      ttl=owner.timing.ttl, seq=seq, journal_seq=position[1],
                      journal_epoch=position[0], ts=round(time.time(), 3))
        try:
            session.publish(owner.topics.master_lease, lease.encode(), retain=True)
        except FabricError as e:
            log.warning("lease renewal not sent: %s", e)

    def valid(self) -> bool:
        """May this master act now: not deposed, connected, its last confirmed renewal recent."""
        session = self.session
        return (not self.deposed.is_set() and session is not None and session.connected
                and holder_valid(now=self.owner.clock(), confirmed_sent_at=self.confirmed_sent_at,
                                 ttl=self.owner.timing.ttl))

    def start_renewing(self) -> None:
        self._renewer.start()

    def renew_soon(self) -> None:
        """A claimant appeared: show it at once that this lease is alive."""
        self._renewer.renew_soon()

    def stop_renewing(self) -> None:
        self._renewer.stop(timeout=2.0)

    def _renew_and_announce(self, now: float) -> None:
        self.renew(now)
        self.owner.publish_presence()

    def _may_go_on(self) -> bool:
        """The renewer's check: renew while active; depose when the lease is no longer ours."""
        if self.owner.role != "active" or self.deposed.is_set():
            return False
        if not self.valid():
            session = self.session
            self.depose("the lease lapsed by this master's own clock" if
                        session is not None and session.connected
                        else "the lease connection was lost")
            return False
        return True

    # -- letting go -------------------------------------------------------------------------------

    def depose(self, reason: str) -> None:
        """Stop acting (the loop then steps down); wakes whoever waits for acks or work."""
        if not self.deposed.is_set():
            self.depose_reason = reason
            self.deposed.set()
            log.warning("master %s stops acting: %s", self.owner.master_id, reason)
        with self.owner.acks:
            self.owner.acks.notify_all()
        self.owner.wake()

    def withdraw(self, epoch: int, position: Position) -> None:
        """Say at once that our lease of `epoch` is gone (others need not wait for it to lapse)."""
        session = self.session
        if session is None:
            return
        owner = self.owner
        gone = Lease(holder=owner.master_id, epoch=epoch, state=EXPIRED, ttl=owner.timing.ttl,
                     journal_seq=position[1], journal_epoch=position[0], ts=round(time.time(), 3))
        try:
            session.publish_and_wait(owner.topics.master_lease, gone.encode(), retain=True,
                                     timeout=2.0)
        except FabricError:
            pass

    def close(self) -> None:
        """Disconnect the lease session cleanly: its will is not sent."""
        session, self.session = self.session, None
        if session is not None:
            session.stop(timeout=2.0)
