"""Selfie validation + embedding, end to end on CPU: 15 selfies of 1024 px (JPEG variants of the test photos).

    /work/venv/bin/python bench/bench_faces.py [--backend dlib|insightface] [--threads 1 2] [--repeat 3]
                                               [--descriptor torch dlib] [--stages]

Prints set-up time, then for each descriptor engine (dlib backend) and thread count the best-of-``repeat``
total seconds for the 15 files and the per-image milliseconds, and the ratio of each run to the dlib
engine's best, all measured in this one run. Goal: ≤ 3 s for 15 on a 2-core machine (dlib backend).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import photos  # noqa: E402
from utils.config import Settings  # noqa: E402
from utils.faces import FaceService  # noqa: E402


def selfies_1024() -> list[tuple[str, bytes]]:
    files = [(f"selfie_{i:02d}.jpg", photos.to_bytes(photos.astronaut_variant(i, 1024))) for i in range(14)]
    files.append(("other_person.jpg", photos.to_bytes(photos.tom_hanks(683).resize((1024, 1024)))))
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="dlib", choices=("dlib", "insightface", "auto"))
    ap.add_argument("--insightface-dir", default=None, help="pack folder for --backend insightface")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--stages", action="store_true", help="also print a per-stage breakdown")
    ap.add_argument("--detect-side", type=int, default=None, help="override TWIN_FACE_DETECT_SIDE")
    ap.add_argument("--descriptor", nargs="+", default=["torch", "dlib"], choices=("torch", "dlib"),
                    help="engines of the dlib backend's descriptor net to compare")
    args = ap.parse_args()

    files = selfies_1024()
    print(f"{len(files)} selfies, 1024x1024 JPEG, {sum(len(d) for _, d in files) / 1e6:.1f} MB in all")
    results: dict[tuple[str, int], float] = {}
    for descriptor, threads in [(d, t) for d in args.descriptor for t in args.threads]:
        extra = {"face_detect_side": args.detect_side} if args.detect_side else {}
        settings = Settings(face_backend=args.backend, face_threads=threads, face_descriptor=descriptor, **extra,
                            insightface_model_dir=Path(args.insightface_dir) if args.insightface_dir else None)
        t0 = time.perf_counter()
        service = FaceService(settings).setup()
        setup_s = time.perf_counter() - t0
        best, best_cpu = float("inf"), float("inf")
        for _ in range(args.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            report = service.validate_selfies(files)
            best = min(best, time.perf_counter() - t0)
            best_cpu = min(best_cpu, time.process_time() - c0)
        doc = report.to_json()
        rejected = {f["filename"]: f["code"] for f in doc["files"] if f["status"] == "rejected"}
        results[descriptor, threads] = best
        print(f"backend={service.backend_name} model={service.model_name} descriptor={descriptor} threads={threads} "
              f"detect_side={settings.face_detect_side} setup={setup_s:.2f}s")
        print(f"  total {best:.2f} s for {len(files)} (best of {args.repeat}), {best / len(files) * 1000:.0f} ms per image; "
              f"CPU time {best_cpu:.2f} s (other load on the machine shows as wall > CPU); "
              f"accepted {doc['counts']['accepted']}, rejected {rejected}")
        service.close()
    dlib_runs = [v for (d, _), v in results.items() if d == "dlib"]
    if dlib_runs and args.backend != "insightface":
        base = min(dlib_runs)
        print("ratio to the dlib engine's best (lower is faster): " + ", ".join(
            f"{d}/{t} thread(s) {v / base:.2f}" for (d, t), v in results.items()))
    if args.stages:
        for descriptor in args.descriptor:
            stages(files, args.backend, descriptor)


def stages(files: list[tuple[str, bytes]], backend: str, descriptor: str) -> None:
    """Per-stage milliseconds per image, one thread: where the time goes."""
    import numpy as np

    from utils.faces.service import aligned_crop, face_sharpness, image_signature
    from utils.images import decode_image

    service = FaceService(Settings(face_backend=backend, face_threads=1, face_descriptor=descriptor)).setup()
    b, s = service.backend, service.settings
    totals: dict[str, float] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0
        return out

    for name, data in files:
        im = timed("decode", lambda: decode_image(data, name, max_pixels=s.max_pixels))
        timed("duplicate fingerprint", lambda: image_signature(im))
        rgb = np.asarray(im)
        (det, *_) = timed("detect + landmarks", lambda: b.detect(rgb))
        timed("sharpness", lambda: face_sharpness(rgb, det.box))
        timed("IP-Adapter crop", lambda: aligned_crop(rgb, det, size=s.face_crop_size, scale=s.face_crop_scale))
        prep = timed("embedding input", lambda: b.prepare_embedding(rgb, det))
        timed("embedding", lambda: b.embed_prepared([prep]))
    print(f"stages, descriptor={descriptor}, ms per image (1 thread): " + ", ".join(f"{k} {v / len(files) * 1000:.0f}" for k, v in totals.items()))
    service.close()


if __name__ == "__main__":
    main()
