"""FLUX.1 figures: the tiny families on the CPU, full-size parameter counts, and full-size speed on a GPU.

    .venv/bin/python bench/bench_flux.py                 # CPU tiny: s/image per family; switch time and RSS
    .venv/bin/python bench/bench_flux.py --params        # full-size parameters per FLUX.1 component (meta)
    python bench/bench_flux.py --full-size [--jsonl rows.jsonl]                 # GPU: FLUX.1-dev / schnell
    python bench/bench_flux.py --full-size --size small --device cpu --resolution 128 --steps 2   # dry run

CPU tiny (default): DigitalTwinGenerator on the tiny profile; seconds per image of each family's balanced
and fast rows at 128² (median of --repeats, one thread as the service's tiny profile runs), then --swaps
round trips tiny-sdxl -> tiny-flux -> tiny-sdxl through load_model(): each switch's seconds and the RSS of
the process before the first load and after each round trip (the first FLUX load imports FLUX's code).

--params: FluxTransformer2DModel, T5EncoderModel, CLIPTextModel and AutoencoderKL built on the meta device
from the real hub configs kept in utils/models/flux_configs (FLUX.1-dev and -schnell), with bf16 sizes.

--full-size (GPU): the FLUX.1-dev pipeline with random weights from those configs, built on the GPU in bf16
(tokenizers: the tiny ones; the encoders' cost does not depend on the token ids), at 1024², 28 steps,
guidance 3.5, batch 1 and 4, in each memory mode: full; quantized (weight-only, the backend
utils.models.flux_memory picks for this GPU, applied with torchao's quantize_ to the transformer and T5 as
diffusers' quantization config does at load); offload (enable_model_cpu_offload). Then FLUX.1-schnell
(its own transformer config: no guidance embedding), 4 steps, batch 1 and 4, full. Per row: s/call,
s/image, peak GPU memory (max allocated) and the memory held before the call. Rows go to --jsonl as
measured. Published anchors (H100, 1024², 28 steps, batch 1): bf16 6.57 s, + torch.compile 4.21 s, fp8 +
compile 2.97 s (peak 34-36 GB).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
CONFIGS = REPO / "utils" / "models" / "flux_configs"
SMALL = {"transformer": {"num_layers": 2, "num_single_layers": 2, "num_attention_heads": 2, "attention_head_dim": 64,
                         "joint_attention_dim": 128, "pooled_projection_dim": 64, "axes_dims_rope": [16, 24, 24]},
         "text_encoder_2": {"d_model": 128, "d_ff": 256, "num_layers": 2, "num_heads": 2, "d_kv": 64},
         "text_encoder": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                          "projection_dim": 64},
         "vae": {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 8}}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# --- CPU tiny ------------------------------------------------------------------------------------------
def tiny(args) -> int:
    from generate_twin import DigitalTwinGenerator, GenerationRequest
    from model_loader import make_tiny
    from utils.config import Settings
    tmp = Path(tempfile.mkdtemp(prefix="bench-flux-"))
    root = make_tiny(tmp / "tiny-model")
    settings = Settings(data_dir=tmp / "data", tiny_model_dir=root, model_dir=tmp / "none", model_profile="tiny",
                        warmup=False)
    gen = DigitalTwinGenerator(settings).setup()
    gc.collect()
    before = rss_mb()
    for model in ("tiny-sdxl", "tiny-flux"):
        gen.load_model(model)
        for mode in ("balanced", "fast"):
            req = GenerationRequest.from_dict({"prompt": "a portrait photo", "style": "none", "quality_mode": mode,
                                               "seed": 1}, settings)
            gen.generate(req)   # first call pays lazy initialisation
            times, steps = [], None
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                steps = gen.generate(req).metadata["steps"]
                times.append(time.perf_counter() - t0)
            print(f"{model:10} {mode:9} {steps:>3} steps 128²: {statistics.median(times):.3f} s/image "
                  f"(median of {args.repeats}; {statistics.median(times) / steps * 1000:.1f} ms/step)")
    gen.load_model("tiny-sdxl")
    gc.collect()
    print(f"RSS with tiny-sdxl loaded, before any FLUX load: {before:.1f} MB; after the timings, back on tiny-sdxl "
          f"(FLUX's code now imported): {rss_mb():.1f} MB")
    base = rss_mb()
    calls = []
    for i in range(args.swaps):
        for model in ("tiny-flux", "tiny-sdxl"):
            t0 = time.perf_counter()
            out = gen.load_model(model)
            calls.append((model, time.perf_counter() - t0, out["load_s"]))
        gc.collect()
        print(f"round trip {i + 1}: sdxl -> flux {calls[-2][1]:.3f} s (load {calls[-2][2]:.3f}), flux -> sdxl "
              f"{calls[-1][1]:.3f} s (load {calls[-1][2]:.3f}); RSS {rss_mb():.1f} MB ({rss_mb() - base:+.1f} MB)")
    to_flux = [c for m, c, _ in calls if m == "tiny-flux"]
    to_sdxl = [c for m, c, _ in calls if m == "tiny-sdxl"]
    print(f"switch median: to FLUX {statistics.median(to_flux):.3f} s, to SDXL {statistics.median(to_sdxl):.3f} s "
          f"over {args.swaps} round trips")
    return 0


# --- parameter counts ------------------------------------------------------------------------------------
def build_components(variant: str, device, dtype, size: str = "full") -> dict:
    """The four FLUX.1 components from the real configs (``size`` small: SMALL's topology), random weights
    made on ``device`` in ``dtype`` (meta: names and shapes only)."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    folder = CONFIGS / variant
    over = SMALL if size == "small" else {k: {} for k in SMALL}
    with torch.device(device):
        tcfg = {**FluxTransformer2DModel.load_config(str(folder / "transformer")), **over["transformer"]}
        parts = {"transformer": FluxTransformer2DModel.from_config(tcfg),
                 "text_encoder_2": T5EncoderModel(T5Config.from_pretrained(str(folder / "text_encoder_2"),
                                                                           **over["text_encoder_2"])),
                 "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder / "text_encoder"),
                                                                              **over["text_encoder"])),
                 "vae": AutoencoderKL.from_config({**AutoencoderKL.load_config(str(folder / "vae")), **over["vae"]})}
    if str(device) != "meta":
        for m in parts.values():
            m.to(dtype=dtype).eval()
    return parts


def params(args) -> int:
    import torch
    for variant in ("FLUX.1-dev", "FLUX.1-schnell"):
        parts = build_components(variant, "meta", torch.bfloat16)
        total = 0
        for name, m in parts.items():
            n = sum(p.numel() for p in m.parameters())
            total += n
            print(f"{variant:15} {name:15} {n:>15,} parameters  {n * 2 / 1e9:6.2f} GB bf16")
        print(f"{variant:15} {'total':15} {total:>15,} parameters  {total * 2 / 1e9:6.2f} GB bf16")
    return 0


# --- full size on a GPU --------------------------------------------------------------------------------------
def pipeline(variant: str, device: str, dtype, size: str):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from utils.models.tiny_tokenizers import tiny_t5_tokenizer, tiny_tokenizer
    parts = build_components(variant, device, dtype, size)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        FlowMatchEulerDiscreteScheduler.load_config(str(CONFIGS / variant / "scheduler")))
    pipe = FluxPipeline(scheduler=scheduler, tokenizer=tiny_tokenizer()[0], tokenizer_2=tiny_t5_tokenizer(), **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gpu_gb(fn: str) -> float | None:
    import torch
    return round(getattr(torch.cuda, fn)() / 1e9, 2) if torch.cuda.is_available() else None


def time_calls(pipe, args, batch: int, steps: int, guidance: float, seq: int, row: dict, emit) -> None:
    import torch
    cuda = torch.cuda.is_available()
    kw = dict(prompt="a portrait photo", num_images_per_prompt=batch, width=args.resolution, height=args.resolution,
              num_inference_steps=steps, guidance_scale=guidance, max_sequence_length=seq, output_type="pil",
              generator=torch.Generator("cpu").manual_seed(0))
    for _ in range(args.warmup):
        pipe(**kw)
    times = []
    held = gpu_gb("memory_allocated")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        pipe(**kw)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    emit({**row, "batch": batch, "steps": steps, "resolution": args.resolution, "seconds": round(s, 3),
          "s_per_image": round(s / batch, 3), "held_gb": held, "peak_gb": gpu_gb("max_memory_allocated")})


def apply_mode(pipe, mode: str, device: str, dtype) -> dict:
    """full / quantized / offload on an in-memory pipeline, as the product's loader would hold it."""
    import torch
    from utils.models.flux_memory import decide, gpu_facts, installed_backends
    if mode == "offload":
        pipe.enable_model_cpu_offload(device=device)
        return {"mode": "offload", "backend": None}
    pipe.to(device)
    if mode == "full":
        return {"mode": "full", "backend": None}
    parts = {k: sum(p.numel() for p in getattr(pipe, k).parameters()) * 2 / 1024 ** 3
             for k in ("transformer", "text_encoder_2", "text_encoder", "vae")}
    plan = decide("quantized", gpu_facts(device), parts, installed_backends())
    if plan.backend.startswith("torchao"):
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
        cfg = Float8WeightOnlyConfig() if plan.backend == "torchao-fp8" else Int8WeightOnlyConfig()
        for k in ("transformer", "text_encoder_2"):
            quantize_(getattr(pipe, k), cfg)
    else:
        raise SystemExit(f"bench: backend {plan.backend} is applied at load only (install torchao for this bench)")
    torch.cuda.empty_cache()
    return {"mode": "quantized", "backend": plan.backend}


def full_size(args) -> int:
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if device == "cpu":
        torch.set_num_threads(args.threads)
    out = open(args.jsonl, "a") if args.jsonl else None

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()
    if "dev" in args.variants:
        for mode in args.modes:
            if mode != "full" and not device.startswith("cuda"):
                emit({"part": "C", "model": "FLUX.1-dev", "mode": mode, "skipped": "a GPU memory mode: needs CUDA"})
                continue
            run_variant("FLUX.1-dev", mode, device, dtype, args, emit)
    if "schnell" in args.variants:
        run_variant("FLUX.1-schnell", "full", device, dtype, args, emit)
    return 0


def run_variant(variant: str, mode: str, device: str, dtype, args, emit) -> None:
    """Build ``variant`` on the device, hold it as ``mode`` says, time each batch size, free it."""
    import torch
    t0 = time.perf_counter()
    pipe = pipeline(variant, device, dtype, args.size)
    info = apply_mode(pipe, mode, device, dtype)
    row = {"part": "C", "model": variant, **info, "build_s": round(time.perf_counter() - t0, 1)}
    dev = variant.endswith("dev")
    for batch in args.batch:
        time_calls(pipe, args, batch, args.steps if dev else min(args.steps, 4), 3.5 if dev else 0.0,
                   512 if dev else 256, row, emit)
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", action="store_true", help="full-size parameter counts from the real configs")
    ap.add_argument("--full-size", action="store_true", help="random FLUX.1-dev / schnell at real sizes (GPU)")
    ap.add_argument("--size", default="full", choices=("full", "small"), help="--full-size: small = CPU dry run")
    ap.add_argument("--device", help="--full-size: cuda | cpu (default cuda when present)")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=28, help="--full-size: FLUX.1-dev steps (schnell: at most 4)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--modes", nargs="+", default=["full", "quantized", "offload"],
                    choices=("full", "quantized", "offload"))
    ap.add_argument("--variants", nargs="+", default=["dev", "schnell"], choices=("dev", "schnell"),
                    help="--full-size: FLUX.1-dev (in each of --modes) and/or FLUX.1-schnell (full, 4 steps)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--swaps", type=int, default=5, help="CPU tiny: round trips sdxl -> flux -> sdxl")
    ap.add_argument("--jsonl", help="append one JSON line per measured row")
    args = ap.parse_args(argv)
    from model_loader import quiet_libraries
    with quiet_libraries():
        if args.params:
            return params(args)
        if args.full_size:
            return full_size(args)
        return tiny(args)


if __name__ == "__main__":
    raise SystemExit(main())
