"""Object storage vs the data folder, on the service with the test doubles (tests/fakes.py), so what is
measured is the storage: an upload of 15 phone-sized selfies and a 4-image 1024² job (upload, submit, run,
download of the 4 PNGs), wall time per backend in the same run and their ratio; bytes written per session;
the time DELETE /sessions/<id> takes for a session of 1,000 objects (plain and versioned bucket).

The bucket is moto's standalone server on loopback (as in the tests), optionally behind a proxy that adds
``--latency-ms`` to every request (a bucket further away than loopback), or ``--endpoint`` (e.g. a MinIO:
http://KEY:SECRET@127.0.0.1:9000). Results: printed, and one JSON line in bench/results/.

    .venv/bin/python bench/bench_storage.py [--rounds 3] [--latency-ms 20] [--endpoint URL]
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.fakes import FakeFaceService, FakeGenerator, FakeResult  # noqa: E402
from tests.fixtures.s3 import FaultProxy, S3Endpoint, free_port  # noqa: E402
from tests.photos import astronaut_variant, phone_frame, to_bytes  # noqa: E402

TOKEN = "X-Client-Token"


class PortraitGenerator(FakeGenerator):
    """The doubles' engine, with photo-like 1024² portraits (so the PNGs weigh what real ones do)."""

    def generate(self, req, on_progress=None, should_cancel=None):
        result = super().generate(req, on_progress, should_cancel)
        return FakeResult(images=[astronaut_variant(s % 4, req.width) for s in result.seeds], seeds=result.seeds,
                          metadata=result.metadata)


def selfies() -> list[tuple[str, bytes]]:
    return [(f"selfie_{i:02d}.jpg", to_bytes(phone_frame(astronaut_variant(i), (1600, 1200)), quality=90))
            for i in range(15)]


def seed_flow(client, files) -> tuple[dict, str, str]:
    """Upload, a 4-image job, its 4 downloads. Returns the timings, the session and the token."""
    t0 = time.perf_counter()
    r = client.post("/upload", data={"files": [(io.BytesIO(d), n) for n, d in files]}, content_type="multipart/form-data")
    assert r.status_code == 200, r.json
    sid, tok = r.json["session_id"], r.json["client_token"]
    t1 = time.perf_counter()
    job = client.post("/generate", json={"prompt": "a portrait", "num_images": 4, "width": 1024, "height": 1024},
                      headers={TOKEN: tok}).json
    while job["status"] not in ("succeeded", "failed", "canceled"):
        time.sleep(0.01)
        job = client.get(f"/status/{job['id']}", headers={TOKEN: tok}).json
    assert job["status"] == "succeeded", job
    t2 = time.perf_counter()
    for o in job["outputs"]:
        assert client.get(o["url"], headers={TOKEN: tok}).status_code == 200
    t3 = time.perf_counter()
    return {"upload_s": t1 - t0, "job_s": t2 - t1, "download_s": t3 - t2, "total_s": t3 - t0}, sid, tok


def folder_bytes(data_dir: Path, sid: str) -> tuple[int, int]:
    files = [p for p in (data_dir / sid).rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def bucket_bytes(ep: S3Endpoint, sid: str) -> tuple[int, int]:
    pages = ep.client().get_paginator("list_objects_v2").paginate(Bucket=ep.bucket, Prefix=f"{ep.prefix}/{sid}/")
    sizes = [o["Size"] for p in pages for o in p.get("Contents", [])]
    return sum(sizes), len(sizes)


def make_app(settings, generator):
    from app import create_app
    app = create_app(settings, generator=generator, faces=FakeFaceService())
    app.extensions["twin"].wait_ready(30)
    return app


def fill(kind: str, app, ep: S3Endpoint | None, sid: str, total: int) -> None:
    """Add files to a session until it holds ``total``."""
    if kind == "folder":
        d = app.extensions["twin"].storage.session_dir(sid) / "outputs" / ("j" * 24)
        d.mkdir(parents=True, exist_ok=True)
        have = sum(1 for p in (d.parent.parent).rglob("*") if p.is_file())
        for i in range(total - have):
            (d / f"x{i:04d}").write_bytes(b"x" * 100)
        return
    c = ep.client()
    have = bucket_bytes(ep, sid)[1]
    with ThreadPoolExecutor(8) as pool:    # within botocore's pool of 10 connections
        list(pool.map(lambda i: c.put_object(Bucket=ep.bucket, Key=f"{ep.prefix}/{sid}/outputs/{'j' * 24}/x{i:04d}",
                                             Body=b"x" * 100), range(total - have)))


def timed_delete(kind, app, ep, files, objects: int) -> float:
    c = app.test_client()
    _, sid, tok = seed_flow(c, files)
    fill(kind, app, ep, sid, objects)
    t0 = time.perf_counter()
    assert c.delete(f"/sessions/{sid}", headers={TOKEN: tok}).status_code == 200
    took = time.perf_counter() - t0
    if ep is not None:
        assert bucket_bytes(ep, sid) == (0, 0)
    return took


def endpoint(args) -> tuple[S3Endpoint, object]:
    if args.endpoint:
        from urllib.parse import urlsplit
        u = urlsplit(args.endpoint)
        return S3Endpoint(url=f"{u.scheme}://{u.hostname}:{u.port}", access_key=u.username or "",
                          secret_key=u.password or "", kind="external"), None
    from moto.server import ThreadedMotoServer
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return S3Endpoint(url=f"http://127.0.0.1:{port}", access_key="bench", secret_key="bench"), server


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--latency-ms", type=float, default=0.0, help="added to every bucket request (a proxy)")
    ap.add_argument("--endpoint", default="", help="an S3 endpoint with credentials instead of moto")
    ap.add_argument("--objects", type=int, default=1000)
    args = ap.parse_args()
    import logging
    logging.disable(logging.INFO)
    from utils.config import Settings
    ep, server = endpoint(args)
    for k, v in ep.env().items():
        os.environ[k] = v
    proxy = FaultProxy(ep.url, delay_s=args.latency_ms / 1000).up() if args.latency_ms else None
    tmp = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    files = selfies()
    out: dict = {"date": dt.date.today().isoformat(), "cpu_count": os.cpu_count(), "rounds": args.rounds,
                 "latency_ms": args.latency_ms, "endpoint": "moto (loopback)" if server else ep.url,
                 "upload_bytes": sum(len(d) for _, d in files)}
    try:
        ep.bucket = ep.new_bucket()
        base = dict(retention_hours=0, warmup=False, rate_limit_upload="100000/minute",
                    rate_limit_generate="100000/minute")
        apps = {"folder": make_app(Settings(data_dir=tmp / "folder", **base), PortraitGenerator()),
                "bucket": make_app(Settings(data_dir=tmp / "bucket", **base,
                                            **ep.storage_settings(proxy.url if proxy else None)), PortraitGenerator())}
        runs: dict[str, list[dict]] = {k: [] for k in apps}
        for _ in range(args.rounds):          # interleaved: both backends see the same machine load
            for kind, app in apps.items():
                timing, sid, _ = seed_flow(app.test_client(), files)
                runs[kind].append(timing)
                if kind == "folder":
                    out["folder_session_bytes"], out["folder_session_files"] = folder_bytes(tmp / "folder", sid)
                else:
                    out["bucket_session_bytes"], out["bucket_session_objects"] = bucket_bytes(ep, sid)
                    cache = tmp / "bucket" / "storage-cache"
                    out["bucket_node_cache_bytes"] = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
        for kind, rs in runs.items():
            out[kind] = {k: round(statistics.median(r[k] for r in rs), 4) for k in rs[0]}
        out["ratio_total_bucket_over_folder"] = round(out["bucket"]["total_s"] / out["folder"]["total_s"], 2)
        out["delete_folder_s"] = round(timed_delete("folder", apps["folder"], None, files, args.objects), 3)
        out["delete_bucket_s"] = round(timed_delete("bucket", apps["bucket"], ep, files, args.objects), 3)
        ep.client().put_bucket_versioning(Bucket=ep.bucket, VersioningConfiguration={"Status": "Enabled"})
        out["delete_bucket_versioned_s"] = round(timed_delete("bucket", apps["bucket"], ep, files, args.objects), 3)
        for app in apps.values():
            app.extensions["twin"].shutdown()
    finally:
        ep.empty_and_remove()
        if proxy:
            proxy.down()
        if server:
            server.stop()
    print(json.dumps(out, indent=2))
    results = REPO / "bench" / "results" / f"cpu-{out['date']}-storage.jsonl"
    with results.open("a") as fh:
        fh.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
