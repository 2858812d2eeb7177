"""Cluster mode's queue side: what ``Runtime`` calls ``manager`` (the JobManager interface), on RQ.

``RqJobManager.submit`` enqueues the job id on the RQ queue ``twin``, or, when its request names a base
``model``, on that model's queue (``rq_models.model_queue_name``; JSON serializer; the function is
``utils.jobs.rq_worker.perform``) with ``Retry(max=TWIN_JOB_ATTEMPTS-1, interval=TWIN_RETRY_BACKOFF)``;
a GPU worker (``./start_worker.sh``) runs it. Cancel: a queued job is canceled in the record (the worker
that dequeues it later does not start it); a running one gets a Redis key its step callback reads plus
RQ's stop-job command (the worker's ``kill_horse`` sets its cancel event).

Every API node and worker runs a ``Maintenance`` thread; one at a time (a Redis lock) does what RQ
would do in a forked scheduler and in worker maintenance, here in a thread of a process that forks
nothing: move due retries from the ScheduledJobRegistry to the queue, clean the registries (a job whose
worker stopped sending heartbeats is re-run or, after the last attempt, failed), and settle the app's
records from RQ's view (running job whose RQ job failed -> ``failed``/``worker_lost``; running job
waiting for its retry -> ``queued``; a queued record whose enqueue was lost -> enqueued again, on its
model's queue), over the shared queue and every model queue, and fail pinned jobs stranded on a model
queue that no live worker holds or is loading (after TWIN_MODEL_STRAND_SECONDS) with model_not_loaded.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
import uuid

from redis.exceptions import RedisError
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RqStatus
from rq.registry import ScheduledJobRegistry, clean_registries
from rq.serializers import JSONSerializer
from rq.worker_registration import clean_worker_registry

from utils import errors
from utils.config import Settings
from utils.jobs import rq_models
from utils.jobs.redis_store import RedisJobStore, redis_guard
from utils.jobs.rq_models import QUEUE_NAME, WORKER_INFO, model_queue_name  # noqa: F401 - re-exported

log = logging.getLogger("twin.cluster")

JOB_FUNC = "utils.jobs.rq_worker.perform"
JOB_TIMEOUT_S = 6 * 3600          # RQ's own per-job timeout: a generation never takes this long
RESULT_TTL_S = 3600                # RQ's copy only; the app's record is the truth
FAILURE_TTL_S = 7 * 24 * 3600


def make_queue(connection) -> Queue:
    return Queue(QUEUE_NAME, connection=connection, serializer=JSONSerializer)


def make_model_queue(connection, model: str) -> Queue:
    """The queue of jobs pinned to base model ``model`` (its workers listen to it before ``twin``)."""
    return Queue(model_queue_name(model), connection=connection, serializer=JSONSerializer)


def job_model(store: RedisJobStore, job_id: str) -> str | None:
    """The base model a job's request names (its queue), None for an unpinned job."""
    job = store.get(job_id)
    model = (job or {}).get("payload", {}).get("model") if job else None
    return model if isinstance(model, str) and model else None


class RedisLock:
    """SET NX PX with an owner token; renewed by its holder, expires by itself when the holder dies."""

    def __init__(self, connection, name: str, ttl_s: float) -> None:
        self.r, self.key, self.ttl_ms = connection, "twin:lock:" + name, int(ttl_s * 1000)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def acquire(self) -> bool:
        if self.r.set(self.key, self.token, nx=True, px=self.ttl_ms):
            return True
        held = self.r.get(self.key)
        if held is not None and held.decode() == self.token:
            self.r.pexpire(self.key, self.ttl_ms)
            return True
        return False

    def release(self) -> None:
        try:
            held = self.r.get(self.key)
            if held is not None and held.decode() == self.token:
                self.r.delete(self.key)
        except RedisError:
            pass


class Maintenance:
    """The lock-guarded housekeeping loop described in the module doc."""

    def __init__(self, store: RedisJobStore, settings: Settings, *, tick_s: float = 0.5) -> None:
        self.store, self.settings, self.tick_s = store, settings, tick_s
        self.queue = make_queue(store.redis)
        self.lock = RedisLock(store.redis, "maintenance", ttl_s=max(5.0, settings.worker_heartbeat_seconds * 3))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_clean = 0.0
        self._stranded_since: dict[str, float] = {}   # model -> when its queue was first seen with no holder

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="twin-cluster-maintenance", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.lock.release()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.lock.acquire():
                    self.run_once()
            except RedisError:
                pass  # Redis down or restarting: try again next tick (the client reconnects by itself)
            except Exception:  # noqa: BLE001 - housekeeping must outlive any one bad record
                log.error("cluster maintenance failed", extra={"traceback": traceback.format_exc()})
            self._stop.wait(self.tick_s)

    def model_queues(self) -> dict[str, Queue]:
        """model -> its queue, for every model a job was ever pinned to (rq_models.MODEL_QUEUES)."""
        r = self.store.redis
        return {rq_models._text(model): Queue(rq_models._text(qname), connection=r, serializer=JSONSerializer)
                for qname, model in r.hgetall(rq_models.MODEL_QUEUES).items()}

    def run_once(self) -> None:
        queues = [self.queue, *self.model_queues().values()]
        for q in queues:
            # Each queue has its own registries: a pinned job's retry waits in its model queue's.
            self.enqueue_due_retries(q)
        now = time.time()
        # Orphans are found by cleaning RQ's StartedJobRegistry: entries whose heartbeat expired.
        if now - self._last_clean >= min(2.0, self.settings.worker_heartbeat_seconds):
            for q in queues:
                clean_registries(q)
                clean_worker_registry(q)
            self._last_clean = now
        self.reconcile()
        self.fail_stranded()

    def enqueue_due_retries(self, queue: Queue | None = None) -> None:
        """What rq's scheduler process does for one queue (retries with an interval wait there)."""
        queue = queue or self.queue
        registry = ScheduledJobRegistry(queue=queue)
        job_ids = registry.get_jobs_to_schedule(int(time.time()))
        if not job_ids:
            return
        r = self.store.redis
        with r.pipeline() as p:
            for job in Job.fetch_many(job_ids, connection=r, serializer=JSONSerializer):
                if job is not None:
                    # At the front: a job re-run after its worker died (or a drain) has waited its turn.
                    queue._enqueue_job(job, pipeline=p, at_front=True)
            for job_id in job_ids:
                registry.remove(job_id, pipeline=p)
            p.execute()

    def fail_stranded(self) -> None:
        """A pinned job waits on its model's queue; when no live worker holds that model or is loading it
        (they switched away or died) for TWIN_MODEL_STRAND_SECONDS, its jobs fail with model_not_loaded
        rather than wait forever."""
        queues = self.model_queues()
        if not queues:
            return
        workers = rq_models.live_workers(self.store.redis)
        held = rq_models.held_models(workers)
        now = time.time()
        for model, queue in queues.items():
            if model in held:
                self._stranded_since.pop(model, None)
                continue
            job_ids = queue.get_job_ids()
            if not job_ids:
                self._stranded_since.pop(model, None)
                continue
            since = self._stranded_since.setdefault(model, now)
            if now - since < self.settings.model_strand_seconds:
                continue
            loaded = sorted({w["model"] for w in workers.values() if w.get("model")})
            message = (f"model={model!r} is no longer loaded on any GPU worker (loaded: "
                       f"{', '.join(map(repr, loaded)) or 'none'}); submit again without model, or load it first")
            for job_id in job_ids:
                # Off the queue, and RQ's copy gone (Job.delete trips over a dead worker's execution record).
                queue.remove(job_id)
                self.store.redis.delete(Job.key_for(job_id))
                if self.store.finish(job_id, _failed(), code="model_not_loaded", message=message):
                    log.warning("pinned job failed: no worker holds its model", extra={"job_id": job_id,
                                                                                       "model": model})
            self._stranded_since.pop(model, None)

    def reconcile(self) -> None:
        r = self.store.redis
        for job_id in self.store.ids_with_status("running"):
            job = self.store.get(job_id)
            if job is None or job["status"] != "running":
                continue
            try:
                rq_status = Job.fetch(job_id, connection=r, serializer=JSONSerializer).get_status(refresh=False)
            except NoSuchJobError:
                rq_status = None
            if rq_status in (RqStatus.FAILED, None):
                n = job["attempts"]
                self.store.finish(job_id, _failed(), code="worker_lost",
                                  message=f"the GPU worker running this job stopped on each of its {n} "
                                          f"attempt{'s' if n != 1 else ''} (TWIN_JOB_ATTEMPTS="
                                          f"{self.settings.job_attempts}); submit it again")
                log.warning("job failed: its worker died on every attempt", extra={"job_id": job_id})
            elif rq_status in (RqStatus.SCHEDULED, RqStatus.QUEUED):
                if self.store.back_to_queued(job_id, job["attempts"]):
                    log.warning("job will run again: its worker died", extra={"job_id": job_id,
                                                                              "attempt": job["attempts"]})
        for job_id in self.store.queued_ids():
            # A record whose enqueue never reached RQ (Redis went away between the two writes).
            if not Job.exists(job_id, connection=r):
                job = self.store.get(job_id)
                if job is not None and job["status"] == "queued" and time.time() - job["created_at"] > 5:
                    enqueue(self.queue, job_id, self.settings, model=job_model(self.store, job_id))


def _failed():
    from utils.jobs.store import JobStatus
    return JobStatus.FAILED


def enqueue(queue: Queue, job_id: str, settings: Settings, *, model: str | None = None) -> None:
    """Enqueue ``job_id`` on ``queue``, or on ``model``'s queue when the job is pinned to a base model
    (RQ's retries then go back to that queue: it is the job's origin)."""
    if model:
        queue = make_model_queue(queue.connection, model)
        queue.connection.hset(rq_models.MODEL_QUEUES, queue.name, model)
    retry = None
    if settings.job_attempts > 1:
        n = settings.job_attempts - 1
        # RQ picks interval[len - retries_left]: pad with the last value so it is the one that repeats.
        backoff = (settings.retry_backoff_list + [settings.retry_backoff_list[-1]] * n)[:n]
        retry = Retry(max=n, interval=backoff)
    queue.enqueue(JOB_FUNC, job_id, job_id=job_id, retry=retry, job_timeout=JOB_TIMEOUT_S,
                  result_ttl=RESULT_TTL_S, failure_ttl=FAILURE_TTL_S, description=f"twin job {job_id}")


class RqJobManager:
    """``JobManager``'s interface for an API node (and for the Runtime inside a GPU worker)."""

    def __init__(self, store: RedisJobStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.queue = make_queue(store.redis)
        self.maintenance = Maintenance(store, settings)
        self.running: dict[int, str | None] = {}
        self._draining = False

    def start(self, requeue_interrupted: bool = False) -> dict[str, list[str]]:
        self.maintenance.start()
        return {"requeued": [], "failed": []}

    def stop(self, timeout: float = 10.0) -> None:
        self.maintenance.stop()

    @redis_guard
    def submit(self, job_id: str) -> None:
        enqueue(self.queue, job_id, self.settings, model=job_model(self.store, job_id))

    # --- base-model registry (rq_models) ---
    @redis_guard
    def models_catalogue(self) -> dict:
        return rq_models.catalogue(rq_models.live_workers(self.store.redis))

    @redis_guard
    def check_model(self, model: str) -> None:
        rq_models.check_pinned(self.store.redis, model)

    @redis_guard
    def load_model(self, model: str, workers: list[str] | None = None) -> dict:
        """Ask live workers to load ``model`` beside theirs and switch between jobs; wait (bounded by
        TWIN_MODEL_LOAD_WAIT_SECONDS) for their answers. A failed load -> 422 model_load_failed naming the
        file (those workers keep their model); workers still loading at the deadline -> listed as pending."""
        t0 = time.perf_counter()
        cmd_id, targets = rq_models.send_load(self.store.redis, model, workers)
        answers = rq_models.wait_load(self.store.redis, cmd_id, targets, self.settings.model_load_wait_seconds)
        body = {"model": model, "swap_s": round(time.perf_counter() - t0, 3), "workers": answers}
        failed = [a for a in answers if a.get("error")]
        if failed:
            first = failed[0]["error"]
            code = "model_load_failed" if any(a["error"]["code"] == "model_load_failed" for a in failed) \
                else first["code"]
            lead = next((a["error"] for a in failed if a["error"]["code"] == code), first)
            status = {"model_load_failed": 422, "unknown_model": 404, "worker_lost": 503, "not_supported": 501}.get(code, 500)
            raise errors.TwinError(f"{failed[0]['name']}: {lead['message']}", code=code, http_status=status,
                                   details=body)
        pending = [a["name"] for a in answers if a.get("pending")]
        if pending:
            body["pending"] = pending
        return body

    @redis_guard
    def cancel(self, job_id: str) -> bool:
        if self.store.cancel_queued(job_id):
            try:
                Job.fetch(job_id, connection=self.store.redis, serializer=JSONSerializer).cancel()
            except (NoSuchJobError, Exception):  # noqa: BLE001 - the worker skips a canceled record anyway
                pass
            return True
        job = self.store.get(job_id)
        if job is None or job["status"] != "running":
            return False
        # The key first: it survives a lost pub/sub message and a worker that re-runs the job later.
        self.store.request_cancel(job_id)
        from rq.command import send_stop_job_command
        try:
            send_stop_job_command(self.store.redis, job_id, serializer=JSONSerializer)
        except Exception:  # noqa: BLE001 - e.g. no worker holds it right now: the key does the work
            pass
        return True

    def depth(self) -> int:
        return self.store.counts()["queued"]

    def acquire_singleton(self, name: str, ttl_s: float) -> bool:
        """True for exactly one caller in the cluster per ``ttl_s`` (e.g. the retention sweep)."""
        try:
            return bool(self.store.redis.set("twin:once:" + name, socket.gethostname(), nx=True,
                                             px=int(ttl_s * 1000)))
        except RedisError:
            return False

    # --- graceful stop: an API node runs no job, so there is nothing to finish or re-queue ---
    def begin_drain(self) -> None:
        self._draining = True

    @property
    def draining(self) -> bool:
        return self._draining

    def running_ids(self) -> list[str]:
        return []

    def drain(self, deadline: float, stop_wait: float = 5.0) -> dict[str, list[str]]:
        self.begin_drain()
        return {"finished": [], "requeued": []}

    # --- /system-status ---
    def cluster_status(self) -> dict:
        from rq import Worker
        r = self.store.redis
        workers = []
        try:
            for w in Worker.all(queue=self.queue):
                info = rq_models.read_info(r, w.name) or {}
                hb = w.last_heartbeat
                workers.append({
                    "name": w.name, "host": w.hostname, "pid": w.pid, "state": w.get_state(),
                    "device": info.get("device"), "gpu_name": info.get("gpu_name"),
                    "model": info.get("model") or None, "model_state": info.get("state") or None,
                    "heartbeat_age_s": None if hb is None else round(time.time() - hb.timestamp(), 1),
                    "current_job": w.get_current_job_id(),
                    "jobs_succeeded": w.successful_job_count, "jobs_failed": w.failed_job_count})
        except RedisError as e:
            raise errors.ServiceNotReady(f"the job queue (Redis) is unreachable: {type(e).__name__}",
                                         code="queue_unavailable") from None
        return {"backend": "rq", "queue": QUEUE_NAME, "rq_queue_length": len(self.queue),
                "scheduled_retries": ScheduledJobRegistry(queue=self.queue).count, "workers": workers}
