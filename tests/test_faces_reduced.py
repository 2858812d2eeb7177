"""Phone-size uploads (issue 15): reduced decoding gives the verdicts of the full-resolution path, an
upload does not hold its decoded photos, and the server-wide bound on uploads answers 503 + Retry-After.

The full-resolution reference is tests/full_resolution.py (the per-photo analysis as it was before).
"""
from __future__ import annotations

import io
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from tests import photos
from tests.full_resolution import FullResolutionFaceService
from tests.helpers.images import exif_rotated_jpeg
from utils.errors import ImageRejected, ServerBusy
from utils.faces import FaceService
from utils.images import decode_image, decode_reduced


def encode(im: Image.Image, orientation: int, quality: int = 92) -> bytes:
    return photos.to_bytes(im, quality=quality) if orientation == 1 else exif_rotated_jpeg(im, orientation)


def phone_set(size: tuple[int, int], orientation: int) -> list[tuple[str, bytes]]:
    """One upload of phone-size photos, all stored with ``orientation``: three good selfies and one of
    each rejection the checks make from pixels."""
    w, h = size
    small = Image.new("RGB", size, (120, 130, 140))
    small.paste(photos.astronaut().resize((w // 6, w // 6)), (w // 3, h // 4))  # a face of ~w/25 px
    v0 = photos.phone_photo(0, size)
    files = [(f"v{i}.jpg", encode(photos.phone_photo(i, size), orientation)) for i in range(3)] + [
        ("blurred.jpg", encode(photos.phone_frame(photos.astronaut_variant(3).filter(ImageFilter.GaussianBlur(2)), size), orientation)),
        ("dark.jpg", encode(photos.phone_frame(ImageEnhance.Brightness(photos.astronaut_variant(4)).enhance(0.2), size), orientation)),
        # Tom Hanks' square canvas cut to 3:2 around the face, so no phone frame cuts the face off.
        ("other.jpg", encode(photos.phone_frame(photos.tom_hanks().crop((0, 100, 672, 548)), size), orientation)),
        ("copy.jpg", photos.to_bytes(v0, quality=70) if orientation == 1 else encode(v0, orientation)),
        ("group.jpg", encode(photos.phone_frame(photos.group(), size), orientation)),
        ("small_face.jpg", encode(small, orientation)),
    ]
    return files


PARITY = [
    # (photo size, EXIF orientation): 1024 px (no reduction), 3 MP, 12 MP upright and sideways, 24 MP sideways
    ((1024, 768), 1),
    ((2016, 1512), 8),
    ((4032, 3024), 1),
    ((4032, 3024), 6),
    ((6000, 4000), 6),
]
EXPECTED = {"v0.jpg": None, "v1.jpg": None, "v2.jpg": None, "blurred.jpg": "blurry", "dark.jpg": "too_dark",
            "other.jpg": "identity_outlier", "copy.jpg": "duplicate", "group.jpg": "multiple_faces"}


@pytest.fixture(scope="module")
def full_resolution(face_settings):
    service = FullResolutionFaceService(face_settings).setup()
    yield service
    service.close()


@pytest.mark.parametrize("size,orientation", PARITY, ids=[f"{w}x{h}-exif{o}" for (w, h), o in PARITY])
def test_reduced_decoding_gives_the_full_resolution_verdicts(face_service, full_resolution, size, orientation):
    files = phone_set(size, orientation)
    new, old = face_service.validate_selfies(files), full_resolution.validate_selfies(files)
    got = assert_same_verdicts(new, old, size)
    for name, code in EXPECTED.items():
        assert got[name]["code"] == code, (name, got[name])
    assert got["small_face.jpg"]["code"] in ("face_too_small", "no_face")


def heic(im: Image.Image) -> bytes:
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    buf = io.BytesIO()
    try:  # x265's fastest preset: ~0.4 s per 3 MP photo instead of seconds
        im.save(buf, format="HEIF", quality=85, enc_params={"preset": "ultrafast"})
    except Exception as exc:  # the wheel may lack an encoder
        pytest.skip(f"pillow-heif cannot encode HEIC here: {exc}")
    return buf.getvalue()


def test_heic_gets_the_full_resolution_verdicts(face_service, full_resolution):
    size = (2016, 1512)  # decoded whole (HEIC has no scaled decoding), then reduced by 2 for detection
    files = [(f"v{i}.heic", heic(photos.phone_photo(i, size))) for i in range(3)] + [
        ("blurred.heic", heic(photos.phone_frame(photos.astronaut_variant(3).filter(ImageFilter.GaussianBlur(2)), size)))]
    new, old = face_service.validate_selfies(files), full_resolution.validate_selfies(files)
    got = assert_same_verdicts(new, old, size)
    assert [f["code"] for f in got.values()] == [None, None, None, "blurry"]


def assert_same_verdicts(new, old, size) -> dict:
    """The reduced path's report says what the full-resolution one says; returns its files by name."""
    got = {f["filename"]: f for f in new.to_json()["files"]}
    ref = {f["filename"]: f for f in old.to_json()["files"]}
    assert {n: f["code"] for n, f in got.items()} == {n: f["code"] for n, f in ref.items()}
    assert new.warnings == old.warnings
    for name, f in got.items():
        m, r = f["metrics"], ref[name]["metrics"]
        assert set(m) == set(r), name
        assert [w["code"] for w in f["warnings"]] == [w["code"] for w in ref[name]["warnings"]]
        if "face_px" in m:  # the same measure in the original photo's pixels, and the same sharpness scale
            assert m["face_px"] == pytest.approx(r["face_px"], rel=0.03, abs=2), name
            assert m["face_fraction"] == pytest.approx(r["face_fraction"], rel=0.03), name
            assert m["sharpness"] == pytest.approx(r["sharpness"], rel=0.15, abs=2), name
            assert m["brightness"] == pytest.approx(r["brightness"], abs=2), name
            assert m["yaw_degrees"] == pytest.approx(r["yaw_degrees"], abs=3), name
        if "identity_distance" in m:
            assert m["identity_distance"] == pytest.approx(r["identity_distance"], abs=0.05), name
    for a, b in zip(new.accepted, old.accepted):
        assert a.size == b.size == size  # upright, whatever way the pixels were stored
        assert a.preview.size[0] >= a.preview.size[1]  # upright: the photos are landscape
        assert float(np.dot(a.embedding, b.embedding)) > 0.99
        # The aligned crops show the same, equally sharp face: a blurrier crop would differ in detail.
        diff = np.abs(np.asarray(a.crop, np.float32) - np.asarray(b.crop, np.float32)).mean()
        assert diff < 6, f"{a.filename}: the crop differs from the full-resolution one by {diff:.1f} on average"
    return got


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_region_is_the_upright_photo_at_a_finer_scale(fmt, orientation):
    upright = photos.phone_photo(5, (2400, 1800))
    inverse = {1: None, 2: Image.FLIP_LEFT_RIGHT, 3: Image.ROTATE_180, 4: Image.FLIP_TOP_BOTTOM,
               5: Image.TRANSPOSE, 6: Image.ROTATE_90, 7: Image.TRANSVERSE, 8: Image.ROTATE_270}[orientation]
    stored = upright if inverse is None else upright.transpose(inverse)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    data = buf.getvalue()
    full = decode_image(data, "p", max_pixels=40_000_000)
    photo = decode_reduced(data, "p", max_pixels=40_000_000, min_side=500)
    assert photo.size == full.size == upright.size and photo.factor == 4
    assert photo.image.size == (600, 450)
    for max_factor in (1, 2, 4):
        part, (ox, oy), f = photo.region((700.5, 300.2, 1500.9, 1100.0), max_factor)
        assert f == max_factor and (ox, oy) == (700 // f * f, 300 // f * f)
        ref = full.crop((ox, oy, ox + part.width * f, oy + part.height * f)).reduce(f)
        diff = np.abs(np.asarray(part, np.float32) - np.asarray(ref, np.float32)).mean()
        assert diff < 1.5, (max_factor, diff)  # JPEG's own scaling differs from a box filter by < 1 level


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1048576


def test_a_50_photo_upload_does_not_hold_its_decoded_photos(face_service):
    size = (2016, 1512)  # 9.1 MB decoded: 50 of them held at once would be 457 MB
    files = [(f"p{i:02d}.jpg", photos.to_bytes(photos.phone_photo(i % 15, size), quality=85 + i // 15))
             for i in range(50)]
    face_service.validate_selfies(files[:2])  # warm-up: the backends' own buffers are not the upload's
    base, peak, done = rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        report = face_service.validate_selfies(files)
    finally:
        done.set()
        sampler.join()
    assert len(report.accepted) >= 14
    held = 50 * size[0] * size[1] * 3 / 1048576
    assert peak[0] - base < held / 3, f"RSS grew by {peak[0] - base:.0f} MB; all decoded photos are {held:.0f} MB"
    for a in report.accepted:  # what the session keeps: crop, embedding, a small preview
        assert max(a.preview.size) <= 256 and a.crop.size == (face_service.settings.face_crop_size,) * 2


class _Gated(FaceService):
    """A FaceService whose photos wait for ``gate``: an upload stays in progress as long as a test needs."""

    def __init__(self, settings):
        super().__init__(settings)
        self.gate, self.entered = threading.Event(), threading.Semaphore(0)

    def _analyse(self, index, filename, data):
        self.entered.release()
        self.gate.wait(30)
        return super()._analyse(index, filename, data)


@pytest.mark.parametrize("slots,wait", [(1, 0.2), (2, 0.0)])
def test_uploads_beyond_the_bound_get_503_busy_with_retry_after(make_app, service_settings, slots, wait):
    settings = service_settings.replace(face_backend="dlib", face_threads=1, max_concurrent_uploads=slots,
                                        upload_wait_seconds=wait)
    faces = _Gated(settings)
    app = make_app(settings, faces=faces)
    body = lambda i: {"files": [(io.BytesIO(photos.to_bytes(photos.astronaut_variant(i))), f"s{i}.jpg")]}  # noqa: E731
    answers: list = []
    busy = [threading.Thread(target=lambda i=i: answers.append(app.test_client().post(
        "/upload", data=body(i), content_type="multipart/form-data"))) for i in range(slots)]
    for t in busy:
        t.start()
    try:
        for _ in range(slots):  # every slot is taken by an upload in progress
            assert faces.entered.acquire(timeout=20)
        t0 = time.perf_counter()
        resp = app.test_client().post("/upload", data=body(9), content_type="multipart/form-data")
        waited = time.perf_counter() - t0
    finally:
        faces.gate.set()
        for t in busy:
            t.join(30)
    assert resp.status_code == 503, resp.data
    assert resp.get_json() == {"error": {"code": "busy", "message": resp.get_json()["error"]["message"]}}
    assert "TWIN_MAX_CONCURRENT_UPLOADS" in resp.get_json()["error"]["message"]
    assert int(resp.headers["Retry-After"]) >= 1
    assert waited >= wait
    assert [r.status_code for r in answers] == [200] * slots  # the uploads in progress are answered
    documented = app.test_client().get("/openapi.json").get_json()["paths"]["/upload"]["post"]["responses"]["503"]
    assert "busy" in documented["description"] and "Retry-After" in documented["headers"]
    # Slots are given back: the next upload goes through.
    again = app.test_client().post("/upload", data=body(3), content_type="multipart/form-data")
    assert again.status_code == 200, again.data
    faces.close()


def test_busy_is_a_twin_error_with_retry_after():
    err = ServerBusy("x", retry_after=7)
    assert (err.http_status, err.code, err.headers) == (503, "busy", {"Retry-After": "7"})


def _jpeg(mode: str = "RGB", **kw) -> bytes:
    buf = io.BytesIO()
    photos.phone_photo(0, (2016, 1512)).convert(mode).save(buf, format="JPEG", **kw)
    return buf.getvalue()


REDUCED_DECODES = [
    # (case, bytes, expected code or None): the reduced decode refuses exactly what the full one refuses
    ("baseline", lambda: _jpeg(quality=90), None),
    ("progressive", lambda: _jpeg(quality=90, progressive=True), None),
    ("cmyk", lambda: _jpeg("CMYK"), None),
    ("grey", lambda: _jpeg("L"), None),
    ("truncated", lambda: _jpeg(quality=90)[:60_000], "truncated_image"),
    ("truncated progressive", lambda: _jpeg(quality=90, progressive=True)[:60_000], "truncated_image"),
    ("over the pixel limit", lambda: _jpeg(quality=90), "too_many_pixels"),
]


@pytest.mark.parametrize("case,make,code", REDUCED_DECODES, ids=[c[0] for c in REDUCED_DECODES])
def test_reduced_decode_accepts_and_refuses_like_the_full_decode(case, make, code):
    data = make()
    limit = 2016 * 1512 - 1 if case == "over the pixel limit" else 40_000_000
    if code:
        for decode in (lambda: decode_image(data, "p.jpg", max_pixels=limit),
                       lambda: decode_reduced(data, "p.jpg", max_pixels=limit, min_side=800)):
            with pytest.raises(ImageRejected) as info:
                decode()
            assert info.value.code == code
        return
    full = decode_image(data, "p.jpg", max_pixels=limit)
    photo = decode_reduced(data, "p.jpg", max_pixels=limit, min_side=800)
    assert (photo.factor, photo.image.size, photo.image.mode, photo.size) == (2, (1008, 756), "RGB", full.size)
    ref = np.asarray(full.reduce(2), np.float32)
    assert np.abs(np.asarray(photo.image, np.float32) - ref).mean() < 2
