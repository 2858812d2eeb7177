"""Every endpoint through the Flask test client, on fakes that obey the engine contracts."""
from __future__ import annotations

import io
import json
import time

import pytest
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st

from tests.fakes import FakeFaceService, FakeGenerator, image_bytes
from tests.helpers.http import assert_error, files_field, finished, upload
from tests.helpers.wait import wait_until
from utils import errors


# --- health, system status, test page -----------------------------------------------------------

def test_health_ready(client):
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json["status"] == "ok" and r.json["state"] == "ready"


@pytest.mark.parametrize("api_keys,auth", [("", "client_token"), ("key-alice-0123456789", "api_key")])
def test_health_says_which_credential_and_never_the_key(make_app, service_settings, api_keys, auth):
    body = make_app(service_settings.replace(api_keys=api_keys)).test_client().get("/health").json
    assert body["auth"] == auth
    assert "key-alice" not in json.dumps(body)


def test_health_starting_then_ready(make_app):
    a = make_app(generator=FakeGenerator(setup_seconds=0.5), wait=False)
    c = a.test_client()
    first = c.get("/health")
    assert first.status_code == 200 and first.json["state"] == "starting"
    assert_error(c.post("/upload", data=files_field(image_bytes()), content_type="multipart/form-data"),
                 503, "not_ready")
    assert c.post("/generate", json={"prompt": "x"}).headers.get("Retry-After")
    wait_until(lambda: c.get("/health").json["state"] == "ready", 10)


def test_health_setup_failed(make_app):
    a = make_app(generator=FakeGenerator(setup_error=errors.ModelWeightsMissing("weights not found in /models")))
    c = a.test_client()
    r = c.get("/health")
    assert r.status_code == 200
    assert r.json["state"] == "setup_failed" and "weights not found" in r.json["error"]
    e = assert_error(c.post("/generate", json={"prompt": "x"}), 503, "not_ready", "weights not found")
    assert e


def test_system_status(client):
    upload(client)
    s = client.get("/system-status").json
    assert s["model"]["profile"] == "fake" and s["device"]["type"] == "cpu"
    assert s["queue"]["depth"] == 0 and s["jobs"]["queued"] == 0
    assert s["uptime_seconds"] >= 0 and s["version"]


def test_test_page_and_its_assets(client):
    page = client.get("/test")
    assert page.status_code == 200 and b"upload-form" in page.data
    for asset in ("/static/test.js", "/static/test.css"):
        assert client.get(asset).status_code == 200


# --- upload --------------------------------------------------------------------------------------

def test_upload_success_stores_session(client, app):
    r = upload(client, n=3)
    assert r.status_code == 200
    body = r.json
    assert body["accepted_count"] == 3 and body["rejected_count"] == 0 and body["total"] == 3
    assert len(body["client_token"]) >= 22
    assert "twin_client=" in r.headers["Set-Cookie"] and "HttpOnly" in r.headers["Set-Cookie"]
    d = app.extensions["twin"].storage.session_dir(body["session_id"])
    for rel in ("meta.json", "report.json", "identity.safetensors", "embeddings.safetensors",
                "originals/000.png", "crops/002.png"):
        assert (d / rel).is_file(), rel


def test_upload_single_file_field_and_mixed_report(client):
    r = client.post("/upload", data=files_field(image_bytes(), image_bytes(noisy=False), b"not an image",
                                                names=["a.png", "flat.png", "x.txt"]),
                    content_type="multipart/form-data")
    assert r.status_code == 200
    codes = {f["filename"]: f.get("code") for f in r.json["report"]["files"]}
    assert codes == {"a.png": None, "flat.png": "no_face", "x.txt": "invalid_image"}


@pytest.mark.parametrize("data, content_type, status, code", [
    ({}, "multipart/form-data", 400, "invalid_request"),
    (None, "application/json", 415, "unsupported_media_type"),
    ("files=abc", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
])
def test_upload_bad_requests(client, data, content_type, status, code):
    assert_error(client.post("/upload", data=data, content_type=content_type), status, code)


def test_upload_no_usable_selfie_is_422_and_keeps_nothing(client, app):
    r = client.post("/upload", data=files_field(image_bytes(noisy=False), b"junk"), content_type="multipart/form-data")
    err = assert_error(r, 422, "no_usable_selfies")
    assert len(err["details"]["report"]["files"]) == 2
    root = app.extensions["twin"].storage.root
    assert [p.name for p in root.iterdir() if p.is_dir()] == []


@pytest.mark.parametrize("change, n, size_bytes, message", [
    ({"max_selfies": 2}, 3, 0, "TWIN_MAX_SELFIES=2"),
    ({"max_file_mb": 0.01}, 1, 20_000, "limit per file"),
    ({"max_upload_mb": 0.02}, 2, 15_000, "TWIN_MAX_UPLOAD_MB"),
])
def test_upload_limits_are_413(make_app, service_settings, change, n, size_bytes, message):
    c = make_app(service_settings.replace(**change)).test_client()
    blobs = [image_bytes(size=(96, 96)) + b"\0" * size_bytes for _ in range(n)]
    assert_error(c.post("/upload", data=files_field(*blobs), content_type="multipart/form-data"),
                 413, "payload_too_large", message)


# --- generate / status / download ----------------------------------------------------------------

def test_generate_poll_download(client):
    sid = upload(client).json["session_id"]
    r = client.post("/generate", json={"prompt": "portrait", "num_images": 2, "quality_mode": "fast",
                                       "session_id": sid, "seed": 7, "width": 64, "height": 128})
    assert r.status_code == 202
    assert r.headers["Location"] == r.json["status_url"] == f"/status/{r.json['id']}"
    job = finished(client, r.json["id"])
    assert job["status"] == "succeeded" and job["error"] is None
    assert job["progress"] == {"step": 4, "total": 4, "fraction": 1.0, "eta_seconds": 0.0}
    assert all("identity_similarity" not in o for o in job["outputs"])  # TWIN_SCORE_OUTPUTS is off by default
    assert [(o["filename"], o["seed"], o["width"], o["height"]) for o in job["outputs"]] == [
        ("avatar_001.png", 7, 64, 128), ("avatar_002.png", 8, 64, 128)]
    png = client.get(job["outputs"][1]["url"])
    assert png.status_code == 200 and png.data[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_uses_callers_latest_session(client, app):
    upload(client)
    second = upload(client).json["session_id"]
    r = client.post("/generate", json={"prompt": "p"})
    assert r.status_code == 202 and r.json["session_id"] == second


def test_generate_latest_session_is_per_caller(app):
    a, b = app.test_client(), app.test_client()
    upload(a)
    # b has no token and no session: the seed's "latest session" must not hand it a's session.
    assert_error(b.post("/generate", json={"prompt": "p"}), 400, "no_session")


@pytest.mark.parametrize("payload, status, code, message", [
    ({"prompt": "p", "colour": 1, "zoom": 2}, 400, "invalid_request", "colour, zoom"),
    ({"prompt": "p", "num_images": 5}, 400, "invalid_request", "num_images=5"),
    ({"prompt": ""}, 400, "invalid_request", "prompt"),
    ({"prompt": "p", "quality_mode": "ultra"}, 400, "invalid_request", "ultra"),
    ({"prompt": "p", "session_id": 5}, 400, "invalid_request", "session_id=5"),
    ({"prompt": "p", "session_id": "AAAAAAAAAAAAAAAAAAAAAAAA"}, 404, "not_found", "AAAA"),
    ({"prompt": "p", "session_id": "../../etc"}, 404, "not_found", "session"),
    (["not", "an", "object"], 400, "invalid_request", "JSON object"),
])
def test_generate_rejects_bad_payloads(client, payload, status, code, message):
    upload(client)
    assert_error(client.post("/generate", json=payload), status, code, message)


@pytest.mark.parametrize("body, content_type, status, code", [
    ("{not json", "application/json", 400, "invalid_request"),
    ("prompt=p", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    ("null", "application/json", 400, "invalid_request"),
    ("[" * 100_000, "application/json", 400, "invalid_request"),
    # A lone surrogate parses as JSON but crashes the CLIP tokenizer inside the job: refused at submit.
    (rb'{"prompt": "\ud800 lone surrogate"}', "application/json", 400, "invalid_request"),
    (b"\xff\xfe{", "application/json", 400, "invalid_request"),
])
def test_generate_rejects_bad_bodies(client, body, content_type, status, code):
    upload(client)
    r = client.post("/generate", data=body, content_type=content_type)
    if code is None:
        assert r.status_code == status
    else:
        assert_error(r, status, code)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12)
fields = st.sampled_from(["prompt", "num_images", "quality_mode", "seed", "width", "height", "aspect_ratio",
                          "identity_strength", "style", "session_id", "negative_prompt", "other"])


@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.one_of(json_values, st.dictionaries(fields, json_values, max_size=6)))
def test_generate_never_500s(client, payload):
    client.post("/upload", data=files_field(image_bytes()), content_type="multipart/form-data") \
        if not client.get_cookie("twin_client") else None
    import json
    r = client.post("/generate", data=json.dumps(payload), content_type="application/json")
    assert r.status_code in (202, 400, 404, 429), r.data
    if r.status_code != 202:
        assert set(r.get_json()["error"]) >= {"code", "message"}


def test_generate_queue_full_is_429_with_retry_after(make_app, service_settings):
    gen = FakeGenerator()
    gen.hold = True
    c = make_app(service_settings.replace(queue_max=1), generator=gen).test_client()
    upload(c)
    assert c.post("/generate", json={"prompt": "a"}).status_code == 202   # taken by the worker
    assert gen.started.wait(5)
    assert c.post("/generate", json={"prompt": "b"}).status_code == 202   # waits in the queue
    r = c.post("/generate", json={"prompt": "c"})
    assert_error(r, 429, "queue_full", "TWIN_QUEUE_MAX=1")
    assert int(r.headers["Retry-After"]) > 0
    gen.release.set()


@pytest.mark.parametrize("path", [
    "/status/{other}", "/status/short", "/status/AAAAAAAAAAAAAAAAAAAAAAAA",
])
def test_status_not_found(client, path):
    assert_error(client.get(path.format(other="x" * 30)), 404, "not_found")


def test_queue_position_and_cancel_queued(make_app):
    gen = FakeGenerator()
    gen.hold = True
    c = make_app(generator=gen).test_client()
    upload(c)
    first = c.post("/generate", json={"prompt": "a"}).json["id"]
    assert gen.started.wait(5)
    second = c.post("/generate", json={"prompt": "b"}).json["id"]
    third = c.post("/generate", json={"prompt": "c"}).json["id"]
    assert c.get(f"/status/{first}").json["status"] == "running"
    assert c.get(f"/status/{first}").json["position"] is None
    assert [c.get(f"/status/{j}").json["position"] for j in (second, third)] == [1, 2]
    r = c.post(f"/cancel/{second}")
    assert r.status_code == 200 and r.json["status"] == "canceled" and r.json["error"]["code"] == "canceled"
    assert c.get(f"/status/{third}").json["position"] == 1
    gen.release.set()
    assert finished(c, third)["status"] == "succeeded"
    assert_error(c.post(f"/cancel/{second}"), 409, "conflict", "canceled")


def test_cancel_running_stops_within_a_step(make_app):
    gen = FakeGenerator(step_seconds=0.2)
    c = make_app(generator=gen).test_client()
    upload(c)
    job_id = c.post("/generate", json={"prompt": "a", "quality_mode": "high_fidelity"}).json["id"]
    wait_until(lambda: c.get(f"/status/{job_id}").json["progress"]["step"] >= 1, 5)
    t0 = time.perf_counter()
    r = c.post(f"/cancel/{job_id}")
    assert r.json["status"] == "canceled"
    assert time.perf_counter() - t0 < 0.5  # one step is 0.2 s
    assert r.json["progress"]["step"] < 8 and r.json["outputs"] == []


@pytest.mark.parametrize("exc, code", [
    (errors.InvalidRequest("width=12 is not valid"), "invalid_request"),
    (errors.OutOfMemory("CUDA out of memory"), "out_of_memory"),
    (RuntimeError("secret internal detail"), "internal_error"),
])
def test_failing_job_ends_failed_and_worker_keeps_serving(make_app, exc, code):
    gen = FakeGenerator(raise_on_generate=exc)
    c = make_app(generator=gen).test_client()
    upload(c)
    job = finished(c, c.post("/generate", json={"prompt": "a"}).json["id"])
    assert job["status"] == "failed" and job["error"]["code"] == code
    assert "secret" not in job["error"]["message"]
    gen.raise_on_generate = None
    assert finished(c, c.post("/generate", json={"prompt": "b"}).json["id"])["status"] == "succeeded"


def test_torch_oom_maps_to_out_of_memory(make_app):
    torch = pytest.importorskip("torch")
    c = make_app(generator=FakeGenerator(raise_on_generate=torch.cuda.OutOfMemoryError("CUDA out of memory"))).test_client()
    upload(c)
    assert finished(c, c.post("/generate", json={"prompt": "a"}).json["id"])["error"]["code"] == "out_of_memory"


@pytest.mark.parametrize("filename", [
    "avatar_009.png",          # right pattern, not produced
    "avatar_1.png", "..%2Fmeta.json", "meta.json", "avatar_001.png.tmp", "AVATAR_001.PNG",
])
def test_download_only_recorded_outputs(client, filename):
    upload(client)
    job = finished(client, client.post("/generate", json={"prompt": "a"}).json["id"])
    assert_error(client.get(f"/download/{job['id']}/{filename}"), 404, "not_found")


def test_download_unknown_job(client):
    assert_error(client.get("/download/AAAAAAAAAAAAAAAAAAAAAAAA/avatar_001.png"), 404, "not_found")


# --- ownership -----------------------------------------------------------------------------------

def test_other_caller_gets_404_everywhere(app):
    owner, other = app.test_client(), app.test_client()
    sid = upload(owner).json["session_id"]
    job = finished(owner, owner.post("/generate", json={"prompt": "a"}).json["id"])
    upload(other)  # other has its own token now
    for method, path in [("get", f"/status/{job['id']}"), ("post", f"/cancel/{job['id']}"),
                         ("get", job["outputs"][0]["url"]), ("delete", f"/sessions/{sid}")]:
        assert_error(getattr(other, method)(path), 404, "not_found")
    assert_error(other.post("/generate", json={"prompt": "a", "session_id": sid}), 404, "not_found")
    assert owner.get(f"/status/{job['id']}").status_code == 200


def test_token_header_works_without_cookie(app):
    c = app.test_client()
    token = upload(c).json["client_token"]
    bare = app.test_client(use_cookies=False)
    assert_error(bare.post("/generate", json={"prompt": "a"}), 400, "no_session")
    assert bare.post("/generate", json={"prompt": "a"}, headers={"X-Client-Token": token}).status_code == 202


@pytest.mark.parametrize("headers, status", [
    ({}, 401),
    ({"Authorization": "Bearer wrong"}, 401),
    ({"Authorization": "Basic k1"}, 401),
    ({"Authorization": "Bearer k1"}, 200),
])
def test_api_keys(make_app, service_settings, headers, status):
    c = make_app(service_settings.replace(api_keys="k1,k2")).test_client()
    r = upload(c, headers=headers)
    assert r.status_code == status
    if status == 200:
        assert "client_token" not in r.json
    else:
        assert r.json["error"]["code"] == "unauthorized"


def test_api_key_owner_separation(make_app, service_settings):
    c = make_app(service_settings.replace(api_keys="k1,k2")).test_client()
    k1, k2 = {"Authorization": "Bearer k1"}, {"Authorization": "Bearer k2"}
    upload(c, headers=k1)
    job_id = c.post("/generate", json={"prompt": "a"}, headers=k1).json["id"]
    assert c.get(f"/status/{job_id}", headers=k1).status_code == 200
    assert c.get(f"/status/{job_id}", headers=k2).status_code == 404


def test_non_loopback_without_keys_refuses_to_start(service_settings):
    from app import create_app
    with pytest.raises(errors.ConfigError, match="TWIN_API_KEYS"):
        create_app(service_settings.replace(host="0.0.0.0"), generator=FakeGenerator(), faces=FakeFaceService())


# --- delete --------------------------------------------------------------------------------------

def test_delete_session_removes_everything(client, app):
    sid = upload(client).json["session_id"]
    job = finished(client, client.post("/generate", json={"prompt": "a"}).json["id"])
    d = app.extensions["twin"].storage.session_dir(sid)
    assert (d / "outputs" / job["id"] / "avatar_001.png").is_file()
    r = client.delete(f"/sessions/{sid}")
    assert r.status_code == 200 and r.json == {"deleted": True, "session_id": sid}
    assert not d.exists()
    assert_error(client.get(f"/status/{job['id']}"), 404, "not_found")
    assert_error(client.get(job["outputs"][0]["url"]), 404, "not_found")
    assert_error(client.delete(f"/sessions/{sid}"), 404, "not_found")
    assert_error(client.post("/generate", json={"prompt": "a"}), 400, "no_session")


def test_delete_session_cancels_its_running_job(make_app):
    gen = FakeGenerator(step_seconds=0.1)
    c = make_app(generator=gen).test_client()
    sid = upload(c).json["session_id"]
    c.post("/generate", json={"prompt": "a", "quality_mode": "high_fidelity"})
    assert gen.started.wait(5)
    assert c.delete(f"/sessions/{sid}").status_code == 200
    time.sleep(0.3)
    assert not any(p.is_dir() for p in c.application.extensions["twin"].storage.root.iterdir())


# --- generic errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, status, code", [
    ("get", "/nope", 404, "not_found"),
    ("post", "/health", 405, "method_not_allowed"),
    ("get", "/generate", 405, "method_not_allowed"),
    ("put", "/sessions/x", 405, "method_not_allowed"),
])
def test_http_errors_are_json(client, method, path, status, code):
    assert_error(getattr(client, method)(path), status, code)


def test_unexpected_exception_is_500_without_leak(make_app):
    class Broken(FakeFaceService):
        def validate_selfies(self, files):
            raise RuntimeError("password=hunter2")
    c = make_app(faces=Broken()).test_client()
    err = assert_error(upload(c), 500, "internal_error")
    assert "hunter2" not in err["message"]


def test_request_id_is_echoed(client):
    assert client.get("/health", headers={"X-Request-Id": "abc-123"}).headers["X-Request-Id"] == "abc-123"


def test_cors_off_by_default_and_on_when_configured(make_app, service_settings, client):
    assert "Access-Control-Allow-Origin" not in client.get("/health", headers={"Origin": "http://a.example"}).headers
    c = make_app(service_settings.replace(cors_origins="http://a.example")).test_client()
    r = c.get("/health", headers={"Origin": "http://a.example"})
    assert r.headers["Access-Control-Allow-Origin"] == "http://a.example"


# --- logging and retention -----------------------------------------------------------------------

def test_logs_are_json_lines_with_ids_and_no_secrets(client):
    import json
    from utils.logging import configure_logging
    buf = io.StringIO()
    configure_logging("INFO", stream=buf)  # replaces the stdout handler for this test
    r = upload(client)
    token = r.json["client_token"]
    job = finished(client, client.post("/generate", json={"prompt": "a"}).json["id"])
    client.get(job["outputs"][0]["url"])
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    configure_logging("INFO")
    records = [json.loads(ln) for ln in lines]  # every line is JSON
    assert all({"time", "level", "message", "request_id", "session_id", "job_id"} <= set(rec) for rec in records)
    assert any(rec["message"] == "job succeeded" and rec["job_id"] == job["id"] and rec["session_id"] for rec in records)
    assert any(rec["message"] == "request" and rec["request_id"] and rec["path"] == "/upload" for rec in records)
    text = "\n".join(lines)
    assert token not in text and "PNG" not in text and "embedding" not in text.lower()


def test_retention_sweep_deletes_old_sessions(app, client):
    rt = app.extensions["twin"]
    rt.sessions.settings = rt.settings.replace(retention_hours=1.0)
    sid = upload(client).json["session_id"]
    assert rt.sessions.sweep(now=time.time()) == []
    assert rt.sessions.sweep(now=time.time() + 2 * 3600) == [sid]
    assert not rt.storage.session_dir(sid).exists()
    assert_error(client.post("/generate", json={"prompt": "a"}), 400, "no_session")


def test_score_outputs_records_similarity(make_app, service_settings):
    c = make_app(service_settings.replace(score_outputs=True)).test_client()
    upload(c)
    job = finished(c, c.post("/generate", json={"prompt": "a", "num_images": 2}).json["id"])
    assert [o["identity_similarity"] for o in job["outputs"]] == [0.5, 0.5]


def test_system_status_publishes_the_loaded_models_choices(tiny_settings, tmp_path):
    """The /test page builds its form from these: they must be the real engine's choices and limits."""
    from app import create_app
    from generate_twin import ASPECT_RATIOS, QUALITY_MODES, MAX_IMAGES, preset_size, style_library
    settings = tiny_settings.replace(data_dir=tmp_path / "data")
    app = create_app(settings)
    runtime = app.extensions["twin"]
    try:
        assert runtime.wait_ready(120), runtime.setup_error
        body = app.test_client().get("/system-status").get_json()
        assert body["limits"]["max_images"] == MAX_IMAGES
        assert body["limits"]["max_selfies"] == settings.max_selfies
        opts = body["options"]
        assert opts["quality_modes"] == list(QUALITY_MODES)
        assert opts["styles"] == list(style_library(settings))
        native = runtime.engines[0].info()["native_resolution"]
        assert opts["aspect_ratios"] == {ar: list(preset_size(ar, native, settings)) for ar in ASPECT_RATIOS}
    finally:
        runtime.shutdown()
