"""One plain master per fabric: an exclusive lock on its state directory, and a claim on its
topic root at the broker.

- The state lock is `flock` on `<state>/master.lock`, which names its holder (pid, host,
  master id, broker, root). The kernel drops it when the process dies, kill -9 included, so
  a crash never leaves a stale lock. A second master on the same directory is refused.
- The root claim is a retained message on `<root>/master/claim`, renewed every `ttl / 3`,
  with a will that marks it released, like the replicated masters' lease (master.lease). A
  starting master first reads what is retained there (a probe message of its own marks the
  end of it); a claim held by someone else that is renewed within `ttl` means a live master,
  and this one is refused, naming it. A claim not renewed for `ttl` is stale (its master died
  with the broker down) and is taken over. Two masters starting at once both publish, watch
  for `settle` seconds, and the earlier claim (then the smaller token) wins. A root whose
  replicated masters' lease (`<root>/master/lease`) is retained held is refused too.

Replicated masters (`serve --replica`) do not use either: they elect one holder themselves.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.defaults import DEFAULT_LEASE_TTL
from core.errors import ConfigError, DecodeError
from core.mqtt import MqttSession, TlsSettings, Will
from core.url import BrokerUrl
from master.lease import read_lease
from master.renewal import Renewer

__all__ = ["StateLock", "RootClaim", "Claim", "claim_topic", "LOCK_FILE_NAME"]

log = logging.getLogger("master-node")

LOCK_FILE_NAME = "master.lock"
HELD, RELEASED, PROBE = "held", "released", "probe"


def claim_topic(root: str) -> str:
    return f"{root}/master/claim"


def _describe(holder: dict[str, Any]) -> str:
    started = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(
        started, (int, float)) else "?"
    return (f"master {holder.get('holder', '?')!r} (pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, state {holder.get('state_dir', '?')}, since {when})")


class StateLock:
    """An exclusive, non-blocking `flock` on `<state>/master.lock`, held until `release`."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.path = Path(state_dir) / LOCK_FILE_NAME
        self._fd: int | None = None

    def acquire(self, **about: Any) -> StateLock:
        """Lock, or raise ConfigError naming the master that holds the lock."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"state directory {self.path.parent}: cannot open the lock: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = json.loads(os.pread(fd, 65536, 0) or b"{}")
            except (OSError, ValueError):
                holder = {}
            os.close(fd)
            raise ConfigError(
                f"state directory {self.path.parent} is in use by {_describe(holder)}, serving "
                f"root {holder.get('root', '?')!r} on {holder.get('broker', '?')}: stop it "
                "first, or give this master its own --state") from None
        record = dict(about, pid=os.getpid(), host=socket.gethostname(),
                      state_dir=str(self.path.parent.resolve()), since=time.time())
        data = json.dumps(record).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing drops the flock; the file stays, naming the last holder


@dataclass
class Claim:
    """One message seen on the claim topic."""

    payload: dict[str, Any]
    seen_at: float

    @property
    def state(self) -> str:
        return str(self.payload.get("state", ""))

    @property
    def token(self) -> str:
        return str(self.payload.get("token", ""))

    @property
    def order(self) -> tuple[float, str]:
        since = self.payload.get("since")
        return (float(since) if isinstance(since, (int, float)) else float("inf"), self.token)


@dataclass
class _Seen:
    messages: list[Claim] = field(default_factory=list)
    rejected: int = 0


class RootClaim:
    """This master's claim on its root; `acquire` raises ConfigError if another holds it."""

    def __init__(self, *, broker: BrokerUrl, root: str, master_id: str, state_dir: Path,
                 tls: TlsSettings | None = None, ttl: float = DEFAULT_LEASE_TTL,
                 settle: float = 1.0, probe_timeout: float = 3.0,
                 connect_timeout: float = 10.0) -> None:
        if not ttl > 0 or not settle >= 0:
            raise ConfigError("claim ttl must be positive and settle not negative")
        self.topic = claim_topic(root)
        self.root = root
        self.ttl, self.settle, self.probe_timeout = ttl, settle, probe_timeout
        self.connect_timeout = connect_timeout
        self.token = secrets.token_hex(8)
        self._record = {"holder": master_id, "token": self.token, "pid": os.getpid(),
                        "host": socket.gethostname(), "state_dir": str(Path(state_dir).resolve()),
                        "broker": str(broker), "root": root, "since": time.time()}
        self._renewals = 0
        self._seen = _Seen()
        self._changed = threading.Condition()
        self._renewer = Renewer(self._renew, every=ttl / 3, name="root-claim")
        self._acquired = False
        released = json.dumps({"state": RELEASED, "token": self.token}).encode()
        self._session = MqttSession(broker=broker, client_id=f"{master_id}-claim-{self.token[:6]}",
                                    keepalive=max(1, int(ttl)), tls=tls,
                                    will=Will(self.topic, released, qos=1, retain=True))
        self._session.subscribe(self.topic, self._on_message)
        self._lease: dict[str, Any] | None = None  # replicated masters' lease, if retained
        self._session.subscribe(f"{root}/master/lease", self._on_lease)

    @property
    def rejected(self) -> int:
        """Malformed messages seen on the claim topic (logged and counted, never fatal)."""
        return self._seen.rejected

    # -- messages

    def _on_message(self, _topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message
        try:
            data = json.loads(payload)
            if not isinstance(data, dict) or not isinstance(data.get("token"), str):
                raise DecodeError("not a claim")
        except (ValueError, DecodeError) as e:
            with self._changed:
                self._seen.rejected += 1
            log.warning("rejected a malformed message on %s (%d so far): %s", self.topic,
                        self._seen.rejected, e)
            return
        with self._changed:
            self._seen.messages.append(Claim(data, time.monotonic()))
            del self._seen.messages[:-256]
            self._changed.notify_all()
        if self._acquired and data.get("state") == HELD and \
                data.get("token") != self.token:
            log.warning("root %r also claimed by %s; renewing this master's claim", self.root,
                        _describe(data))

    def _on_lease(self, _topic: str, payload: bytes) -> None:
        """Replicated masters on this root: their lease, held or not (malformed: counted)."""
        lease = read_lease(payload, rejected=self._count_rejected, log=log)
        if lease is None:
            return
        with self._changed:
            self._lease = {"holder": lease.holder, "epoch": lease.epoch, "state": lease.state}

    def _count_rejected(self) -> int:
        with self._changed:
            self._seen.rejected += 1
            return self._seen.rejected

    def _wait(self, predicate: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = predicate(self._seen.messages)
                remaining = deadline - time.monotonic()
                if found or remaining <= 0:
                    return found
                self._changed.wait(remaining)

    def _others(self, messages: list[Claim], state: str | None = None) -> list[Claim]:
        return [m for m in messages if m.token != self.token and (state is None or m.state == state)]

    # -- claiming

    def acquire(self) -> RootClaim:
        self._session.start(timeout=self.connect_timeout)
        try:
            self._acquire()
        except BaseException:
            self._session.stop(timeout=1.0)
            raise
        self._acquired = True
        self._renewer.start()
        return self

    def _acquire(self) -> None:
        probe = json.dumps({"state": PROBE, "token": self.token}).encode()
        self._session.publish(self.topic, probe, qos=1)
        self._wait(lambda ms: any(m.token == self.token and m.state == PROBE for m in ms),
                   self.probe_timeout)  # whatever was retained came before it
        with self._changed:
            lease = self._lease
        if lease is not None and lease["state"] == HELD:
            raise ConfigError(f"root {self.root!r} on {self._record['broker']} is served by "
                              f"replicated masters (master {lease['holder']!r} holds their "
                              f"lease at epoch {lease['epoch']}): a plain master cannot join "
                              "them; run this one with --replica, or use another --root")
        holder = self._current_holder()
        if holder is not None:
            renewed = self._wait(lambda ms: self._renewed(ms, holder), self.ttl)
            if renewed:
                raise self._conflict(renewed.payload)
            log.warning("taking over the stale claim of %s on root %r: not renewed for %.1f s",
                        _describe(holder.payload), self.root, self.ttl)
        self._publish()
        since = time.monotonic()
        rival = self._wait(lambda ms: [m for m in self._others(ms, HELD) if m.seen_at >= since
                                       and m.order < self._order], self.settle)
        if rival:
            raise self._conflict(rival[0].payload)

    @property
    def _order(self) -> tuple[float, str]:
        return (float(self._record["since"]), self.token)

    def _current_holder(self) -> Claim | None:
        """The last word of another master: its claim, unless it released it since."""
        with self._changed:
            latest: dict[str, Claim] = {}
            for message in self._others(self._seen.messages):
                if message.state in (HELD, RELEASED):
                    latest[message.token] = message
        held = [m for m in latest.values() if m.state == HELD]
        return max(held, key=lambda m: m.seen_at) if held else None

    def _renewed(self, messages: list[Claim], holder: Claim) -> Claim | None:
        for message in messages:
            if message.token == holder.token and message.seen_at > holder.seen_at:
                return message if message.state == HELD else None
        return None

    def _conflict(self, holder: dict[str, Any]) -> ConfigError:
        return ConfigError(f"root {self.root!r} on {self._record['broker']} is served by "
                           f"{_describe(holder)}: one master per root. Stop it first, use "
                           "another --root, or run replicated masters (serve --replica)")

    def _publish(self) -> None:
        self._renewals += 1
        payload = json.dumps(dict(self._record, state=HELD, n=self._renewals)).encode()
        self._session.publish(self.topic, payload, qos=1, retain=True)

    def _renew(self, _now: float) -> None:
        try:
            self._publish()
        except Exception as e:  # disconnected: paho resends once the broker is back
            log.debug("claim renewal failed: %s", e)

    def release(self) -> None:
        """Stop renewing and clear the claim (released, retained), then disconnect."""
        self._renewer.stop(timeout=2.0)
        try:
            if self._session.connected and self._acquired:
                payload = json.dumps({"state": RELEASED, "token": self.token}).encode()
                self._session.publish_and_wait(self.topic, payload, qos=1, retain=True,
                                               timeout=2.0)
        except Exception as e:
            log.debug("could not release the claim: %s", e)
        self._session.stop(timeout=1.0)
