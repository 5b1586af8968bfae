"""Stable node ids: the same host gets the same ids across restarts, one per running node."""

from __future__ import annotations

import fcntl
import os
import re
import socket
from pathlib import Path
from typing import IO

from core.errors import ConfigError

__all__ = ["claim_node_id", "default_state_dir"]

_held: list[IO] = []  # lock files stay open for the life of the process


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "mqtt-fabric" / "node-ids"


def _host_name() -> str:
    name = socket.gethostname().split(".")[0] or "node"
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)[:48]


def claim_node_id(*, state_dir: Path | None = None, max_slots: int = 256) -> str:
    """`<host>-<n>` with the lowest n not held by another node process on this host.

    Slot locks are advisory file locks, released by the kernel when the process dies, so a
    restarted node takes its old id back.
    """
    directory = state_dir or default_state_dir()
    directory.mkdir(parents=True, exist_ok=True)
    host = _host_name()
    for slot in range(1, max_slots + 1):
        handle = open(directory / f"{host}-{slot}.lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _held.append(handle)
        return f"{host}-{slot}"
    raise ConfigError(f"more than {max_slots} nodes on this host; set --id")
