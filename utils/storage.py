"""The twin_data layout, unguessable ids, safe paths and atomic writes.

Layout (see docs/ARCHITECTURE.md)::

    <data_dir>/jobs.db                                   job + session records (SQLite, WAL)
    <data_dir>/<session_id>/meta.json                    owner hash, created_at, counts
    <data_dir>/<session_id>/originals/NNN.<ext>          uploaded files as sent
    <data_dir>/<session_id>/crops/NNN.png                accepted, aligned face crops
    <data_dir>/<session_id>/embeddings.safetensors       per-selfie face features: embeddings, template,
                                                         raw ArcFace lengths and key points (InsightFace)
    <data_dir>/<session_id>/identity.safetensors         the identity built at upload (local mode)
    <data_dir>/<session_id>/identity-<hash>.safetensors  identities built later for another method / model
    <data_dir>/<session_id>/report.json                  the validation report (no pixels, no vectors)
    <data_dir>/<session_id>/outputs/<job_id>/avatar_001.png

A persona session (the session of one identity='none' job) holds meta.json (kind "persona") and outputs/
only: no selfie, face feature or identity is ever written there.

No path is ever built from a user-supplied string that has not passed the id regex; downloads
resolve their path from the job record, not from the URL.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable


from utils.errors import InsufficientStorage, NotFound

# secrets.token_urlsafe(18) -> 24 characters, 144 random bits.
ID_BYTES = 18
ID_RE = re.compile(r"^[A-Za-z0-9_-]{22,64}$")
OUTPUT_NAME_RE = re.compile(r"^avatar_\d{3}(?:_raw\.png|\.png|\.thumb\.jpg)$")  # a portrait, its unrestored original, its thumbnail
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{22,128}$")
_STAGING_PREFIX = ".staging-"
_TMP_SUFFIX = ".part"
FACES_FILE = "embeddings.safetensors"     # per-selfie face embeddings + template + raw lengths + key points
IDENTITY_FILE = "identity.safetensors"    # the identity built at upload
INIT_IMAGE_FILE = "init_image.png"        # an img2img job's start picture
_ORIGINAL_EXTS = {"jpg", "jpeg", "png", "webp", "heic", "heif", "bmp", "gif", "tif", "tiff", "avif"}


def new_id() -> str:
    """Session, job and client-token ids: ≥128 random bits, URL-safe."""
    return secrets.token_urlsafe(ID_BYTES)


def is_valid_id(value: str | None) -> bool:
    return bool(value) and bool(ID_RE.fullmatch(value))  # type: ignore[arg-type]


def is_output_name(value: str | None) -> bool:
    return bool(value) and bool(OUTPUT_NAME_RE.fullmatch(value))  # type: ignore[arg-type]


def output_name(index: int) -> str:
    """1-based: avatar_001.png, avatar_002.png, ..."""
    return f"avatar_{index:03d}.png"


def thumbnail_name(output: str) -> str:
    """avatar_001.png -> avatar_001.thumb.jpg"""
    return output.rsplit(".", 1)[0] + ".thumb.jpg"
def raw_output_name(index: int) -> str:
    """The unrestored original kept beside a face-restored output: avatar_001_raw.png."""
    return f"avatar_{index:03d}_raw.png"


def hash_secret(secret: str) -> str:
    """Only this hash of an API key or client token is ever stored."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def safe_extension(filename: str | None) -> str:
    ext = (filename or "").rsplit(".", 1)[-1].lower() if "." in (filename or "") else ""
    return ext if ext in _ORIGINAL_EXTS else "bin"


# --- a full volume --------------------------------------------------------------------------

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "database or disk is full", "os error 28",
               "os error 122")


def is_disk_full(exc: BaseException | None) -> bool:
    """ENOSPC/EDQUOT, whether raised by the OS or reported by a library that wraps it (SQLite's
    SQLITE_FULL, safetensors' Rust I/O error, PIL)."""
    while exc is not None:
        if isinstance(exc, InsufficientStorage):
            return True
        if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
            return True
        if (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF == 13:  # SQLITE_FULL
            return True
        if any(t in str(exc) for t in _FULL_TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def full_error(what: str) -> InsufficientStorage:
    return InsufficientStorage(f"the data volume is full: could not write {what}; free space under "
                               "TWIN_DATA_DIR and retry")


# --- atomic writes ---------------------------------------------------------------------------

def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then os.replace: readers see all or nothing.
    A full volume (ENOSPC/EDQUOT) raises InsufficientStorage and leaves no temp file behind."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=_TMP_SUFFIX)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with _suppress():
                os.unlink(tmp)
        if is_disk_full(e) and not isinstance(e, InsufficientStorage):
            raise full_error(path.name) from e
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"))


def png_bytes(image) -> bytes:
    import io
    buf = io.BytesIO()
    # compress_level 1: a 1024² portrait encodes several times faster than at the default 6, for ~10% more bytes.
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def thumbnail_bytes(image, side: int) -> bytes:
    """A JPEG no larger than side × side (aspect kept) for galleries."""
    import io
    thumb = image.convert("RGB")
    thumb.thumbnail((side, side))  # reduce() first, then a filtered resize: cheap even from 1024²
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=85, optimize=True)
    return buf.getvalue()


def atomic_save_png(path: Path, image) -> None:
    atomic_write_bytes(path, png_bytes(image))


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


# --- a session's face features ---------------------------------------------------------------------

@dataclass
class SessionFaces:
    """A session's accepted selfies as the face service described them (``Storage.session_faces``)."""
    indices: list[int]                    # upload index of each accepted selfie
    crops: list                           # aligned face crops (PIL RGB)
    embeddings: list                      # unit face embeddings (np.float32), one per accepted selfie
    face_model: str | None
    template: Any = None                  # mean of the normalised embeddings
    norms: list | None = None             # raw ArcFace lengths (InsightFace); None per selfie without one
    keypoints: list | None = None         # 5 face points per selfie in its photo (InsightFace), or None

    def identity_inputs(self) -> dict[str, Any]:
        """``build_identity(**...)``'s face inputs beyond crops and embeddings (as SelfieReport.identity_inputs)."""
        if self.norms is None and self.keypoints is None:
            return {}
        n = len(self.indices)
        return {"embedding_norms": self.norms or [None] * n, "keypoints": self.keypoints or [None] * n,
                "keypoint_index": list(self.indices)}


def _save_face_features(path: Path, report) -> None:
    """Embeddings, template, raw ArcFace lengths and key points of the accepted selfies (NaN where a backend
    gives none), so an identity can be built again later for any identity method."""
    import numpy as np
    from safetensors.numpy import save_file
    acc = report.accepted
    tensors = {"embeddings": np.stack([np.asarray(a.embedding, dtype=np.float32) for a in acc]),
               "indices": np.asarray([a.index for a in acc], dtype=np.int32)}
    if report.template is not None:
        tensors["template"] = np.asarray(report.template, dtype=np.float32)
    inputs = report.identity_inputs()
    if inputs.get("embedding_norms") is not None:
        tensors["norms"] = np.asarray([np.nan if n is None else n for n in inputs["embedding_norms"]], np.float32)
    if inputs.get("keypoints") is not None:
        tensors["keypoints"] = np.stack([np.full((5, 2), np.nan, np.float32) if k is None
                                         else np.asarray(k, np.float32).reshape(5, 2) for k in inputs["keypoints"]])
    save_file(tensors, str(path), metadata={"model_name": str(report.model_name)})


# --- the data folder ---------------------------------------------------------------------------

class Storage:
    def __init__(self, data_dir: Path, *, min_free_mb: float = 0.0) -> None:
        self.root = Path(data_dir).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.min_free_mb = min_free_mb

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
        if not is_valid_id(session_id):
            raise NotFound(f"session {session_id!r} not found")
        return self._inside(self.root / session_id)

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
        if not is_valid_id(session_id):
            raise NotFound(f"session {session_id!r} not found")
        d = self.root / (_STAGING_PREFIX + session_id)
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
        created_at = created_at or time.time()
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
            for i, (name, data) in enumerate(files):
                (d / "originals" / f"{i:03d}.{safe_extension(name)}").write_bytes(data)
            for a in report.accepted:
                a.crop.save(d / "crops" / f"{a.index:03d}.png", format="PNG")
            _save_face_features(d / FACES_FILE, report)
            if identity is not None:
                identity.save(d / IDENTITY_FILE)
            report_json = report.to_json()
            if self_similarity is not None:
                report_json["self_similarity"] = self_similarity
            (d / "report.json").write_text(json.dumps(report_json, indent=2, sort_keys=True))
            meta = {"session_id": session_id, "owner": owner_hash, "created_at": created_at,
                    "files": len(files), "accepted": len(report.accepted), "rejected": len(report.rejected),
                    "face_model": str(report.model_name), "self_similarity": self_similarity}
            (d / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
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
            meta = {"session_id": session_id, "owner": owner_hash, "created_at": created_at, "kind": "persona"}
            (d / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
            return self.commit_staging(session_id)
        except BaseException as e:
            self.discard_staging(session_id)
            if is_disk_full(e) and not isinstance(e, InsufficientStorage):
                raise full_error("a persona session") from e
            raise

    def session_faces(self, session_id: str) -> "SessionFaces":
        """What the face service stored about a session's accepted selfies: enough to build its identity for
        any identity method again (crops, embeddings, raw ArcFace lengths, key points). NotFound when the
        session or its face features are gone."""
        import numpy as np
        from safetensors.numpy import safe_open
        d = self.session_dir(session_id)
        path = d / FACES_FILE
        if not path.is_file():
            raise NotFound(f"session {session_id!r} has no stored face features; upload the selfies again")
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}
        indices = [int(i) for i in t["indices"]]
        crops = []
        for i in indices:
            from PIL import Image
            with Image.open(d / "crops" / f"{i:03d}.png") as im:
                crops.append(im.convert("RGB"))
        norms = [None if not np.isfinite(v) else float(v) for v in t["norms"]] if "norms" in t else None
        kps = ([None if not np.all(np.isfinite(k)) else k for k in t["keypoints"]] if "keypoints" in t else None)
        return SessionFaces(indices=indices, crops=crops, embeddings=list(t["embeddings"]),
                            face_model=meta.get("model_name") or None, template=t.get("template"),
                            norms=norms, keypoints=kps)

    # --- identities: one per identity method and base model, built at upload or on first use --------
    def identity_path(self, session_id: str, key: str | None = None) -> Path:
        """The session's identity file: the one built at upload, or (``key``) one built later for another
        identity method or base model."""
        name = IDENTITY_FILE if key is None else f"identity-{hashlib.sha256(key.encode()).hexdigest()[:12]}.safetensors"
        return self.session_dir(session_id) / name

    def identity_paths(self, session_id: str) -> list[Path]:
        """Every identity file of the session, the upload's first."""
        d = self.session_dir(session_id)
        return [p for p in [d / IDENTITY_FILE] + sorted(d.glob("identity-*.safetensors")) if p.is_file()]

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
            with _suppress():
                self.resolve_relative(rel).unlink(missing_ok=True)

    def init_image_path(self, session_id: str, job_id: str) -> Path:
        """An img2img job's start picture, beside its outputs (not an output name, so never served)."""
        return self.output_dir(session_id, job_id) / INIT_IMAGE_FILE

    def accepted_original(self, session_id: str, index: int) -> Path | None:
        """The uploaded file of accepted selfie ``index``, or None when there is no such accepted selfie."""
        d = self.session_dir(session_id)
        if not (d / "crops" / f"{index:03d}.png").is_file():
            return None
        found = sorted((d / "originals").glob(f"{index:03d}.*"))
        return found[0] if found else None

    def load_template(self, session_id: str):
        """The face-embedding template of a session, or None."""
        from safetensors.numpy import load_file
        p = self.session_dir(session_id) / FACES_FILE
        if not p.exists():
            return None
        return load_file(str(p)).get("template")

    def session_self_similarity(self, session_id: str) -> float | None:
        """Median pairwise likeness of the session's accepted selfies (meta.json), or None."""
        try:
            value = json.loads((self.session_dir(session_id) / "meta.json").read_text()).get("self_similarity")
        except (OSError, ValueError, AttributeError):
            return None
        return None if value is None else float(value)

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
        for p in self.root.glob("*/outputs/*/*" + _TMP_SUFFIX):
            with _suppress():
                p.unlink()
                removed += 1
        return removed

    def session_ids_on_disk(self) -> Iterable[str]:
        return (p.name for p in self.root.iterdir() if p.is_dir() and is_valid_id(p.name))

    def session_created_at(self, session_id: str) -> float:
        """created_at from the session's meta.json, else the folder's mtime (for a folder whose database
        record was never written, e.g. the process died between the rename and the insert)."""
        d = self.session_dir(session_id)
        try:
            return float(json.loads((d / "meta.json").read_text())["created_at"])
        except (OSError, ValueError, KeyError, TypeError):
            return d.stat().st_mtime
