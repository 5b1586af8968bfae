"""The options of one replicated master (`serve --replica`), and what that mode needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.defaults import DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_QUEUED, DEFAULT_NODE_TIMEOUT
from core.errors import ConfigError
from core.mqtt import TlsSettings
from core.topics import DEFAULT_ROOT
from core.url import BrokerUrl
from master.lease import LeaseTiming
from master.rate_limit import RateLimit
from master.retention import DEFAULT_FORGET_NODES_AFTER, DEFAULT_RESULT_TTL
from master.retry_policy import RetryPolicy

__all__ = ["ReplicaOptions", "check_replica_options"]


@dataclass(frozen=True)
class ReplicaOptions:
    """One replicated master: where it talks, where its journal copy lives, its timings."""

    broker_url: BrokerUrl
    state_dir: Path
    master_id: str = "master"
    root: str = DEFAULT_ROOT
    timing: LeaseTiming = field(default_factory=LeaseTiming)
    node_timeout: float = DEFAULT_NODE_TIMEOUT
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_queued: int = DEFAULT_MAX_QUEUED
    keepalive: int = 5
    reconcile_timeout: float = 1.5   # for nodes to say what they hold after a take-over
    tls: TlsSettings | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)  # the default for tasks
    rate_limits: tuple[RateLimit, ...] = ()
    result_ttl: float = DEFAULT_RESULT_TTL
    forget_nodes_after: float = DEFAULT_FORGET_NODES_AFTER



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
