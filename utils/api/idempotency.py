"""``Idempotency-Key`` on POST /generate and POST /upload (as Stripe and the IETF draft describe it).

The same key from the same caller, on the same endpoint, with the same body, within
TWIN_IDEMPOTENCY_HOURS, answers what the first request answered (same job / session; no second job).
The same key with a different body: 422 ``idempotency_key_reused``. While the first request with that
key is still being answered: 409 ``idempotency_in_flight``. A request that failed leaves nothing behind,
so retrying it runs it again. Keys are scoped by caller (an API key's or client token's hash): one
caller's key can never replay another caller's answer.

Two stores with one interface (begin / complete / abandon / forget_session / count), chosen in
``utils.services.build_idempotency`` from the settings: ``IdempotencyStore`` in jobs.db for local mode
(own table, own connection; SQLite WAL lets the two connections share the file), and
``RedisIdempotencyStore`` for cluster mode, where a retry may land on another API node and must see
the first node's record. The key itself is stored only as a hash, a session's records go with the
session, and an in-flight marker older than TWIN_IDEMPOTENCY_IN_FLIGHT_SECONDS is void (its node died).
"""
from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from utils import errors

HEADER = "Idempotency-Key"
# Printable ASCII without spaces at the ends; long enough for UUIDs and composite keys.
KEY_RE = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]{0,253}[\x21-\x7e])?$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency (
    owner TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    key_hash TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL,            -- in_flight | done
    status INTEGER,
    body TEXT,
    headers TEXT,
    session_id TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (owner, endpoint, key_hash)
);
CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency(created_at);
CREATE INDEX IF NOT EXISTS idempotency_session ON idempotency(session_id);
"""


class KeyReused(errors.TwinError):
    code = "idempotency_key_reused"
    http_status = 422


class InFlight(errors.TwinError):
    code = "idempotency_in_flight"
    http_status = 409

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


def parse_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not KEY_RE.match(value):
        raise errors.InvalidRequest(f"{HEADER}={value[:60]!r} must be 1-255 printable ASCII characters")
    return value


def fingerprint(*parts: Any) -> str:
    """A stable hash of what the request asked for (JSON with sorted keys; bytes hashed as they are)."""
    h = hashlib.sha256()
    for p in parts:
        data = p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, separators=(",", ":")).encode()
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()


def _key_reused(key: str, endpoint: str) -> KeyReused:
    return KeyReused(f"{HEADER}={key[:60]!r} was used with a different request to /{endpoint}; "
                     "use a new key for a new request")


def _in_flight(key: str) -> InFlight:
    return InFlight(f"the first request with {HEADER}={key[:60]!r} is still being answered; retry shortly")


class IdempotencyStore:
    def __init__(self, db_path: Path, hours: float, clock=time.time, in_flight_seconds: float = 180.0) -> None:
        self.ttl = hours * 3600
        self.in_flight_ttl = in_flight_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(db_path), check_same_thread=False, isolation_level=None, timeout=30)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @staticmethod
    def _hash(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    def begin(self, owner: str, endpoint: str, key: str, fp: str) -> tuple[int, dict, dict] | None:
        """None: go ahead (the key is now in flight). Otherwise (status, body, headers) to answer again."""
        kh, now = self._hash(key), self.clock()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM idempotency WHERE created_at < ?", (now - self.ttl,))
                # A marker nobody answered in time: the process that set it died (the row outlives it).
                self._db.execute("DELETE FROM idempotency WHERE state='in_flight' AND created_at < ?",
                                 (now - self.in_flight_ttl,))
                row = self._db.execute(
                    "SELECT fingerprint, state, status, body, headers FROM idempotency "
                    "WHERE owner=? AND endpoint=? AND key_hash=?", (owner, endpoint, kh)).fetchone()
                if row is None:
                    self._db.execute("INSERT INTO idempotency(owner, endpoint, key_hash, fingerprint, state, created_at) "
                                     "VALUES (?,?,?,?, 'in_flight', ?)", (owner, endpoint, kh, fp, now))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        if row is None:
            return None
        if row[0] != fp:
            raise _key_reused(key, endpoint)
        if row[1] == "in_flight":
            raise _in_flight(key)
        return int(row[2]), json.loads(row[3]), json.loads(row[4])

    def complete(self, owner: str, endpoint: str, key: str, status: int, body: dict, headers: dict,
                 session_id: str | None) -> None:
        with self._lock:
            self._db.execute("UPDATE idempotency SET state='done', status=?, body=?, headers=?, session_id=? "
                             "WHERE owner=? AND endpoint=? AND key_hash=?",
                             (status, json.dumps(body), json.dumps(headers), session_id, owner, endpoint,
                              self._hash(key)))

    def abandon(self, owner: str, endpoint: str, key: str) -> None:
        """The request failed: forget the key, so a retry runs again."""
        with self._lock:
            self._db.execute("DELETE FROM idempotency WHERE owner=? AND endpoint=? AND key_hash=? AND state='in_flight'",
                             (owner, endpoint, self._hash(key)))

    def forget_session(self, session_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM idempotency WHERE session_id=?", (session_id,))

    def count(self) -> int:
        """Records kept (in flight or done), for tests and status."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM idempotency").fetchone()[0]


# --- cluster mode ------------------------------------------------------------------------------
# Keys: <prefix>idem:<owner>:<endpoint>:<sha256(key)> -> JSON {fp, state, status, body, headers, session_id},
# PX = the in-flight TTL while in flight, the retention hours once done; <prefix>idem_session:<session id>
# -> set of that session's record keys (same TTL), so a session delete on any node finds them.
# Claim and read in one script: two nodes racing on one key see exactly one "claimed".
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


def _redis_guard(fn):
    """Redis away -> 503 queue_unavailable + Retry-After, as the job store answers (not a 500)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from utils.jobs.redis_store import redis_guard  # imports redis: only once cluster mode calls
        return redis_guard(fn)(*args, **kwargs)
    return wrapper


class RedisIdempotencyStore:
    """``IdempotencyStore``'s interface on the cluster's Redis (one record per key; see the keys above)."""

    def __init__(self, connection, hours: float, *, prefix: str = "twin:", in_flight_seconds: float = 180.0) -> None:
        self.redis, self.prefix = connection, prefix
        self.ttl_ms = max(1, int(hours * 3600 * 1000))
        self.in_flight_ms = max(1, int(in_flight_seconds * 1000))
        self._begin = connection.register_script(_BEGIN)
        self._complete = connection.register_script(_COMPLETE)
        self._abandon = connection.register_script(_ABANDON)

    def close(self) -> None:  # the connection belongs to the job store
        pass

    def _k(self, owner: str, endpoint: str, key: str) -> str:
        return f"{self.prefix}idem:{owner}:{endpoint}:{IdempotencyStore._hash(key)}"

    def _session_k(self, session_id: str) -> str:
        return f"{self.prefix}idem_session:{session_id}"

    @_redis_guard
    def begin(self, owner: str, endpoint: str, key: str, fp: str) -> tuple[int, dict, dict] | None:
        marker = json.dumps({"fp": fp, "state": "in_flight"})
        cur = self._begin(keys=[self._k(owner, endpoint, key)], args=[marker, self.in_flight_ms])
        if cur is None:
            return None
        rec = json.loads(cur)
        if rec["fp"] != fp:
            raise _key_reused(key, endpoint)
        if rec["state"] == "in_flight":
            raise _in_flight(key)
        return int(rec["status"]), rec["body"], rec["headers"]

    @_redis_guard
    def complete(self, owner: str, endpoint: str, key: str, status: int, body: dict, headers: dict,
                 session_id: str | None) -> None:
        # Only this request's in-flight marker becomes the answer (it keeps the marker's fingerprint): when
        # the marker expired, the key is free or another request's, and this answer is not kept.
        rec = json.dumps({"state": "done", "status": status, "body": body, "headers": headers,
                          "session_id": session_id})
        self._complete(keys=[self._k(owner, endpoint, key), self._session_k(session_id or "")],
                       args=[rec, self.ttl_ms, session_id or ""])

    @_redis_guard
    def abandon(self, owner: str, endpoint: str, key: str) -> None:
        self._abandon(keys=[self._k(owner, endpoint, key)])

    @_redis_guard
    def forget_session(self, session_id: str) -> None:
        sk = self._session_k(session_id)
        keys = list(self.redis.smembers(sk))
        self.redis.delete(sk, *keys)

    @_redis_guard
    def count(self) -> int:
        return sum(1 for _ in self.redis.scan_iter(match=f"{self.prefix}idem:*", count=500))


def idempotent(endpoint: str, owner: str | None, fp_parts: tuple, answer):
    """Run ``answer() -> (status, body, headers, session_id)`` once per Idempotency-Key: with a key from a
    known caller the first answer is kept and given again for the same request (``Idempotent-Replayed``)."""
    from flask import current_app, request
    idem = current_app.extensions["twin_idempotency"]
    key = parse_key(request.headers.get(HEADER))
    if key is None or owner is None:
        status, body, headers, _ = answer()
        return status, body, headers
    replay = idem.begin(owner, endpoint, key, fingerprint(*fp_parts))
    if replay is not None:
        status, body, headers = replay
        return status, body, {**headers, "Idempotent-Replayed": "true"}
    try:
        status, body, headers, session_id = answer()
    except BaseException:
        idem.abandon(owner, endpoint, key)
        raise
    idem.complete(owner, endpoint, key, status, body, headers, session_id)
    return status, body, headers
