"""The img2img ``init_image`` request value: one of three forms, checked here without touching storage.

    "selfie:N"                 the accepted selfie with upload index N (0-based, as in the upload report)
                               of the job's session
    "<job_id>/<filename>"      one of the caller's own outputs (avatar_001.png ...); another caller's -> 404
    "data:image/png;base64,…"  an image sent inline (or the bare base64 text); decoded with the same safe
                               decoder and limits as selfies (TWIN_MAX_FILE_MB, TWIN_MAX_PIXELS)

The service (utils/services.Runtime.submit) resolves the reference to pixels once, at submit time, and
keeps them beside the job's outputs, so the job runs on what was checked even if the source goes away.
"""
from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from utils.errors import InvalidRequest
from utils.storage import ID_RE, OUTPUT_NAME_RE

SELFIE_RE = re.compile(r"^selfie:(\d{1,4})$")
OUTPUT_RE = re.compile(r"^(%s)/(%s)$" % (ID_RE.pattern.strip("^$"), OUTPUT_NAME_RE.pattern.strip("^$")))
DATA_URL_RE = re.compile(r"^data:image/[A-Za-z0-9.+-]{1,40};base64,")



@dataclass(frozen=True)
class InitImageRef:
    kind: str                        # "selfie" | "output" | "upload"
    index: int | None = None
    job_id: str | None = None
    filename: str | None = None
    data: bytes | None = None

    def describe(self) -> str:
        if self.kind == "selfie":
            return f"selfie:{self.index}"
        if self.kind == "output":
            return f"{self.job_id}/{self.filename}"
        return f"upload ({len(self.data or b'')} bytes)"


def max_chars(settings) -> int:
    """Longest accepted value: base64 of a file of TWIN_MAX_FILE_MB, with a data: prefix."""
    return int(settings.max_file_mb * 1024 * 1024 * 4 / 3) + 100


def parse_init_image(value: str, max_bytes: int) -> InitImageRef:
    m = SELFIE_RE.match(value)
    if m:
        return InitImageRef("selfie", index=int(m.group(1)))
    m = OUTPUT_RE.match(value)
    if m:
        return InitImageRef("output", job_id=m.group(1), filename=m.group(2))
    text = DATA_URL_RE.sub("", value, count=1)
    if value.startswith("data:") and text == value:
        raise InvalidRequest(f"init_image={value[:60]!r}… is a data: URL but not data:image/<type>;base64,")
    if value.startswith("selfie:"):
        raise InvalidRequest(f"init_image={value!r} is not selfie:N with N the upload index of an accepted selfie")
    if len(text) > max_bytes * 4 // 3 + 4:
        raise InvalidRequest(f"init_image has about {len(text) * 3 // 4} bytes of image data; at most {max_bytes} "
                             "are allowed (TWIN_MAX_FILE_MB)")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"init_image={value[:60]!r}… is not selfie:N, <job_id>/avatar_NNN.png or valid "
                             "base64 image data") from None
    if not data:
        raise InvalidRequest("init_image='' holds no image data")
    if len(data) > max_bytes:
        raise InvalidRequest(f"init_image has {len(data)} bytes of image data; at most {max_bytes} are allowed "
                             "(TWIN_MAX_FILE_MB)")
    return InitImageRef("upload", data=data)


def check_init_image(value: str, settings) -> str:
    """The request field's check: the form is valid (the image itself is decoded at submit)."""
    parse_init_image(value, int(settings.max_file_mb * 1024 * 1024))
    return value


def fit_image(image, width: int, height: int):
    """``image`` scaled to cover width x height and centre-cropped: the output keeps the request's size."""
    from PIL import Image
    image = image.convert("RGB")
    scale = max(width / image.width, height / image.height)
    w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    image = image.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (w - width) // 2, (h - height) // 2
    return image.crop((left, top, left + width, top + height))
