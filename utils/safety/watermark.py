"""An invisible watermark that outlives the C2PA manifest: stripping metadata or re-encoding removes the
manifest, not this mark.

The method is DWT-DCT-SVD in the format of the ``invisible-watermark`` package (``imwatermark``, the one
SDXL's reference pipeline uses), method ``dwtDctSvd``: the image's U (blue-difference) channel goes
through a Haar DWT; in every 4×4 block of the low band the largest singular value is quantised (step
36) to carry one bit of a 48-bit message, repeated over the image in row-major block order; reading
takes each bit's majority over its blocks. Marks written here read with imwatermark's decoder and the
other way round (checked against invisible-watermark 0.2.0: 48/48 bits both ways).

Why this method, and why not the package itself (docs/SAFETY.md, "Invisible mark"):
- SDXL calls the package's ``dwtDct`` method, which does not survive one JPEG re-encode at quality 90 on
  a real photo (4:2:0 chroma subsampling averages away the single coefficient it moves: 21/48 bits, as on
  an unmarked photo); ``dwtDctSvd`` reads 48/48 after JPEG quality 90 and 75.
- Installing the package switches on diffusers' own SDXL watermarker in every pipeline built without
  ``add_watermarker=False``; that one raises "image too small" for outputs 256 px or more wide but under
  256×256 pixels of area (256×192 fails), and marks the same channel before us.
- The package loops over the blocks in Python (~0.3 s per 1024² image on 2 cores) and imports torch;
  this is the same arithmetic batched in numpy: the DCT of a block is orthonormal, so the block's largest
  singular value and its vectors are the DCT's, and moving that value by d adds d·u₀·v₀ᵀ to the block.
  (It also puts the DWT's detail bands back in their own places; imwatermark swaps H and V on the way
  back, which costs image quality and is invisible to its decoder.)

``embed(image)`` returns the marked RGB image; ``detect(image)`` a ``MarkReading`` (present, and the share
of the 48 bits that agree). An image under 256×256 pixels of area (the tiny model's outputs, 256 px
thumbnails) does not carry the mark: ``embed`` returns it unchanged, ``detect`` says ``agreement=None``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

#: The mark: 48 bits, 24 of them ones, so a decoder that reads a constant string from an unmarked image
#: (it tends to: every bit's vote sits near one half) agrees on half the bits, far below the threshold.
MESSAGE = 0x5F4E83A3129D
MESSAGE_BITS = tuple(int(b) for b in f"{MESSAGE:048b}")
SCALE = 36.0          # quantisation step of the singular value (imwatermark's dwtDctSvd default)
BLOCK = 4
#: Share of agreeing bits from which the mark counts as present: 41 of 48. An unmarked image agrees on
#: about half (chance of >= 41 by luck ~1e-7); a marked one after JPEG quality 75 still agrees on all 48.
THRESHOLD = 41 / 48
MIN_PIXELS = 256 * 256


@dataclass(frozen=True)
class MarkReading:
    present: bool
    agreement: float | None       # share of the 48 bits that match the message; None: image too small

    def to_json(self) -> dict:
        return {"present": self.present, "agreement": None if self.agreement is None else round(self.agreement, 3)}


def can_mark(size: tuple[int, int]) -> bool:
    return size[0] * size[1] >= MIN_PIXELS


def _blocks(band: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """The band's whole 4×4 blocks as [n, 4, 4], row-major (the order the bits are laid out in)."""
    rows, cols = band.shape[0] // BLOCK, band.shape[1] // BLOCK
    tiles = band[:rows * BLOCK, :cols * BLOCK].reshape(rows, BLOCK, cols, BLOCK).swapaxes(1, 2)
    return tiles.reshape(-1, BLOCK, BLOCK), (rows, cols)


def _u_band(image: Image.Image):
    """(YUV float32 image, the Haar DWT of its U channel cropped to a multiple of 4: (cA, (cH, cV, cD)))."""
    import cv2
    import pywt

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    yuv = cv2.cvtColor(np.ascontiguousarray(rgb[:, :, ::-1]), cv2.COLOR_BGR2YUV)
    h, w = (yuv.shape[0] // 4) * 4, (yuv.shape[1] // 4) * 4
    return yuv, pywt.dwt2(yuv[:h, :w, 1], "haar")


def embed(image: Image.Image) -> Image.Image:
    """The image with the mark (RGB, same size); unchanged (as RGB) when it is too small to carry one."""
    rgb = image.convert("RGB")
    if not can_mark(rgb.size):
        return rgb
    import cv2
    import pywt

    yuv, (low, details) = _u_band(rgb)
    blocks, (rows, cols) = _blocks(low)
    u, s, vt = np.linalg.svd(blocks)
    bits = np.resize(np.asarray(MESSAGE_BITS, dtype=np.float32), len(blocks))
    target = (np.floor(s[:, 0] / SCALE) + 0.25 + 0.5 * bits) * SCALE
    blocks = blocks + (target - s[:, 0])[:, None, None] * u[:, :, 0, None] * vt[:, None, 0, :]
    low = low.copy()
    low[:rows * BLOCK, :cols * BLOCK] = blocks.reshape(rows, cols, BLOCK, BLOCK).swapaxes(1, 2).reshape(
        rows * BLOCK, cols * BLOCK)
    h, w = low.shape[0] * 2, low.shape[1] * 2
    yuv[:h, :w, 1] = pywt.idwt2((low, details), "haar")
    bgr = cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR)
    return Image.fromarray(np.clip(np.rint(bgr[:, :, ::-1]), 0, 255).astype(np.uint8))


def detect(image: Image.Image) -> MarkReading:
    if not can_mark(image.size):
        return MarkReading(False, None)
    _, (low, _) = _u_band(image)
    blocks, _ = _blocks(low)
    votes = (np.linalg.svd(blocks, compute_uv=False)[:, 0] % SCALE) > SCALE / 2
    n = len(MESSAGE_BITS)
    per_bit = np.bincount(np.arange(len(votes)) % n, weights=votes, minlength=n) / np.bincount(
        np.arange(len(votes)) % n, minlength=n)
    # imwatermark's rule: a bit is 1 when its vote share, scaled to 0-255, is above 127.
    decoded = (per_bit * 255 > 127).astype(int)
    agreement = float(np.mean(decoded == np.asarray(MESSAGE_BITS)))
    return MarkReading(agreement >= THRESHOLD, agreement)
