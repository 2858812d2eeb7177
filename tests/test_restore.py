"""Face restoration (utils/faces/restore.py): alignment, paste-back, value range, ONNX stand-ins, and the
whole path on real photos from the installed wheels with the offline dlib backend."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from utils import errors
from utils.faces.restore import (FFHQ_512, RESTORE_MODELS, FaceRestorer, OnnxRestoreModel, alignment_matrix,
                                 detection_points, from_model_output, paste_back, restore_faces, template,
                                 to_model_input, warp_face, write_standin)


@dataclass
class Det:
    """A detection as the backends give it: box, eye centres, nose, and InsightFace's 5 key points."""
    box: tuple
    left_eye: tuple
    right_eye: tuple
    nose: tuple
    kps: np.ndarray | None = None

    @property
    def width(self):
        return self.box[2] - self.box[0]

    @property
    def height(self):
        return self.box[3] - self.box[1]


def placed(angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    """The FFHQ template points moved by a known similarity transform: where a face's key points are."""
    a = math.radians(angle_deg)
    rot = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return (FFHQ_512 - 256) @ rot.T + np.asarray(shift)


def det_for(points: np.ndarray, with_kps: bool) -> Det:
    lo, hi = points.min(axis=0), points.max(axis=0)
    return Det(box=(*(lo - 20), *(hi + 20)), left_eye=tuple(points[0]), right_eye=tuple(points[1]),
               nose=tuple(points[2]), kps=points.astype(np.float32) if with_kps else None)


def blob_centroid(img: np.ndarray) -> np.ndarray:
    w = img.astype(np.float64)
    ys, xs = np.indices(w.shape)
    return np.array([(xs * w).sum() / w.sum(), (ys * w).sum() / w.sum()])


def blob_image(shape, point, radius: float = 3.0) -> np.ndarray:
    ys, xs = np.indices(shape[:2])
    g = np.exp(-((xs - point[0]) ** 2 + (ys - point[1]) ** 2) / (2 * radius ** 2))
    return np.repeat((g * 255).round().astype(np.uint8)[..., None], 3, axis=2)


@pytest.fixture(scope="module")
def standin_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("restore-models")
    for name, spec in RESTORE_MODELS.items():
        write_standin(d / spec.filename, name)
    return d


@pytest.fixture(scope="module")
def identity_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("restore-identity")
    for name, spec in RESTORE_MODELS.items():
        write_standin(d / spec.filename, name, kind="identity")
    return d


# --- alignment ---------------------------------------------------------------------------------

@pytest.mark.parametrize("angle, scale, shift, with_kps", [
    (0.0, 0.5, (300, 260), True),       # upright, smaller than the template
    (17.0, 0.8, (350, 300), True),      # tilted head (InsightFace: 5 points, LMEDS)
    (-25.0, 1.3, (600, 580), True),     # larger than the template
    (12.0, 0.6, (260, 240), False),     # dlib: eye centres only
])
def test_alignment_round_trip_lands_keypoints_within_one_pixel(angle, scale, shift, with_kps):
    shape = (1200, 1200, 3)   # the whole aligned square inside the photo: no grey border in the centroids
    points = placed(angle, scale, shift)
    det = det_for(points, with_kps)
    src, dst = detection_points(det, 512)
    m = alignment_matrix(src, dst)
    for k in range(len(src)):   # one blob per key point: its centroid must follow the transform
        photo = blob_image(shape, points[k])
        aligned = warp_face(photo, m, 512)
        assert np.linalg.norm(blob_centroid(aligned[..., 0]) - FFHQ_512[k]) < 1.0
        back, mask = paste_back(np.zeros(shape, np.uint8), aligned, m)
        assert mask[int(points[k][1]), int(points[k][0])] == pytest.approx(1.0)
        assert np.linalg.norm(blob_centroid(back[..., 0]) - points[k]) < 1.0


def test_template_scales_with_size():
    assert np.allclose(template(256), FFHQ_512 / 2)
    assert np.allclose(template(512), FFHQ_512)


def test_lmeds_ignores_one_misplaced_point():
    points = placed(10.0, 0.7, (300, 300))
    truth = alignment_matrix(points, FFHQ_512)
    moved = points.copy()
    moved[4] += (40, -30)                       # a mouth corner under a hand
    m = alignment_matrix(moved, FFHQ_512)
    assert np.allclose(m, truth, atol=1e-3)


# --- paste-back --------------------------------------------------------------------------------

@pytest.mark.parametrize("angle, scale, shift", [(0.0, 0.4, (200, 180)), (30.0, 0.7, (330, 300)),
                                                 (-10.0, 0.6, (40, 60))])   # the last one hangs off the corner
def test_paste_back_changes_only_pixels_inside_the_mask(angle, scale, shift):
    rng = np.random.default_rng(1)
    photo = rng.integers(0, 256, (480, 560, 3), dtype=np.uint8)
    face = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    m = alignment_matrix(placed(angle, scale, shift), FFHQ_512)
    out, mask = paste_back(photo, face, m)
    changed = np.any(out != photo, axis=2)
    assert changed.any()
    assert not (changed & (mask <= 0)).any()
    # The mask lies inside the warped-back square, and is solid in the middle of the face.
    inv = np.vstack([np.linalg.inv(np.vstack([m, [0, 0, 1]]))])
    ys, xs = np.nonzero(mask > 0)
    uv = np.c_[xs, ys, np.ones_like(xs)] @ np.vstack([m, [0, 0, 1]]).T
    assert uv[:, 0].min() >= -1 and uv[:, 0].max() <= 513 and uv[:, 1].min() >= -1 and uv[:, 1].max() <= 513
    centre = inv @ np.array([256, 280, 1])
    cx, cy = int(centre[0]), int(centre[1])
    if 0 <= cx < 560 and 0 <= cy < 480:
        assert mask[cy, cx] == pytest.approx(1.0)


def test_paste_back_of_the_unchanged_crop_leaves_no_seam():
    """Restoring with a model that changes nothing must give (almost) the photo back: the feathered
    blend has no visible edge."""
    from tests.photos import astronaut
    photo = np.asarray(astronaut())
    m = alignment_matrix(placed(5.0, 0.35, (225, 140)), FFHQ_512)
    out, mask = paste_back(photo, warp_face(photo, m), m)
    diff = np.abs(out.astype(int) - photo).max(axis=2)
    assert np.percentile(diff[mask > 0], 99) <= 40 and diff[mask > 0].mean() < 4


# --- value range and the ONNX interface ---------------------------------------------------------

def test_model_input_is_nchw_in_minus_one_to_one():
    face = np.zeros((512, 512, 3), np.uint8)
    face[..., 0] = 255
    x = to_model_input(face)
    assert x.shape == (1, 3, 512, 512) and x.dtype == np.float32
    assert x[0, 0].min() == 1.0 and x[0, 1].max() == -1.0
    assert np.array_equal(from_model_output(x), face)


@pytest.mark.parametrize("name", list(RESTORE_MODELS))
def test_identity_standin_gives_the_face_back_not_grey(identity_dir, name):
    from tests.photos import astronaut
    model = OnnxRestoreModel(identity_dir / RESTORE_MODELS[name].filename)
    face = np.asarray(astronaut().resize((512, 512)))
    out = model(face, 0.5)
    assert out.dtype == np.uint8 and out.shape == face.shape
    assert np.abs(out.astype(int) - face).max() <= 1
    assert out.std() > 40    # grey noise would have a small spread around 128


@pytest.mark.parametrize("name, inputs", [
    ("gfpgan", [("input", [1, 3, 512, 512], "tensor(float)")]),
    ("codeformer", [("input", [1, 3, 512, 512], "tensor(float)"), ("weight", [1], "tensor(double)")]),
    ("gpen", [("input", [1, 3, 512, 512], "tensor(float)")]),
])
def test_standins_have_the_public_exports_interface(standin_dir, name, inputs):
    model = OnnxRestoreModel(standin_dir / RESTORE_MODELS[name].filename)
    got = [(i.name, list(i.shape), i.type) for i in model.session.get_inputs()]
    assert got == inputs
    out = model.session.get_outputs()
    assert [(o.name, list(o.shape)) for o in out] == [("output", [1, 3, 512, 512])]
    assert model.has_fidelity == RESTORE_MODELS[name].has_fidelity


def test_codeformer_fidelity_reaches_the_model(standin_dir):
    from tests.photos import astronaut
    model = OnnxRestoreModel(standin_dir / "codeformer.onnx")
    face = np.asarray(astronaut().resize((512, 512)))
    assert np.abs(model(face, 1.0).astype(int) - face).max() <= 1         # full fidelity: the input
    assert np.abs(model(face, 0.0).astype(int) - face).mean() > 2          # no fidelity: restored


# --- the whole path on real photos ---------------------------------------------------------------

@pytest.mark.parametrize("name", list(RESTORE_MODELS))
def test_restores_the_astronauts_face_and_nothing_else(face_service, standin_dir, name):
    from tests.photos import astronaut
    image = astronaut()
    dets = face_service.detect_faces(image)
    assert len(dets) == 1
    result = FaceRestorer(standin_dir).restore(image, dets, model=name, fidelity=0.3)
    before, after = np.asarray(image).astype(int), np.asarray(result.image).astype(int)
    changed = np.any(after != before, axis=2)
    assert result.faces == 1
    assert not (changed & (result.mask <= 0)).any()
    # Every change is near the face: inside its (tight, dlib) box grown to three times its side (the FFHQ
    # crop holds hair and chin too); the suit and the background do not change.
    x0, y0, x1, y1 = dets[0].box
    cx, cy, side = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0)
    ys, xs = np.nonzero(changed)
    assert (np.abs(xs - cx) <= 1.5 * side).all() and (np.abs(ys - cy) <= 1.5 * side).all()
    assert changed.mean() < 0.15
    inner = (slice(int(y0), int(y1)), slice(int(x0), int(x1)))
    assert np.abs(after[inner] - before[inner]).mean() > 1   # the face itself did change


def test_every_face_of_a_group_photo_is_restored(face_service, standin_dir):
    from tests.photos import group
    image = group()
    dets = face_service.detect_faces(image)
    assert len(dets) >= 3
    result = FaceRestorer(standin_dir).restore(image, dets, model="gfpgan")
    assert result.faces == len(dets)
    for d in dets:
        cx, cy = int((d.box[0] + d.box[2]) / 2), int((d.box[1] + d.box[3]) / 2)
        assert result.mask[cy, cx] > 0.99


def test_insightface_keypoints_drive_the_alignment(insightface_service, standin_dir):
    from tests.photos import astronaut
    dets = insightface_service.detect_faces(astronaut())
    assert dets and dets[0].kps is not None and dets[0].kps.shape == (5, 2)
    result = FaceRestorer(standin_dir).restore(astronaut(), dets, model="gfpgan")
    assert result.faces == len(dets) and (result.mask > 0).any()


# --- the model files -----------------------------------------------------------------------------

def test_missing_model_names_the_file_and_the_download_command(tmp_path):
    r = FaceRestorer(tmp_path / "none", model_dir_hint=tmp_path / "models")
    with pytest.raises(errors.InvalidRequest) as e:
        r.check("codeformer")
    assert e.value.code == "restore_model_missing" and e.value.http_status == 400
    assert str(tmp_path / "none" / "codeformer.onnx") in e.value.message
    assert "python model_loader.py download --restore codeformer" in e.value.message


def test_tiny_profile_writes_missing_standins_on_demand(tmp_path):
    r = FaceRestorer(tmp_path / "face_restore", standins=True)
    assert r.check("gpen") == tmp_path / "face_restore" / "gpen_bfr_512.onnx"
    assert r.model("gpen").size == 512


def test_a_broken_model_file_is_a_setup_error(tmp_path):
    (tmp_path / "gfpgan_1.4.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(errors.ModelWeightsMissing) as e:
        FaceRestorer(tmp_path).model("gfpgan")
    assert e.value.code == "restore_model_invalid"


def test_restore_faces_with_no_detection_returns_the_image(standin_dir):
    image = Image.new("RGB", (64, 48), (10, 20, 30))
    result = restore_faces(image, [], OnnxRestoreModel(standin_dir / "gfpgan_1.4.onnx"))
    assert result.faces == 0 and np.array_equal(np.asarray(result.image), np.asarray(image))
