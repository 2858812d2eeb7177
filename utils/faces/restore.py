"""Face restoration: GFPGAN 1.4, CodeFormer or GPEN-BFR-512 as ONNX models, run with onnxruntime.

Why ONNX: the ``gfpgan`` / ``basicsr`` packages do not import on current torchvision, and spandrel needs
torchvision, which does not load beside this project's CPU torch (DESIGN.md §3). The public exports
(FaceFusion's ``models-3.0.0`` release, `python model_loader.py download --restore NAME`) take one
aligned 512×512 RGB face, NCHW float32 in [-1, 1], and return the same; CodeFormer also takes a
fidelity weight (0 = most restoration, 1 = closest to the input).

Per face (every face the backend finds, not only the largest):
1. ``alignment_matrix``: a similarity transform from the backend's key points to the FFHQ 512 template
   (``cv2.estimateAffinePartial2D`` with LMEDS on InsightFace's 5 points; dlib has no mouth corners and
   its fifth point is the bottom of the nose, not the tip the template marks, so with dlib the two eye
   centres fix the transform exactly);
2. ``warp_face``: the aligned crop, grey outside the photo;
3. the model, ``[-1, 1]`` in and out (``to_model_input`` / ``from_model_output``; mixing the range up
   gives grey noise);
4. ``paste_back``: warp back with the inverted transform and blend through the warped square, eroded
   and Gaussian-feathered (edge width ≈ sqrt(face area) / 20), so no seam shows and no pixel outside
   the mask changes.

``write_standin`` builds tiny ONNX stand-ins with the real input/output names and shapes (the tiny
profile and the tests run the whole path offline with them).
"""
from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from utils.errors import InvalidRequest, ModelWeightsMissing
from utils.faces.backends import Detection

log = logging.getLogger(__name__)

# FFHQ 512 alignment template (left eye, right eye, nose tip, left / right mouth corner; image
# coordinates, "left" = smaller x), the one GFPGAN / CodeFormer / GPEN were trained on (DESIGN.md §3).
FFHQ_512 = np.array([[192.98138, 239.94708], [318.90277, 240.19360], [256.63416, 314.01935],
                     [201.26117, 371.41043], [313.08905, 371.15118]], dtype=np.float32)
# Outside the photo the aligned crop is this grey (facexlib's value), not black: black borders make
# the models draw dark halos into the face's edge.
BORDER_GREY = (135, 133, 132)
RESTORE_REPO = "facefusion/models-3.0.0"   # Hugging Face repo of FaceFusion's ONNX exports


@dataclass(frozen=True)
class RestoreModelSpec:
    name: str
    filename: str
    has_fidelity: bool
    licence: str
    size: int = 512


RESTORE_MODELS: dict[str, RestoreModelSpec] = {
    "gfpgan": RestoreModelSpec("gfpgan", "gfpgan_1.4.onnx", False, "Apache-2.0 (TencentARC GFPGAN 1.4)"),
    "codeformer": RestoreModelSpec("codeformer", "codeformer.onnx", True, "S-Lab 1.0, non-commercial (CodeFormer)"),
    "gpen": RestoreModelSpec("gpen", "gpen_bfr_512.onnx", False, "non-commercial (GPEN-BFR-512)"),
}


def download_command(name: str, model_dir: Path | str | None = None) -> str:
    target = f" --dir {model_dir}" if model_dir else ""
    return f"python model_loader.py download --restore {name}{target}"


# --------------------------------------------------------------------------------------------------
# Geometry (pure functions, tested directly)
def template(size: int = 512) -> np.ndarray:
    return FFHQ_512 * (size / 512.0)


def detection_points(det: Detection, size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(points in the photo, the matching template points) for one detection."""
    tpl = template(size)
    if det.kps is not None and len(det.kps) >= 5:
        return np.asarray(det.kps, dtype=np.float32)[:5], tpl
    # dlib: eye centres only (see the module doc).
    return np.asarray([det.left_eye, det.right_eye], dtype=np.float32), tpl[:2]


def similarity_lstsq(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src onto dst, 2×3."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    n = len(src)
    a = np.zeros((2 * n, 4))
    a[0::2] = np.c_[src[:, 0], -src[:, 1], np.ones(n), np.zeros(n)]
    a[1::2] = np.c_[src[:, 1], src[:, 0], np.zeros(n), np.ones(n)]
    (p, q, tx, ty), *_ = np.linalg.lstsq(a, dst.reshape(-1), rcond=None)
    return np.array([[p, -q, tx], [q, p, ty]], dtype=np.float64)


def alignment_matrix(points: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2×3 similarity transform taking the photo's key points to the template."""
    import cv2

    points = np.asarray(points, dtype=np.float32)
    dst = np.asarray(dst, dtype=np.float32)
    if len(points) >= 4:
        # LMEDS as the reference tools: one badly placed point (a mouth corner under a hand) is ignored.
        # With 2-3 points every pair fits exactly, so the median is 0 for any pair: least squares instead.
        m, _ = cv2.estimateAffinePartial2D(points, dst, method=cv2.LMEDS)
        if m is not None:
            return m.astype(np.float64)
    return similarity_lstsq(points, dst)


def warp_face(rgb: np.ndarray, matrix: np.ndarray, size: int = 512) -> np.ndarray:
    import cv2

    return cv2.warpAffine(rgb, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=BORDER_GREY)


def paste_back(rgb: np.ndarray, face: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blend ``face`` (the aligned crop, restored) back into ``rgb``; returns (image, soft mask [h, w]).

    Only the bounding box of the warped-back square is touched, and inside it only where the soft mask
    is > 0: pixels outside the mask come back bit-identical.
    """
    import cv2

    h, w = rgb.shape[:2]
    size = face.shape[0]
    inv = cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], dtype=np.float64) @ inv.T
    x0, y0 = (max(0, int(math.floor(v)) - 2) for v in corners.min(axis=0))
    x1, y1 = min(w, int(math.ceil(corners[:, 0].max())) + 2), min(h, int(math.ceil(corners[:, 1].max())) + 2)
    mask_full = np.zeros((h, w), dtype=np.float32)
    if x1 <= x0 or y1 <= y0:
        return rgb.copy(), mask_full
    shift = inv.copy()
    shift[:, 2] -= (x0, y0)
    rw, rh = x1 - x0, y1 - y0
    pasted = cv2.warpAffine(face, shift, (rw, rh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                            borderValue=(0, 0, 0)).astype(np.float32)
    mask = cv2.warpAffine(np.ones((size, size), np.float32), shift, (rw, rh), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    # Drop the interpolated rim (it blends with the black border of ``pasted``), then erode and feather
    # by an edge proportional to the face: the blur never reaches past the eroded rim.
    mask = cv2.erode((mask >= 0.999).astype(np.float32), np.ones((3, 3), np.uint8))
    edge = max(1, int(math.sqrt(float(mask.sum()))) // 20)
    mask = cv2.erode(mask, np.ones((2 * edge + 1, 2 * edge + 1), np.uint8))
    soft = cv2.GaussianBlur(mask, (2 * edge + 1, 2 * edge + 1), 0) if edge > 0 else mask
    soft = np.clip(soft, 0.0, 1.0)
    roi = rgb[y0:y1, x0:x1].astype(np.float32)
    blended = soft[..., None] * pasted + (1.0 - soft[..., None]) * roi
    out = rgb.copy()
    region = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    keep = soft <= 0
    region[keep] = rgb[y0:y1, x0:x1][keep]   # bit-identical outside the mask, whatever the float rounding
    out[y0:y1, x0:x1] = region
    mask_full[y0:y1, x0:x1] = soft
    return out, mask_full


# --------------------------------------------------------------------------------------------------
# Value range
def to_model_input(face: np.ndarray) -> np.ndarray:
    """uint8 RGB HWC -> float32 NCHW in [-1, 1] (what the ONNX exports were trained on)."""
    x = face.astype(np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def from_model_output(y: np.ndarray) -> np.ndarray:
    """float NCHW (or CHW) in [-1, 1] -> uint8 RGB HWC."""
    y = np.asarray(y, dtype=np.float32)
    if y.ndim == 4:
        y = y[0]
    y = np.clip(y, -1.0, 1.0)
    return np.clip(np.rint((y + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(1, 2, 0).copy()


class OnnxRestoreModel:
    """One ONNX restoration model. The image input is the one 4-D input (exports name it ``input``); a
    further input is CodeFormer's fidelity weight (``weight``, double [1] in FaceFusion's export).
    The first output is the restored face (exports differ in its name). Thread-safe (ORT's run is)."""

    def __init__(self, path: Path, providers: Sequence[str] | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        available = ort.get_available_providers()
        providers = list(providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available])
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        except Exception as exc:  # noqa: BLE001 - a truncated / wrong file
            raise ModelWeightsMissing(f"face restoration model {self.path} could not be loaded "
                                      f"({type(exc).__name__}); download it again", code="restore_model_invalid") from None
        inputs = self.session.get_inputs()
        images = [i for i in inputs if len(i.shape) == 4]
        if len(images) != 1:
            raise ModelWeightsMissing(
                f"{self.path} is not a face restoration model: expected one 4-D image input, found "
                f"{[(i.name, list(i.shape)) for i in inputs]}", code="restore_model_invalid")
        self.image_input = images[0].name
        side = images[0].shape[-1]
        self.size = side if isinstance(side, int) and side > 0 else 512
        extra = [i for i in inputs if i.name != self.image_input]
        self.weight_input = extra[0].name if extra else None
        self.weight_dtype = np.float64 if extra and "double" in extra[0].type else np.float32
        self.weight_shape = [d if isinstance(d, int) else 1 for d in extra[0].shape] if extra else []
        self.output = self.session.get_outputs()[0].name
        self.providers = self.session.get_providers()

    @property
    def has_fidelity(self) -> bool:
        return self.weight_input is not None

    def __call__(self, face: np.ndarray, fidelity: float = 0.5) -> np.ndarray:
        feeds = {self.image_input: to_model_input(face)}
        if self.weight_input is not None:
            feeds[self.weight_input] = np.full(self.weight_shape, fidelity, dtype=self.weight_dtype)
        return from_model_output(self.session.run([self.output], feeds)[0])


@dataclass
class RestoreResult:
    image: Image.Image
    faces: int                      # faces restored
    mask: np.ndarray                # union of the soft masks, [h, w] in [0, 1]


def restore_faces(image: Image.Image, detections: Sequence[Detection], model: OnnxRestoreModel, *,
                  fidelity: float = 0.5) -> RestoreResult:
    """Restore every detected face of ``image`` (largest first, so a small face overlapping a big one
    is pasted last and keeps its own restoration)."""
    rgb = np.asarray(image.convert("RGB")).copy()
    union = np.zeros(rgb.shape[:2], dtype=np.float32)
    dets = sorted(detections, key=lambda d: -(d.width * d.height))
    for det in dets:
        src, dst = detection_points(det, model.size)
        m = alignment_matrix(src, dst)
        face = warp_face(rgb, m, model.size)
        restored = model(face, fidelity)
        rgb, mask = paste_back(rgb, restored, m)
        np.maximum(union, mask, out=union)
    return RestoreResult(image=Image.fromarray(rgb), faces=len(dets), mask=union)


# --------------------------------------------------------------------------------------------------
class FaceRestorer:
    """The service's restoration step: model files from a folder, sessions loaded once per model.

    ``folder`` is ``TWIN_RESTORE_MODEL_DIR`` (default ``<model_dir>/face_restore``); with the tiny
    profile it is the tiny model folder's ``face_restore`` and missing stand-ins are written on demand
    (``standins=True``), so the offline demo runs the real path.
    """

    def __init__(self, folder: Path, *, standins: bool = False, providers: Sequence[str] | None = None,
                 model_dir_hint: Path | None = None) -> None:
        self.folder = Path(folder)
        self.standins = standins
        self.providers = providers
        self.model_dir_hint = model_dir_hint
        self._models: dict[str, OnnxRestoreModel] = {}
        self._lock = threading.Lock()

    def path(self, name: str) -> Path:
        return self.folder / RESTORE_MODELS[name].filename

    def check(self, name: str) -> Path:
        """The model file, or InvalidRequest (400) naming the file and the download command."""
        if name not in RESTORE_MODELS:
            raise InvalidRequest(f"restore_model={name!r} is not one of {', '.join(RESTORE_MODELS)}")
        p = self.path(name)
        if not p.is_file() and self.standins:
            write_standin(p, name)
        if not p.is_file():
            raise InvalidRequest(
                f"restore_model={name!r} needs {p}, which is missing; fetch it on a connected machine with: "
                f"{download_command(name, self.model_dir_hint)} (or set TWIN_RESTORE_MODEL_DIR to its folder)",
                code="restore_model_missing", details={"file": str(p), "command": download_command(name, self.model_dir_hint)})
        return p

    def model(self, name: str) -> OnnxRestoreModel:
        with self._lock:
            m = self._models.get(name)
            if m is None:
                m = OnnxRestoreModel(self.check(name), self.providers)
                self._models[name] = m
                log.info("face restoration model %s loaded from %s (%s)", name, m.path, ",".join(m.providers))
            return m

    def restore(self, image: Image.Image, detections: Sequence[Detection], *, model: str,
                fidelity: float = 0.5) -> RestoreResult:
        return restore_faces(image, detections, self.model(model), fidelity=fidelity)


# --------------------------------------------------------------------------------------------------
# ONNX stand-ins (tiny profile, tests): the real names and shapes, a cheap computation in [-1, 1].
def write_standin(path: Path, name: str, *, kind: str = "sharpen", size: int = 512) -> Path:
    """A stand-in for ``name`` with its export's interface: ``input`` float32 [1, 3, size, size]
    (plus ``weight`` double [1] for CodeFormer) -> ``output`` float32 [1, 3, size, size].

    ``kind="sharpen"``: an unsharp mask, clipped to [-1, 1] (a visible, face-local change, like a real
    model's added detail; CodeFormer's weight scales it down towards the input as fidelity → 1).
    ``kind="identity"``: output = clip(input, -1, 1) — gives the face back only if the caller keeps the
    [-1, 1] range both ways.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    spec = RESTORE_MODELS[name]
    nodes: list = []

    def const(n: str, arr: np.ndarray) -> None:
        nodes.append(helper.make_node("Constant", [], [n], value=numpy_helper.from_array(np.asarray(arr), name=n + "_v")))

    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])]
    const("lo", np.array(-1.0, np.float32))
    const("hi", np.array(1.0, np.float32))
    if kind == "identity":
        nodes.append(helper.make_node("Clip", ["input", "lo", "hi"], ["output"]))
    elif kind == "sharpen":
        nodes += [helper.make_node("AveragePool", ["input"], ["blur"], kernel_shape=[5, 5], pads=[2, 2, 2, 2],
                                   count_include_pad=0),
                  helper.make_node("Sub", ["input", "blur"], ["detail"])]
        const("amount", np.array(1.5, np.float32))
        if spec.has_fidelity:
            # amount × (1 - weight): fidelity 1 returns the input.
            const("one", np.array(1.0, np.float32))
            nodes += [helper.make_node("Cast", ["weight"], ["w32"], to=TensorProto.FLOAT),
                      helper.make_node("Sub", ["one", "w32"], ["keep"]),
                      helper.make_node("Mul", ["amount", "keep"], ["gain"])]
            gain = "gain"
        else:
            gain = "amount"
        nodes += [helper.make_node("Mul", ["detail", gain], ["boost"]),
                  helper.make_node("Add", ["input", "boost"], ["sharp"]),
                  helper.make_node("Clip", ["sharp", "lo", "hi"], ["output"])]
    else:
        raise ValueError(f"kind={kind!r}; expected sharpen or identity")
    if spec.has_fidelity:
        inputs.append(helper.make_tensor_value_info("weight", TensorProto.DOUBLE, [1]))
    graph = helper.make_graph(nodes, f"{name}_standin", inputs,
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, size, size])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    onnx.save(model, str(tmp))
    tmp.replace(path)   # a reader never sees half a file (two processes may write the stand-in at once)
    return path


def write_standins(folder: Path) -> list[Path]:
    return [write_standin(Path(folder) / spec.filename, name) for name, spec in RESTORE_MODELS.items()]
