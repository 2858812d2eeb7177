"""Local mode's job records: SQLite (WAL) in ``<data_dir>/jobs.db`` (the ``JobStore`` contract of
``utils.contracts``; cluster mode keeps the same records in Redis, ``utils.jobs.cluster.store``).

The job threads' in-memory queue only holds job ids; the database is the truth, so a restart re-reads
queued jobs and settles the ones that were running when the process died (see ``SqliteJobStore.recover``).

Restart policy: a job that was ``running`` when the server stopped ends ``failed`` with code
``interrupted`` (its outputs, if any were fully written, stay listed). With
``TWIN_REQUEUE_INTERRUPTED=1`` it is re-queued once instead; a second interruption fails it.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable

from utils import errors
from utils.jobs.status import CANCELED_BY_USER, JobStatus

log = logging.getLogger("twin.jobs")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at REAL NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL DEFAULT 'selfies',
    age_gate TEXT,
    age_gate_reason TEXT,
    median_apparent_age REAL
);
CREATE INDEX IF NOT EXISTS sessions_owner ON sessions(owner, seq);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    session_id TEXT,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    payload TEXT NOT NULL,
    request TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    outputs TEXT NOT NULL DEFAULT '[]',
    metadata TEXT,
    error_code TEXT,
    error_message TEXT,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq);
CREATE INDEX IF NOT EXISTS jobs_session ON jobs(session_id);
"""


class _Connection(sqlite3.Connection):
    """SQLITE_FULL (the volume ran out of space) becomes InsufficientStorage (507) wherever it happens."""

    def execute(self, *args, **kwargs):  # type: ignore[override]
        try:
            return super().execute(*args, **kwargs)
        except sqlite3.OperationalError as e:
            if (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF == 13 or "disk is full" in str(e):
                raise errors.InsufficientStorage("the data volume is full: the job database cannot be "
                                                 "written; free space under TWIN_DATA_DIR") from e
            raise

    def rollback_if_open(self) -> None:
        # SQLite may already have rolled back by itself (SQLITE_FULL does): a bare ROLLBACK would then
        # raise and hide the real error.
        if self.in_transaction:
            super().execute("ROLLBACK")


class SqliteJobStore:
    """All SQL lives here. One connection guarded by a lock: statements are short, and a lock is
    simpler and safer than per-thread connections for the dozens of pollers a server sees."""

    def __init__(self, db_path: Path) -> None:
        self.path = Path(db_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30,
                                   factory=_Connection)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            # Privacy: deleted rows (prompts, output paths of a deleted session) are overwritten with
            # zeros instead of lingering in free pages of jobs.db.
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.executescript(_SCHEMA)
            # Databases from before webhooks: add the column (NULL = no webhook).
            cols = {r["name"] for r in self._db.execute("PRAGMA table_info(jobs)")}
            if "webhook" not in cols:
                self._db.execute("ALTER TABLE jobs ADD COLUMN webhook TEXT")
            # Databases from before persona-only avatars: every session is an upload.
            session_cols = {r["name"] for r in self._db.execute("PRAGMA table_info(sessions)")}
            if "kind" not in session_cols:
                self._db.execute("ALTER TABLE sessions ADD COLUMN kind TEXT NOT NULL DEFAULT 'selfies'")
            # Databases from before the apparent-age gate: such sessions have none (NULL).
            for col, kind in (("age_gate", "TEXT"), ("age_gate_reason", "TEXT"), ("median_apparent_age", "REAL")):
                if col not in session_cols:
                    self._db.execute(f"ALTER TABLE sessions ADD COLUMN {col} {kind}")
        # Called after each committed change of a job (live events, utils/jobs/events.py):
        # listener(job_id, kind, data) with kind "status" (data: the job record), "progress"
        # ({"step", "total"}) or "output" (the output entry). A failing listener never fails the store.
        self.listeners: list[Callable[[str, str, dict], None]] = []

    def _emit(self, job_id: str, kind: str, data: dict | None = None) -> None:
        if not self.listeners:
            return
        if data is None:  # a status change: listeners get the whole record as it is now
            data = self.get(job_id)
            if data is None:
                return
        for listener in list(self.listeners):
            try:
                listener(job_id, kind, data)
            except Exception:  # noqa: BLE001 - events are a view; the job record is the truth
                log.exception("job event listener failed")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _one(self, sql: str, args: tuple = ()) -> sqlite3.Row | None:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def _all(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _exec(self, sql: str, args: tuple = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    # --- sessions --------------------------------------------------------------------------------
    def add_session(self, session_id: str, owner: str, created_at: float, kind: str = "selfies",
                    age_gate: dict | None = None) -> None:
        gate = age_gate or {}
        with self._lock:
            seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM sessions").fetchone()[0]
            self._db.execute("INSERT INTO sessions(id, owner, created_at, seq, kind, age_gate, age_gate_reason, "
                             "median_apparent_age) VALUES (?,?,?,?,?,?,?,?)",
                             (session_id, owner, created_at, seq, kind, gate.get("age_gate"),
                              gate.get("age_gate_reason"), gate.get("median_apparent_age")))

    def get_session(self, session_id: str) -> dict | None:
        row = self._one("SELECT * FROM sessions WHERE id=?", (session_id,))
        return dict(row) if row else None

    def latest_session(self, owner: str) -> dict | None:
        # Uploads only: a persona session (an identity='none' job's) is never the session a job goes to.
        row = self._one("SELECT * FROM sessions WHERE owner=? AND kind='selfies' ORDER BY seq DESC LIMIT 1",
                        (owner,))
        return dict(row) if row else None

    def sessions_older_than(self, cutoff: float) -> list[str]:
        return [r["id"] for r in self._all("SELECT id FROM sessions WHERE created_at < ?", (cutoff,))]

    def delete_session_records(self, session_id: str) -> None:
        with self._lock:
            job_ids = [r["id"] for r in self._db.execute("SELECT id FROM jobs WHERE session_id=?", (session_id,))]
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM jobs WHERE session_id=?", (session_id,))
                self._db.execute("DELETE FROM sessions WHERE id=?", (session_id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.rollback_if_open()
                raise
            # The WAL still holds the rows' earlier page images: fold it into the (zeroed) main file and
            # truncate it, so nothing of the session stays readable in jobs.db-wal either.
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        for job_id in job_ids:  # listeners drop what they hold of these jobs (kind "deleted")
            self._emit(job_id, "deleted", {})

    # --- jobs ------------------------------------------------------------------------------------
    def create_job(self, job_id: str, *, session_id: str | None, owner: str, payload: dict,
                   request: dict, queue_max: int, webhook: dict | None = None) -> dict:
        """Insert a queued job unless the queue is full (checked in the same transaction)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                depth = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status='queued'").fetchone()[0]
                if depth >= queue_max:
                    raise errors.QueueFull(f"the queue is full ({depth} jobs waiting, TWIN_QUEUE_MAX={queue_max}); "
                                           "try again later", retry_after=max(5, depth * 5))
                self._db.execute(
                    "INSERT INTO jobs(id, session_id, owner, status, payload, request, created_at, webhook) "
                    "VALUES (?,?,?,?,?,?,?,?)",
                    (job_id, session_id, owner, JobStatus.QUEUED.value, json.dumps(payload),
                     json.dumps(request), time.time(), json.dumps(webhook) if webhook else None))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.rollback_if_open()
                raise
        self._emit(job_id, "status")
        return self.get(job_id)  # type: ignore[return-value]

    def get(self, job_id: str) -> dict | None:
        row = self._one("SELECT * FROM jobs WHERE id=?", (job_id,))
        return _row_to_job(row) if row else None

    def position(self, job: dict) -> int | None:
        """1-based place among queued jobs; None when not queued."""
        if job["status"] != JobStatus.QUEUED.value:
            return None
        # 0 when a job thread claimed the job after ``job`` was read: it is no longer waiting, so no position.
        return self._one("SELECT COUNT(*) FROM jobs WHERE status='queued' AND seq <= ?", (job["seq"],))[0] or None

    def queued_ids(self) -> list[str]:
        return [r["id"] for r in self._all("SELECT id FROM jobs WHERE status='queued' ORDER BY seq")]

    def active_ids_for_session(self, session_id: str) -> list[str]:
        return [r["id"] for r in self._all(
            "SELECT id FROM jobs WHERE session_id=? AND status IN ('queued','running')", (session_id,))]

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in JobStatus}
        for r in self._all("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status"):
            out[r["status"]] = r["n"]
        return out

    def claim(self, job_id: str) -> bool:
        """queued -> running; False if it was canceled (or taken) meanwhile."""
        ok = self._exec("UPDATE jobs SET status='running', started_at=?, attempts=attempts+1 "
                        "WHERE id=? AND status='queued'", (time.time(), job_id)) == 1
        if ok:
            self._emit(job_id, "status")
        return ok

    def set_progress(self, job_id: str, step: int, total: int, extra: dict | None = None) -> None:
        self._exec("UPDATE jobs SET step=?, total=? WHERE id=?", (int(step), int(total), job_id))
        self._emit(job_id, "progress", {**(extra or {}), "step": int(step), "total": int(total), "at": time.time()})

    def add_output(self, job_id: str, output: dict) -> None:
        """Called only after the file is in place (atomic rename)."""
        with self._lock:
            row = self._db.execute("SELECT outputs FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                return
            outs = json.loads(row["outputs"])
            outs.append(output)
            self._db.execute("UPDATE jobs SET outputs=? WHERE id=?", (json.dumps(outs), job_id))
        self._emit(job_id, "output", output)

    def add_webhook_delivery(self, job_id: str, record: dict, keep: int = 50) -> None:
        """One delivery attempt (event, attempt, status or error, time); the last ``keep`` are kept."""
        with self._lock:
            row = self._db.execute("SELECT webhook FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or not row["webhook"]:
                return
            hook = json.loads(row["webhook"])
            hook["deliveries"] = (hook.get("deliveries", []) + [record])[-keep:]
            self._db.execute("UPDATE jobs SET webhook=? WHERE id=?", (json.dumps(hook), job_id))

    def finish(self, job_id: str, status: JobStatus, *, code: str | None = None, message: str | None = None,
               metadata: dict | None = None) -> bool:
        """Move a non-terminal job to a terminal state (never overwrites a terminal one)."""
        assert status.terminal
        ok = self._exec(
            "UPDATE jobs SET status=?, finished_at=?, error_code=?, error_message=?, "
            "metadata=COALESCE(?, metadata) WHERE id=? AND status IN ('queued','running')",
            (status.value, time.time(), code, message, json.dumps(metadata) if metadata is not None else None,
             job_id)) == 1
        if ok:
            self._emit(job_id, "status")
        return ok

    def cancel_queued(self, job_id: str) -> bool:
        ok = self._exec("UPDATE jobs SET status='canceled', finished_at=?, error_code=?, error_message=? "
                        "WHERE id=? AND status='queued'",
                        (time.time(), CANCELED_BY_USER["code"], CANCELED_BY_USER["message"], job_id)) == 1
        if ok:
            self._emit(job_id, "status")
        return ok

    def requeue(self, job_id: str) -> bool:
        """running -> queued for a graceful stop: it runs again from the start after the restart. The
        attempt is given back, so a later crash still gets its one TWIN_REQUEUE_INTERRUPTED retry."""
        ok = self._exec("UPDATE jobs SET status='queued', step=0, total=0, started_at=NULL, outputs='[]', "
                        "attempts=MAX(attempts-1, 0) WHERE id=? AND status='running'", (job_id,)) == 1
        if ok:
            self._emit(job_id, "status")
        return ok

    def recover(self, requeue: bool) -> dict[str, list[str]]:
        """Settle jobs that were running when the process died. Returns {"requeued": [...], "failed": [...]}."""
        out: dict[str, list[str]] = {"requeued": [], "failed": []}
        with self._lock:
            rows = self._db.execute("SELECT id, attempts FROM jobs WHERE status='running'").fetchall()
        for r in rows:
            if requeue and r["attempts"] <= 1:
                self._exec("UPDATE jobs SET status='queued', step=0, total=0, started_at=NULL, outputs='[]' "
                           "WHERE id=? AND status='running'", (r["id"],))
                self._emit(r["id"], "status")
                out["requeued"].append(r["id"])
            else:
                self.finish(r["id"], JobStatus.FAILED, code="interrupted",
                            message="the server stopped while this job was running; submit it again")
                out["failed"].append(r["id"])
        return out


def _row_to_job(row: sqlite3.Row) -> dict:
    job = dict(row)
    job["payload"] = json.loads(job["payload"])
    job["request"] = json.loads(job["request"])
    job["outputs"] = json.loads(job["outputs"])
    job["metadata"] = json.loads(job["metadata"]) if job["metadata"] else None
    job["webhook"] = json.loads(job["webhook"]) if job.get("webhook") else None
    return job
