"""A thread that renews a claim or lease every `every` seconds, at once when asked to, and
ends when told to or when its check says the thing renewed is no longer ours.

Shared by the plain master's root claim (master.claim) and the replicated masters' lease
holder (master.lease_holder), so both renew by the same loop.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

__all__ = ["Renewer"]


class Renewer:
    """`renew(now)` every `every` seconds (the first one `every` after `start`), and at once
    after `renew_soon()`. `check()` runs at least every `poll` seconds; False ends the thread.
    It can be started again after `stop`."""

    def __init__(self, renew: Callable[[float], None], *, every: float, name: str,
                 check: Callable[[], bool] | None = None, poll: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._renew = renew
        self.every = every
        self.poll = every if poll is None else poll
        self._check = check
        self._clock = clock
        self._name = name
        self._soon = threading.Event()      # renew now (or stop: then _stopping is set too)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def renew_soon(self) -> None:
        """Renew at once instead of waiting for the next interval."""
        self._soon.set()

    def stop(self, *, timeout: float = 2.0) -> None:
        """End the thread and wait for it (bounded; not when called from the thread itself)."""
        self._stopping.set()
        self._soon.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._soon.clear()

    def _run(self) -> None:
        next_renew = self._clock() + self.every
        while not self._stopping.is_set():
            if self._check is not None and not self._check():
                return
            now = self._clock()
            if now >= next_renew or self._soon.is_set():
                self._soon.clear()
                self._renew(now)
                next_renew = now + self.every
            self._soon.wait(min(self.poll, max(0.0, next_renew - now)))
