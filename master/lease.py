"""The active master's lease and the election of the next one, as pure rules.

Every rule takes the clock as a parameter (seconds on the caller's own monotonic clock: wall
clocks of different machines are never compared), so each is tested without sleeping.

- The holder renews the lease every `renew_every` (ttl/3). It may act (dispatch, answer
  clients) only while its last *confirmed* renewal (the broker echoed it back) was sent less
  than `ttl` ago, and while it sees no lease that outranks its own (`lease_key`). A holder
  that lapses by its own clock never renews again: it steps down, so a standby that saw no
  renewal for `ttl` can never overlap with it.
- A standby counts the lease gone when the holder's will (`expired`) arrives or no renewal
  came for `ttl`, but only after watching the lease topic itself for `ttl` without a break
  (a standby just started, reconnected, or resumed after being frozen first catches up).
- Standbys rank themselves by journal position, most up to date first, then id; rank r
  claims the next epoch `r × rank_step` after the lapse unless a claim appeared meanwhile.
- A claim settles for `settle` (more than one renewal interval): any renewal of a live holder
  or a better claim seen meanwhile makes the claimant back off. Between simultaneous claims
  the better (epoch, journal position, id) wins.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from core.defaults import DEFAULT_LEASE_TTL
from core.errors import ConfigError, DecodeError
from core.replication import CLAIM, EXPIRED, HELD, Lease

__all__ = ["Position", "LeaseTiming", "SeenClaim", "LeaseView", "election_rank", "claim_key",
           "holder_valid", "clock_jumped", "claim_epoch", "settle_verdict", "outranks",
           "live_candidates", "read_lease", "WAIT", "WON", "LOST"]

Position = tuple[int, int]   # (journal epoch, journal seq): how far a master's journal goes
WAIT, WON, LOST = "wait", "won", "lost"


@dataclass(frozen=True)
class LeaseTiming:
    """How long a lease lives and the waits derived from it (seconds)."""

    ttl: float = DEFAULT_LEASE_TTL
    renew_every: float = 0.0    # 0: ttl / 3
    settle: float = 0.0         # 0: ttl / 2 (more than a renewal interval)
    rank_step: float = 0.5      # between the claims of successive ranks
    claim_grace: float = 2.0    # longest wait for the broker to echo our own claim
    ack_timeout: float = 2.0    # a standby that does not confirm a delta this long is lagging

    def __post_init__(self) -> None:
        if not self.ttl > 0:
            raise ConfigError(f"lease ttl must be positive, got {self.ttl!r}")
        if not self.renew_every:
            object.__setattr__(self, "renew_every", self.ttl / 3)
        if not self.settle:
            object.__setattr__(self, "settle", self.ttl / 2)
        if not 0 < self.renew_every < self.ttl:
            raise ConfigError("the lease must be renewed more often than it lives")
        if not self.renew_every < self.settle:
            raise ConfigError("a claim must settle for longer than one renewal interval")
        if self.rank_step < 0 or self.claim_grace <= 0 or self.ack_timeout <= 0:
            raise ConfigError("rank_step, claim_grace and ack_timeout must be positive")


def claim_key(epoch: int, position: Position, holder: str) -> tuple[int, int, int, str]:
    """How simultaneous claims compare: higher epoch, then the more complete journal, then id."""
    return (epoch, position[0], position[1], holder)


def election_rank(me: str, candidates: Mapping[str, Position]) -> int:
    """My place among the live candidates (me included): most up-to-date journal first, ties
    by id, so every standby computes the same order from the same presences."""
    order = sorted(candidates.items(), key=lambda item: (-item[1][0], -item[1][1], item[0]))
    return [name for name, _position in order].index(me)


def holder_valid(*, now: float, confirmed_sent_at: float | None, ttl: float) -> bool:
    """May the holder act? Only while its last confirmed renewal was sent less than ttl ago
    (a standby counts from when it *received* that renewal, which is later)."""
    return confirmed_sent_at is not None and now - confirmed_sent_at < ttl


def clock_jumped(previous_tick: float, now: float, *, limit: float) -> bool:
    """A gap between two ticks of a loop that ticks often: the process was frozen (SIGSTOP,
    swap, a debugger) and what it believes about others is stale."""
    return now - previous_tick > limit


def outranks(lease: Lease, mine: tuple[int, str]) -> bool:
    """A held or expired lease that beats the holder's own: someone else won a later epoch."""
    return lease.state != CLAIM and lease.key > mine


@dataclass(frozen=True)
class SeenClaim:
    holder: str
    epoch: int
    position: Position
    seen_at: float

    @property
    def key(self) -> tuple[int, int, int, str]:
        return claim_key(self.epoch, self.position, self.holder)


class LeaseView:
    """What one master has seen on the lease topic, timed by its own clock."""

    def __init__(self, *, ttl: float, now: float) -> None:
        self.ttl = ttl
        self.best: tuple[int, str] = (0, "")   # the latest lease (epoch, holder) seen
        self.best_state: str | None = None
        self.last_renewal: float | None = None  # when the best lease was last seen held
        self.expired_at: float | None = None    # when the best lease was seen expired
        self.watching_since = now
        self.max_epoch = 0                      # highest epoch in any lease or claim seen
        self.claims: list[SeenClaim] = []
        self.renewals: dict[tuple[int, str], float] = {}  # held lease -> when last seen

    def restart_watch(self, now: float) -> None:
        """Forget the timing seen so far (reconnected, or the clock jumped): watch ttl again."""
        self.watching_since = now
        if self.last_renewal is not None:
            self.last_renewal = now
        if self.expired_at is not None:
            self.expired_at = now

    def observe(self, lease: Lease, now: float) -> str:
        """Take in one lease message; what it was: 'renewal', 'new_holder', 'expired',
        'claim' or 'stale' (older than what was seen already)."""
        self.max_epoch = max(self.max_epoch, lease.epoch)
        key = lease.key
        if lease.state == CLAIM:
            self.claims = [c for c in self.claims if now - c.seen_at < 60.0]
            self.claims.append(SeenClaim(lease.holder, lease.epoch, lease.position, now))
            return "claim"
        if key < self.best:
            return "stale"
        if lease.state == HELD:
            self.renewals[key] = now
            if len(self.renewals) > 16:
                oldest = min(self.renewals, key=self.renewals.__getitem__)
                del self.renewals[oldest]
            event = "renewal" if key == self.best and self.best_state == HELD else "new_holder"
            self.best, self.best_state = key, HELD
            self.last_renewal, self.expired_at = now, None
            return event
        if lease.state == EXPIRED:
            if key == self.best and self.best_state == EXPIRED:
                return "stale"  # the same will again (a retained copy): keep its first time
            self.best, self.best_state = key, EXPIRED
            self.expired_at = now
            return "expired"
        return "stale"

    @property
    def holder(self) -> str | None:
        """The current holder, if the latest lease seen is held."""
        return self.best[1] if self.best_state == HELD else None

    def lapsed_at(self) -> float:
        """Since when the lease counts as gone (in the future while it is held)."""
        if self.best_state == EXPIRED and self.expired_at is not None:
            gone = self.expired_at
        elif self.last_renewal is not None:
            gone = self.last_renewal + self.ttl
        else:
            gone = self.watching_since  # never saw one
        return max(gone, self.watching_since + self.ttl)

    def lapsed(self, now: float) -> bool:
        return now >= self.lapsed_at()

    def held_since(self, since: float, *, min_epoch: int, other_than: str) -> bool:
        """Was a lease of epoch ≥ min_epoch seen held by someone else since `since`?"""
        return any(seen >= since and epoch >= min_epoch and holder != other_than
                   for (epoch, holder), seen in self.renewals.items())

    def better_claims(self, mine: tuple[int, int, int, str], *, since: float) -> list[SeenClaim]:
        return [c for c in self.claims if c.seen_at >= since and c.holder != mine[3]
                and c.key > mine]

    def pending_claims(self, now: float, *, window: float, other_than: str) -> list[SeenClaim]:
        """Claims for an epoch beyond the latest lease, seen within `window`: an election is
        under way, give it time to settle."""
        return [c for c in self.claims if c.holder != other_than and c.epoch > self.best[0]
                and now - c.seen_at < window]


def claim_epoch(view: LeaseView, *, now: float, me: str, position: Position,
                candidates: Mapping[str, Position], timing: LeaseTiming,
                known_epoch: int = 0) -> int | None:
    """The epoch this standby should claim now, or None to keep waiting.

    `candidates` are the other live standbys' journal positions (from their presence)."""
    if not view.lapsed(now):
        return None
    rank = election_rank(me, {**candidates, me: position})
    if now < view.lapsed_at() + rank * timing.rank_step:
        return None
    if view.pending_claims(now, window=timing.settle + timing.claim_grace, other_than=me):
        return None
    return max(view.max_epoch, known_epoch) + 1


def settle_verdict(view: LeaseView, *, now: float, me: str, epoch: int, position: Position,
                   claimed_at: float, echoed: bool, timing: LeaseTiming) -> str:
    """WON, LOST or WAIT for a claim of `epoch` made at `claimed_at`."""
    if view.held_since(claimed_at, min_epoch=epoch - 1, other_than=me):
        return LOST   # the holder is alive after all, or someone else already won
    if view.better_claims(claim_key(epoch, position, me), since=claimed_at - timing.settle):
        return LOST
    if view.max_epoch > epoch:
        return LOST
    if now < claimed_at + timing.settle:
        return WAIT
    if not echoed:
        return LOST if now >= claimed_at + timing.settle + timing.claim_grace else WAIT
    return WON


def live_candidates(presences: Iterable[tuple[str, str, Position]], *, me: str
                    ) -> dict[str, Position]:
    """(id, role, position) of the masters whose presence is known → the standbys that may
    take over (neither dead, offline nor active), me excluded."""
    return {name: position for name, role, position in presences
            if name != me and role in ("standby", "syncing", "claiming")}


def read_lease(payload: bytes, *, rejected: Callable[[], int], log: logging.Logger
               ) -> Lease | None:
    """A message of the lease topic, or None for a cleared (empty) one and for a malformed
    one, which is never fatal: `rejected()` counts it (returning the count so far) and it is
    logged on `log`."""
    if not payload:
        return None
    try:
        return Lease.decode(payload)
    except DecodeError as e:
        log.warning("rejected a malformed lease (%d so far): %s", rejected(), e)
        return None
