"""Pose control from the selfies: 5 face keypoints laid out in the output frame and drawn as a control image.

Used by the identity methods that take a keypoint image (InstantID's IdentityNet; InfiniteYou's InfuseNet).
The image is a keypoint image (``draw_kps``) of 5 face points (eyes, nose,
mouth corners) in the output frame. ``pose`` picks where they come from: a preset, the keypoints of one
accepted selfie re-placed in the frame (``selfie:N``), or ``auto`` (a frontal layout with the person's own
proportions, from the average of the selfies). Keypoints are geometry, not biometric embeddings; they are
still never logged.
"""
from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from utils.errors import InvalidRequest

# RGB colours of points 0-4 (left eye, right eye, nose, left mouth corner, right mouth corner), as InstantID.
KPS_COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
KPS_LIMBS = [(0, 2), (1, 2), (3, 2), (4, 2)]   # each point to the nose, in the colour of the first
STICK_HALF_WIDTH = 4
POINT_RADIUS = 10

POSE_PRESETS = ("frontal", "three_quarter_left", "three_quarter_right", "tilt_left", "tilt_right",
                "look_up", "look_down")
POSE_CHOICES = ("auto",) + POSE_PRESETS + ("selfie:N",)
POSE_STRENGTH_RANGE = (0.0, 1.5)
_SELFIE = re.compile(r"selfie:(\d{1,6})")

# ArcFace's 112 px alignment template (same point order as InsightFace's kps).
_ARCFACE_112 = np.array([(38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366), (41.5493, 92.3655),
                         (70.7299, 92.2041)], dtype=np.float64)
# Depth of each point towards the camera, in eye-distance units, for turning the frontal layout in 3-D
# (nose tip in front of the eyes, mouth corners a little): rough head-model values, enough for a pose cue.
_DEPTH = np.array([0.0, 0.0, 0.55, 0.15, 0.15])
# Where a face sits in the output frame: keypoint centroid at (0.5 W, 0.45 H); eye distance 0.16 of the
# shorter side (a head-and-shoulders portrait, as in InstantID's examples).
FRAME_CENTRE = (0.5, 0.45)
FRAME_EYE_DISTANCE = 0.16


def _centre(kps: np.ndarray) -> np.ndarray:
    return kps - kps.mean(axis=0, keepdims=True)


def _frontal() -> np.ndarray:
    k = _ARCFACE_112 / np.linalg.norm(_ARCFACE_112[1] - _ARCFACE_112[0])
    return _centre(k)


def _rms(kps: np.ndarray) -> float:
    return float(np.sqrt((_centre(kps) ** 2).sum(axis=1).mean()))


def _rotate(kps: np.ndarray, degrees: float) -> np.ndarray:
    # Image coordinates (y down): a positive angle turns the face clockwise on screen.
    a = math.radians(degrees)
    r = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return kps @ r.T


def _turn(kps: np.ndarray, yaw: float = 0.0, pitch: float = 0.0) -> np.ndarray:
    """Turn a frontal layout in 3-D (yaw < 0: the face looks towards the image's left; pitch > 0: up)."""
    x, y, z = kps[:, 0], kps[:, 1], _DEPTH.copy()
    a = math.radians(yaw)
    x, z = x * math.cos(a) + z * math.sin(a), -x * math.sin(a) + z * math.cos(a)
    b = math.radians(pitch)
    y = y * math.cos(b) - z * math.sin(b)
    return _centre(np.stack([x, y], axis=1))


def preset_layout(name: str) -> np.ndarray:
    """[5, 2] keypoints of a preset, centred, in units of the frontal eye distance."""
    f = _frontal()
    layouts = {
        "frontal": lambda: f,
        "three_quarter_left": lambda: _turn(f, yaw=-35.0),
        "three_quarter_right": lambda: _turn(f, yaw=35.0),
        "tilt_left": lambda: _rotate(f, -15.0),
        "tilt_right": lambda: _rotate(f, 15.0),
        "look_up": lambda: _turn(f, pitch=20.0),
        "look_down": lambda: _turn(f, pitch=-20.0),
    }
    if name not in layouts:
        raise InvalidRequest(f"pose={name!r} is not one of {', '.join(POSE_CHOICES)}")
    return layouts[name]()


def normalise_selfie_kps(kps: Any) -> np.ndarray:
    """A selfie's 5 keypoints (image pixels) -> centred layout with the frontal template's size, keeping
    its roll and its yaw/pitch asymmetry (so ``selfie:N`` replays that selfie's pose, not its framing)."""
    k = np.asarray(kps, dtype=np.float64).reshape(5, 2)
    size = _rms(k)
    if not np.all(np.isfinite(k)) or size <= 0:
        raise InvalidRequest("face keypoints are degenerate")
    return _centre(k) * (_rms(_frontal()) / size)


def auto_layout(selfie_layouts: np.ndarray | None) -> np.ndarray:
    """Frontal layout with the set's own proportions: each selfie's layout de-rolled (eye line level),
    averaged, then made left-right symmetric (the average of it and its mirror image)."""
    if selfie_layouts is None or len(selfie_layouts) == 0:
        return _frontal()
    level = []
    for k in np.asarray(selfie_layouts, dtype=np.float64):
        d = k[1] - k[0]
        level.append(_rotate(k, -math.degrees(math.atan2(d[1], d[0]))))
    mean = np.mean(level, axis=0)
    mirror = mean[[1, 0, 2, 4, 3]] * np.array([-1.0, 1.0])
    return _centre((mean + mirror) / 2)


def parse_pose(value: Any) -> str:
    """Syntax check at request time (the selfie index is checked against the session in ``resolve_pose``)."""
    if not isinstance(value, str):
        raise InvalidRequest(f"pose={value!r} must be a string: one of {', '.join(POSE_CHOICES)}")
    if value == "auto" or value in POSE_PRESETS or _SELFIE.fullmatch(value):
        return value
    raise InvalidRequest(f"pose={value!r} is not one of {', '.join(POSE_CHOICES)} "
                         "(N: the index of an accepted selfie in the upload report)")


def check_selfie_pose(pose: str, indices: list[int]) -> None:
    """``pose="selfie:N"`` must name one of ``indices`` (the accepted selfies that have face key points)."""
    m = _SELFIE.fullmatch(pose)
    if m and int(m.group(1)) not in indices:
        have = ", ".join(f"selfie:{i}" for i in indices) or "none (this session has no face keypoints)"
        raise InvalidRequest(f"pose={pose!r}: no accepted selfie with index {m.group(1)} in this session; "
                             f"available: {have}")


def resolve_pose(pose: str, keypoints: Any = None, indices: Any = None) -> np.ndarray:
    """Centred layout for a request's pose. ``keypoints``: [K, 5, 2] normalised selfie layouts of the
    session; ``indices``: their upload-report indices."""
    m = _SELFIE.fullmatch(pose)
    if m:
        idx = [int(i) for i in (indices if indices is not None else [])] if keypoints is not None else []
        check_selfie_pose(pose, idx)
        return np.asarray(keypoints[idx.index(int(m.group(1)))], dtype=np.float64)
    if pose == "auto":
        return auto_layout(keypoints)
    return preset_layout(pose)


def place(layout: np.ndarray, width: int, height: int) -> np.ndarray:
    """Centred layout (eye-distance units) -> pixel keypoints in a width x height frame."""
    scale = FRAME_EYE_DISTANCE * min(width, height)
    return layout * scale + np.array([FRAME_CENTRE[0] * width, FRAME_CENTRE[1] * height])


def draw_kps(width: int, height: int, kps: Any):
    """InstantID's keypoint image: black canvas; a filled ellipse from each of eye, eye, mouth corner,
    mouth corner to the nose (half-length of the limb, half-width 4 px) in the colour of its first point;
    the canvas x 0.6; then a filled circle of radius 10 at each point."""
    import cv2
    from PIL import Image
    kps = np.asarray(kps, dtype=np.float64).reshape(5, 2)
    out = np.zeros((height, width, 3), dtype=np.float64)
    for a, b in KPS_LIMBS:
        x, y = kps[[a, b], 0], kps[[a, b], 1]
        length = math.hypot(x[0] - x[1], y[0] - y[1])
        angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
        poly = cv2.ellipse2Poly((int(np.mean(x)), int(np.mean(y))), (int(length / 2), STICK_HALF_WIDTH),
                                int(angle), 0, 360, 1)
        out = cv2.fillConvexPoly(out.copy(), poly, KPS_COLORS[a])
    out = (out * 0.6).astype(np.uint8)
    for i, (x, y) in enumerate(kps):
        out = cv2.circle(out.copy(), (int(x), int(y)), POINT_RADIUS, KPS_COLORS[i], -1)
    return Image.fromarray(out.astype(np.uint8))


def keypoint_extras(keypoints: Any, keypoint_index: Any) -> dict[str, Any]:
    """An identity's ``extras`` for pose="selfie:N": each selfie's normalised layout and its upload index
    (selfies without key points left out); empty when none has them."""
    if keypoints is None:
        return {}
    import torch
    kept = [(i, k) for i, k in zip(keypoint_index if keypoint_index is not None else range(len(keypoints)), keypoints)
            if k is not None]
    if not kept:
        return {}
    return {"keypoints": torch.tensor(np.stack([normalise_selfie_kps(k) for _, k in kept]), dtype=torch.float32),
            "keypoint_index": torch.tensor([int(i) for i, _ in kept], dtype=torch.int64)}


def pose_image(pose: str, width: int, height: int, keypoints: Any = None, indices: Any = None):
    return draw_kps(width, height, place(resolve_pose(pose, keypoints, indices), width, height))
