"""HEIC/HEIF decoded to its own YCbCr planes, through libheif's C API (issue 15).

Why not pillow-heif alone: its decoder always asks libheif for interleaved RGB (``decode_image`` in
pillow-heif's ``_pillow_heif.c`` passes ``heif_colorspace_RGB``), so every 12 MP photo pays libheif's
full-resolution YCbCr -> RGB conversion (~40 ms of ~280 ms CPU) and a 36 MB RGB buffer, although the
face checks look at a 1/5-scale copy and one face region. Here libheif hands back the planes the HEVC
decoder produced (4:2:0 on phones, 18 MB for 12 MP), and only what the checks look at is turned into
RGB, with the matrix and range that libheif itself would use (tests/test_heif_planes.py compares the
two on every matrix/range the table below handles).

The library is the libheif that pillow-heif loaded (its wheel bundles one; a source build links the
system's), found in this process's memory map after pillow-heif is imported, so the decoder, its
security limits and its plugins are the same as pillow-heif's. Anything this module does not handle
(no such library, alpha, more than 8 bits, monochrome, a matrix not in the table) gives None and the
caller decodes through pillow-heif as before.
"""
from __future__ import annotations

import ctypes
import logging
import threading
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

# libheif enums (heif.h / heif_image.h, stable since libheif 1.x)
_COLORSPACE_YCBCR, _COLORSPACE_UNDEFINED, _CHROMA_UNDEFINED = 0, 99, 99
_CHROMA_420, _CHROMA_422, _CHROMA_444 = 1, 2, 3
_CHANNEL_Y, _CHANNEL_CB, _CHANNEL_CR = 0, 1, 2
_ERROR_DECODER_PLUGIN, _SUBERROR_END_OF_DATA = 7, 100

#: matrix_coefficients (ISO/IEC 23091-2) -> (Kr, Kb). libheif converts 2 ("unspecified") as BT.601, like
#: 5 and 6; a file without an nclx box (an ICC profile only, as iPhones write) decodes as 6, full range.
MATRICES = {1: (0.2126, 0.0722), 2: (0.299, 0.114), 5: (0.299, 0.114), 6: (0.299, 0.114), 9: (0.2627, 0.0593)}


class _Error(ctypes.Structure):
    _fields_ = [("code", ctypes.c_int), ("subcode", ctypes.c_int), ("message", ctypes.c_char_p)]


class _Nclx(ctypes.Structure):  # heif_color_profile_nclx, version-1 fields
    _fields_ = [("version", ctypes.c_uint8), ("color_primaries", ctypes.c_int),
                ("transfer_characteristics", ctypes.c_int), ("matrix_coefficients", ctypes.c_int),
                ("full_range_flag", ctypes.c_uint8)]


class _ColorConversionOptions(ctypes.Structure):  # heif_color_conversion_options, version 1
    _fields_ = [("version", ctypes.c_uint8), ("preferred_chroma_downsampling_algorithm", ctypes.c_int),
                ("preferred_chroma_upsampling_algorithm", ctypes.c_int),
                ("only_use_preferred_chroma_algorithm", ctypes.c_uint8)]


class _DecodingOptions(ctypes.Structure):
    """heif_decoding_options up to version 8's ``num_codec_threads`` (libheif >= 1.20). Only ever used
    through a pointer from ``heif_decoding_options_alloc`` (the library's own, larger struct), after
    ``_codec_threads_options`` has checked that the fields sit where this layout says."""
    _fields_ = [("version", ctypes.c_uint8), ("ignore_transformations", ctypes.c_uint8),
                ("start_progress", ctypes.c_void_p), ("on_progress", ctypes.c_void_p),
                ("end_progress", ctypes.c_void_p), ("progress_user_data", ctypes.c_void_p),
                ("convert_hdr_to_8bit", ctypes.c_uint8), ("strict_decoding", ctypes.c_uint8),
                ("decoder_id", ctypes.c_void_p), ("color_conversion_options", _ColorConversionOptions),
                ("cancel_decoding", ctypes.c_void_p), ("color_conversion_options_ext", ctypes.c_void_p),
                ("ignore_sequence_editlist", ctypes.c_int), ("output_image_nclx_profile", ctypes.c_void_p),
                ("num_library_threads", ctypes.c_int), ("num_codec_threads", ctypes.c_int)]


_HVC1 = int.from_bytes(b"hvc1", "big")  # heif_fourcc('h','v','c','1'): one HEVC image, not a 'grid' of tiles

_lib: ctypes.CDLL | None | bool = None
_lib_lock = threading.Lock()


def _loaded_libheifs() -> list[str]:
    """Paths of the libheif builds mapped into this process, from /proc/self/maps (Linux only)."""
    found: list[str] = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                fields = line.split(maxsplit=5)
                path = fields[5].strip() if len(fields) == 6 else ""
                name = path.rsplit("/", 1)[-1]
                if name.startswith("libheif") and ".so" in name and path not in found:
                    found.append(path)
    except OSError:
        pass
    return found


def _load() -> ctypes.CDLL | None:
    import pillow_heif  # loads its libheif and runs heif_init

    # The one pillow-heif uses (another library, e.g. libvips, may have mapped the system's, older one).
    lib = None
    for path in _loaded_libheifs():
        candidate = ctypes.CDLL(path)  # already loaded: dlopen returns the same handle
        candidate.heif_get_version.restype = ctypes.c_char_p
        if candidate.heif_get_version().decode() == pillow_heif.libheif_version():
            lib = candidate
            break
    if lib is None:
        return None
    vp, err = ctypes.c_void_p, _Error
    sigs = {
        "heif_context_alloc": (vp, []),
        "heif_context_free": (None, [vp]),
        "heif_context_read_from_memory_without_copy": (err, [vp, ctypes.c_char_p, ctypes.c_size_t, vp]),
        "heif_context_get_primary_image_handle": (err, [vp, ctypes.POINTER(vp)]),
        "heif_context_set_max_decoding_threads": (None, [vp, ctypes.c_int]),
        "heif_image_handle_release": (None, [vp]),
        "heif_image_handle_get_width": (ctypes.c_int, [vp]),
        "heif_image_handle_get_height": (ctypes.c_int, [vp]),
        "heif_image_handle_has_alpha_channel": (ctypes.c_int, [vp]),
        "heif_image_handle_get_luma_bits_per_pixel": (ctypes.c_int, [vp]),
        "heif_image_handle_get_chroma_bits_per_pixel": (ctypes.c_int, [vp]),
        "heif_decode_image": (err, [vp, ctypes.POINTER(vp), ctypes.c_int, ctypes.c_int, ctypes.POINTER(_DecodingOptions)]),
        "heif_image_release": (None, [vp]),
        "heif_image_get_colorspace": (ctypes.c_int, [vp]),
        "heif_image_get_chroma_format": (ctypes.c_int, [vp]),
        "heif_image_get_bits_per_pixel_range": (ctypes.c_int, [vp, ctypes.c_int]),
        "heif_image_get_width": (ctypes.c_int, [vp, ctypes.c_int]),
        "heif_image_get_height": (ctypes.c_int, [vp, ctypes.c_int]),
        "heif_image_get_plane_readonly": (ctypes.POINTER(ctypes.c_uint8), [vp, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]),
        "heif_image_get_nclx_color_profile": (err, [vp, ctypes.POINTER(ctypes.POINTER(_Nclx))]),
        "heif_nclx_color_profile_free": (None, [ctypes.POINTER(_Nclx)]),
    }
    # Only for the worker threads of a single-image decode (libheif >= 1.18 / 1.20): without them, a plain decode.
    optional = {
        "heif_image_handle_get_item_id": (ctypes.c_uint32, [vp]),
        "heif_item_get_item_type": (ctypes.c_uint32, [vp, ctypes.c_uint32]),
        "heif_decoding_options_alloc": (ctypes.POINTER(_DecodingOptions), []),
        "heif_decoding_options_free": (None, [ctypes.POINTER(_DecodingOptions)]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)  # AttributeError: too old a libheif; the caller falls back
        fn.restype, fn.argtypes = restype, argtypes
    lib.has_codec_threads = all(hasattr(lib, name) for name in optional)
    if lib.has_codec_threads:
        for name, (restype, argtypes) in optional.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
    return lib


def libheif() -> ctypes.CDLL | None:
    """The bound library, or None where it cannot be used (said once in the log)."""
    global _lib
    if _lib is None:
        with _lib_lock:
            if _lib is None:
                why = "pillow-heif's libheif is not in this process's memory map"
                try:
                    _lib = _load() or False
                except Exception as exc:  # pragma: no cover - depends on the install (too old a libheif...)
                    why, _lib = f"{type(exc).__name__}: {exc}", False
                if _lib is False:
                    log.info("libheif planes unavailable (%s); HEIC decodes through pillow-heif's RGB", why)
    return _lib or None


class HeifDecodeError(Exception):
    """libheif refused the file: ``unreadable`` when the container could not be read (before any pixel),
    ``truncated`` when the coded data ended early."""

    def __init__(self, message: str, *, truncated: bool = False, unreadable: bool = False) -> None:
        super().__init__(message)
        self.truncated, self.unreadable = truncated, unreadable


def _check(error: _Error, *, unreadable: bool = False) -> None:
    if error.code:
        text = (error.message or b"").decode("utf-8", "replace")
        raise HeifDecodeError(text, unreadable=unreadable,
                              truncated=(error.code, error.subcode) == (_ERROR_DECODER_PLUGIN, _SUBERROR_END_OF_DATA))


class Planes:
    """The upright (irot/imir/clap applied by libheif) 8-bit Y, Cb, Cr planes of a photo and how to
    turn them into RGB. ``size`` is the photo's (width, height); the chroma planes may be smaller."""

    def __init__(self, y: np.ndarray, cb: np.ndarray, cr: np.ndarray, matrix: int, full_range: bool) -> None:
        self.y, self.cb, self.cr = y, cb, cr
        self.size = (y.shape[1], y.shape[0])
        self.matrix, self.full_range = matrix, full_range

    def rgb(self, box: tuple[int, int, int, int], f: int) -> np.ndarray:
        """RGB uint8 (H x W x 3) of the photo's pixels ``box`` = (x0, y0, x1, y1) averaged over f x f
        boxes (the last partial box left out, at least one pixel), as ``pixels.area_reduce`` of
        libheif's RGB would give, give or take a level: the average is taken before the conversion,
        which is linear up to clipping and rounding."""
        import cv2

        from utils.pixels import area_reduce

        x0, y0, x1, y1 = box
        luma = area_reduce(self.y[y0:y1, x0:x1], f)
        h, w = luma.shape
        # Chroma subsampling, 2 (4:2:0 both ways, 4:2:2 across) or 1; an odd side has ceil(side / 2) samples.
        sx, sy = (round(self.size[i] / self.cb.shape[1 - i]) for i in (0, 1))
        x1, y1 = min(x1, x0 + w * f), min(y1, y0 + h * f)  # the luma that went into the result
        cx0, cy0 = x0 // sx, y0 // sy
        cx1, cy1 = max(cx0 + 1, -(-x1 // sx)), max(cy0 + 1, -(-y1 // sy))
        # Chroma covering the same part of the photo, brought to the luma's grid: averaged when it is
        # finer than the result (the usual case), interpolated when coarser (a face region at full size).
        chroma = []
        for plane in (self.cb, self.cr):
            part = plane[cy0:cy1, cx0:cx1]
            if part.shape[:2] == (h, w):
                chroma.append(part)
            else:
                shrink = part.shape[0] >= h and part.shape[1] >= w
                chroma.append(cv2.resize(np.ascontiguousarray(part), (w, h),
                                         interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR))
        return ycbcr_to_rgb(luma, chroma[0], chroma[1], self.matrix, self.full_range)


def ycbcr_to_rgb(y: np.ndarray, cb: np.ndarray, cr: np.ndarray, matrix: int, full_range: bool) -> np.ndarray:
    """8-bit Y'CbCr -> R'G'B' (ITU-T H.273 equations, the matrix's Kr and Kb), rounded and clipped.

    One affine 3x4 transform in OpenCV (uint8 in, uint8 out, saturating): ~3 ms for an 800 px image,
    where the same arithmetic in numpy float32 took ~15 ms."""
    import cv2

    kr, kb = MATRICES[matrix]
    kg = 1.0 - kr - kb
    ys, cs = (1.0, 1.0) if full_range else (255.0 / 219.0, 255.0 / 224.0)  # studio swing: Y 16..235, C 16..240
    y0 = 0.0 if full_range else 16.0
    rows = [(ys, 0.0, (2.0 - 2.0 * kr) * cs),                                        # R
            (ys, -(2.0 * kb * (1.0 - kb) / kg) * cs, -(2.0 * kr * (1.0 - kr) / kg) * cs),  # G
            (ys, (2.0 - 2.0 * kb) * cs, 0.0)]                                        # B
    m = np.array([[a, b, c, -a * y0 - (b + c) * 128.0] for a, b, c in rows], np.float32)
    return cv2.transform(cv2.merge([np.ascontiguousarray(y), np.ascontiguousarray(cb), np.ascontiguousarray(cr)]), m)


def _codec_threads_options(lib: ctypes.CDLL, threads: int):
    """Decoding options asking the HEVC decoder for ``threads`` worker threads, or None (libheif's
    defaults) when this libheif's struct is older or not laid out as ``_DecodingOptions`` says: every
    field before ``num_codec_threads`` must hold libheif's documented default. Free with
    ``heif_decoding_options_free``."""
    opts = lib.heif_decoding_options_alloc()
    if not opts:
        return None
    o = opts.contents
    cco = o.color_conversion_options
    if (o.version >= 8 and o.ignore_transformations == 0 and not o.start_progress and not o.progress_user_data
            and not o.decoder_id and cco.version >= 1 and cco.preferred_chroma_upsampling_algorithm in (1, 2, 3)
            and not o.cancel_decoding and not o.output_image_nclx_profile
            and o.num_library_threads == 0 and o.num_codec_threads == 0):
        o.num_codec_threads = threads
        return opts
    lib.heif_decoding_options_free(opts)
    return None


def decode_planes(data: bytes, check: Callable[[int, int], None]) -> Planes | None:
    """Decode the primary image of ``data`` into ``Planes``; ``check(width, height)`` runs before any
    pixel is decoded (the caller's pixel limit). None when this path does not apply (see the module
    docstring); ``HeifDecodeError`` when libheif refuses the file."""
    lib = libheif()
    if lib is None:
        return None
    data = bytes(data)  # libheif reads it in place ("without copy"): an immutable object that outlives ctx
    vp = ctypes.c_void_p
    ctx, handle, image = lib.heif_context_alloc(), vp(), vp()
    if not ctx:
        return None
    try:
        # As pillow-heif does: a grid's tiles decode in parallel (the last photo of an upload uses both cores).
        from pillow_heif import options

        lib.heif_context_set_max_decoding_threads(ctx, int(options.DECODE_THREADS))
        _check(lib.heif_context_read_from_memory_without_copy(ctx, data, len(data), None), unreadable=True)
        _check(lib.heif_context_get_primary_image_handle(ctx, ctypes.byref(handle)), unreadable=True)
        check(lib.heif_image_handle_get_width(handle), lib.heif_image_handle_get_height(handle))
        if not _handle_supported(lib, handle):
            return None
        _decode(lib, ctx, handle, image, int(options.DECODE_THREADS))
        colour = _colour(lib, image)
        return None if colour is None else Planes(*_copy_planes(lib, image), *colour)
    finally:
        if image:
            lib.heif_image_release(image)
        if handle:
            lib.heif_image_handle_release(handle)
        lib.heif_context_free(ctx)


def _handle_supported(lib: ctypes.CDLL, handle: ctypes.c_void_p) -> bool:
    """No alpha, 8-bit luma and chroma (or none): what ``Planes`` can hold, known before decoding."""
    return not (lib.heif_image_handle_has_alpha_channel(handle)
                or lib.heif_image_handle_get_luma_bits_per_pixel(handle) != 8
                or lib.heif_image_handle_get_chroma_bits_per_pixel(handle) not in (8, -1))


def _decode(lib: ctypes.CDLL, ctx: int, handle: ctypes.c_void_p, image: ctypes.c_void_p, threads: int) -> None:
    """Decode ``handle`` into ``image`` in the decoder's own colourspace and chroma."""
    # One HEVC image (not a grid, whose tiles already decode in parallel): libde265 worker threads,
    # so that the last photo of an upload, decoded alone, uses both cores (149 ms instead of 254 ms
    # wall for 12 MP here, the same CPU). Tiles would pay ~20 ms CPU starting them per tile.
    opts = None
    if lib.has_codec_threads and lib.heif_item_get_item_type(ctx, lib.heif_image_handle_get_item_id(handle)) == _HVC1:
        opts = _codec_threads_options(lib, max(1, threads))
    try:
        # "undefined": no conversion, which is the point of this path.
        _check(lib.heif_decode_image(handle, ctypes.byref(image), _COLORSPACE_UNDEFINED, _CHROMA_UNDEFINED, opts))
    finally:
        if opts:
            lib.heif_decoding_options_free(opts)


def _colour(lib: ctypes.CDLL, image: ctypes.c_void_p) -> tuple[int, bool] | None:
    """(matrix_coefficients, full range) of 8-bit YCbCr planes the table handles, else None."""
    if (lib.heif_image_get_colorspace(image) != _COLORSPACE_YCBCR
            or lib.heif_image_get_chroma_format(image) not in (_CHROMA_420, _CHROMA_422, _CHROMA_444)
            or any(lib.heif_image_get_bits_per_pixel_range(image, c) != 8 for c in (_CHANNEL_Y, _CHANNEL_CB, _CHANNEL_CR))):
        return None
    nclx = ctypes.POINTER(_Nclx)()
    if lib.heif_image_get_nclx_color_profile(image, ctypes.byref(nclx)).code == 0 and nclx:
        matrix, full_range = int(nclx.contents.matrix_coefficients), bool(nclx.contents.full_range_flag)
        lib.heif_nclx_color_profile_free(nclx)
    else:  # none at all (libheif gives one from the file's box or the HEVC stream): its default
        matrix, full_range = 2, True
    return (matrix, full_range) if matrix in MATRICES else None


def _copy_planes(lib: ctypes.CDLL, image: ctypes.c_void_p) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Y, Cb, Cr copied out of libheif's buffers (freed with ``image``, so nothing may point into them)."""
    planes = []
    for channel in (_CHANNEL_Y, _CHANNEL_CB, _CHANNEL_CR):
        stride = ctypes.c_int()
        ptr = lib.heif_image_get_plane_readonly(image, channel, ctypes.byref(stride))
        w, h = lib.heif_image_get_width(image, channel), lib.heif_image_get_height(image, channel)
        if not ptr or w <= 0 or h <= 0 or stride.value < w:
            raise HeifDecodeError("libheif returned no plane data")
        planes.append(np.ctypeslib.as_array(ptr, shape=(h, stride.value))[:, :w].copy())
    y, cb, cr = planes
    if cb.shape != cr.shape or cb.shape[0] > y.shape[0] or cb.shape[1] > y.shape[1]:
        raise HeifDecodeError(f"unexpected plane sizes {y.shape}, {cb.shape}, {cr.shape}")
    return y, cb, cr
