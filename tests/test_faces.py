"""FaceService on the offline dlib backend, with real photos from installed wheels (tests/photos.py)."""
from __future__ import annotations

import json
import logging
import math
import threading

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from tests import photos
from tests.helpers.images import exif_rotated_jpeg, png_header_only
from utils.errors import TwinError
from utils.faces import FaceService
from utils.faces.analysis import aligned_crop, estimate_yaw, image_signature

JPEG = photos.to_bytes(photos.astronaut())


def face_40px() -> Image.Image:
    """The astronaut's face cut to a 40×40 image: a face is there, but far too small."""
    return photos.astronaut().crop((165, 60, 295, 190)).resize((40, 40), Image.LANCZOS)


SINGLE = [
    # (file name, bytes, expected status, expected code, words in the message)
    ("astronaut.jpg", JPEG, "accepted", None, None),
    ("tom_hanks.jpg", photos.to_bytes(photos.tom_hanks()), "accepted", None, None),
    ("astronaut.png", photos.to_bytes(photos.astronaut(), "PNG"), "accepted", None, None),
    ("astronaut.webp", photos.to_bytes(photos.astronaut(), "WEBP"), "accepted", None, None),
    ("rotated_exif6.jpg", exif_rotated_jpeg(photos.astronaut(), 6), "accepted", None, None),
    ("rotated_exif8.jpg", exif_rotated_jpeg(photos.astronaut(), 8), "accepted", None, None),
    ("group.jpg", photos.to_bytes(photos.group()), "rejected", "multiple_faces", "6 faces"),
    ("blank.png", photos.to_bytes(Image.new("RGB", (512, 512), (128, 128, 128)), "PNG"), "rejected", "no_face", "no face"),
    ("blurred.jpg", photos.to_bytes(photos.astronaut().filter(ImageFilter.GaussianBlur(2))), "rejected", "blurry", "blurry"),
    ("tiny.jpg", photos.to_bytes(face_40px()), "rejected", "face_too_small", "too small"),
    ("dark.jpg", photos.to_bytes(ImageEnhance.Brightness(photos.astronaut()).enhance(0.2)), "rejected", "too_dark", "too dark"),
    ("bright.jpg", photos.to_bytes(ImageEnhance.Brightness(photos.astronaut()).enhance(1.6)), "rejected", "too_bright", "overexposed"),
    ("notes.jpg", b"this is a text file with a .jpg name\n", "rejected", "not_an_image", "not an image"),
    ("cut.jpg", JPEG[: len(JPEG) // 2], "rejected", "truncated_image", "truncated"),
    ("bomb.png", png_header_only(30000, 30000), "rejected", "too_many_pixels", "limit"),
    ("empty.jpg", b"", "rejected", "empty_file", "empty"),
    ("sliver.png", photos.to_bytes(Image.new("RGB", (1, 3000), (200, 150, 120)), "PNG"), "rejected", "no_face", "no face"),
    ("one_pixel.png", photos.to_bytes(Image.new("RGB", (1, 1)), "PNG"), "rejected", "no_face", "no face"),
]


@pytest.mark.parametrize("name,data,status,code,words", SINGLE, ids=[c[0] for c in SINGLE])
def test_single_selfie_rules(face_service, name, data, status, code, words):
    report = face_service.validate_selfies([(name, data)])
    entry = report.to_json()["files"][0]
    assert (entry["status"], entry["code"]) == (status, code), entry
    if words:
        assert words in entry["message"] and name in entry["message"]
        assert report.rejected[0].code == code
    else:
        (acc,) = report.accepted
        assert acc.embedding.dtype == np.float32 and acc.embedding.shape == (128,)
        assert acc.crop.size == (face_service.settings.face_crop_size,) * 2
        assert report.template is not None


def test_exif_rotated_selfie_is_decoded_upright(face_service):
    upright = photos.astronaut().crop((0, 0, 512, 400))
    report = face_service.validate_selfies([("phone.jpg", exif_rotated_jpeg(upright, 6))])
    (acc,) = report.accepted
    assert acc.size == (512, 400)  # upright landscape, not the stored portrait
    # The kept preview (the photo itself is not kept) is upright too: close to the upright original.
    assert acc.preview.size == (256, 200)
    ref = np.asarray(upright.resize(acc.preview.size, Image.BILINEAR), np.float32)
    assert np.abs(np.asarray(acc.preview, np.float32) - ref).mean() < 6
    assert abs(acc.metrics["yaw_degrees"]) < 10


def test_identity_outlier_is_rejected_and_left_out_of_the_template(face_service):
    files = photos.selfie_set(5) + [("someone_else.jpg", photos.to_bytes(photos.tom_hanks()))]
    report = face_service.validate_selfies(files)
    assert [r.code for r in report.rejected] == ["identity_outlier"]
    assert report.rejected[0].filename == "someone_else.jpg"
    assert "different person" in report.rejected[0].message
    assert [a.filename for a in report.accepted] == [f for f, _ in files[:5]]
    mean = np.mean([a.embedding / np.linalg.norm(a.embedding) for a in report.accepted], axis=0)
    np.testing.assert_allclose(report.template, mean, atol=1e-6)


def test_two_disagreeing_faces_warn_instead_of_rejecting(face_service):
    report = face_service.validate_selfies([("a.jpg", JPEG), ("b.jpg", photos.to_bytes(photos.tom_hanks()))])
    assert len(report.accepted) == 2
    assert "identity_uncertain" in [w["code"] for w in report.warnings]


@pytest.mark.parametrize("n,copy_of,expected_codes", [
    (6, None, []),                     # distinct crops/flips/light of one photo are not duplicates
    (3, 0, ["duplicate"]),             # a re-encoded copy is
])
def test_near_duplicates(face_service, n, copy_of, expected_codes):
    files = photos.selfie_set(n)
    if copy_of is not None:
        files.append(("again.jpg", photos.to_bytes(photos.astronaut_variant(copy_of), quality=70)))
    report = face_service.validate_selfies(files)
    assert [r.code for r in report.rejected] == expected_codes
    if expected_codes:
        assert "selfie_00.jpg" in report.rejected[0].message


def test_selfie_variants_are_below_the_duplicate_threshold(face_settings):
    sigs = np.stack([image_signature(photos.astronaut_variant(i)) for i in range(15)])
    sims = sigs @ sigs.T
    np.fill_diagonal(sims, 0)
    assert sims.max() < face_settings.duplicate_threshold


@pytest.mark.parametrize("n,warning", [(3, "few_selfies"), (10, None)])
def test_set_warnings(face_service, n, warning):
    report = face_service.validate_selfies(photos.selfie_set(n))
    codes = [w["code"] for w in report.warnings]
    assert len(report.accepted) == n
    assert (warning in codes) if warning else ("few_selfies" not in codes)


def test_report_json_has_upload_order_and_no_biometrics(face_service):
    files = [("bad.jpg", b"nope"), ("good.jpg", JPEG), ("blank.png", photos.to_bytes(Image.new("RGB", (64, 64)), "PNG"))]
    report = face_service.validate_selfies(files)
    doc = report.to_json()
    text = json.dumps(doc)  # JSON-safe
    assert [f["filename"] for f in doc["files"]] == ["bad.jpg", "good.jpg", "blank.png"]
    assert [f["status"] for f in doc["files"]] == ["rejected", "accepted", "rejected"]
    assert doc["counts"] == {"received": 3, "accepted": 1, "rejected": 2}
    assert doc["backend"] == "dlib" and doc["model_name"] == "dlib-resnet-v1-128"
    assert "embedding" not in text and "template" not in text and "pixels" not in text

    def number_lists(node):
        if isinstance(node, dict):
            for v in node.values():
                yield from number_lists(v)
        elif isinstance(node, list):
            if node and all(isinstance(v, (int, float)) for v in node):
                yield node
            for v in node:
                yield from number_lists(v)

    assert list(number_lists(doc)) == []  # no vectors of any kind
    assert len(text) < 2000


def test_logs_hold_no_biometric_data(face_service, caplog):
    caplog.set_level(logging.DEBUG)
    report = face_service.validate_selfies(photos.selfie_set(3))
    face_service.identity_similarity(photos.astronaut(), report.template)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for v in report.template[:16]:
        assert f"{float(v):.3f}" not in logged
    assert "selfies validated: 3 received, 3 accepted" in logged


# --- identity distances -------------------------------------------------------------------------
def same_or_other():
    a = photos.astronaut()
    return [
        ("flipped", a.transpose(Image.FLIP_LEFT_RIGHT), True),
        ("rescaled 0.6", a.resize((307, 307), Image.LANCZOS), True),
        ("rescaled 2x", a.resize((1024, 1024), Image.LANCZOS), True),
        ("variant 3", photos.astronaut_variant(3), True),
        ("tom hanks", photos.tom_hanks(), False),
        ("tom hanks small", photos.tom_hanks(224), False),
    ]


@pytest.fixture(scope="module")
def astronaut_template(face_service):
    return face_service.embed_image(photos.astronaut())


@pytest.mark.parametrize("case,image,same", same_or_other(), ids=[c[0] for c in same_or_other()])
def test_identity_distance_separates_people(face_service, astronaut_template, case, image, same):
    template = astronaut_template
    d = face_service.identity_distance(image, template)
    thr = face_service.backend.outlier_distance
    assert (d < thr) if same else (d > thr), f"{case}: distance {d:.3f}, threshold {thr}"
    score = face_service.identity_similarity(image, template)
    assert (score > 0.5) if same else (score < 0.5)


def test_identity_similarity_without_a_face_or_with_a_foreign_template(face_service):
    template = face_service.embed_image(photos.astronaut())
    assert face_service.identity_similarity(Image.new("RGB", (256, 256), (90, 90, 90)), template) is None
    with pytest.raises(TwinError) as info:
        face_service.identity_similarity(photos.astronaut(), np.ones(512, np.float32))
    assert info.value.code == "embedding_mismatch" and "512" in info.value.message


# --- measurements -------------------------------------------------------------------------------
@pytest.mark.parametrize("nose_dx,expected", [(0.0, 0.0), (0.1, 9.5), (-0.2, -18.4), (0.6, 45.0), (-1.2, -63.4)])
def test_yaw_from_landmarks(nose_dx, expected):
    iod = 60.0
    left, right = (100.0, 100.0), (160.0, 100.0)
    nose = (130.0 + nose_dx * iod, 130.0)
    assert estimate_yaw(left, right, nose) == pytest.approx(expected, abs=0.5)
    # Rotating the whole face in the image plane does not change the estimate.
    t = math.radians(20)
    rot = lambda p: (p[0] * math.cos(t) - p[1] * math.sin(t), p[0] * math.sin(t) + p[1] * math.cos(t))
    assert estimate_yaw(rot(left), rot(right), rot(nose)) == pytest.approx(expected, abs=0.5)


def test_not_frontal_rule_uses_its_setting(face_settings):
    strict = FaceService(face_settings.replace(max_yaw_degrees=0.1, face_threads=1)).setup()
    report = strict.validate_selfies([("a.jpg", JPEG)])
    assert [r.code for r in report.rejected] == ["not_frontal"]
    assert "turned" in report.rejected[0].message


@pytest.mark.parametrize("tilt", [0, 15, -20])
def test_crop_is_square_padded_and_level(face_service, tilt):
    image = photos.astronaut().rotate(tilt, resample=Image.BICUBIC, expand=False, fillcolor=(0, 0, 0))
    rgb = np.asarray(image)
    (det,) = face_service.backend.detect(rgb)
    crop = aligned_crop(rgb, det, size=256, scale=face_service.settings.face_crop_scale)
    assert crop.size == (256, 256)
    dets = face_service.backend.detect(np.asarray(crop))
    assert len(dets) == 1
    d = dets[0]
    angle = math.degrees(math.atan2(d.right_eye[1] - d.left_eye[1], d.right_eye[0] - d.left_eye[0]))
    assert abs(angle) < 4, f"eye line tilted {angle:.1f}° after alignment"
    cx = (d.box[0] + d.box[2]) / 2
    assert 256 * 0.3 < cx < 256 * 0.7 and d.width < 256 * 0.8  # centred, with room around it


def test_crop_past_the_border_is_padded(face_service):
    image = photos.astronaut().crop((150, 50, 320, 220))  # face touches the edges
    rgb = np.asarray(image)
    (det,) = face_service.backend.detect(rgb)
    crop = np.asarray(aligned_crop(rgb, det, size=128, scale=2.5))
    assert crop.shape == (128, 128, 3) and crop.std() > 10


def test_concurrent_validation_from_several_threads(face_service):
    files = photos.selfie_set(2)
    expected = face_service.validate_selfies(files)
    results, errors = [], []

    def worker():
        try:
            results.append(face_service.validate_selfies(files))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3 and len(expected.accepted) == 2
    # dlib model sets are borrowed per call: never more than the concurrent callers (3 + the pool).
    assert face_service.backend._free.qsize() <= 3 + face_service.settings.face_threads + 1
    for r in results:
        for a, b in zip(r.accepted, expected.accepted):
            np.testing.assert_allclose(a.embedding, b.embedding, atol=1e-5)


def test_service_is_cheap_until_setup(face_settings):
    service = FaceService(face_settings)
    assert service.backend is None and service.model_name is None and service.backend_name == "dlib"
    with pytest.raises(TwinError) as info:
        service.validate_selfies([("a.jpg", JPEG)])
    assert info.value.code == "not_ready"


@pytest.mark.parametrize("bad", ["not a list", [("a.jpg", "text not bytes")], [("only-one",)]])
def test_bad_arguments_are_refused(face_service, bad):
    with pytest.raises(TwinError):
        face_service.validate_selfies(bad)
