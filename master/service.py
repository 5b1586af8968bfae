"""`master-node serve`: the embedded broker (unless one is given), the master, until a signal."""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from core.defaults import (DEFAULT_LEASE_TTL, DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_QUEUED,
                           DEFAULT_NODE_TIMEOUT)
from core.errors import ConfigError
from core.topics import DEFAULT_ROOT
from core.credentials import with_password
from core.mqtt import TlsSettings
from core.url import BrokerUrl, parse_broker_url
from master.claim import RootClaim, StateLock
from master.pipelines_bridge import load_pipeline_file, serve_pipelines
from master.rate_limit import RateLimit
from master.retry_policy import RetryPolicy
from master.retention import DEFAULT_FORGET_NODES_AFTER, DEFAULT_RESULT_TTL
from master.snapshots import Snapshotter
from master.transport import MasterNodeTransport

__all__ = ["ServeOptions", "serve", "default_config_path"]

log = logging.getLogger("master-node")


@dataclass(frozen=True)
class ServeOptions:
    broker: str | None = None
    config: Path | None = None
    port: int | None = None
    allow_remote_anonymous: bool = False
    state_dir: Path = Path("state")
    root: str = DEFAULT_ROOT
    node_timeout: float = DEFAULT_NODE_TIMEOUT
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_queued: int = DEFAULT_MAX_QUEUED
    master_id: str = "master"
    pipelines: Path | None = None
    snapshots: Path | None = None          # None: "snapshots" beside the state directory
    snapshot_interval: float = 30.0        # 0: only on request (master-node snapshot)
    replica: bool = False                  # one of replicated masters (see master.replica)
    lease_ttl: float = DEFAULT_LEASE_TTL   # replicated: how long the active master's lease lives
    password_file: Path | None = None      # the --broker password, instead of in the URL
    tls: TlsSettings | None = None         # CA, client certificate and key for --broker
    claim_ttl: float = DEFAULT_LEASE_TTL   # plain master: its root claim is renewed every third
    retry: RetryPolicy = RetryPolicy()     # default retry policy (a task's own wins)
    rate_limits: tuple[RateLimit, ...] = ()  # starts per second per task name
    result_ttl: float = DEFAULT_RESULT_TTL  # finished tasks are deleted this long after (0: never)
    forget_nodes_after: float = DEFAULT_FORGET_NODES_AFTER  # nodes gone this long (0: never)


def check_serve_options(options: ServeOptions) -> None:
    """Range checks with a clear error, before anything starts."""
    def positive(name: str, value: float, *, low: float = 0.0, zero: bool = False,
                 high: float = 86_400.0) -> None:
        ok = (value == 0 and zero) or low < value <= high  # NaN fails every comparison
        if not ok:
            raise ConfigError(f"{name} {value!r}: must be {'0 or ' if zero else ''}more than "
                              f"{low:g} and at most {high:g} seconds")
    positive("--node-timeout", options.node_timeout, low=0.05)
    positive("--lease-ttl", options.lease_ttl, low=0.1)
    positive("--snapshot-interval", options.snapshot_interval, zero=True, low=0.1)
    positive("claim ttl", options.claim_ttl, low=0.1)
    if options.max_attempts < 1:
        raise ConfigError(f"--max-attempts {options.max_attempts}: must be at least 1")
    if options.max_queued < 1:
        raise ConfigError(f"--max-queued {options.max_queued}: must be at least 1")
    names = [limit.name for limit in options.rate_limits]
    if len(set(names)) != len(names):
        raise ConfigError(f"--rate-limit given twice for one name: {', '.join(sorted(names))}")
    for name, value in (("--result-ttl", options.result_ttl),
                        ("--forget-nodes-after", options.forget_nodes_after)):
        if not value >= 0:
            raise ConfigError(f"{name} {value!r}: must be 0 (never) or more seconds")


def default_config_path() -> Path | None:
    """broker.conf in the working directory, if there is one."""
    path = Path("broker.conf")
    return path if path.is_file() else None


def serve(options: ServeOptions, *, stop: threading.Event | None = None,
          on_ready: Callable[[MasterNodeTransport, BrokerUrl], None] | None = None,
          on_standby: Callable[[BrokerUrl], None] | None = None) -> int:
    """Run the master until `stop` is set (or SIGINT/SIGTERM when run from the CLI).
    A replica calls `on_ready` each time it becomes active, `on_standby` once it stands by."""
    stop = stop or threading.Event()
    check_serve_options(options)
    if options.replica:
        return _serve_replica(options, stop=stop, on_ready=on_ready, on_standby=on_standby)
    pipeline_file = load_pipeline_file(options.pipelines) if options.pipelines else None
    if options.broker:
        broker_url = _external_broker(options)
    # one plain master per state directory, locked before anything else starts
    state_lock = StateLock(options.state_dir).acquire(
        holder=options.master_id, root=options.root,
        broker=str(broker_url) if options.broker else "its embedded broker")
    broker_process = claim = None
    try:
        if not options.broker:
            broker_process, broker_url = _start_embedded(options)
        claim = RootClaim(broker=broker_url, root=options.root, master_id=options.master_id,
                          state_dir=Path(options.state_dir), tls=options.tls,
                          ttl=options.claim_ttl).acquire()
        return _serve_plain(options, broker_url, pipeline_file, stop=stop, on_ready=on_ready)
    finally:
        if claim is not None:
            claim.release()
        if broker_process is not None:
            broker_process.stop()
        state_lock.release()


def _external_broker(options: ServeOptions) -> BrokerUrl:
    return with_password(parse_broker_url(options.broker), password_file=options.password_file)


def _start_embedded(options: ServeOptions) -> tuple[object, BrokerUrl]:
    """The embedded broker, trusting a credential made for this master alone (so it comes
    up with `allow_anonymous false` too), and the URL the master logs in with."""
    from broker import issue_credential, start_broker_process
    config = options.config or default_config_path()
    if config is not None and not Path(config).is_file():
        raise ConfigError(f"broker config {config} not found")
    credential = issue_credential(options.state_dir, options.master_id)
    broker_process = start_broker_process(
        config, port=options.port, parent_pid=os.getpid(),
        allow_remote_anonymous=options.allow_remote_anonymous, trusted_file=credential.path)
    log.info("embedded broker listening on %s", broker_process.url)
    broker_url = replace(parse_broker_url(broker_process.url), username=credential.username,
                         password=credential.password)
    return broker_process, broker_url


def _serve_plain(options: ServeOptions, broker_url: BrokerUrl, pipeline_file: object, *,
                 stop: threading.Event,
                 on_ready: Callable[[MasterNodeTransport, BrokerUrl], None] | None) -> int:
    master = MasterNodeTransport(broker_url=broker_url, root=options.root,
                                 state_dir=options.state_dir, master_id=options.master_id,
                                 max_attempts=options.max_attempts, max_queued=options.max_queued,
                                 node_timeout=options.node_timeout, tls=options.tls,
                                 retry=options.retry, rate_limits=options.rate_limits,
                                 result_ttl=options.result_ttl,
                                 forget_nodes_after=options.forget_nodes_after)
    pipelines = snapshotter = None
    try:
        master.start()
        snapshotter = Snapshotter(master, interval=options.snapshot_interval,
                                  directory=options.snapshots or
                                  Path(options.state_dir).parent / "snapshots").start()
        pipelines = serve_pipelines(master, pipeline_file, state_dir=options.state_dir)
        log.info("master %s ready on %s (state in %s)", options.master_id, broker_url,
                 options.state_dir)
        if on_ready is not None:
            on_ready(master, broker_url)
        while not stop.wait(0.5):
            pass
        log.info("master %s stopping", options.master_id)
    finally:
        if pipelines is not None:
            pipelines.stop()
        if snapshotter is not None:
            snapshotter.stop()
        master.stop()
    log.info("master %s stopped", options.master_id)
    return 0


def _serve_replica(options: ServeOptions, *, stop: threading.Event,
                   on_ready: Callable[[MasterNodeTransport, BrokerUrl], None] | None,
                   on_standby: Callable[[BrokerUrl], None] | None) -> int:
    """A replicated master: a standby until it holds the lease; snapshots while active."""
    from master.lease import LeaseTiming
    from master.replica import ReplicaOptions, ReplicatedMaster, check_replica_options
    check_replica_options(broker=options.broker, pipelines=options.pipelines)
    broker_url = _external_broker(options)
    directory = options.snapshots or Path(options.state_dir).parent / "snapshots"
    snapshotters: dict[int, Snapshotter] = {}

    def active(master: MasterNodeTransport) -> None:
        snapshotters[id(master)] = Snapshotter(master, interval=options.snapshot_interval,
                                               directory=directory).start()
        log.info("master %s active at epoch %d on %s (state in %s)", options.master_id,
                 master.epoch, broker_url, options.state_dir)
        if on_ready is not None:
            on_ready(master, broker_url)

    def inactive(master: MasterNodeTransport) -> None:
        snapshotter = snapshotters.pop(id(master), None)
        if snapshotter is not None:
            snapshotter.stop()

    def standby() -> None:
        log.info("master %s stands by on %s (state in %s)", options.master_id, broker_url,
                 options.state_dir)
        if on_standby is not None:
            on_standby(broker_url)

    replica = ReplicatedMaster(
        ReplicaOptions(broker_url=broker_url, state_dir=Path(options.state_dir),
                       master_id=options.master_id, root=options.root,
                       timing=LeaseTiming(ttl=options.lease_ttl),
                       node_timeout=options.node_timeout, max_attempts=options.max_attempts,
                       max_queued=options.max_queued, tls=options.tls, retry=options.retry,
                       rate_limits=options.rate_limits, result_ttl=options.result_ttl,
                       forget_nodes_after=options.forget_nodes_after),
        on_active=active, on_inactive=inactive, on_standby=standby)
    replica.start()
    try:
        while not stop.wait(0.5):
            pass
        log.info("master %s stopping", options.master_id)
    finally:
        replica.stop()
    log.info("master %s stopped", options.master_id)
    return 0


def install_signal_handlers(stop: threading.Event) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
