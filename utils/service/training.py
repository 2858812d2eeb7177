"""Twin studio: training a session's personal LoRA as a job of its own kind (``"kind": "train"`` in the job
record's request) on the same store, queues, status vocabulary, events, cancel, webhooks and retention as
generation jobs. ``submit`` checks everything up front; ``run`` is what a job thread or a GPU worker calls
for a claimed training job; ``twin`` and ``lora_file`` are what GET /sessions/<id>(/lora) show.

A run trains in its own folder (``Storage.twin_dir(session, job)``: checkpoints) and, once it succeeded,
moves the LoRA, its kohya copy and the record into the session's twin folder; a canceled or failed run
leaves nothing. A run killed with its worker keeps its checkpoints: the retry resumes from them."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from utils import errors
from utils.config import Settings
from utils.contracts import Storage, Trainer
from utils.engine.training import TrainRequest, TrainSpec, default_steps, session_token
from utils.engine.training.data import centre_box
from utils.engine.training.files import KOHYA_FILE, LORA_FILE, RECORD_FILE, read_record
from utils.engine.training.spec import TRAIN_FIELD_NAMES
from utils.jobs.status import JobStatus
from utils.storage import new_id

log = logging.getLogger("twin.service")

KIND = "train"
RESULT_FILES = (LORA_FILE, KOHYA_FILE, RECORD_FILE)


def is_training(job: dict) -> bool:
    return (job.get("request") or {}).get("kind") == KIND


class Training:
    def __init__(self, settings: Settings, storage: Storage, store, queue, engines: list, faces, sessions,
                 stopping: Callable[[], bool] = lambda: False) -> None:
        """``stopping``: the process is draining (SIGTERM): a training stopped then is re-queued, not canceled
        by its user, so it keeps its checkpoints for the next attempt."""
        self.settings, self.storage, self.store, self.queue = settings, storage, store, queue
        self.engines, self.faces, self.sessions = engines, faces, sessions
        self._stopping = stopping

    # --- submit ----------------------------------------------------------------------------------
    def submit(self, session_id: str, payload: Any, owner: str | None, *, webhook: dict | None = None) -> dict:
        """Queue a training of the caller's session: 404 another caller's, 409 while one runs."""
        session = self.sessions.owned(session_id, owner)
        if session.get("kind") == "persona":
            raise errors.InvalidRequest(f"session {session_id!r} is the session of an identity='none' job: it has "
                                        "no selfies to train on", code="no_selfies")
        if payload is None:
            payload = {}
        if not isinstance(payload, dict):
            raise errors.InvalidRequest("the body must be a JSON object")
        req = TrainRequest.from_dict(payload, self.settings)
        engine = self.engines[0]
        if not self.settings.cluster:
            family = engine.info().get("family", "sdxl") if engine.state == "ready" else "sdxl"
            if not isinstance(engine, Trainer) or family != "sdxl":
                raise errors.Conflict(f"this server's engine cannot train a twin LoRA (model family {family}; "
                                      "training needs an SDXL model)", code="training_not_supported")
        self.storage.twin_dir(session_id)      # a backend that cannot hold the files: 501 now
        running = self.running_job(session_id)
        if running is not None:
            raise errors.Conflict(f"session {session_id!r} is already training (job {running!r}); wait for it or "
                                  f"cancel it (POST /cancel/{running})", code="training_running")
        faces = self.storage.session_faces(session_id)
        steps = req.steps or default_steps(len(faces.indices), self.settings.model_profile)
        request = {"kind": KIND, **req.to_dict(), "steps": steps, "token": session_token(session_id)}
        job = self.store.create_job(new_id(), session_id=session_id, owner=owner or "", payload=dict(payload),
                                    request=request, queue_max=self.settings.queue_max, webhook=webhook)
        self.queue.submit(job["id"])
        log.info("training queued", extra={"job_id": job["id"], "session_id": session_id, "steps": steps})
        return job

    def running_job(self, session_id: str) -> str | None:
        for job_id in self.store.active_ids_for_session(session_id):
            job = self.store.get(job_id)
            if job is not None and is_training(job):
                return job_id
        return None

    # --- run -------------------------------------------------------------------------------------
    def run(self, job: dict, on_progress, should_cancel, index: int = 0) -> dict:
        """Train on engine ``index``; returns the job's metadata (the training record without its curve)."""
        engine, session_id, r = self.engines[index], job["session_id"], job["request"]
        if self.store.get_session(session_id) is None:
            raise errors.NotFound(f"session {session_id!r} was deleted")
        if not isinstance(engine, Trainer):
            raise errors.Conflict("this engine cannot train a twin LoRA", code="training_not_supported")
        req = TrainRequest.from_dict({k: r[k] for k in TRAIN_FIELD_NAMES if r.get(k) is not None}, self.settings)
        run_dir = Path(self.storage.twin_dir(session_id, job["id"]))
        spec = TrainSpec(request=req, token=r["token"], work_dir=run_dir, run_id=job["id"], steps=int(r["steps"]),
                         resolution=req.resolution, faces=self._faces(session_id),
                         checkpoint_every=self.settings.train_checkpoint_every)

        def progress(step: int, total: int, preview=None, extra: dict | None = None) -> None:
            on_progress(step, total, None, {**(extra or {}), "steps": total})
        try:
            record = engine.train(spec, progress, should_cancel)
            if self.store.get_session(session_id) is None:
                raise errors.NotFound(f"session {session_id!r} was deleted")
            self._publish(session_id, run_dir)
        except BaseException as e:
            requeued = not isinstance(e, Exception) or (isinstance(e, errors.JobCanceled) and self._stopping())
            if not requeued:
                shutil.rmtree(run_dir, ignore_errors=True)   # a canceled or failed run leaves no LoRA
            raise
        log.info("twin trained", extra={"steps": record["steps"], "seconds": record["seconds"]})
        # This job is still running until its outcome is recorded: the twin it leaves is ready.
        twin = {**self.twin(session_id)["twin_model"], "state": "ready", "job_id": None}
        return {"kind": KIND, "twin_model": twin, **{k: v for k, v in record.items() if k != "loss_curve"}}

    def _faces(self, session_id: str) -> list[tuple[Any, tuple]]:
        """Each accepted selfie decoded as an upload is (upright), with its largest face box (the middle of
        the picture when the face service finds none)."""
        from utils.images import decode_image
        out = []
        for index in self.storage.session_faces(session_id).indices:
            found = self.storage.accepted_original(session_id, index)
            if found is None:
                continue
            name, data = found
            image = decode_image(data, name, max_pixels=self.settings.max_pixels)
            boxes = [tuple(d.box) for d in self.faces.detect_faces(image)]
            box = max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1])) if boxes else centre_box(*image.size)
            out.append((image, box))
        return out

    def _publish(self, session_id: str, run_dir: Path) -> None:
        """The run's result replaces the session's twin files (the record last: it says the LoRA is there)."""
        twin_dir = Path(self.storage.twin_dir(session_id))
        for name in RESULT_FILES:
            os.replace(run_dir / name, twin_dir / name)
        shutil.rmtree(run_dir, ignore_errors=True)

    # --- what the session shows ------------------------------------------------------------------
    def twin(self, session_id: str) -> dict:
        """``twin_model``: state none | queued | training | ready (a retrain in progress keeps the last one)."""
        try:
            twin_dir = Path(self.storage.twin_dir(session_id))
        except errors.TwinError:
            return {"twin_model": {"state": "unsupported"}}
        record = read_record(twin_dir) if (twin_dir / LORA_FILE).is_file() else None
        running = self.running_job(session_id)
        state = "ready" if record is not None else "none"
        if running is not None:
            job = self.store.get(running)
            state = "training" if job and job["status"] == JobStatus.RUNNING.value else "queued"
        out: dict[str, Any] = {"state": state, "job_id": running, "token": session_token(session_id)}
        if record is not None:
            out.update({k: record.get(k) for k in ("steps", "rank", "trained_at", "base_model", "family",
                                                    "identity_model", "loss_final", "lora_bytes")},
                       ready=True)
        return {"twin_model": out}

    def lora_file(self, session_id: str, owner: str | None) -> Path:
        self.sessions.owned(session_id, owner)
        path = Path(self.storage.twin_dir(session_id)) / LORA_FILE
        if not path.is_file():
            raise errors.NotFound(f"session {session_id!r} has no trained twin LoRA (POST /sessions/"
                                  f"{session_id}/train)", code="no_twin_lora")
        return path

