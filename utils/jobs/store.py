"""Durable jobs: SQLite records (WAL), a bounded queue, worker threads, cancellation.

Job records and session ownership live in ``<data_dir>/jobs.db``. The in-memory queue only holds job
ids; the database is the truth, so a restart re-reads queued jobs and settles the ones that were
running when the process died (see ``JobStore.recover``).

Restart policy: a job that was ``running`` when the server stopped ends ``failed`` with code
``interrupted`` (its outputs, if any were fully written, stay listed). With
``TWIN_REQUEUE_INTERRUPTED=1`` it is re-queued once instead; a second interruption fails it.
"""
from __future__ import annotations

import enum
import json
import logging
import queue
import sqlite3
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from utils import errors
from utils.logging import log_context
from utils.storage import thumbnail_name

log = logging.getLogger("twin.jobs")


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


TERMINAL = tuple(s.value for s in JobStatus if s.terminal)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at REAL NOT NULL,
    seq INTEGER NOT NULL
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


class JobStore:
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
    def add_session(self, session_id: str, owner: str, created_at: float) -> None:
        with self._lock:
            seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM sessions").fetchone()[0]
            self._db.execute("INSERT INTO sessions(id, owner, created_at, seq) VALUES (?,?,?,?)",
                             (session_id, owner, created_at, seq))

    def get_session(self, session_id: str) -> dict | None:
        row = self._one("SELECT * FROM sessions WHERE id=?", (session_id,))
        return dict(row) if row else None

    def latest_session(self, owner: str) -> dict | None:
        row = self._one("SELECT * FROM sessions WHERE owner=? ORDER BY seq DESC LIMIT 1", (owner,))
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
        # 0 when a worker claimed the job after ``job`` was read: it is no longer waiting, so no position.
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

    def set_progress(self, job_id: str, step: int, total: int) -> None:
        self._exec("UPDATE jobs SET step=?, total=? WHERE id=?", (int(step), int(total), job_id))
        self._emit(job_id, "progress", {"step": int(step), "total": int(total), "at": time.time()})

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
        ok = self._exec("UPDATE jobs SET status='canceled', finished_at=?, error_code='canceled', "
                        "error_message='canceled by the user' WHERE id=? AND status='queued'",
                        (time.time(), job_id)) == 1
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


def failure_outcome(exc: BaseException, oom: bool) -> tuple[str, str]:
    """(error code, message) a failed job records: the TwinError's own, OOM's, or a generic one."""
    if isinstance(exc, errors.TwinError):
        return exc.code, exc.message
    if oom:
        return "out_of_memory", "the GPU ran out of memory; try fewer images or a smaller size"
    return "internal_error", "generation failed because of an internal error"


def job_json(job: dict, store: JobStore, *, url_for_output: Callable[[str, str], str],
             status_url: str | None = None) -> dict:
    """The one JSON shape of a job, used by every endpoint that returns a job."""
    step, total = job["step"], job["total"]
    fraction = (step / total) if total else (1.0 if job["status"] == "succeeded" else 0.0)
    eta = None
    if job["status"] == "running" and job["started_at"] and step > 0 and total:
        elapsed = time.time() - job["started_at"]
        eta = round(elapsed / step * (total - step), 2)
    elif job["status"] == "succeeded":
        eta = 0.0
    error = {"code": job["error_code"], "message": job["error_message"]} if job["error_code"] else None
    return {
        "id": job["id"],
        "job_id": job["id"],
        "status": job["status"],
        # Runs of this job so far (1 once it started; 2+ when a cluster worker died and it ran again).
        "attempt": job.get("attempts", 0),
        "session_id": job["session_id"],
        "position": store.position(job),
        "progress": {"step": step, "total": total, "fraction": round(fraction, 4), "eta_seconds": eta},
        "created_at": _iso(job["created_at"]),
        "started_at": _iso(job["started_at"]),
        "finished_at": _iso(job["finished_at"]),
        "request": job["request"],
        "outputs": [public_output(job["id"], o, url_for_output) for o in job["outputs"]],
        "metadata": job["metadata"],
        "error": error,
        "status_url": status_url,
        # The webhook the job reports to and every delivery attempt so far (None: no webhook).
        "webhook": job.get("webhook"),
    }


def public_output(job_id: str, output: dict, url_for_output: Callable[[str, str], str]) -> dict:
    """An output entry as clients see it: download URLs (its file, its thumbnail, a restored output's raw
    original), never a stored server path."""
    out = {k: v for k, v in output.items() if k not in ("path", "raw_path", "thumbnail_path")}
    out["url"] = url_for_output(job_id, output["filename"])
    if output.get("raw_filename"):
        out["raw_url"] = url_for_output(job_id, output["raw_filename"])
    if output.get("thumbnail_path"):
        out["thumbnail_url"] = url_for_output(job_id, thumbnail_name(output["filename"]))
    return out


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


# --- the queue and its workers ------------------------------------------------------------------

Runner = Callable[[dict, Callable[[int, int], None], Callable[[], bool], int], dict | None]


class JobManager:
    """Bounded queue + one worker thread per generator.

    ``runner(job, on_progress, should_cancel, worker_index)`` does the work and returns metadata;
    it raises ``errors.JobCanceled`` on cancel, any ``TwinError`` for a failure with a reason.
    Workers wait for ``ready`` (models loaded) before taking a job.
    """

    def __init__(self, store: JobStore, runner: Runner, *, workers: int = 1, ready: threading.Event | None = None,
                 is_oom: Callable[[BaseException], bool] = lambda e: False,
                 on_preview: Callable[[str, int, bytes], None] | None = None) -> None:
        self.store = store
        self.on_preview = on_preview  # (job_id, step, jpeg) for a request with preview: true
        self.runner = runner
        self.n_workers = max(1, workers)
        self.ready = ready or threading.Event()
        self.is_oom = is_oom
        self._queue: "queue.Queue[str | None]" = queue.Queue()
        self._cancel: dict[str, threading.Event] = {}
        self._cancel_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._draining = threading.Event()
        self._requeue: set[str] = set()  # running jobs stopped by a shutdown: back to queued, not canceled
        self.running: dict[int, str | None] = {}

    def start(self, requeue_interrupted: bool = False) -> dict[str, list[str]]:
        recovered = self.store.recover(requeue_interrupted)
        if recovered["failed"] or recovered["requeued"]:
            log.warning("recovered jobs after restart", extra={"interrupted_failed": len(recovered["failed"]),
                                                              "requeued": len(recovered["requeued"])})
        for job_id in self.store.queued_ids():
            self._queue.put(job_id)
        for i in range(self.n_workers):
            t = threading.Thread(target=self._work, args=(i,), name=f"twin-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return recovered

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self.ready.set()  # release workers still waiting for set-up
        with self._cancel_lock:
            # A job stopped by a shutdown was not canceled by its user: it goes back to the queue.
            self._requeue.update(self._cancel)
            for ev in self._cancel.values():
                ev.set()
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout)

    def submit(self, job_id: str) -> None:
        self._queue.put(job_id)

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job now, or ask a running one to stop at its next step."""
        if self.store.cancel_queued(job_id):
            return True
        with self._cancel_lock:
            ev = self._cancel.get(job_id)
        if ev is not None:
            ev.set()
            return True
        return False

    def depth(self) -> int:
        return self.store.counts()["queued"]

    # --- graceful stop ---------------------------------------------------------------------------
    def begin_drain(self) -> None:
        """Take no more jobs from the queue (they stay queued in the database for the next start)."""
        self._draining.set()

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def running_ids(self) -> list[str]:
        """Jobs a worker holds, from just before the claim to after the outcome is recorded (wider than
        ``running``, so a drain cannot slip between a claim and its bookkeeping)."""
        with self._cancel_lock:
            return list(self._cancel)

    def drain(self, deadline: float, stop_wait: float = 5.0) -> dict[str, list[str]]:
        """Let running jobs finish until ``deadline`` (time.time()); then stop them at their next step and
        re-queue them. Returns {"finished": [...], "requeued": [...]} for the running jobs."""
        self.begin_drain()
        started = self.running_ids()
        while self.running_ids() and time.time() < deadline:
            time.sleep(0.05)
        late = self.running_ids()
        with self._cancel_lock:
            self._requeue.update(late)
            for job_id in late:
                ev = self._cancel.get(job_id)
                if ev is not None:
                    ev.set()
        end = time.time() + stop_wait
        while self.running_ids() and time.time() < end:
            time.sleep(0.02)
        for job_id in self.running_ids():
            # Stuck inside one long step (a VAE decode): re-queue the record now; the process is exiting.
            self.store.requeue(job_id)
        return {"finished": [j for j in started if j not in late], "requeued": late}

    # --- workers ---------------------------------------------------------------------------------
    def _work(self, index: int) -> None:
        self.ready.wait()
        while not self._stopping.is_set():
            job_id = self._queue.get()
            if job_id is None or self._stopping.is_set() or self._draining.is_set():
                return  # a job taken off the in-memory queue here is still queued in the database
            try:
                self._run_one(job_id, index)
            except Exception:  # noqa: BLE001 - e.g. the database could not be written (full volume)
                log.error("worker could not run a job; it stays queued", extra={"job_id": job_id,
                                                                                "traceback": traceback.format_exc()})
                if self._stopping.wait(1.0):
                    return
                self._queue.put(job_id)

    def _run_one(self, job_id: str, index: int) -> None:
        ev = threading.Event()
        with self._cancel_lock:
            self._cancel[job_id] = ev
        try:
            if not self.store.claim(job_id):
                return  # canceled while queued, or already settled
            job = self.store.get(job_id)
            if job is None:
                return
            self.running[index] = job_id
            with log_context(job_id=job_id, session_id=job["session_id"], request_id=None):
                self._execute(job, ev, index)
        finally:
            self.running[index] = None
            with self._cancel_lock:
                self._cancel.pop(job_id, None)

    def _execute(self, job: dict, cancel_event: threading.Event, index: int) -> None:
        job_id = job["id"]
        t0 = time.perf_counter()
        log.info("job started")

        def on_progress(step: int, total: int, preview: bytes | None = None) -> None:
            self.store.set_progress(job_id, step, total)
            if preview is not None and self.on_preview is not None:
                self.on_preview(job_id, step, preview)

        settle = self._settle
        try:
            metadata = self.runner(job, on_progress, cancel_event.is_set, index)
        except errors.JobCanceled:
            with self._cancel_lock:
                requeue = job_id in self._requeue
                self._requeue.discard(job_id)
            if requeue:
                settle(lambda: self.store.requeue(job_id))
                log.info("job re-queued: the server is stopping")
            else:
                settle(lambda: self.store.finish(job_id, JobStatus.CANCELED, code="canceled",
                                                 message="canceled by the user"))
                log.info("job canceled")
        except errors.TwinError as e:
            settle(lambda: self.store.finish(job_id, JobStatus.FAILED, code=e.code, message=e.message))
            log.warning("job failed", extra={"error_code": e.code})
        except BaseException as e:  # noqa: BLE001 - the worker must survive anything a job does
            if self.is_oom(e):
                settle(lambda: self.store.finish(job_id, JobStatus.FAILED, code="out_of_memory",
                                                 message="the GPU ran out of memory; try fewer images or a smaller size"))
                log.warning("job failed: out of memory")
            else:
                settle(lambda: self.store.finish(job_id, JobStatus.FAILED, code="internal_error",
                                                 message="generation failed because of an internal error"))
                log.error("job crashed", extra={"traceback": traceback.format_exc()})
            if not isinstance(e, Exception):
                raise
        else:
            settle(lambda: self.store.finish(job_id, JobStatus.SUCCEEDED, metadata=metadata))
            log.info("job succeeded", extra={"seconds": round(time.perf_counter() - t0, 3)})

    def _settle(self, write: Callable[[], Any]) -> None:
        """Record a job's outcome, retrying while the database cannot be written (a full volume): the
        worker waits for space instead of dying, and a stop leaves the job to start-up recovery."""
        delay = 0.2
        while True:
            try:
                write()
                return
            except errors.InsufficientStorage:
                log.error("cannot record a job outcome: the data volume is full; retrying")
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, 5.0)
