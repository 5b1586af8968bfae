"""Dramatiq actors for the peer comparison; a worker imports this module by name.

`noop_counted` (throughput) counts itself in Redis so the submitter sees the last one finish;
`noop` (round trip) stores its result for `message.get_result(block=True)`.
"""

from __future__ import annotations

import os

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
DONE_KEY = "bench:dramatiq:done"

broker = RedisBroker(url=URL)
broker.add_middleware(Results(backend=RedisBackend(url=URL)))
dramatiq.set_broker(broker)
_counter = redis.Redis.from_url(URL)


@dramatiq.actor(max_retries=0)
def noop_counted() -> None:
    _counter.incr(DONE_KEY)


@dramatiq.actor(max_retries=0, store_results=True)
def noop() -> None:
    return None
