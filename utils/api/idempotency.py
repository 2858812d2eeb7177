"""``Idempotency-Key`` on POST /generate and POST /upload (as Stripe and the IETF draft describe it).

The same key from the same caller, on the same endpoint, with the same body, within
TWIN_IDEMPOTENCY_HOURS, answers what the first request answered (same job / session; no second job).
The same key with a different body: 422 ``idempotency_key_reused``. While the first request with that
key is still being answered: 409 ``idempotency_in_flight``. A request that failed leaves nothing behind,
so retrying it runs it again. Keys are scoped by caller (an API key's or client token's hash): one
caller's key can never replay another caller's answer.

Records live in jobs.db (own table, own connection; SQLite WAL lets the two connections share the
file). The key itself is stored only as a hash, and a session's records go with the session.
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


class IdempotencyStore:
    def __init__(self, db_path: Path, hours: float, clock=time.time) -> None:
        self.ttl = hours * 3600
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
            raise KeyReused(f"{HEADER}={key[:60]!r} was used with a different request to /{endpoint}; "
                            "use a new key for a new request")
        if row[1] == "in_flight":
            raise InFlight(f"the first request with {HEADER}={key[:60]!r} is still being answered; retry shortly")
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
