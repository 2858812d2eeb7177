"""Live progress over Server-Sent Events, measured in one run against real gunicorn (fakes, fixed step time).

1. Events delivered per job vs denoising steps (goal: every step, once) for each of 50 streams open on
   the same job, and their order/id density.
2. Server threads held per open stream (gthread pool threads in use, read from the worker process).
3. /status latency with 50 open streams during a job: p50 / p99 over a steady poller (goal p99 < 25 ms).
   The same poller without streams runs first, so the ratio of the two p99s is printed too.

    .venv/bin/python bench/bench_events.py [--streams 50] [--step-seconds 0.5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.fakes import QUALITY_STEPS, image_bytes  # noqa: E402
from tests.fixtures.service import FAKE_APP, Server, server_env  # noqa: E402
from tests.test_events import parse_sse  # noqa: E402


def pct(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def worker_threads(server: Server) -> int:
    """Threads of the gunicorn worker process (the arbiter's only child)."""
    import subprocess
    kids = subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True).stdout.split()
    return sum(len(os.listdir(f"/proc/{k}/task")) for k in kids if os.path.isdir(f"/proc/{k}/task"))


def poll_status(url: str, cookies, seconds: float, interval: float = 0.02) -> list[float]:
    s = requests.Session()
    s.cookies.update(cookies)
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        assert s.get(url, timeout=10).status_code == 200
        out.append((time.perf_counter() - t0) * 1000)
        time.sleep(interval)
    return out


def preview_cost(reps: int = 5) -> None:
    import torch

    from generate_twin import DigitalTwinGenerator, GenerationRequest, latent_preview_jpeg
    from model_loader import TINY_RESOLUTION
    from utils.config import Settings
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        s = Settings(data_dir=Path(tmp), model_profile="tiny", tiny_model_dir=Path(tmp) / "tiny", warmup=False,
                     device="cpu")
        gen = DigitalTwinGenerator(s).setup()
        lat = torch.randn(1, 4, TINY_RESOLUTION // 8, TINY_RESOLUTION // 8)
        latent_preview_jpeg(lat)
        t0 = time.perf_counter()
        for _ in range(200):
            latent_preview_jpeg(lat)
        per_preview = (time.perf_counter() - t0) / 200
        runs: dict[bool, list[float]] = {False: [], True: []}
        steps = 0
        for _ in range(reps):
            for want in (False, True):
                req = GenerationRequest.from_dict({"prompt": "a portrait", "seed": 1, "preview": want,
                                                   "quality_mode": "high_fidelity"}, s)
                seen = []
                t0 = time.perf_counter()
                gen.generate(req, on_progress=lambda st, tot, *p: seen.append(st))
                runs[want].append(time.perf_counter() - t0)
                steps = len(seen)
    plain, with_p = statistics.median(runs[False]), statistics.median(runs[True])
    per_step = plain / steps
    print(f"preview (tiny, {TINY_RESOLUTION}px, latents {TINY_RESOLUTION // 8}²): {per_preview * 1000:.2f} ms per preview; "
          f"one denoising step {per_step * 1000:.1f} ms -> {per_preview / per_step * 100:.2f} % of a step (goal <= 2 %)")
    print(f"whole generation, {steps} steps: {plain:.3f} s without previews, {with_p:.3f} s with (ratio {with_p / plain:.3f}, "
          f"median of {reps} alternating runs)")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=50)
    ap.add_argument("--step-seconds", type=float, default=0.5)
    ap.add_argument("--preview-cost", action="store_true", help="also measure previews on the tiny engine")
    args = ap.parse_args()
    if args.preview_cost:
        preview_cost()
    mode, steps = "high_fidelity", QUALITY_STEPS["high_fidelity"]
    with tempfile.TemporaryDirectory() as tmp:
        env = server_env(Path(tmp) / "data", FAKE_STEP_SECONDS=str(args.step_seconds),
                         TWIN_MAX_EVENT_STREAMS=str(args.streams), TWIN_LOG_LEVEL="WARNING")
        server = Server(env, Path(tmp) / "server.log", FAKE_APP).start()
        try:
            s = requests.Session()
            files = [("files", (f"s{i}.png", image_bytes(color=(i * 40, 90, 30)), "image/png")) for i in range(2)]
            assert s.post(server.url + "/upload", files=files, timeout=30).status_code == 200
            idle_threads = worker_threads(server)

            def job():
                return s.post(server.url + "/generate", json={"prompt": "p", "quality_mode": mode}, timeout=30).json()

            # Baseline: /status during a job, no streams.
            j = job()
            base = poll_status(f"{server.url}/status/{j['id']}", s.cookies, steps * args.step_seconds)

            j = job()
            bodies: list[str] = [""] * args.streams
            opened = threading.Barrier(args.streams + 1)

            def stream(i):
                with requests.get(f"{server.url}/events/{j['id']}", cookies=s.cookies, stream=True, timeout=60) as r:
                    opened.wait()
                    for chunk in r.iter_content(chunk_size=None, decode_unicode=True):
                        bodies[i] += chunk
            threads = [threading.Thread(target=stream, args=(i,)) for i in range(args.streams)]
            for t in threads:
                t.start()
            opened.wait()
            time.sleep(0.2)
            held = worker_threads(server) - idle_threads
            with_streams = poll_status(f"{server.url}/status/{j['id']}", s.cookies, steps * args.step_seconds)
            for t in threads:
                t.join(60)
            per_stream = []
            for b in bodies:
                evs = parse_sse(b)[0]
                ok_ids = [e["id"] for e in evs] == list(range(1, len(evs) + 1))
                per_stream.append((sum(e["event"] == "progress" for e in evs), ok_ids, evs[-1]["event"] if evs else None))
        finally:
            server.stop()
    got = [n for n, _, _ in per_stream]
    print(f"steps per job: {steps}; progress events per stream: min {min(got)}, max {max(got)} "
          f"(all streams dense ids: {all(ok for _, ok, _ in per_stream)}, all ended with done: "
          f"{all(last == 'done' for _, _, last in per_stream)})")
    print(f"open streams: {args.streams}; worker threads added while open: {held} "
          f"({held / args.streams:.2f} per stream)")
    print(f"/status during a job, no streams:   n={len(base)} p50 {statistics.median(base):.1f} ms  p99 {pct(base, 99):.1f} ms")
    print(f"/status during a job, {args.streams} streams: n={len(with_streams)} p50 {statistics.median(with_streams):.1f} ms  "
          f"p99 {pct(with_streams, 99):.1f} ms  (goal < 25 ms; p99 ratio to no streams {pct(with_streams, 99) / pct(base, 99):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
