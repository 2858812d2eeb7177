"""Cluster mode on an S3 bucket with no shared directory: two API nodes (Flask test clients) and two GPU
workers (subprocesses on the doubles), every process with its own TWIN_DATA_DIR, sharing only Redis and
the bucket (moto's standalone server on loopback, or TWIN_TEST_S3_URL; tests/fixtures/s3.py)."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from tests.fixtures.service import wait_until
from tests.helpers.cluster import generate, settings_env, upload_session as upload, wait_status
from tests.helpers.http import TOKEN_HEADER

pytestmark = pytest.mark.timeout(180)


def session_files(data_dir, sid: str) -> list[str]:
    """Files of a session on a node's disk other than its bounded cache of the bucket."""
    if not data_dir.exists():
        return []
    return [str(p) for p in data_dir.rglob("*") if p.is_file() and sid in str(p) and "storage-cache" not in p.parts]


def test_upload_generate_download_with_two_workers_and_no_shared_directory(api_nodes, workers, redis_server, s3,
                                                                          tmp_path):
    settings, (a, b) = api_nodes(own_data_dirs=True, **s3.storage_settings())
    for i in range(2):
        worker_settings = settings.replace(data_dir=tmp_path / f"worker-{i}")
        workers.start(worker_settings, name=f"w{i}", step_seconds=0.15, **s3.env())
    workers.wait_registered(redis_server.client(), ["w0", "w1"])
    sid, tok = upload(a)
    jobs = [generate(b, tok, session_id=sid, num_images=2, quality_mode="high_fidelity") for _ in range(2)]
    done = [wait_status(a, tok, j["id"], {"succeeded", "failed", "canceled"}, 60) for j in jobs]
    assert [d["status"] for d in done] == ["succeeded", "succeeded"], done
    # Both workers ran one: each read the session from the bucket into its own cache.
    for i in range(2):
        assert (tmp_path / f"worker-{i}" / "storage-cache" / sid).is_dir(), workers.log(workers.procs[i])
    for d in done:
        for node in (a, b):
            r = node.get(d["outputs"][1]["url"], headers={TOKEN_HEADER: tok})
            assert r.status_code == 200 and Image.open(io.BytesIO(r.data)).size == (64, 64)
    keys = s3.keys(sid + "/")
    assert all(f"{sid}/outputs/{d['id']}/avatar_002.thumb.jpg" in "\n".join(keys) for d in done)
    # The identity a worker built is in the bucket for the other one (API nodes build none).
    assert any("/identity-" in k for k in keys)
    # No node keeps the session outside its cache: nothing is shared but Redis and the bucket.
    for d in [tmp_path / "data-0", tmp_path / "data-1", tmp_path / "worker-0", tmp_path / "worker-1"]:
        assert session_files(d, sid) == []
    # Deleted on node b: every object goes, and each worker drops its cached copies at its next sweep or job.
    assert b.delete(f"/sessions/{sid}", headers={TOKEN_HEADER: tok}).status_code == 200
    assert s3.keys(sid + "/") == [] and s3.versions(sid + "/") == []
    sid2, tok2 = upload(a, tok)
    nxt = [generate(a, tok2, session_id=sid2) for _ in range(4)]
    assert all(wait_status(b, tok2, j["id"], {"succeeded", "failed"}, 60)["status"] == "succeeded" for j in nxt)
    wait_until(lambda: not any((tmp_path / f"worker-{i}" / "storage-cache" / sid).exists() for i in range(2)), 30, 0.2)


def test_worker_with_refused_credentials_exits_with_one_line(workers, redis_server, s3, s3_proxy, tmp_path):
    from tests.helpers.cluster import cluster_settings
    s3_proxy.refuse_key(s3.access_key)
    settings = cluster_settings(tmp_path, redis_server.url, **s3.storage_settings(s3_proxy.url))
    p = workers.start_env({**settings_env(settings), **s3.env()}, name="bad")
    assert p.wait(60) == 2
    log = workers.log(p).strip().splitlines()
    assert log[-1].startswith("[worker] TWIN_STORAGE_URL=s3://") and "refused the credentials" in log[-1]
