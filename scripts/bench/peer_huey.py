"""Huey tasks for the peer comparison; `huey_consumer peer_huey.huey` runs them.

Results are announced (`notify_result`), Huey's fastest way to wake a waiting `get`;
`noop_counted` (throughput) counts itself in Redis, `noop` (round trip) returns 0 so its
result is stored (Huey stores no None).
"""

from __future__ import annotations

import os

from huey import RedisHuey

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
DONE_KEY = "bench:huey:done"

huey = RedisHuey("bench", url=URL, notify_result=True)


@huey.task()
def noop_counted() -> None:
    huey.storage.conn.incr(DONE_KEY)


@huey.task()
def noop() -> int:
    return 0
