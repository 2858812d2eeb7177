"""Cluster mode's GPU worker (``./start_worker.sh`` = ``python -m utils.jobs.rq_worker``).

One process per GPU: it builds the same ``Runtime`` an API node builds (so a job runs exactly the code
it runs in local mode: ``Runtime._run_job``), loads the models once, and then works RQ's queue in a
``SimpleWorker`` subclass (no fork per job: CUDA state does not survive a fork). What the subclass adds
(measured reasons in DESIGN.md section 5):

- a heartbeat thread renews the worker's and the running job's heartbeat every
  TWIN_WORKER_HEARTBEAT_SECONDS with a short TTL, so a SIGKILLed worker's job is seen as abandoned in
  seconds (stock SimpleWorker: ~74 s) and re-run elsewhere by the cluster maintenance thread;
- cancel: ``kill_horse`` (what RQ's stop-job command calls; a no-op on a stock SimpleWorker) sets this
  job's cancel event, and the step callback also reads the job's Redis cancel key, so a lost pub/sub
  message still cancels within one step. A canceled job returns normally: it is never retried;
- outcomes are written to the app's record by ``perform`` (failed / canceled / succeeded); only a dead
  worker makes RQ re-run a job. A record that is already terminal is never overwritten, and an attempt
  that finds its record terminal does nothing (rq#2424: success wins);
- SIGTERM: the running job finishes (RQ's warm shutdown); past TWIN_DRAIN_SECONDS it is stopped at its
  next step and re-queued without counting the attempt; then the process exits 0.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback

from rq import get_current_job
from rq.serializers import JSONSerializer
from rq.exceptions import StopRequested
from rq.worker import SimpleWorker, WorkerStatus

from utils import errors
from utils.config import Settings
from utils.jobs.rq_queue import WORKER_INFO, make_queue
from utils.jobs.store import JobStatus, failure_outcome

log = logging.getLogger("twin.worker")

_worker: "TwinWorker | None" = None


class WorkerDraining(Exception):
    """Raised out of a job stopped by a worker's shutdown, so RQ puts it back on the queue."""


def perform(job_id: str) -> None:
    """The RQ job function: run one app job on this worker's runtime and record its outcome."""
    if _worker is None:
        raise RuntimeError("perform() runs only inside a TwinWorker (python -m utils.jobs.rq_worker)")
    return _worker.run_app_job(job_id)


class TwinWorker(SimpleWorker):
    def __init__(self, *args, runtime, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.runtime = runtime
        s = runtime.settings
        self.beat_s = s.worker_heartbeat_seconds
        self.beat_ttl = max(2, int(round(s.worker_heartbeat_seconds * 4)))
        self._beat_lock = threading.Lock()
        self._beat_job = None
        self._cancel = threading.Event()
        self._drain_requeue = False
        self._drain_timer: threading.Timer | None = None
        self.stop_asked = False

    # --- heartbeats ---
    def get_heartbeat_ttl(self, job) -> int:
        return self.beat_ttl

    def execute_job(self, job, queue):
        with self._beat_lock:
            self._beat_job = job
        t = threading.Thread(target=self._beat_loop, args=(job,), name="twin-heartbeat", daemon=True)
        t.start()
        try:
            super().execute_job(job, queue)
        finally:
            with self._beat_lock:
                self._beat_job = None

    def handle_execution_ended(self, job, queue, heartbeat_ttl):
        # The job's function returned or raised: no heartbeat may land after RQ starts settling it (a
        # late one would put it back in the StartedJobRegistry and a cleanup would call it abandoned).
        with self._beat_lock:
            self._beat_job = None
        super().handle_execution_ended(job, queue, heartbeat_ttl)

    def _beat_loop(self, job) -> None:
        while True:
            time.sleep(self.beat_s)
            with self._beat_lock:
                if self._beat_job is not job:
                    return
                try:
                    if self.execution is not None:
                        self.maintain_heartbeats(job)
                except Exception:  # noqa: BLE001 - Redis away for a moment: the next beat tries again
                    pass

    def subscribe(self):
        """RQ's, with a 1 s read timeout instead of 60 s: closing the pub/sub at exit waits for the
        listener's read to return, and a worker stopped by SIGTERM must exit promptly."""
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(sleep_time=1, daemon=True,
                                                       exception_handler=self._pubsub_exception_handler)

    # --- cancel and stop ---
    def kill_horse(self, sig=signal.SIGTERM):
        """RQ's stop-job command lands here; there is no horse: stop this job at its next step."""
        self._cancel.set()

    def request_stop(self, signum, frame):
        # RQ sets _stop_requested only when busy (idle, it raises StopRequested): main() must know either way.
        self.stop_asked = True
        super().request_stop(signum, frame)
        if self._drain_timer is None and self.get_state() == WorkerStatus.BUSY:
            self._drain_timer = threading.Timer(self.runtime.settings.drain_seconds, self._drain_now)
            self._drain_timer.daemon = True
            self._drain_timer.start()

    def _drain_now(self) -> None:
        self._drain_requeue = True
        self._cancel.set()

    # --- one job ---
    def run_app_job(self, job_id: str) -> None:
        rt = self.runtime
        store = rt.store
        self._cancel.clear()
        if store.cancel_requested(job_id):
            store.finish(job_id, JobStatus.CANCELED, code="canceled", message="canceled by the user")
            return None
        if not store.claim(job_id):
            return None  # canceled while queued, already finished (a re-run after success), or deleted
        job = store.get(job_id)
        if job is None:
            return None
        log.info("job started", extra={"job_id": job_id, "attempt": job["attempts"]})

        def on_progress(step: int, total: int, preview: bytes | None = None) -> None:
            try:
                store.set_progress(job_id, step, total)
            except errors.ServiceNotReady:
                pass  # progress is best effort while Redis restarts
            if preview is not None:
                rt._preview(job_id, step, preview)  # kept in this worker only (see ARCHITECTURE: not done)

        def should_cancel() -> bool:
            return self._cancel.is_set() or store.cancel_requested(job_id)

        t0 = time.perf_counter()
        try:
            metadata = rt._run_job(job, on_progress, should_cancel, 0)
        except errors.JobCanceled:
            if self._drain_requeue:
                store.requeue(job_id)
                rq_job = get_current_job()
                if rq_job is not None:  # not an attempt: give RQ's retry back
                    rq_job.retries_left = (rq_job.retries_left or 0) + 1
                log.info("job re-queued: the worker is stopping", extra={"job_id": job_id})
                raise WorkerDraining(f"worker stopping: job {job_id} re-queued") from None
            store.finish(job_id, JobStatus.CANCELED, code="canceled", message="canceled by the user")
            log.info("job canceled", extra={"job_id": job_id})
            return None
        except BaseException as e:  # noqa: BLE001 - a failure is recorded; only a dead worker re-runs a job
            code, message = failure_outcome(e, rt_is_oom(e))
            store.finish(job_id, JobStatus.FAILED, code=code, message=message)
            if code == "internal_error":
                log.error("job crashed", extra={"job_id": job_id, "traceback": traceback.format_exc()})
            else:
                log.warning("job failed", extra={"job_id": job_id, "error_code": code})
            if not isinstance(e, Exception):
                raise
            return None
        store.finish(job_id, JobStatus.SUCCEEDED, metadata=metadata)
        log.info("job succeeded", extra={"job_id": job_id, "seconds": round(time.perf_counter() - t0, 3)})
        return None


def rt_is_oom(e: BaseException) -> bool:
    from utils.services import is_oom
    return is_oom(e)


def _load(spec: str):
    mod, _, attr = spec.partition(":")
    return getattr(importlib.import_module(mod), attr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Digital-twin GPU worker (cluster mode, TWIN_QUEUE_URL)")
    ap.add_argument("--components", default="",
                    help="module:function returning (generator, faces); default: the real engines from settings "
                         "(tests pass their doubles here)")
    ap.add_argument("--name", default="", help="RQ worker name (default HOST.PID)")
    ap.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    args = ap.parse_args(argv)
    settings = Settings.from_env()
    if not settings.cluster:
        print("[worker] TWIN_QUEUE_URL is not set: a GPU worker only exists in cluster mode", file=sys.stderr)
        return 2
    from utils.logging import configure_logging
    configure_logging(settings.log_level)
    from utils import services
    # The generator runs in this process (one per GPU: the worker serves no HTTP, nothing waits on its GIL
    # but the heartbeat thread, which the switch interval serves).
    settings = settings.replace(generator_process=False, workers=1)
    sys.setswitchinterval(settings.switch_interval_ms / 1000)
    if args.components:
        generator, faces = _load(args.components)(settings)
    else:
        generator, faces = services.build_generators(settings)[0], services.build_faces(settings)
    runtime = services.Runtime(settings, [generator], faces)
    runtime.start()
    if not runtime.wait_ready():
        log.error("worker set-up failed", extra={"error": runtime.setup_error})
        runtime.shutdown()
        return 1
    global _worker
    conn = runtime.store.redis
    name = args.name or f"{socket.gethostname()}.{os.getpid()}"
    worker = TwinWorker([make_queue(conn)], connection=conn, serializer=JSONSerializer, name=name,
                        runtime=runtime, worker_ttl=max(20, int(settings.worker_heartbeat_seconds * 10)),
                        job_monitoring_interval=max(1, int(settings.worker_heartbeat_seconds)))
    _worker = worker
    info = services._device_info(services._safe_info(generator).get("device"))
    code = 0
    try:
        # RQ's work loop returns ("unhandled exception, quitting") when Redis goes away outside its
        # blocking pop: start it again until a stop was asked for; the models stay loaded.
        while True:
            try:
                conn.hset(WORKER_INFO + name, mapping={"host": socket.gethostname(), "device": info["device"],
                                                       "gpu_name": info.get("name", "CPU")})
                conn.expire(WORKER_INFO + name, 7 * 24 * 3600)
                worker.work(burst=args.burst, logging_level=settings.log_level, with_scheduler=False)
            except StopRequested:
                break  # SIGTERM while RQ was setting up (before its own handler caught it)
            except Exception as e:  # noqa: BLE001 - Redis away at start: wait and reconnect
                log.error("worker lost Redis; reconnecting", extra={"error": f"{type(e).__name__}: {e}"})
            if worker.stop_asked or worker._stop_requested or args.burst:
                break
            time.sleep(2)
    finally:
        try:
            conn.delete(WORKER_INFO + name)
        except Exception:  # noqa: BLE001
            pass
        runtime.shutdown()
    return code


if __name__ == "__main__":
    # Run the imported module's main, not __main__'s: perform() (what RQ imports by name) reads the
    # worker from utils.jobs.rq_worker.
    from utils.jobs import rq_worker
    sys.exit(rq_worker.main())
