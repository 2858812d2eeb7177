"""The torch port of dlib's face-recognition ResNet gives dlib's own descriptors, from the same file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import photos
from utils.config import Settings
from utils.faces.dlib_resnet import DlibModelFormatError, DlibResNet
from utils.errors import ModelWeightsMissing
from utils.faces.backends import DlibBackend

dlib = pytest.importorskip("dlib")
frm = pytest.importorskip("face_recognition_models")


def faces():
    """(case, RGB image): real photos from installed wheels, one face used from each."""
    a = photos.astronaut()
    return [
        ("astronaut", a),
        ("flipped", a.transpose(Image.FLIP_LEFT_RIGHT)),
        ("variant 5", photos.astronaut_variant(5)),
        ("darker, rescaled", photos.astronaut_variant(9, 1024)),
        ("tom hanks", photos.tom_hanks()),
        ("group, first face", photos.group()),
    ]


@pytest.fixture(scope="module")
def dlib_models():
    return (dlib.get_frontal_face_detector(), dlib.shape_predictor(frm.pose_predictor_five_point_model_location()),
            dlib.face_recognition_model_v1(frm.face_recognition_model_location()))


@pytest.fixture(scope="module")
def net():
    return DlibResNet(frm.face_recognition_model_location())


def chip_of(image, dlib_models):
    detector, predictor, _ = dlib_models
    rgb = np.asarray(image.convert("RGB"))
    boxes = detector(rgb, 1)
    assert boxes, "test photo lost its face"
    return dlib.get_face_chip(rgb, predictor(rgb, boxes[0]), size=150, padding=0.25)


@pytest.mark.parametrize("case,image", faces(), ids=[c for c, _ in faces()])
def test_same_descriptor_as_dlib(net, dlib_models, case, image):
    chip = chip_of(image, dlib_models)
    want = np.asarray(dlib_models[2].compute_face_descriptor(chip), dtype=np.float32)
    got = net([chip])[0]
    assert got.shape == (128,) and got.dtype == np.float32
    assert np.abs(got - want).max() < 1e-4, f"{case}: max difference {np.abs(got - want).max():.2e}"
    assert 1.2 < np.linalg.norm(want) < 1.7  # a real descriptor, not zeros


def test_batch_equals_one_by_one(net, dlib_models):
    chips = [chip_of(image, dlib_models) for _, image in faces()]
    batched = net(chips)
    single = np.stack([net([c])[0] for c in chips])
    assert batched.shape == (len(chips), 128)
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert net([]).shape == (0, 128)


@pytest.mark.parametrize("shape,dtype", [((150, 150), np.uint8), ((150, 150, 3), np.float32), ((112, 112, 3), np.uint8)])
def test_wrong_chip_is_refused_with_its_shape(net, shape, dtype):
    with pytest.raises(ValueError, match=r"face chip of shape"):
        net([np.zeros(shape, dtype=dtype)])


def _cut(keep: float) -> bytes:
    data = Path(frm.face_recognition_model_location()).read_bytes()
    return data[:int(len(data) * keep)]


@pytest.mark.parametrize("content,match", [
    (lambda: _cut(0.5), r"runs past the end|found \d+ convolutions"),
    (lambda: _cut(0.0001), r"tensor of shape \[4736, 1, 1, 1\] runs past the end"),
    (lambda: b"not a model at all", r"no input layer"),
    (lambda: Path(frm.pose_predictor_five_point_model_location()).read_bytes(), r"no input layer|convolutions"),
], ids=["truncated half", "truncated header", "text", "landmark model"])
def test_other_files_are_refused_with_the_path(tmp_path, content, match):
    bad = tmp_path / "model.dat"
    bad.write_bytes(content())
    with pytest.raises(DlibModelFormatError, match=match) as err:
        DlibResNet(bad)
    assert str(bad) in str(err.value)


def test_backend_engines_agree_and_share_the_model_name():
    a = np.asarray(photos.astronaut())
    results = {}
    for engine in ("torch", "dlib"):
        backend = DlibBackend(descriptor=engine)
        backend.load()
        (det,) = backend.detect(a)
        results[engine] = (backend.model_name, backend.embed(a, det))
    assert results["torch"][0] == results["dlib"][0] == "dlib-resnet-v1-128"
    np.testing.assert_allclose(results["torch"][1], results["dlib"][1], atol=1e-5)
    assert abs(np.linalg.norm(results["torch"][1]) - 1.0) < 1e-5


def test_unreadable_model_file_fails_setup_clearly(tmp_path, monkeypatch):
    bad = tmp_path / "dlib_face_recognition_resnet_model_v1.dat"
    bad.write_bytes(b"\x01\x02xx")
    monkeypatch.setattr(frm, "face_recognition_model_location", lambda: str(bad))
    with pytest.raises(ModelWeightsMissing, match=str(bad)):
        DlibBackend(descriptor="torch").load()


@pytest.mark.parametrize("value,ok", [("torch", True), ("dlib", True), ("onnx", False)])
def test_descriptor_setting(value, ok):
    if ok:
        assert Settings(face_descriptor=value).face_descriptor == value
    else:
        with pytest.raises(Exception, match="onnx"):
            Settings(face_descriptor=value)
        with pytest.raises(ValueError, match="onnx"):
            DlibBackend(descriptor=value)
