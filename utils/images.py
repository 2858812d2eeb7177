"""Safe decoding of uploaded images.

The format is sniffed from the bytes (never trusted from the filename or the client's content type),
the pixel count is checked from the header before any pixel is decoded (decompression bombs), EXIF
orientation is applied so faces are upright, and every failure becomes ``errors.ImageRejected`` with a
machine-readable code and a message naming the file — never an unhandled exception.
"""
from __future__ import annotations

import io
import logging
import re
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from utils.errors import ImageRejected

log = logging.getLogger(__name__)

#: Formats a selfie may come in, by sniffed container.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "HEIF")

# Recognised but refused: a clear "unsupported" beats a vague "not an image".
_OTHER_IMAGE_MAGIC = (
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "PSD"),
)
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}

_heif_registered: bool | None = None


def sniff_format(data: bytes) -> str | None:
    """The container format from the first bytes: JPEG, PNG, WEBP, HEIF, another name, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in _HEIF_BRANDS:
            return "HEIF"
        if brand in _AVIF_BRANDS:
            return "AVIF"
    for magic, name in _OTHER_IMAGE_MAGIC:
        if data.startswith(magic):
            return name
    return None


def _register_heif() -> bool:
    global _heif_registered
    if _heif_registered is None:
        try:
            import pillow_heif  # noqa: WPS433 (optional, imported only when a HEIC arrives)

            pillow_heif.register_heif_opener()
            _heif_registered = True
        except Exception:  # pragma: no cover - depends on the install
            log.warning("pillow-heif is not usable; HEIC uploads will be refused")
            _heif_registered = False
    return _heif_registered


def decode_image(data: bytes, filename: str, *, max_pixels: int) -> Image.Image:
    """Decode ``data`` into an upright RGB image or raise ``ImageRejected`` saying why.

    Codes: empty_file, not_an_image, unsupported_format, too_many_pixels, truncated_image,
    corrupt_image.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels={max_pixels} must be positive")
    name = filename or "upload"
    if not data:
        raise ImageRejected(f"{name}: the file is empty", code="empty_file")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageRejected(f"{name}: not an image (expected JPEG, PNG, WebP or HEIC content)",
                            code="not_an_image")
    if fmt == "HEIF" and not _register_heif():
        raise ImageRejected(f"{name}: HEIC images are not supported on this server", code="unsupported_format")
    if fmt not in SUPPORTED_FORMATS:
        raise ImageRejected(f"{name}: {fmt} images are not supported; use JPEG, PNG, WebP or HEIC",
                            code="unsupported_format")
    try:
        with warnings.catch_warnings():
            # Our own limit below is the guard; PIL's global one must not fire first with its own text.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=None)
            w, h = im.size
            if w <= 0 or h <= 0:
                raise ImageRejected(f"{name}: the image has no pixels ({w}x{h})", code="corrupt_image")
            if w * h > max_pixels:
                raise ImageRejected(f"{name}: {w}x{h} = {w * h:,} pixels is more than the limit of {max_pixels:,}",
                                    code="too_many_pixels")
            im.load()
    except ImageRejected:
        raise
    except Image.DecompressionBombError as exc:
        # PIL's own guard (far above ours) fired inside open(); its text carries the declared size.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        declared = f"{int(found.group(1)):,} pixels" if found else "more pixels"
        raise ImageRejected(f"{name}: the image declares {declared}, more than the limit of {max_pixels:,}",
                            code="too_many_pixels") from None
    except UnidentifiedImageError:
        raise ImageRejected(f"{name}: the {fmt} data could not be read (corrupt file?)",
                            code="corrupt_image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc).lower()
        if "truncated" in text or "premature" in text or isinstance(exc, EOFError):
            raise ImageRejected(f"{name}: the {fmt} file is truncated (incomplete upload?)",
                                code="truncated_image") from None
        raise ImageRejected(f"{name}: the {fmt} data is corrupt and could not be decoded",
                            code="corrupt_image") from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block must not cost the user the photo
        log.info("EXIF orientation of an upload could not be applied; using the stored orientation")
    return _to_rgb(im)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale PNG: scale to 8 bits rather than clipping to white.
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        top = arr.max() or 1.0
        return Image.fromarray((arr * (255.0 / top)).astype("uint8")).convert("RGB")
    return im.convert("RGB")
