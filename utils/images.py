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
from typing import TYPE_CHECKING, Protocol

from PIL import ExifTags, Image, PngImagePlugin, UnidentifiedImageError

from utils.errors import ImageRejected
from utils.pixels import area_reduce

if TYPE_CHECKING:
    import numpy as np

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

# Signatures of other file kinds that make an image a polyglot when they follow its end marker: a ZIP
# (JAR, DOCX, APK) reader or an HTML/script sniffer would take the same bytes as its own format.
_FOREIGN_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08", b"Rar!\x1a\x07", b"7z\xbc\xaf\x27\x1c",
                       b"%PDF-", b"\x7fELF", b"\x1f\x8b\x08")
_FOREIGN_TEXT = (b"<script", b"<html", b"<!doctype", b"<?php", b"<svg", b"<?xml", b"javascript:")


def image_end(data: bytes, fmt: str) -> int | None:
    """Offset just past the image's end marker (PNG IEND chunk, JPEG EOI after the last scan, WebP RIFF
    size), or None when the structure cannot be followed (PIL decides about such files)."""
    n = len(data)
    if fmt == "PNG":
        i = 8
        while i + 12 <= n:
            length = int.from_bytes(data[i:i + 4], "big")
            kind = data[i + 4:i + 8]
            i += 12 + length
            if kind == b"IEND":
                return i if i <= n else None
        return None
    if fmt == "WEBP":
        end = 8 + int.from_bytes(data[4:8], "little")
        return end if end <= n else None
    if fmt == "JPEG":
        i = 2
        while i + 2 <= n:
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker == 0xFF:            # fill byte
                i += 1
                continue
            if marker == 0xD9:            # EOI
                return i + 2
            if 0xD0 <= marker <= 0xD7 or marker == 0x01:
                i += 2
                continue
            if i + 4 > n:
                return None
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
            if marker == 0xDA:            # a scan: entropy-coded bytes up to the next real marker
                while True:
                    i = data.find(b"\xff", i)
                    if i < 0 or i + 1 >= n:
                        return None
                    nxt = data[i + 1]
                    if nxt == 0x00 or 0xD0 <= nxt <= 0xD7 or nxt == 0xFF:
                        i += 1 if nxt == 0xFF else 2
                        continue
                    break
        return None
    return None


def foreign_trailer(data: bytes, fmt: str) -> str | None:
    """Why the bytes after the image's end make it a polyglot, or None.

    PNG allows nothing after IEND. JPEG trailers are common and harmless (phone "motion photos" append
    an MP4), so only a trailer carrying another format's signature counts.
    """
    end = image_end(data, fmt)
    if end is None or end >= len(data):
        return None
    trailer = data[end:]
    if fmt == "PNG" and trailer.strip(b"\x00"):
        return f"{len(trailer):,} bytes follow the PNG's end (IEND)"
    lowered = trailer.lower()
    for sig in _FOREIGN_SIGNATURES:
        if sig in trailer:
            return f"the data after the image's end holds another file ({sig[:4]!r}...)"
    for sig in _FOREIGN_TEXT:
        if sig in lowered:
            return f"the data after the image's end holds markup or script ({sig.decode()}...)"
    return None


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
    """Decode ``data`` into an upright full-resolution RGB image or raise ``ImageRejected`` saying why.

    Codes: empty_file, not_an_image, unsupported_format, polyglot, too_many_pixels, truncated_image,
    corrupt_image. ``decode_reduced`` applies the same checks and decodes only as large as asked.
    """
    return decode_reduced(data, filename, max_pixels=max_pixels, min_side=None).image


# EXIF Orientation -> the transpose that makes the stored pixels upright (as ImageOps.exif_transpose).
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}


def _upright_to_stored(rect: tuple[int, int, int, int], orientation: int, stored: tuple[int, int]):
    """The rectangle of the stored pixels that ``orientation``'s transpose turns into ``rect`` of the upright
    image (both at the same scale; ``stored`` is the stored image's size)."""
    sw, sh = stored
    x0, y0, x1, y1 = rect
    inverse = {  # upright (u, v) -> stored (x, y), the inverse of each transpose
        1: lambda u, v: (u, v), 2: lambda u, v: (sw - u, v), 3: lambda u, v: (sw - u, sh - v),
        4: lambda u, v: (u, sh - v), 5: lambda u, v: (v, u), 6: lambda u, v: (v, sh - u),
        7: lambda u, v: (sw - v, sh - u), 8: lambda u, v: (sw - v, u)}[orientation]
    (ax, ay), (bx, by) = inverse(x0, y0), inverse(x1, y1)
    return min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)


class HeifPixels(Protocol):
    """A decoded HEIF's upright pixels, read a box at a time: libheif's planes (``heif_planes.Planes``)
    or pillow-heif's RGB (``_DecodedRgb``)."""

    size: tuple[int, int]

    def rgb(self, box: tuple[int, int, int, int], f: int) -> np.ndarray:
        """RGB uint8 of the pixels ``box`` = (x0, y0, x1, y1), averaged over f x f boxes."""


class _DecodedRgb:
    """pillow-heif's decoded RGB (a view: Pillow's plugin would copy it into a 4-bytes-per-pixel image)."""

    def __init__(self, pixels: np.ndarray) -> None:
        self.pixels = pixels
        self.size = (pixels.shape[1], pixels.shape[0])

    def rgb(self, box: tuple[int, int, int, int], f: int) -> np.ndarray:
        x0, y0, x1, y1 = box
        return area_reduce(self.pixels[y0:y1, x0:x1], f)


class ReducedImage:
    """An upload decoded only as large as needed: ``image`` is upright RGB whose pixels each stand for
    ``factor`` x ``factor`` pixels of the original (``size``, upright). ``region()`` gives part of the
    photo at a finer scale (the face, when it is small in ``image``) without an upright full-size copy.
    Holds the upload's bytes (JPEG: re-decoded for a region) or the decoded original (other formats:
    they have no scaled decoding), so drop it as soon as the photo is analysed."""

    def __init__(self, image: Image.Image, *, size: tuple[int, int], factor: int, orientation: int,
                 data: bytes, fmt: str, full: Image.Image | HeifPixels | None) -> None:
        self.image, self.size, self.factor, self.orientation = image, size, factor, orientation
        self.format = fmt
        self._data, self._full = data, full

    def region(self, box: tuple[float, float, float, float], max_factor: int) -> tuple[Image.Image, tuple[int, int], int]:
        """The upright RGB pixels of ``box`` (original upright coordinates, clipped to the photo) at the
        coarsest scale ``f <= max_factor`` this format decodes cheaply (JPEG: 1, 2, 4 or 8; others: any
        whole number). Returns (image, origin of its top-left pixel in original coordinates, f)."""
        f = max(1, min(int(max_factor), self.factor))
        w, h = self.size
        if self.factor == 1:  # ``image`` is the upright original already
            x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
            x1, y1 = min(w, int(-(-box[2] // 1))), min(h, int(-(-box[3] // 1)))
            return self.image.crop((x0, y0, max(x0 + 1, x1), max(y0 + 1, y1))), (x0, y0), 1
        swap = self.orientation in (5, 6, 7, 8)
        stored_full = (h, w) if swap else (w, h)
        if self.format == "JPEG":
            f = next(d for d in (8, 4, 2, 1) if d <= f)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                src = Image.open(io.BytesIO(self._data))
                if f > 1:
                    mode_box = src.draft("RGB", (max(1, stored_full[0] // f), max(1, stored_full[1] // f)))
                    f = round(stored_full[0] / mode_box[1][2]) if mode_box else 1
                src.load()
        else:
            src = self._full
        # Whole pixels of the upright image at scale 1/f, then the same pixels of the stored one.
        fw, fh = -(-w // f), -(-h // f)
        rect = (max(0, int(box[0] // f)), max(0, int(box[1] // f)),
                min(fw, int(-(-box[2] // f))), min(fh, int(-(-box[3] // f))))
        rect = (rect[0], rect[1], max(rect[0] + 1, rect[2]), max(rect[1] + 1, rect[3]))
        stored_scaled = (fh, fw) if swap else (fw, fh)
        sx0, sy0, sx1, sy1 = _upright_to_stored(rect, self.orientation, stored_scaled)
        if not isinstance(src, Image.Image):  # HEIF, upright (_decode_heif_reduced)
            sw, sh = stored_full
            part = Image.fromarray(src.rgb((sx0 * f, sy0 * f, min(sw, sx1 * f), min(sh, sy1 * f)), f))
        elif self.format == "JPEG" or f == 1:
            part = src.crop((sx0, sy0, sx1, sy1))
        else:  # crop the original, then reduce: the same pixels as reducing the whole photo, for a fraction of it
            sw, sh = stored_full
            part = src.crop((sx0 * f, sy0 * f, min(sw, sx1 * f), min(sh, sy1 * f))).reduce(f)
        if self.orientation in _ORIENTATION:
            part = part.transpose(_ORIENTATION[self.orientation])
        return _to_rgb(part), (rect[0] * f, rect[1] * f), f


def decode_reduced(data: bytes, filename: str, *, max_pixels: int, min_side: int | None) -> ReducedImage:
    """Decode ``data`` with the checks of ``decode_image`` (same codes, same messages), but only as large
    as needed: the longest side of ``.image`` is at least ``min_side`` (None: full resolution).

    JPEG decodes at 1/2, 1/4 or 1/8 scale in libjpeg (draft mode: less work, no full-size buffer);
    other formats decode fully and are then reduced by a whole factor (the original is kept in the
    result for ``region()``). EXIF orientation is applied to the reduced image only, and only when the
    photo has one other than 1.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels={max_pixels} must be positive")
    name = filename or "upload"
    fmt = _checked_format(data, name)
    if fmt == "HEIF" and min_side:
        reduced = _decode_heif_reduced(data, name, max_pixels=max_pixels, min_side=min_side)
        if reduced is not None:
            return reduced
    im, (w, h), factor = _open_pixels(data, name, fmt, max_pixels=max_pixels, min_side=min_side)
    orientation = _exif_orientation(im)
    full = None
    if min_side and factor == 1 and max(w, h) // min_side >= 2:
        # No scaled decoding for this format: reduce by a whole factor (box filter, like libjpeg's
        # scaling) and keep the decoded original for region().
        factor = max(w, h) // min_side
        full = _to_rgb(im)  # the same object for RGB photos; palette/16-bit ones cannot be reduced as stored
        im = full.reduce(factor)
    if orientation != 1:
        im = im.transpose(_ORIENTATION[orientation])  # a copy of the reduced image only
    uw, uh = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    return ReducedImage(_to_rgb(im), size=(uw, uh), factor=factor, orientation=orientation, data=data, fmt=fmt,
                        full=full)


def _checked_format(data: bytes, name: str) -> str:
    """The sniffed format of an upload this server decodes, or ImageRejected before any decoding."""
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
    why = foreign_trailer(data, fmt)
    if why:
        raise ImageRejected(f"{name}: a polyglot file: {why}; upload the photo itself", code="polyglot")
    return fmt


def _check_pixels(name: str, w: int, h: int, max_pixels: int) -> None:
    """The header's size, checked before any pixel is decoded (decompression bombs)."""
    if w <= 0 or h <= 0:
        raise ImageRejected(f"{name}: the image has no pixels ({w}x{h})", code="corrupt_image")
    if w * h > max_pixels:
        raise ImageRejected(f"{name}: {w}x{h} = {w * h:,} pixels is more than the limit of {max_pixels:,}",
                            code="too_many_pixels")


def _open_pixels(data: bytes, name: str, fmt: str, *, max_pixels: int,
                 min_side: int | None) -> tuple[Image.Image, tuple[int, int], int]:
    """The loaded image (a JPEG at the coarsest libjpeg scale that keeps ``min_side``), its stored size
    and the scale factor; PIL's failures become ImageRejected."""
    factor = 1
    try:
        with warnings.catch_warnings():
            # Our own limit below is the guard; PIL's global one must not fire first with its own text.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=None)
            w, h = im.size
            _check_pixels(name, w, h, max_pixels)
            if min_side and fmt == "JPEG":
                factor = _draft_jpeg(im, min_side)
            im.load()
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _unreadable(exc, name, fmt, max_pixels) from None
    return im, (w, h), factor


def _draft_jpeg(im: Image.Image, min_side: int) -> int:
    """Asks libjpeg for the coarsest scale whose longest side still reaches ``min_side``; the factor."""
    w, h = im.size
    # PIL picks min(w // req_w, h // req_h) rounded down to 8, 4, 2 or 1, so ask for floor(side / d).
    d = next((d for d in (8, 4, 2) if max(w, h) // d >= min_side), 1)
    if d == 1:
        return 1
    mode_box = im.draft("RGB", (max(1, w // d), max(1, h // d)))
    return round(w / mode_box[1][2]) if mode_box else 1


def _unreadable(exc: Exception, name: str, fmt: str, max_pixels: int) -> ImageRejected:
    """What PIL's failure to open or load an upload means for the user."""
    if isinstance(exc, Image.DecompressionBombError):
        # PIL's own guard (far above ours) fired inside open(); its text carries the declared size.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        declared = f"{int(found.group(1)):,} pixels" if found else "more pixels"
        return ImageRejected(f"{name}: the image declares {declared}, more than the limit of {max_pixels:,}",
                             code="too_many_pixels")
    if isinstance(exc, UnidentifiedImageError):
        return ImageRejected(f"{name}: the {fmt} data could not be read (corrupt file?)", code="corrupt_image")
    text = str(exc).lower()
    if "truncated" in text or "premature" in text or isinstance(exc, EOFError):
        return ImageRejected(f"{name}: the {fmt} file is truncated (incomplete upload?)", code="truncated_image")
    if "decompressed data too large" in text:
        # PIL's cap on zTXt/iTXt/iCCP chunks fired: a zip-bomb-like metadata chunk, not a damaged photo.
        return ImageRejected(f"{name}: a metadata chunk of the {fmt} inflates to more than "
                             f"{PngImagePlugin.MAX_TEXT_CHUNK // 1048576} MB (a zip bomb?); "
                             "re-save the photo without it", code="corrupt_image")
    return ImageRejected(f"{name}: the {fmt} data is corrupt and could not be decoded", code="corrupt_image")


def _exif_orientation(im: Image.Image) -> int:
    try:
        orientation = int(im.getexif().get(ExifTags.Base.Orientation, 1) or 1)
    except Exception:  # a broken EXIF block must not cost the user the photo
        log.info("EXIF orientation of an upload could not be applied; using the stored orientation")
        return 1
    return orientation if orientation in _ORIENTATION else 1


class _Small(Exception):
    """A HEIF too small to reduce (internal to _decode_heif_reduced)."""


def _decode_heif_reduced(data: bytes, name: str, *, max_pixels: int, min_side: int) -> ReducedImage | None:
    """HEIC/HEIF decoded by libheif and reduced by a whole factor, without a full-size RGB image.

    HEVC has no scaled decoding, so libde265's decode (~240 ms CPU per 12 MP) is the floor. First
    choice, utils/heif_planes: libheif's own YCbCr planes (no full-size YCbCr -> RGB, ~40 ms per 12 MP;
    18 MB instead of 36 MB), converted to RGB only at the reduced size and, in ``region()``, for the
    face. Otherwise (no usable libheif binding, alpha, > 8 bits, monochrome, an unusual matrix)
    pillow-heif's RGB, used in place as a numpy view (Pillow's plugin would copy it into a 4-bytes-
    per-pixel image: ~35 ms and 48 MB more per 12 MP). Orientation: libheif applies the file's own
    rotation and mirroring (irot/imir, what phones write) while decoding; a HEIF's EXIF orientation is
    informational (pillow-heif's plugin ignores it too), so the result is upright as decoded. None for
    what neither handles (a photo too small to reduce, alpha, greyscale): the caller then decodes
    through Pillow as for other formats."""
    def check(w: int, h: int) -> None:
        _check_pixels(name, w, h, max_pixels)
        if max(w, h) // min_side < 2:
            raise _Small  # not worth reducing: the caller decodes it whole

    try:
        pixels = _heif_planes(data, name, check)
        if pixels is None:
            pixels = _heif_rgb(data, name, check)
    except _Small:
        return None
    if pixels is None:
        return None
    factor = max(pixels.size) // min_side
    image = Image.fromarray(pixels.rgb((0, 0, *pixels.size), factor))
    return ReducedImage(image, size=pixels.size, factor=factor, orientation=1, data=data, fmt="HEIF", full=pixels)


def _heif_planes(data: bytes, name: str, check) -> HeifPixels | None:
    """libheif's YCbCr planes (utils.heif_planes), or None where that path does not apply."""
    from utils.heif_planes import HeifDecodeError, decode_planes

    try:
        return decode_planes(data, check)
    except HeifDecodeError as exc:
        if exc.unreadable:
            raise ImageRejected(f"{name}: the HEIF data could not be read (corrupt file?)", code="corrupt_image") from None
        if exc.truncated:
            raise ImageRejected(f"{name}: the HEIF file is truncated (incomplete upload?)", code="truncated_image") from None
        raise ImageRejected(f"{name}: the HEIF data is corrupt and could not be decoded", code="corrupt_image") from None


def _heif_rgb(data: bytes, name: str, check) -> HeifPixels | None:
    """pillow-heif's 8-bit RGB in place, or None for another mode (alpha, greyscale)."""
    import numpy as np
    import pillow_heif

    try:
        heif = pillow_heif.open_heif(data, convert_hdr_to_8bit=True, remove_stride=False)
        primary = heif[heif.primary_index]
        w, h = primary.size
        mode = primary.mode
    except (ValueError, SyntaxError, RuntimeError, EOFError, OSError, IndexError):
        raise ImageRejected(f"{name}: the HEIF data could not be read (corrupt file?)", code="corrupt_image") from None
    check(w, h)
    if mode != "RGB":
        return None
    try:
        stored = np.asarray(primary)  # decodes here (libheif releases the GIL); rows may be padded
    except (OSError, ValueError, RuntimeError, EOFError) as exc:
        if "truncated" in str(exc).lower() or isinstance(exc, EOFError):
            raise ImageRejected(f"{name}: the HEIF file is truncated (incomplete upload?)",
                                code="truncated_image") from None
        raise ImageRejected(f"{name}: the HEIF data is corrupt and could not be decoded", code="corrupt_image") from None
    if stored.ndim != 3 or stored.shape[0] < h or stored.shape[1] < w:
        raise ImageRejected(f"{name}: the HEIF data is corrupt and could not be decoded", code="corrupt_image")
    return _DecodedRgb(stored[:h, :w])


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
