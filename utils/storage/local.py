"""The data folder: sessions, identities and job files as files under TWIN_DATA_DIR, each write atomic
(temp file + fsync + rename; a session through a staging folder renamed into place). The local
implementation of the ``Storage`` contract (utils/contracts.py); the layout is in utils/storage/names.py.

A path recorded in the database must resolve to itself: no symlink, no ``..``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from utils.errors import InsufficientStorage, NotFound, StorageUnavailable
from utils.storage.faces import (SessionFaces, meta_self_similarity, persona_meta, read_session_faces, read_template,
                                 session_files)
from utils.storage.files import (TMP_SUFFIX, StoredFile, atomic_write_bytes, full_error, is_disk_full,
                                 suppress_os)
from utils.storage.names import (FACES_FILE, IDENTITY_FILE, INIT_IMAGE_FILE, META_FILE, check_session_id,
                                 crop_name, identity_name, is_valid_id, new_id)

_STAGING_PREFIX = ".staging-"


class LocalStorage:
    backend = "local"

    def __init__(self, data_dir: Path, *, min_free_mb: float = 0.0) -> None:
        self.root = Path(data_dir).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.min_free_mb = min_free_mb

    def describe(self) -> dict:
        return {"backend": self.backend}

    def ping(self) -> bool:
        if not (self.root.is_dir() and os.access(self.root, os.W_OK)):
            raise StorageUnavailable(f"the data folder {self.root} (TWIN_DATA_DIR) is missing or not writable")
        return True

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def require_space(self, need_bytes: int, what: str) -> None:
        """Refuse (507) work that would leave less than TWIN_MIN_FREE_MB free: failing before the write
        beats failing half-way, and the job database keeps room to record what happened."""
        if self.min_free_mb <= 0:
            return
        free = self.free_bytes()
        if free - need_bytes < self.min_free_mb * 1048576:
            raise InsufficientStorage(
                f"the data volume has {free / 1048576:.1f} MB free; {what} needs about "
                f"{need_bytes / 1048576:.1f} MB and TWIN_MIN_FREE_MB={self.min_free_mb:g} MB must stay free")

    @property
    def db_path(self) -> Path:
        return self.root / "jobs.db"

    def _inside(self, path: Path) -> Path:
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            # Only reachable through a bug: every caller validates ids first.
            raise NotFound("not found")
        return resolved

    def session_dir(self, session_id: str) -> Path:
        return self._inside(self.root / check_session_id(session_id))

    def twin_dir(self, session_id: str, run_id: str | None = None) -> Path:
        """The session's twin files (LoRA, its kohya copy, the training record), or one run's working folder
        (checkpoints while it trains); inside the session folder, so a delete takes them all."""
        d = self.session_dir(session_id) / "twin"
        if run_id is not None:
            if not is_valid_id(run_id):
                raise NotFound(f"job {run_id!r} not found")
            d = d / "runs" / run_id
        return self._inside(d)

    def output_dir(self, session_id: str, job_id: str) -> Path:
        if not is_valid_id(job_id):
            raise NotFound(f"job {job_id!r} not found")
        return self._inside(self.session_dir(session_id) / "outputs" / job_id)

    def relative(self, path: Path) -> str:
        return str(self._inside(path).relative_to(self.root))

    def resolve_relative(self, rel: str) -> Path:
        """Path of a file recorded in the DB (relative to data_dir).

        Strict: the path must resolve to itself. A symlink anywhere on the way (planted in twin_data,
        pointing outside it or at another session's file) makes it NotFound, as does any ``..``.
        """
        lexical = Path(os.path.normpath(self.root / rel))
        resolved = self._inside(lexical)
        if resolved != lexical:
            raise NotFound("not found")
        return resolved

    # --- sessions ------------------------------------------------------------------------------
    def staging_dir(self, session_id: str) -> Path:
        """A session is written here first and renamed into place when complete."""
        d = self.root / (_STAGING_PREFIX + check_session_id(session_id))
        d.mkdir(parents=True, exist_ok=False)
        return d

    def commit_staging(self, session_id: str) -> Path:
        final = self.session_dir(session_id)
        os.replace(self.root / (_STAGING_PREFIX + session_id), final)
        return final

    def discard_staging(self, session_id: str) -> None:
        shutil.rmtree(self.root / (_STAGING_PREFIX + session_id), ignore_errors=True)

    def write_session(self, session_id: str, *, owner_hash: str, files: list[tuple[str, bytes]], report,
                      identity=None, created_at: float | None = None, self_similarity: float | None = None) -> Path:
        """Store an accepted upload: originals, crops, face features, identity (when one was built), report, meta.

        Everything goes into a staging folder first; a crash half-way leaves no session behind.
        """
        # Originals + crops + small files: twice the upload is a safe upper bound.
        self.require_space(2 * sum(len(data) for _, data in files), f"an upload of {len(files)} files")
        try:
            d = self.staging_dir(session_id)
        except OSError as e:
            if is_disk_full(e):
                raise full_error("the upload") from e
            raise
        try:
            for sub in ("originals", "crops", "outputs"):
                (d / sub).mkdir()
            for name, data in session_files(session_id, owner_hash=owner_hash, files=files, report=report,
                                            created_at=created_at, self_similarity=self_similarity):
                (d / name).write_bytes(data)
            if identity is not None:
                identity.save(d / IDENTITY_FILE)
            return self.commit_staging(session_id)
        except BaseException as e:
            self.discard_staging(session_id)
            if is_disk_full(e) and not isinstance(e, InsufficientStorage):
                raise full_error(f"the upload of {len(files)} files") from e
            raise

    def write_persona_session(self, session_id: str, *, owner_hash: str, created_at: float) -> Path:
        """The folder of a persona session: meta.json and an empty outputs/, renamed into place complete."""
        self.require_space(64 * 1024, "a persona session")
        try:
            d = self.staging_dir(session_id)
            (d / "outputs").mkdir()
            (d / META_FILE).write_bytes(persona_meta(session_id, owner_hash=owner_hash, created_at=created_at))
            return self.commit_staging(session_id)
        except BaseException as e:
            self.discard_staging(session_id)
            if is_disk_full(e) and not isinstance(e, InsufficientStorage):
                raise full_error("a persona session") from e
            raise

    def session_faces(self, session_id: str) -> SessionFaces:
        """What the face service stored about a session's accepted selfies: enough to build its identity for
        any identity method again (crops, embeddings, raw ArcFace lengths, key points). NotFound when the
        session or its face features are gone."""
        d = self.session_dir(session_id)
        path = d / FACES_FILE
        if not path.is_file():
            raise NotFound(f"session {session_id!r} has no stored face features; upload the selfies again")
        return read_session_faces(path, lambda indices: [d / crop_name(i) for i in indices])

    # --- identities: one per identity method and base model, built at upload or on first use --------
    def identity_path(self, session_id: str, key: str | None = None) -> Path:
        """The session's identity file: the one built at upload, or (``key``) one built later for another
        identity method or base model."""
        return self.session_dir(session_id) / identity_name(key)

    def identity_paths(self, session_id: str) -> list[Path]:
        """Every identity file of the session, the upload's first."""
        d = self.session_dir(session_id)
        return [p for p in [d / IDENTITY_FILE] + sorted(d.glob("identity-*.safetensors")) if p.is_file()]

    def save_identity(self, session_id: str, identity) -> None:
        """Keep an identity built on first use (``identity.save`` writes atomically)."""
        identity.save(self.identity_path(session_id, key=identity.cache_key))

    # --- job files -------------------------------------------------------------------------------
    def save_output(self, session_id: str, job_id: str, name: str, data: bytes) -> str:
        """Write one of a job's files (encoded image bytes) atomically and return the reference to record.
        A full volume: InsufficientStorage, no temp file left."""
        path = self.output_dir(session_id, job_id) / name
        atomic_write_bytes(path, data)
        return self.relative(path)

    def remove(self, recorded: Iterable[str]) -> None:
        """Delete files written for an output that was never recorded (nothing unrecorded is ever served)."""
        for rel in recorded:
            with suppress_os():
                self.resolve_relative(rel).unlink(missing_ok=True)

    def open_output(self, ref: str) -> StoredFile:
        """A recorded job file for a download; NotFound when it is gone."""
        path = self.resolve_relative(ref)
        if not path.is_file():
            raise NotFound("not found")
        return StoredFile(path=path)

    def init_image_path(self, session_id: str, job_id: str) -> Path:
        """An img2img job's start picture, beside its outputs (not an output name, so never served)."""
        return self.output_dir(session_id, job_id) / INIT_IMAGE_FILE

    def put_init_image(self, session_id: str, job_id: str, data: bytes) -> str:
        path = self.init_image_path(session_id, job_id)
        atomic_write_bytes(path, data)
        return self.relative(path)

    def init_image(self, session_id: str, job_id: str) -> bytes | None:
        try:
            return self.init_image_path(session_id, job_id).read_bytes()
        except FileNotFoundError:
            return None

    def accepted_original(self, session_id: str, index: int) -> tuple[str, bytes] | None:
        """(name, bytes) of the uploaded file of accepted selfie ``index``, or None when there is no such
        accepted selfie."""
        d = self.session_dir(session_id)
        if not (d / crop_name(index)).is_file():
            return None
        found = sorted((d / "originals").glob(f"{index:03d}.*"))
        return (found[0].name, found[0].read_bytes()) if found else None

    def load_template(self, session_id: str):
        """The face-embedding template of a session, or None."""
        p = self.session_dir(session_id) / FACES_FILE
        return read_template(p) if p.exists() else None

    def session_self_similarity(self, session_id: str) -> float | None:
        """Median pairwise likeness of the session's accepted selfies (meta.json), or None."""
        try:
            return meta_self_similarity((self.session_dir(session_id) / META_FILE).read_bytes())
        except OSError:
            return None

    def delete_session(self, session_id: str) -> bool:
        d = self.session_dir(session_id)
        existed = d.exists()
        shutil.rmtree(d, ignore_errors=True)
        return existed

    def clean_partial_files(self) -> int:
        """At start-up: drop staging folders and temp files a hard kill may have left."""
        removed = 0
        for p in self.root.glob(_STAGING_PREFIX + "*"):
            shutil.rmtree(p, ignore_errors=True)
            removed += 1
        for p in self.root.glob("*/outputs/*/*" + TMP_SUFFIX):
            with suppress_os():
                p.unlink()
                removed += 1
        return removed

    def session_ids(self) -> Iterable[str]:
        return (p.name for p in self.root.iterdir() if p.is_dir() and is_valid_id(p.name))

    def session_created_at(self, session_id: str) -> float:
        """created_at from the session's meta.json, else the folder's mtime (for a folder whose database
        record was never written, e.g. the process died between the rename and the insert)."""
        d = self.session_dir(session_id)
        try:
            return float(json.loads((d / META_FILE).read_text())["created_at"])
        except (OSError, ValueError, KeyError, TypeError):
            return d.stat().st_mtime

    # --- the preflight (flask --app app check-storage) -----------------------------------------------
    def probe(self) -> list[tuple[str, str | None]]:
        """Write, read and delete a probe file: (step, None when it worked, else what failed)."""
        path = self.root / f".probe-{new_id()}"
        data = os.urandom(64)
        steps: list[tuple[str, str | None]] = []
        for step, act in (("write", lambda: atomic_write_bytes(path, data)),
                          ("read", lambda: _same(path.read_bytes(), data)),
                          ("delete", lambda: path.unlink())):
            try:
                act()
                steps.append((step, None))
            except Exception as e:  # noqa: BLE001 - reported, line by line
                steps.append((step, f"{type(e).__name__}: {e}"))
                break
        with suppress_os():
            path.unlink()
        return steps


def _same(got: bytes, want: bytes) -> None:
    if got != want:
        raise ValueError(f"read {len(got)} bytes that differ from the {len(want)} written")
