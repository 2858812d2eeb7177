"""Sessions: upload (validate selfies, store them and their face features), delete, retention sweep."""
from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import Callable

from utils import errors
from utils.config import Settings
from utils.contracts import CachedReads, Storage
from utils.logging import log_context
from utils.service.identity import build_identity
from utils.service.output_safety import selfie_age_gate
from utils.storage import is_valid_id, new_id

log = logging.getLogger("twin.service")


class Sessions:
    def __init__(self, settings: Settings, storage: Storage, store, queue, faces,
                 engine: Callable[[], object | None], clock: Callable[[], float]) -> None:
        self.settings = settings
        self.storage = storage
        self.store = store
        self.queue = queue
        self.faces = faces
        self._engine = engine          # the engine that builds the identity at upload; None on an API node
        self._clock = clock
        self.deleted_hooks: list[Callable[[str], None]] = []   # what other parts keep about a session

    def owned(self, session_id: str, owner: str | None) -> dict:
        rec = self.store.get_session(session_id) if is_valid_id(session_id) else None
        if rec is None or owner is None or rec["owner"] != owner:
            raise errors.NotFound(f"session {session_id!r} not found")
        return rec

    def describe(self, session_id: str, owner: str | None, twin: Callable[[str], dict]) -> dict:
        """GET /sessions/<id>: the caller's session, its accepted selfies, its identity files and ``twin(id)``
        (the twin LoRA's state)."""
        rec = self.owned(session_id, owner)
        out = {"session_id": session_id, "kind": rec.get("kind", "selfies"), "created_at": rec["created_at"],
               "selfies": {"accepted": [], "count": 0}, "identity": {"files": 0}}
        if rec.get("kind") != "persona":
            try:
                faces = self.storage.session_faces(session_id)
                out["selfies"] = {"accepted": list(faces.indices), "count": len(faces.indices),
                                  "face_model": faces.face_model}
                out["identity"] = {"files": len(self.storage.identity_paths(session_id))}
            except errors.NotFound:
                pass
            out["self_similarity"] = self.storage.session_self_similarity(session_id)
        return {**out, **twin(session_id)}

    # --- upload ----------------------------------------------------------------------------------
    def upload(self, files: list[tuple[str, bytes]], owner: str) -> dict:
        self._check_files(files)
        report = self.faces.validate_selfies(files)
        body = report.to_json()
        self_sim = self._self_similarity(report)
        if self_sim is not None:
            # The likeness a portrait can hope for: how much the person's own selfies agree.
            body["self_similarity"] = round(self_sim, 4)
        if not report.accepted:
            raise errors.TwinError("none of the uploaded files has a usable face; see details for each file",
                                   code="no_usable_selfies", http_status=422, details={"report": body})
        gate = selfie_age_gate(self.faces, report, self.settings.min_apparent_age)
        if gate.held:   # said to the caller, without the number; the job runner holds it to block mode
            body.setdefault("warnings", []).append({"code": "explicit_content_blocked", "message": gate.reason})
        engine = self._engine()
        identity = build_identity(engine, report) if engine is not None else None
        session_id = new_id()
        created = self._clock()
        with log_context(session_id=session_id):
            self.storage.write_session(session_id, owner_hash=owner, files=files, report=report,
                                       identity=identity, created_at=created,
                                       self_similarity=body.get("self_similarity"))
            try:
                self.store.add_session(session_id, owner, created, age_gate={
                    "age_gate": gate.state, "age_gate_reason": gate.reason, "median_apparent_age": gate.median_age})
            except BaseException:
                self.storage.delete_session(session_id)  # no folder without its record
                raise
            log.info("session created", extra={"files": len(files), "accepted": len(report.accepted),
                                               "age_gate": gate.state})
        return {"success": True, "session_id": session_id, "total": len(files),
                "accepted_count": len(report.accepted), "rejected_count": len(report.rejected),
                "warnings": body.get("warnings", []), "self_similarity": body.get("self_similarity"),
                "safety": gate.to_json(), "report": body}

    def create_persona(self, owner: str) -> dict:
        """The session of one identity='none' job: no selfies, only the job's outputs. It gives that job an
        owner, a retention time and a delete path (DELETE /sessions/<id>) like any upload; a /generate
        without session_id never picks it (``latest_session`` skips persona sessions)."""
        session_id, created = new_id(), self._clock()
        self.storage.write_persona_session(session_id, owner_hash=owner, created_at=created)
        try:
            self.store.add_session(session_id, owner, created, kind="persona")
        except BaseException:
            self.storage.delete_session(session_id)  # no folder without its record
            raise
        return {"id": session_id, "owner": owner, "created_at": created, "kind": "persona"}

    def _check_files(self, files: list[tuple[str, bytes]]) -> None:
        s = self.settings
        if not files:
            raise errors.InvalidRequest("no files: send one or more images as multipart field 'files'")
        if len(files) > s.max_selfies:
            raise errors.PayloadTooLarge(f"{len(files)} files is more than TWIN_MAX_SELFIES={s.max_selfies}")
        for name, data in files:
            check_file_size(name, len(data), s)

    def _self_similarity(self, report) -> float | None:
        try:
            return self.faces.self_similarity([a.embedding for a in report.accepted])
        except Exception:  # noqa: BLE001 - a reference number, never a reason to fail an upload
            return None

    # --- delete ----------------------------------------------------------------------------------
    def delete(self, session_id: str, owner: str | None) -> dict:
        self.owned(session_id, owner)
        return self.delete_now(session_id)

    def delete_now(self, session_id: str) -> dict:
        """Cancel the session's jobs, then delete every file and then the records. The files go first: they
        hold the faces, and when the storage fails (a bucket away: 503) the records stay, so the caller can
        send the same DELETE again; a full volume that cannot update the records still loses the faces (the
        records then go on the next delete or sweep). A second pass catches a file that a job still running
        wrote meanwhile."""
        active = self.store.active_ids_for_session(session_id)
        for job_id in active:
            self.queue.cancel(job_id)
        deadline = time.time() + 30
        while time.time() < deadline and self.store.active_ids_for_session(session_id):
            time.sleep(0.02)  # a running job stops within one denoising step
        self.storage.delete_session(session_id)
        self.store.delete_session_records(session_id)
        try:
            self.storage.delete_session(session_id)
        except errors.TwinError as e:   # the records are gone: the sweep deletes what is left
            log.warning("second pass of a session delete failed", extra={"session_id": session_id,
                                                                          "error": e.message})
        for hook in self.deleted_hooks:
            hook(session_id)
        log.info("session deleted", extra={"session_id": session_id, "jobs_canceled": len(active)})
        return {"deleted": True, "session_id": session_id}

    # --- retention -------------------------------------------------------------------------------
    def sweep(self, now: float | None = None) -> list[str]:
        """Delete every session created before now - TWIN_RETENTION_HOURS: its jobs are canceled, its
        records (jobs and their outputs) and its whole folder removed. Folders without a record
        (an upload cut off between the rename and the insert) go by their meta.json time."""
        cutoff = (self._clock() if now is None else now) - self.settings.retention_hours * 3600
        old = self.store.sessions_older_than(cutoff)
        for sid in old:
            self.delete_now(sid)
        for sid in list(self.storage.session_ids()):
            if sid in old or self.store.get_session(sid) is not None:
                continue
            try:
                if self.storage.session_created_at(sid) < cutoff:
                    self.storage.delete_session(sid)
                    old.append(sid)
            except (OSError, errors.TwinError):
                continue
        return old

    def forget_cached(self) -> list[str]:
        """Drop this node's cached copies of sessions that no longer exist (deleted on another node, or by
        the sweep elsewhere): biometric data must not outlive its session on any disk."""
        if not isinstance(self.storage, CachedReads):
            return []
        gone = [sid for sid in self.storage.cached_sessions() if self.store.get_session(sid) is None]
        for sid in gone:
            self.storage.forget_cached(sid)
        return gone

    def sweep_loop(self, stop: threading.Event, once: Callable[[str, float], bool] | None) -> None:
        """Once at start-up (a server that was down for days must not keep expired faces until the first
        interval ends), then every TWIN_RETENTION_SWEEP_MINUTES. ``once``: in cluster mode every API node
        and GPU worker runs this loop, and one of them sweeps per interval; each drops its own cached copies
        of deleted sessions (a bucket's local cache)."""
        interval = self.settings.retention_sweep_minutes * 60
        while True:
            try:
                removed = []
                if self.settings.retention_hours > 0 and (once is None or once("retention-sweep", interval * 0.9)):
                    removed = self.sweep()
                if removed:
                    log.info("retention sweep", extra={"sessions_deleted": len(removed)})
                self.forget_cached()
            except Exception:  # noqa: BLE001
                log.error("retention sweep failed", extra={"traceback": traceback.format_exc()})
            if stop.wait(interval):
                return


def check_file_size(name: str, size: int, settings: Settings) -> None:
    """The per-file limit, the one place it is checked (the upload route reads at most one byte past it)."""
    if size > settings.max_file_mb * 1024 * 1024:
        raise errors.PayloadTooLarge(f"file {name!r} is larger than the limit per file of "
                                     f"{settings.max_file_mb:g} MB (TWIN_MAX_FILE_MB)")
