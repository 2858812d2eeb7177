"""Real face photos that ship inside installed wheels (never copied into this repo).

- scikit-image: ``skimage/data/astronaut.png`` — one person (Eileen Collins), 512².
- insightface: ``data/images/Tom_Hanks_54745.png`` — a 112² crop of another person.
- insightface: ``data/images/t1.jpg`` — six people.

``selfie_set(n)`` makes n distinct JPEG "selfies" of the astronaut (crops, flips, rescales, light
changes) so upload tests can send realistic sets without any stored photo.
"""
from __future__ import annotations

import importlib.util
import io
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageEnhance


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name!r} is not installed; it carries the test photos")
    return Path(list(spec.submodule_search_locations)[0])


def astronaut_path() -> Path:
    return _package_dir("skimage") / "data" / "astronaut.png"


def tom_hanks_path() -> Path:
    return _package_dir("insightface") / "data" / "images" / "Tom_Hanks_54745.png"


def group_path() -> Path:
    return _package_dir("insightface") / "data" / "images" / "t1.jpg"


@lru_cache(maxsize=None)
def _load(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def astronaut() -> Image.Image:
    return _load(str(astronaut_path())).copy()


def tom_hanks(size: int = 448) -> Image.Image:
    """Tom Hanks' crop upscaled onto a plain background, so a detector sees a normal-sized face."""
    face = _load(str(tom_hanks_path())).resize((size, size), Image.LANCZOS)
    canvas = Image.new("RGB", (int(size * 1.5), int(size * 1.5)), (128, 128, 128))
    canvas.paste(face, (size // 4, size // 4))
    return canvas


def group() -> Image.Image:
    return _load(str(group_path())).copy()


def to_bytes(image: Image.Image, fmt: str = "JPEG", quality: int = 92) -> bytes:
    buf = io.BytesIO()
    kwargs = {"quality": quality} if fmt.upper() in ("JPEG", "WEBP") else {}
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def astronaut_variant(i: int, size: int | None = None) -> Image.Image:
    """The i-th distinct variant of the astronaut photo: crop window, flip, brightness, scale."""
    base = astronaut()
    w, h = base.size
    dx, dy = (i * 7) % 24, (i * 11) % 24
    im = base.crop((dx, dy, w - 24 + dx, h - 24 + dy))
    if i % 2:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    im = ImageEnhance.Brightness(im).enhance(0.9 + 0.04 * (i % 5))
    if size:
        im = im.resize((size, size), Image.LANCZOS)
    return im


def selfie_set(n: int, size: int | None = None) -> list[tuple[str, bytes]]:
    """n (filename, JPEG bytes) pairs of the same person, all distinct."""
    return [(f"selfie_{i:02d}.jpg", to_bytes(astronaut_variant(i, size))) for i in range(n)]


def phone_photo(i: int, size: tuple[int, int] = (4032, 3024)) -> Image.Image:
    """The i-th astronaut variant as a phone camera frames it (see ``phone_frame``), e.g. 12 MP 4032x3024."""
    return phone_frame(astronaut_variant(i), size)


def phone_frame(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``im`` scaled to cover ``size`` and cropped from the top centre (where a selfie has the head), so
    the face keeps its shape and a selfie-like share of the frame."""
    w, h = size
    scale = max(w / im.width, h / im.height)
    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR)  # LANCZOS: seconds per 12 MP
    left = (im.width - w) // 2
    return im.crop((left, 0, left + w, h))
