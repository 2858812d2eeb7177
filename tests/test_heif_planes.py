"""HEIC decoded to YCbCr planes (utils/heif_planes, issue 15) gives the pixels that libheif's own RGB
gives, for every colour matrix and range it handles, 4:2:0 and 4:4:4, single images and phone-style
grids, rotated files upright; and decode_reduced's HEIF path rejects broken files with the codes of
the Pillow path."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests import photos
from utils.errors import ImageRejected
from utils.images import decode_image, decode_reduced
from utils.pixels import area_reduce

pillow_heif = pytest.importorskip("pillow_heif")
heif_planes = pytest.importorskip("utils.heif_planes")

SIZE = (640, 480)


def heic(im: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    try:  # x265's fastest preset keeps the table quick; the decoder's work is the same kind
        pillow_heif.from_pillow(im).save(buf, quality=90, enc_params={"preset": "ultrafast"}, **kwargs)
    except Exception as exc:  # the wheel may lack an encoder
        pytest.skip(f"pillow-heif cannot encode HEIC here: {exc}")
    return buf.getvalue()


def libheif_rgb(data: bytes) -> np.ndarray:
    """What pillow-heif (libheif's RGB conversion) decodes: the reference."""
    return np.asarray(pillow_heif.open_heif(data)[0])


@pytest.fixture(scope="module", autouse=True)
def _needs_binding():
    if heif_planes.libheif() is None:
        pytest.skip("no libheif binding here (decode_reduced falls back to pillow-heif's RGB)")


CASES = [
    # (id, save kwargs): what phones and encoders write, and no colour box. libheif converts with the
    # decoded image's own colour description, which planes.matrix / full_range read: parity is the test.
    ("bt601-full (pillow-heif default)", {}),
    ("bt709-full", {"matrix_coefficients": 1, "full_range_flag": 1}),
    ("bt709-limited", {"matrix_coefficients": 1, "full_range_flag": 0}),
    ("bt601-limited", {"matrix_coefficients": 6, "full_range_flag": 0}),
    ("bt2020-full", {"matrix_coefficients": 9, "full_range_flag": 1}),
    ("no nclx box", {"save_nclx_profile": False}),
    ("ICC profile only (as iPhones write)", {"icc_profile": "srgb", "save_nclx_profile": False}),
    ("matrix unspecified", {"matrix_coefficients": 2, "full_range_flag": 1}),
    ("4:4:4", {"chroma": 444}),
    ("grid 256 px tiles (as phones write)", {"tile_size": 256}),
    ("odd size 641 x 479", {"size": (641, 479)}),
]


@pytest.mark.parametrize("kwargs", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_planes_convert_like_libheif(kwargs):
    kwargs = dict(kwargs)
    size = kwargs.pop("size", SIZE)
    if kwargs.get("icc_profile") == "srgb":
        from PIL import ImageCms

        kwargs["icc_profile"] = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = heic(photos.phone_photo(0, size), **kwargs)
    planes = heif_planes.decode_planes(data, lambda w, h: None)
    assert planes is not None and planes.size == size
    ref = libheif_rgb(data).astype(np.int16)
    for f in (1, 2, 5):  # the face region at full size, and reduced as for detection
        got = planes.rgb((0, 0, *size), f).astype(np.int16)
        want = area_reduce(ref.astype(np.uint8), f).astype(np.int16)
        assert got.shape == want.shape
        diff = np.abs(got - want)
        # Averaging before the conversion instead of after, and OpenCV's chroma interpolation instead of
        # libheif's, move a level or two, more only at sharp colour edges.
        assert diff.mean() < (1.5 if f == 1 else 1.0), (f, diff.mean())
        assert np.percentile(diff, 99) <= (8 if f == 1 else 4), (f, np.percentile(diff, 99))
    # A region: the same pixels as the same part of the whole.
    box = (100, 60, 420, 380)
    part = planes.rgb(box, 2).astype(np.int16)
    whole = planes.rgb((0, 0, *SIZE), 2).astype(np.int16)[30:190, 50:210]
    assert part.shape == whole.shape and np.abs(part - whole).mean() < 0.5


def _encode_ycbcr(rgb: np.ndarray, kr: float, kb: float, full_range: bool) -> tuple[np.ndarray, ...]:
    """The textbook R'G'B' -> Y'CbCr (ITU-T H.273), independent of the code under test."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = kr * r + (1 - kr - kb) * g + kb * b
    cb, cr = (b - y) / (2 - 2 * kb), (r - y) / (2 - 2 * kr)
    if full_range:
        return y, cb + 128, cr + 128
    return 16 + y * 219 / 255, 128 + cb * 224 / 255, 128 + cr * 224 / 255


@pytest.mark.parametrize("matrix", sorted(heif_planes.MATRICES))
@pytest.mark.parametrize("full_range", [True, False], ids=["full", "limited"])
def test_every_matrix_and_range_inverts_the_standard_encoding(matrix, full_range):
    rgb = np.random.default_rng(matrix).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    y, cb, cr = (np.clip(np.rint(p), 0, 255).astype(np.uint8)
                 for p in _encode_ycbcr(rgb, *heif_planes.MATRICES[matrix], full_range))
    back = heif_planes.ycbcr_to_rgb(y, cb, cr, matrix, full_range).astype(np.int16)
    assert np.abs(back - rgb).max() <= (3 if full_range else 4)  # 8-bit rounding of Y, Cb, Cr


@pytest.fixture(params=["planes", "pillow-heif rgb"])
def heif_path(request, monkeypatch):
    """decode_reduced's two HEIF paths: libheif's planes, and pillow-heif's RGB where no binding works."""
    if request.param != "planes":
        monkeypatch.setattr(heif_planes, "libheif", lambda: None)
    return request.param


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_rotated_heic_comes_out_upright(orientation, heif_path):
    """Phones store the pixels as shot and an irot/imir rotation (pillow-heif writes one from EXIF
    Orientation); the reduced decode is upright and has the full decode's pixels."""
    upright = photos.phone_photo(1, SIZE)
    turn = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    stored = upright.transpose(turn[orientation]) if orientation in turn else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = heic(stored, exif=exif.tobytes())
    full = decode_image(data, "r.heic", max_pixels=10**8)  # Pillow's plugin: the reference path
    reduced = decode_reduced(data, "r.heic", max_pixels=10**8, min_side=200)
    assert full.size == reduced.size == SIZE
    assert reduced.factor == 3 and reduced.image.size == (SIZE[0] // 3, SIZE[1] // 3)
    assert isinstance(reduced._full, heif_planes.Planes) == (heif_path == "planes")
    want = area_reduce(np.asarray(full), 3).astype(np.int16)
    assert np.abs(np.asarray(reduced.image, np.int16) - want).mean() < 1.0
    src = area_reduce(np.asarray(upright), 3).astype(np.int16)
    assert np.abs(np.asarray(reduced.image, np.int16) - src).mean() < 6  # upright, not merely self-consistent


BROKEN = [
    # (id, how the bytes are broken, code): the same codes as the Pillow path gives
    ("cut in the coded data", lambda d: d[: len(d) * 2 // 3], "corrupt_image"),  # libheif: no EOF subcode
    ("cut in the header", lambda d: d[:200], "corrupt_image"),
    ("coded data zeroed", lambda d: d[:len(d) // 2] + bytes(len(d) - len(d) // 2), None),
]


@pytest.mark.parametrize("mangle,code", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_heic_is_rejected_with_the_pillow_paths_code(mangle, code, heif_path):
    data = mangle(heic(photos.phone_photo(2, SIZE)))

    def outcome(fn):
        try:
            fn()
        except ImageRejected as exc:
            return exc.code
        return None

    pillow = outcome(lambda: decode_image(data, "b.heic", max_pixels=10**8))
    planes = outcome(lambda: decode_reduced(data, "b.heic", max_pixels=10**8, min_side=200))
    assert planes == pillow
    if code is not None:
        assert planes == code


def test_pixel_limit_is_checked_before_decoding(heif_path):
    data = heic(photos.phone_photo(3, SIZE))
    with pytest.raises(ImageRejected) as info:
        decode_reduced(data, "big.heic", max_pixels=SIZE[0] * SIZE[1] - 1, min_side=200)
    assert info.value.code == "too_many_pixels" and "640x480" in info.value.message


def test_hevc_worker_threads_decode_the_same_planes(monkeypatch):
    """One HEVC image decodes with libde265 worker threads (the last photo of an upload uses both cores);
    the options struct is checked field by field first, and the planes are those of a plain decode."""
    lib = heif_planes.libheif()
    opts = heif_planes._codec_threads_options(lib, 2) if lib.has_codec_threads else None
    if opts is None:
        pytest.skip("libheif < 1.20 here: no num_codec_threads (plain decode)")
    assert opts.contents.num_codec_threads == 2
    lib.heif_decoding_options_free(opts)
    data = heic(photos.phone_photo(4, SIZE))
    threaded = heif_planes.decode_planes(data, lambda w, h: None)
    monkeypatch.setattr(heif_planes, "_codec_threads_options", lambda lib, threads: None)
    plain = heif_planes.decode_planes(data, lambda w, h: None)
    for a, b in ((threaded.y, plain.y), (threaded.cb, plain.cb), (threaded.cr, plain.cr)):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("box,max_factor", [((100, 80, 400, 380), 1), ((100, 80, 400, 380), 2), ((600, 400, 640, 480), 1)],
                         ids=["face at full size", "face at 1/2", "corner sliver"])
def test_region_has_the_full_decodes_pixels(box, max_factor, heif_path):
    data = heic(photos.phone_photo(5, SIZE))
    full = np.asarray(decode_image(data, "f.heic", max_pixels=10**8))
    reduced = decode_reduced(data, "f.heic", max_pixels=10**8, min_side=200)
    part, (ox, oy), f = reduced.region(box, max_factor)
    assert f == max_factor and (ox, oy) == (box[0] // f * f, box[1] // f * f)
    want = area_reduce(full[oy:box[3], ox:box[2]], f).astype(np.int16)
    got = np.asarray(part, np.int16)
    assert got.shape == want.shape
    assert np.abs(got - want).mean() < 1.5
