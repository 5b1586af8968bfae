"""`master-node serve`: the embedded broker (unless one is given), the master, until a signal."""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from core.errors import ConfigError
from core.topics import DEFAULT_ROOT
from core.url import BrokerUrl, parse_broker_url
from master.pipelines_bridge import load_pipeline_file, serve_pipelines
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
    node_timeout: float = 3.0
    max_attempts: int = 3
    max_queued: int = 1_000_000
    master_id: str = "master"
    pipelines: Path | None = None
    snapshots: Path | None = None          # None: "snapshots" beside the state directory
    snapshot_interval: float = 30.0        # 0: only on request (master-node snapshot)
    replica: bool = False                  # one of replicated masters (see master.replica)
    lease_ttl: float = 3.0                 # replicated: how long the active master's lease lives


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
    if options.replica:
        return _serve_replica(options, stop=stop, on_ready=on_ready, on_standby=on_standby)
    pipeline_file = load_pipeline_file(options.pipelines) if options.pipelines else None
    broker_process = None
    if options.broker:
        broker_url = parse_broker_url(options.broker)
    else:
        from master.broker import start_broker_process
        config = options.config or default_config_path()
        if config is not None and not Path(config).is_file():
            raise ConfigError(f"broker config {config} not found")
        broker_process = start_broker_process(
            config, port=options.port, parent_pid=os.getpid(),
            allow_remote_anonymous=options.allow_remote_anonymous)
        broker_url = parse_broker_url(broker_process.url)
        log.info("embedded broker listening on %s", broker_process.url)
    master = MasterNodeTransport(broker_url=broker_url, root=options.root,
                                 state_dir=options.state_dir, master_id=options.master_id,
                                 max_attempts=options.max_attempts, max_queued=options.max_queued,
                                 node_timeout=options.node_timeout)
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
        if broker_process is not None:
            broker_process.stop()
    log.info("master %s stopped", options.master_id)
    return 0


def _serve_replica(options: ServeOptions, *, stop: threading.Event,
                   on_ready: Callable[[MasterNodeTransport, BrokerUrl], None] | None,
                   on_standby: Callable[[BrokerUrl], None] | None) -> int:
    """A replicated master: a standby until it holds the lease; snapshots while active."""
    from master.lease import LeaseTiming
    from master.replica import ReplicaOptions, ReplicatedMaster, check_replica_options
    check_replica_options(broker=options.broker, pipelines=options.pipelines)
    broker_url = parse_broker_url(options.broker)
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
                       max_queued=options.max_queued),
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
