"""Job events in cluster mode: the ``EventLog`` contract (``utils.contracts``) on Redis streams, so any
API node serves ``GET /events`` for any job, whichever GPU worker runs it.

One stream per job (``<prefix>events:<job_id>``) with explicit ids ``0-1``, ``0-2``, … so the SSE ``id:``
stays the dense per-job counter of local mode. A Lua script numbers and appends in one step: the API
node (queued, canceled) and the GPU worker (running, progress, previews, outputs, done) both publish, and
their events must not interleave out of order. Streams expire ``keep_seconds`` after ``done`` (a day
after their last event otherwise, so an abandoned job's stream cannot linger). The latest preview JPEG
of a running job is one key beside its stream.
"""
from __future__ import annotations

import json

from utils.jobs.events import Event

_PUBLISH = """
if ARGV[1] == 'progress' and redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  return false
end
local n = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[1], '0-' .. n, 'type', ARGV[1], 'data', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return n
"""

_LIVE_TTL = 24 * 3600


class RedisEventLog:
    """The ``EventLog`` contract on Redis streams (see the module doc)."""

    def __init__(self, connection, *, prefix: str, max_events_per_job: int = 2000, keep_seconds: float = 600.0) -> None:
        self.r = connection
        self.prefix = prefix
        self.max_events_per_job = max_events_per_job
        self.keep_seconds = int(keep_seconds)
        self._publish = self.r.register_script(_PUBLISH)

    def _keys(self, job_id: str) -> tuple[str, str]:
        return f"{self.prefix}events:{job_id}", f"{self.prefix}events-seq:{job_id}"

    def publish(self, job_id: str, type_: str, data: dict) -> int | None:
        ttl = self.keep_seconds if type_ == "done" else _LIVE_TTL
        n = self._publish(keys=list(self._keys(job_id)),
                          args=[type_, json.dumps(data, separators=(",", ":")), self.max_events_per_job, ttl])
        return None if n is None else int(n)

    def known(self, job_id: str) -> bool:
        return bool(self.r.exists(self._keys(job_id)[0]))

    def read(self, job_id: str, after: int = 0, timeout: float = 0.0) -> list[Event]:
        key = self._keys(job_id)[0]
        if timeout > 0:
            got = self.r.xread({key: f"0-{after}"}, block=max(1, int(timeout * 1000)))
            entries = got[0][1] if got else []
        else:
            entries = self.r.xrange(key, min=f"(0-{after}", max="+")
        out = []
        for entry_id, fields in entries:
            eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            f = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                 for k, v in fields.items()}
            out.append(Event(int(eid.split("-", 1)[1]), f["type"], json.loads(f["data"])))
        return out

    def forget(self, job_id: str) -> None:
        self.r.delete(*self._keys(job_id), f"{self.prefix}preview:{job_id}")

    def wake_all(self) -> None:
        """Readers block at most one re-check interval (utils/api/events.py): nothing to wake."""

    # --- the latest live preview of a running job ---
    def set_preview(self, job_id: str, step: int, jpeg: bytes) -> None:
        self.r.set(f"{self.prefix}preview:{job_id}", str(step).encode() + b":" + jpeg, ex=3600)

    def get_preview(self, job_id: str) -> tuple[int, bytes] | None:
        raw = self.r.get(f"{self.prefix}preview:{job_id}")
        if raw is None:
            return None
        step, _, jpeg = raw.partition(b":")
        return int(step), jpeg

    def drop_preview(self, job_id: str) -> None:
        self.r.delete(f"{self.prefix}preview:{job_id}")
