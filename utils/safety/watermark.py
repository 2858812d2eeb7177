"""An invisible watermark that outlives the C2PA manifest: stripping metadata or re-encoding removes the
manifest, not this mark.

The ``invisible-watermark`` package (``imwatermark``, the one SDXL's reference pipeline uses) with its
DWT-DCT-SVD method: the image's U (blue-difference) channel goes through a Haar DWT; in every 4×4 block
of the low band the largest singular value of the block's DCT is quantised to carry one bit of a fixed
48-bit message, repeated over the whole image. Why not the ``dwtDct`` method SDXL calls: measured on a
real photo (scikit-image's astronaut at 832×1216, docs/SAFETY.md), ``dwtDct`` survives a lossless PNG
re-encode but not one JPEG re-encode at quality 90 (PIL's default 4:2:0 chroma subsampling averages away
the single AC coefficient it moves; 21 of 48 bits agree, as on an unmarked photo), while ``dwtDctSvd``
reads back 48 of 48 bits after JPEG quality 90 and 75, at PSNR ~39.5 dB.

``embed(image)`` returns the marked RGB image; ``detect(image)`` returns a ``MarkReading`` (present, and
the share of the 48 bits that agree). An image under 256×256 pixels of area (imwatermark's floor: the
tiny test model's outputs, 256 px thumbnails) cannot carry the mark: ``embed`` returns it unchanged and
``detect`` says ``present=False, agreement=None``. Decoding is done on float pixels: feeding uint8 makes
OpenCV's colour conversion round the U channel and loses bits even on a lossless copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

#: The mark: 48 bits, 24 of them ones, so a decoder that reads a constant string from an unmarked image
#: (it tends to: every bit's vote sits near one half) agrees on half the bits, far below the threshold.
MESSAGE = 0x5F4E83A3129D
MESSAGE_BITS = tuple(int(b) for b in f"{MESSAGE:048b}")
METHOD = "dwtDctSvd"
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


def _bgr_float(image: Image.Image) -> np.ndarray:
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    return np.ascontiguousarray(rgb[:, :, ::-1])


def embed(image: Image.Image) -> Image.Image:
    """The image with the mark (RGB, same size); unchanged (as RGB) when it is too small to carry one."""
    rgb = image.convert("RGB")
    if not can_mark(rgb.size):
        return rgb
    from imwatermark import WatermarkEncoder

    encoder = WatermarkEncoder()
    encoder.set_watermark("bits", list(MESSAGE_BITS))
    marked = encoder.encode(_bgr_float(rgb), METHOD)
    return Image.fromarray(np.clip(np.rint(marked[:, :, ::-1]), 0, 255).astype(np.uint8))


def detect(image: Image.Image) -> MarkReading:
    if not can_mark(image.size):
        return MarkReading(False, None)
    from imwatermark import WatermarkDecoder

    bits = WatermarkDecoder("bits", len(MESSAGE_BITS)).decode(_bgr_float(image), METHOD)
    agreement = float(np.mean(np.asarray(bits, dtype=int) == np.asarray(MESSAGE_BITS)))
    return MarkReading(agreement >= THRESHOLD, agreement)
