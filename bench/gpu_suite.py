"""One GPU lease, one command: full-size SDXL latency (part A) and full-size hot swap (part B); or, with
--suite flux, full-size FLUX.1 (part C); with --suite infiniteyou, FLUX.1-dev + InfiniteYou (part I); with
--suite training, twin LoRA training on SDXL (part T).

    python3 bench/gpu_suite.py [--out DIR] [--budget-s 420]     # on the GPU machine (fails fast without CUDA)
    python3 bench/gpu_suite.py --suite flux [--budget-s 540]    # FLUX.1-dev / schnell (part C)
    python3 bench/gpu_suite.py --suite infiniteyou              # FLUX.1-dev + InfiniteYou, 3 memory modes (part I)
    python3 bench/gpu_suite.py --suite training [--budget-s 560]  # SDXL LoRA training (part T)
    python bench/gpu_suite.py --dry-run [--suite flux|infiniteyou|training] [--out DIR]   # the same code paths on the CPU, small and quick

Part A (bench/bench_generate.py --full-size): random-weight SDXL at real sizes, 1024², 30 steps, CFG, fp16:
plus-face batch 1 and 4 (+ the 4-step no-CFG row), instantid batch 1, faceid-plusv2 batch 1. Seconds per
call, peak GPU memory, TFLOP/s by the bench's FLOP model, % of the fp16 matmul rate measured in the preflight.
Part B (bench/bench_models.py --full-size): a random SDXL written in the real layout + a single-file
checkpoint, DigitalTwinGenerator.setup() on it, then alt <-> base round trips through load_model(): seconds,
GPU memory before / after / peak per switch, one generation after each.

Each part runs in its own process with a time limit (a hang or an out-of-memory in one part does not cost the
others), inside an overall budget. Every result is appended to OUT/gpu_results.jsonl the moment it is
measured, and every line of output to OUT/gpu_log.txt, so a run killed part-way still returns what it had.
The last thing printed is a compact table of all rows. OUT defaults to $OUT, else ./gpu_out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

GPU_A = ["--resolution", "1024", "--steps", "30", "--warmup", "1", "--repeats", "2", "--dtype", "float16",
         "--device", "cuda"]
GPU_B = ["--swaps", "3", "--gen-steps", "4", "--resolution", "1024"]
# The dry run: same scripts and code paths, the small SDXL topology, 128², 2 steps, one round trip.
DRY_A = ["--size", "small", "--resolution", "128", "--steps", "2", "--warmup", "0", "--repeats", "1",
         "--device", "cpu", "--threads", "2"]
DRY_B = ["--size", "small", "--device", "cpu", "--resolution", "128", "--gen-steps", "2", "--swaps", "1"]


# Part C (bench/bench_flux.py --full-size): random FLUX.1-dev from the real configs, 1024², 28 steps, batch 1
# and 4 in each memory mode (full bf16, weight-only quantized, model offload), then FLUX.1-schnell 4 steps.
GPU_C = ["--resolution", "1024", "--steps", "28", "--batch", "1", "4", "--warmup", "1", "--repeats", "2",
         "--device", "cuda"]
DRY_C = ["--size", "small", "--resolution", "128", "--steps", "2", "--batch", "1", "2", "--warmup", "0",
         "--repeats", "1", "--device", "cpu", "--threads", "2"]


def flux_plan(dry_run: bool) -> list[tuple[str, str, list[str], float]]:
    """(name, script, arguments, time cap) of part C. Expected on an H100: full ~150 s (dev batch 1 and 4,
    schnell), quantized ~150 s (+ quantizing 12 B + 4.7 B weights), offload ~150 s (33 GB moved per call)."""
    c = DRY_C if dry_run else GPU_C
    return [
        ("C-flux-full", "bench_flux.py", ["--full-size", "--modes", "full", "--variants", "dev", "schnell", *c], 200),
        ("C-flux-quantized", "bench_flux.py", ["--full-size", "--modes", "quantized", "--variants", "dev", *c], 170),
        ("C-flux-offload", "bench_flux.py", ["--full-size", "--modes", "offload", "--variants", "dev", *c], 170),
    ]


# Part I (bench/bench_infiniteyou.py --full-size): random FLUX.1-dev + InfuseNet from the published configs, the
# 8 identity tokens and the black (no-pose) control image, 1024², 28 steps, batch 1, in each memory mode.
GPU_I = ["--resolution", "1024", "--steps", "28", "--warmup", "1", "--repeats", "2", "--device", "cuda"]
DRY_I = ["--size", "small", "--resolution", "128", "--steps", "2", "--warmup", "0", "--repeats", "1", "--device", "cpu",
         "--threads", "2"]


def infiniteyou_plan(dry_run: bool) -> list[tuple[str, str, list[str], float]]:
    """(name, script, arguments, time cap) of part I. Expected on an H100: full ~90 s (build + 3 calls of
    ~9 s), quantized ~120 s, offload ~150 s."""
    d = DRY_I if dry_run else GPU_I
    return [(f"I-infiniteyou-{m}", "bench_infiniteyou.py", ["--full-size", "--modes", m, *d], cap)
            for m, cap in (("full", 150), ("quantized", 170), ("offload", 200))]
# Part T (bench/bench_training.py --full-size): the twin LoRA trainer on random-weight SDXL at 1024², rank 16,
# batch 1, bf16 autocast, gradient checkpointing, 8-bit AdamW when bitsandbytes imports: s/step and peak GPU
# memory from a short run, then 500 steps including caching (goals: <= 4 min on H100-class, peak <= 22 GB).
GPU_T = ["--full-size", "--size", "full", "--device", "cuda", "--dtype", "bfloat16", "--resolution", "1024",
         "--rank", "16"]
DRY_T = ["--full-size", "--size", "small", "--device", "cpu", "--resolution", "128", "--rank", "16", "--threads", "2"]


def training_plan(dry_run: bool) -> list[tuple[str, str, list[str], float]]:
    """(name, script, arguments, time cap) of part T. Expected on an H100: ~40 s to build the random model,
    T-train-short ~60 s, T-train-500 ~4-5 min."""
    d = DRY_T if dry_run else GPU_T
    return [
        ("T-train-short", "bench_training.py", [*d, "--steps", "2" if dry_run else "30"], 150),
        ("T-train-500", "bench_training.py", [*d, "--steps", "3" if dry_run else "500"], 400),
    ]


def plan(dry_run: bool, peak_tflops: float) -> list[tuple[str, str, list[str], float]]:
    """(name, script, arguments, time cap in seconds) per part. Expected on an H200, imports included:
    A-plus-face ~60 s, A-instantid ~30 s, A-faceid-plusv2 ~30 s, B-hot-swap ~150-240 s (disk speed decides
    the ~15 GB write; each switch reads ~7 GB)."""
    a = DRY_A if dry_run else GPU_A + ["--peak-tflops", f"{peak_tflops:.1f}"]
    big = "2" if dry_run else "4"
    return [
        ("A-plus-face", "bench_generate.py",
         ["--full-size", "--variant", "plus-face", "--batch", "1", big, "--modes", "cfg", "few-step", *a], 150),
        ("A-instantid", "bench_generate.py", ["--full-size", "--variant", "instantid", "--batch", "1", *a], 80),
        ("A-faceid-plusv2", "bench_generate.py", ["--full-size", "--variant", "faceid-plusv2", "--batch", "1", *a], 80),
        ("B-hot-swap", "bench_models.py", ["--full-size", *(DRY_B if dry_run else GPU_B)], 300),
    ]


# Parts D-G (bench/bench_speed.py, --suite speed; issue 25): the speed plan at full size, random weights.
# D: per identity variant x TWIN_COMPILE {off, regional, full} x TWIN_QUANTIZE {none, fp8}, each part batch 1
# and 4, 30 steps CFG and 4 steps: s/image, peak VRAM, warm-up s, max |delta| of the final latents vs eager.
# E: VAE decode at 1024², stock fp32 upcast vs fp16-fix in fp16. F: step cache k = 2, 3 (eager, plus-face).
# G: cold start to ready (compile off; regional with an empty and with a warm cache). The dry run has no fp8
# (the CPU has no fp8 units: TWIN_QUANTIZE=fp8 is refused there), so its fp8 parts run int8.
SPEED_VARIANTS = ("plus-face", "instantid", "faceid-plusv2")
GPU_D = ["--resolution", "1024", "--steps", "30", "--batch", "1", "4", "--repeats", "2", "--device", "cuda"]
DRY_D = ["--size", "small", "--resolution", "128", "--steps", "2", "--batch", "1", "2", "--repeats", "1",
         "--device", "cpu", "--threads", "2"]
# Expected on an H100 (not yet measured): eager ~90 s per part, regional ~150 s, full (max-autotune) ~300 s.
SPEED_CAPS = {"off": 150, "regional": 240, "full": 420}


def speed_plan(dry_run: bool, swap_dir: Path | None = None) -> list[tuple[str, str, list[str], float]]:
    d = DRY_D if dry_run else GPU_D
    parts = []
    for variant in SPEED_VARIANTS:
        for compile_mode in ("off", "regional", "full"):
            for quant in ("none", "fp8"):
                q = "int8" if dry_run and quant == "fp8" else quant
                parts.append((f"D-{variant}-{compile_mode}-{quant}", "bench_speed.py",
                              ["--full-size", "--variant", variant, "--compile", compile_mode, "--quantize", q, *d],
                              SPEED_CAPS[compile_mode]))
    e = ["--size", "small", "--resolution", "128", "--device", "cpu", "--repeats", "1"] if dry_run else \
        ["--resolution", "1024", "--device", "cuda", "--repeats", "3"]
    parts.append(("E-vae-decode", "bench_speed.py", ["--vae", *e], 120))
    parts.append(("F-step-cache", "bench_speed.py", ["--full-size", "--variant", "plus-face", "--step-cache", "0", "2",
                                                     "3", *d], 240))
    g = ["--size", "small", "--resolution", "128", "--device", "cpu"] if dry_run else \
        ["--resolution", "1024", "--device", "cuda"]
    parts.append(("G-cold-start", "bench_speed.py",
                  ["--cold-start", "--dir", str((swap_dir or Path("/tmp/sdxl-random-bench")) / "cold"), *g], 600))
    return parts


def table_speed(rows: list[dict]) -> list[str]:
    """Parts D-G of the final table (every row names the device it ran on)."""
    out = ["", "part D: speed plan; s/img; peak = max allocated GB; delta = max |latent difference| vs eager",
           f"{'variant':14} {'compile':8} {'quant':5} {'k':>2} {'mode':8} {'b':>2} {'s/img':>7} {'TFLOP/s':>7} "
           f"{'peak':>6} {'warm s':>7} {'delta':>8}  device"]
    for r in rows:
        if r.get("part") == "D":
            out.append(f"{r['variant']:14} {r['compile']:8} {r['quantize']:5} {r['step_cache']:>2} {r['mode']:8} "
                       f"{r['batch']:>2} {r['s_per_image']:>7.3f} {r['tflops'] or 0:>7.0f} {r['peak_mem_gb']:>6.1f} "
                       f"{r['warmup_s']:>7.1f} {r['max_delta']:>8.4f}  {r['gpu']}")
        elif r.get("part") == "E":
            out.append(f"vae decode {r['vae']:18} b{r['batch']} {'sliced' if r['sliced'] else '':6} "
                       f"{r['seconds']:.3f} s peak {r['peak_mem_gb']:.1f} GB  {r['gpu']}")
        elif r.get("part") == "G":
            out.append(f"cold start {r['start']:22} {r['seconds_to_ready']} s to ready (rc {r['rc']})  {r['gpu']}")
    return out


class Log:
    def __init__(self, path: Path) -> None:
        self.f = open(path, "a", buffering=1)

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        self.f.write(line + "\n")


def write_row(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def preflight(args, results: Path, log: Log) -> float:
    """Versions (and where they were imported from), the GPU, free disk; the fp16 matmul rate as the
    ceiling for % peak. Returns that rate in TFLOP/s (0 on the dry run)."""
    import torch
    row = {"part": "env", "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    for name in ("diffusers", "transformers", "huggingface_hub", "peft", "accelerate", "safetensors", "tokenizers",
                 "numpy", "PIL"):
        try:
            mod = __import__(name)
            row[name] = f"{getattr(mod, '__version__', '?')} ({Path(mod.__file__).parent.parent})"
        except Exception as e:  # noqa: BLE001 - report every missing package, not only the first
            row[name] = f"MISSING: {type(e).__name__}: {e}"
    try:
        # What the parts import: a missing package shows here, before any GPU time is spent on a part.
        sys.path.insert(0, str(REPO))
        import generate_twin, ipadapter_manager, instantid, model_loader  # noqa: F401,E401
        from diffusers import FluxPipeline, StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline  # noqa: F401
        row["imports"] = "ok"
    except Exception as e:  # noqa: BLE001
        row["imports"] = f"FAILED: {type(e).__name__}: {e}"
    row["swap_dir"] = str(args.swap_dir)
    row["disk_free_gb"] = round(shutil.disk_usage(args.swap_dir.parent).free / 1e9, 1)
    peak = 0.0
    if torch.cuda.is_available() and not args.dry_run:
        p = torch.cuda.get_device_properties(0)
        row.update(gpu=p.name, gpu_mem_gb=round(p.total_memory / 1e9, 1), sms=p.multi_processor_count)
        # The ceiling: an 8192³ fp16 matmul on random data (10 timed after 3 warm-ups), events around it.
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
        for _ in range(3):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        torch.cuda.synchronize()
        peak = 2 * 8192**3 * 10 / (start.elapsed_time(end) / 1e3) / 1e12
        row["fp16_matmul_tflops"] = round(peak, 1)
        del a, b
        torch.cuda.empty_cache()
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,"
                                  "power.draw", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            row["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            row["nvidia_smi"] = f"unavailable: {e}"
    write_row(results, row)
    for k, v in row.items():
        log(f"  {k}: {v}")
    if row["imports"] != "ok":
        raise SystemExit(f"preflight: the project's imports fail here ({row['imports']}): fix the wheels in .whl")
    return peak


def run_part(name: str, argv: list[str], limit: float, log: Log) -> dict:
    """One part in its own process group, its output streamed into the log; killed at ``limit`` seconds."""
    log(f"=== {name}: {' '.join(argv[1:])} (limit {limit:.0f} s)")
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p))
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    timed_out = False
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while True:
        left = limit - (time.perf_counter() - t0)
        if left <= 0:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            break
        if sel.select(timeout=min(left, 5.0)):
            line = proc.stdout.readline()
            if not line:
                break
            log(f"  [{name}] {line.rstrip()}")
    rc = proc.wait()
    sel.close()
    out = {"part": name, "step": "part", "rc": rc, "timed_out": timed_out,
           "wall_s": round(time.perf_counter() - t0, 1)}
    log(f"=== {name}: rc {rc}{' (TIMED OUT, killed)' if timed_out else ''} in {out['wall_s']} s")
    return out


def table_ab(rows: list[dict]) -> list[str]:
    """Parts A and B of the final table."""
    out = ["", "part A: s/call, 30 steps CFG unless mode few-step (4 steps, no CFG); peak = max allocated GB",
           f"{'variant':14} {'mode':8} {'b':>2} {'res':>5} {'st':>3} {'s/call':>7} {'s/img':>6} {'it/s':>6} "
           f"{'TFLOP/s':>7} {'%pk':>5} {'peak':>6} {'resv':>6} {'build':>6}"]
    for r in rows:
        if r.get("part") == "A":
            out.append(f"{r['variant']:14} {r['mode']:8} {r['batch']:>2} {r['resolution']:>5} {r['steps']:>3} "
                       f"{r['seconds']:>7.2f} {r['s_per_image']:>6.2f} {r['it_s']:>6.2f} {r['tflops'] or 0:>7.0f} "
                       f"{r['pct_peak'] or 0:>5.1f} {r['peak_mem_gb']:>6.1f} {r['peak_reserved_gb'] or 0:>6.1f} "
                       f"{r['build_s']:>6.1f}")
    out += ["", "part B: hot swap through DigitalTwinGenerator.load_model (GPU GB allocated; peak during the call)",
            f"{'step':8} {'to':24} {'call s':>7} {'load s':>7} {'alloc bef':>9} {'alloc aft':>9} {'resv aft':>8} "
            f"{'peak':>6} {'gen s':>6}"]
    for r in rows:
        if r.get("part") != "B":
            continue
        if r["step"] == "write":
            out.append(f"write    base {r['base_gb']:.1f} GB {r['base_write_s']:.0f} s, adapter repo {r['adapter_gb']:.1f} "
                       f"GB {r['adapter_write_s']:.0f} s, checkpoint {r['checkpoint_gb']:.1f} GB "
                       f"{r['checkpoint_write_s']:.0f} s (init {r['init_s']:.1f} s)")
        elif r["step"] == "setup":
            out.append(f"setup    {'':24} {r['seconds']:>7.1f} {'':>7} {'':>9} {str(r['allocated_gb']):>9} "
                       f"{str(r['reserved_gb']):>8} {'':>6} {r['gen_s']:>6.2f}")
        elif r["step"] == "swap":
            out.append(f"swap {r['round_trip']:<3} {r['to'][:24]:24} {r['call_s']:>7.1f} {r['load_s']:>7.1f} "
                       f"{str(r['before_allocated_gb']):>9} {str(r['after_allocated_gb']):>9} "
                       f"{str(r['after_reserved_gb']):>8} {str(r['peak_during_gb']):>6} {r['gen_s']:>6.2f}")
        elif r["step"] == "summary":
            out.append(f"summary  median {r['call_median_s']} s, max {r['call_max_s']} s over {r['swaps']} switches; "
                       + ", ".join(f"{k} {v}" for k, v in r.items() if k.startswith("growth")))
    return out


def table_i(rows: list[dict]) -> list[str]:
    """Part I of the final table (FLUX.1-dev + InfiniteYou)."""
    d = [r for r in rows if r.get("part") == "I"]
    if not d:
        return []
    out = ["", "part I: FLUX.1-dev + InfiniteYou, s/image, batch 1; peak = max allocated GB (published bf16: ~43 GB)",
           f"{'mode':10} {'backend':13} {'res':>5} {'st':>3} {'s/img':>7} {'peak':>6} {'build':>6}"]
    for r in d:
        if r.get("skipped"):
            out.append(f"{r['mode']:10} skipped: {r['skipped']}")
            continue
        out.append(f"{r['mode']:10} {str(r['backend'] or '-'):13} {r['resolution']:>5} {r['steps']:>3} "
                   f"{r['s_per_image']:>7.2f} {str(r['peak_gb']):>6} {r['build_s']:>6.1f}")
    return out


def table_training(rows: list[dict]) -> list[str]:
    """Part T: s/step, the time for all steps with caching, peak memory, against the goals."""
    train = [r for r in rows if str(r.get("part", "")).startswith("train-")]
    if not train:
        return []
    out = ["", "part T: twin LoRA training (goals: 500 steps <= 240 s on H100-class, peak <= 22 GB)",
           f"{'model':12} {'res':>5} {'rank':>4} {'steps':>5} {'s/step':>7} {'cache':>6} {'total':>7} "
           f"{'500 st':>7} {'peak GB':>7} {'trained':>10}"]
    for r in train:
        out.append(f"{r['part']:12} {r['resolution']:>5} {r['rank']:>4} {r['steps']:>5} {r['s_per_step']:>7.3f} "
                   f"{r['cache_s']:>6.1f} {r['total_s_incl_cache']:>7.1f} {r['projected_500_steps_s']:>7.1f} "
                   f"{str(r['peak_gpu_gb']):>7} {r['trained_parameters']:>10}")
    return out


def table(results: Path) -> list[str]:
    rows = [json.loads(x) for x in results.read_text().splitlines() if x.strip()]
    out = [] if not any(r.get("part") in ("A", "B") for r in rows) else table_ab(rows)
    if any(r.get("part") in ("D", "E", "G") for r in rows):
        out += table_speed(rows)
    flux = [r for r in rows if r.get("part") == "C"]
    if flux:
        out += ["", "part C: FLUX.1, s/call; peak = max allocated GB during the timed calls, held = allocated before",
                f"{'model':15} {'mode':10} {'backend':13} {'b':>2} {'res':>5} {'st':>3} {'s/call':>7} {'s/img':>6} "
                f"{'held':>6} {'peak':>6} {'build':>6}"]
        for r in flux:
            if r.get("skipped"):
                out.append(f"{r['model']:15} {r['mode']:10} skipped: {r['skipped']}")
                continue
            out.append(f"{r['model']:15} {r['mode']:10} {str(r['backend'] or '-'):13} {r['batch']:>2} "
                       f"{r['resolution']:>5} {r['steps']:>3} {r['seconds']:>7.2f} {r['s_per_image']:>6.2f} "
                       f"{str(r['held_gb']):>6} {str(r['peak_gb']):>6} {r['build_s']:>6.1f}")
    out += table_i(rows)
    out += table_training(rows)
    out.append("")
    for r in rows:
        if r.get("step") == "part":
            out.append(f"{r['part']:16} rc {r['rc']:>3} {'TIMED OUT ' if r['timed_out'] else ''}wall {r['wall_s']} s")
    return out


def suite_plan(args, peak_tflops: float) -> list[tuple[str, str, list[str], float]]:
    """The parts of the suite named by --suite."""
    if args.suite == "speed":
        return speed_plan(args.dry_run, args.swap_dir)
    return {"flux": flux_plan, "infiniteyou": infiniteyou_plan, "training": training_plan}.get(
        args.suite, lambda d: plan(d, peak_tflops))(args.dry_run)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, small topology, 128², 2 steps, one round trip")
    ap.add_argument("--out", type=Path, help="results folder (default $OUT, else ./gpu_out)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="overall wall-clock budget for the parts (default 420 s; --suite flux: 540 s)")
    ap.add_argument("--swap-dir", type=Path, default=None,
                    help="where part B writes its ~16 GB random model, removed first and at the end (default: "
                         "/tmp/sdxl-random-bench, or beside the repository when /tmp has under 24 GB free)")
    ap.add_argument("--only", nargs="+", help="run only these parts (names as printed)")
    ap.add_argument("--suite", default="sdxl", choices=("sdxl", "flux", "infiniteyou", "training", "speed"),
                    help="sdxl: parts A and B (default); flux: part C (FLUX.1-dev memory modes, schnell); "
                         "infiniteyou: part I (FLUX.1-dev + InfiniteYou, each memory mode); "
                         "training: part T (twin LoRA training on SDXL); speed: parts D-G (compile, quantization, "
                         "VAE, step cache, cold start; use --only for a subset)")
    ap.add_argument("--plan-only", action="store_true", help="print the parts and their commands, run nothing")
    args = ap.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = {"flux": 540.0, "infiniteyou": 540.0, "training": 560.0, "speed": 1800.0}.get(args.suite, 420.0)
    if args.plan_only:
        for name, script, a, cap in suite_plan(args, 0.0):
            if not args.only or name in args.only:
                print(f"{name:28} cap {cap:>4.0f} s  bench/{script} {' '.join(a)}")
        return 0
    t_start = time.perf_counter()
    out = args.out or Path(os.environ.get("OUT") or (REPO / "gpu_out"))
    out.mkdir(parents=True, exist_ok=True)
    results, log = out / "gpu_results.jsonl", Log(out / "gpu_log.txt")
    log(f"gpu_suite {'DRY RUN (CPU, small)' if args.dry_run else 'GPU'} -> {out}; budget {args.budget_s:.0f} s")
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        log("ERROR: CUDA is not available (torch.cuda.is_available() is False, torch "
            f"{torch.__version__}); this suite needs the GPU. Use --dry-run for the CPU check.")
        return 2
    if args.swap_dir is None:
        # Part B writes ~16 GB (base folder, IP-Adapter repo, single-file checkpoint): pick a place that holds it.
        args.swap_dir = Path("/tmp/sdxl-random-bench")
        if shutil.disk_usage("/tmp").free < 24e9 and shutil.disk_usage(REPO.parent).free > shutil.disk_usage("/tmp").free:
            args.swap_dir = REPO.parent / "sdxl-random-bench"
    peak = preflight(args, results, log)
    parts = suite_plan(args, peak)
    shutil.rmtree(args.swap_dir, ignore_errors=True)
    for name, script, a, cap in parts:
        if args.only and name not in args.only:
            continue
        left = args.budget_s - (time.perf_counter() - t_start)
        if left < 20:
            log(f"=== {name}: SKIPPED, {left:.0f} s of the budget left")
            write_row(results, {"part": name, "step": "part", "rc": None, "timed_out": False, "wall_s": 0,
                                "skipped": True})
            continue
        extra = ["--jsonl", str(results)]
        if script == "bench_models.py":
            extra += ["--dir", str(args.swap_dir), "--time-limit-s", f"{min(cap, left) - 45:.0f}"]
        write_row(results, run_part(name, [sys.executable, str(REPO / "bench" / script), *a, *extra],
                                    min(cap, left), log))
    shutil.rmtree(args.swap_dir, ignore_errors=True)
    for line in table(results):
        log(line)
    log(f"gpu_suite done in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
