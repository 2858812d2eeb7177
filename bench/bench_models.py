"""Base-model hot swap on the tiny profile: swap time and memory (RSS) across repeated switches.

Loads the generator (in this process, or in its child with --process), then switches base -> tiny-alt ->
base N times, printing each switch's load / wait / total time and the RSS of the process that holds the
model before and after. No leak: RSS after N round trips stays near RSS after the first one.

    .venv/bin/python bench/bench_models.py [--swaps 5] [--process]
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def rss_mb(pid: int | None = None) -> float:
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--swaps", type=int, default=5, help="round trips base -> alt -> base")
    ap.add_argument("--process", action="store_true", help="the generator in its child process (the default server set-up)")
    args = ap.parse_args()
    from model_loader import base_model_name, make_tiny
    from utils.config import Settings
    tmp = Path(tempfile.mkdtemp(prefix="bench-models-"))
    tiny = make_tiny(tmp / "tiny-model")
    settings = Settings(data_dir=tmp / "data", tiny_model_dir=tiny, model_dir=tmp / "none", model_profile="tiny",
                        warmup=False, max_steps=3)
    if args.process:
        from utils.jobs.generator_process import GeneratorProcess
        gen = GeneratorProcess(settings).setup()
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
