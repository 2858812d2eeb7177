"""Likeness costs on CPU: face restoration per face, and best-of-N against plain generation.

    /work/main/.venv/bin/python bench/bench_likeness.py [--repeat 5] [--full-size] [--candidates 4 8]

1. Restoration of the astronaut photo (scikit-image's wheel) at 512², dlib key points, each model's ONNX
   stand-in (an unsharp mask with the exports' I/O): per face, split into model time and the rest
   (alignment, warp, paste-back). ``--full-size`` also times a random-weight ONNX graph of GFPGAN's size
   (same I/O, a U-Net encoder + StyleGAN2-width decoder of plain 3×3 convolutions at GFPGAN 1.4's
   channel widths: 64 at 512² … 512 at 8²); it is not GFPGAN's exact architecture, only its scale.
2. Best-of-N on the tiny profile with the real dlib face service, in-process (TWIN_GENERATOR_PROCESS=0):
   job wall time of num_images=1 with candidates=N over the same job with candidates=1, best of
   ``repeat``. The overhead over N plain images is scoring (one detection + embedding per candidate).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from tests import photos  # noqa: E402
from utils.config import Settings  # noqa: E402
from utils.faces import FaceService  # noqa: E402
from utils.faces.restore import (RESTORE_MODELS, OnnxRestoreModel, alignment_matrix, detection_points,  # noqa: E402
                                 paste_back, warp_face, write_standin)

# GFPGAN 1.4 (clean arch, channel_multiplier 2): channel width per resolution of the U-Net and decoder.
GFPGAN_WIDTHS = {512: 64, 256: 128, 128: 256, 64: 512, 32: 512, 16: 512, 8: 512}


def write_gfpgan_sized(path: Path) -> Path:
    """Random-weight conv graph with GFPGAN's I/O and channel widths (see the module doc)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    k = [0]

    def conv(x: str, cin: int, cout: int, stride: int = 1) -> str:
        k[0] += 1
        w, b, y = f"w{k[0]}", f"b{k[0]}", f"c{k[0]}"
        inits.append(numpy_helper.from_array((rng.standard_normal((cout, cin, 3, 3)) * (1 / np.sqrt(cin * 9)))
                                             .astype(np.float32), w))
        inits.append(numpy_helper.from_array(np.zeros(cout, np.float32), b))
        nodes.append(helper.make_node("Conv", [x, w, b], [y], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                      strides=[stride, stride]))
        r = f"r{k[0]}"
        nodes.append(helper.make_node("LeakyRelu", [y], [r], alpha=0.2))
        return r

    x = conv("input", 3, GFPGAN_WIDTHS[512])
    sides = sorted(GFPGAN_WIDTHS, reverse=True)
    for hi, lo in zip(sides, sides[1:]):                 # encoder: one conv per level + a strided one
        x = conv(x, GFPGAN_WIDTHS[hi], GFPGAN_WIDTHS[hi])
        x = conv(x, GFPGAN_WIDTHS[hi], GFPGAN_WIDTHS[lo], stride=2)
    for lo, hi in zip(sides[::-1], sides[::-1][1:]):     # decoder: upsample + two convs per level
        k[0] += 1
        up = f"u{k[0]}"
        inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), f"s{k[0]}"))
        nodes.append(helper.make_node("Resize", [x, "", f"s{k[0]}"], [up], mode="nearest"))
        x = conv(up, GFPGAN_WIDTHS[lo], GFPGAN_WIDTHS[hi])
        x = conv(x, GFPGAN_WIDTHS[hi], GFPGAN_WIDTHS[hi])
    k[0] += 1
    inits.append(numpy_helper.from_array((rng.standard_normal((3, 64, 1, 1)) * 0.05).astype(np.float32), "wout"))
    nodes += [helper.make_node("Conv", [x, "wout"], ["rgb"], kernel_shape=[1, 1]),
              helper.make_node("Tanh", ["rgb"], ["output"])]
    graph = helper.make_graph(nodes, "gfpgan_sized", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                   [1, 3, 512, 512])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 512, 512])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    params = sum(int(np.prod(t.dims)) for t in inits)
    print(f"  GFPGAN-sized graph: {params / 1e6:.1f} M parameters, {path.stat().st_size / 1e6:.0f} MB")
    return path


def time_restore(model: OnnxRestoreModel, image, dets, repeat: int) -> tuple[float, float]:
    """(median ms per face in the model, median ms per face for alignment + warp + paste-back)."""
    rgb = np.asarray(image)
    model_ms, rest_ms = [], []
    for _ in range(repeat):
        for det in dets:
            t0 = time.perf_counter()
            src, dst = detection_points(det, model.size)
            m = alignment_matrix(src, dst)
            face = warp_face(rgb, m, model.size)
            t1 = time.perf_counter()
            out = model(face, 0.5)
            t2 = time.perf_counter()
            paste_back(rgb, out, m)
            t3 = time.perf_counter()
            model_ms.append((t2 - t1) * 1000)
            rest_ms.append((t1 - t0 + t3 - t2) * 1000)
    return statistics.median(model_ms), statistics.median(rest_ms)


def bench_restore(args, faces: FaceService, tmp: Path) -> None:
    image = photos.astronaut().resize((512, 512))
    dets = faces.detect_faces(image)
    print(f"restoration, astronaut 512² ({len(dets)} face, dlib key points), median of {args.repeat}:")
    for name, spec in RESTORE_MODELS.items():
        model = OnnxRestoreModel(write_standin(tmp / spec.filename, name), ["CPUExecutionProvider"])
        model(np.zeros((512, 512, 3), np.uint8))          # first run allocates
        m_ms, r_ms = time_restore(model, image, dets, args.repeat)
        print(f"  {name:10s} stand-in: model {m_ms:7.1f} ms + align/warp/paste {r_ms:5.1f} ms = {m_ms + r_ms:7.1f} ms per face")
    if args.full_size:
        model = OnnxRestoreModel(write_gfpgan_sized(tmp / "gfpgan_sized.onnx"), ["CPUExecutionProvider"])
        model(np.zeros((512, 512, 3), np.uint8))
        m_ms, r_ms = time_restore(model, image, dets, max(1, args.repeat // 2))
        print(f"  GFPGAN-sized random graph: model {m_ms:7.1f} ms + align/warp/paste {r_ms:5.1f} ms per face")


def bench_best_of(args, faces: FaceService, tmp: Path) -> None:
    import torch
    torch.set_num_threads(1)
    from app import create_app
    from model_loader import make_tiny
    from tests.photos import selfie_set
    tiny = make_tiny(tmp / "tiny")
    settings = Settings(data_dir=tmp / "data", tiny_model_dir=tiny, model_profile="tiny", warmup=False,
                        generator_process=False, retention_hours=0, face_backend="dlib", max_steps=4,
                        rate_limit_generate="100000/minute", rate_limit_upload="100000/minute")
    app = create_app(settings, faces=faces)
    rt = app.extensions["twin"]
    assert rt.wait_ready(120), rt.setup_error
    c = app.test_client()
    import io
    files = {"files": [(io.BytesIO(b), n) for n, b in selfie_set(3)]}
    assert c.post("/upload", data=files, content_type="multipart/form-data").status_code == 200

    def run(candidates: int, num_images: int = 1) -> float:
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            job = c.post("/generate", json={"prompt": "a portrait", "num_images": num_images, "candidates": candidates,
                                            "seed": 7, "quality_mode": "fast", "width": 128, "height": 128}).json
            while True:
                j = c.get(f"/status/{job['id']}").json
                if j["status"] in ("succeeded", "failed", "canceled"):
                    break
                time.sleep(0.005)
            assert j["status"] == "succeeded", j
            best = min(best, time.perf_counter() - t0)
        return best

    def plain(n: int) -> float:
        """N images without scoring: jobs of num_images ≤ 4 (the per-call limit), back to back."""
        return sum(run(k, k) for k in [4] * (n // 4) + ([n % 4] if n % 4 else []))

    print(f"best-of-N, tiny profile 128², 4 steps, dlib scoring, in-process, best of {args.repeat}:")
    base = run(1)
    print(f"  candidates=1: {base * 1000:7.1f} ms (plain generation of 1 image)")
    for n in args.candidates:
        t, p = run(n), plain(n)
        print(f"  candidates={n}: {t * 1000:7.1f} ms = {t / base:4.2f}x one image; plain {n} images {p * 1000:7.1f} ms; "
              f"best-of-{n} / plain-{n} = {t / p:4.2f}")
    rt.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--full-size", action="store_true", help="also time a random GFPGAN-sized ONNX graph")
    ap.add_argument("--candidates", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--skip-best-of", action="store_true")
    args = ap.parse_args()
    faces = FaceService(Settings(face_backend="dlib")).setup()
    with tempfile.TemporaryDirectory() as d:
        bench_restore(args, faces, Path(d))
        if not args.skip_best_of:
            bench_best_of(args, faces, Path(d))


if __name__ == "__main__":
    main()
