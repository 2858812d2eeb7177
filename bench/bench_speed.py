"""Speed plan figures (utils/engine/speed: TWIN_COMPILE, TWIN_QUANTIZE, TWIN_STEP_CACHE, the fp16-fix VAE).

    python bench/bench_speed.py                       # CPU, tiny model, through DigitalTwinGenerator (default)
    python bench/bench_speed.py --full-size --variant plus-face --compile regional --quantize fp8   # part D
    python bench/bench_speed.py --vae                 # part E: VAE decode, stock fp32 upcast vs fp16-fix
    python bench/bench_speed.py --cold-start          # part G: process start -> ready from a layout on disk

The tiny run prints, per setting, the first-call (warm-up) time, s/call, the ratio to eager and the largest
pixel difference from the eager image at the same seed; with int8, per identity variant, the identity effect
(mean pixel change with vs without the identity) quantized and unquantized. The full-size parts (driven by
bench/gpu_suite.py --suite speed) build SDXL from its configs with random weights, and print per row: s/image,
peak GPU memory, warm-up seconds and max |delta| of the final latents against eager at the same seed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

SELFIE_KPS = [[[40, 50], [72, 54], [55, 70], [43, 90], [68, 93]], [[30, 40], [60, 40], [48, 58], [36, 76], [58, 76]]]


def write_row(path, row: dict) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


# --- CPU, tiny model --------------------------------------------------------------------------------------

def tiny_identity(gen, variant: str):
    import numpy as np
    from tests.fixtures.models import arcface_vectors, make_crops
    if variant in ("plus-face", "plain"):
        return gen.build_identity(make_crops(3), None, face_model=None)
    if variant == "instantid":
        return gen.build_identity(None, arcface_vectors(2), face_model="bench", embedding_norms=[21.0, 23.5],
                                  keypoints=[np.array(k, np.float32) for k in SELFIE_KPS], keypoint_index=[0, 3])
    return gen.build_identity(make_crops(3), arcface_vectors(3), face_model="bench")


def tiny_run(settings, variant: str, identity=None):
    """(setup s, first-call s, images with identity, images without, one timed call(), identity)."""
    import numpy as np
    from utils.engine.generator import DigitalTwinGenerator
    from utils.engine.request import GenerationRequest
    t0 = time.perf_counter()
    gen = DigitalTwinGenerator(settings.replace(ip_adapter_variant=variant)).setup()
    setup_s = time.perf_counter() - t0
    ident = identity if identity is not None else tiny_identity(gen, variant)

    def call(ident=ident):
        req = GenerationRequest.from_dict({"prompt": "a portrait of a person", "seed": 7, "style": "none",
                                           "quality_mode": "balanced"}, gen.settings).with_identity(ident)
        return np.stack([np.asarray(im, dtype=np.float32) for im in gen.generate(req).images])

    def timed() -> float:
        t0 = time.perf_counter()
        call()
        return time.perf_counter() - t0
    t0 = time.perf_counter()
    with_id = call()
    first = time.perf_counter() - t0
    return setup_s, first, with_id, call(None), timed, ident


def round_robin(timers: dict, rounds: int) -> dict:
    """Median seconds per setting, the settings timed in turn each round: on a shared, busy CPU a slow
    spell then costs every setting alike instead of the one measured during it."""
    times: dict = {k: [] for k in timers}
    for _ in range(rounds):
        for k, timed in timers.items():
            times[k].append(timed())
    return {k: statistics.median(v) for k, v in times.items()}


def bench_tiny(args) -> None:
    import numpy as np
    import torch
    from model_loader import make_tiny
    from utils.config import Settings
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench-speed-"))
    base = Settings(data_dir=root / "data", model_dir=root / "none", tiny_model_dir=make_tiny(root / "tiny-model"),
                    model_profile="tiny", warmup=False, max_steps=args.steps)
    print(f"tiny SDXL on the CPU ({args.threads} thread(s)), {args.steps} steps with CFG, seed 7, median of "
          f"{args.repeats} rounds (settings in turn); delta = largest pixel difference (0-255) from eager")
    rows = [("eager", {})]
    rows += [(f"step_cache={k}", {"step_cache": k}) for k in (2, 3)]
    if not args.no_compile:
        rows.append(("compile=regional", {"compile": "regional", "compile_cache_dir": root / "cc"}))
        rows.append(("compile=regional, warm cache", {"compile": "regional", "compile_cache_dir": root / "cc"}))
    built = {}
    for name, changes in rows:
        if "warm cache" in name:
            torch._dynamo.reset()   # in-memory graphs gone: what is left is the on-disk cache of the row above
        built[name] = tiny_run(base.replace(**changes), "plus-face")
    secs = round_robin({name: b[4] for name, b in built.items()}, args.repeats)
    print(f"{'setting':28} {'setup s':>8} {'first s':>8} {'s/call':>8} {'x eager':>8} {'delta':>6}")
    for name, (setup_s, first, img, *_rest) in built.items():
        sec, delta = secs[name], float(np.abs(img - built["eager"][2]).max())
        print(f"{name:28} {setup_s:>8.2f} {first:>8.3f} {sec:>8.3f} {sec / secs['eager']:>8.2f} {delta:>6.0f}")
        write_row(args.jsonl, {"part": "tiny", "setting": name, "setup_s": round(setup_s, 3), "first_s": round(first, 3),
                               "seconds": round(sec, 4), "ratio": round(sec / secs["eager"], 3), "max_delta_px": delta})
    if args.no_quantize:
        return
    from utils.engine.speed.quantize import available
    if not available():
        print("int8: torchao is not installed (pip install -r requirements-gpu.txt): skipped")
        return
    print(f"\nint8 (torchao dynamic) per identity variant; effect = mean pixel change with vs without the identity")
    print(f"{'variant':14} {'s/call':>8} {'x eager':>8} {'delta':>6} {'effect':>7} {'eager effect':>12}")
    for variant in args.variants:
        _, _, e_img, e_none, e_timed, ident = tiny_run(base, variant)
        _, _, q_img, q_none, q_timed, _ = tiny_run(base.replace(quantize="int8"), variant, ident)
        secs = round_robin({"eager": e_timed, "int8": q_timed}, args.repeats)
        e_sec, q_sec = secs["eager"], secs["int8"]
        delta = float(np.abs(q_img - e_img).max())
        eff, e_eff = float(np.abs(q_img - q_none).mean()), float(np.abs(e_img - e_none).mean())
        print(f"{variant:14} {q_sec:>8.3f} {q_sec / e_sec:>8.2f} {delta:>6.0f} {eff:>7.2f} {e_eff:>12.2f}")
        write_row(args.jsonl, {"part": "tiny-int8", "variant": variant, "seconds": round(q_sec, 4),
                               "ratio": round(q_sec / e_sec, 3), "max_delta_px": delta, "identity_effect": round(eff, 3),
                               "identity_effect_eager": round(e_eff, 3)})


# --- full size (GPU; --size small on the CPU for the dry run) ----------------------------------------------

def _embeds(pipe, variant: str, device: str, dtype):
    import torch
    from PIL import Image
    if variant in ("plus-face", "plain"):
        with torch.inference_mode():
            return pipe.prepare_ip_adapter_image_embeds([[Image.new("RGB", (256, 256), (120, 90, 80))]], None,
                                                        device, 1, True)
    v = torch.randn(1, 1, 1, 512, generator=torch.Generator().manual_seed(1)) * 20
    e = torch.cat([torch.zeros_like(v), v]).to(device=device, dtype=dtype)
    if variant == "faceid-plusv2":
        with torch.inference_mode():
            clip = pipe.prepare_ip_adapter_image_embeds([[Image.new("RGB", (256, 256), (120, 90, 80))]], None,
                                                        device, 1, True)[0]
        proj = pipe.unet.encoder_hid_proj.image_projection_layers[0]
        proj.shortcut, proj.shortcut_scale, proj.bench_clip = True, 1.0, clip
    return [e if variant != "faceid" else e[:, :, 0]]


def _call(pipe, variant: str, embeds_cfg, res: int, batch: int, cfg: bool, steps: int):
    import torch
    extra = {}
    embeds = [e if cfg else e[1:] for e in embeds_cfg]
    if variant == "instantid":
        from instantid import identity_tokens, pose_image
        full = embeds[0] if cfg else torch.cat([torch.zeros_like(embeds[0]), embeds[0]])
        pipe.controlnet.identity_tokens = identity_tokens(pipe.unet, full, batch, cfg)
        extra = {"image": pose_image("frontal", res, res), "controlnet_conditioning_scale": 0.8}
    if variant == "faceid-plusv2":
        proj = pipe.unet.encoder_hid_proj.image_projection_layers[0]
        clip = proj.bench_clip     # [negative; positive] CLIP embeds of the branch, kept by _embeds
        neg, pos = clip[:1].repeat(batch, 1, 1, 1), clip[1:2].repeat(batch, 1, 1, 1)
        proj.clip_embeds = torch.cat([neg, pos]) if cfg else pos
    with torch.inference_mode():
        out = pipe(prompt="a portrait photo of a person", negative_prompt="lowres", width=res, height=res,
                   num_inference_steps=steps, guidance_scale=6.0 if cfg else 0.0, num_images_per_prompt=batch,
                   ip_adapter_image_embeds=embeds, output_type="latent",
                   generator=torch.Generator("cpu").manual_seed(0), **extra)
    return out.images.float()


def bench_full(args) -> None:
    """Part D: one process per (variant, compile, quantize) so a compile or an out-of-memory costs one part."""
    import torch
    from types import SimpleNamespace
    from bench_generate import build_full_size, gpu_name, peak_mem_gb, tflop
    from model_loader import dpmpp_karras, few_step_scheduler
    from utils.config import Settings
    from utils.engine.speed import apply_speed
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("float16" if device.startswith("cuda") else "float32"))
    if device == "cpu":
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pipe, counts = build_full_size(dtype, device, variant=args.variant, size=args.size)
    build_s = time.perf_counter() - t0
    embeds = _embeds(pipe, args.variant, device, dtype)
    pipe.set_ip_adapter_scale(0.7)
    base_config = dict(pipe.scheduler.config)
    cases = [(mode, b) for mode in args.modes for b in args.batch]

    def setup_case(mode):
        cfg = mode == "cfg"
        pipe.scheduler = (dpmpp_karras if cfg else few_step_scheduler)(base_config)
        return cfg, args.steps if cfg else 4
    # Eager references first: the plan below changes the UNet in place.
    refs = {}
    for mode, b in cases:
        cfg, steps = setup_case(mode)
        refs[(mode, b)] = _call(pipe, args.variant, embeds, args.resolution, b, cfg, steps).cpu()
    tmp = Path(tempfile.mkdtemp(prefix="speed-"))
    plans = [(args.compile, args.quantize, k) for k in (args.step_cache or [0])]
    for compile_mode, quantize, k in plans:
        settings = Settings(data_dir=tmp, compile=compile_mode, quantize=quantize, step_cache=k,
                            compile_cache_dir=args.cache_dir or tmp / "cc")
        state = apply_speed(settings, SimpleNamespace(pipe=pipe, device=device, family="sdxl"))
        for mode, b in cases:
            cfg, steps = setup_case(mode)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            lat = _call(pipe, args.variant, embeds, args.resolution, b, cfg, steps)   # warm-up (compiles)
            warm = time.perf_counter() - t0
            times = []
            for _ in range(args.repeats):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                lat = _call(pipe, args.variant, embeds, args.resolution, b, cfg, steps)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            sec = statistics.median(times)
            delta = float((lat.cpu() - refs[(mode, b)]).abs().max())
            tf = tflop(args.resolution, args.resolution, b, steps, cfg) / sec if args.size == "full" else None
            row = {"part": "D", "variant": args.variant, "compile": compile_mode, "quantize": state.plan.quantize,
                   "step_cache": k, "mode": mode, "batch": b, "steps": steps, "resolution": args.resolution,
                   "seconds": round(sec, 4), "s_per_image": round(sec / b, 4), "warmup_s": round(warm, 2),
                   "peak_mem_gb": round(peak_mem_gb(device), 3), "max_delta": round(delta, 5),
                   "tflops": round(tf, 1) if tf else None, "build_s": round(build_s, 1), "gpu": gpu_name(device),
                   "size": args.size, "dtype": str(dtype).replace("torch.", "")}
            print(json.dumps(row), flush=True)
            write_row(args.jsonl, row)
        if state.step_cache is not None:
            state.step_cache.remove()


def bench_vae(args) -> None:
    """Part E: decode of 1024² latents (128² latent) by the stock SDXL VAE as the pipeline runs it in fp16
    (upcast to fp32, force_upcast) against the fp16-fix VAE kept in fp16; batch 1 and 4, sliced for 4."""
    import torch
    from diffusers import AutoencoderKL
    from bench_generate import SIZES, gpu_name, peak_mem_gb
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(args.threads)
    vae = AutoencoderKL(**SIZES[args.size]["vae"])   # the fp16-fix VAE has the very same architecture
    side = args.resolution // 8
    half = torch.float16 if device != "cpu" else torch.bfloat16
    for name, upcast in (("stock fp32 upcast", True), ("fp16-fix fp16", False)):
        vae.to(device=device, dtype=half)
        dtype = torch.float32 if upcast else half
        for b, sliced in ((1, False), (4, False), (4, True)):
            vae.enable_slicing() if sliced else vae.disable_slicing()
            z = torch.randn(b, 4, side, side, generator=torch.Generator().manual_seed(0)).to(device, dtype)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(1 + args.repeats):
                t0 = time.perf_counter()
                with torch.inference_mode():
                    if upcast:   # what the SDXL pipeline does per decode with force_upcast: fp32 and back
                        vae.to(torch.float32)
                    vae.decode(z / vae.config.scaling_factor)
                    if upcast:
                        vae.to(half)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            row = {"part": "E", "vae": name, "batch": b, "sliced": sliced, "resolution": args.resolution,
                   "seconds": round(statistics.median(times[1:]), 4), "peak_mem_gb": round(peak_mem_gb(device), 3),
                   "gpu": gpu_name(device), "size": args.size}
            print(json.dumps(row), flush=True)
            write_row(args.jsonl, row)


def bench_cold(args) -> None:
    """Part G: a random SDXL written in the real layout, then process start -> generator ready, each in a
    fresh process: compile off, regional with an empty cache, regional with the cache the run before left."""
    import torch
    from bench_models import write_random_sdxl
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    root = Path(args.dir or tempfile.mkdtemp(prefix="sdxl-cold-"))
    if not (root / "data").is_dir():
        write_random_sdxl(root, device, args.size)
    cache = root / "compile-cache"
    for name, compile_mode in (("eager", "off"), ("regional, empty cache", "regional"),
                               ("regional, warm cache", "regional")):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--cold-child", str(root), "--compile", compile_mode,
                               "--cache-dir", str(cache), "--device", device, "--resolution", str(args.resolution)],
                              capture_output=True, text=True, timeout=args.child_timeout_s)
        wall = time.perf_counter() - t0
        ready = [json.loads(x[6:]) for x in proc.stdout.splitlines() if x.startswith("READY ")]
        row = {"part": "G", "start": name, "seconds_to_ready": round(wall, 2), "rc": proc.returncode,
               "setup_s": ready[0]["setup_s"] if ready else None, "gpu": ready[0]["gpu"] if ready else None,
               "size": args.size}
        if proc.returncode:
            row["error"] = proc.stderr[-400:]
        print(json.dumps(row), flush=True)
        write_row(args.jsonl, row)


def cold_child(args) -> None:
    import torch
    from utils.config import Settings
    from utils.engine.generator import DigitalTwinGenerator
    root = Path(args.cold_child)
    settings = Settings(data_dir=root / "data", model_dir=root, model_profile="sdxl", device=args.device or "auto",
                        compile=args.compile, compile_cache_dir=args.cache_dir, warmup=True, max_steps=2,
                        compile_warmup=f"{args.resolution}x{args.resolution}x1", min_image_side=64)
    t0 = time.perf_counter()
    DigitalTwinGenerator(settings).setup()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print("READY " + json.dumps({"setup_s": round(time.perf_counter() - t0, 2), "gpu": gpu}), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full-size", action="store_true", help="part D: SDXL from its configs, random weights")
    ap.add_argument("--vae", action="store_true", help="part E: VAE decode, stock fp32 upcast vs fp16-fix")
    ap.add_argument("--cold-start", action="store_true", help="part G: process start -> ready")
    ap.add_argument("--cold-child", help=argparse.SUPPRESS)
    ap.add_argument("--size", default="full", choices=("full", "small"), help="full-size parts: full, or small (dry run)")
    ap.add_argument("--variant", default="plus-face", choices=("plus-face", "plain", "faceid", "faceid-plusv2", "instantid"))
    ap.add_argument("--variants", nargs="+", default=["plus-face", "faceid", "faceid-plusv2", "instantid"],
                    help="tiny int8 rows")
    ap.add_argument("--compile", default="off", choices=("off", "regional", "full"))
    ap.add_argument("--quantize", default="none", choices=("none", "auto", "fp8", "int8"))
    ap.add_argument("--step-cache", type=int, nargs="+", help="part D: step-cache intervals (0 = off), one row set each")
    ap.add_argument("--cache-dir", type=Path, help="compile cache folder (default: a new temporary one)")
    ap.add_argument("--modes", nargs="+", default=["cfg", "few-step"], choices=("cfg", "few-step"))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30, help="CFG steps (few-step: 4); tiny: the max_steps cap")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device")
    ap.add_argument("--dtype", choices=("float16", "bfloat16", "float32"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dir", help="--cold-start: model_dir (written when it has no data/ folder yet)")
    ap.add_argument("--child-timeout-s", type=float, default=240)
    ap.add_argument("--no-compile", action="store_true", help="tiny: skip the compile rows (~1 min on 2 cores)")
    ap.add_argument("--no-quantize", action="store_true", help="tiny: skip the int8 rows")
    ap.add_argument("--jsonl", help="append one JSON line per measured row (flushed at once)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.cold_child:
        cold_child(args)
    elif args.full_size:
        bench_full(args)
    elif args.vae:
        bench_vae(args)
    elif args.cold_start:
        bench_cold(args)
    else:
        if args.steps == 30:
            args.steps = 6
        bench_tiny(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
