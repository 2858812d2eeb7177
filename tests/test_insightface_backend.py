"""The InsightFace backend through insightface's real FaceAnalysis → prepare → get path, on generated
ONNX stand-ins (tests/onnx_standins.py). A real buffalo_l pack goes through the same code."""
from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from tests import photos
from utils.config import Settings
from utils.errors import ModelWeightsMissing
from utils.faces import FaceService


def test_real_faceanalysis_is_used(insightface_service, insightface_pack):
    from insightface.app import FaceAnalysis
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.model_zoo.scrfd import SCRFD

    app = insightface_service.backend._app
    assert isinstance(app, FaceAnalysis)
    assert isinstance(app.models["detection"], SCRFD) and isinstance(app.models["recognition"], ArcFaceONNX)
    assert insightface_service.backend_name == "insightface"
    assert insightface_service.model_name == "insightface-standin_pack"


CASES = [
    ("astronaut.jpg", photos.to_bytes(photos.astronaut()), "accepted", None),
    ("flat.png", photos.to_bytes(Image.new("RGB", (300, 300), (120, 120, 120)), "PNG"), "rejected", "no_face"),
    ("notes.jpg", b"plain text", "rejected", "not_an_image"),
]


@pytest.mark.parametrize("name,data,status,code", CASES, ids=[c[0] for c in CASES])
def test_validation_on_the_insightface_path(insightface_service, name, data, status, code):
    report = insightface_service.validate_selfies([(name, data)])
    entry = report.to_json()["files"][0]
    assert (entry["status"], entry["code"]) == (status, code)
    assert report.model_name == "insightface-standin_pack"
    if status == "accepted":
        emb = report.accepted[0].embedding
        assert emb.dtype == np.float32 and emb.shape == (512,)
        assert np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-4)
        assert report.accepted[0].crop.size == (512, 512)


def test_outlier_in_a_set_on_the_insightface_path(insightface_service):
    files = photos.selfie_set(4) + [("other.jpg", photos.to_bytes(photos.tom_hanks()))]
    report = insightface_service.validate_selfies(files)
    assert [(r.filename, r.code) for r in report.rejected] == [("other.jpg", "identity_outlier")]
    assert report.template.shape == (512,)


@pytest.mark.parametrize("case,image,same", [
    ("flipped", photos.astronaut().transpose(Image.FLIP_LEFT_RIGHT), True),
    ("rescaled", photos.astronaut().resize((800, 800)), True),
    ("other person", photos.tom_hanks(), False),
])
def test_distances_on_the_insightface_path(insightface_service, case, image, same):
    template = insightface_service.embed_image(photos.astronaut())
    d = insightface_service.identity_distance(image, template)
    thr = insightface_service.backend.outlier_distance
    assert (d < thr) if same else (d > thr), f"{case}: {d:.3f} vs {thr}"


def make_settings(tmp_path, **kw) -> Settings:
    return Settings(data_dir=tmp_path / "data", model_dir=tmp_path / "models", **kw)


def no_download(monkeypatch):
    import insightface.utils.storage as storage

    def refuse(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(storage, "download_file", refuse)


@pytest.mark.parametrize("layout,words", [
    ("missing", "does not exist"),
    ("empty", "holds no .onnx files"),
    ("recognizer only", "must hold a detection"),
])
def test_unusable_pack_gives_a_clear_error(tmp_path, monkeypatch, insightface_pack, layout, words):
    no_download(monkeypatch)
    pack = tmp_path / "pack"
    if layout != "missing":
        pack.mkdir()
    if layout == "recognizer only":
        shutil.copy(insightface_pack / "recognizer.onnx", pack / "recognizer.onnx")
    service = FaceService(make_settings(tmp_path, face_backend="insightface", insightface_model_dir=pack))
    with pytest.raises(ModelWeightsMissing) as info:
        service.setup()
    assert info.value.code == "face_models_missing"
    assert str(pack) in info.value.message and words in info.value.message


@pytest.mark.parametrize("with_pack,backend", [(True, "insightface"), (False, "dlib")])
def test_auto_picks_insightface_only_when_its_pack_is_there(tmp_path, caplog, insightface_pack, with_pack, backend):
    settings = make_settings(tmp_path, face_backend="auto")
    if with_pack:
        shutil.copytree(insightface_pack, settings.resolved_insightface_dir)
    caplog.set_level(logging.INFO, logger="utils.faces")
    service = FaceService(settings)
    assert service.backend_name == backend  # decided without loading anything
    service.setup()
    assert service.backend_name == backend
    line = [r.getMessage() for r in caplog.records if "face backend" in r.getMessage()][-1]
    assert line.startswith(f"face backend {backend}") and "auto:" in line and str(settings.resolved_insightface_dir) in line
    service.close()


def test_similarity_score_on_the_insightface_path(insightface_service):
    template = insightface_service.embed_image(photos.astronaut())
    assert insightface_service.identity_similarity(photos.astronaut(), template) > 0.9
    assert insightface_service.identity_similarity(photos.tom_hanks(), template) < 0.5
    assert insightface_service.identity_similarity(Image.new("RGB", (200, 200), (9, 9, 9)), template) is None
