"""bench/gpu_suite.py and the full-size hot-swap writer it drives (bench/bench_models.py --full-size).

The GPU run itself happens on a lent machine; here: the plan of parts, the fail-fast without CUDA, and that
the random model folder the writer leaves is what the product resolves and lists (sdxl profile)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))   # bench_models imports bench_generate as a sibling, as when run
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("dry_run, device, size_args, big_batch, swaps", [
    (False, "cuda", {"--resolution": "1024", "--steps": "30", "--dtype": "float16", "--repeats": "2"}, "4", "3"),
    (True, "cpu", {"--size": "small", "--resolution": "128", "--steps": "2", "--repeats": "1"}, "2", "1"),
])
def test_plan_runs_the_same_scripts_on_gpu_and_dry_run(dry_run, device, size_args, big_batch, swaps):
    suite = _load("gpu_suite")
    parts = suite.plan(dry_run, 790.0)
    assert [(n, s) for n, s, _, _ in parts] == [
        ("A-plus-face", "bench_generate.py"), ("A-instantid", "bench_generate.py"),
        ("A-faceid-plusv2", "bench_generate.py"), ("B-hot-swap", "bench_models.py")]
    for name, script, args, cap in parts:
        assert "--full-size" in args and cap > 0
        if script == "bench_generate.py":
            assert {k: args[args.index(k) + 1] for k in size_args} == size_args
            assert args[args.index("--device") + 1] == device
            assert ("--peak-tflops" in args) is (not dry_run)
    plus = parts[0][2]
    assert plus[plus.index("--batch") + 1: plus.index("--batch") + 3] == ["1", big_batch]
    b = parts[3][2]
    assert b[b.index("--swaps") + 1] == swaps
    assert sum(cap for *_, cap in parts[:3]) < 420   # part A leaves part B most of the 7-minute budget


@pytest.mark.parametrize("dry_run, device, size_args, batches", [
    (False, "cuda", {"--resolution": "1024", "--steps": "28", "--repeats": "2"}, ["1", "4"]),
    (True, "cpu", {"--size": "small", "--resolution": "128", "--steps": "2", "--repeats": "1"}, ["1", "2"]),
])
def test_the_flux_plan_measures_every_memory_mode_and_schnell(dry_run, device, size_args, batches):
    suite = _load("gpu_suite")
    parts = suite.flux_plan(dry_run)
    assert [(n, s) for n, s, _, _ in parts] == [("C-flux-full", "bench_flux.py"), ("C-flux-quantized", "bench_flux.py"),
                                                ("C-flux-offload", "bench_flux.py")]
    modes, variants = [], []
    for name, script, args, cap in parts:
        assert "--full-size" in args and cap > 0
        assert {k: args[args.index(k) + 1] for k in size_args} == size_args
        assert args[args.index("--device") + 1] == device
        assert args[args.index("--batch") + 1: args.index("--batch") + 3] == batches
        modes.append(args[args.index("--modes") + 1])
        variants += args[args.index("--variants") + 1: args.index("--variants") + 3]
    assert modes == ["full", "quantized", "offload"] and "schnell" in variants
    assert sum(cap for *_, cap in parts) <= 540       # inside the flux suite's default budget


def test_the_flux_bench_dry_run_measures_on_the_cpu(tmp_path):
    """bench_flux.py's full-size path with the small topology on the CPU: FLUX.1-dev full and schnell rows,
    the GPU-only modes said to need CUDA (nothing claimed)."""
    import json
    bench = _load("bench_flux")
    rows = tmp_path / "rows.jsonl"
    assert bench.main(["--full-size", "--size", "small", "--device", "cpu", "--resolution", "64", "--steps", "1",
                       "--batch", "1", "--warmup", "0", "--repeats", "1", "--jsonl", str(rows)]) == 0
    got = [json.loads(x) for x in rows.read_text().splitlines()]
    assert [(r["model"], r["mode"], "skipped" in r) for r in got] == [
        ("FLUX.1-dev", "full", False), ("FLUX.1-dev", "quantized", True), ("FLUX.1-dev", "offload", True),
        ("FLUX.1-schnell", "full", False)]
    assert all(r["seconds"] > 0 for r in got if "skipped" not in r)


def test_fails_fast_without_cuda(tmp_path, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    suite = _load("gpu_suite")
    assert suite.main(["--out", str(tmp_path)]) == 2
    assert "CUDA is not available" in (tmp_path / "gpu_log.txt").read_text()
    assert not (tmp_path / "gpu_results.jsonl").exists()   # nothing measured, nothing claimed


def test_random_sdxl_writer_leaves_the_layout_the_product_loads(tmp_path):
    """The small topology through the same writer: the sdxl profile resolves the folder (every required
    file present), lists the single-file checkpoint, and the files are fp16 as published."""
    from safetensors import safe_open
    from model_loader import CHECKPOINT_DIR, list_checkpoints, resolve_sdxl
    from utils.config import Settings
    bm = _load("bench_models")
    stats = bm.write_random_sdxl(tmp_path, "cpu", "small", log=lambda *_: None)
    assert stats["base_gb"] > 0 and stats["checkpoint_gb"] > 0
    s = Settings(data_dir=tmp_path / "data", model_dir=tmp_path, model_profile="sdxl", ip_adapter_variant="plus-face")
    w = resolve_sdxl(s)
    assert w.base == tmp_path / "stable-diffusion-xl-base-1.0" and w.adapter_repo == tmp_path / "IP-Adapter"
    ckpt = tmp_path / CHECKPOINT_DIR / f"{bm.ALT_NAME}.safetensors"
    assert list_checkpoints(s)[bm.ALT_NAME] == ckpt
    with safe_open(str(ckpt), framework="pt") as f:
        keys = list(f.keys())
        assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)   # original (LDM) layout
        assert {str(f.get_slice(k).get_dtype()) for k in keys} == {"F16"}


@pytest.mark.parametrize("dry_run, device, resolution, steps", [
    (False, "cuda", "1024", ["30", "500"]),
    (True, "cpu", "128", ["2", "3"]),
])
def test_the_training_plan_trains_rank_16_at_the_models_size(dry_run, device, resolution, steps):
    suite = _load("gpu_suite")
    parts = suite.training_plan(dry_run)
    assert [(n, s) for n, s, _, _ in parts] == [("T-train-short", "bench_training.py"), ("T-train-500", "bench_training.py")]
    for (_, _, args, cap), want_steps in zip(parts, steps):
        assert "--full-size" in args and cap > 0
        assert args[args.index("--device") + 1] == device
        assert args[args.index("--resolution") + 1] == resolution
        assert args[args.index("--rank") + 1] == "16"
        assert args[args.index("--steps") + 1] == want_steps
    assert sum(cap for *_, cap in parts) <= 560       # inside the training suite's default budget


@pytest.mark.parametrize("dry_run, device, size_args", [
    (False, "cuda", {"--resolution": "1024", "--steps": "28", "--repeats": "2"}),
    (True, "cpu", {"--size": "small", "--resolution": "128", "--steps": "2", "--repeats": "1"}),
])
def test_the_infiniteyou_plan_measures_every_memory_mode(dry_run, device, size_args):
    suite = _load("gpu_suite")
    parts = suite.infiniteyou_plan(dry_run)
    assert [(n, s) for n, s, _, _ in parts] == [("I-infiniteyou-full", "bench_infiniteyou.py"),
                                                ("I-infiniteyou-quantized", "bench_infiniteyou.py"),
                                                ("I-infiniteyou-offload", "bench_infiniteyou.py")]
    for name, script, args, cap in parts:
        assert "--full-size" in args and cap > 0 and args[args.index("--device") + 1] == device
        assert {k: args[args.index(k) + 1] for k in size_args} == size_args
        assert args[args.index("--modes") + 1] == name.rsplit("-", 1)[1]
    assert sum(cap for *_, cap in parts) <= 540


def test_the_infiniteyou_bench_dry_run_measures_on_the_cpu(tmp_path):
    """bench_infiniteyou.py's full-size path, small topology, CPU: the full row measured, the GPU modes skipped."""
    import json
    bench = _load("bench_infiniteyou")
    rows = tmp_path / "rows.jsonl"
    assert bench.main(["--full-size", "--size", "small", "--device", "cpu", "--resolution", "64", "--steps", "1",
                       "--warmup", "0", "--repeats", "1", "--jsonl", str(rows)]) == 0
    got = [json.loads(x) for x in rows.read_text().splitlines()]
    assert [(r["mode"], "skipped" in r) for r in got] == [("full", False), ("quantized", True), ("offload", True)]
    assert got[0]["s_per_image"] > 0 and got[0]["model"] == "FLUX.1-dev + InfiniteYou"
    suite = _load("gpu_suite")
    assert any("part I" in line for line in suite.table_i(got))


SPEED_VARIANTS = ("plus-face", "instantid", "faceid-plusv2")


@pytest.mark.parametrize("dry_run, fp8_runs_as", [(False, "fp8"), (True, "int8")])
def test_the_speed_plan_has_a_part_per_variant_compile_and_quantization(dry_run, fp8_runs_as):
    suite = _load("gpu_suite")
    parts = suite.speed_plan(dry_run)
    names = [n for n, *_ in parts]
    assert names == [f"D-{v}-{c}-{q}" for v in SPEED_VARIANTS for c in ("off", "regional", "full")
                     for q in ("none", "fp8")] + ["E-vae-decode", "F-step-cache", "G-cold-start"]
    for name, script, args, cap in parts:
        assert script == "bench_speed.py" and cap > 0
        if name.startswith("D-"):
            assert args[args.index("--quantize") + 1] == (fp8_runs_as if name.endswith("fp8") else "none")
            assert args[args.index("--batch") + 1] == "1" and args[args.index("--device") + 1] == ("cpu" if dry_run else "cuda")
    f = dict((n, a) for n, _, a, _ in parts)["F-step-cache"]
    assert f[f.index("--step-cache") + 1: f.index("--step-cache") + 4] == ["0", "2", "3"]


def test_the_speed_dry_run_prints_every_part(capsys):
    suite = _load("gpu_suite")
    assert suite.main(["--suite", "speed", "--dry-run", "--plan-only"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [n for n, *_ in suite.speed_plan(True)]
    assert all("bench/bench_speed.py" in line for line in lines)


def test_the_speed_table_prints_every_row_with_its_device():
    suite = _load("gpu_suite")
    rows = [{"part": "D", "variant": v, "compile": c, "quantize": q, "step_cache": 0, "mode": m, "batch": b,
             "s_per_image": 1.0, "tflops": None, "peak_mem_gb": 9.5, "warmup_s": 1.0, "max_delta": 0.0, "gpu": "NVIDIA H100"}
            for v in SPEED_VARIANTS for c in ("off", "regional", "full") for q in ("none", "fp8")
            for m in ("cfg", "few-step") for b in (1, 4)]
    rows += [{"part": "E", "vae": n, "batch": b, "sliced": False, "seconds": 0.1, "peak_mem_gb": 3.0, "gpu": "NVIDIA H100"}
             for n in ("stock fp32 upcast", "fp16-fix fp16") for b in (1, 4)]
    rows += [{"part": "G", "start": "eager", "seconds_to_ready": 12.0, "rc": 0, "gpu": "NVIDIA H100"}]
    out = suite.table_speed(rows)
    body = [line for line in out if line.endswith("NVIDIA H100")]
    assert len(body) == len(rows)
