"""The topic layout: one root, a tree that reads well in MQTT Explorer.

    <root>/nodes/<node_id>/status     retained JSON: birth, heartbeat, will `dead`
    <root>/nodes/<node_id>/tasks      task batches and control messages for one node
    <root>/results/<node_id>          result batches from one node (the id is in the topic,
                                      so an ACL can stop a node forging another's results)
    <root>/master/status              retained JSON: the master's counters
    <root>/master/lease               retained: who is the active master (replication)
    <root>/master/journal             journal deltas from the active master to standbys
    <root>/master/resync              a standby asks the active master for a full copy
    <root>/masters/<master_id>        retained JSON presence of one replicated master (will `dead`)
    <root>/masters/<master_id>/dump   a full copy of the journal, in chunks, for that standby
    <root>/submit/<client_id>         submissions from clients
    <root>/query/<client_id>          status queries from clients
    <root>/clients/<client_id>        replies, acknowledgements and outcomes for one client
    <root>/jobs/<job_id>/progress     retained JSON progress of a long job
    <root>/pipelines/<name>/state     retained JSON state of a pipeline
    <root>/events/<event_name>        pipeline and job events, for live inspection
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.errors import ConfigError

__all__ = ["Topics", "validate_id", "DEFAULT_ROOT"]

DEFAULT_ROOT = "fabric"
_ID = re.compile(r"^[A-Za-z0-9_:-]{1,64}$")


def validate_id(value: str, *, what: str = "id") -> str:
    """Ids become topic levels, so they may hold no `/`, `+`, `#` or spaces, and no `.`:
    RabbitMQ's MQTT plugin turns a `.` into a level separator, so on a RabbitMQ cluster a
    node `a.b` would publish to `nodes/a/b/status`, which no fabric subscription matches."""
    if not isinstance(value, str) or not _ID.match(value):
        dotted = isinstance(value, str) and "." in value
        raise ConfigError(
            f"invalid {what} {value!r}: use 1-64 characters from A-Z a-z 0-9 _ : -"
            + (f" (no '.': RabbitMQ reads it as a topic level separator; try "
               f"{value.replace('.', '-')!r})" if dotted else ""))
    return value


@dataclass(frozen=True)
class Topics:
    """Every topic the fabric uses, derived from one root."""

    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        if not self.root or any(c in self.root for c in "+#") or self.root.startswith("/") \
                or self.root.endswith("/"):
            raise ConfigError(f"invalid topic root {self.root!r}")

    # -- nodes
    def node_status(self, node_id: str) -> str:
        return f"{self.root}/nodes/{node_id}/status"

    def node_tasks(self, node_id: str) -> str:
        return f"{self.root}/nodes/{node_id}/tasks"

    def results(self, node_id: str) -> str:
        return f"{self.root}/results/{node_id}"

    @property
    def all_node_status(self) -> str:
        return f"{self.root}/nodes/+/status"

    @property
    def all_results(self) -> str:
        return f"{self.root}/results/+"

    # -- master
    @property
    def master_status(self) -> str:
        return f"{self.root}/master/status"

    @property
    def master_lease(self) -> str:
        return f"{self.root}/master/lease"

    # -- replicated masters
    @property
    def master_journal(self) -> str:
        return f"{self.root}/master/journal"

    @property
    def master_resync(self) -> str:
        return f"{self.root}/master/resync"

    def master_presence(self, master_id: str) -> str:
        return f"{self.root}/masters/{master_id}"

    @property
    def all_master_presence(self) -> str:
        return f"{self.root}/masters/+"

    def master_dump(self, master_id: str) -> str:
        return f"{self.root}/masters/{master_id}/dump"

    # -- clients
    def submit(self, client_id: str) -> str:
        return f"{self.root}/submit/{client_id}"

    @property
    def all_submit(self) -> str:
        return f"{self.root}/submit/+"

    def query(self, client_id: str) -> str:
        return f"{self.root}/query/{client_id}"

    @property
    def all_query(self) -> str:
        return f"{self.root}/query/+"

    def client(self, client_id: str) -> str:
        return f"{self.root}/clients/{client_id}"

    # -- jobs, pipelines, events
    def job_progress(self, job_id: str) -> str:
        return f"{self.root}/jobs/{job_id}/progress"

    def pipeline_state(self, name: str) -> str:
        return f"{self.root}/pipelines/{name}/state"

    def event(self, event_name: str) -> str:
        return f"{self.root}/events/{event_name}"

    def level(self, topic: str, index: int) -> str | None:
        """The topic level at `index` after the root (None if the topic is not ours)."""
        prefix = self.root + "/"
        if not topic.startswith(prefix):
            return None
        parts = topic[len(prefix):].split("/")
        return parts[index] if -len(parts) <= index < len(parts) else None
