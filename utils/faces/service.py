"""Selfie validation and identity: the ``FaceService`` entry point (contract: docs/ARCHITECTURE.md "Faces").

``FaceService(settings)`` is cheap; ``setup()`` picks and loads a backend (``utils.faces.backends``);
``validate_selfies(files)`` decodes, checks and embeds a set of uploads and returns a ``SelfieReport``
that says, per file in upload order, accepted or rejected with a machine-readable code and a human
sentence. Every threshold is a setting (utils/config.py, "faces").

Biometric data (pixels, crops, embeddings) never reaches a log line, an error message or ``to_json()``.
"""
from __future__ import annotations

import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from utils.config import Settings
from utils.errors import ImageRejected, InvalidRequest, ServerBusy, TwinError
from utils.faces.backends import DlibBackend, Detection, FaceBackend, InsightFaceBackend, insightface_pack_files, normalise
from utils.images import decode_reduced

log = logging.getLogger(__name__)

#: Longest side of the small upright copy an accepted selfie keeps (the photo itself is not kept).
PREVIEW_SIDE = 256
#: Side the face box is resized to before its sharpness is measured (``face_sharpness``).
SHARPNESS_SIDE = 128


# --------------------------------------------------------------------------------------------------
# Report objects
@dataclass
class AcceptedSelfie:
    index: int
    filename: str
    preview: Image.Image = field(repr=False)         # upright, longest side PREVIEW_SIDE: not the photo
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
                "keypoint_index": [a.index for a in self.accepted]}

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


class _Reject(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class _Analysed:
    index: int
    filename: str
    preview: Image.Image | None = None
    size: tuple[int, int] = (0, 0)
    thumb: np.ndarray | None = None
    crop: Image.Image | None = None
    embedding: np.ndarray | None = None
    warnings: list[dict[str, str]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    reject: _Reject | None = None
    embedding_norm: float | None = None
    kps: np.ndarray | None = None
    apparent_age: float | None = None


# --------------------------------------------------------------------------------------------------
# Measurements (pure functions, tested directly)
def laplacian_variance(grey: np.ndarray) -> float:
    import cv2

    return float(cv2.Laplacian(grey.astype(np.float32), cv2.CV_32F).var())


def face_sharpness(rgb: np.ndarray, box: tuple[float, float, float, float], side: int = SHARPNESS_SIDE) -> float:
    """Variance of the Laplacian on the face box resized to ``side`` px, so the value measures blur
    relative to the face, not the face's size in the photo."""
    import cv2

    grey = _face_grey(rgb, box)
    if grey.size == 0:
        return 0.0
    return laplacian_variance(cv2.resize(grey, (side, side), interpolation=cv2.INTER_AREA
                                         if grey.shape[0] > side else cv2.INTER_LINEAR))


def face_brightness(rgb: np.ndarray, box: tuple[float, float, float, float]) -> float:
    grey = _face_grey(rgb, box)
    return float(grey.mean()) if grey.size else 0.0


def _face_grey(rgb: np.ndarray, box) -> np.ndarray:
    h, w = rgb.shape[:2]
    x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
    x1, y1 = min(w, int(math.ceil(box[2]))), min(h, int(math.ceil(box[3])))
    region = rgb[y0:y1, x0:x1].astype(np.float32)
    return region @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def estimate_yaw(left_eye, right_eye, nose) -> float:
    """Head yaw in degrees (sign: towards the image's right is positive) from eye centres and nose tip.

    The nose tip sits in front of the eye plane (depth ≈ 0.6 × the inter-ocular distance on adult
    faces), so turning the head by θ moves it sideways by ≈ 0.6·IOD·sin θ while the visible IOD
    shrinks by cos θ: offset / IOD ≈ 0.6·tan θ.
    """
    le, re, no = (np.asarray(p, dtype=np.float64) for p in (left_eye, right_eye, nose))
    axis = re - le
    iod = float(np.linalg.norm(axis))
    if iod < 1e-6:
        return 90.0
    offset = float(np.dot(no - (le + re) / 2, axis / iod)) / iod
    return math.degrees(math.atan(offset / 0.6))


def image_signature(image: Image.Image, side: int = 32) -> np.ndarray:
    """A small zero-mean, unit-norm grey thumbnail of the whole image: near-duplicate fingerprint."""
    thumb = np.asarray(image.convert("L").resize((side, side), Image.BILINEAR), dtype=np.float32).ravel()
    thumb = thumb - thumb.mean()
    norm = float(np.linalg.norm(thumb))
    return thumb / norm if norm > 0 else thumb


def aligned_crop(rgb: np.ndarray, det: Detection, *, size: int, scale: float) -> Image.Image:
    """Square crop around the face, rotated so the eye line is level, ``scale`` × the face box side,
    resized to ``size``; parts outside the photo repeat the edge pixels."""
    import cv2

    le, re = np.asarray(det.left_eye), np.asarray(det.right_eye)
    angle = math.degrees(math.atan2(re[1] - le[1], re[0] - le[0]))
    cx, cy = (det.box[0] + det.box[2]) / 2, (det.box[1] + det.box[3]) / 2
    side = max(det.width, det.height) * scale
    m = cv2.getRotationMatrix2D((cx, cy), angle, size / side)
    m[0, 2] += size / 2 - cx
    m[1, 2] += size / 2 - cy
    out = cv2.warpAffine(rgb, m, (size, size), flags=cv2.INTER_AREA if side > size else cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)
    return Image.fromarray(out)


# --------------------------------------------------------------------------------------------------
class FaceService:
    """Validates selfie sets and scores identity. Safe to call from several threads after ``setup()``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.backend: FaceBackend | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._setup_lock = threading.Lock()
        # Server-wide bound on uploads being decoded at once (one FaceService per process): each holds
        # its photos' crops, and its decodes compete for memory and the pool's threads.
        self._uploads = threading.BoundedSemaphore(settings.max_concurrent_uploads)

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

    @property
    def face_need(self) -> float:
        """Face box side, px, from which the sharpness measure and the aligned crop only downscale."""
        return max(SHARPNESS_SIDE, self.settings.face_crop_size / self.settings.face_crop_scale)

    def _require(self) -> FaceBackend:
        if self.backend is None:
            raise TwinError("the face service is not set up yet", code="not_ready", http_status=503)
        return self.backend

    # ------------------------------------------------------------------ per file
    def _analyse(self, index: int, filename: str, data: bytes) -> _Analysed:
        """Check one photo, keeping only what the session needs (crop, embedding, preview, signature).

        The photo is decoded only as large as detection needs (``backend.decode_side``; a 12 MP JPEG at
        1/4 scale), and the face's part of it again at a finer scale when the face is smaller there than
        the sharpness measure and the aligned crop use (``face_need``). So every measurement sees the
        pixels it saw at full resolution, only downscaled to what it would downscale them to anyway:
        - face_px is reported in the original photo's pixels (box side x ``factor``), so
          min_face_px means what it meant; face_fraction, brightness and yaw are ratios or means;
        - sharpness resizes the face box to SHARPNESS_SIDE px: from a view where the box is at least
          that large, as it was from the full photo (or the full photo itself when the face is smaller);
        - the aligned crop and the descriptor's chip downscale the face from at least face_crop_size
          / face_crop_scale px, as before, so they are as sharp as from the full photo.
        tests/test_faces_reduced.py checks the verdicts against the full-resolution path.
        """
        s = self.settings
        backend = self._require()
        item = _Analysed(index=index, filename=filename)
        try:
            try:
                photo = decode_reduced(data, filename, max_pixels=s.max_pixels, min_side=backend.decode_side)
            except ImageRejected as exc:
                raise _Reject(exc.code, exc.message) from None
            image, k = photo.image, photo.factor
            item.size = photo.size
            item.thumb = image_signature(image)
            ratio = min(1.0, PREVIEW_SIDE / max(image.size))
            item.preview = image.resize((max(1, round(image.width * ratio)), max(1, round(image.height * ratio))),
                                        Image.BILINEAR)
            rgb = np.asarray(image)
            dets = backend.detect(rgb)
            if not dets:
                raise _Reject("no_face", f"{filename}: no face was found; use a photo where your face is clearly visible")
            if len(dets) > 1:
                raise _Reject("multiple_faces", f"{filename}: {len(dets)} faces were found; use photos with only you in them")
            det = dets[0]
            h, w = rgb.shape[:2]
            side = min(det.width, det.height) * k          # in the original photo's pixels
            fraction = det.width * det.height / float(w * h)
            yaw = estimate_yaw(det.left_eye, det.right_eye, det.nose)
            view, vdet = rgb, det
            need = self.face_need
            if k > 1 and min(det.width, det.height) < need:
                # The face is small at this scale: decode its part of the photo at the coarsest scale
                # that keeps ``need`` px (full resolution when the face is smaller than that).
                half = max(det.width, det.height) * k * s.face_crop_scale * 0.75  # > crop half-diagonal
                cx, cy = (det.box[0] + det.box[2]) / 2 * k, (det.box[1] + det.box[3]) / 2 * k
                part, (ox, oy), f = photo.region((cx - half, cy - half, cx + half, cy + half),
                                                 max(1, int(side // need)))
                view = np.asarray(part)
                moved = lambda p: ((p[0] * k - ox) / f, (p[1] * k - oy) / f)  # noqa: E731
                x0, y0 = moved(det.box[:2])
                x1, y1 = moved(det.box[2:])
                vdet = backend.relocate(view, Detection(
                    box=(x0, y0, x1, y1), score=det.score, left_eye=moved(det.left_eye),
                    right_eye=moved(det.right_eye), nose=moved(det.nose), embedding=det.embedding))
                yaw = estimate_yaw(vdet.left_eye, vdet.right_eye, vdet.nose)
            del photo, image, rgb  # from here on only the face's view is needed
            sharp = face_sharpness(view, vdet.box)
            bright = face_brightness(view, vdet.box)
            item.metrics = {"face_px": round(side, 1), "face_fraction": round(fraction, 4),
                            "sharpness": round(sharp, 1), "brightness": round(bright, 1), "yaw_degrees": round(yaw, 1)}
            if side < s.min_face_px or fraction < s.min_face_fraction:
                raise _Reject("face_too_small", (
                    f"{filename}: the face is too small ({side:.0f} px, {fraction:.1%} of the photo; need at least "
                    f"{s.min_face_px} px and {s.min_face_fraction:.0%}); move closer or use a larger photo"))
            # Exposure before sharpness: a dark face has little contrast, hence a low Laplacian variance,
            # and "too dark" is the reason the user can act on.
            if bright < s.min_brightness:
                raise _Reject("too_dark", f"{filename}: the face is too dark (brightness {bright:.0f}, need at least "
                                          f"{s.min_brightness:.0f}); use more light")
            if bright > s.max_brightness:
                raise _Reject("too_bright", f"{filename}: the face is overexposed (brightness {bright:.0f}, at most "
                                            f"{s.max_brightness:.0f}); avoid direct light or flash")
            if sharp < s.min_sharpness:
                raise _Reject("blurry", f"{filename}: the face is blurry (sharpness {sharp:.0f}, need {s.min_sharpness:.0f}); "
                                        "hold the camera still and focus on your face")
            if abs(yaw) > s.max_yaw_degrees:
                raise _Reject("not_frontal", f"{filename}: the head is turned too far (about {abs(yaw):.0f}°, at most "
                                             f"{s.max_yaw_degrees:.0f}°); look towards the camera")
            # Embedded here, in the worker, so that one thread's descriptor overlaps another's detection
            # (a duplicate costs one extra descriptor, ~10 ms with the torch engine).
            item.embedding = np.asarray(backend.embed_prepared([backend.prepare_embedding(view, vdet)])[0],
                                        dtype=np.float32)
            item.embedding_norm, item.kps, item.apparent_age = det.embedding_norm, det.kps, det.age
            item.crop = aligned_crop(view, vdet, size=s.face_crop_size, scale=s.face_crop_scale)
            if side * s.face_crop_scale < s.face_crop_size / 2:
                item.warnings.append({"code": "low_resolution", "message": (
                    f"{filename}: the face is only {side:.0f} px wide; a closer or larger photo gives a sharper likeness")})
        except _Reject as rej:
            item.reject = rej
        except Exception as exc:  # one odd file must not fail the whole upload with a 500
            log.warning("selfie %d could not be analysed (%s)", index, type(exc).__name__)
            item.reject = _Reject("analysis_failed", f"{filename}: the photo could not be analysed; try another one")
        return item

    # ------------------------------------------------------------------ per set
    def validate_selfies(self, files: list[tuple[str, bytes]]) -> SelfieReport:
        backend = self._require()
        s = self.settings
        if not isinstance(files, (list, tuple)):
            raise InvalidRequest(f"files must be a list of (filename, bytes), got {type(files).__name__}")
        for i, pair in enumerate(files):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[1], (bytes, bytearray))):
                raise InvalidRequest(f"files[{i}] must be a (filename, bytes) pair")
        jobs = [(i, str(name or f"file_{i + 1}"), bytes(data)) for i, (name, data) in enumerate(files)]
        wait = s.upload_wait_seconds
        if not self._uploads.acquire(timeout=wait):
            raise ServerBusy(f"{s.max_concurrent_uploads} upload(s) are being checked already "
                             f"(TWIN_MAX_CONCURRENT_UPLOADS) and none finished within {wait:g} s; retry shortly",
                             retry_after=5)  # a slot frees within one upload's time: seconds, not minutes
        try:
            # Photos go through the shared pool (face_threads at a time, whatever the number of uploads)
            # or one at a time; each _analyse drops its decoded pixels before returning.
            if self._pool is not None and len(jobs) > 1:
                items = list(self._pool.map(lambda j: self._analyse(*j), jobs))
            else:
                items = [self._analyse(*j) for j in jobs]
        finally:
            self._uploads.release()

        self._mark_duplicates(items)
        set_warnings = self._mark_outliers(items, backend)

        report = SelfieReport(backend=backend.name, model_name=backend.model_name, received=len(items))
        for it in items:
            if it.reject is not None:
                report.rejected.append(RejectedSelfie(it.index, it.filename, it.reject.code, it.reject.message,
                                                      dict(it.metrics)))
            else:
                report.accepted.append(AcceptedSelfie(it.index, it.filename, it.preview, it.crop,
                                                      it.embedding, it.warnings, dict(it.metrics), it.size,
                                                      embedding_norm=it.embedding_norm, kps=it.kps,
                                                      apparent_age=it.apparent_age))
        if report.accepted:
            report.template = np.mean([normalise(a.embedding) for a in report.accepted], axis=0).astype(np.float32)
        n = len(report.accepted)
        if n == 0:
            set_warnings.append({"code": "no_usable_selfies",
                                 "message": "none of the photos could be used; see each file's reason"})
        elif n < s.recommended_selfies:
            set_warnings.append({"code": "few_selfies", "message": (
                f"{n} usable selfie{'s' if n != 1 else ''} (fewer than {s.recommended_selfies}): "
                "likeness improves with more")})
        report.warnings = set_warnings
        log.info("selfies validated: %d received, %d accepted, %d rejected (%s)", len(items), n,
                 len(report.rejected), ", ".join(sorted({r.code for r in report.rejected})) or "none")
        return report

    def _mark_duplicates(self, items: list[_Analysed]) -> None:
        thr = self.settings.duplicate_threshold
        seen: list[_Analysed] = []
        for it in items:
            if it.thumb is None:
                continue
            for prev in seen:
                if float(np.dot(it.thumb, prev.thumb)) >= thr:
                    if it.reject is None:
                        it.reject = _Reject("duplicate", f"{it.filename}: a near-duplicate of {prev.filename}; "
                                                         "use different photos (angles, light, expressions)")
                    break
            else:
                seen.append(it)

    def _mark_outliers(self, items: list[_Analysed], backend: FaceBackend) -> list[dict[str, str]]:
        warnings: list[dict[str, str]] = []
        good = [it for it in items if it.reject is None and it.embedding is not None]
        thr = backend.outlier_distance
        if len(good) >= 3:
            embs = np.stack([normalise(it.embedding) for it in good])
            median = np.median(embs, axis=0)
            dists = np.linalg.norm(embs - median, axis=1)
            for it, d in zip(good, dists):
                it.metrics["identity_distance"] = round(float(d), 3)
                if d > thr:
                    it.reject = _Reject("identity_outlier", (
                        f"{it.filename}: looks like a different person from the rest of the set "
                        f"(distance {d:.2f}, limit {thr:.2f}); upload photos of one person only"))
        elif len(good) == 2:
            d = float(np.linalg.norm(normalise(good[0].embedding) - normalise(good[1].embedding)))
            if d > thr:
                warnings.append({"code": "identity_uncertain", "message": (
                    f"{good[0].filename} and {good[1].filename} may show different people (distance {d:.2f}, "
                    f"limit {thr:.2f}); add more selfies so the odd one out can be found")})
        return warnings

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
