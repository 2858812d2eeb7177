"""Twin studio: LoRA training speed and memory, measured in one run.

    python bench/bench_training.py                       # CPU, tiny profile, through the service (POST /train)
    python bench/bench_training.py --full-size --device cuda --resolution 1024 --rank 16 --steps 500
    python bench/bench_training.py --full-size --size small --device cpu --resolution 128 --steps 3   # dry run
    python bench/bench_training.py --full-size --size full --device cpu --dtype bfloat16 --resolution 256 --steps 2

Tiny (default): a real app (in-process tiny generator, face double) takes an upload and a POST
/sessions/<id>/train; printed: time from the POST to the first progress event, s/step (the record's, without
the one-off caching), its ratio to one denoising step of a generation on the same model, peak RSS, the LoRA
file's size. Full size: SDXL's real topology with random weights (bench_generate.build_full_size, the
identity adapter unloaded: training runs it at scale 0), the same trainer (utils/engine/training/sdxl.py):
caching time, s/step after the first steps, time for all steps including caching, peak GPU memory (or RSS),
parameters trained; rows go to --jsonl as they are measured.
"""
from __future__ import annotations

import argparse
import io
import json
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def write_row(path, row: dict) -> None:
    print(json.dumps(row), flush=True)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


# --- tiny, through the service ---------------------------------------------------------------------------

def bench_tiny(args) -> None:
    import torch
    torch.set_num_threads(args.threads)
    from app import create_app
    from generate_twin import DigitalTwinGenerator
    from model_loader import make_tiny
    from tests.fakes import FakeFaceService, image_bytes
    from utils.config import Settings
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    tiny = make_tiny(tmp / "tiny")
    gen_settings = Settings(data_dir=tmp / "gen", model_dir=tmp / "none", tiny_model_dir=tiny, model_profile="tiny",
                            warmup=False)
    gen = DigitalTwinGenerator(gen_settings).setup()
    app = create_app(Settings(data_dir=tmp / "data", retention_hours=0, warmup=False, model_profile="tiny", log_level="WARNING",
                              tiny_model_dir=tiny, rate_limit_upload="1000/minute", rate_limit_generate="1000/minute"),
                     generator=gen, faces=FakeFaceService())
    rt = app.extensions["twin"]
    rt.wait_ready(30)
    c = app.test_client()
    files = {"files": [(io.BytesIO(image_bytes(color=(i * 10, 90, 40), size=(160, 200))), f"s{i}.png")
                       for i in range(3)]}
    up = c.post("/upload", data=files, content_type="multipart/form-data").get_json()
    sid, h = up["session_id"], {"X-Client-Token": up["client_token"]}
    first: dict[str, float] = {}
    seen = threading.Event()

    def listener(job_id, kind, data):
        if kind == "progress" and "loss" in data and not seen.is_set():
            first["at"] = time.perf_counter()
            seen.set()
    rt.store.listeners.append(listener)
    t0 = time.perf_counter()
    job = c.post(f"/sessions/{sid}/train", json={"steps": args.steps, "rank": args.rank}, headers=h).get_json()
    while c.get(f"/status/{job['id']}", headers=h).get_json()["status"] in ("queued", "running"):
        time.sleep(0.05)
    total = time.perf_counter() - t0
    done = c.get(f"/status/{job['id']}", headers=h).get_json()
    meta = done["metadata"]
    gen_job = c.post("/generate", json={"prompt": "a portrait", "session_id": sid, "identity_mode": "adapter",
                                        "quality_mode": "fast", "seed": 1}, headers=h).get_json()
    while c.get(f"/status/{gen_job['id']}", headers=h).get_json()["status"] in ("queued", "running"):
        time.sleep(0.05)
    gen_meta = c.get(f"/status/{gen_job['id']}", headers=h).get_json()["metadata"]
    gen_step = 1 / gen_meta["timings"]["steps_per_s"] if gen_meta["timings"]["steps_per_s"] else None
    write_row(args.jsonl, {
        "part": "tiny-cpu", "status": done["status"], "steps": meta["steps"], "images": meta["images"],
        "s_per_step": meta["seconds_per_step"], "cache_s": meta["cache_seconds"], "train_s": meta["seconds"],
        "post_to_done_s": round(total, 3), "first_progress_s": round(first.get("at", t0) - t0, 3),
        "train_step_over_generation_step": round(meta["seconds_per_step"] / gen_step, 2) if gen_step else None,
        "peak_rss_mb": round(peak_rss_mb(), 1), "lora_bytes": meta["lora_bytes"],
        "kohya_bytes": meta["kohya_bytes"], "trained_parameters": meta["trained_parameters"]})
    rt.shutdown()


# --- full size (random weights) ------------------------------------------------------------------------

class BenchModel:
    """What the trainer asks of a family model, around a random full-size pipeline (no identity adapter)."""
    family = "sdxl"
    adapter = None
    null_identity = None

    def __init__(self, models) -> None:
        self.models = models
        self.lock = threading.Lock()


def bench_full(args) -> None:
    import numpy as np
    import torch
    from PIL import Image
    from bench_generate import build_full_size
    from utils.engine.training import TrainRequest, TrainSpec
    from utils.engine.training.sdxl import train
    from utils.models.load import LoadedModels
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    pipe, counts = build_full_size(dtype, args.device, size=args.size)
    pipe.unload_ip_adapter()
    build_s = time.perf_counter() - t0
    models = LoadedModels(pipe=pipe, profile="bench", model_name=f"random-sdxl-{args.size}",
                          native_resolution=args.resolution, device=args.device, dtype=dtype, adapter_repo=None,
                          adapter_variant="", lightning_adapter=None, loras={},
                          base_scheduler_config=dict(pipe.scheduler.config))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (args.resolution, args.resolution, 3), dtype=np.uint8))
              for _ in range(6)]
    marks: list[float] = []
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    req = TrainRequest(rank=args.rank, learning_rate=1e-4, seed=0)
    spec = TrainSpec(request=req, token="zqxkvw", work_dir=Path(tempfile.mkdtemp(prefix="bench-lora-")),
                     run_id="bench", steps=args.steps, resolution=args.resolution, images=images,
                     checkpoint_every=max(args.steps, 1))
    t1 = time.perf_counter()
    record = train(BenchModel(models), spec, lambda *a: marks.append(time.perf_counter()))
    total = time.perf_counter() - t1
    warm = marks[min(2, len(marks) - 1):]
    s_step = (warm[-1] - warm[0]) / (len(warm) - 1) if len(warm) > 1 else record["seconds_per_step"]
    peak = (torch.cuda.max_memory_allocated() / 2**30) if args.device.startswith("cuda") else None
    write_row(args.jsonl, {
        "part": f"train-{args.size}", "device": args.device, "gpu": torch.cuda.get_device_name() if peak else "cpu",
        "dtype": args.dtype, "resolution": args.resolution, "rank": args.rank, "steps": args.steps,
        "build_s": round(build_s, 1), "cache_s": record["cache_seconds"], "s_per_step": round(s_step, 4),
        "total_s_incl_cache": round(total, 2), "projected_500_steps_s": round(record["cache_seconds"] + 500 * s_step, 1),
        "peak_gpu_gb": round(peak, 2) if peak else None, "peak_rss_mb": round(peak_rss_mb(), 1),
        "trained_parameters": record["trained_parameters"], "base_parameters": sum(counts.values()),
        "optimizer": record["optimizer"], "gradient_checkpointing": record["gradient_checkpointing"],
        "lora_bytes": record["lora_bytes"], "loss_first": record["loss_curve"][0], "loss_last": record["loss_final"]})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full-size", action="store_true", help="SDXL's real topology with random weights")
    ap.add_argument("--size", default="full", choices=("full", "small"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--jsonl", default=None, help="append each result row here")
    args = ap.parse_args(argv)
    if args.full_size:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        bench_full(args)
    else:
        bench_tiny(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
