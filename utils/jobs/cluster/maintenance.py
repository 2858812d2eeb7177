"""Cluster housekeeping: what RQ would do in a forked scheduler and in worker maintenance, here in a
thread of a process that forks nothing.

Every API node and GPU worker runs a ``Maintenance`` thread; one at a time (a Redis lock) moves due
retries from the ScheduledJobRegistry to the queue, cleans the registries (a job whose GPU worker stopped
sending heartbeats is re-run or, after the last attempt, failed), and settles the app's records from
RQ's view (running job whose RQ job failed -> ``failed``/``worker_lost``; running job waiting for its
retry -> ``queued``; a queued record whose enqueue was lost -> enqueued again, on its model's queue),
over the shared queue and every model queue, and fails pinned jobs stranded on a model queue that no
live GPU worker holds or is loading (after TWIN_MODEL_STRAND_SECONDS) with model_not_loaded.
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
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RqStatus
from rq.registry import ScheduledJobRegistry, clean_registries
from rq.serializers import JSONSerializer
from rq.worker_registration import clean_worker_registry

from utils.config import Settings
from utils.jobs.cluster import registry
from utils.jobs.cluster.routing import enqueue, job_model, make_queue, model_queues
from utils.jobs.cluster.store import RedisJobStore
from utils.jobs.status import JobStatus

log = logging.getLogger("twin.cluster")


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
        """model -> its queue, for every model a job was ever pinned to."""
        return model_queues(self.store.redis)

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
                    # At the front: a job re-run after its GPU worker died (or a drain) has waited its turn.
                    queue._enqueue_job(job, pipeline=p, at_front=True)
            for job_id in job_ids:
                registry.remove(job_id, pipeline=p)
            p.execute()

    def fail_stranded(self) -> None:
        """A pinned job waits on its model's queue; when no live GPU worker holds that model or is loading it
        (they switched away or died) for TWIN_MODEL_STRAND_SECONDS, its jobs fail with model_not_loaded
        rather than wait forever."""
        queues = self.model_queues()
        if not queues:
            return
        workers = registry.live_workers(self.store.redis)
        held = registry.held_models(workers)
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
                if self.store.finish(job_id, JobStatus.FAILED, code="model_not_loaded", message=message):
                    log.warning("pinned job failed: no GPU worker holds its model", extra={"job_id": job_id,
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
                self.store.finish(job_id, JobStatus.FAILED, code="worker_lost",
                                  message=f"the GPU worker running this job stopped on each of its {n} "
                                          f"attempt{'s' if n != 1 else ''} (TWIN_JOB_ATTEMPTS="
                                          f"{self.settings.job_attempts}); submit it again")
                log.warning("job failed: its GPU worker died on every attempt", extra={"job_id": job_id})
            elif rq_status in (RqStatus.SCHEDULED, RqStatus.QUEUED):
                if self.store.back_to_queued(job_id, job["attempts"]):
                    log.warning("job will run again: its GPU worker died", extra={"job_id": job_id,
                                                                              "attempt": job["attempts"]})
        for job_id in self.store.queued_ids():
            # A record whose enqueue never reached RQ (Redis went away between the two writes).
            if not Job.exists(job_id, connection=r):
                job = self.store.get(job_id)
                if job is not None and job["status"] == "queued" and time.time() - job["created_at"] > 5:
                    enqueue(self.queue, job_id, self.settings, model=job_model(self.store, job_id))
