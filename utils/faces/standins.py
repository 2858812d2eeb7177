"""Tiny ONNX stand-ins for an InsightFace model pack, built with onnx.helper (no download, ~2 MB).

insightface's model_zoo routes every .onnx in a pack folder by its inputs/outputs, so these exercise the
real ``FaceAnalysis → prepare → get`` path:

- ``detector.onnx``: SCRFD layout, input 1×3×160×160, 9 outputs (score, bbox, kps for strides 8/16/32,
  two anchors per cell). One anchor in the image centre carries a score computed from the input — the
  sigmoid of the image's contrast (variance) — so a photo gives one face and a flat image none. Its box
  and five key points are fixed offsets around the centre.
- ``recognizer.onnx``: ArcFace layout, input 1×3×112×112, output 1×512: a fixed random projection of the
  mean-removed, 7×7-pooled aligned crop, summed with its mirror image so a flipped photo embeds the
  same; different images give different vectors.
- ``genderage.onnx``: InsightFace's attribute layout, input 1×3×96×96, output 1×3 (two gender logits and
  age / 100). The age is ``age`` (a build argument) plus up to ±5 years from the crop's mean brightness,
  so a test can build a pack whose faces look under age, and different photos get different estimates.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DET_SIZE = 160
STRIDES = (8, 16, 32)
ANCHORS = 2


def _const(name: str, arr: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(arr), name=name + "_v"))


def build_detector(path: Path) -> Path:
    nodes, outputs = [], []
    # Contrast of the input → one score in (0, 1): flat images stay below the 0.5 threshold.
    nodes += [
        helper.make_node("ReduceMean", ["input.1"], ["mu"], keepdims=1),
        helper.make_node("Sub", ["input.1", "mu"], ["centred"]),
        helper.make_node("Mul", ["centred", "centred"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["var"], keepdims=0),
        _const("gain", np.array(200.0, np.float32)), _const("bias", np.array(-3.0, np.float32)),
        helper.make_node("Mul", ["var", "gain"], ["v1"]),
        helper.make_node("Add", ["v1", "bias"], ["v2"]),
        helper.make_node("Sigmoid", ["v2"], ["score"]),
    ]
    score_names, bbox_names, kps_names = [], [], []
    centre = DET_SIZE / 2
    for stride in STRIDES:
        cells = (DET_SIZE // stride) ** 2
        n = cells * ANCHORS
        mask = np.zeros((n, 1), np.float32)
        if stride == 8:
            side = DET_SIZE // stride
            cy = cx = int(centre // stride)
            mask[(cy * side + cx) * ANCHORS, 0] = 1.0
        # Box 90 px around the anchor, key points of an upright frontal face (units of the stride).
        half = 45.0 / stride
        bbox = np.tile(np.array([[half, half * 1.1, half, half * 0.9]], np.float32), (n, 1))
        kps_px = np.array([[-16, -12], [16, -12], [0, 4], [-12, 20], [12, 20]], np.float32) / stride
        kps = np.tile(kps_px.reshape(1, 10), (n, 1))
        s_name, b_name, k_name = f"score_{stride}", f"bbox_{stride}", f"kps_{stride}"
        nodes += [_const(f"mask_{stride}", mask), helper.make_node("Mul", [f"mask_{stride}", "score"], [s_name]),
                  _const(b_name + "_c", bbox), helper.make_node("Identity", [b_name + "_c"], [b_name]),
                  _const(k_name + "_c", kps), helper.make_node("Identity", [k_name + "_c"], [k_name])]
        score_names.append((s_name, [n, 1]))
        bbox_names.append((b_name, [n, 4]))
        kps_names.append((k_name, [n, 10]))
    for name, shape in score_names + bbox_names + kps_names:
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    graph = helper.make_graph(nodes, "scrfd_standin",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, DET_SIZE, DET_SIZE])],
                              outputs)
    return _save(graph, path)


def build_recognizer(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    pooled = 3 * 16 * 16
    proj = (rng.standard_normal((pooled, 512)) / np.sqrt(pooled)).astype(np.float32)
    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["pool"], kernel_shape=[7, 7], strides=[7, 7]),
        _const("starts", np.array([-1], np.int64)), _const("ends", np.array([-(2 ** 62)], np.int64)),
        _const("axes", np.array([3], np.int64)), _const("steps", np.array([-1], np.int64)),
        helper.make_node("Slice", ["pool", "starts", "ends", "axes", "steps"], ["mirror"]),
        helper.make_node("Add", ["pool", "mirror"], ["sym"]),
        helper.make_node("ReduceMean", ["sym"], ["sym_mu"], keepdims=1),
        helper.make_node("Sub", ["sym", "sym_mu"], ["sym_c"]),
        helper.make_node("Flatten", ["sym_c"], ["flat"], axis=1),
        _const("proj", proj),
        helper.make_node("MatMul", ["flat", "proj"], ["fc1"]),
    ]
    graph = helper.make_graph(nodes, "arcface_standin",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 112, 112])],
                              [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, 512])])
    return _save(graph, path)


def build_genderage(path: Path, age: float = 35.0) -> Path:
    """insightface routes a 96×96-input model with one [1, 3] output to its genderage Attribute model."""
    nodes = [
        helper.make_node("ReduceMean", ["data"], ["mu"], keepdims=1),            # crop brightness, ~[-1, 1]
        _const("shape", np.array([1, 1], np.int64)),
        helper.make_node("Reshape", ["mu", "shape"], ["mu2"]),
        _const("gain", np.array([[1.0, -1.0, 0.05]], np.float32)),
        _const("base", np.array([[0.0, 0.0, age / 100.0]], np.float32)),
        helper.make_node("Mul", ["mu2", "gain"], ["scaled"]),
        helper.make_node("Add", ["scaled", "base"], ["fc1"]),
    ]
    graph = helper.make_graph(nodes, "genderage_standin",
                              [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 96, 96])],
                              [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, 3])])
    return _save(graph, path)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build_pack(folder: Path, *, age: float | None = 35.0) -> Path:
    """A pack folder FaceAnalysis accepts: one detector, one recognizer and (unless ``age`` is None) one
    genderage model whose faces look about ``age`` years old."""
    folder = Path(folder)
    build_detector(folder / "detector.onnx")
    build_recognizer(folder / "recognizer.onnx")
    if age is not None:
        build_genderage(folder / "genderage.onnx", age)
    return folder


# The real antelopev2 pack's file names: the detector, the recognizer and the age / gender model (the
# pack's landmark models, 1k3d68 / 2d106det, are not loaded: not in InsightFaceBackend's allowed_modules).
ANTELOPEV2_FILES = ("scrfd_10g_bnkps.onnx", "glintr100.onnx", "genderage.onnx")


def build_antelopev2_pack(folder: Path) -> Path:
    """A stand-in ``antelopev2`` pack: the real file names, SCRFD / ArcFace (512-d) / genderage I/O, tiny graphs."""
    folder = Path(folder)
    build_detector(folder / ANTELOPEV2_FILES[0])
    build_recognizer(folder / ANTELOPEV2_FILES[1], seed=2)
    build_genderage(folder / ANTELOPEV2_FILES[2])
    return folder
