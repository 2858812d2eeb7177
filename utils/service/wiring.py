"""The one place where settings become components: which engine (in-process or in a generator process, one
per GPU), which face service, which storage (the data folder, or an S3 bucket), which job store / queue /
event log / Idempotency-Key store (local SQLite + job threads, or cluster Redis + RQ), which face restorer,
which safety guard (classifier, term list, C2PA signer). Everything else receives what this builds, so
tests swap an implementation by passing another.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pathlib import Path

from utils.config import Settings
from utils.contracts import Storage
from utils.service.face_setup import face_settings


@dataclass
class Parts:
    """What a Runtime is made of. ``queue`` is a factory ``(run, ready, on_preview) -> JobQueue`` (the local
    job threads call back into the runtime); ``restorer`` a factory ``(profile) -> FaceRestorer``; ``safety``
    an OutputSafety (set up by the Runtime once the models are known)."""
    engines: list
    faces: Any
    storage: Storage
    store: Any
    queue: Callable
    events: Any
    webhooks: Any
    restorer: Callable[[str | None], Any]
    safety: Any = None


def build_runtime(settings: Settings, *, engines: list | None = None, faces=None, gpu_worker: bool = False,
                  safety=None):
    """A Runtime for this process: the web app (local mode, or a cluster's API node) or a GPU worker.
    ``engines`` / ``faces`` / ``safety``: test doubles, else the real ones from the settings."""
    from utils.service.runtime import Runtime
    storage = build_storage(settings)
    store = build_store(settings)
    parts = Parts(engines=engines if engines is not None else build_engines(settings),
                  faces=faces if faces is not None else build_faces(settings), storage=storage, store=store,
                  queue=lambda run, ready, on_preview: build_queue(settings, store, run, ready, on_preview,
                                                                   len(engines or []) or worker_count(settings)),
                  events=build_events(settings, store), webhooks=build_webhooks(settings, store),
                  restorer=lambda profile: build_restorer(settings, profile),
                  safety=safety if safety is not None else build_safety(settings))
    return Runtime(settings, parts, holds_models=gpu_worker or not settings.cluster)


# --- storage ---------------------------------------------------------------------------------------

def build_storage(settings: Settings, *, check_access: bool = True) -> Storage:
    """The data folder (TWIN_DATA_DIR), or the bucket of TWIN_STORAGE_URL=s3://bucket/prefix with a bounded
    cache of what this process reads in <data_dir>/storage-cache. ``check_access``: wrong credentials or a
    missing bucket stop start-up with a ConfigError naming the setting (an unreachable bucket does not)."""
    if not settings.storage_url:
        from utils.storage.local import LocalStorage
        return LocalStorage(settings.data_dir, min_free_mb=settings.min_free_mb)
    from utils.storage.bucket import Bucket
    from utils.storage.cache import ObjectCache
    from utils.storage.s3 import S3Storage
    bucket = Bucket(settings.storage_url, endpoint_url=settings.s3_endpoint_url,
                    addressing_style=settings.s3_addressing_style, sse=settings.s3_sse,
                    max_attempts=settings.s3_max_attempts)
    if check_access:
        bucket.check_access()
    cache = ObjectCache(settings.data_dir / "storage-cache", int(settings.storage_cache_mb * 1048576))
    return S3Storage(bucket, cache)


def job_db_path(settings: Settings) -> Path:
    """Local mode's job, session and Idempotency-Key records: SQLite in the data folder whichever storage
    holds the files (a bucket is no database); cluster mode keeps them in Redis."""
    return settings.data_dir / "jobs.db"


# --- engines ---------------------------------------------------------------------------------------

def engine_class():
    """DigitalTwinGenerator, the in-process engine (a generator process builds one in its child)."""
    from utils.engine.generator import DigitalTwinGenerator
    return DigitalTwinGenerator


def cuda_device_count() -> int:
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no torch, no GPU
        return 0


def worker_count(settings: Settings) -> int:
    """TWIN_WORKERS, or one per GPU when the device is auto/cuda, else one."""
    if settings.workers:
        return settings.workers
    if settings.device in ("auto", "cuda"):
        return max(1, cuda_device_count())
    return 1


def build_engines(settings: Settings) -> list:
    """One engine per GPU (a diffusers pipeline is not safe to call from two threads at once), each in a
    generator process unless TWIN_GENERATOR_PROCESS=0 (the generation loop holds the GIL, and /status must
    not wait on it). A cluster's API node builds the in-process engine object but never sets it up."""
    cls = engine_class()
    if settings.generator_process and not settings.cluster:
        from utils.jobs.local.generator_process import GeneratorProcess

        def make(s):
            return GeneratorProcess(s, engine_class=cls)
    else:
        make = cls
    n = worker_count(settings) if not settings.cluster else 1
    if n == 1:
        return [make(settings)]
    return [make(settings.replace(device=f"cuda:{i}")) for i in range(n)]


def style_catalogue(settings: Settings) -> dict:
    """The style library (GET /styles). Read at start-up: a broken file raises ConfigError naming the line."""
    from utils.engine.tuning import DEFAULT_STYLE, style_library
    from utils.styles import catalogue
    return {"default_style": DEFAULT_STYLE, "styles": catalogue(style_library(settings))}


def request_fields() -> tuple:
    """The declared request fields (for the OpenAPI document; loads no model)."""
    from utils.engine.request import REQUEST_FIELDS
    return REQUEST_FIELDS


def request_applicability() -> dict[str, dict[str, str]]:
    """Which request fields apply to which model family, and when (for the OpenAPI document)."""
    from utils.engine.request import APPLICABILITY
    return {name: dict(rule.families) for name, rule in APPLICABILITY.items()}


# --- faces -----------------------------------------------------------------------------------------

def build_faces(settings: Settings):
    from utils.faces import FaceService
    return FaceService(face_settings(settings))


def build_restorer(settings: Settings, profile: str | None):
    """Face restoration runs in the process that runs the job runner, beside the face service whose
    detections it aligns (not in the generator process: it has no face backend, and onnxruntime releases
    the GIL while it runs, so /status stays fast)."""
    from utils.faces.restore import FaceRestorer
    if settings.restore_model_dir is not None:
        return FaceRestorer(settings.restore_model_dir)
    if profile == "tiny":
        # The demo profile restores with ONNX stand-ins (real names and shapes), written on demand.
        return FaceRestorer(settings.resolved_tiny_model_dir / "face_restore", standins=True)
    return FaceRestorer(settings.resolved_restore_dir, model_dir_hint=settings.model_dir)


# --- safety and provenance -------------------------------------------------------------------------

def build_safety(settings: Settings):
    """The safety guard (utils/safety/guard.py): the explicit-term list, the NSFW classifier (TWIN_SAFETY_MODE,
    TWIN_SAFETY_MODEL_DIR) and the C2PA signer (TWIN_C2PA_CERT/KEY, else the development CA in the data dir).
    Nothing loads here: the Runtime sets it up in the process that uses it (c2pa and torch objects are per
    process), with the classifier only where jobs run."""
    from utils.safety.guard import SafetyGuard
    return SafetyGuard(settings)


# --- jobs ------------------------------------------------------------------------------------------

def build_store(settings: Settings):
    """Job and session records: SQLite (jobs.db in the data dir) in local mode, Redis in cluster mode."""
    if settings.cluster:
        from utils.jobs.cluster.store import RedisJobStore
        return RedisJobStore(settings.queue_url)
    from utils.jobs.local.store import SqliteJobStore
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return SqliteJobStore(job_db_path(settings))


def build_queue(settings: Settings, store, run, ready, on_preview, engines: int):
    """Local mode: one job thread per engine in this process. Cluster mode: the RQ queue that the GPU
    workers (./start_worker.sh) work."""
    if settings.cluster:
        from utils.jobs.cluster.queue import RqJobQueue
        return RqJobQueue(store, settings)
    from utils.jobs.local.threads import JobThreads
    return JobThreads(store, run, workers=engines, ready=ready, on_preview=on_preview)


def build_events(settings: Settings, store):
    """Live events: in this process in local mode; Redis streams beside the job records in cluster mode,
    where the GPU worker that runs a job and the API node that streams it are different processes."""
    if settings.cluster:
        from utils.jobs.cluster.events import RedisEventLog
        return RedisEventLog(store.redis, prefix=store.prefix)
    from utils.jobs.events import MemoryEventLog
    return MemoryEventLog()


def build_webhooks(settings: Settings, store):
    from utils.jobs.webhooks import WebhookDispatcher
    return WebhookDispatcher(settings, store)


def build_idempotency(settings: Settings, store):
    """The Idempotency-Key records: in jobs.db for local mode; in the cluster's Redis (beside the job
    records, same connection) for cluster mode, so a retry that lands on another API node sees the
    first node's record."""
    if settings.cluster:
        from utils.jobs.cluster.idempotency import RedisIdempotencyStore
        return RedisIdempotencyStore(store.redis, settings.idempotency_hours, prefix=store.prefix,
                                     in_flight_seconds=settings.idempotency_in_flight_seconds)
    from utils.jobs.local.idempotency import SqliteIdempotencyStore
    return SqliteIdempotencyStore(job_db_path(settings), settings.idempotency_hours,
                                  in_flight_seconds=settings.idempotency_in_flight_seconds)
