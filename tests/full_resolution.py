"""The upload checks as they were before issue 15, kept ONLY as a reference for tests and benchmarks.

``FullResolutionFaceService`` decodes every photo at full resolution, checks it there and keeps the
decoded photo until the whole upload is done: the verdicts of ``FaceService`` (reduced decoding) are
compared with it (tests/test_faces_reduced.py) and bench/bench_faces.py measures both in one run.
Production never imports this module.
"""
from __future__ import annotations

import logging

import numpy as np
from utils.errors import ImageRejected
from utils.faces import FaceService
from utils.faces.analysis import (Analysed, Reject, aligned_crop, estimate_yaw, face_brightness, face_sharpness,
                                  image_signature)
from utils.images import decode_reduced

log = logging.getLogger(__name__)


class FullResolutionFaceService(FaceService):
    """FaceService with the pre-issue-15 per-photo analysis (body copied from that version)."""

    def _analyse(self, index: int, filename: str, data: bytes) -> Analysed:
        s = self.settings
        backend = self._require()
        item = Analysed(index=index, filename=filename)
        try:
            try:
                photo = decode_reduced(data, filename, max_pixels=s.max_pixels, min_side=None)
            except ImageRejected as exc:
                raise Reject(exc.code, exc.message) from None
            # ImageOps.exif_transpose, which the old decode called, copied the photo even when upright.
            image = photo.image if photo.orientation != 1 else photo.image.copy()
            item.image = image  # kept until the report is built, as the old path did
            item.size = image.size
            item.preview = None  # not made by the old path: its cost would blur the comparison
            item.thumb = image_signature(image)
            rgb = np.asarray(image)
            dets = backend.detect(rgb)
            if not dets:
                raise Reject("no_face", f"{filename}: no face was found; use a photo where your face is clearly visible")
            if len(dets) > 1:
                raise Reject("multiple_faces", f"{filename}: {len(dets)} faces were found; use photos with only you in them")
            det = dets[0]
            h, w = rgb.shape[:2]
            side = min(det.width, det.height)
            fraction = det.width * det.height / float(w * h)
            sharp = face_sharpness(rgb, det.box)
            bright = face_brightness(rgb, det.box)
            yaw = estimate_yaw(det.left_eye, det.right_eye, det.nose)
            item.metrics = {"face_px": round(side, 1), "face_fraction": round(fraction, 4),
                            "sharpness": round(sharp, 1), "brightness": round(bright, 1), "yaw_degrees": round(yaw, 1)}
            if side < s.min_face_px or fraction < s.min_face_fraction:
                raise Reject("face_too_small", (
                    f"{filename}: the face is too small ({side:.0f} px, {fraction:.1%} of the photo; need at least "
                    f"{s.min_face_px} px and {s.min_face_fraction:.0%}); move closer or use a larger photo"))
            # Exposure before sharpness: a dark face has little contrast, hence a low Laplacian variance,
            # and "too dark" is the reason the user can act on.
            if bright < s.min_brightness:
                raise Reject("too_dark", f"{filename}: the face is too dark (brightness {bright:.0f}, need at least "
                                          f"{s.min_brightness:.0f}); use more light")
            if bright > s.max_brightness:
                raise Reject("too_bright", f"{filename}: the face is overexposed (brightness {bright:.0f}, at most "
                                            f"{s.max_brightness:.0f}); avoid direct light or flash")
            if sharp < s.min_sharpness:
                raise Reject("blurry", f"{filename}: the face is blurry (sharpness {sharp:.0f}, need {s.min_sharpness:.0f}); "
                                        "hold the camera still and focus on your face")
            if abs(yaw) > s.max_yaw_degrees:
                raise Reject("not_frontal", f"{filename}: the head is turned too far (about {abs(yaw):.0f}°, at most "
                                             f"{s.max_yaw_degrees:.0f}°); look towards the camera")
            # Embedded here, in the worker, so that one thread's descriptor overlaps another's detection
            # (a duplicate costs one extra descriptor, ~10 ms with the torch engine).
            item.embedding = np.asarray(backend.embed_prepared([backend.prepare_embedding(rgb, det)])[0],
                                        dtype=np.float32)
            item.crop = aligned_crop(rgb, det, size=s.face_crop_size, scale=s.face_crop_scale)
            if side * s.face_crop_scale < s.face_crop_size / 2:
                item.warnings.append({"code": "low_resolution", "message": (
                    f"{filename}: the face is only {side:.0f} px wide; a closer or larger photo gives a sharper likeness")})
        except Reject as rej:
            item.reject = rej
        except Exception as exc:  # one odd file must not fail the whole upload with a 500
            log.warning("selfie %d could not be analysed (%s)", index, type(exc).__name__)
            item.reject = Reject("analysis_failed", f"{filename}: the photo could not be analysed; try another one")
        return item
