"""When a failed run is tried again: which error kinds, and how long the task waits first.

A retry waits `backoff * 2**(n-1)` seconds before its n-th retry, at most `backoff_max`,
less a random part of up to `jitter` of it, so that tasks failing together do not all come
back at the same instant. With a jitter below one half each wait is still longer than the
one before it (until the cap): the gaps between runs grow. `backoff` 0 retries at once.

`retry_on` names the error kinds that are retried; the word `error` stands for every kind
another run may cure (all but the permanent ones: unknown task, bad request, ..., timeout),
which is what is retried when nothing is said. A node lost under a task is not the task's
failure: it runs again at once, within its attempts, whatever the policy says.

Pure functions and a frozen policy; the random draw is a parameter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from core.errors import ConfigError
from core.protocol import MAX_ATTEMPTS, MAX_DELAY, TaskSpec

__all__ = ["RetryPolicy", "backoff_delay", "parse_retry_on", "check_delay", "ANY_ERROR",
           "DEFAULT_BACKOFF_MAX", "DEFAULT_JITTER", "registered_policy"]

ANY_ERROR = "error"          # in retry_on: every kind another run may cure
DEFAULT_BACKOFF_MAX = 300.0  # seconds: the longest wait between two runs, unless told
DEFAULT_JITTER = 0.25        # a wait is shortened by a random part of up to this much of it
_KIND = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def backoff_delay(retry: int, *, base: float, cap: float, jitter: float, rand: float) -> float:
    """Seconds to wait before retry number `retry` (1 for the first): `base` doubled per
    retry, at most `cap`, less `jitter * rand` of it (`rand` drawn from [0, 1))."""
    if base <= 0 or retry < 1:
        return 0.0
    full = cap if retry > 60 else min(cap, base * 2.0 ** (retry - 1))
    return full * (1.0 - jitter * min(max(rand, 0.0), 1.0))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a task's failed runs are retried (the master's default, or one task's own)."""

    backoff: float = 0.0
    backoff_max: float = DEFAULT_BACKOFF_MAX
    retry_on: frozenset[str] | None = None  # None: every curable kind (same as {"error"})
    jitter: float = DEFAULT_JITTER

    def __post_init__(self) -> None:
        check_delay("backoff", self.backoff)
        check_delay("backoff max", self.backoff_max)
        if not 0.0 <= self.jitter < 0.5:
            raise ConfigError(f"jitter {self.jitter!r}: must be at least 0 and below 0.5")

    def retries(self, kind: object, permanent: frozenset[str]) -> bool:
        """Is a run that failed with error `kind` tried again? `permanent`: the kinds that
        `error` leaves out (another run cannot cure them)."""
        curable = kind not in permanent
        if self.retry_on is None:
            return curable
        return kind in self.retry_on or (curable and ANY_ERROR in self.retry_on)

    def delay(self, retry: int, rand: float) -> float:
        """Seconds before retry number `retry` (1 for the first), given a draw from [0, 1)."""
        return backoff_delay(retry, base=self.backoff, cap=self.backoff_max, jitter=self.jitter,
                             rand=rand)

    def for_task(self, spec: TaskSpec) -> "RetryPolicy":
        """This policy with what the task says for itself in place of the defaults."""
        if spec.backoff is None and spec.backoff_max is None and spec.retry_on is None:
            return self
        return RetryPolicy(
            backoff=self.backoff if spec.backoff is None else spec.backoff,
            backoff_max=self.backoff_max if spec.backoff_max is None else spec.backoff_max,
            retry_on=self.retry_on if spec.retry_on is None else frozenset(spec.retry_on),
            jitter=self.jitter)


def registered_policy(hint: object, default: RetryPolicy) -> tuple[RetryPolicy, int]:
    """The retry policy a task was registered with on its node, which the node sends with
    each failed run (`error["retry"]`: any of max_attempts, backoff, backoff_max, retry_on),
    over `default`; and its attempts (0: not said). ConfigError for a hint that is not one."""
    if not isinstance(hint, dict) or not hint or \
            set(hint) - {"max_attempts", "backoff", "backoff_max", "retry_on"}:
        raise ConfigError(f"retry hint {hint!r}: not a map of max_attempts, backoff, "
                          "backoff_max, retry_on")
    attempts = hint.get("max_attempts", 0)
    if type(attempts) is not int or not 0 <= attempts <= MAX_ATTEMPTS:
        raise ConfigError(f"retry hint max_attempts {attempts!r}: must be 0-{MAX_ATTEMPTS}")
    retry_on = hint.get("retry_on")
    if retry_on is not None and (not isinstance(retry_on, list)
                                 or not all(isinstance(k, str) for k in retry_on)):
        raise ConfigError(f"retry hint retry_on {retry_on!r}: must be a list of error kinds")
    policy = RetryPolicy(
        backoff=check_delay("backoff", hint.get("backoff", default.backoff)),
        backoff_max=check_delay("backoff max", hint.get("backoff_max", default.backoff_max)),
        retry_on=default.retry_on if retry_on is None else
        frozenset(parse_retry_on(retry_on) if retry_on else ()),
        jitter=default.jitter)
    return policy, attempts


def check_delay(what: str, value: float) -> float:
    """A wait in seconds, 0 to a week; ConfigError naming `what` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 <= value <= MAX_DELAY:  # NaN fails the comparison
        raise ConfigError(f"{what} {value!r}: must be 0-{MAX_DELAY:g} seconds")
    return float(value)


def parse_retry_on(text: str | Iterable[str]) -> tuple[str, ...]:
    """Error kinds from `exception,timeout` (or a list); `none` retries no kind at all."""
    items = text.split(",") if isinstance(text, str) else list(text)
    kinds = tuple(k.strip() for k in items if k.strip())
    if kinds == ("none",):
        return ()
    bad = [k for k in kinds if not _KIND.match(k)]
    if bad or not kinds:
        raise ConfigError(f"retry-on {text!r}: give error kinds separated by commas (e.g. "
                          "error,timeout; `error` is every kind another run may cure), or none")
    return kinds
