"""The Runtime: one service instance's components and lifecycle (background set-up, graceful drain,
shutdown), with its use cases as parts: ``sessions``, ``jobs``, ``models`` (health and system status in
``utils/service/status.py``). Built by ``utils/service/wiring.py`` from the settings; the web app, the GPU
worker and the tests all hold one.

An API node of a cluster (TWIN_QUEUE_URL set, not a GPU worker) holds no model: ``holds_models`` is False,
its engine object only parses requests, and identities are built by the GPU worker that runs the job.
"""
from __future__ import annotations

import base64
import logging
import threading
import time
import traceback

from utils import errors
from utils.config import Settings
from utils.contracts import CachedReads, ClusterSingleton
from utils.jobs import lifecycle
from utils.jobs.status import JobStatus
from utils.service import face_setup, output_safety
from utils.service.identity import Identities
from utils.service.jobs import Jobs
from utils.service.models import Models
from utils.service.runner import JobRunner
from utils.service.sessions import Sessions
from utils.service.training import Training, is_training

log = logging.getLogger("twin.service")


class Runtime:
    def __init__(self, settings: Settings, parts, *, holds_models: bool = True) -> None:
        """``parts``: a wiring.Parts (engines, faces, storage, store, the queue's factory, events, webhooks,
        restorer); ``holds_models``: False on a cluster's API node."""
        self.settings = settings
        self.holds_models = holds_models
        self.engines, self.faces, self.storage = parts.engines, parts.faces, parts.storage
        self.store, self.events, self.webhooks = parts.store, parts.events, parts.webhooks
        self._build_restorer = parts.restorer
        self.safety = parts.safety.load_terms()   # a broken term list stops start-up, naming the line
        self.restorer = None   # built once set-up knows which profile runs
        self.clock = time.time  # tests swap in a fake clock (retention)
        self.state, self.setup_error, self.started_at = "starting", None, time.time()
        self.ready = threading.Event()
        self._drain_deadline: float | None = None
        self._stop = threading.Event()
        self._setup_thread: threading.Thread | None = None
        self.sweeper: threading.Thread | None = None   # the retention sweep (none with TWIN_RETENTION_HOURS=0)
        self.stream_slots = threading.BoundedSemaphore(settings.max_event_streams)
        self.shutdown_hooks: list = []  # called first in shutdown()
        # The job queue runs jobs through self.jobs.run (local mode's job threads, once set-up is done).
        self.queue = parts.queue(lambda *a: self.run_job(*a), self.ready, self.publish_preview)
        identities = Identities(self.storage)
        self.runner = JobRunner(self.faces, lambda: self.restorer, self.safety)
        self.sessions = Sessions(settings, self.storage, self.store, self.queue, self.faces,
                                 lambda: self.engines[0] if holds_models else None, lambda: self.clock())
        self.jobs = Jobs(settings, self.storage, self.store, self.queue, self.engines, self.faces, identities,
                         self.runner, lambda: self.restorer, self.sessions, self.safety)
        self.training = Training(settings, self.storage, self.store, self.queue, self.engines, self.faces,
                                 self.sessions, stopping=lambda: self.draining or self.stopping)
        self.models = Models(settings, self.store, self.queue, self.engines)
        # Live events (GET /events) and webhooks follow every committed change of a job, in whichever
        # process makes it (in cluster mode the GPU worker sends running/progress/output/completed).
        self.store.listeners.append(self._job_event)
        self.store.listeners.append(self.webhooks.on_job_event)
        lifecycle.register(self)

    def run_job(self, job: dict, on_progress, should_cancel, index: int = 0) -> dict:
        """Run one claimed job record of either kind (what a job thread or a GPU worker calls)."""
        part = self.training if is_training(job) else self.jobs
        return part.run(job, on_progress, should_cancel, index)

    # --- events ------------------------------------------------------------------------------------
    def _job_event(self, job_id: str, kind: str, data: dict) -> None:
        if kind == "deleted":
            self.events.forget(job_id)
            return
        self.events.publish(job_id, kind, data)
        if kind == "status" and JobStatus(data["status"]).terminal:
            self.events.drop_preview(job_id)  # the finished portraits replace the preview
            self.events.publish(job_id, "done", data)

    def publish_preview(self, job_id: str, step: int, jpeg: bytes) -> None:
        self.events.set_preview(job_id, step, jpeg)
        self.events.publish(job_id, "preview", {
            "step": step, "image": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")})

    def preview(self, job_id: str, owner: str | None) -> tuple[int, bytes]:
        self.jobs.owned(job_id, owner)
        got = self.events.get_preview(job_id)
        if got is None:
            raise errors.NotFound(f"job {job_id!r} has no preview now (ask for preview: true; previews exist "
                                  "while the job runs)")
        return got

    # --- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        # Cluster mode: TWIN_DATA_DIR may be shared, and a worker elsewhere may be writing its temp files now.
        removed = 0 if self.settings.cluster else self.storage.clean_partial_files()
        if removed:
            log.warning("removed partial files left by an earlier stop", extra={"count": removed})
        self.queue.start(self.settings.requeue_interrupted)
        for job_id in self.store.queued_ids():  # jobs from before a restart get a live event log too
            if not self.events.known(job_id):
                job = self.store.get(job_id)
                if job is not None:
                    self._job_event(job_id, "status", job)
        self._setup_thread = _spawn(self._setup, "twin-setup")
        if self.settings.retention_hours > 0 or isinstance(self.storage, CachedReads):
            once = self.queue.acquire_singleton if isinstance(self.queue, ClusterSingleton) else None
            self.sweeper = _spawn(lambda: self.sessions.sweep_loop(self._stop, once), "twin-retention")

    def _setup(self) -> None:
        try:
            t0 = time.perf_counter()
            face_setup.prepare_face_models(face_setup.face_settings(self.settings))
            self.faces.setup()
            face_setup.check_face_backend(self.settings, self.faces)
            if self.holds_models:
                for g in self.engines:
                    g.setup()
            self.restorer = self._build_restorer(self.model_info().get("profile"))
            # After the models: the classifier goes on the engine's device; a missing classifier or a bad
            # certificate stops set-up with the reason (the development-certificate line is logged here).
            self.safety.setup(**output_safety.setup_args(self.settings, self.model_info(), self.faces, self.holds_models))
            self.state = "ready"
            self.ready.set()
            log.info("set-up finished", extra={"seconds": round(time.perf_counter() - t0, 2),
                                                "generator": self.model_info()})
        except BaseException as e:  # noqa: BLE001 - reported on /health
            self.state = "setup_failed"
            self.setup_error = e.message if isinstance(e, errors.TwinError) else f"{type(e).__name__}: {e}"
            log.error("set-up failed", extra={"error": self.setup_error, "traceback": traceback.format_exc()})

    def model_info(self) -> dict:
        """The first engine's info (on an API node: what its settings say; the GPU workers hold the model)."""
        try:
            return dict(self.engines[0].info()) if self.engines else {}
        except Exception:  # noqa: BLE001 - a generator process that is restarting
            return {}

    def wait_ready(self, timeout: float | None = None) -> bool:
        if self._setup_thread is not None:
            self._setup_thread.join(timeout)
        return self.state == "ready"

    def require_ready(self) -> None:
        if self.draining:
            raise errors.ServiceNotReady("the server is shutting down; retry in a few seconds",
                                         code="shutting_down", retry_after=10)
        if self.state == "ready":
            return
        if self.state == "setup_failed":
            raise errors.ServiceNotReady(f"the service failed to start: {self.setup_error}", retry_after=60)
        raise errors.ServiceNotReady("the models are still loading; try again shortly", retry_after=5)

    def shutdown(self) -> None:
        self._stop.set()
        self.events.wake_all()  # open event streams see the stop and end
        self.webhooks.close()
        for hook in self.shutdown_hooks:
            hook()
        self.queue.stop()
        self.store.close()
        for g in self.engines:
            g.close()   # a generator process: stop the child (no orphan)
        lifecycle.unregister(self)

    # --- graceful stop (SIGTERM; see utils/jobs/lifecycle.py) ----------------------------------------
    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    def begin_drain(self) -> None:
        """Refuse new work from now on (503 shutting_down + Retry-After); the queue starts no new job.
        Cheap and lock-free: it runs inside the SIGTERM handler."""
        if self._drain_deadline is None:
            self._drain_deadline = time.time() + self.settings.drain_seconds
        self.queue.begin_drain()

    def drain(self) -> dict:
        """Finish the running job within TWIN_DRAIN_SECONDS of the stop signal, else re-queue it; queued
        jobs stay queued; then stop the threads and close the stores."""
        self.begin_drain()
        outcome = self.queue.drain(self._drain_deadline or time.time())
        counts = self.store.counts()
        log.info("drained", extra={"finished": len(outcome["finished"]), "requeued": len(outcome["requeued"]),
                                   "queued_for_restart": counts["queued"]})
        self.shutdown()
        return {**outcome, "queued": counts["queued"]}


def _spawn(target, name: str) -> threading.Thread:
    t = threading.Thread(target=target, name=name, daemon=True)
    t.start()
    return t
