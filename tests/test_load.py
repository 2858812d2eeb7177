"""Load run against the real server (gunicorn, real tiny-profile engines, loopback only): one upload,
20 queued jobs, 50 concurrent pollers on /status until every job is terminal. Asserts 0 jobs lost and
0 5xx; reports the figures (jobs, requests, /status latency p50/p99 while jobs run, wall time) in the
"measured by the test suite" summary. Bounded: the load phase stops by itself after LOAD_LIMIT_S.

Pollers run in separate processes (10 threads each), so the test's own GIL does not inflate the
latencies it measures; each poller asks every POLL_INTERVAL_S, like a browser page would.
"""
from __future__ import annotations

import multiprocessing as mp
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.helpers.http import upload_to_server
from tests.photos import selfie_set

pytestmark = pytest.mark.slow

JOBS = 20
POLLERS = 50
POLLER_PROCS = 5
POLL_INTERVAL_S = 0.25
LOAD_LIMIT_S = 60.0
TERMINAL = ("succeeded", "failed", "canceled")


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def _poller_process(url: str, job_ids: list[str], cookies: dict, threads: int, offset: int, stop, until: float,
                    results) -> None:
    """``threads`` pollers, each cycling through the job ids, until ``stop`` is set or ``until``."""
    lats: list[float] = []
    codes: dict[int, int] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def poller(k: int) -> None:
        s = requests.Session()
        s.cookies.update(cookies)
        mine, my_codes, my_errors = [], {}, []
        i = offset + k
        while not stop.is_set() and time.time() < until:
            job_id = job_ids[i % len(job_ids)]
            i += 1
            t = time.perf_counter()
            try:
                r = s.get(f"{url}/status/{job_id}", timeout=10)
                mine.append(time.perf_counter() - t)
                my_codes[r.status_code] = my_codes.get(r.status_code, 0) + 1
            except requests.RequestException as e:  # a refused or reset connection counts against the server
                my_errors.append(type(e).__name__)
            time.sleep(POLL_INTERVAL_S)
        with lock:
            lats.extend(mine)
            errors.extend(my_errors)
            for c, n in my_codes.items():
                codes[c] = codes.get(c, 0) + n

    ths = [threading.Thread(target=poller, args=(k,)) for k in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    results.put((lats, codes, errors))


def _handler_ms(log_text: str, prefix: str) -> list[float]:
    import json
    out = []
    for line in log_text.splitlines():
        if line.startswith("{") and prefix in line:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if str(rec.get("path", "")).startswith(prefix) and "ms" in rec:
                out.append(float(rec["ms"]))
    return out


def test_load_20_jobs_50_pollers(tiny_models, start_server, tmp_path, report_metric):
    from tests.fixtures.service import server_env
    env = server_env(tmp_path / "data", Path(getattr(tiny_models, "path", tiny_models)),
                     TWIN_WARMUP="0", OMP_NUM_THREADS="1")
    server = start_server(env)
    s = requests.Session()
    upload_to_server(s, server.url, selfie_set(3))
    payload = {"prompt": "portrait photo", "num_images": 1, "quality_mode": "fast", "width": 64, "height": 64}

    t0 = time.perf_counter()
    until = time.time() + LOAD_LIMIT_S
    submit_codes: dict[int, int] = {}
    ids: list[str] = []
    for i in range(JOBS):
        r = s.post(server.url + "/generate", json={**payload, "seed": i}, timeout=30)
        submit_codes[r.status_code] = submit_codes.get(r.status_code, 0) + 1
        if r.status_code == 202:
            ids.append(r.json()["id"])
    assert len(ids) == JOBS, submit_codes

    ctx = mp.get_context("spawn")
    stop, results = ctx.Event(), ctx.Queue()
    per = POLLERS // POLLER_PROCS
    procs = [ctx.Process(target=_poller_process, args=(server.url, ids, s.cookies.get_dict(), per, k * per, stop,
                                                       until, results), daemon=True)
             for k in range(POLLER_PROCS)]
    for p in procs:
        p.start()
    # The test's own view of progress, from the database through the API, at a slow pace.
    final: dict[str, dict] = {}
    max_running = 0
    while time.time() < until and len(final) < JOBS:
        counts = s.get(server.url + "/system-status", timeout=10).json()["jobs"]
        max_running = max(max_running, counts["running"])
        for j in ids:
            if j not in final:
                st = s.get(f"{server.url}/status/{j}", timeout=10).json()
                if st["status"] in TERMINAL:
                    final[j] = st
        time.sleep(0.5)
    wall = time.perf_counter() - t0
    stop.set()
    lats: list[float] = []
    codes: dict[int, int] = {}
    errors: list[str] = []
    for _ in procs:
        la, co, er = results.get(timeout=60)
        lats += la
        errors += er
        for c, n in co.items():
            codes[c] = codes.get(c, 0) + n
    for p in procs:
        p.join(10)

    # Lost: accepted (202) but not terminal by the end, or unknown to the server.
    after = {j: s.get(f"{server.url}/status/{j}", timeout=10) for j in ids}
    lost = [j for j, r in after.items() if r.status_code != 200 or r.json()["status"] not in TERMINAL]
    succeeded = sum(1 for r in after.values() if r.status_code == 200 and r.json()["status"] == "succeeded")
    five_xx = sum(n for c, n in {**codes}.items() if c >= 500) + sum(n for c, n in submit_codes.items() if c >= 500)
    ms = [x * 1000 for x in lats]
    gen_s = [((r.json().get("metadata") or {}).get("service_timings") or {}).get("generate_s") for r in after.values()]
    gen_s = [g for g in gen_s if g is not None]

    report_metric("load: jobs submitted / succeeded / lost", f"{len(ids)} / {succeeded} / {len(lost)}")
    report_metric("load: 5xx responses / connection errors", f"{five_xx} / {len(errors)}")
    report_metric("load: /status requests by 50 pollers", len(ms))
    report_metric("load: /status latency p50 / p99 / max (ms, client side, while jobs ran)",
                  f"{pct(ms, 50):.1f} / {pct(ms, 99):.1f} / {max(ms):.1f}" if ms else "n/a")
    handler_ms = _handler_ms(server.log_tail(50_000_000), "/status/")
    if handler_ms:
        report_metric("load: /status handler time p50 / p99 (ms, server side, from its JSON log)",
                      f"{pct(handler_ms, 50):.2f} / {pct(handler_ms, 99):.2f}")
    import os
    report_metric("load: machine", f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the end")
    report_metric("load: wall seconds (submit -> all terminal) / generate() median s",
                  f"{wall:.1f} / {sorted(gen_s)[len(gen_s) // 2]:.2f}" if gen_s else f"{wall:.1f}")

    assert lost == [], f"{len(lost)} jobs lost; server log:\n{server.log_tail()}"
    assert five_xx == 0 and errors == [], (codes, submit_codes, errors[:5])
    assert succeeded == JOBS
    assert max_running >= 1 and len(ms) >= POLLERS  # the pollers really ran while jobs were running
    assert wall <= LOAD_LIMIT_S
