"""``python generate_twin.py evaluate``: the likeness report of a folder of portraits against a folder of
selfies, with the configured face backend."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

from utils.config import Settings
from utils.errors import InvalidRequest, TwinError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".bmp", ".tif", ".tiff"}


def default_face_service(settings: Settings):
    from utils.faces import FaceService
    from utils.service.face_setup import face_settings, prepare_face_models
    fs = face_settings(settings)       # ArcFace variants on the tiny profile: the tiny stand-in pack
    prepare_face_models(fs)
    return FaceService(fs)


def image_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES] \
        if folder.is_dir() else []


def evaluate(selfies: Path, images: Path, settings: Settings, faces) -> dict[str, Any]:
    """Likeness report: each image's similarity to the selfies' template with the configured face backend,
    and the selfies' own agreement (median pairwise similarity: the best a portrait can expect)."""
    from utils.images import decode_image
    files = [(p.name, p.read_bytes()) for p in image_files(selfies)]
    if not files:
        raise InvalidRequest(f"no images found in --selfies {str(selfies)!r}")
    targets = image_files(images)
    if not targets:
        raise InvalidRequest(f"no images found in --images {str(images)!r}")
    report = faces.validate_selfies(files)
    if report.template is None:
        raise InvalidRequest(f"none of the {len(files)} selfies in {str(selfies)!r} was accepted: "
                             + "; ".join(r.message for r in report.rejected[:5]))
    rows = []
    for p in targets:
        row: dict[str, Any] = {"image": p.name, "face_found": False, "identity_similarity": None}
        try:
            image = decode_image(p.read_bytes(), p.name, max_pixels=settings.max_pixels)
            score = faces.identity_similarity(image, report.template)
        except TwinError as e:
            row["error"] = e.message
            score = None
        if score is not None:
            row.update(face_found=True, identity_similarity=round(float(score), 4))
        rows.append(row)
    found = [r["identity_similarity"] for r in rows if r["face_found"]]
    self_sim = faces.self_similarity([a.embedding for a in report.accepted])
    return {
        "face_backend": report.backend, "face_model": report.model_name,
        "selfies": {"received": len(files), "accepted": len(report.accepted),
                    "rejected": {r.filename: r.code for r in report.rejected},
                    "self_similarity": None if self_sim is None else round(self_sim, 4)},
        "images": rows,
        "overall": {"images": len(rows), "faces_found": len(found),
                    "mean_similarity": round(float(sum(found) / len(found)), 4) if found else None,
                    "median_similarity": round(float(statistics.median(found)), 4) if found else None,
                    "min_similarity": min(found) if found else None, "max_similarity": max(found) if found else None},
        "scale": "identity_similarity in [0, 1]; 0.5 = the backend's same-person distance limit",
    }


def evaluate_main(argv: list[str], face_service_factory: Callable[[Settings], Any] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="generate_twin.py evaluate",
                                 description="Likeness report: portraits in --images against the selfies in --selfies.")
    ap.add_argument("--selfies", type=Path, required=True, help="folder of the person's selfies")
    ap.add_argument("--images", type=Path, required=True, help="folder of portraits to score")
    ap.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    args = ap.parse_args(argv)
    settings = Settings.from_env()
    try:
        faces = (face_service_factory or default_face_service)(settings)
        faces.setup()
        rep = evaluate(args.selfies, args.images, settings, faces)
    except TwinError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    sel = rep["selfies"]
    print(f"face backend: {rep['face_backend']} ({rep['face_model']}); scale: {rep['scale']}")
    print(f"selfies: {sel['accepted']} of {sel['received']} accepted; they agree at "
          + ("n/a (one selfie)" if sel["self_similarity"] is None else f"{sel['self_similarity']:.3f}"))
    for r in rep["images"]:
        print(f"  {r['image']}: " + (f"likeness {r['identity_similarity']:.3f}" if r["face_found"] else
                                     "no face found" + (f" ({r['error']})" if r.get("error") else "")))
    o = rep["overall"]
    print(f"overall: {o['faces_found']} of {o['images']} images with a face"
          + (f"; likeness mean {o['mean_similarity']:.3f}, median {o['median_similarity']:.3f}, "
             f"min {o['min_similarity']:.3f}, max {o['max_similarity']:.3f}" if o["faces_found"] else ""))
    if args.json:
        args.json.write_text(json.dumps(rep, indent=1))
    return 0
