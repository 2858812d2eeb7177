"""Sessions, identities and job files in an S3-compatible bucket (TWIN_STORAGE_URL=s3://bucket/prefix): the
S3 implementation of the ``Storage`` contract (utils/contracts.py), with the same layout as the data folder
(utils/storage/names.py) under the prefix, so a recorded reference names the same file in either.

- Writes are whole objects (utils/storage/bucket.py); a session's ``meta.json`` is written last, and an
  upload that fails half-way deletes what it wrote. A job's output is recorded only after its PUT returned.
- Reads that a GPU worker needs (face features, crops, identities, start pictures, meta) go through a
  bounded local cache (utils/storage/cache.py) in ``<TWIN_DATA_DIR>/storage-cache``: no node needs
  another node's disk.
- Deleting a session deletes every object, version and delete marker under ``<prefix>/<session>/``
  and returns once a listing finds nothing; the local cached copies go too.
"""
from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from utils.errors import NotFound, TwinError
from utils.storage.bucket import Bucket
from utils.storage.cache import ObjectCache
from utils.storage.faces import (SessionFaces, meta_self_similarity, persona_meta, read_session_faces, read_template,
                                 session_files)
from utils.storage.files import StoredFile, suppress_os
from utils.storage.names import (FACES_FILE, IDENTITY_FILE, INIT_IMAGE_FILE, META_FILE, check_session_id,
                                 crop_name, identity_name, is_identity_name, is_valid_id, job_file_ref, new_id,
                                 parse_job_file_ref)

log = logging.getLogger("twin.storage")
_TYPES = {"png": "image/png", "jpg": "image/jpeg", "json": "application/json"}
PARALLEL = 8    # objects of one session written or fetched at once


def content_type(name: str) -> str:
    return _TYPES.get(name.rsplit(".", 1)[-1], "application/octet-stream")


class S3Storage:
    backend = "s3"

    def __init__(self, bucket: Bucket, cache: ObjectCache) -> None:
        self.bucket, self.cache = bucket, cache

    def describe(self) -> dict:
        return {"backend": self.backend, "bucket": self.bucket.name, "prefix": self.bucket.prefix,
                "endpoint": self.bucket.endpoint_url or "aws", "cache": self.cache.usage()}

    def ping(self) -> bool:
        return self.bucket.ping()

    def require_space(self, need_bytes: int, what: str) -> None:
        """A bucket does not fill up like a volume: nothing to reserve."""
        return None

    # --- sessions ------------------------------------------------------------------------------
    def write_session(self, session_id: str, *, owner_hash: str, files: list[tuple[str, bytes]], report,
                      identity=None, created_at: float | None = None, self_similarity: float | None = None) -> str:
        """Store an accepted upload. Every object but meta.json goes up (several at once), then meta.json:
        a session without it is incomplete. On failure, what was written is deleted again."""
        check_session_id(session_id)
        objects = session_files(session_id, owner_hash=owner_hash, files=files, report=report,
                                created_at=created_at, self_similarity=self_similarity)
        if identity is not None:
            objects.insert(-1, (IDENTITY_FILE, self._identity_bytes(identity)))
        try:
            self._put_all([(f"{session_id}/{name}", data) for name, data in objects[:-1]])
            name, data = objects[-1]
            self.bucket.put(f"{session_id}/{name}", data, content_type(name))
        except BaseException:
            try:
                self.bucket.delete_prefix(f"{session_id}/")
            except TwinError:
                log.warning("could not delete a half-written upload; the retention sweep will",
                            extra={"session_id": session_id})
            raise
        return session_id

    def write_persona_session(self, session_id: str, *, owner_hash: str, created_at: float) -> str:
        """A persona session: its meta.json only (the job's outputs follow under its prefix)."""
        check_session_id(session_id)
        self.bucket.put(f"{session_id}/{META_FILE}",
                        persona_meta(session_id, owner_hash=owner_hash, created_at=created_at), "application/json")
        return session_id

    def _identity_bytes(self, identity) -> bytes:
        tmp = self.cache.temp_path(".safetensors")
        try:
            identity.save(tmp)
            return tmp.read_bytes()
        finally:
            with suppress_os():
                tmp.unlink()

    def _put_all(self, objects: list[tuple[str, bytes]]) -> None:
        with ThreadPoolExecutor(PARALLEL, thread_name_prefix="twin-s3-put") as pool:
            for f in [pool.submit(self.bucket.put, rel, data, content_type(rel)) for rel, data in objects]:
                f.result()       # the first failure is raised (the others finish first)

    def _cached(self, rel: str) -> Path:
        return self.cache.get(rel, lambda fh: self.bucket.get_into(rel, fh))

    def session_faces(self, session_id: str) -> SessionFaces:
        """The stored face features and crops (through the cache; the crops fetched several at once)."""
        check_session_id(session_id)
        try:
            faces = self._cached(f"{session_id}/{FACES_FILE}")
        except NotFound:
            raise NotFound(f"session {session_id!r} has no stored face features; upload the selfies again") from None
        def crops(indices: list[int]) -> list[Path]:
            with ThreadPoolExecutor(PARALLEL, thread_name_prefix="twin-s3-get") as pool:
                return list(pool.map(self._cached, [f"{session_id}/{crop_name(i)}" for i in indices]))
        return read_session_faces(faces, crops)

    def load_template(self, session_id: str):
        try:
            return read_template(self._cached(f"{check_session_id(session_id)}/{FACES_FILE}"))
        except NotFound:
            return None

    def session_self_similarity(self, session_id: str) -> float | None:
        try:
            return meta_self_similarity(self._cached(f"{check_session_id(session_id)}/{META_FILE}").read_bytes())
        except NotFound:
            return None

    # --- identities ------------------------------------------------------------------------------
    def identity_paths(self, session_id: str) -> list[Path]:
        """Local copies of every identity of the session, the upload's first (one listing, then the cache)."""
        check_session_id(session_id)
        names = sorted(n for n in (o["rel"].rsplit("/", 1)[-1] for o in self.bucket.list(f"{session_id}/identity"))
                       if is_identity_name(n))
        names.sort(key=lambda n: n != IDENTITY_FILE)
        out = []
        for n in names:
            try:
                out.append(self._cached(f"{session_id}/{n}"))
            except NotFound:      # deleted meanwhile
                continue
        return out

    def save_identity(self, session_id: str, identity) -> None:
        """Upload an identity built on first use, and keep it in the cache for the next job here."""
        rel = f"{check_session_id(session_id)}/{identity_name(identity.cache_key)}"
        tmp = self.cache.temp_path(".safetensors")
        try:
            identity.save(tmp)
            self.bucket.put_file(rel, tmp)
            self.cache.put_file(rel, tmp)
        finally:
            with suppress_os():
                tmp.unlink()

    # --- job files -------------------------------------------------------------------------------
    def save_output(self, session_id: str, job_id: str, name: str, data: bytes) -> str:
        """PUT one of a job's files (encoded image bytes); returns the reference to record once it exists."""
        ref = job_file_ref(session_id, job_id, name)
        self.bucket.put(ref, data, content_type(name))
        return ref

    def remove(self, recorded: Iterable[str]) -> None:
        """Delete objects of an output that was never recorded (never served either way)."""
        refs = []
        for ref in recorded:
            try:
                parse_job_file_ref(ref)
                refs.append(ref)
            except NotFound:
                continue
        try:
            self.bucket.delete(refs)
        except TwinError as e:
            log.warning("could not delete unrecorded job files", extra={"error": e.message, "count": len(refs)})

    def open_output(self, ref: str) -> StoredFile:
        parse_job_file_ref(ref)
        return self.bucket.open(ref)

    def download_url(self, ref: str, *, disposition: str, content_type: str, expires: int) -> str:
        """A presigned GET of a recorded job file that still exists (NotFound otherwise)."""
        parse_job_file_ref(ref)
        if not self.bucket.exists(ref):
            raise NotFound("not found")
        return self.bucket.presign(ref, disposition=disposition, content_type=content_type, expires=expires)

    def put_init_image(self, session_id: str, job_id: str, data: bytes) -> str:
        ref = job_file_ref(session_id, job_id, INIT_IMAGE_FILE)
        self.bucket.put(ref, data, "image/png")
        return ref

    def init_image(self, session_id: str, job_id: str) -> bytes | None:
        try:
            return self._cached(job_file_ref(session_id, job_id, INIT_IMAGE_FILE)).read_bytes()
        except NotFound:
            return None

    def twin_dir(self, session_id: str, run_id: str | None = None):
        # Training writes checkpoints every few steps and the GPU worker loads the LoRA as a file: not yet
        # through the bucket (a clear refusal rather than a LoRA that lives on one worker's disk only).
        raise TwinError("twin LoRA training needs the local data folder (TWIN_STORAGE_URL unset); it is not "
                        "implemented for the S3 storage backend yet", code="twin_storage_unsupported",
                        http_status=501)

    def accepted_original(self, session_id: str, index: int) -> tuple[str, bytes] | None:
        check_session_id(session_id)
        if not self.bucket.exists(f"{session_id}/{crop_name(index)}"):
            return None
        found = sorted(o["rel"] for o in self.bucket.list(f"{session_id}/originals/{index:03d}."))
        if not found:
            return None
        return found[0].rsplit("/", 1)[-1], self.bucket.get(found[0])

    # --- deletion and the retention sweep ------------------------------------------------------------
    def delete_session(self, session_id: str) -> bool:
        """Every object, version and delete marker under the session's prefix; returns after the bucket
        lists nothing there. The cached copies on this machine go too."""
        deleted = self.bucket.delete_prefix(f"{check_session_id(session_id)}/")
        self.cache.forget(session_id)
        return deleted > 0

    def clean_partial_files(self) -> int:
        """Nothing to clean in the bucket: a PUT that did not finish left no object, and an unfinished
        multipart upload is never visible (a lifecycle rule AbortIncompleteMultipartUpload frees its parts)."""
        return 0

    def session_ids(self) -> Iterable[str]:
        return [c for c in self.bucket.children() if is_valid_id(c)]

    def session_created_at(self, session_id: str) -> float:
        """created_at from meta.json, else the oldest object's time (an upload cut off before meta.json)."""
        check_session_id(session_id)
        try:
            return float(json.loads(self.bucket.get(f"{session_id}/{META_FILE}"))["created_at"])
        except NotFound:
            times = [o["modified"] for o in self.bucket.list(f"{session_id}/")]
            if not times:
                raise NotFound(f"session {session_id!r} not found") from None
            return min(times)
        except (ValueError, KeyError, TypeError):
            return min(o["modified"] for o in self.bucket.list(f"{session_id}/"))

    # --- cached copies (CachedReads) -------------------------------------------------------------------
    def cached_sessions(self) -> list[str]:
        return self.cache.sessions()

    def forget_cached(self, session_id: str) -> bool:
        return self.cache.forget(session_id)

    # --- the preflight (flask --app app check-storage) -------------------------------------------------
    def probe(self) -> list[tuple[str, str | None]]:
        """Write, read and delete a probe object: (step, None when it worked, else what failed)."""
        import os
        rel = f".probe/{new_id()}"
        data = os.urandom(64)
        steps: list[tuple[str, str | None]] = []

        def read():
            got = self.bucket.get(rel)
            if got != data:
                raise ValueError(f"read {len(got)} bytes that differ from the {len(data)} written")

        def gone():
            if self.bucket.exists(rel):
                raise ValueError("the probe object is still listed after its deletion")
        for step, act in (("reach", self.bucket.ping), ("write", lambda: self.bucket.put(rel, data)), ("read", read),
                          ("delete", lambda: self.bucket.delete_prefix(rel)), ("gone", gone)):
            try:
                act()
                steps.append((step, None))
            except Exception as e:  # noqa: BLE001 - reported, line by line
                steps.append((step, e.message if isinstance(e, TwinError) else f"{type(e).__name__}: {e}"))
                break
        if steps[-1][1] is not None and steps[-1][0] in ("read", "delete"):
            try:
                self.bucket.delete_prefix(rel)
            except TwinError:
                pass     # the failure is reported already
        return steps
