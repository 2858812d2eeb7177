"""Cluster mode's *GPU worker*: the RQ side of the worker process (``./start_worker.sh`` =
``python -m utils.service.gpu_worker``, one per GPU).

The process builds a Runtime as an API node does (utils/service/gpu_worker.py; so a job runs exactly the
code it runs in local mode: ``runtime.jobs.run``), loads the models once, and then ``serve`` works RQ's
queue in a ``SimpleWorker`` subclass (no fork per job: CUDA state does not survive a fork). What the subclass adds
(measured reasons in DESIGN.md section 5):

- a heartbeat thread renews the worker's and the running job's heartbeat every
  TWIN_WORKER_HEARTBEAT_SECONDS with a short TTL, so a SIGKILLed GPU worker's job is seen as abandoned in
  seconds (stock SimpleWorker: ~74 s) and re-run elsewhere by the cluster maintenance thread;
- cancel: ``kill_horse`` (what RQ's stop-job command calls; a no-op on a stock SimpleWorker) sets this
  job's cancel event, and the step callback also reads the job's Redis cancel key, so a lost pub/sub
  message still cancels within one step. A canceled job returns normally: it is never retried;
- outcomes are written to the app's record by ``perform`` (failed / canceled / succeeded); only a dead
  GPU worker makes RQ re-run a job. A record that is already terminal is never overwritten, and an
  attempt that finds its record terminal does nothing (rq#2424: success wins);
- SIGTERM: the running job finishes (RQ's warm shutdown); past TWIN_DRAIN_SECONDS it is stopped at its
  next step and re-queued without counting the attempt; then the process exits 0;
- base models (``registry``): the GPU worker publishes its model, catalogue and load state in its info
  hash (``ModelControl``'s refresher thread keeps it alive), listens on its model's queue before ``twin``,
  and a control thread runs switch commands: load beside, switch between jobs (the generator's
  load_model), then move the queues. RQ's dequeue blocks at most 1 s here, so the new queues are read
  within a second. A pinned job that meets another model (dequeued in the instant of a switch) goes back
  to its model's queue without counting an attempt.
"""
from __future__ import annotations

import logging
import signal
import socket
import threading
import time
import traceback

from rq import get_current_job, worker_registration
from rq.exceptions import StopRequested
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker, WorkerStatus

from utils import errors
from utils.jobs.cluster.registry import ModelControl
from utils.jobs.cluster.routing import make_model_queue, make_queue
from utils.jobs.status import CANCELED_BY_USER, JobStatus, failure_outcome

log = logging.getLogger("twin.worker")

_worker: "TwinWorker | None" = None


class WorkerDraining(Exception):
    """Raised out of a job stopped by a GPU worker's shutdown, so RQ puts it back on the queue."""


class WrongModel(Exception):
    """Raised out of a pinned job that met another base model (a switch in between), so RQ puts it back
    on its model's queue (its origin) for a GPU worker that holds it."""


def perform(job_id: str) -> None:
    """The RQ job function (``routing.JOB_FUNC``): run one app job on this GPU worker's runtime and record
    its outcome."""
    if _worker is None:
        raise RuntimeError("perform() runs only inside a TwinWorker (python -m utils.service.gpu_worker)")
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
        self.active_model: str | None = None

    # --- base model: which queues this worker listens to ---
    @property
    def dequeue_timeout(self) -> int:
        # RQ blocks in BLPOP this long before it reads self._ordered_queues again: short, so a switch
        # moves this worker to its new model's queue within a second (RQ's default is worker_ttl - 15).
        return 1

    def listen_for(self, model: str | None) -> None:
        """Listen on ``model``'s queue first, then the shared one (unpinned jobs run on any model)."""
        conn = self.connection
        queues = ([make_model_queue(conn, model)] if model else []) + [make_queue(conn)]
        try:
            worker_registration.unregister(self)
        except Exception:  # noqa: BLE001 - not registered yet (before work()) or Redis blinked
            pass
        self.queues, self._ordered_queues = queues, queues[:]   # the work loop reads them at its next dequeue
        self.active_model = model
        try:
            if self.connection.exists(self.key):
                worker_registration.register(self)
                self.connection.hset(self.key, "queues", ",".join(self.queue_names()))
        except Exception:  # noqa: BLE001
            pass

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
        self.runtime.begin_drain()   # what the job sees: a re-queued training keeps its checkpoints
        self._cancel.set()

    # --- one job ---
    def run_app_job(self, job_id: str) -> None:
        rt = self.runtime
        store = rt.store
        self._cancel.clear()
        if store.cancel_requested(job_id):
            store.finish(job_id, JobStatus.CANCELED, **CANCELED_BY_USER)
            return None
        if not store.claim(job_id):
            return None  # canceled while queued, already finished (a re-run after success), or deleted
        job = store.get(job_id)
        if job is None:
            return None
        want = job["payload"].get("model")
        if want and self.active_model and want != self.active_model:
            self._back_to_model_queue(job_id, want)   # dequeued in the instant of a switch away from it
        log.info("job started", extra={"job_id": job_id, "attempt": job["attempts"]})

        def on_progress(step: int, total: int, preview: bytes | None = None, extra: dict | None = None) -> None:
            try:
                store.set_progress(job_id, step, total, extra)
            except errors.ServiceNotReady:
                pass  # progress is best effort while Redis restarts
            if preview is not None:
                rt.publish_preview(job_id, step, preview)  # into the Redis event log: any API node serves it

        def should_cancel() -> bool:
            return self._cancel.is_set() or store.cancel_requested(job_id)

        t0 = time.perf_counter()
        try:
            metadata = rt.run_job(job, on_progress, should_cancel, 0)
        except errors.JobCanceled:
            if self._drain_requeue:
                store.requeue(job_id)
                rq_job = get_current_job()
                if rq_job is not None:  # not an attempt: give RQ's retry back
                    rq_job.retries_left = (rq_job.retries_left or 0) + 1
                log.info("job re-queued: the GPU worker is stopping", extra={"job_id": job_id})
                raise WorkerDraining(f"GPU worker stopping: job {job_id} re-queued") from None
            store.finish(job_id, JobStatus.CANCELED, **CANCELED_BY_USER)
            log.info("job canceled", extra={"job_id": job_id})
            return None
        except errors.TwinError as e:
            if e.code == "model_not_loaded" and want:
                # The generator switched between the check above and the job's start: not the job's fault.
                self._back_to_model_queue(job_id, want)
            self._record_failure(job_id, e)
            return None
        except BaseException as e:  # noqa: BLE001 - a failure is recorded; only a dead worker re-runs a job
            self._record_failure(job_id, e)
            if not isinstance(e, Exception):
                raise
            return None
        store.finish(job_id, JobStatus.SUCCEEDED, metadata=metadata)
        log.info("job succeeded", extra={"job_id": job_id, "seconds": round(time.perf_counter() - t0, 3)})
        return None

    def _back_to_model_queue(self, job_id: str, want: str) -> None:
        """Put a claimed pinned job back (attempt and RQ retry given back) and leave through RQ's retry,
        which re-queues it on its model's queue; no live holder -> maintenance fails it as stranded."""
        self.runtime.store.requeue(job_id)
        rq_job = get_current_job()
        if rq_job is not None:
            rq_job.retries_left = (rq_job.retries_left or 0) + 1
        log.info("pinned job back to its model's queue", extra={"job_id": job_id, "model": want,
                                                                 "active_model": self.active_model})
        raise WrongModel(f"job {job_id} wants model {want!r}; this GPU worker now holds {self.active_model!r}")

    def _record_failure(self, job_id: str, e: BaseException) -> None:
        code, message = failure_outcome(e, errors.is_oom(e))
        self.runtime.store.finish(job_id, JobStatus.FAILED, code=code, message=message)
        if code == "internal_error":
            log.error("job crashed", extra={"job_id": job_id, "traceback": traceback.format_exc()})
        else:
            log.warning("job failed", extra={"job_id": job_id, "error_code": code})


# --- the process -----------------------------------------------------------------------------------

def serve(runtime, engine, name: str, device: dict, *, burst: bool = False) -> None:
    """Work RQ's queues with a started, ready ``runtime`` (utils/service/gpu_worker.py builds it) until a
    stop: the RQ worker, its base-model control thread, and RQ's work loop, restarted after a Redis outage
    (it returns "unhandled exception, quitting" when Redis goes away outside its blocking pop; the models
    stay loaded)."""
    global _worker
    settings = runtime.settings
    conn = runtime.store.redis
    worker = TwinWorker([make_queue(conn)], connection=conn, serializer=JSONSerializer, name=name,
                        runtime=runtime, worker_ttl=max(20, int(settings.worker_heartbeat_seconds * 10)),
                        job_monitoring_interval=max(1, int(settings.worker_heartbeat_seconds)))
    _worker = worker
    control = ModelControl(worker, engine, name, {"host": socket.gethostname(), "device": device["device"],
                                                  "gpu_name": device.get("name", "CPU")})
    worker.listen_for(control.active)
    control.start()
    try:
        while True:
            try:
                worker.work(burst=burst, logging_level=settings.log_level, with_scheduler=False)
            except StopRequested:
                break  # SIGTERM while RQ was setting up (before its own handler caught it)
            except Exception as e:  # noqa: BLE001 - Redis away at start: wait and reconnect
                log.error("GPU worker lost Redis; reconnecting", extra={"error": f"{type(e).__name__}: {e}"})
            if worker.stop_asked or worker._stop_requested or burst:
                break
            time.sleep(2)
    finally:
        control.stop()
