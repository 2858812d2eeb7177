"""The cluster's Redis connection (TWIN_QUEUE_URL) and the one translation of its outages:
a connection failure anywhere becomes ``errors.ServiceNotReady`` (503 ``queue_unavailable`` +
Retry-After), never a 500."""
from __future__ import annotations

import functools

from utils import errors

PREFIX = "twin:"
RETRY_AFTER_S = 5


def _unreachable(e: Exception) -> errors.ServiceNotReady:
    return errors.ServiceNotReady(f"the job queue (Redis at TWIN_QUEUE_URL) is unreachable: {type(e).__name__}; "
                                  f"retry in {RETRY_AFTER_S} s", code="queue_unavailable", retry_after=RETRY_AFTER_S)


def redis_guard(fn):
    """Redis connection failures -> ServiceNotReady (503 + Retry-After) instead of a 500."""
    import redis

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                redis.exceptions.BusyLoadingError) as e:
            raise _unreachable(e) from None
    return wrapper


def connect(url: str):
    """A Redis client for TWIN_QUEUE_URL; short timeouts so a dead Redis answers 503 quickly, and
    health checks so a restarted Redis is reconnected without a restart of the node."""
    import redis
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10, health_check_interval=15,
                                retry_on_timeout=False)


def as_text(v) -> str:
    """A value read from Redis (bytes) as text."""
    return v.decode() if isinstance(v, bytes) else str(v)
