"""An API node's start-up: seconds from process start to /health "ready", and the resident memory of the
node's whole process tree (gunicorn master + its worker + any generator process), for a given checkout.

Cluster mode is where this matters: an API node validates selfies and queues jobs; GPU workers hold the
model. Compare two checkouts in one run (the same machine, the same settings):

    .venv/bin/python bench/bench_api_node.py --checkout /path/to/old --checkout . [--profile tiny]
    .venv/bin/python bench/bench_api_node.py --checkout old --checkout . --profile sdxl --write-layout /tmp/sdxl
        # full-size SDXL layout of sparse (all-zero) weight files, written once (bench_verify's writer)

Prints one JSON row per checkout and mode. The tiny profile is built in a temp dir by each node itself.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_mb(pid: int) -> float:
    """RSS of ``pid`` and all its descendants, in MB (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def start_redis(tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp),
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    time.sleep(0.3)
    return proc, f"redis://127.0.0.1:{port}/0"


def run_node(checkout: Path, env: dict, timeout: float) -> dict:
    import requests
    port = free_port()
    env = {**os.environ, **env, "TWIN_HOST": "127.0.0.1", "TWIN_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:create_app()"],
                            cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    state, peak = "no answer", 0.0
    try:
        while time.perf_counter() - t0 < timeout:
            peak = max(peak, tree_rss_mb(proc.pid))
            try:
                state = requests.get(f"http://127.0.0.1:{port}/health", timeout=2).json().get("state")
            except requests.RequestException:
                state = "no answer"
            if state in ("ready", "setup_failed"):
                break
            time.sleep(0.2)
        ready_s = time.perf_counter() - t0
        time.sleep(1.0)   # what it holds once settled
        return {"state": state, "ready_s": round(ready_s, 2), "rss_mb": round(tree_rss_mb(proc.pid), 1),
                "peak_rss_mb": round(max(peak, tree_rss_mb(proc.pid)), 1)}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkout", action="append", type=Path, required=True, help="repository checkout (repeat)")
    ap.add_argument("--profile", default="tiny", choices=("tiny", "sdxl"))
    ap.add_argument("--write-layout", type=Path, help="sdxl: write (once) a full-size sparse layout here")
    ap.add_argument("--mode", action="append", choices=("cluster", "local"), help="default: cluster")
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {"TWIN_MODEL_PROFILE": args.profile, "TWIN_FACE_BACKEND": "dlib", "TWIN_RETENTION_HOURS": "0",
               "TWIN_WARMUP": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TWIN_TINY_MODEL_DIR": str(tmp / "tiny")}
        if args.profile == "sdxl":
            if args.write_layout is None:
                ap.error("--profile sdxl needs --write-layout DIR")
            if not (args.write_layout / "stable-diffusion-xl-base-1.0").is_dir():
                sys.path.insert(0, str(REPO / "bench"))
                from bench_verify import write_layout
                write_layout(args.write_layout)
            env["TWIN_MODEL_DIR"] = str(args.write_layout)
        redis_proc, url = start_redis(tmp)
        try:
            for mode in args.mode or ["cluster"]:
                for i, checkout in enumerate(args.checkout):
                    node_env = {**env, "TWIN_DATA_DIR": str(tmp / f"data-{mode}-{i}")}
                    if mode == "cluster":
                        node_env["TWIN_QUEUE_URL"] = url
                    row = run_node(checkout.resolve(), node_env, args.timeout)
                    print(json.dumps({"checkout": str(checkout), "mode": mode, "profile": args.profile, **row}),
                          flush=True)
        finally:
            redis_proc.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
