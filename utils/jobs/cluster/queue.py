"""Cluster mode's queue: the ``JobQueue`` contract (``utils.contracts``) on RQ, for an API node (and for
the Runtime inside a GPU worker); local mode's is ``utils.jobs.local.threads``.

``RqJobQueue.submit`` enqueues the job id (``routing.enqueue``: on ``twin``, or on its model's queue,
with ``Retry(max=TWIN_JOB_ATTEMPTS-1, interval=TWIN_RETRY_BACKOFF)``); a GPU worker
(``./start_worker.sh``) runs it. Cancel: a queued job is canceled in the record (the GPU worker that
dequeues it later does not start it); a running one gets a Redis key its step callback reads plus RQ's
stop-job command (the worker's ``kill_horse`` sets its cancel event). It also starts this process's
``Maintenance`` thread and answers the cluster-only capabilities: ``ClusterStatus``,
``ClusterSingleton`` and ``ModelRouting`` (the base-model registry, ``registry``).
"""
from __future__ import annotations

import socket
import time

from redis.exceptions import RedisError
from rq import Worker
from rq.command import send_stop_job_command
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.registry import ScheduledJobRegistry
from rq.serializers import JSONSerializer

from utils import errors
from utils.config import Settings
from utils.jobs.cluster import registry
from utils.jobs.cluster.connection import redis_guard
from utils.jobs.cluster.maintenance import Maintenance
from utils.jobs.cluster.routing import QUEUE_NAME, enqueue, job_model, make_queue
from utils.jobs.cluster.store import RedisJobStore


class RqJobQueue:
    """The ``JobQueue`` contract on RQ (see the module doc)."""

    def __init__(self, store: RedisJobStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.queue = make_queue(store.redis)
        self.maintenance = Maintenance(store, settings)
        self._draining = False

    def start(self, requeue_interrupted: bool = False) -> dict[str, list[str]]:
        self.maintenance.start()
        return {"requeued": [], "failed": []}

    def stop(self, timeout: float = 10.0) -> None:
        self.maintenance.stop()

    @redis_guard
    def submit(self, job_id: str) -> None:
        enqueue(self.queue, job_id, self.settings, model=job_model(self.store, job_id))

    # --- ModelRouting: the base-model registry ---
    @redis_guard
    def models_catalogue(self) -> dict:
        return registry.catalogue(registry.live_workers(self.store.redis))

    @redis_guard
    def check_model(self, model: str) -> None:
        registry.check_pinned(self.store.redis, model)

    def pinned_target(self, model: str) -> dict | None:
        return registry.pinned_target(self.store.redis, model)

    @redis_guard
    def load_model(self, model: str, workers: list[str] | None = None) -> dict:
        """Ask live GPU workers to load ``model`` beside theirs and switch between jobs; wait (bounded by
        TWIN_MODEL_LOAD_WAIT_SECONDS) for their answers. A failed load -> 422 model_load_failed naming the
        file (those workers keep their model); workers still loading at the deadline -> listed as pending."""
        t0 = time.perf_counter()
        cmd_id, targets = registry.send_load(self.store.redis, model, workers)
        answers = registry.wait_load(self.store.redis, cmd_id, targets, self.settings.model_load_wait_seconds)
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
        try:
            send_stop_job_command(self.store.redis, job_id, serializer=JSONSerializer)
        except Exception:  # noqa: BLE001 - e.g. no GPU worker holds it right now: the key does the work
            pass
        return True

    def depth(self) -> int:
        return self.store.counts()["queued"]

    # --- ClusterSingleton ---
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

    # --- ClusterStatus: /system-status ---
    def cluster_status(self) -> dict:
        r = self.store.redis
        workers = []
        try:
            for w in Worker.all(queue=self.queue):
                info = registry.read_info(r, w.name) or {}
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
