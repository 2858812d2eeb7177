"""Base-model hot swap: swap time and memory across repeated switches, through the product's load_model().

Tiny profile (default): loads the generator (in this process, or in its child with --process), then switches
base -> tiny-alt -> base N times, printing each switch's load / wait / total time and the RSS of the process
that holds the model before and after. No leak: RSS after N round trips stays near RSS after the first one.

Full size (--full-size): writes a randomly initialised SDXL in the REAL layout (the diffusers base folder with
fp16 safetensors, the IP-Adapter repo with the ViT-H encoder and the Plus-Face adapter file, and one
single-file fine-tune checkpoint under checkpoints/), sets up DigitalTwinGenerator on it (sdxl profile, the
same from_pretrained / from_single_file / load_ip_adapter calls as with downloaded weights), then switches
alt <-> base N times: per switch the call's seconds, GPU memory allocated / reserved before and after, the
peak during the switch (old and new model side by side), and one generation on the new model.

    .venv/bin/python bench/bench_models.py [--swaps 5] [--process]
    python bench/bench_models.py --full-size [--swaps 3] [--dir /tmp/sdxl-random] [--jsonl rows.jsonl]
    python bench/bench_models.py --full-size --size small --device cpu --resolution 128   # CPU dry run
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ALT_NAME = "sdxl-random-alt"     # the single-file checkpoint's model name (its file stem)


def rss_mb(pid: int | None = None) -> float:
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _gb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e9


def write_random_sdxl(root: Path, device: str, size: str = "full", log=print) -> dict:
    """A random SDXL in the real repos' layout under ``root`` (model_dir): what `model_loader.py download`
    would leave, plus checkpoints/<ALT_NAME>.safetensors in the original single-file layout. Weights are
    made on ``device`` (fast on a GPU) and written as fp16, as published. Returns seconds and GB per part."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file
    from bench_generate import bench_scheduler, bench_tokenizers, build_random_parts, random_adapter
    from model_loader import (ADAPTER_FILES, BASE_DIR, CHECKPOINT_DIR, ENCODER_SUB, to_single_file,
                              write_classic_tokenizers)
    dtype = torch.float16
    stats: dict = {}
    t0 = time.perf_counter()
    parts, counts = build_random_parts(dtype, device, "plus-face", size, seed=0)
    stats["init_s"] = time.perf_counter() - t0
    stats["params_b"] = sum(counts.values()) / 1e9
    log(f"random {size} SDXL + ViT-H on {device}: {stats['params_b']:.3f} B parameters in {stats['init_s']:.1f} s")
    tok, tok2 = bench_tokenizers()
    pipe = StableDiffusionXLPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"],
                                     text_encoder_2=parts["text_encoder_2"], tokenizer=tok, tokenizer_2=tok2,
                                     unet=parts["unet"], scheduler=bench_scheduler())
    t0 = time.perf_counter()
    base = root / BASE_DIR
    pipe.save_pretrained(str(base), safe_serialization=True, variant="fp16")
    write_classic_tokenizers(base)
    stats["base_write_s"], stats["base_gb"] = time.perf_counter() - t0, _gb(base)
    t0 = time.perf_counter()
    repo, sub, weight, _ = ADAPTER_FILES["plus-face"]
    enc_dir = root / repo / ENCODER_SUB
    parts["image_encoder"].save_pretrained(str(enc_dir), safe_serialization=True)
    adapter = root / repo / sub / weight
    adapter.parent.mkdir(parents=True, exist_ok=True)
    save_file(random_adapter(parts["unet"], "plus-face", dtype, size, seed=1), str(adapter))
    stats["adapter_write_s"], stats["adapter_gb"] = time.perf_counter() - t0, _gb(root / repo)
    # The fine-tune: the same shapes with other random weights (re-drawn in place on the device).
    from bench_generate import _init_random
    t0 = time.perf_counter()
    for i, k in enumerate(("unet", "vae", "text_encoder", "text_encoder_2")):
        _init_random(parts[k], dtype, device, seed=100 + i)
    ckpt = root / CHECKPOINT_DIR / f"{ALT_NAME}.safetensors"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype) for k, v in to_single_file(pipe).items()}, str(ckpt))
    stats["checkpoint_write_s"], stats["checkpoint_gb"] = time.perf_counter() - t0, ckpt.stat().st_size / 1e9
    del pipe, parts
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    log(f"wrote base folder {stats['base_gb']:.2f} GB in {stats['base_write_s']:.1f} s, IP-Adapter repo "
        f"{stats['adapter_gb']:.2f} GB in {stats['adapter_write_s']:.1f} s, single-file checkpoint "
        f"{stats['checkpoint_gb']:.2f} GB in {stats['checkpoint_write_s']:.1f} s")
    return stats


def gpu_mem() -> dict:
    import torch
    if not torch.cuda.is_available():
        return {"allocated_gb": None, "reserved_gb": None, "rss_mb": round(rss_mb(), 1)}
    return {"allocated_gb": round(torch.cuda.memory_allocated() / 1e9, 3),
            "reserved_gb": round(torch.cuda.memory_reserved() / 1e9, 3), "rss_mb": round(rss_mb(), 1)}


def full_size(args) -> int:
    import torch
    from bench_generate import write_row
    from generate_twin import DigitalTwinGenerator, GenerationRequest
    from model_loader import base_model_name
    from tests.fixtures.models import make_crops
    from utils.config import Settings
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(args.threads)
    t_begin = time.perf_counter()
    root = Path(args.dir or tempfile.mkdtemp(prefix="sdxl-random-"))
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    common = {"part": "B", "size": args.size, "device": device, "gpu": gpu}
    t0 = time.perf_counter()
    stats = write_random_sdxl(root, device, args.size)
    write_row(args.jsonl, {**common, "step": "write", "seconds": round(time.perf_counter() - t0, 2),
                           **{k: round(v, 3) for k, v in stats.items()}})
    # fp16 on CUDA (the product's auto); on the CPU dry run fp32, the product's CPU default.
    settings = Settings(data_dir=root / "data", model_dir=root, model_profile="sdxl", ip_adapter_variant="plus-face",
                        device=device, dtype=args.dtype, warmup=False, max_steps=args.gen_steps, min_image_side=64)
    t0 = time.perf_counter()
    gen = DigitalTwinGenerator(settings).setup()
    t_setup = time.perf_counter() - t0
    base = base_model_name(settings)
    names = [m["name"] for m in gen.models_catalogue()["models"]]
    assert ALT_NAME in names and base in names, names
    ident = gen.build_identity(make_crops(3), None, face_model="bench")
    req = GenerationRequest.from_dict({"prompt": "a portrait photo of a person", "seed": 1, "quality_mode": "balanced",
                                       "width": args.resolution, "height": args.resolution}, settings).with_identity(ident)

    def generate_once() -> dict:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        res = gen.generate(req)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        img = res.images[0]
        assert img.size == (args.resolution, args.resolution), img.size
        return {"gen_s": round(time.perf_counter() - t, 3), "gen_steps": res.metadata["steps"],
                "gen_model": res.metadata["model_name"]}

    first = generate_once()
    mem0 = gpu_mem()
    print(f"setup {t_setup:.1f} s on {device}; first generation ({first['gen_steps']} steps, {args.resolution}²) "
          f"{first['gen_s']:.2f} s; memory {mem0}")
    write_row(args.jsonl, {**common, "step": "setup", "seconds": round(t_setup, 2), **first, **mem0})
    print(f"{'#':>2} {'to':18} {'call s':>7} {'load s':>7} {'alloc before':>12} {'alloc after':>11} "
          f"{'resv after':>10} {'peak':>6} {'gen s':>6}")
    calls, after = [], []
    t_swaps, trip_s = time.perf_counter(), 0.0
    for i in range(args.swaps):
        elapsed = time.perf_counter() - t_begin
        if args.time_limit_s and i and elapsed + trip_s > args.time_limit_s:
            # Stop cleanly (summary row written) rather than be killed half-way through a switch.
            print(f"time limit: {elapsed:.0f} s used, a round trip takes ~{trip_s:.0f} s; stopping after {i}")
            break
        t_trip = time.perf_counter()
        for name in (ALT_NAME, base):
            gc.collect()
            before = gpu_mem()
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            out = gen.load_model(name)
            call = time.perf_counter() - t0
            peak = round(torch.cuda.max_memory_allocated() / 1e9, 3) if device.startswith("cuda") else None
            gc.collect()
            aft = gpu_mem()
            g = generate_once()
            assert g["gen_model"] == name, (g, name)
            calls.append(call)
            after.append(aft)
            row = {**common, "step": "swap", "round_trip": i + 1, "to": name, "call_s": round(call, 3),
                   "load_s": out["load_s"], "swap_wait_s": out["swap_wait_s"], "peak_during_gb": peak,
                   **{f"before_{k}": v for k, v in before.items()}, **{f"after_{k}": v for k, v in aft.items()}, **g}
            write_row(args.jsonl, row)
            print(f"{i + 1:>2} {name[:18]:18} {call:>7.2f} {out['load_s']:>7.2f} {str(before['allocated_gb']):>12} "
                  f"{str(aft['allocated_gb']):>11} {str(aft['reserved_gb']):>10} {str(peak):>6} {g['gen_s']:>6.2f}")
        trip_s = time.perf_counter() - t_trip
    key = "allocated_gb" if device.startswith("cuda") else "rss_mb"
    growth = None if len(after) < 3 else round(after[-1][key] - after[1][key], 3)
    summary = {**common, "step": "summary", "swaps": len(calls), "swaps_wall_s": round(time.perf_counter() - t_swaps, 1), "call_median_s": round(statistics.median(calls), 3),
               "call_max_s": round(max(calls), 3), "start": mem0, "end": after[-1] if after else None,
               f"growth_{key}_after_first_round_trip": growth}
    write_row(args.jsonl, summary)
    print(f"swap median {summary['call_median_s']} s, max {summary['call_max_s']} s over {len(calls)} switches; "
          f"{key} at start {mem0[key]}, at end {after[-1][key] if after else None} (growth after the first round "
          f"trip: {growth})")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--swaps", type=int, default=5, help="round trips base -> alt -> base")
    ap.add_argument("--process", action="store_true", help="the generator in its child process (the default server set-up)")
    ap.add_argument("--full-size", action="store_true",
                    help="random SDXL written in the real layout (+ a single-file checkpoint), sdxl profile")
    ap.add_argument("--size", default="full", choices=("full", "small"), help="--full-size: full or small (CPU dry run)")
    ap.add_argument("--dir", help="--full-size: model_dir to write (default a new temporary folder)")
    ap.add_argument("--device", help="--full-size: cuda | cpu (default cuda when present)")
    ap.add_argument("--resolution", type=int, default=1024, help="--full-size: side of the generation after each swap")
    ap.add_argument("--gen-steps", type=int, default=4, help="--full-size: steps of that generation (max_steps cap)")
    ap.add_argument("--dtype", default="auto", help="--full-size: the generator's TWIN_DTYPE (auto: fp16 on CUDA, fp32 on CPU)")
    ap.add_argument("--threads", type=int, default=2, help="--full-size on the CPU: torch threads")
    ap.add_argument("--time-limit-s", type=float, default=0,
                    help="--full-size: start no round trip that would end after this many seconds (0: no limit)")
    ap.add_argument("--jsonl", help="--full-size: append one JSON line per measured row (flushed at once)")
    args = ap.parse_args()
    if args.full_size:
        from model_loader import quiet_libraries
        with quiet_libraries():
            return full_size(args)
    from model_loader import base_model_name, make_tiny
    from utils.config import Settings
    tmp = Path(tempfile.mkdtemp(prefix="bench-models-"))
    tiny = make_tiny(tmp / "tiny-model")
    settings = Settings(data_dir=tmp / "data", tiny_model_dir=tiny, model_dir=tmp / "none", model_profile="tiny",
                        warmup=False, max_steps=3)
    if args.process:
        from generate_twin import DigitalTwinGenerator
        from utils.jobs.local.generator_process import GeneratorProcess
        gen = GeneratorProcess(settings, engine_class=DigitalTwinGenerator).setup()
    else:
        from generate_twin import DigitalTwinGenerator
        gen = DigitalTwinGenerator(settings).setup()

    def held_rss() -> float:
        return rss_mb(gen.pid if args.process else None)

    base = base_model_name(settings)
    names = [m["name"] for m in gen.models_catalogue()["models"]]
    assert "tiny-alt" in names, names
    gc.collect()
    start = held_rss()
    print(f"RSS before any swap: {start:.1f} MB ({'child process' if args.process else 'this process'})")
    totals, loads, after = [], [], []
    for i in range(args.swaps):
        for name in ("tiny-alt", base):
            t0 = time.perf_counter()
            out = gen.load_model(name)
            totals.append(time.perf_counter() - t0)
            loads.append(out["load_s"])
        gc.collect()
        after.append(held_rss())
        print(f"round trip {i + 1}: RSS {after[-1]:.1f} MB; last switch load {out['load_s']:.3f} s, "
              f"wait {out['swap_wait_s']:.3f} s, call {totals[-1]:.3f} s")
    print(f"swap (call) median {statistics.median(totals):.3f} s, max {max(totals):.3f} s over {len(totals)} switches; "
          f"load median {statistics.median(loads):.3f} s")
    print(f"RSS: before {start:.1f} MB, after round trip 1 {after[0]:.1f} MB, after round trip {args.swaps} "
          f"{after[-1]:.1f} MB (growth after the first: {after[-1] - after[0]:+.1f} MB)")
    if args.process:
        gen.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
