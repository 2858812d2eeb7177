"""Training pictures from a session's selfies: squares around the face box at a few scales (close-up,
head-and-shoulders), each also mirrored. Pure image work; the service decodes the originals upright and
finds the face boxes."""
from __future__ import annotations

from typing import Iterable, Sequence

# Square side as a multiple of the face box side: a close-up, a head, head-and-shoulders.
CROP_SCALES = (1.6, 2.2, 3.0)


def centre_box(width: int, height: int) -> tuple[float, float, float, float]:
    """A stand-in face box when no face is found (a selfie double): the middle half of the picture."""
    side = min(width, height) / 2
    cx, cy = width / 2, height / 2
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def face_squares(image, box: Sequence[float], resolution: int, scales: Iterable[float] = CROP_SCALES) -> list:
    """``image`` (PIL RGB, upright) cropped to squares centred on ``box`` (x0, y0, x1, y1) at each scale,
    shifted to stay inside the picture (clipped when larger), resized to ``resolution`` px."""
    from PIL import Image
    w, h = image.size
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    face = max(x1 - x0, y1 - y0, 1.0)
    out = []
    for s in scales:
        side = min(face * s, w, h)
        left = min(max(cx - side / 2, 0.0), w - side)
        top = min(max(cy - side / 2, 0.0), h - side)
        crop = image.crop((round(left), round(top), round(left + side), round(top + side)))
        out.append(crop.resize((resolution, resolution), Image.Resampling.LANCZOS))
    return out


def training_images(faces: Sequence[tuple[object, Sequence[float]]], resolution: int, flip: bool = True) -> list:
    """Every (image, face box)'s squares, and each mirrored: the training set."""
    from PIL import ImageOps
    out = []
    for image, box in faces:
        for sq in face_squares(image, box, resolution):
            out.append(sq)
            if flip:
                out.append(ImageOps.mirror(sq))
    return out
