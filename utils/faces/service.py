"""Selfie validation and identity: the ``FaceService`` entry point (contract: docs/ARCHITECTURE.md "Faces").

``FaceService(settings)`` is cheap; ``setup()`` picks and loads a backend (``utils.faces.backends``);
``validate_selfies(files)`` decodes, checks and embeds a set of uploads and returns a ``SelfieReport``
that says, per file in upload order, accepted or rejected with a machine-readable code and a human
sentence. Each photo is checked on its own by ``utils.faces.analysis.analyse_photo`` (in the shared
thread pool, ``UploadSlots`` uploads at a time); the set checks (duplicates, identity outliers, count)
follow here. Every threshold is a setting (utils/config.py, "faces").

Biometric data (pixels, crops, embeddings) never reaches a log line, an error message or ``to_json()``.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
from PIL import Image

from utils.config import Settings
from utils.errors import InvalidRequest, ServerBusy, TwinError
from utils.faces.analysis import Analysed, Reject, analyse_photo
from utils.faces.backends import DlibBackend, Detection, FaceBackend, InsightFaceBackend, insightface_pack_files, normalise

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Report objects
@dataclass
class AcceptedSelfie:
    index: int
    filename: str
    preview: Image.Image = field(repr=False)         # upright, longest side analysis.PREVIEW_SIDE: not the photo
    crop: Image.Image = field(repr=False)
    embedding: np.ndarray = field(repr=False)
    warnings: list[dict[str, str]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    size: tuple[int, int] = (0, 0)                   # upright size of the uploaded photo, px
    # InsightFace only: the raw ArcFace vector's length (embedding * norm = the raw vector InstantID wants)
    # and the 5 key points [5, 2] in image pixels (eyes, nose, mouth corners) for pose="selfie:N".
    # Never logged, never in to_json().
    embedding_norm: float | None = field(default=None, repr=False)
    kps: np.ndarray | None = field(default=None, repr=False)
    # The same 5 points in ``crop``'s pixels (InfiniteYou aligns its ArcFace chip from the crop).
    crop_kps: np.ndarray | None = field(default=None, repr=False)
    # Apparent age in years (InsightFace genderage), for the session's age gate (utils.safety.policy).
    # Never logged, never in to_json().
    apparent_age: float | None = field(default=None, repr=False)


@dataclass
class RejectedSelfie:
    index: int
    filename: str
    code: str
    message: str
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class SelfieReport:
    backend: str
    model_name: str
    received: int
    accepted: list[AcceptedSelfie] = field(default_factory=list)
    rejected: list[RejectedSelfie] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)
    template: np.ndarray | None = field(default=None, repr=False)

    def identity_inputs(self) -> dict[str, Any]:
        """What ArcFace adapters need beyond the unit embeddings, for ``build_identity(**...)``: the raw
        vectors' lengths (InstantID), each accepted selfie's 5 key points and upload index (pose selfie:N).
        Empty with backends that have neither (dlib)."""
        if not any(a.kps is not None or a.embedding_norm is not None for a in self.accepted):
            return {}
        return {"embedding_norms": [a.embedding_norm for a in self.accepted],
                "keypoints": [a.kps for a in self.accepted],
                "keypoint_index": [a.index for a in self.accepted],
                "crop_keypoints": [a.crop_kps for a in self.accepted]}

    def apparent_ages(self) -> list[float | None]:
        """Each accepted selfie's apparent age (None where the backend has no age model), for
        ``utils.safety.policy.session_age_gate``; never logged."""
        return [a.apparent_age for a in self.accepted]

    def to_json(self) -> dict[str, Any]:
        """JSON-safe summary: per-file status in upload order, counts, set warnings. No pixels, no embeddings."""
        entries: list[dict[str, Any]] = []
        for a in self.accepted:
            entries.append({"index": a.index, "filename": a.filename, "status": "accepted", "code": None,
                            "message": None, "warnings": list(a.warnings), "metrics": dict(a.metrics)})
        for r in self.rejected:
            entries.append({"index": r.index, "filename": r.filename, "status": "rejected", "code": r.code,
                            "message": r.message, "warnings": [], "metrics": dict(r.metrics)})
        entries.sort(key=lambda e: e["index"])
        return {
            "backend": self.backend,
            "model_name": self.model_name,
            "counts": {"received": self.received, "accepted": len(self.accepted), "rejected": len(self.rejected)},
            "files": entries,
            "warnings": list(self.warnings),
        }


class UploadSlots:
    """Server-wide bound on uploads being decoded at once (one FaceService per process): each holds
    its photos' crops, and its decodes compete for memory and the pool's threads."""

    def __init__(self, slots: int, wait_seconds: float) -> None:
        self.slots, self.wait_seconds = slots, wait_seconds
        self._free = threading.BoundedSemaphore(slots)

    @contextmanager
    def held(self) -> Iterator[None]:
        """One slot for the ``with`` block, or ServerBusy after ``wait_seconds`` without one."""
        if not self._free.acquire(timeout=self.wait_seconds):
            raise ServerBusy(f"{self.slots} upload(s) are being checked already "
                             f"(TWIN_MAX_CONCURRENT_UPLOADS) and none finished within {self.wait_seconds:g} s; "
                             "retry shortly",
                             retry_after=5)  # a slot frees within one upload's time: seconds, not minutes
        try:
            yield
        finally:
            self._free.release()


# --------------------------------------------------------------------------------------------------
class FaceService:
    """Validates selfie sets and scores identity. Safe to call from several threads after ``setup()``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.backend: FaceBackend | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._setup_lock = threading.Lock()
        self._uploads = UploadSlots(settings.max_concurrent_uploads, settings.upload_wait_seconds)

    # ------------------------------------------------------------------ set-up
    @property
    def backend_name(self) -> str:
        return self.backend.name if self.backend else self._choose()[0]

    @property
    def model_name(self) -> str | None:
        return self.backend.model_name if self.backend else None

    @property
    def ready(self) -> bool:
        return self.backend is not None

    def _choose(self) -> tuple[str, str]:
        s = self.settings
        pack = s.resolved_insightface_dir
        if s.face_backend != "auto":
            return s.face_backend, f"TWIN_FACE_BACKEND={s.face_backend}"
        if insightface_pack_files(pack):
            return "insightface", f"auto: InsightFace pack found at {pack}"
        return "dlib", f"auto: no InsightFace pack at {pack}, using the offline dlib models"

    def setup(self) -> "FaceService":
        with self._setup_lock:
            if self.backend is not None:
                return self
            s = self.settings
            name, why = self._choose()
            if name == "insightface":
                backend: FaceBackend = InsightFaceBackend(
                    s.resolved_insightface_dir, det_size=s.face_detect_side,
                    outlier_distance=s.outlier_distance_arcface)
            else:
                backend = DlibBackend(detect_side=s.face_detect_side, min_score=s.dlib_min_detect_score,
                                      outlier_distance=s.outlier_distance_dlib, descriptor=s.face_descriptor)
            backend.load()
            threads = s.face_threads or 1
            self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="faces") if threads > 1 else None
            self.backend = backend
            log.info("face backend %s (model %s) ready, %d thread(s); %s", backend.name, backend.model_name,
                     threads, why)
            return self

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def _require(self) -> FaceBackend:
        if self.backend is None:
            raise TwinError("the face service is not set up yet", code="not_ready", http_status=503)
        return self.backend

    # ------------------------------------------------------------------ per file
    def _analyse(self, index: int, filename: str, data: bytes) -> Analysed:
        return analyse_photo(self._require(), self.settings, index, filename, data)

    # ------------------------------------------------------------------ per set
    def validate_selfies(self, files: list[tuple[str, bytes]]) -> SelfieReport:
        backend = self._require()
        jobs = _upload_jobs(files)
        with self._uploads.held():
            items = self._analyse_all(jobs)
        mark_duplicates(items, self.settings.duplicate_threshold)
        set_warnings = mark_outliers(items, backend.outlier_distance)
        report = _report(items, backend)
        set_warnings += _count_warnings(len(report.accepted), self.settings.recommended_selfies)
        report.warnings = set_warnings
        log.info("selfies validated: %d received, %d accepted, %d rejected (%s)", len(items), len(report.accepted),
                 len(report.rejected), ", ".join(sorted({r.code for r in report.rejected})) or "none")
        return report

    def _analyse_all(self, jobs: list[tuple[int, str, bytes]]) -> list[Analysed]:
        # Photos go through the shared pool (face_threads at a time, whatever the number of uploads)
        # or one at a time; each _analyse drops its decoded pixels before returning.
        if self._pool is not None and len(jobs) > 1:
            return list(self._pool.map(lambda j: self._analyse(*j), jobs))
        return [self._analyse(*j) for j in jobs]

    # ------------------------------------------------------------------ scoring
    def detect_faces(self, image: Image.Image) -> list[Detection]:
        """Every face in ``image`` with its key points (face restoration aligns each of them)."""
        return self._require().detect(np.asarray(image.convert("RGB")))

    def distance_to_similarity(self, d: float) -> float:
        """1 - d / (2·threshold), clipped to [0, 1]: 0.5 sits on the backend's same-person limit."""
        thr = self._require().outlier_distance
        return float(min(1.0, max(0.0, 1.0 - d / (2 * thr))))

    def self_similarity(self, embeddings: list[np.ndarray]) -> float | None:
        """Median pairwise similarity of a person's own selfies (same scale as ``identity_similarity``):
        the likeness a portrait can hope for. None with fewer than two embeddings."""
        embs = [normalise(e) for e in embeddings]
        if len(embs) < 2:
            return None
        sims = [self.distance_to_similarity(float(np.linalg.norm(embs[i] - embs[j])))
                for i in range(len(embs)) for j in range(i + 1, len(embs))]
        return float(np.median(sims))

    def embed_image(self, image: Image.Image) -> np.ndarray | None:
        """Unit embedding of the largest face in ``image``; None when there is no face."""
        backend = self._require()
        rgb = np.asarray(image.convert("RGB"))
        dets = backend.detect(rgb)
        if not dets:
            return None
        det = max(dets, key=lambda d: d.width * d.height)
        return backend.embed(rgb, det)

    def identity_distance(self, image: Image.Image, template: np.ndarray) -> float | None:
        emb = self.embed_image(image)
        if emb is None:
            return None
        template = np.asarray(template, dtype=np.float32).ravel()
        if template.shape != emb.shape:
            raise InvalidRequest(f"identity template has {template.shape[0]} values but the {self.model_name} "
                                 f"model makes {emb.shape[0]}; the session was made with another face model",
                                 code="embedding_mismatch")
        return float(np.linalg.norm(emb - normalise(template)))

    def identity_similarity(self, image: Image.Image, template: np.ndarray) -> float | None:
        """Likeness of the largest face in ``image`` to ``template`` in [0, 1]; None when no face.

        1 - d / (2·threshold), clipped, where d is the distance between unit embeddings and threshold
        the backend's same-person limit: 0.5 sits exactly on the limit, so the score means the same on
        dlib and ArcFace even though their raw distances do not.
        """
        d = self.identity_distance(image, template)
        if d is None:
            return None
        return self.distance_to_similarity(d)


# --------------------------------------------------------------------------------------------------
# The set's steps (validate_selfies, in order)
def _upload_jobs(files: list[tuple[str, bytes]]) -> list[tuple[int, str, bytes]]:
    """(index, filename, bytes) per upload, or InvalidRequest naming the first bad entry."""
    if not isinstance(files, (list, tuple)):
        raise InvalidRequest(f"files must be a list of (filename, bytes), got {type(files).__name__}")
    for i, pair in enumerate(files):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[1], (bytes, bytearray))):
            raise InvalidRequest(f"files[{i}] must be a (filename, bytes) pair")
    return [(i, str(name or f"file_{i + 1}"), bytes(data)) for i, (name, data) in enumerate(files)]


def mark_duplicates(items: list[Analysed], threshold: float) -> None:
    """Reject each photo whose signature is within ``threshold`` of an earlier kept one."""
    seen: list[Analysed] = []
    for it in items:
        if it.thumb is None:
            continue
        for prev in seen:
            if float(np.dot(it.thumb, prev.thumb)) >= threshold:
                if it.reject is None:
                    it.reject = Reject("duplicate", f"{it.filename}: a near-duplicate of {prev.filename}; "
                                                    "use different photos (angles, light, expressions)")
                break
        else:
            seen.append(it)


def mark_outliers(items: list[Analysed], threshold: float) -> list[dict[str, str]]:
    """Reject, from three accepted photos on, each one farther than ``threshold`` from the set's median
    embedding; with two, only a set warning (which of the two is the odd one cannot be told)."""
    warnings: list[dict[str, str]] = []
    good = [it for it in items if it.reject is None and it.embedding is not None]
    if len(good) >= 3:
        embs = np.stack([normalise(it.embedding) for it in good])
        median = np.median(embs, axis=0)
        dists = np.linalg.norm(embs - median, axis=1)
        for it, d in zip(good, dists):
            it.metrics["identity_distance"] = round(float(d), 3)
            if d > threshold:
                it.reject = Reject("identity_outlier", (
                    f"{it.filename}: looks like a different person from the rest of the set "
                    f"(distance {d:.2f}, limit {threshold:.2f}); upload photos of one person only"))
    elif len(good) == 2:
        d = float(np.linalg.norm(normalise(good[0].embedding) - normalise(good[1].embedding)))
        if d > threshold:
            warnings.append({"code": "identity_uncertain", "message": (
                f"{good[0].filename} and {good[1].filename} may show different people (distance {d:.2f}, "
                f"limit {threshold:.2f}); add more selfies so the odd one out can be found")})
    return warnings


def _report(items: list[Analysed], backend: FaceBackend) -> SelfieReport:
    report = SelfieReport(backend=backend.name, model_name=backend.model_name, received=len(items))
    for it in items:
        if it.reject is not None:
            report.rejected.append(RejectedSelfie(it.index, it.filename, it.reject.code, it.reject.message,
                                                  dict(it.metrics)))
        else:
            report.accepted.append(AcceptedSelfie(it.index, it.filename, it.preview, it.crop,
                                                  it.embedding, it.warnings, dict(it.metrics), it.size,
                                                  embedding_norm=it.embedding_norm, kps=it.kps,
                                                  crop_kps=it.crop_kps, apparent_age=it.apparent_age))
    if report.accepted:
        report.template = np.mean([normalise(a.embedding) for a in report.accepted], axis=0).astype(np.float32)
    return report


def _count_warnings(accepted: int, recommended: int) -> list[dict[str, str]]:
    if accepted == 0:
        return [{"code": "no_usable_selfies", "message": "none of the photos could be used; see each file's reason"}]
    if accepted < recommended:
        return [{"code": "few_selfies", "message": (
            f"{accepted} usable selfie{'s' if accepted != 1 else ''} (fewer than {recommended}): "
            "likeness improves with more")}]
    return []
