"""Ids, file names and the layout of one session, the same in a folder and in a bucket.

Layout under the data folder or the bucket prefix (see docs/ARCHITECTURE.md)::

    <session_id>/meta.json                    owner hash, created_at, counts (written last: the session is complete)
    <session_id>/originals/NNN.<ext>          uploaded files as sent
    <session_id>/crops/NNN.png                accepted, aligned face crops
    <session_id>/embeddings.safetensors       per-selfie face features: embeddings, template, raw ArcFace
                                              lengths and key points (InsightFace)
    <session_id>/identity.safetensors         the identity built at upload (local mode)
    <session_id>/identity-<hash>.safetensors  identities built later for another method / model
    <session_id>/report.json                  the validation report (no pixels, no vectors)
    <session_id>/outputs/<job_id>/avatar_001.png  (+ .thumb.jpg, _raw.png, init_image.png)

A reference recorded in a job record is the path relative to the data folder / bucket prefix
(``<session>/outputs/<job>/<name>``). No name is ever built from a user-supplied string that has not
passed the id regex; downloads take their reference from the job record, not from the URL.
"""
from __future__ import annotations

import hashlib
import re
import secrets

from utils.errors import NotFound

# secrets.token_urlsafe(18) -> 24 characters, 144 random bits.
ID_BYTES = 18
ID_RE = re.compile(r"^[A-Za-z0-9_-]{22,64}$")
OUTPUT_NAME_RE = re.compile(r"^avatar_\d{3}(?:_raw\.png|\.png|\.thumb\.jpg)$")  # a portrait, its unrestored original, its thumbnail
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{22,128}$")
FACES_FILE = "embeddings.safetensors"     # per-selfie face embeddings + template + raw lengths + key points
IDENTITY_FILE = "identity.safetensors"    # the identity built at upload
INIT_IMAGE_FILE = "init_image.png"        # an img2img job's start picture
META_FILE = "meta.json"
REPORT_FILE = "report.json"
_ORIGINAL_EXTS = {"jpg", "jpeg", "png", "webp", "heic", "heif", "bmp", "gif", "tif", "tiff", "avif"}
# A job file's reference: <session>/outputs/<job>/<output name | init_image.png>.
_REF_RE = re.compile(r"^([A-Za-z0-9_-]{22,64})/outputs/([A-Za-z0-9_-]{22,64})/"
                     r"(avatar_\d{3}(?:_raw\.png|\.png|\.thumb\.jpg)|init_image\.png)$")


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


def check_session_id(session_id: str) -> str:
    if not is_valid_id(session_id):
        raise NotFound(f"session {session_id!r} not found")
    return session_id


def job_file_ref(session_id: str, job_id: str, name: str) -> str:
    """What a job record names one of the job's files by."""
    check_session_id(session_id)
    if not is_valid_id(job_id):
        raise NotFound(f"job {job_id!r} not found")
    if not (is_output_name(name) or name == INIT_IMAGE_FILE):
        raise NotFound(f"file {name!r} not found")
    return f"{session_id}/outputs/{job_id}/{name}"


def parse_job_file_ref(ref: str) -> tuple[str, str, str]:
    """(session, job, name) of a recorded reference; NotFound for anything else (``..``, another folder)."""
    m = _REF_RE.fullmatch(ref or "")
    if m is None:
        raise NotFound("not found")
    return m.group(1), m.group(2), m.group(3)


def identity_name(key: str | None) -> str:
    """The upload's identity file, or the one built later for ``key`` (an identity method and base model)."""
    return IDENTITY_FILE if key is None else f"identity-{hashlib.sha256(key.encode()).hexdigest()[:12]}.safetensors"


def is_identity_name(name: str) -> bool:
    return name == IDENTITY_FILE or bool(re.fullmatch(r"identity-[0-9a-f]{12}\.safetensors", name))


def original_name(index: int, filename: str | None) -> str:
    return f"originals/{index:03d}.{safe_extension(filename)}"


def crop_name(index: int) -> str:
    return f"crops/{index:03d}.png"
