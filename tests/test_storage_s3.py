"""The service on an S3 bucket (TWIN_STORAGE_URL), local mode, over HTTP (Flask test clients on the doubles),
against a real S3-protocol server on loopback (tests/fixtures/s3.py: moto's standalone server, and
TWIN_TEST_S3_URL when set) with a fault proxy in front of it where a test needs the bucket to fail.
Cluster mode on a bucket: tests/test_cluster_s3.py."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import pytest
import requests
from PIL import Image

from tests.fakes import FakeGenerator
from tests.fixtures.service import REPO, wait_until
from tests.helpers.cluster import generate, upload_session as upload, wait_status
from tests.helpers.http import TOKEN_HEADER
from utils import errors

pytestmark = pytest.mark.timeout(180)
DONE = {"succeeded", "failed", "canceled"}


def session_files_on_disk(data_dir) -> list[str]:
    """Files under the data folder other than the job database and the bucket's cache."""
    return sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*")
                  if p.is_file() and not p.name.startswith("jobs.db") and "storage-cache" not in p.parts)


# --- the seed flow ------------------------------------------------------------------------------------------

def test_upload_generate_download_keeps_everything_in_the_bucket(s3, make_app, tmp_path):
    settings = s3.settings(tmp_path)
    c = make_app(settings).test_client()
    sid, tok = upload(c)
    job = wait_status(c, tok, generate(c, tok, num_images=2)["id"], DONE)
    assert job["status"] == "succeeded", job
    names = {k.split("/", 2)[2] for k in s3.keys(sid + "/")}
    assert {"meta.json", "report.json", "embeddings.safetensors", "identity.safetensors", "crops/000.png",
            "originals/000.png"} <= names
    assert {f"outputs/{job['id']}/avatar_00{i}{ext}" for i in (1, 2) for ext in (".png", ".thumb.jpg")} <= names
    for o in job["outputs"]:
        for url, fmt in ((o["url"], "PNG"), (o["thumbnail_url"], "JPEG")):
            r = c.get(url, headers={TOKEN_HEADER: tok})
            assert r.status_code == 200 and Image.open(io.BytesIO(r.data)).format == fmt
            assert r.headers["Content-Length"] == str(len(r.data))
            assert r.headers["Content-Disposition"] == f"attachment; filename={url.rsplit('/', 1)[1]}"
    # Nothing of the session on this node's disk but the bounded cache; the job database stays local.
    assert session_files_on_disk(settings.data_dir) == []
    assert (settings.data_dir / "jobs.db").is_file()
    # Another caller gets nothing.
    assert c.get(job["outputs"][0]["url"], headers={TOKEN_HEADER: "x" * 32}).status_code == 404


@pytest.mark.parametrize("inline", [False, True])
def test_download_redirect_is_a_presigned_url_with_the_same_headers(s3, make_app, tmp_path, inline):
    streamed = make_app(s3.settings(tmp_path)).test_client()
    redirecting = make_app(s3.settings(tmp_path, download_redirect=True, presign_seconds=120)).test_client()
    sid, tok = upload(streamed)
    job = wait_status(streamed, tok, generate(streamed, tok)["id"], DONE)
    url = job["outputs"][0]["url"] + ("?inline=1" if inline else "")
    direct = streamed.get(url, headers={TOKEN_HEADER: tok})
    r = redirecting.get(url, headers={TOKEN_HEADER: tok})
    assert r.status_code == 302 and "no-store" in r.headers["Cache-Control"]
    location = r.headers["Location"]
    assert location.startswith(s3.url) and "X-Amz-Expires=120" in location
    got = requests.get(location, timeout=10)
    assert got.status_code == 200 and got.content == direct.data
    assert got.headers["Content-Disposition"] == direct.headers["Content-Disposition"]
    assert got.headers["Content-Type"] == "image/png"
    # The owner check comes first: another caller gets a 404, never a URL.
    other = redirecting.get(url, headers={TOKEN_HEADER: "y" * 32})
    assert other.status_code == 404 and "Location" not in other.headers


# --- deletion -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("versioned, extra_objects", [(False, 1100), (True, 0), (True, 1050)])
def test_delete_session_removes_every_object_and_version(s3, make_app, tmp_path, versioned, extra_objects):
    from concurrent.futures import ThreadPoolExecutor
    bucket = s3.client()
    if versioned:
        bucket.put_bucket_versioning(Bucket=s3.bucket, VersioningConfiguration={"Status": "Enabled"})
    settings = s3.settings(tmp_path)
    app = make_app(settings)
    c = app.test_client()
    sid, tok = upload(c)
    job = wait_status(c, tok, generate(c, tok, num_images=2)["id"], DONE)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: bucket.put_object(Bucket=s3.bucket, Key=f"{s3.prefix}/{sid}/outputs/{job['id']}/x{i:04d}",
                                                  Body=b"x"), range(extra_objects)))
    if versioned:   # a second version of one object and a delete marker of another
        bucket.put_object(Bucket=s3.bucket, Key=f"{s3.prefix}/{sid}/report.json", Body=b"{}")
        bucket.delete_object(Bucket=s3.bucket, Key=f"{s3.prefix}/{sid}/originals/001.png")
    assert len(s3.versions(sid + "/")) >= extra_objects + 10
    assert (settings.data_dir / "storage-cache" / sid).is_dir()     # the job read through the cache
    r = c.delete(f"/sessions/{sid}", headers={TOKEN_HEADER: tok})
    assert r.status_code == 200, r.json
    assert s3.keys(sid + "/") == [] and s3.versions(sid + "/") == []
    assert not (settings.data_dir / "storage-cache" / sid).exists()
    assert c.get(job["outputs"][0]["url"], headers={TOKEN_HEADER: tok}).status_code == 404


def test_retention_sweep_deletes_old_sessions_and_orphan_prefixes_in_the_bucket(s3, make_app, tmp_path):
    import json
    app = make_app(s3.settings(tmp_path))
    c = app.test_client()
    sid, _ = upload(c)
    orphan = "o" * 24       # objects whose record was never written (an upload cut off)
    s3.client().put_object(Bucket=s3.bucket, Key=f"{s3.prefix}/{orphan}/meta.json",
                           Body=json.dumps({"created_at": 5.0}).encode())
    rt = app.extensions["twin"]
    swept = rt.sessions.sweep(now=time.time() + 10 * 24 * 3600)
    assert set(swept) == {sid, orphan}
    assert s3.keys() == []


# --- faults -------------------------------------------------------------------------------------------------

def test_bucket_down_at_upload_and_submit_is_a_503_with_retry_after(s3, s3_proxy, make_app, tmp_path):
    c = make_app(s3.settings(tmp_path, url=s3_proxy.url)).test_client()
    sid, tok = upload(c)
    s3_proxy.down()
    from tests.fakes import image_bytes
    r = c.post("/upload", data={"files": [(io.BytesIO(image_bytes()), "a.png")]}, content_type="multipart/form-data",
               headers={TOKEN_HEADER: tok})
    assert r.status_code == 503 and r.json["error"]["code"] == "storage_unavailable" and r.headers["Retry-After"]
    r = c.post("/generate", json={"prompt": "p", "session_id": sid}, headers={TOKEN_HEADER: tok})
    assert r.status_code == 503 and r.json["error"]["code"] == "storage_unavailable" and r.headers["Retry-After"]
    health = c.get("/health").json
    assert health["storage"] == {"backend": "s3", "reachable": False} and health["state"] == "storage_unavailable"
    r = c.delete(f"/sessions/{sid}", headers={TOKEN_HEADER: tok})
    assert r.status_code == 503 and r.json["error"]["code"] == "storage_unavailable"
    s3_proxy.up()
    assert c.get("/health").json["storage"]["reachable"] is True
    # The records stayed with the objects, so the same DELETE now works.
    assert c.delete(f"/sessions/{sid}", headers={TOKEN_HEADER: tok}).status_code == 200
    assert s3.keys(sid + "/") == []


def test_bucket_down_mid_job_fails_it_with_that_reason_and_serves_nothing(s3, s3_proxy, make_app, tmp_path):
    c = make_app(s3.settings(tmp_path, url=s3_proxy.url), generator=FakeGenerator(step_seconds=0.25)).test_client()
    sid, tok = upload(c)
    job = generate(c, tok, quality_mode="high_fidelity", num_images=2)      # 8 steps of 0.25 s
    wait_until(lambda: c.get(f"/status/{job['id']}", headers={TOKEN_HEADER: tok}).json["progress"]["step"] >= 2, 20)
    s3_proxy.down()
    done = wait_status(c, tok, job["id"], DONE, 30)
    assert done["status"] == "failed" and done["error"]["code"] == "storage_unavailable", done
    assert done["outputs"] == []
    s3_proxy.up()
    assert [k for k in s3.keys(sid + "/") if "/outputs/" in k] == []
    for name in ("avatar_001.png", "avatar_001.thumb.jpg"):
        assert c.get(f"/download/{job['id']}/{name}", headers={TOKEN_HEADER: tok}).status_code == 404


@pytest.mark.parametrize("throttled, methods, want", [
    (1, {"PUT"}, 200),          # one 503 SlowDown: retried by botocore, the upload succeeds
    (10_000, {"PUT"}, 503),     # throttled past the attempts: storage_unavailable, nothing left behind
])
def test_throttling_is_retried_then_reported(s3, s3_proxy, make_app, tmp_path, throttled, methods, want):
    c = make_app(s3.settings(tmp_path, url=s3_proxy.url, s3_max_attempts=3)).test_client()
    from tests.fakes import image_bytes
    s3_proxy.throttle(throttled, methods)
    r = c.post("/upload", data={"files": [(io.BytesIO(image_bytes((10 * i, 90, 40))), f"s{i}.png") for i in range(3)]},
               content_type="multipart/form-data")
    assert r.status_code == want, r.json
    assert s3_proxy.slowdowns() >= 1
    if want == 200:
        assert len(s3.keys(r.json["session_id"] + "/")) >= 9
    else:
        assert r.json["error"]["code"] == "storage_unavailable" and "SlowDown" in r.json["error"]["message"]
        assert r.headers["Retry-After"]
        s3_proxy.throttle(0)
        assert s3.keys() == []


# --- start-up, preflight, status ------------------------------------------------------------------------------

def test_wrong_credentials_stop_start_up_with_one_line_naming_the_setting(s3, s3_proxy, tmp_path):
    from app import create_app
    from tests.fakes import FakeFaceService
    s3_proxy.refuse_key(s3.access_key)
    with pytest.raises(errors.ConfigError) as e:
        create_app(s3.settings(tmp_path, url=s3_proxy.url), generator=FakeGenerator(), faces=FakeFaceService())
    msg = e.value.message
    assert "\n" not in msg and msg.startswith("TWIN_STORAGE_URL=s3://")
    assert "refused the credentials (403)" in msg and "AWS_ACCESS_KEY_ID" in msg


def test_a_missing_bucket_stops_start_up(s3, tmp_path):
    from utils.service import wiring
    with pytest.raises(errors.ConfigError, match="TWIN_STORAGE_URL=s3://no-such-bucket-here/twin: bucket"):
        wiring.build_storage(s3.settings(tmp_path, storage_url="s3://no-such-bucket-here/twin"))


def run_check_storage(env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TWIN_")}
    return subprocess.run([sys.executable, "-m", "flask", "--app", "app", "check-storage"], cwd=REPO,
                          env={**base, **env}, capture_output=True, text=True, timeout=120)


def s3_env(s3, tmp_path, url: str) -> dict[str, str]:
    return {**s3.env(), "TWIN_DATA_DIR": str(tmp_path / "cli"), "TWIN_STORAGE_URL": f"s3://{s3.bucket}/{s3.prefix}",
            "TWIN_S3_ENDPOINT_URL": url, "TWIN_S3_ADDRESSING_STYLE": "path", "TWIN_S3_MAX_ATTEMPTS": "1"}


@pytest.mark.parametrize("fault, rc, says", [
    (None, 0, ["reach: ok", "write: ok", "read: ok", "delete: ok", "gone: ok", "s3 storage at s3://"]),
    ("down", 1, ["FAILED"]),
    ("refuse", 1, ["FAILED: TWIN_STORAGE_URL=", "refused the credentials"]),
    ("throttle", 1, ["reach: ok", "write: FAILED", "SlowDown"]),
])
def test_check_storage_command(s3, s3_proxy, tmp_path, fault, rc, says):
    if fault == "refuse":
        s3_proxy.refuse_key(s3.access_key)
    elif fault == "throttle":
        s3_proxy.throttle(100, {"PUT"})
    elif fault == "down":
        # Start-up survives an unreachable bucket (it may come back); the preflight says what failed.
        s3_proxy.down()
    p = run_check_storage(s3_env(s3, tmp_path, s3_proxy.url))
    assert p.returncode == rc, p.stdout + p.stderr
    for s in says:
        assert s in p.stdout, p.stdout
    s3_proxy.throttle(0)
    assert [k for k in s3.keys("") if "/.probe/" in k or k.startswith(".probe")] == []


def test_check_storage_on_the_data_folder(tmp_path):
    p = run_check_storage({"TWIN_DATA_DIR": str(tmp_path / "d")})
    assert p.returncode == 0 and "local storage at" in p.stdout and p.stdout.count(": ok") == 4, p.stdout


def test_health_and_system_status_name_the_storage(s3, make_app, tmp_path, client):
    local = client.get("/health").json["storage"]
    assert local == {"backend": "local", "reachable": True}
    c = make_app(s3.settings(tmp_path)).test_client()
    assert c.get("/health").json["storage"] == {"backend": "s3", "reachable": True}
    st = c.get("/system-status").json["storage"]
    assert st["backend"] == "s3" and st["bucket"] == s3.bucket and st["prefix"] == s3.prefix and st["reachable"]
    assert st["download_redirect"] is False and st["cache"]["max_bytes"] == 512 * 1048576


def test_download_redirect_needs_a_bucket():
    from utils.config import Settings
    with pytest.raises(errors.ConfigError, match="TWIN_DOWNLOAD_REDIRECT=1 needs an S3 bucket"):
        Settings(download_redirect=True)


@pytest.mark.parametrize("script", ["start_app.sh", "start_worker.sh"])
def test_start_scripts_run_the_storage_preflight_with_a_bucket(s3, s3_proxy, tmp_path, script):
    s3_proxy.refuse_key(s3.access_key)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWIN_")}
    env.update(s3_env(s3, tmp_path, s3_proxy.url), VENV=sys.prefix, SKIP_VENV_SETUP="1", SKIP_VERIFY="1",
               TWIN_QUEUE_URL="redis://127.0.0.1:1/0")   # never reached: the preflight stops first
    p = subprocess.run(["bash", str(REPO / script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "[check-storage] FAILED: TWIN_STORAGE_URL=" in p.stdout and "storage preflight failed" in p.stderr
