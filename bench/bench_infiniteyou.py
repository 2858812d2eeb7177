"""InfiniteYou figures: CPU tiny s/image with and without the identity method, full-size parameter counts, and
full-size speed / peak VRAM on a GPU.

    .venv/bin/python bench/bench_infiniteyou.py              # CPU tiny: s/image, tiny-flux alone vs + InfiniteYou
    .venv/bin/python bench/bench_infiniteyou.py --params     # InfuseNet / projection / IR-SE50 parameters (meta)
    python bench/bench_infiniteyou.py --full-size [--jsonl rows.jsonl]     # GPU: FLUX.1-dev + InfiniteYou
    python bench/bench_infiniteyou.py --full-size --size small --device cpu --resolution 128 --steps 2   # dry run

CPU tiny (default): two DigitalTwinGenerators on the tiny-flux profile of one tiny folder, one without an
identity method and one with TWIN_IP_ADAPTER_VARIANT=infiniteyou (an identity from 3 stand-in selfies),
balanced and fast rows at 128², median of --repeats, one thread; prints both and the ratio. Also the
identity build time per selfie (IR-SE50 on the 112 px chip).

--params: InfuseNet from its published config (utils/models/flux_configs/InfiniteYou), the Resampler
projection of the reference code (1280 wide, 4 layers, 8 queries, 512 -> 4096) and IR-SE50, on the meta
device, with bf16 sizes; beside FLUX.1-dev's transformer for scale.

--full-size (GPU): the FLUX.1-dev pipeline with random weights from the real configs (bench_flux.pipeline),
InfuseNet from its config in bf16, FluxControlNetPipeline with the 8 tokens given to InfuseNet (the product's
``InfuseNet`` class) and the black control image (the reference's no-pose input), 1024², 28 steps, guidance 3.5,
batch 1, in each memory mode (full / quantized / offload as bench_flux applies them; InfuseNet stays on the
GPU in bf16). Per row: s/image, peak GPU memory. Published: bf16 peak about 43 GB (the reference README).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
INFU_CONFIG = REPO / "utils" / "models" / "flux_configs" / "InfiniteYou" / "InfuseNetModel"


# --- CPU tiny ------------------------------------------------------------------------------------------------
def tiny(args) -> int:
    import tempfile

    import numpy as np
    import torch
    torch.set_num_threads(1)
    from generate_twin import DigitalTwinGenerator
    from utils.config import Settings
    from utils.engine.request import GenerationRequest
    from utils.models.tiny import make_tiny
    tmp = Path(tempfile.mkdtemp(prefix="bench-iy-"))
    root = make_tiny(tmp / "tiny")
    base = Settings(data_dir=tmp / "data", model_dir=tmp / "none", tiny_model_dir=root, model_profile="tiny-flux",
                    warmup=False)
    plain = DigitalTwinGenerator(base).setup()
    iy = DigitalTwinGenerator(base.replace(ip_adapter_variant="infiniteyou")).setup()
    rng = np.random.default_rng(0)
    from PIL import Image
    crops = [Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)) for _ in range(3)]
    kps = [np.array([[200, 220], [312, 220], [256, 280], [215, 340], [297, 340]], np.float32) + i for i in range(3)]
    t0 = time.perf_counter()
    ident = iy.build_identity(crops, [np.ones(512, np.float32)] * 3, crop_keypoints=kps, keypoints=kps,
                              keypoint_index=[0, 1, 2])
    print(f"identity from 3 selfies (IR-SE50 tiny stand-in): {(time.perf_counter() - t0) / 3 * 1000:.1f} ms/selfie")
    for mode in ("balanced", "fast"):
        row = {}
        for name, gen, identity, extra in (("tiny-flux", plain, None, {}),
                                           ("tiny-flux + infiniteyou", iy, ident, {}),
                                           ("tiny-flux + infiniteyou + pose", iy, ident, {"pose": "frontal"})):
            req = GenerationRequest.from_dict({"prompt": "a portrait", "seed": 1, "quality_mode": mode, **extra},
                                              gen.settings).with_identity(identity)
            gen.generate(req)                      # warm-up
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                gen.generate(req)
                times.append(time.perf_counter() - t)
            row[name] = statistics.median(times)
            print(f"{mode:9} {name:31} {row[name]:.3f} s/image at 128² (median of {args.repeats})")
        print(f"{mode:9} ratio with / without InfiniteYou: {row['tiny-flux + infiniteyou'] / row['tiny-flux']:.2f}x")
    return 0


# --- parameter counts ------------------------------------------------------------------------------------------
def params(args) -> int:
    import torch
    from diffusers import FluxControlNetModel, FluxTransformer2DModel
    from utils.faces.irse50 import build
    from utils.models.infiniteyou import build_projection
    with torch.device("meta"):
        net = FluxControlNetModel.from_config(FluxControlNetModel.load_config(str(INFU_CONFIG)))
        proj = build_projection()
        flux = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(
            str(REPO / "utils" / "models" / "flux_configs" / "FLUX.1-dev" / "transformer")))
    irse = build()
    rows = [("InfuseNet (4 double + 10 single blocks)", net), ("projection (Resampler, 8 tokens)", proj),
            ("IR-SE50 ArcFace", irse), ("FLUX.1-dev transformer (scale)", flux)]
    for name, m in rows:
        n = sum(p.numel() for p in m.parameters())
        print(f"{name:42} {n:>15,} parameters  {n * 2 / 1e9:6.2f} GB bf16")
    n_net, n_flux = (sum(p.numel() for p in m.parameters()) for m in (net, flux))
    print(f"InfuseNet / FLUX.1-dev transformer: {n_net / n_flux:.2f}")
    return 0


# --- full size ---------------------------------------------------------------------------------------------------
def full_size(args) -> int:
    import torch
    from bench_flux import SMALL, apply_mode, gpu_gb, pipeline
    from diffusers import FluxControlNetModel, FluxControlNetPipeline
    from PIL import Image
    from utils.models.infiniteyou import build_projection, infusenet_class
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if device == "cpu":
        torch.set_num_threads(args.threads)
    out = open(args.jsonl, "a") if args.jsonl else None
    for mode in args.modes:
        if mode != "full" and not device.startswith("cuda"):
            _emit(out, {"part": "I", "mode": mode, "skipped": "a GPU memory mode: needs CUDA"})
            continue
        t0 = time.perf_counter()
        base = pipeline("FLUX.1-dev", device, dtype, args.size)
        cfg = dict(FluxControlNetModel.load_config(str(INFU_CONFIG)))
        if args.size == "small":
            cfg.update({**SMALL["transformer"], "num_layers": 1, "num_single_layers": 2})
        with torch.device(device):
            net = infusenet_class().from_config(cfg).to(dtype=dtype).eval()
            proj = build_projection(width=64 if args.size == "small" else 1280,
                                    out_dim=cfg["joint_attention_dim"]).to(dtype=dtype).eval()
        parts = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")}
        pipe = FluxControlNetPipeline(**parts, controlnet=net)
        pipe.set_progress_bar_config(disable=True)
        info = apply_mode(pipe, mode, device, dtype)
        net.to(device)
        with torch.inference_mode():
            net.identity_tokens = proj(torch.randn(1, 1, 512, device=device, dtype=dtype))
        row = {"part": "I", "model": "FLUX.1-dev + InfiniteYou", **info, "build_s": round(time.perf_counter() - t0, 1)}
        kw = dict(prompt="a portrait photo", width=args.resolution, height=args.resolution,
                  num_inference_steps=args.steps, guidance_scale=3.5, max_sequence_length=512,
                  control_image=Image.new("RGB", (args.resolution, args.resolution)),
                  controlnet_conditioning_scale=1.0, output_type="pil",
                  generator=torch.Generator("cpu").manual_seed(0))
        for _ in range(args.warmup):
            pipe(**kw)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            pipe(**kw)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        _emit(out, {**row, "resolution": args.resolution, "steps": args.steps,
                    "s_per_image": round(statistics.median(times), 3), "peak_gb": gpu_gb("max_memory_allocated")})
        del pipe, base, net
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return 0


def _emit(out, row: dict) -> None:
    print(json.dumps(row), flush=True)
    if out:
        out.write(json.dumps(row) + "\n")
        out.flush()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", action="store_true", help="full-size parameter counts from the real configs")
    ap.add_argument("--full-size", action="store_true", help="random FLUX.1-dev + InfiniteYou at real sizes (GPU)")
    ap.add_argument("--size", default="full", choices=("full", "small"), help="--full-size: small = CPU dry run")
    ap.add_argument("--device", help="--full-size: cuda | cpu (default cuda when present)")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--modes", nargs="+", default=["full", "quantized", "offload"],
                    choices=("full", "quantized", "offload"))
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--jsonl", help="append one JSON line per measured row")
    args = ap.parse_args(argv)
    if args.params:
        return params(args)
    if args.full_size:
        return full_size(args)
    return tiny(args)


if __name__ == "__main__":
    sys.exit(main())
