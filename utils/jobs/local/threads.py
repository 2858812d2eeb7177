"""Local mode's job queue: the *job threads*, threads of the API process that run jobs one at a time each
(one per generator), fed by an in-memory queue of job ids (the ``JobQueue`` contract of
``utils.contracts``; cluster mode's is the RQ queue, ``utils.jobs.cluster.queue``).

The SQLite store is the truth: a job taken off the in-memory queue but not claimed stays queued in the
database, and ``start`` re-reads the queued jobs after a restart. ``stop`` and ``drain`` put a job they
interrupt back in the queue (it was not canceled by its user).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from typing import Any, Callable

from utils import errors
from utils.contracts import JobStore
from utils.jobs.status import CANCELED_BY_USER, JobStatus, failure_outcome
from utils.logging import log_context

log = logging.getLogger("twin.jobs")

# runner(job, on_progress, should_cancel, index) -> metadata; ``index`` is the job thread's, which is also
# the index of the generator it runs on.
Runner = Callable[[dict, Callable[[int, int], None], Callable[[], bool], int], dict | None]


class JobThreads:
    """The in-memory queue + one job thread per generator.

    ``runner(job, on_progress, should_cancel, index)`` does the work and returns metadata; it raises
    ``errors.JobCanceled`` on cancel, any ``TwinError`` for a failure with a reason. The job threads wait
    for ``ready`` (models loaded) before taking a job. ``workers``: how many job threads (TWIN_WORKERS).
    """

    def __init__(self, store: JobStore, runner: Runner, *, workers: int = 1, ready: threading.Event | None = None,
                 is_oom: Callable[[BaseException], bool] = errors.is_oom,
                 on_preview: Callable[[str, int, bytes], None] | None = None) -> None:
        self.store = store
        self.on_preview = on_preview  # (job_id, step, jpeg) for a request with preview: true
        self.runner = runner
        self.n_threads = max(1, workers)
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
        for i in range(self.n_threads):
            t = threading.Thread(target=self._work, args=(i,), name=f"twin-job-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return recovered

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self.ready.set()  # release job threads still waiting for set-up
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
        """Jobs a job thread holds, from just before the claim to after the outcome is recorded (wider than
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

    # --- one job thread --------------------------------------------------------------------------
    def _work(self, index: int) -> None:
        self.ready.wait()
        while not self._stopping.is_set():
            job_id = self._queue.get()
            if job_id is None or self._stopping.is_set() or self._draining.is_set():
                return  # a job taken off the in-memory queue here is still queued in the database
            try:
                self._run_one(job_id, index)
            except Exception:  # noqa: BLE001 - e.g. the database could not be written (full volume)
                log.error("job thread could not run a job; it stays queued",
                          extra={"job_id": job_id, "traceback": traceback.format_exc()})
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

        def on_progress(step: int, total: int, preview: bytes | None = None, extra: dict | None = None) -> None:
            self.store.set_progress(job_id, step, total, extra)
            if preview is not None and self.on_preview is not None:
                self.on_preview(job_id, step, preview)

        try:
            metadata = self.runner(job, on_progress, cancel_event.is_set, index)
        except errors.JobCanceled:
            self._settle_canceled(job_id)
        except BaseException as e:  # noqa: BLE001 - the job thread must survive anything a job does
            code, message = failure_outcome(e, self.is_oom(e))
            self._settle(lambda: self.store.finish(job_id, JobStatus.FAILED, code=code, message=message))
            if code == "internal_error":
                log.error("job crashed", extra={"traceback": traceback.format_exc()})
            else:
                log.warning("job failed", extra={"error_code": code})
            if not isinstance(e, Exception):
                raise
        else:
            self._settle(lambda: self.store.finish(job_id, JobStatus.SUCCEEDED, metadata=metadata))
            log.info("job succeeded", extra={"seconds": round(time.perf_counter() - t0, 3)})

    def _settle_canceled(self, job_id: str) -> None:
        """A job stopped by a shutdown goes back to the queue; one stopped by its user ends canceled."""
        with self._cancel_lock:
            requeue = job_id in self._requeue
            self._requeue.discard(job_id)
        if requeue:
            self._settle(lambda: self.store.requeue(job_id))
            log.info("job re-queued: the server is stopping")
        else:
            self._settle(lambda: self.store.finish(job_id, JobStatus.CANCELED, **CANCELED_BY_USER))
            log.info("job canceled")

    def _settle(self, write: Callable[[], Any]) -> None:
        """Record a job's outcome, retrying while the database cannot be written (a full volume): the
        job thread waits for space instead of dying, and a stop leaves the job to start-up recovery."""
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
