"""Jobs: submit (every check up front), status, cancel, downloads, previews — and ``run``, what a job thread
or a GPU worker calls to run one job record through the JobRunner."""
from __future__ import annotations

import io
import logging
import time
from typing import Any, Callable

from utils import errors
from utils.config import Settings
from utils.contracts import ModelRouting, PresignedDownloads, Storage
from utils.jobs.status import JobStatus
from utils.service.identity import Identities
from utils.service.models import check_model
from utils.service.runner import JobRunner, Likeness
from utils.service.output_safety import prompt_fields, session_gate
from utils.service.twins import resolve_twin
from utils.storage import StoredFile, is_valid_id, new_id, png_bytes, thumbnail_name

log = logging.getLogger("twin.service")


class StorageSink:
    """A job's outputs: files in the session's storage (the signed bytes the runner made, which /download
    serves as they are), each recorded in the job store once written."""

    def __init__(self, settings: Settings, storage: Storage, store, session_id: str, job_id: str) -> None:
        self.settings, self.storage, self.store = settings, storage, store
        self.session_id, self.job_id = session_id, job_id
        self.thumbnail_side = settings.thumbnail_side

    def save(self, name: str, data: bytes) -> str:
        return self.storage.save_output(self.session_id, self.job_id, name, data)

    def add(self, output: dict) -> None:
        self.store.add_output(self.job_id, output)

    def remove(self, written: list[str]) -> None:
        self.storage.remove(written)

    def check(self) -> None:
        if self.store.get_session(self.session_id) is None:
            raise errors.NotFound(f"session {self.session_id!r} was deleted")


class Jobs:
    def __init__(self, settings: Settings, storage: Storage, store, queue, engines: list, faces,
                 identities: Identities, runner: JobRunner, restorer: Callable[[], Any], sessions, safety) -> None:
        self.settings, self.storage, self.store, self.queue = settings, storage, store, queue
        self.engines, self.faces, self.identities, self.runner = engines, faces, identities, runner
        self._restorer = restorer
        self.sessions = sessions
        self.safety = safety

    def owned(self, job_id: str, owner: str | None) -> dict:
        job = self.store.get(job_id) if is_valid_id(job_id) else None
        if job is None or owner is None or job["owner"] != owner:
            raise errors.NotFound(f"job {job_id!r} not found")
        return job

    # --- submit ----------------------------------------------------------------------------------
    def submit(self, payload: Any, owner: str | None, *, webhook: dict | None = None) -> dict:
        """Queue a job. ``webhook``: the checked webhook record (utils/jobs/webhooks.py) or None.
        identity='none': the job gets a persona session of its own (``Sessions.create_persona``)."""
        if not isinstance(payload, dict):
            raise errors.InvalidRequest("the body must be a JSON object")
        payload = dict(payload)
        session_id = payload.pop("session_id", None)
        engine = self.engines[0]
        req = engine.request_type.from_dict(payload, self.settings)
        persona = req.identity_source == "none"
        if persona:
            _check_persona_request(session_id, owner)
            session = None
        else:
            session = self._session_for(session_id, owner)
            self._check_prompt(req)     # a face identity is used: no explicit text, before anything is queued
        self._check_likeness(req)
        self._check_model(req)
        self._check_fields(req, engine)
        if session is not None:   # lora / both need the session's twin LoRA, of the family that will run it
            ready = engine.state == "ready" and not self.settings.cluster
            resolve_twin(self.storage, session["id"], req.identity_mode, engine.info() if ready else None)
        self.storage.require_space(output_bytes(req), f"a job of {req.num_images} images")
        if session is not None:
            # The session's face features, read now: a broken session fails the request rather than the job,
            # and what the request names of the session (pose="selfie:N") is checked against them.
            req.check_session(self.storage.session_faces(session["id"]))
        else:
            session = self.sessions.create_persona(owner)
        try:
            job = self._create(req, payload, session["id"], owner, webhook)
        except BaseException:
            if persona:
                self.sessions.delete_now(session["id"])   # a persona session lives for its one job only
            raise
        self.queue.submit(job["id"])
        log.info("job queued", extra={"job_id": job["id"], "session_id": session["id"]})
        return job

    def _create(self, req, payload: dict, session_id: str, owner: str | None, webhook: dict | None) -> dict:
        """The job record (queued), with its img2img start picture stored beside the outputs first."""
        job_id = new_id()
        init_ref = self._store_init_image(req, session_id, job_id, owner)
        try:
            return self.store.create_job(job_id, session_id=session_id, owner=owner or "", payload=payload,
                                         request=req.to_dict(), queue_max=self.settings.queue_max,
                                         webhook=webhook)
        except BaseException:
            if init_ref is not None:
                self.storage.remove([init_ref])
            raise

    def _session_for(self, session_id: Any, owner: str | None) -> dict:
        if session_id is not None:
            if not isinstance(session_id, str):
                raise errors.InvalidRequest(f"session_id={session_id!r} is not a string")
            session = self.sessions.owned(session_id, owner)
            if session.get("kind") == "persona":
                raise errors.InvalidRequest(f"session_id={session_id!r} is the session of an identity='none' job: "
                                            "it has no selfies; send identity='none' without session_id, or "
                                            "upload selfies", code="no_selfies")
            return session
        session = self.store.latest_session(owner) if owner else None
        if session is None:
            raise errors.InvalidRequest("no session: upload selfies first (POST /upload) or pass session_id, "
                                        "or send identity='none' for an avatar without selfies",
                                        code="no_session")
        return session

    def _check_prompt(self, req) -> None:
        """400 prompt_refused when the prompt, the persona, the attributes or the style's text names an
        explicit term (utils/safety/terms.py). negative_prompt is never checked: it keeps such content out.
        The log names the field and the term, never the prompt."""
        try:
            self.safety.check_prompt(prompt_fields(req, self.settings))
        except errors.PromptRefused as e:
            log.info("prompt refused", extra={"field": e.details.get("field"), "term": e.details.get("term")})
            raise

    def _check_model(self, req) -> None:
        """``model`` names a base model: unknown -> 400, not the active one -> 409 now (at run time the
        engine checks again: a switch in between fails the job with the same code)."""
        if req.model is not None:
            check_model(self.queue, self.engines, req.model, self.settings.cluster)

    def _check_fields(self, req, engine) -> None:
        """The request against the model that will run it, now (400) rather than as a failed job: in local
        mode the engine checks it (fields that apply to its family and identity method, the LoRA's name and
        family, the pose); in cluster mode the API node holds no model, so a job pinned to a model is checked
        against the family and identity method of a GPU worker that holds it (the registry), and an unpinned
        one, whose family is not known until a worker takes it, is checked by that worker when it runs."""
        if self.settings.cluster:
            target = self.queue.pinned_target(req.model) if req.model is not None and \
                isinstance(self.queue, ModelRouting) else None
            if target is not None:
                req.check_family(target["family"], frozenset(target["method_fields"]), target["variant"])
            return
        if engine.state == "ready":     # not ready: the job waits, and the engine checks it when it runs
            engine.validate(req)

    def _check_likeness(self, req) -> None:
        """Restoration needs its model file: refuse the request now (400, naming the file and the download
        command) rather than fail the job later."""
        if req.restore_faces:
            restorer = self._restorer()
            if restorer is None:
                raise errors.ServiceNotReady("the models are still loading; try again shortly", retry_after=5)
            restorer.check(req.restore_model)

    def _store_init_image(self, req, session_id: str, job_id: str, owner: str | None):
        """img2img: the start picture is resolved and checked once, now, and stored beside the outputs: the
        job runs on these pixels even if the source goes away."""
        if req.init_image is None:
            return None
        return self.storage.put_init_image(session_id, job_id,
                                           png_bytes(self._init_image(req.init_image, session_id, owner)))

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
            data = self.output_file(ref.job_id, ref.filename, owner).read()   # NotFound for another's
            with Image.open(io.BytesIO(data)) as im:
                return im.convert("RGB")
        original = self.storage.accepted_original(session_id, ref.index)
        if original is None:
            raise errors.NotFound(f"init_image='selfie:{ref.index}' is not an accepted selfie of session "
                                  f"{session_id!r} (use the index from the upload report)")
        name, data = original
        return decode_image(data, name, max_pixels=s.max_pixels)

    # --- status, cancel, files -------------------------------------------------------------------
    def cancel(self, job_id: str, owner: str | None) -> dict:
        job = self.owned(job_id, owner)
        if JobStatus(job["status"]).terminal:
            raise errors.Conflict(f"job {job_id!r} is already {job['status']}")
        self.queue.cancel(job_id)
        if job["status"] == "running":
            deadline = time.time() + 10
            while time.time() < deadline and self.store.get(job_id)["status"] == "running":
                time.sleep(0.01)
        return self.store.get(job_id)

    def output_ref(self, job_id: str, filename: str, owner: str | None) -> str:
        """The recorded reference of one of the caller's job files (its PNG, raw original or thumbnail)."""
        job = self.owned(job_id, owner)
        for o in job["outputs"]:
            if not o.get("filename"):
                continue   # an image the safety check blocked: never stored
            candidates = [("thumbnail_path", thumbnail_name(o["filename"])), ("path", o.get("filename")),
                          ("raw_path", o.get("raw_filename"))]
            for path_key, name in candidates:
                if name == filename and o.get(path_key):
                    return o[path_key]
        raise errors.NotFound(f"file {filename!r} not found for job {job_id!r}")

    def output_file(self, job_id: str, filename: str, owner: str | None) -> StoredFile:
        """One of the caller's job files, opened for a download (streamed from a bucket)."""
        ref = self.output_ref(job_id, filename, owner)     # another caller's job: NotFound naming the job only
        try:
            return self.storage.open_output(ref)
        except errors.NotFound:
            raise errors.NotFound(f"file {filename!r} not found for job {job_id!r}") from None

    def download_url(self, job_id: str, filename: str, owner: str | None, *, inline: bool) -> str | None:
        """With TWIN_DOWNLOAD_REDIRECT=1 and a bucket: a presigned URL of the caller's file (owner checked
        first) valid TWIN_PRESIGN_SECONDS, answering with the Content-Disposition a streamed download has.
        Else None (the API streams the file)."""
        if not (self.settings.download_redirect and isinstance(self.storage, PresignedDownloads)):
            return None
        ref = self.output_ref(job_id, filename, owner)
        disposition = f"{'inline' if inline else 'attachment'}; filename={filename}"
        try:
            return self.storage.download_url(ref, disposition=disposition, content_type=output_mimetype(filename),
                                             expires=self.settings.presign_seconds)
        except errors.NotFound:
            raise errors.NotFound(f"file {filename!r} not found for job {job_id!r}") from None

    # --- run -------------------------------------------------------------------------------------
    def run(self, job: dict, on_progress, should_cancel, index: int = 0) -> dict:
        """Run one claimed job record on engine ``index``: the request, the session's identity for the active
        model and the stored start picture, then the JobRunner. Returns the result metadata."""
        engine = self.engines[index]
        session_id = job["session_id"]
        # Cached copies of sessions deleted on another node go before each job (and at every sweep interval).
        self.sessions.forget_cached()
        session = self.store.get_session(session_id)
        if session is None:
            raise errors.NotFound(f"session {session_id!r} was deleted")
        req = engine.request_type.from_dict(job["payload"], self.settings)
        req = req.with_twin(*resolve_twin(self.storage, session_id, req.identity_mode, engine.info()))
        # identity='none': the engine runs with no identity (scale 0); so does the twin LoRA alone.
        if req.identity_source != "none" and req.identity_mode != "lora":
            req = req.with_identity(self.identities.for_engine(engine, session_id))
        if req.init_image is not None:
            req = req.with_init_image(self._stored_init_image(session_id, job["id"]))
        # Before the GPU time is spent: a volume that cannot take the outputs fails the job now.
        self.storage.require_space(output_bytes(req), f"the outputs of job {job['id']!r}")
        sink = StorageSink(self.settings, self.storage, self.store, session_id, job["id"])
        return self.runner.produce(engine, req, self._likeness(req, session_id), sink, on_progress, should_cancel,
                                   session_gate(session))

    def _stored_init_image(self, session_id: str, job_id: str):
        from PIL import Image
        data = self.storage.init_image(session_id, job_id)
        if data is None:
            raise errors.NotFound(f"the init_image of job {job_id!r} is gone")
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")

    def _likeness(self, req, session_id: str) -> Likeness:
        if req.identity_source == "none":
            return Likeness(has_identity=False)     # no selfies: nothing to rank or score against
        best_of = (req.candidates or 0) > req.num_images
        if not (self.settings.score_outputs or best_of or req.restore_faces):
            return Likeness()
        try:
            template = self.storage.load_template(session_id)
        except Exception:  # noqa: BLE001 - a score is optional
            template = None
        return Likeness(template, self.storage.session_self_similarity(session_id))


def _check_persona_request(session_id: Any, owner: str | None) -> None:
    """identity='none' makes an avatar without selfies, in a session of its own: it takes no session_id."""
    if session_id is not None:
        raise errors.InvalidRequest(f"session_id={session_id!r} with identity='none': an avatar without selfies "
                                    "takes no session; leave out session_id, or leave out identity to use that "
                                    "session's selfies")
    if not owner:
        raise errors.InvalidRequest("identity='none' needs a caller to own the job: send the client token "
                                    "(or API key)", code="no_caller")


def output_mimetype(filename: str) -> str:
    return "image/jpeg" if filename.endswith(".jpg") else "image/png"


def output_bytes(req) -> int:
    """Upper bound of a job's PNGs: raw RGB bytes (a PNG of a photo is about half of that); a restored
    output keeps its raw original too."""
    copies = 2 if req.restore_faces else 1
    return copies * req.num_images * (req.width or 1024) * (req.height or 1024) * 3
