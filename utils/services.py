"""The one place where settings become real components, plus the service's use cases.

``build_generators`` / ``build_faces`` import the engines lazily so the app imports (and its tests
run with fakes) without them. ``Runtime`` owns the background set-up, the job store/manager and the
upload / generate / delete flows; app.py only translates HTTP to these calls.
"""
from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import Any

from utils import errors
from utils.config import Settings
from utils.errors import is_oom
from utils.jobs import JobStatus
from utils.jobs.events import MemoryEventLog
from utils.jobs.local.store import SqliteJobStore
from utils.jobs.local.threads import JobThreads
from utils.logging import log_context
from utils.storage import (Storage, atomic_save_png, atomic_save_thumbnail, is_valid_id, new_id, output_name,
                           raw_output_name, thumbnail_name)

log = logging.getLogger("twin.service")
STORED_INIT_NAME = "init_image.png"   # beside a job's outputs; not an output name, so never served
VERSION = "0.1.0"


# --- settings -> constructors ------------------------------------------------------------------

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


# The engine modules (generate_twin, ipadapter_manager) are imported only here, lazily: nothing in utils/
# needs torch or diffusers at import time, and the app runs its tests on doubles without them.

def engine_class():
    """DigitalTwinGenerator, the in-process engine (the generator child process builds one too)."""
    from generate_twin import DigitalTwinGenerator
    return DigitalTwinGenerator


def request_fields() -> tuple:
    """The declared request fields (generate_twin.REQUEST_FIELDS), for the OpenAPI document (loads no model)."""
    from generate_twin import REQUEST_FIELDS
    return REQUEST_FIELDS


def style_catalogue(settings: Settings) -> dict:
    """The style library (GET /styles). Read at start-up: a broken file raises ConfigError naming the line."""
    from generate_twin import DEFAULT_STYLE, style_library
    from utils.styles import catalogue
    return {"default_style": DEFAULT_STYLE, "styles": catalogue(style_library(settings))}


def build_generators(settings: Settings) -> list:
    if settings.generator_process:
        # A child process per generator: the generation loop holds the GIL, and /status must not wait on it.
        from functools import partial
        from utils.jobs.local.generator_process import GeneratorProcess
        make = partial(GeneratorProcess, engine_class=engine_class())
    else:
        make = engine_class()
    n = worker_count(settings)
    if n == 1:
        return [make(settings)]
    # One pipeline per GPU: a diffusers pipeline is not safe to call from two threads at once.
    return [make(settings.replace(device=f"cuda:{i}")) for i in range(n)]


ARCFACE_VARIANTS = ("faceid", "faceid-plusv2", "instantid")   # adapters fed 512-d ArcFace embeddings


def face_settings(settings: Settings) -> Settings:
    """The settings the face service runs with. An ArcFace variant on the tiny profile, with no InsightFace
    pack configured or present, uses the tiny stand-in antelopev2 pack that the tiny builder writes (real
    pack I/O, tiny graphs), so the tiny profile runs these variants end to end offline."""
    from utils.faces.backends import insightface_pack_files
    if (settings.ip_adapter_variant not in ARCFACE_VARIANTS or settings.face_backend == "dlib"
            or settings.insightface_model_dir is not None or insightface_pack_files(settings.resolved_insightface_dir)):
        return settings
    from utils.models.layout import ANTELOPE_DIR, choose_profile
    if choose_profile(settings) != "tiny":
        return settings
    return settings.replace(insightface_model_dir=settings.resolved_tiny_model_dir / ANTELOPE_DIR)


def prepare_face_models(settings: Settings) -> None:
    """Builds the tiny folder (and so its stand-in face pack) when the face service is to use it."""
    pack = settings.insightface_model_dir
    tiny = settings.resolved_tiny_model_dir
    if pack is not None and tiny in pack.parents:
        from utils.models.tiny import make_tiny
        make_tiny(tiny)


def check_face_backend(settings: Settings, faces) -> None:
    """An ArcFace adapter with the dlib backend (128-d descriptors) cannot work: stop at start-up with what
    to install, rather than at every upload."""
    variant = settings.ip_adapter_variant
    if variant in ARCFACE_VARIANTS and getattr(faces, "backend_name", None) == "dlib":
        raise errors.ModelWeightsMissing(
            f"TWIN_IP_ADAPTER_VARIANT={variant} needs 512-d ArcFace face embeddings, but the face backend is dlib "
            f"(128-d). Install the InsightFace backend: pip install --no-deps insightface==2.1 and "
            f"pip install onnxruntime (onnxruntime-gpu on a GPU box), put the "
            f"{'antelopev2' if variant != 'faceid' else 'buffalo_l'} pack's .onnx files in "
            f"{settings.resolved_insightface_dir} (or set TWIN_INSIGHTFACE_MODEL_DIR), and set "
            f"TWIN_FACE_BACKEND=insightface (or auto)", code="face_models_missing")


def identity_inputs(report) -> dict:
    """``report.identity_inputs()`` (raw ArcFace lengths, key points); {} for a report without it (a face
    service double written against the earlier contract)."""
    f = getattr(report, "identity_inputs", None)
    return f() if callable(f) else {}


def build_jobs(settings: Settings, db_path, runner, workers: int, ready: threading.Event, on_preview=None):
    """(store, manager) of the job backend TWIN_QUEUE_URL picks: local mode's SQLite store + worker
    threads, or cluster mode's Redis records + RQ queue (the jobs run in ./start_worker.sh processes)."""
    if settings.cluster:
        from utils.jobs.cluster.queue import RqJobQueue
        from utils.jobs.cluster.store import RedisJobStore
        store = RedisJobStore(settings.queue_url)
        return store, RqJobQueue(store, settings)
    store = SqliteJobStore(db_path)
    return store, JobThreads(store, runner, workers=workers, ready=ready, is_oom=is_oom, on_preview=on_preview)


def build_events(settings: Settings, store):
    """The live event source: in-process for local mode, Redis streams (beside the job records) for
    cluster mode, where the worker that runs a job and the node that streams it are different processes."""
    if settings.cluster:
        from utils.jobs.cluster.events import RedisEventLog
        return RedisEventLog(store.redis, prefix=store.prefix)
    return MemoryEventLog()


def build_idempotency(settings: Settings, db_path, store):
    """The Idempotency-Key records: in jobs.db for local mode; in the cluster's Redis (beside the job
    records, same connection) for cluster mode, so a retry that lands on another API node sees the
    first node's record."""
    if settings.cluster:
        from utils.jobs.cluster.idempotency import RedisIdempotencyStore
        return RedisIdempotencyStore(store.redis, settings.idempotency_hours, prefix=store.prefix,
                                     in_flight_seconds=settings.idempotency_in_flight_seconds)
    from utils.jobs.local.idempotency import SqliteIdempotencyStore
    return SqliteIdempotencyStore(db_path, settings.idempotency_hours,
                                  in_flight_seconds=settings.idempotency_in_flight_seconds)


def build_faces(settings: Settings):
    from utils.faces import FaceService
    return FaceService(face_settings(settings))


def build_restorer(settings: Settings, profile: str | None):
    """Face restoration runs in this (web) process, beside the face service whose detections it aligns:
    the generator child has no face backend, a second one there would cost memory (and a GPU context for
    InsightFace), and onnxruntime releases the GIL while it runs, so /status stays fast."""
    from utils.faces.restore import FaceRestorer
    if settings.restore_model_dir is not None:
        return FaceRestorer(settings.restore_model_dir)
    if profile == "tiny":
        # The demo profile restores with ONNX stand-ins (real names and shapes), written on demand.
        return FaceRestorer(settings.resolved_tiny_model_dir / "face_restore", standins=True)
    return FaceRestorer(settings.resolved_restore_dir, model_dir_hint=settings.model_dir)


def per_call_images(generator) -> int:
    """Most images one generate() call makes (best-of-N generates its candidates in calls of this size)."""
    n = getattr(generator, "max_images_per_call", None)
    if n:
        return int(n)
    from generate_twin import MAX_IMAGES
    return MAX_IMAGES


def request_type(generator):
    """GenerationRequest; a test double may carry its own as ``generator.request_type``."""
    t = getattr(generator, "request_type", None)
    if t is not None:
        return t
    from generate_twin import GenerationRequest
    return GenerationRequest


def identity_type(generator):
    t = getattr(generator, "identity_type", None)
    if t is not None:
        return t
    from ipadapter_manager import SessionIdentity
    return SessionIdentity


# --- the runtime -------------------------------------------------------------------------------

class Runtime:
    def __init__(self, settings: Settings, generators: list, faces) -> None:
        self.settings = settings
        self.generators = generators
        self.faces = faces
        self.storage = Storage(settings.data_dir, min_free_mb=settings.min_free_mb)
        self.clock = time.time  # tests swap in a fake clock (retention)
        self._drain_deadline: float | None = None
        self.state = "starting"
        self.setup_error: str | None = None
        self.started_at = time.time()
        self.ready = threading.Event()
        self.store, self.manager = build_jobs(settings, self.storage.db_path, self._run_job, len(generators),
                                              self.ready, on_preview=self._preview)
        # Live events (GET /events): the store reports each change, the log keeps them per job (in this
        # process in local mode; in Redis streams in cluster mode, so any node streams any job).
        self.events = build_events(settings, self.store)
        self.store.listeners.append(self._job_event)
        self.stream_slots = threading.BoundedSemaphore(settings.max_event_streams)
        # Webhooks: another listener of the store, in whichever process changes the job (in cluster mode
        # the worker sends running/progress/output/completed, the API node a cancel of a queued job).
        from utils.jobs.webhooks import WebhookDispatcher
        self.webhooks = WebhookDispatcher(settings, self.store)
        self.store.listeners.append(self.webhooks.on_job_event)
        self.session_deleted_hooks: list = []  # called with the session id after a session is deleted
        self.shutdown_hooks: list = []  # called first in shutdown() (webhook delivery threads stop)
        self.restorer = None   # built once the generator says which profile it loaded
        self._setup_thread: threading.Thread | None = None
        self._sweeper: threading.Thread | None = None
        self._stop = threading.Event()
        from utils.jobs import lifecycle
        lifecycle.register(self)

    def _job_event(self, job_id: str, kind: str, data: dict) -> None:
        if kind == "deleted":
            self.events.forget(job_id)
            return
        self.events.publish(job_id, kind, data)
        if kind == "status" and JobStatus(data["status"]).terminal:
            self.events.drop_preview(job_id)  # the finished portraits replace the preview
            self.events.publish(job_id, "done", data)

    def _preview(self, job_id: str, step: int, jpeg: bytes) -> None:
        import base64
        self.events.set_preview(job_id, step, jpeg)
        self.events.publish(job_id, "preview", {
            "step": step, "image": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")})

    def preview(self, job_id: str, owner: str | None) -> tuple[int, bytes]:
        self.owned_job(job_id, owner)
        got = self.events.get_preview(job_id)
        if got is None:
            raise errors.NotFound(f"job {job_id!r} has no preview now (ask for preview: true; previews exist "
                                  "while the job runs)")
        return got

    # --- lifecycle ---
    def start(self) -> None:
        # Cluster mode: TWIN_DATA_DIR is shared, and a worker elsewhere may be writing its temp files now.
        removed = 0 if self.settings.cluster else self.storage.clean_partial_files()
        if removed:
            log.warning("removed partial files left by an earlier stop", extra={"count": removed})
        self.manager.start(self.settings.requeue_interrupted)
        for job_id in self.store.queued_ids():  # jobs from before a restart get a live event log too
            if not self.events.known(job_id):
                job = self.store.get(job_id)
                if job is not None:
                    self._job_event(job_id, "status", job)
        self._setup_thread = threading.Thread(target=self._setup, name="twin-setup", daemon=True)
        self._setup_thread.start()
        if self.settings.retention_hours > 0:
            self._sweeper = threading.Thread(target=self._sweep_loop, name="twin-retention", daemon=True)
            self._sweeper.start()

    def _setup(self) -> None:
        try:
            t0 = time.perf_counter()
            prepare_face_models(getattr(self.faces, "settings", self.settings))
            self.faces.setup()
            check_face_backend(self.settings, self.faces)
            for g in self.generators:
                g.setup()
            self.restorer = build_restorer(self.settings, _safe_info(self.generators[0]).get("profile"))
            self.state = "ready"
            self.ready.set()
            log.info("set-up finished", extra={"seconds": round(time.perf_counter() - t0, 2),
                                                "generator": _safe_info(self.generators[0])})
        except BaseException as e:  # noqa: BLE001 - reported on /health
            self.state = "setup_failed"
            self.setup_error = e.message if isinstance(e, errors.TwinError) else f"{type(e).__name__}: {e}"
            log.error("set-up failed", extra={"error": self.setup_error, "traceback": traceback.format_exc()})

    def wait_ready(self, timeout: float | None = None) -> bool:
        if self._setup_thread is not None:
            self._setup_thread.join(timeout)
        return self.state == "ready"

    def shutdown(self) -> None:
        self._stop.set()
        self.events.wake_all()  # open event streams see the stop and end
        self.webhooks.close()
        for hook in self.shutdown_hooks:
            hook()
        self.manager.stop()
        self.store.close()
        for g in self.generators:
            close = getattr(g, "close", None)  # a generator process: stop the child (no orphan)
            if callable(close):
                close()
        from utils.jobs import lifecycle
        lifecycle.unregister(self)

    # --- graceful stop (SIGTERM; see utils/jobs/lifecycle.py) ---
    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    def begin_drain(self) -> None:
        """Refuse new work from now on (503 shutting_down + Retry-After); the worker takes no new job.
        Cheap and lock-free: it runs inside the SIGTERM handler."""
        if self._drain_deadline is None:
            self._drain_deadline = time.time() + self.settings.drain_seconds
        self.manager.begin_drain()

    def drain(self) -> dict:
        """Finish the running job within TWIN_DRAIN_SECONDS of the stop signal, else re-queue it; queued
        jobs stay queued in the database; then stop the threads and close the database."""
        self.begin_drain()
        outcome = self.manager.drain(self._drain_deadline or time.time())
        counts = self.store.counts()
        log.info("drained", extra={"finished": len(outcome["finished"]), "requeued": len(outcome["requeued"]),
                                   "queued_for_restart": counts["queued"]})
        self.shutdown()
        return {**outcome, "queued": counts["queued"]}

    def require_ready(self) -> None:
        if self.draining:
            raise errors.ServiceNotReady("the server is shutting down; retry in a few seconds",
                                         code="shutting_down", retry_after=10)
        if self.state == "ready":
            return
        if self.state == "setup_failed":
            raise errors.ServiceNotReady(f"the service failed to start: {self.setup_error}", retry_after=60)
        raise errors.ServiceNotReady("the models are still loading; try again shortly", retry_after=5)

    # --- sessions ---
    def owned_session(self, session_id: str, owner: str | None) -> dict:
        rec = self.store.get_session(session_id) if is_valid_id(session_id) else None
        if rec is None or owner is None or rec["owner"] != owner:
            raise errors.NotFound(f"session {session_id!r} not found")
        return rec

    def upload(self, files: list[tuple[str, bytes]], owner: str) -> dict:
        self.require_ready()
        s = self.settings
        if not files:
            raise errors.InvalidRequest("no files: send one or more images as multipart field 'files'")
        if len(files) > s.max_selfies:
            raise errors.PayloadTooLarge(f"{len(files)} files is more than TWIN_MAX_SELFIES={s.max_selfies}")
        limit = int(s.max_file_mb * 1024 * 1024)
        for name, data in files:
            if len(data) > limit:
                raise errors.PayloadTooLarge(f"file {name!r} is {len(data) / 1048576:.1f} MB; the limit per file "
                                             f"is {s.max_file_mb:g} MB (TWIN_MAX_FILE_MB)")
        report = self.faces.validate_selfies(files)
        body = report.to_json()
        self_sim = self._self_similarity(report)
        if self_sim is not None:
            # The likeness a portrait can hope for: how much the person's own selfies agree.
            body["self_similarity"] = round(self_sim, 4)
        if not report.accepted:
            raise errors.TwinError("none of the uploaded files has a usable face; see details for each file",
                                   code="no_usable_selfies", http_status=422, details={"report": body})
        try:
            identity = self.generators[0].build_identity([a.crop for a in report.accepted],
                                                         [a.embedding for a in report.accepted],
                                                         face_model=report.model_name, **identity_inputs(report))
        except BaseException as e:
            if not isinstance(e, errors.TwinError) and is_oom(e):  # the image encoder runs on the GPU
                _empty_cuda_cache()
                raise errors.OutOfMemory("the GPU ran out of memory encoding the selfies; retry shortly",
                                         headers={"Retry-After": "10"}) from None
            raise
        session_id = new_id()
        created = self.clock()
        with log_context(session_id=session_id):
            self.storage.write_session(session_id, owner_hash=owner, files=files, report=report,
                                       identity=identity, created_at=created,
                                       self_similarity=body.get("self_similarity"))
            try:
                self.store.add_session(session_id, owner, created)
            except BaseException:
                self.storage.delete_session(session_id)  # no folder without its record
                raise
            log.info("session created", extra={"files": len(files), "accepted": len(report.accepted)})
        return {
            "success": True,
            "session_id": session_id,
            "total": len(files),
            "accepted_count": len(report.accepted),
            "rejected_count": len(report.rejected),
            "warnings": body.get("warnings", []),
            "self_similarity": body.get("self_similarity"),
            "report": body,
        }

    def _self_similarity(self, report) -> float | None:
        fn = getattr(self.faces, "self_similarity", None)
        if fn is None:
            return None
        try:
            return fn([a.embedding for a in report.accepted])
        except Exception:  # noqa: BLE001 - a reference number, never a reason to fail an upload
            return None

    def delete_session(self, session_id: str, owner: str | None) -> dict:
        self.owned_session(session_id, owner)
        return self._delete_session(session_id)

    def _delete_session(self, session_id: str) -> dict:
        active = self.store.active_ids_for_session(session_id)
        for job_id in active:
            self.manager.cancel(job_id)
        deadline = time.time() + 30
        while time.time() < deadline and self.store.active_ids_for_session(session_id):
            time.sleep(0.02)  # a running job stops within one denoising step
        try:
            self.store.delete_session_records(session_id)
        finally:
            # The faces go even when the records cannot be written (a full volume: this frees space);
            # the records then go on the next delete or sweep.
            self.storage.delete_session(session_id)
        for hook in self.session_deleted_hooks:  # what other parts keep about the session (idempotency records)
            hook(session_id)
        log.info("session deleted", extra={"session_id": session_id, "jobs_canceled": len(active)})
        return {"deleted": True, "session_id": session_id}

    def _sweep_loop(self) -> None:
        # Once at start-up (a server that was down for days must not keep expired faces until the first
        # interval ends), then every TWIN_RETENTION_SWEEP_MINUTES.
        while True:
            try:
                # Cluster mode: every API node and worker runs this loop; one of them sweeps per interval.
                once = getattr(self.manager, "acquire_singleton", None)
                interval = self.settings.retention_sweep_minutes * 60
                removed = self.sweep() if once is None or once("retention-sweep", interval * 0.9) else []
                if removed:
                    log.info("retention sweep", extra={"sessions_deleted": len(removed)})
            except Exception:  # noqa: BLE001
                log.error("retention sweep failed", extra={"traceback": traceback.format_exc()})
            if self._stop.wait(self.settings.retention_sweep_minutes * 60):
                return

    def sweep(self, now: float | None = None) -> list[str]:
        """Delete every session created before now - TWIN_RETENTION_HOURS: its jobs are canceled, its
        records (jobs and their outputs) and its whole folder removed. Folders without a record
        (an upload cut off between the rename and the insert) go by their meta.json time."""
        cutoff = (self.clock() if now is None else now) - self.settings.retention_hours * 3600
        old = self.store.sessions_older_than(cutoff)
        for sid in old:
            self._delete_session(sid)
        for sid in list(self.storage.session_ids_on_disk()):
            if sid in old or self.store.get_session(sid) is not None:
                continue
            try:
                if self.storage.session_created_at(sid) < cutoff:
                    self.storage.delete_session(sid)
                    old.append(sid)
            except (OSError, errors.TwinError):
                continue
        return old

    # --- jobs ---
    def submit(self, payload: Any, owner: str | None, *, webhook: dict | None = None) -> dict:
        """Queue a job. ``webhook``: the checked webhook record (utils/jobs/webhooks.py) or None."""
        self.require_ready()
        if not isinstance(payload, dict):
            raise errors.InvalidRequest("the body must be a JSON object")
        payload = dict(payload)
        session_id = payload.pop("session_id", None)
        if session_id is not None:
            if not isinstance(session_id, str):
                raise errors.InvalidRequest(f"session_id={session_id!r} is not a string")
            session = self.owned_session(session_id, owner)
        else:
            session = self.store.latest_session(owner) if owner else None
            if session is None:
                raise errors.InvalidRequest("no session: upload selfies first (POST /upload) or pass session_id",
                                            code="no_session")
        gen = self.generators[0]
        req = request_type(gen).from_dict(payload, self.settings)
        self._check_likeness(req)
        self._check_model(gen, req)
        self.storage.require_space(_output_bytes(req), f"a job of {getattr(req, 'num_images', 1)} images")
        # Parse the identity now, so a broken session fails the request rather than the job.
        identity = identity_type(gen).load(self.storage.identity_path(session["id"]))
        req = req.with_identity(identity)
        job_id = new_id()
        init_path = None
        if getattr(req, "init_image", None) is not None:
            # Resolved and checked once, now: the job runs on these pixels even if the source goes away.
            init_path = self.storage.output_dir(session["id"], job_id) / STORED_INIT_NAME
            init_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_save_png(init_path, self._init_image(req.init_image, session["id"], owner))
        try:
            job = self.store.create_job(job_id, session_id=session["id"], owner=owner or "", payload=payload,
                                        request=req.to_dict(), queue_max=self.settings.queue_max,
                                        webhook=webhook)
        except BaseException:
            if init_path is not None:
                init_path.unlink(missing_ok=True)
            raise
        self.manager.submit(job_id)
        log.info("job queued", extra={"job_id": job_id, "session_id": session["id"]})
        return job

    def _check_model(self, gen, req) -> None:
        """``model`` names a base model: unknown -> 400, not the active one -> 409 now (at run time the
        generator checks again: a switch in between fails the job with the same code)."""
        want = getattr(req, "model", None)
        if want is None:
            return
        if self.settings.cluster:
            self.manager.check_model(want)   # the live workers' catalogues and models, in Redis
            return
        if not hasattr(gen, "models_catalogue"):
            return
        cat = gen.models_catalogue()
        names = [m["name"] for m in cat["models"]]
        if want not in names:
            raise errors.InvalidRequest(f"model={want!r} is not a local base model; available: {', '.join(names)}",
                                        code="unknown_model")
        if want != cat["active"]:
            raise errors.InvalidRequest(f"model={want!r} is not loaded; the active base model is {cat['active']!r}",
                                        code="model_not_loaded", http_status=409)

    def _check_likeness(self, req) -> None:
        """Restoration and best-of-N need the face service (and restoration its model file): refuse the
        request now (400, naming the file and the download command) rather than fail the job later."""
        best_of = (getattr(req, "candidates", None) or 0) > getattr(req, "num_images", 1)
        if best_of and not hasattr(self.faces, "identity_similarity"):
            raise errors.InvalidRequest(f"candidates={req.candidates} needs the face service to score candidates")
        if getattr(req, "restore_faces", False):
            if not hasattr(self.faces, "detect_faces"):
                raise errors.InvalidRequest("restore_faces=true needs a face backend with face detection")
            if self.restorer is None:
                raise errors.ServiceNotReady("the models are still loading; try again shortly", retry_after=5)
            self.restorer.check(req.restore_model)
    def _init_image(self, value: str, session_id: str, owner: str | None):
        """The pixels an img2img ``init_image`` names (utils/init_image.py): an accepted selfie of the
        session, one of the caller's outputs (another caller's: 404), or inline data (the selfie decoder)."""
        from PIL import Image
        from utils.images import decode_image
        from utils.init_image import parse_init_image
        s = self.settings
        ref = parse_init_image(value, int(s.max_file_mb * 1024 * 1024))
        if ref.kind == "upload":
            return decode_image(ref.data, "init_image", max_pixels=s.max_pixels)
        if ref.kind == "output":
            path = self.output_path(ref.job_id, ref.filename, owner)   # NotFound for another caller's
            with Image.open(path) as im:
                return im.convert("RGB")
        session_dir = self.storage.session_dir(session_id)
        accepted = (session_dir / "crops" / f"{ref.index:03d}.png").is_file()
        originals = sorted((session_dir / "originals").glob(f"{ref.index:03d}.*")) if accepted else []
        if not originals:
            raise errors.NotFound(f"init_image='selfie:{ref.index}' is not an accepted selfie of session "
                                  f"{session_id!r} (use the index from the upload report)")
        return decode_image(originals[0].read_bytes(), originals[0].name, max_pixels=s.max_pixels)

    def owned_job(self, job_id: str, owner: str | None) -> dict:
        job = self.store.get(job_id) if is_valid_id(job_id) else None
        if job is None or owner is None or job["owner"] != owner:
            raise errors.NotFound(f"job {job_id!r} not found")
        return job

    def cancel(self, job_id: str, owner: str | None) -> dict:
        job = self.owned_job(job_id, owner)
        if JobStatus(job["status"]).terminal:
            raise errors.Conflict(f"job {job_id!r} is already {job['status']}")
        self.manager.cancel(job_id)
        if job["status"] == "running":
            deadline = time.time() + 10
            while time.time() < deadline and self.store.get(job_id)["status"] == "running":  # type: ignore[index]
                time.sleep(0.01)
        return self.store.get(job_id)  # type: ignore[return-value]

    def output_path(self, job_id: str, filename: str, owner: str | None):
        job = self.owned_job(job_id, owner)
        for o in job["outputs"]:
            if thumbnail_name(o["filename"]) == filename and o.get("thumbnail_path"):
                path = self.storage.resolve_relative(o["thumbnail_path"])
                if path.is_file():
                    return path
            for name_key, path_key in (("filename", "path"), ("raw_filename", "raw_path")):
                if o.get(name_key) == filename and o.get(path_key):
                    path = self.storage.resolve_relative(o[path_key])
                    if path.is_file():
                        return path
        raise errors.NotFound(f"file {filename!r} not found for job {job_id!r}")

    def _run_job(self, job: dict, on_progress, should_cancel, index: int) -> dict | None:
        gen = self.generators[index]
        session_id = job["session_id"]
        if self.store.get_session(session_id) is None:
            raise errors.NotFound(f"session {session_id!r} was deleted")
        req = request_type(gen).from_dict(job["payload"], self.settings)
        req = req.with_identity(identity_type(gen).load(self.storage.identity_path(session_id)))
        if getattr(req, "init_image", None) is not None:
            from PIL import Image
            init_path = self.storage.output_dir(session_id, job["id"]) / STORED_INIT_NAME
            if not init_path.is_file():
                raise errors.NotFound(f"the init_image of job {job['id']!r} is gone")
            with Image.open(init_path) as im:
                req = req.with_init_image(im.convert("RGB"))
        # Before the GPU time is spent: a volume that cannot take the outputs fails the job now.
        self.storage.require_space(_output_bytes(req), f"the outputs of job {job['id']!r}")
        keep = int(getattr(req, "num_images", 1) or 1)
        total = int(getattr(req, "candidates", None) or keep)
        restore = bool(getattr(req, "restore_faces", False))
        t_gen = time.perf_counter()
        images, seeds, result_meta = self._generate_candidates(gen, req, total, on_progress, should_cancel)
        t_write = time.perf_counter()
        if should_cancel():
            raise errors.JobCanceled("canceled by the user")
        template = None
        if (self.settings.score_outputs or total > keep or restore) and hasattr(self.faces, "identity_similarity"):
            try:
                template = self.storage.load_template(session_id)
            except Exception:  # noqa: BLE001 - a score is optional
                template = None
        if total > keep and template is None:
            raise errors.TwinError("best-of-N needs the session's face template, which is missing; upload again",
                                   code="no_template", http_status=409)
        candidates: list[dict] | None = None
        scores: list[float | None] = [None] * len(images)
        if total > keep:
            order, candidates, scores = rank_candidates(self.faces, images, seeds, template, keep, should_cancel)
        else:
            order = list(range(len(images)))
        out_dir = self.storage.output_dir(session_id, job["id"])
        self_sim = self.storage.session_self_similarity(session_id)
        t_restore = 0.0
        for rank, ci in enumerate(order, start=1):
            if self.store.get_session(session_id) is None:
                raise errors.NotFound(f"session {session_id!r} was deleted")
            if should_cancel():
                raise errors.JobCanceled("canceled by the user")
            image, seed = images[ci], seeds[ci]
            name = output_name(rank)
            output: dict[str, Any] = {"filename": name, "seed": int(seed), "width": image.width,
                                      "height": image.height}
            if candidates is not None:
                output["candidate"] = ci + 1
            written: list = []
            try:
                if restore:
                    t0 = time.perf_counter()
                    image = self._restore_output(req, image, output, out_dir, rank, template, written)
                    t_restore += time.perf_counter() - t0
                elif template is not None:
                    output["identity_similarity"] = scores[ci] if candidates is not None else self._score(image, template)
                    if output["identity_similarity"] is None:
                        output["note"] = "no face was found in this image, so it has no likeness score"
                if "identity_similarity" in output and self_sim is not None:
                    output["self_similarity"] = self_sim   # the reference the score is read against
                path = out_dir / name
                atomic_save_png(path, image)  # a full volume: InsufficientStorage, no temp file left
                written.append(path)
                output["path"] = self.storage.relative(path)
                thumb = out_dir / thumbnail_name(name)
                atomic_save_thumbnail(thumb, image, self.settings.thumbnail_side)
                written.append(thumb)
                output["thumbnail_path"] = self.storage.relative(thumb)
                self.store.add_output(job["id"], output)
            except BaseException:
                for p in written:
                    p.unlink(missing_ok=True)  # not recorded -> not served; do not keep it on a full volume
                raise
        metadata = _json_safe(result_meta) or {}
        if candidates is not None:
            metadata["candidates"] = candidates
        metadata["service_timings"] = {"generate_s": round(t_write - t_gen, 4),
                                       "write_outputs_s": round(time.perf_counter() - t_write, 4)}
        if restore:
            metadata["service_timings"]["restore_s"] = round(t_restore, 4)
        return metadata

    def _generate_candidates(self, gen, req, total: int, on_progress, should_cancel):
        return generate_candidates(gen, req, total, on_progress, should_cancel)

    def _score(self, image, template) -> float | None:
        return score_image(self.faces, image, template)

    def _restore_output(self, req, image, output: dict, out_dir, rank: int, template, written: list):
        return restore_output(self.faces, self.restorer, req, image, output, out_dir, rank, template, written,
                              self.storage.relative)

    # --- status ---
    def health(self) -> dict:
        body: dict[str, Any] = {"status": "ok", "state": self.state, "version": VERSION,
                                "uptime_seconds": round(time.time() - self.started_at, 1),
                                # Which credential the other endpoints want (never the keys themselves):
                                # the /test page shows its API-key field from this.
                                "auth": "api_key" if self.settings.api_key_list else "client_token"}
        if self.setup_error:
            body["error"] = self.setup_error
        if self.draining:
            body["draining"] = True
        if self.state == "ready":
            # A generator process that crashed is "restarting" (or "setup_failed" if that failed): say so.
            for g in self.generators:
                g_state = getattr(g, "state", "ready")
                if g_state in ("restarting", "setup_failed"):
                    body["state"] = g_state
                    err = getattr(g, "error", None)
                    if err is not None:
                        body["error"] = getattr(err, "message", str(err))
                    break
            for g in self.generators:
                # A restarted generator process that could not reload its base model serves the default one.
                model_error = getattr(g, "model_error", None)
                if isinstance(model_error, str):
                    body["model_error"] = model_error
                    break
        if self.settings.cluster:
            # The API answers 503 queue_unavailable while Redis is away: say so here (health stays 200).
            try:
                self.store.ping()
                body["queue"] = {"backend": "redis", "reachable": True}
            except errors.TwinError as e:
                body["queue"] = {"backend": "redis", "reachable": False}
                body["state"], body["error"] = "queue_unavailable", e.message
        if self.state == "ready":
            info = _safe_info(self.generators[0])
            body["profile"] = info.get("profile")
            body["is_demo"] = info.get("is_demo")
        return body

    def system_status(self) -> dict:
        info = _safe_info(self.generators[0]) if self.state == "ready" else {}
        counts = self.store.counts()
        options = self._published_options(info)
        cluster = self.manager.cluster_status() if self.settings.cluster else None
        return {
            "state": self.state,
            "version": VERSION,
            "mode": "cluster" if cluster else "local",
            # GET /models and POST /models/load work (cluster mode: the workers' registry in Redis; local
            # mode: a generator with a registry): clients such as the /test page ask for the catalogue only
            # then, instead of meeting a 501.
            "model_registry": bool(self.settings.cluster or (self.generators
                                                              and hasattr(self.generators[0], "models_catalogue"))),
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "model": {"profile": info.get("profile"), "variant": info.get("variant"),
                      "model_name": info.get("model_name"), "is_demo": info.get("is_demo"),
                      "dtype": info.get("dtype")},
            "face_backend": getattr(self.faces, "backend_name", None),
            "device": _device_info(info.get("device")),
            # Local mode: generation threads here; cluster mode: live GPU workers (listed under "cluster").
            "workers": len(cluster["workers"]) if cluster else len(self.generators),
            "queue": {"depth": counts["queued"], "max": self.settings.queue_max,
                      "running": counts["running"]},
            "jobs": counts,
            "limits": {"max_selfies": self.settings.max_selfies, "max_file_mb": self.settings.max_file_mb,
                       "max_upload_mb": self.settings.max_upload_mb,
                       "max_images": options["max_images"] if options else None,
                       "min_side": self.settings.min_image_side, "max_side": self.settings.max_image_side,
                       "max_prompt_chars": self.settings.max_prompt_chars},
            "options": options,
            **({"cluster": cluster} if cluster else {}),
        }

    def _published_options(self, info: dict) -> dict | None:
        """The loaded model's request choices; None until it is ready (or for a test double)."""
        native = info.get("native_resolution")
        if not native or getattr(self.generators[0], "request_type", None) is not None:
            return None
        from generate_twin import published_options
        return published_options(int(native), self.settings)


    # --- base-model registry (GET /models, /loras, POST /models/load) ---------------------------------
    def models_catalogue(self) -> dict:
        self.require_ready()
        if self.settings.cluster:
            # Each live GPU worker's model, catalogue and load state, from Redis (utils/jobs/cluster/registry.py).
            return self.manager.models_catalogue()
        gen = self.generators[0] if self.generators else None
        if gen is None or not hasattr(gen, "models_catalogue"):
            raise errors.InvalidRequest("this generator has no model registry", code="not_supported", http_status=501)
        return gen.models_catalogue()

    def load_model(self, name: Any, workers: Any = None) -> dict:
        """Every generator loads ``name`` beside its model and switches between jobs (see
        DigitalTwinGenerator.load_model). The first failure stops: the generators not reached keep theirs.
        Cluster mode: the live GPU workers (or those named in ``workers``) do it, each answering for itself."""
        self.require_ready()
        if not isinstance(name, str) or not name.strip():
            raise errors.InvalidRequest(f"model={name!r} must be a base model name (GET /models)")
        if workers is not None and (not isinstance(workers, list) or not workers or len(workers) > 1000
                                    or not all(isinstance(w, str) and 0 < len(w) <= 200 for w in workers)):
            raise errors.InvalidRequest(f"workers={workers!r} must be a non-empty list of GPU worker names "
                                        "(GET /models lists them)")
        if self.settings.cluster:
            return self.manager.load_model(name, workers)
        if workers is not None:
            raise errors.InvalidRequest("workers is for cluster mode (TWIN_QUEUE_URL); this server has no "
                                        "GPU workers to name")
        if not self.generators:
            raise errors.InvalidRequest("this server has no generator to switch", code="not_supported",
                                        http_status=501)
        t0 = time.perf_counter()
        results = [g.load_model(name) for g in self.generators]
        out = dict(results[0])
        out["swap_s"] = round(time.perf_counter() - t0, 3)
        out["workers"] = len(results)
        if out.get("switched"):
            out["queued"] = self._queued_after_switch(name)
        return out

    def _queued_after_switch(self, active: str) -> dict[str, list[str]]:
        """Which queued jobs the switch touches (the issue: queued jobs run on the model they were
        submitted for, "or the answer says which"): jobs without ``model`` run on the new one; jobs pinned
        to another model will fail with model_not_loaded unless it is loaded back before they start."""
        on_new, will_fail = [], []
        for job_id in self.store.queued_ids():
            job = self.store.get(job_id)
            want = ((job or {}).get("request") or {}).get("model")
            if want is None:
                on_new.append(job_id)
            elif want != active:
                will_fail.append(job_id)
        return {"run_on_new_model": on_new, "pinned_elsewhere": will_fail}


def _output_bytes(req) -> int:
    """Upper bound of a job's PNGs: raw RGB bytes (a PNG of a photo is about half of that); a restored
    output keeps its raw original too."""
    w = getattr(req, "width", None) or 1024
    h = getattr(req, "height", None) or 1024
    copies = 2 if getattr(req, "restore_faces", False) else 1
    return copies * int(getattr(req, "num_images", 1) or 1) * int(w) * int(h) * 3


def generate_candidates(gen, req, total: int, on_progress, should_cancel):
    """``total`` images in calls of at most per_call_images(gen); progress spans all of them."""
    import dataclasses
    from utils.faces.likeness import batches
    plan = batches(total, per_call_images(gen))
    if len(plan) == 1 and total == req.num_images:
        calls = [(req, on_progress)]
    else:
        base = req.seed
        if base is None:
            import secrets
            base = secrets.randbelow(2**32 - 1 - total)
        calls = []
        for b, (offset, count) in enumerate(plan):
            sub = dataclasses.replace(req, num_images=count, seed=(base + offset) % 2**32)
            calls.append((sub, _batch_progress(on_progress, b, len(plan))))
    images: list = []
    seeds: list[int] = []
    meta = None
    for sub, progress in calls:
        if should_cancel():
            raise errors.JobCanceled("canceled by the user")
        try:
            result = gen.generate(sub, on_progress=progress, should_cancel=should_cancel)
        except BaseException as e:
            if not isinstance(e, errors.TwinError) and is_oom(e):
                # Raised outside the generator's own handler (e.g. encoding the identity): free the
                # cached blocks so the next job starts clean.
                _empty_cuda_cache()
                raise errors.OutOfMemory("the GPU ran out of memory; try fewer images or a smaller size") from None
            raise
        images += list(result.images)
        seeds += [int(x) for x in result.seeds]
        meta = meta if meta is not None else getattr(result, "metadata", None)
    if meta is not None and len(calls) > 1:
        meta = dict(meta, seeds=seeds, num_images=len(images), generate_calls=len(calls))
    return images, seeds, meta

def score_image(faces, image, template) -> float | None:
    try:
        score = faces.identity_similarity(image, template)
    except Exception:  # noqa: BLE001 - a score is optional
        return None
    return None if score is None else round(float(score), 4)

def restore_output(faces, restorer, req, image, output: dict, out_dir, rank: int, template, written: list,
                   relative=str):
    """Restore every face of one output (the service's job runner and the CLI both call this); keep the generated image as avatar_NNN_raw.png. Returns the
    image to save as the output (the original when no face was found)."""
    try:
        dets = faces.detect_faces(image)
    except Exception:  # noqa: BLE001
        dets = []
    if not dets:
        output.update(restored=False, identity_similarity=None,
                      note="no face was found in this image: kept as generated, not restored")
        return image
    result = restorer.restore(image, dets, model=req.restore_model, fidelity=req.restore_fidelity)
    raw_name = raw_output_name(rank)
    raw_path = out_dir / raw_name
    atomic_save_png(raw_path, image)
    written.append(raw_path)
    output.update(restored=True, restore_model=req.restore_model, faces_restored=result.faces,
                  raw_filename=raw_name, raw_path=relative(raw_path))
    if template is not None:
        output["identity_similarity"] = score_image(faces, result.image, template)
        output["identity_similarity_raw"] = score_image(faces, image, template)
    return result.image

def rank_candidates(faces, images, seeds, template, keep: int, should_cancel=lambda: False):
    """Best-of-N: score every candidate against the session template, keep the ``keep`` best. Returns
    (order of kept candidate indices, the candidate table, every score). Shared by the job runner and the CLI."""
    from utils.faces.likeness import candidate_table, keep_best
    scores: list[float | None] = []
    for image in images:
        if should_cancel():
            raise errors.JobCanceled("canceled by the user")
        scores.append(score_image(faces, image, template))
    order = keep_best(scores, keep)
    return order, candidate_table(seeds, scores, order), scores


def _batch_progress(on_progress, batch: int, batches: int):
    """Progress of one generate() call of several, reported as steps of the whole job (so the ETA
    covers every candidate)."""
    def report(step: int, total: int) -> None:
        on_progress(batch * total + step, batches * total)
    return report


def _empty_cuda_cache() -> None:
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


def _safe_info(gen) -> dict:
    try:
        return dict(gen.info())
    except Exception:  # noqa: BLE001
        return {}


def _device_info(device: str | None) -> dict:
    out: dict[str, Any] = {"device": device or "unknown", "type": "cpu", "name": "CPU"}
    if device and str(device).startswith("cuda"):
        try:
            import torch
            idx = torch.device(device).index or 0
            free, total = torch.cuda.mem_get_info(idx)
            out.update(type="cuda", name=torch.cuda.get_device_name(idx),
                       vram_used_mb=round((total - free) / 1048576), vram_total_mb=round(total / 1048576))
        except Exception:  # noqa: BLE001
            out.update(type="cuda")
    return out


def _json_safe(obj: Any) -> Any:
    import json
    if obj is None:
        return None
    try:
        return json.loads(json.dumps(obj, default=str))
    except Exception:  # noqa: BLE001
        return None
