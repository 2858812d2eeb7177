"""Cluster mode on a real redis-server: throughput with 1, 2, 4 GPU workers, chaos (workers SIGKILLed
and restarted under load), /status latency with 50 pollers while 3 workers run, and a base-model swap
under load (POST /models/load to 2 workers while jobs arrive: swap time per worker, jobs during, failed).

The API node is a real gunicorn (``tests.fake_server_app:create()``) and the workers are real
``python -m utils.service.gpu_worker`` processes on the generator double with a fixed step time (a sleep:
the CPU is not the bottleneck, so the scaling measured is the queue's, not this box's cores).

    python bench/bench_cluster.py                       # everything, one run prints all
    python bench/bench_cluster.py --jobs 24 --chaos-jobs 100 --step 0.1
    python bench/bench_cluster.py --only swap --swap-engine tiny   # the swap on the real tiny engines
Needs redis-server on PATH (scripts/setup_system.sh).
"""
from __future__ import annotations

import argparse
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import requests  # noqa: E402

from tests.fakes import image_bytes  # noqa: E402
from tests.fixtures.redis_server import RedisServer  # noqa: E402
from tests.fixtures.service import FAKE_APP, Server  # noqa: E402

TOKEN = "X-Client-Token"


ADMIN = "bench-admin"


class Cluster:
    def __init__(self, tmp: Path, step: float, engine: str = "fake") -> None:
        """``engine``: "fake" (the doubles; workers have the registry double when FAKE_MODELS is set) or
        "tiny" (gunicorn on app:create_app() and workers on the real tiny-profile engines)."""
        self.tmp, self.step, self.engine = tmp, step, engine
        self.redis = RedisServer(shutil.which("redis-server") or sys.exit("redis-server not found"), tmp / "redis").start()
        self.env = {"TWIN_DATA_DIR": str(tmp / "data"), "TWIN_QUEUE_URL": self.redis.url, "TWIN_RETENTION_HOURS": "0",
                    "TWIN_WARMUP": "0", "TWIN_WORKER_HEARTBEAT_SECONDS": "0.5", "TWIN_RETRY_BACKOFF": "1",
                    "TWIN_QUEUE_MAX": "100000", "TWIN_RATE_LIMIT_UPLOAD": "1000000/minute",
                    "TWIN_RATE_LIMIT_GENERATE": "1000000/minute", "TWIN_LOG_LEVEL": "WARNING",
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TWIN_ADMIN_KEYS": ADMIN}
        self.worker_env: dict[str, str] = {}
        if engine == "tiny":
            self.env.update(TWIN_MODEL_PROFILE="tiny", TWIN_FACE_BACKEND="dlib", TWIN_DEVICE="cpu",
                            TWIN_MAX_STEPS="2", TWIN_MODEL_DIR=str(tmp / "no-models"))
        self.api = Server(self.env, tmp / "api.log", FAKE_APP if engine == "fake" else "app:create_app()").start(180)
        self.http = requests.Session()
        self.n5xx = 0
        self.workers: list[subprocess.Popen] = []
        self._n = 0
        if engine == "tiny":
            from tests.photos import selfie_set
            files = [("files", f) for f in selfie_set(2)]
        else:
            files = [("files", (f"s{i}.png", image_bytes((20 * i, 90, 40)))) for i in range(3)]
        r = self.http.post(self.api.url + "/upload", files=files)
        r.raise_for_status()
        self.token = r.json()["client_token"]

    def req(self, method: str, path: str, **kw):
        r = self.http.request(method, self.api.url + path, headers={TOKEN: self.token}, timeout=30, **kw)
        if r.status_code >= 500:
            self.n5xx += 1
        return r

    def start_worker(self) -> subprocess.Popen:
        import os
        env = {**os.environ, **self.env, "FAKE_STEP_SECONDS": str(self.step), "PYTHONUNBUFFERED": "1",
               **self.worker_env}
        self.procs = getattr(self, "procs", {})
        self._n += 1
        components = ["--components", "tests.fake_server_app:worker_components"] if self.engine == "fake" else []
        p = subprocess.Popen([sys.executable, "-m", "utils.service.gpu_worker", "--name", f"bench{self._n}",
                              *components], cwd=REPO, env=env,
                             stdout=open(self.tmp / f"worker{self._n}.log", "wb"), stderr=subprocess.STDOUT)
        self.workers.append(p)
        self.procs[f"bench{self._n}"] = p
        return p

    def live_workers(self) -> list[dict]:
        return self.req("GET", "/system-status").json()["cluster"]["workers"]

    def wait_workers(self, n: int, timeout: float = 60) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if len([w for w in self.live_workers() if (w["heartbeat_age_s"] or 0) < 10]) >= n:
                return
            time.sleep(0.2)
        raise SystemExit(f"{n} workers not up in {timeout}s")

    def stop_workers(self) -> None:
        for p in self.workers:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.workers:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.workers = []
        end = time.time() + 30
        while self.live_workers() and time.time() < end:  # RQ forgets a worker that registered its death
            time.sleep(0.2)

    def submit(self, n: int, quality: str = "fast") -> list[str]:
        return [self.req("POST", "/generate", json={"prompt": "bench", "quality_mode": quality}).json()["id"]
                for _ in range(n)]

    def wait_done(self, ids: list[str], timeout: float = 600) -> dict[str, dict]:
        left, done = set(ids), {}
        end = time.time() + timeout
        while left and time.time() < end:
            for j in list(left):
                body = self.req("GET", f"/status/{j}").json()
                if body.get("status") in ("succeeded", "failed", "canceled"):
                    done[j] = body
                    left.discard(j)
            time.sleep(0.05)
        return done

    def close(self) -> None:
        for p in self.workers:
            if p.poll() is None:
                p.kill()
        self.api.stop()
        self.redis.stop()


def throughput(c: Cluster, jobs: int) -> None:
    print(f"== throughput: {jobs} jobs of 4 steps x {c.step}s (fast) per run")
    base = None
    for n in (1, 2, 4):
        for _ in range(n):
            c.start_worker()
        c.wait_workers(n)
        t0 = time.time()
        ids = c.submit(jobs)
        done = c.wait_done(ids)
        wall = time.time() - t0
        ok = sum(1 for d in done.values() if d["status"] == "succeeded")
        rate = ok / wall
        base = base or rate
        print(f"   workers={n}: {ok}/{jobs} succeeded in {wall:.2f}s = {rate:.2f} jobs/s; "
              f"ratio to 1 worker {rate / base:.2f}x (goal >= {0.9 * n:.1f}x)")
        c.stop_workers()


def chaos(c: Cluster, jobs: int, every: float, step: float) -> None:
    c.step = step
    print(f"== chaos: {jobs} jobs (6 steps x {c.step}s), 3 workers, one SIGKILLed and replaced every ~{every:g}s")
    for _ in range(3):
        c.start_worker()
    c.wait_workers(3)
    n5xx0 = c.n5xx
    ids = c.submit(jobs, "balanced")
    kills: list[tuple[float, str, int]] = []
    recover: list[float] = []
    stop = threading.Event()

    def killer():
        while not stop.wait(every * random.uniform(0.8, 1.2)):
            busy = [w for w in c.live_workers() if w["current_job"]]
            procs = c.procs
            if not busy:
                continue
            w = random.choice(busy)
            p = procs.get(w["name"])
            if p is None or p.poll() is not None:
                continue
            job = c.req("GET", f"/status/{w['current_job']}").json()
            p.send_signal(signal.SIGKILL)
            kills.append((time.time(), w["current_job"], job.get("attempt", 1)))
            c.start_worker()

    th = threading.Thread(target=killer, daemon=True)
    t0 = time.time()
    th.start()

    def watch_recovery():
        seen = set()
        while not stop.is_set():
            for t_kill, jid, att in list(kills):
                if jid in seen:
                    continue
                body = c.req("GET", f"/status/{jid}").json()
                if body.get("attempt", 0) > att or body.get("status") in ("succeeded", "failed"):
                    seen.add(jid)
                    recover.append(time.time() - t_kill)
            time.sleep(0.1)
    rw = threading.Thread(target=watch_recovery, daemon=True)
    rw.start()
    done = c.wait_done(ids, timeout=900)
    stop.set()
    th.join(5)
    rw.join(5)
    wall = time.time() - t0
    ok = [d for d in done.values() if d["status"] == "succeeded"]
    bad_outputs = 0
    data = Path(c.env["TWIN_DATA_DIR"])
    for d in ok:
        names = [o["filename"] for o in d["outputs"]]
        # Portraits only (thumbnails and raw copies lie beside them); a temp file left behind counts too.
        on_disk = sorted(p.name for p in (data / d["session_id"] / "outputs" / d["id"]).glob("*")
                         if not p.name.endswith((".thumb.jpg", "_raw.png")))
        if names != ["avatar_001.png"] or on_disk != names:
            bad_outputs += 1
    print(f"   {len(ok)}/{jobs} succeeded, {jobs - len(done)} lost, "
          f"{sum(1 for d in done.values() if d['status'] != 'succeeded')} failed, "
          f"{bad_outputs} with duplicated/missing output files, {c.n5xx - n5xx0} 5xx, in {wall:.1f}s")
    print(f"   kills: {len(kills)}; time to recover per kill (kill -> job running again on another worker): "
          + ", ".join(f"{r:.1f}s" for r in sorted(recover)))
    c.stop_workers()


def status_latency(c: Cluster, pollers: int, seconds: float, interval: float) -> None:
    """As bench_service's /status window, so local and cluster mode compare: the pollers run in separate
    processes (a few threads each, so the bench's own GIL does not inflate what it measures), each polls
    every ``interval`` s from a random start (independent clients), while 3 workers run jobs."""
    import multiprocessing as mp

    from bench.bench_service import _poll_process
    from utils.api.auth import COOKIE_NAME
    print(f"== /status latency: {pollers} pollers, each every {interval:g} s, for {seconds:g}s while 3 workers run")
    for _ in range(3):
        c.start_worker()
    c.wait_workers(3)
    ids = c.submit(30, "balanced")
    ctx = mp.get_context("spawn")
    n_procs = max(1, min(5, pollers))
    per = [pollers // n_procs + (1 if i < pollers % n_procs else 0) for i in range(n_procs)]
    results, jobs = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_poll_process, args=(c.api.url, jobs, {COOKIE_NAME: c.token}, k, interval, results, True))
             for k in per]
    for p in procs:
        p.start()
    for _ in procs:
        assert results.get(timeout=120) == "ready"
    for i, _ in enumerate(procs):
        jobs.put((ids[i % len(ids)], time.time() + seconds))
    lat: list[float] = []
    for _ in procs:
        lat.extend(x * 1000 for x in results.get(timeout=300))
    for p in procs:
        p.join()
    lat.sort()
    print(f"   {len(lat)} requests: p50 {statistics.median(lat):.1f} ms, p99 {lat[int(len(lat) * 0.99) - 1]:.1f} ms "
          f"(goal p99 < 25 ms; client, API node and 3 workers share this box's CPUs)")
    c.wait_done(ids)
    c.stop_workers()


def swap(c: Cluster, rounds: int, load_s: float) -> None:
    """2 workers switch base model while jobs keep arriving (one every 0.1 s): per worker the swap time
    (command -> switched: load beside + wait for the running job + swap), the jobs submitted during the
    switch, how many failed, and which model each job ran on. ``rounds`` switches, alternating."""
    if c.engine == "fake":
        c.worker_env = {"FAKE_MODELS": "base,alt", "FAKE_MODEL": "base", "FAKE_LOAD_SECONDS": str(load_s)}
        names = ["base", "alt"]
        what = f"registry double, {load_s:g} s load, {c.step:g} s steps"
    else:
        names = ["tiny-sdxl", "tiny-alt"]
        what = "real tiny engines (tiny-sdxl <-> tiny-alt single file), CPU"
    print(f"== swap under load: 2 workers, {rounds} switches, {what}")
    for _ in range(2):
        c.start_worker()
    end = time.time() + 300
    while len(c.req("GET", "/models").json().get("workers", [])) < 2:
        if time.time() > end:
            raise SystemExit("2 workers not in the model registry in 300 s")
        time.sleep(0.2)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    all_ids: list[str] = []
    for i in range(rounds):
        target = names[(i + 1) % 2]
        ids: list[str] = []
        stop = threading.Event()

        def submit_loop():
            while not stop.is_set():
                ids.extend(c.submit(1))
                time.sleep(0.1)

        th = threading.Thread(target=submit_loop)
        th.start()
        time.sleep(0.5)
        t0 = time.time()
        r = c.http.post(c.api.url + "/models/load", json={"model": target}, headers=admin, timeout=600)
        wall = time.time() - t0
        stop.set()
        th.join()
        body = r.json()
        done = c.wait_done(ids)
        failed = [d for d in done.values() if d["status"] != "succeeded"]
        used: dict[str, int] = {}
        for d in done.values():
            m = (d.get("metadata") or {}).get("model", "?")
            used[m] = used.get(m, 0) + 1
        per = ", ".join(f"{w['name']} {w.get('swap_s')} s (load {w.get('load_s')} s, waited {w.get('swap_wait_s')} s)"
                        for w in body.get("workers", []))
        print(f"   -> {target}: HTTP {r.status_code} in {wall:.2f} s; per worker: {per}")
        print(f"      {len(ids)} jobs submitted around the switch: {len(failed)} failed, "
              f"{len(ids) - len(done)} not finished; ran on {used}")
        all_ids += ids
    c.stop_workers()
    c.worker_env = {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=24)
    ap.add_argument("--step", type=float, default=0.1)
    ap.add_argument("--chaos-jobs", type=int, default=100)
    ap.add_argument("--kill-every", type=float, default=10.0)
    ap.add_argument("--chaos-step", type=float, default=0.3, help="step time in the chaos run (long enough for kills)")
    ap.add_argument("--pollers", type=int, default=50)
    ap.add_argument("--poll-seconds", type=float, default=10.0)
    ap.add_argument("--poll-interval", type=float, default=0.25,
                    help="seconds between one poller's requests, as bench_service (the /test page polls every 0.3-0.5 s)")
    ap.add_argument("--only", choices=("throughput", "chaos", "status", "swap"), default=None)
    ap.add_argument("--swap-engine", choices=("fake", "tiny"), default="fake",
                    help="the swap run on the registry double (default) or on the real tiny engines")
    ap.add_argument("--swap-rounds", type=int, default=4)
    ap.add_argument("--swap-load", type=float, default=1.0, help="load time of the registry double (s)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    c = Cluster(tmp, a.step, a.swap_engine if a.only == "swap" else "fake")
    try:
        if a.only in (None, "throughput"):
            throughput(c, a.jobs)
        if a.only in (None, "chaos"):
            chaos(c, a.chaos_jobs, a.kill_every, a.chaos_step)
        if a.only in (None, "status"):
            status_latency(c, a.pollers, a.poll_seconds, a.poll_interval)
        if a.only in (None, "swap"):
            swap(c, a.swap_rounds, a.swap_load)
    finally:
        c.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
