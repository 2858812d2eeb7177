"""Local mode's Idempotency-Key records (the ``IdempotencyStore`` contract of ``utils.contracts``): their
own table in jobs.db, on their own connection (SQLite WAL lets two connections share the file). The
HTTP side (header, key check, request fingerprint) is ``utils.api.idempotency``; cluster mode keeps the
records in Redis (``utils.jobs.cluster.idempotency``).

The key itself is stored only as a hash, a session's records go with the session, and an in-flight
marker older than TWIN_IDEMPOTENCY_IN_FLIGHT_SECONDS is void (the process that set it died).
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path

from utils import errors

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


def key_hash(key: str) -> str:
    """What is stored of an Idempotency-Key: its SHA-256 (the key may be a secret of the caller's)."""
    return hashlib.sha256(key.encode()).hexdigest()


class SqliteIdempotencyStore:
    """Idempotency-Key records in jobs.db (see the module doc)."""

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

    def begin(self, owner: str, endpoint: str, key: str, fp: str) -> tuple[int, dict, dict] | None:
        """None: go ahead (the key is now in flight). Otherwise (status, body, headers) to answer again."""
        kh, now = key_hash(key), self.clock()
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
            raise errors.IdempotencyKeyReused.of(key, endpoint)
        if row[1] == "in_flight":
            raise errors.IdempotencyInFlight.of(key)
        return int(row[2]), json.loads(row[3]), json.loads(row[4])

    def complete(self, owner: str, endpoint: str, key: str, status: int, body: dict, headers: dict,
                 session_id: str | None) -> None:
        with self._lock:
            self._db.execute("UPDATE idempotency SET state='done', status=?, body=?, headers=?, session_id=? "
                             "WHERE owner=? AND endpoint=? AND key_hash=?",
                             (status, json.dumps(body), json.dumps(headers), session_id, owner, endpoint,
                              key_hash(key)))

    def abandon(self, owner: str, endpoint: str, key: str) -> None:
        """The request failed: forget the key, so a retry runs again."""
        with self._lock:
            self._db.execute("DELETE FROM idempotency WHERE owner=? AND endpoint=? AND key_hash=? AND state='in_flight'",
                             (owner, endpoint, key_hash(key)))

    def forget_session(self, session_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM idempotency WHERE session_id=?", (session_id,))

    def count(self) -> int:
        """Records kept (in flight or done), for tests and status."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM idempotency").fetchone()[0]
