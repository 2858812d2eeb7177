"""utils.images.decode_image: content sniffing, EXIF orientation, pixel limit, clear rejections."""
from __future__ import annotations

import io

import numpy as np
import pytest

from tests import photos
from tests.helpers.images import exif_rotated_jpeg, png_header_only
from utils.errors import ImageRejected
from utils.images import decode_image, sniff_format

LIMIT = 40_000_000


def small(fmt: str, mode: str = "RGB", **kw) -> bytes:
    im = photos.astronaut().resize((64, 64)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


JPEG = photos.to_bytes(photos.astronaut())

BAD = [
    # (case, data, max_pixels, expected code, words the message must contain)
    ("empty", b"", LIMIT, "empty_file", "empty"),
    ("text renamed .jpg", b"hello, I am not a picture\n" * 10, LIMIT, "not_an_image", "not an image"),
    ("html", b"<!doctype html><html></html>", LIMIT, "not_an_image", "not an image"),
    ("truncated jpeg", JPEG[: len(JPEG) // 2], LIMIT, "truncated_image", "truncated"),
    ("jpeg header only", JPEG[:200], LIMIT, "truncated_image", "truncated"),
    ("30000x30000 png header", png_header_only(30000, 30000), LIMIT, "too_many_pixels", "900,000,000"),
    ("over a small limit", small("PNG"), 64 * 64 - 1, "too_many_pixels", "4,096"),
    ("gif", small("GIF"), LIMIT, "unsupported_format", "GIF"),
    ("bmp", small("BMP"), LIMIT, "unsupported_format", "BMP"),
    ("png magic then junk", b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, LIMIT, "corrupt_image", "x.jpg"),
]


@pytest.mark.parametrize("case,data,max_pixels,code,words", BAD, ids=[b[0] for b in BAD])
def test_bad_files_are_rejected_with_a_reason(case, data, max_pixels, code, words):
    with pytest.raises(ImageRejected) as info:
        decode_image(data, "x.jpg", max_pixels=max_pixels)
    assert info.value.code == code
    assert words in info.value.message
    assert info.value.http_status == 400


GOOD = [
    ("jpeg", small("JPEG", quality=90), "JPEG"),
    ("png", small("PNG"), "PNG"),
    ("png rgba", small("PNG", mode="RGBA"), "PNG"),
    ("png grey", small("PNG", mode="L"), "PNG"),
    ("png palette", small("PNG", mode="P"), "PNG"),
    ("webp", small("WEBP", quality=90), "WEBP"),
    ("jpeg cmyk", small("JPEG", mode="CMYK"), "JPEG"),
]


@pytest.mark.parametrize("case,data,fmt", GOOD, ids=[g[0] for g in GOOD])
def test_supported_formats_decode_to_rgb(case, data, fmt):
    assert sniff_format(data) == fmt
    im = decode_image(data, "whatever.bin", max_pixels=LIMIT)  # the name's extension is never trusted
    assert im.mode == "RGB" and im.size == (64, 64)
    # Content survives: close to the source, not a blank canvas.
    src = np.asarray(photos.astronaut().resize((64, 64)).convert("L"), dtype=np.float32)
    got = np.asarray(im.convert("L"), dtype=np.float32)
    assert np.corrcoef(src.ravel(), got.ravel())[0, 1] > 0.9


def test_heic_decodes_when_pillow_heif_can_write_it():
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    buf = io.BytesIO()
    try:
        photos.astronaut().resize((64, 64)).save(buf, format="HEIF", quality=90)
    except Exception as exc:  # the wheel may lack an encoder
        pytest.skip(f"pillow-heif cannot encode HEIC here: {exc}")
    data = buf.getvalue()
    assert sniff_format(data) == "HEIF"
    im = decode_image(data, "a.heic", max_pixels=LIMIT)
    assert im.mode == "RGB" and im.size == (64, 64)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(orientation):
    upright = photos.astronaut().crop((0, 0, 512, 384))  # not square, so a missed rotation shows in the size
    im = decode_image(exif_rotated_jpeg(upright, orientation), "phone.jpg", max_pixels=LIMIT)
    assert im.size == upright.size
    diff = np.abs(np.asarray(im, np.float32) - np.asarray(upright, np.float32)).mean()
    assert diff < 6, f"decoded image differs from the upright original by {diff:.1f} on average"


def test_message_names_the_file():
    with pytest.raises(ImageRejected) as info:
        decode_image(b"nope", "holiday.jpg", max_pixels=LIMIT)
    assert "holiday.jpg" in info.value.message
