"""Where a cluster job goes: the RQ queues and the one ``enqueue``, shared by the API's queue
(``queue.RqJobQueue``), the housekeeping (``maintenance``) and the GPU worker (``worker``).

A job is enqueued on the shared queue ``twin``, or, when its request names a base ``model``, on that
model's queue (``model_queue_name``: a safe RQ queue name derived from the validated name, a slug plus a
hash, so no two names share a queue; the map queue -> model is kept in ``twin:modelqueues`` for the
housekeeping). A GPU worker listens on its active model's queue first, then on ``twin``. The JSON
serializer everywhere; the job function is ``JOB_FUNC`` (the worker's ``perform``), referenced by name.
Retries and re-enqueues keep the job's queue (RQ re-queues to the job's origin; ``enqueue`` picks the
queue from the record).
"""
from __future__ import annotations

import hashlib
import re

from rq import Queue, Retry
from rq.serializers import JSONSerializer

from utils.config import Settings
from utils.contracts import JobStore
from utils.jobs.cluster.connection import as_text

QUEUE_NAME = "twin"
MODEL_QUEUES = "twin:modelqueues"  # hash: RQ queue name -> model name (for maintenance: retries, strands)
JOB_FUNC = "utils.jobs.cluster.worker.perform"
JOB_TIMEOUT_S = 6 * 3600          # RQ's own per-job timeout: a generation never takes this long
RESULT_TTL_S = 3600                # RQ's copy only; the app's record is the truth
FAILURE_TTL_S = 7 * 24 * 3600


def model_queue_name(model: str) -> str:
    """The RQ queue of jobs pinned to ``model``: readable, Redis-safe, and distinct per name."""
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", model)[:64]
    return f"{QUEUE_NAME}:model:{slug}:{hashlib.sha1(model.encode()).hexdigest()[:8]}"


def make_queue(connection) -> Queue:
    return Queue(QUEUE_NAME, connection=connection, serializer=JSONSerializer)


def make_model_queue(connection, model: str) -> Queue:
    """The queue of jobs pinned to base model ``model`` (its workers listen to it before ``twin``)."""
    return Queue(model_queue_name(model), connection=connection, serializer=JSONSerializer)


def model_queues(connection) -> dict[str, Queue]:
    """model -> its queue, for every model a job was ever pinned to (``MODEL_QUEUES``)."""
    return {as_text(model): Queue(as_text(qname), connection=connection, serializer=JSONSerializer)
            for qname, model in connection.hgetall(MODEL_QUEUES).items()}


def job_model(store: JobStore, job_id: str) -> str | None:
    """The base model a job's request names (its queue), None for an unpinned job."""
    job = store.get(job_id)
    model = (job or {}).get("payload", {}).get("model") if job else None
    return model if isinstance(model, str) and model else None


def enqueue(queue: Queue, job_id: str, settings: Settings, *, model: str | None = None) -> None:
    """Enqueue ``job_id`` on ``queue``, or on ``model``'s queue when the job is pinned to a base model
    (RQ's retries then go back to that queue: it is the job's origin)."""
    if model:
        queue = make_model_queue(queue.connection, model)
        queue.connection.hset(MODEL_QUEUES, queue.name, model)
    retry = None
    if settings.job_attempts > 1:
        n = settings.job_attempts - 1
        # RQ picks interval[len - retries_left]: pad with the last value so it is the one that repeats.
        backoff = (settings.retry_backoff_list + [settings.retry_backoff_list[-1]] * n)[:n]
        retry = Retry(max=n, interval=backoff)
    queue.enqueue(JOB_FUNC, job_id, job_id=job_id, retry=retry, job_timeout=JOB_TIMEOUT_S,
                  result_ttl=RESULT_TTL_S, failure_ttl=FAILURE_TTL_S, description=f"twin job {job_id}")
