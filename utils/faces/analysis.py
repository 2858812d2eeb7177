"""One selfie checked on its own: ``analyse_photo`` and the measurements it makes (``FaceService`` runs it
per file, then checks the set: utils/faces/service.py).

The photo is decoded only as large as detection needs (``backend.decode_side``; a 12 MP JPEG at 1/4
scale), and the face's part of it again at a finer scale when the face is smaller there than the
sharpness measure and the aligned crop use (``face_need``). So every measurement sees the pixels it saw
at full resolution, only downscaled to what it would downscale them to anyway:
- face_px is reported in the original photo's pixels (box side x ``factor``), so min_face_px means what
  it meant; face_fraction, brightness and yaw are ratios or means;
- sharpness resizes the face box to SHARPNESS_SIDE px: from a view where the box is at least that
  large, as it was from the full photo (or the full photo itself when the face is smaller);
- the aligned crop and the descriptor's chip downscale the face from at least face_crop_size /
  face_crop_scale px, as before, so they are as sharp as from the full photo.
tests/test_faces_reduced.py checks the verdicts against the full-resolution path.

Biometric data (pixels, crops, embeddings) never reaches a log line or an error message.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from utils.config import Settings
from utils.errors import ImageRejected
from utils.faces.backends import Detection, FaceBackend
from utils.images import ReducedImage, decode_reduced

log = logging.getLogger(__name__)

#: Longest side of the small upright copy an accepted selfie keeps (the photo itself is not kept).
PREVIEW_SIDE = 256
#: Side the face box is resized to before its sharpness is measured (``face_sharpness``).
SHARPNESS_SIDE = 128


class Reject(Exception):
    """Why one photo cannot be used: a code for clients and a sentence for the user."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class Analysed:
    """What the session keeps of one photo (never the decoded photo itself), or why it was rejected."""
    index: int
    filename: str
    preview: Image.Image | None = None
    size: tuple[int, int] = (0, 0)
    thumb: np.ndarray | None = None
    crop: Image.Image | None = None
    embedding: np.ndarray | None = None
    warnings: list[dict[str, str]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    reject: Reject | None = None
    embedding_norm: float | None = None
    kps: np.ndarray | None = None
    crop_kps: np.ndarray | None = None
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


def crop_matrix(det: Detection, *, size: int, scale: float) -> np.ndarray:
    """The 2x3 similarity that ``aligned_crop`` applies: image pixels of ``det``'s photo -> crop pixels."""
    import cv2

    le, re = np.asarray(det.left_eye), np.asarray(det.right_eye)
    angle = math.degrees(math.atan2(re[1] - le[1], re[0] - le[0]))
    cx, cy = (det.box[0] + det.box[2]) / 2, (det.box[1] + det.box[3]) / 2
    side = max(det.width, det.height) * scale
    m = cv2.getRotationMatrix2D((cx, cy), angle, size / side)
    m[0, 2] += size / 2 - cx
    m[1, 2] += size / 2 - cy
    return m


def aligned_crop(rgb: np.ndarray, det: Detection, *, size: int, scale: float) -> Image.Image:
    """Square crop around the face, rotated so the eye line is level, ``scale`` × the face box side,
    resized to ``size``; parts outside the photo repeat the edge pixels."""
    import cv2

    side = max(det.width, det.height) * scale
    out = cv2.warpAffine(rgb, crop_matrix(det, size=size, scale=scale), (size, size),
                         flags=cv2.INTER_AREA if side > size else cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return Image.fromarray(out)


def crop_keypoints(det: Detection, *, size: int, scale: float) -> np.ndarray | None:
    """``det``'s 5 key points in its aligned crop's pixels (None without key points): what an identity
    method that aligns its own face chip from the crop needs (InfiniteYou's 112 px ArcFace crop)."""
    if det.kps is None:
        return None
    m = crop_matrix(det, size=size, scale=scale)
    k = np.asarray(det.kps, dtype=np.float64).reshape(5, 2)
    return (k @ m[:, :2].T + m[:, 2]).astype(np.float32)


def face_need(settings: Settings) -> float:
    """Face box side, px, from which the sharpness measure and the aligned crop only downscale."""
    return max(SHARPNESS_SIDE, settings.face_crop_size / settings.face_crop_scale)


# --------------------------------------------------------------------------------------------------
# The per-photo analysis
@dataclass
class _Face:
    """The photo's one face, at the scale its checks use."""
    det: Detection        # as detected on the reduced photo (carries embedding_norm, kps, age)
    view: np.ndarray      # the pixels measured: the reduced photo, or the face's part of it decoded finer
    vdet: Detection       # ``det`` in ``view``'s pixels
    side: float           # the box's shorter side in the original photo's pixels
    fraction: float       # the box's share of the photo's area
    yaw: float
    sharpness: float = 0.0
    brightness: float = 0.0


def analyse_photo(backend: FaceBackend, settings: Settings, index: int, filename: str, data: bytes) -> Analysed:
    """Check one photo (see the module docstring), keeping only what the session needs: crop,
    embedding, preview, signature. A rejection is recorded in the result, never raised."""
    item = Analysed(index=index, filename=filename)
    try:
        face = _locate_face(backend, settings, item, data)  # the decoded photo is dropped on its return
        _measure(face, item)
        _check_quality(settings, filename, face)
        _keep_identity(backend, settings, face, item)
    except Reject as rej:
        # Its traceback would keep the frames, and with them the decoded photo, alive as long as the report.
        item.reject = rej.with_traceback(None)
    except Exception as exc:  # one odd file must not fail the whole upload with a 500
        log.warning("selfie %d could not be analysed (%s)", index, type(exc).__name__)
        item.reject = Reject("analysis_failed", f"{filename}: the photo could not be analysed; try another one")
    return item


def _locate_face(backend: FaceBackend, settings: Settings, item: Analysed, data: bytes) -> _Face:
    """Decode, keep the preview and signature, find the one face and the view its checks measure."""
    filename = item.filename
    try:
        photo = decode_reduced(data, filename, max_pixels=settings.max_pixels, min_side=backend.decode_side)
    except ImageRejected as exc:
        raise Reject(exc.code, exc.message) from None
    image, k = photo.image, photo.factor
    item.size = photo.size
    item.thumb = image_signature(image)
    ratio = min(1.0, PREVIEW_SIDE / max(image.size))
    item.preview = image.resize((max(1, round(image.width * ratio)), max(1, round(image.height * ratio))),
                                Image.BILINEAR)
    rgb = np.asarray(image)
    dets = backend.detect(rgb)
    if not dets:
        raise Reject("no_face", f"{filename}: no face was found; use a photo where your face is clearly visible")
    if len(dets) > 1:
        raise Reject("multiple_faces", f"{filename}: {len(dets)} faces were found; use photos with only you in them")
    det = dets[0]
    h, w = rgb.shape[:2]
    side = min(det.width, det.height) * k          # in the original photo's pixels
    fraction = det.width * det.height / float(w * h)
    view, vdet = rgb, det
    need = face_need(settings)
    if k > 1 and min(det.width, det.height) < need:
        view, vdet = _finer_view(backend, photo, det, side, need, settings.face_crop_scale)
    return _Face(det, view, vdet, side, fraction, estimate_yaw(vdet.left_eye, vdet.right_eye, vdet.nose))


def _finer_view(backend: FaceBackend, photo: ReducedImage, det: Detection, side: float, need: float,
                crop_scale: float) -> tuple[np.ndarray, Detection]:
    """The face is small at the reduced scale: its part of the photo decoded at the coarsest scale that
    keeps ``need`` px (full resolution when the face is smaller than that), and ``det`` moved into it."""
    k = photo.factor
    half = max(det.width, det.height) * k * crop_scale * 0.75  # > crop half-diagonal
    cx, cy = (det.box[0] + det.box[2]) / 2 * k, (det.box[1] + det.box[3]) / 2 * k
    part, (ox, oy), f = photo.region((cx - half, cy - half, cx + half, cy + half), max(1, int(side // need)))
    view = np.asarray(part)

    def moved(p) -> tuple[float, float]:
        return (p[0] * k - ox) / f, (p[1] * k - oy) / f

    x0, y0 = moved(det.box[:2])
    x1, y1 = moved(det.box[2:])
    return view, backend.relocate(view, Detection(
        box=(x0, y0, x1, y1), score=det.score, left_eye=moved(det.left_eye),
        right_eye=moved(det.right_eye), nose=moved(det.nose), embedding=det.embedding))


def _measure(face: _Face, item: Analysed) -> None:
    face.sharpness = face_sharpness(face.view, face.vdet.box)
    face.brightness = face_brightness(face.view, face.vdet.box)
    # Recorded before the checks, so that a rejected photo reports them too.
    item.metrics = {"face_px": round(face.side, 1), "face_fraction": round(face.fraction, 4),
                    "sharpness": round(face.sharpness, 1), "brightness": round(face.brightness, 1),
                    "yaw_degrees": round(face.yaw, 1)}


def _check_quality(s: Settings, filename: str, face: _Face) -> None:
    side, fraction, bright, sharp, yaw = face.side, face.fraction, face.brightness, face.sharpness, face.yaw
    if side < s.min_face_px or fraction < s.min_face_fraction:
        raise Reject("face_too_small", (
            f"{filename}: the face is too small ({side:.0f} px, {fraction:.1%} of the photo; need at least "
            f"{s.min_face_px} px and {s.min_face_fraction:.0%}); move closer or use a larger photo"))
    # Exposure before sharpness: a dark face has little contrast, hence a low Laplacian variance,
    # and "too dark" is the reason the user can act on.
    if bright < s.min_brightness:
        raise Reject("too_dark", f"{filename}: the face is too dark (brightness {bright:.0f}, need at least "
                                 f"{s.min_brightness:.0f}); use more light")
    if bright > s.max_brightness:
        raise Reject("too_bright", f"{filename}: the face is overexposed (brightness {bright:.0f}, at most "
                                   f"{s.max_brightness:.0f}); avoid direct light or flash")
    if sharp < s.min_sharpness:
        raise Reject("blurry", f"{filename}: the face is blurry (sharpness {sharp:.0f}, need {s.min_sharpness:.0f}); "
                               "hold the camera still and focus on your face")
    if abs(yaw) > s.max_yaw_degrees:
        raise Reject("not_frontal", f"{filename}: the head is turned too far (about {abs(yaw):.0f}°, at most "
                                    f"{s.max_yaw_degrees:.0f}°); look towards the camera")


def _keep_identity(backend: FaceBackend, s: Settings, face: _Face, item: Analysed) -> None:
    """The embedding, ArcFace extras and aligned crop of an accepted photo."""
    # Embedded here, in the worker, so that one thread's descriptor overlaps another's detection
    # (a duplicate costs one extra descriptor, ~10 ms with the torch engine).
    item.embedding = np.asarray(backend.embed_prepared([backend.prepare_embedding(face.view, face.vdet)])[0],
                                dtype=np.float32)
    det = face.det
    item.embedding_norm, item.kps, item.apparent_age = det.embedding_norm, det.kps, det.age
    item.crop = aligned_crop(face.view, face.vdet, size=s.face_crop_size, scale=s.face_crop_scale)
    # From ``det`` (the reduced photo), whose box and key points are the view's up to one uniform scale and
    # shift, so the crop frame is the same (the view's detection carries no key points of its own).
    item.crop_kps = crop_keypoints(det, size=s.face_crop_size, scale=s.face_crop_scale)
    if face.side * s.face_crop_scale < s.face_crop_size / 2:
        item.warnings.append({"code": "low_resolution", "message": (
            f"{item.filename}: the face is only {face.side:.0f} px wide; a closer or larger photo gives a sharper likeness")})
