"""The replication session of one replicated master: its presence (role and journal
position, retained, with will `dead`), and what it sees of the others: their presences (a
standby's is its ack), the lease, the nodes' statuses. Journal deltas and copies addressed
to this master are handed to the replica thread; resync requests to the active master's gate.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING, Callable

from core import states
from core.errors import DecodeError, FabricError
from core.mqtt import MqttSession, Will
from core.protocol import NodeStatus, decode_message
from core.replication import MasterPresence
from master.lease import outranks, read_lease

if TYPE_CHECKING:
    from master.replica import ReplicatedMaster

__all__ = ["ReplicationSession", "LIVE_NODE"]

log = logging.getLogger("master.replica")

LIVE_NODE = states.LIVE_STATES


class ReplicationSession:
    """The MQTT session every replicated master keeps, whatever its role."""

    def __init__(self, owner: ReplicatedMaster, *, on_delta: Callable[[bytes], None],
                 on_copy: Callable[[bytes], None]) -> None:
        self.owner = owner
        self.presence: dict[str, MasterPresence] = {}  # the other masters (guarded by acks)
        self.nodes: dict[str, str] = {}                # node id -> its last status
        self._on_delta = on_delta
        topics, options = owner.topics, owner.options
        session = MqttSession(
            broker=options.broker_url, keepalive=options.keepalive, tls=options.tls,
            client_id=f"{owner.master_id}-replica-{uuid.uuid4().hex[:6]}",
            will=Will(topics.master_presence(owner.master_id),
                      MasterPresence(master_id=owner.master_id, role="dead").encode()))
        session.subscribe(topics.master_lease, self._on_lease)
        session.subscribe(topics.all_master_presence, self._on_presence)
        session.subscribe(topics.master_journal, self._on_journal)
        session.subscribe(topics.master_dump(owner.master_id), lambda _t, p: on_copy(p))
        session.subscribe(topics.master_resync, owner.gate.on_resync)
        session.subscribe(topics.all_node_status, self._on_node_status)
        session.on_connect(self._on_connected)
        self.mqtt = session

    def follow_journal(self, follow: bool) -> None:
        """Standbys take the journal deltas; the active master, which sends them, does not."""
        if follow:
            self.mqtt.subscribe(self.owner.topics.master_journal, self._on_journal)
        else:
            self.mqtt.unsubscribe(self.owner.topics.master_journal)

    def live_nodes(self) -> set[str]:
        return {n for n, status in list(self.nodes.items()) if status in LIVE_NODE}

    # -- presence ----------------------------------------------------------------------------------

    def presence_payload(self, role: str) -> bytes:
        owner = self.owner
        position = owner.position
        return MasterPresence(master_id=owner.master_id, role=role,
                              epoch=max(owner.epoch, owner.view.max_epoch),
                              journal_seq=position[1], journal_epoch=position[0],
                              ts=round(time.time(), 3)).encode()

    def publish_presence(self) -> None:
        owner = self.owner
        try:
            self.mqtt.publish(owner.topics.master_presence(owner.master_id),
                              self.presence_payload(owner.role), retain=True)
        except FabricError as e:
            log.warning("presence not published: %s", e)

    def leave(self) -> None:
        """Say this master is offline (retained, bounded wait) and disconnect."""
        owner = self.owner
        try:
            self.mqtt.publish_and_wait(owner.topics.master_presence(owner.master_id),
                                       self.presence_payload("offline"), retain=True,
                                       timeout=2.0)
        except FabricError:
            pass
        self.mqtt.stop(timeout=2.0)

    # -- what arrives (network thread) ---------------------------------------------------------

    def _on_journal(self, _topic: str, payload: bytes) -> None:
        self._on_delta(payload)

    def _on_connected(self, _session_present: bool) -> None:
        owner = self.owner
        with owner.lock:
            owner.view.restart_watch(owner.clock())  # what happened meanwhile is unknown
        self.publish_presence()

    def _count_rejected(self) -> int:
        owner = self.owner
        owner.rejected += 1
        transport = owner.transport
        if transport is not None:  # the active master's own count, in its status
            transport.rejected += 1
        return owner.rejected

    def _on_lease(self, _topic: str, payload: bytes) -> None:
        lease = read_lease(payload, rejected=self._count_rejected, log=log)
        if lease is None:
            return
        owner = self.owner
        with owner.lock:
            event = owner.view.observe(lease, owner.clock())
            active = owner.role == "active"
        if lease.holder == owner.master_id:
            return
        if active and outranks(lease, (owner.epoch, owner.master_id)):
            owner.holder.depose(f"{lease.holder} holds the lease at epoch {lease.epoch}")
        elif active and event == "claim":
            owner.holder.renew_soon()  # show the claimant this lease is alive
        elif event in ("new_holder", "expired"):
            log.info("lease: %s at epoch %d is %s", lease.holder, lease.epoch, lease.state)
        owner.wake()

    def _on_presence(self, topic: str, payload: bytes) -> None:
        owner = self.owner
        name = owner.topics.level(topic, 1)
        if name is None or name == owner.master_id:
            return
        if not payload:
            with owner.acks:
                self.presence.pop(name, None)
                owner.gate.note_gone(name)
            return
        try:
            presence = MasterPresence.decode(payload)
        except DecodeError as e:
            log.warning("ignored malformed presence on %s: %s", topic, e)
            return
        if presence.master_id != name:
            return
        with owner.acks:
            self.presence[name] = presence
            if owner.role == "active":
                owner.gate.note_ack(name, presence)
                owner.acks.notify_all()

    def _on_node_status(self, topic: str, payload: bytes) -> None:
        node_id = self.owner.topics.level(topic, 1)
        if node_id is None:
            return
        if not payload:
            self.nodes.pop(node_id, None)
            return
        try:
            status = decode_message(payload)
        except DecodeError:
            return
        if isinstance(status, NodeStatus):
            self.nodes[node_id] = status.status
