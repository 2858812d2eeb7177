"""Cluster mode's Idempotency-Key records (the ``IdempotencyStore`` contract of ``utils.contracts``) in
the cluster's Redis, where a retry that lands on another API node must see the first node's record.

Keys: <prefix>idem:<owner>:<endpoint>:<sha256(key)> -> JSON {fp, state, status, body, headers, session_id},
PX = the in-flight TTL while in flight, the retention hours once done; <prefix>idem_session:<session id>
-> set of that session's record keys (same TTL), so a session delete on any node finds them.
Claim and read in one script: two nodes racing on one key see exactly one "claimed".
"""
from __future__ import annotations

import hashlib
import json

from utils import errors
from utils.jobs.cluster.connection import PREFIX, redis_guard

_BEGIN = """
local cur = redis.call('GET', KEYS[1])
if cur then return cur end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""
# Only an in-flight marker becomes the answer / is dropped: a key another request already answered
# (after this one's marker expired) keeps that answer.
_COMPLETE = """
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local marker = cjson.decode(cur)
if marker['state'] ~= 'in_flight' then return 0 end
-- ARGV[1] is the answer's JSON object; the marker's fingerprint (hex) goes in front, the answer
-- itself is stored as Python wrote it (no re-encoding by cjson).
redis.call('SET', KEYS[1], '{"fp": "' .. marker['fp'] .. '", ' .. string.sub(ARGV[1], 2), 'PX', ARGV[2])
if ARGV[3] ~= '' then
  redis.call('SADD', KEYS[2], KEYS[1])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return 1
"""
_ABANDON = """
local cur = redis.call('GET', KEYS[1])
if cur and cjson.decode(cur)['state'] == 'in_flight' then redis.call('DEL', KEYS[1]) return 1 end
return 0
"""


class RedisIdempotencyStore:
    """The ``IdempotencyStore`` contract on the cluster's Redis (one record per key; see the module doc)."""

    def __init__(self, connection, hours: float, *, prefix: str = PREFIX, in_flight_seconds: float = 180.0) -> None:
        self.redis, self.prefix = connection, prefix
        self.ttl_ms = max(1, int(hours * 3600 * 1000))
        self.in_flight_ms = max(1, int(in_flight_seconds * 1000))
        self._begin = connection.register_script(_BEGIN)
        self._complete = connection.register_script(_COMPLETE)
        self._abandon = connection.register_script(_ABANDON)

    def close(self) -> None:  # the connection belongs to the job store
        pass

    def _k(self, owner: str, endpoint: str, key: str) -> str:
        # Only a hash of the key is stored (the key may be a secret of the caller's).
        return f"{self.prefix}idem:{owner}:{endpoint}:{hashlib.sha256(key.encode()).hexdigest()}"

    def _session_k(self, session_id: str) -> str:
        return f"{self.prefix}idem_session:{session_id}"

    @redis_guard
    def begin(self, owner: str, endpoint: str, key: str, fp: str) -> tuple[int, dict, dict] | None:
        marker = json.dumps({"fp": fp, "state": "in_flight"})
        cur = self._begin(keys=[self._k(owner, endpoint, key)], args=[marker, self.in_flight_ms])
        if cur is None:
            return None
        rec = json.loads(cur)
        if rec["fp"] != fp:
            raise errors.IdempotencyKeyReused.of(key, endpoint)
        if rec["state"] == "in_flight":
            raise errors.IdempotencyInFlight.of(key)
        return int(rec["status"]), rec["body"], rec["headers"]

    @redis_guard
    def complete(self, owner: str, endpoint: str, key: str, status: int, body: dict, headers: dict,
                 session_id: str | None) -> None:
        # Only this request's in-flight marker becomes the answer (it keeps the marker's fingerprint): when
        # the marker expired, the key is free or another request's, and this answer is not kept.
        rec = json.dumps({"state": "done", "status": status, "body": body, "headers": headers,
                          "session_id": session_id})
        self._complete(keys=[self._k(owner, endpoint, key), self._session_k(session_id or "")],
                       args=[rec, self.ttl_ms, session_id or ""])

    @redis_guard
    def abandon(self, owner: str, endpoint: str, key: str) -> None:
        self._abandon(keys=[self._k(owner, endpoint, key)])

    @redis_guard
    def forget_session(self, session_id: str) -> None:
        sk = self._session_k(session_id)
        keys = list(self.redis.smembers(sk))
        self.redis.delete(sk, *keys)

    @redis_guard
    def count(self) -> int:
        return sum(1 for _ in self.redis.scan_iter(match=f"{self.prefix}idem:*", count=500))
