"""The invisible watermark (utils/safety/watermark.py) on real photos from installed wheels, at a portrait
size: it survives a PNG re-encode without metadata and JPEG re-encodes, is not found on unmarked photos,
outlives the C2PA manifest when the metadata is stripped, and is written in invisible-watermark's
dwtDctSvd format (checked against a block-by-block reference of that package's algorithm)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests import photos
from utils.safety import watermark as wm

PORTRAIT = (832, 1216)   # SDXL's portrait bucket


def reencode(image: Image.Image, fmt: str, **kw) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@pytest.fixture(scope="module")
def portrait() -> Image.Image:
    return photos.astronaut().resize(PORTRAIT, Image.LANCZOS)


@pytest.fixture(scope="module")
def marked(portrait) -> Image.Image:
    return wm.embed(portrait)


CASES = [
    ("marked, as embedded", lambda m: m),
    ("marked, PNG re-encode without metadata", lambda m: reencode(m, "PNG")),
    ("marked, JPEG quality 90", lambda m: reencode(m, "JPEG", quality=90)),
    ("marked, JPEG quality 75", lambda m: reencode(m, "JPEG", quality=75)),
    ("marked, RGBA PNG", lambda m: reencode(m.convert("RGBA"), "PNG")),
]


@pytest.mark.parametrize("case,change", CASES, ids=[c[0] for c in CASES])
def test_mark_survives(marked, case, change):
    reading = wm.detect(change(marked))
    assert reading.present, reading
    assert reading.agreement == 1.0


UNMARKED = [
    ("astronaut portrait", lambda: photos.astronaut().resize(PORTRAIT, Image.LANCZOS)),
    ("astronaut portrait, JPEG 90", lambda: reencode(photos.astronaut().resize(PORTRAIT), "JPEG", quality=90)),
    ("six people (insightface t1.jpg)", photos.group),
    ("another face, upscaled", photos.tom_hanks),
    ("flat grey", lambda: Image.new("RGB", PORTRAIT, (128, 128, 128))),
]


@pytest.mark.parametrize("case,make", UNMARKED, ids=[c[0] for c in UNMARKED])
def test_unmarked_photo_is_not_detected(case, make):
    reading = wm.detect(make())
    assert not reading.present, reading
    assert reading.agreement is not None and reading.agreement <= 0.75


def test_mark_is_invisible(portrait, marked):
    assert marked.size == portrait.size and marked.mode == "RGB"
    err = np.asarray(marked, np.float64) - np.asarray(portrait, np.float64)
    psnr = 10 * np.log10(255 ** 2 / np.mean(err ** 2))
    assert psnr > 40, psnr          # measured 41.8 dB (imwatermark's own encoder: 39.6)
    assert np.percentile(np.abs(err), 99) <= 12


def test_image_too_small_to_carry_a_mark_is_left_alone():
    small = photos.astronaut().resize((176, 256))    # a 256 px thumbnail
    assert not wm.can_mark(small.size)
    assert wm.embed(small).tobytes() == small.tobytes()
    assert wm.detect(small) == wm.MarkReading(False, None)
    assert wm.detect(small).to_json() == {"present": False, "agreement": None}


# --------------------------------------------------------------------------------------------------
# The format: invisible-watermark's dwtDctSvd, block by block as that package does it (cv2.dct of each
# 4x4 block of the U channel's Haar low band, SVD, the largest singular value quantised by 36). The
# module does the same batched, without the DCT (orthonormal: same singular values); these loops are
# the reference it must agree with, bit for bit.
def _reference_band(image: Image.Image):
    import cv2
    import pywt

    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"), np.float32)[:, :, ::-1])
    yuv = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV)
    h, w = yuv.shape[0] // 4 * 4, yuv.shape[1] // 4 * 4
    return yuv, h, w, pywt.dwt2(yuv[:h, :w, 1], "haar")


def reference_embed(image: Image.Image) -> Image.Image:
    import cv2
    import pywt

    yuv, h, w, (low, details) = _reference_band(image)
    num = 0
    for i in range(low.shape[0] // 4):
        for j in range(low.shape[1] // 4):
            block = low[i * 4:i * 4 + 4, j * 4:j * 4 + 4]
            u, s, v = np.linalg.svd(cv2.dct(block))
            s[0] = (s[0] // 36 + 0.25 + 0.5 * wm.MESSAGE_BITS[num % 48]) * 36
            low[i * 4:i * 4 + 4, j * 4:j * 4 + 4] = cv2.idct(u @ np.diag(s) @ v)
            num += 1
    yuv[:h, :w, 1] = pywt.idwt2((low, details), "haar")
    bgr = cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR)
    return Image.fromarray(np.clip(np.rint(bgr[:, :, ::-1]), 0, 255).astype(np.uint8))


def reference_bits(image: Image.Image) -> list[int]:
    import cv2

    _, _, _, (low, _) = _reference_band(image)
    votes: list[list[int]] = [[] for _ in range(48)]
    num = 0
    for i in range(low.shape[0] // 4):
        for j in range(low.shape[1] // 4):
            s = np.linalg.svd(cv2.dct(low[i * 4:i * 4 + 4, j * 4:j * 4 + 4]), compute_uv=False)
            votes[num % 48].append(int((s[0] % 36) > 18))
            num += 1
    return [int(np.mean(v) * 255 > 127) for v in votes]


@pytest.mark.parametrize("size", [(300, 260), (400, 320), (258, 301)])
def test_same_format_as_the_block_by_block_reference(size):
    photo = photos.astronaut().resize(size)
    ours, theirs = wm.embed(photo), reference_embed(photo)
    assert reference_bits(ours) == list(wm.MESSAGE_BITS)              # the reference reads our mark
    assert wm.detect(theirs).agreement == 1.0                        # we read the reference's mark
    for image in (photo, reencode(ours, "JPEG", quality=60), photos.group().resize(size)):
        expected = np.mean(np.asarray(reference_bits(image)) == np.asarray(wm.MESSAGE_BITS))
        assert wm.detect(image).agreement == pytest.approx(expected)   # same decoder, any image


def test_message_has_as_many_ones_as_zeros():
    """A decoder reading a constant string from an unmarked image then agrees on exactly half the bits."""
    assert len(wm.MESSAGE_BITS) == 48 and sum(wm.MESSAGE_BITS) == 24
    assert 0.5 < wm.THRESHOLD < 0.9


def test_mark_outlives_the_manifest(tmp_path, portrait):
    """Watermark, then sign, then strip the metadata: the manifest is gone, the mark is still there."""
    from utils.safety import provenance as pv

    signer = pv.load_signer(None, None, tmp_path / "c2pa")
    buf = io.BytesIO()
    wm.embed(portrait).save(buf, "PNG")
    signed = signer.sign(buf.getvalue(), pv.Generator("digital-twin-generator", "1", "sdxl", "base", "plus-face"))
    assert pv.read_provenance(signed).state == "untrusted"
    stripped = io.BytesIO()
    Image.open(io.BytesIO(signed)).save(stripped, "JPEG", quality=90)
    assert pv.read_provenance(stripped.getvalue()).state == "absent"
    assert wm.detect(Image.open(io.BytesIO(stripped.getvalue()))).present
