"""InstantID end to end on the tiny profile through the API and the CLI: real FaceAnalysis on the tiny
stand-in antelopev2 pack (which the tiny builder writes), real tiny engine in-process, pose fields."""
from __future__ import annotations

import json

import pytest

from tests import photos
from tests.helpers.http import upload
from tests.helpers.wait import wait_until
from utils.config import Settings


@pytest.fixture(scope="module")
def iid_app(tiny_models, tmp_path_factory):
    from app import create_app
    # No InsightFace pack configured or present: the tiny profile uses the tiny stand-in pack.
    s = Settings(data_dir=tmp_path_factory.mktemp("iid-data"), model_dir=tmp_path_factory.mktemp("no-models"),
                 tiny_model_dir=tiny_models, model_profile="tiny", ip_adapter_variant="instantid",
                 generator_process=False, warmup=False, max_steps=2, retention_hours=0, min_face_px=20,
                 rate_limit_upload="100000/minute", rate_limit_generate="100000/minute")
    app = create_app(s)
    assert app.extensions["twin"].wait_ready(120), app.extensions["twin"].setup_error
    yield app
    app.extensions["twin"].shutdown()


@pytest.fixture(scope="module")
def client(iid_app):
    return iid_app.test_client()     # one client: sessions belong to their caller (per-client token)


@pytest.fixture(scope="module")
def session(client):
    c = client
    r = upload(c, photos.selfie_set(3))
    assert r.status_code in (200, 201), r.json
    accepted = [f["index"] for f in r.json["report"]["files"] if f["status"] == "accepted"]
    assert r.json["report"]["backend"] == "insightface" and accepted
    return r.json["session_id"], accepted


def test_face_service_runs_on_the_tiny_standin_antelopev2_pack(iid_app):
    faces = iid_app.extensions["twin"].faces
    assert faces.backend_name == "insightface" and faces.model_name == "insightface-antelopev2"


@pytest.mark.parametrize("fields", [
    {}, {"pose": "three_quarter_left", "pose_strength": 1.2}, {"pose": "selfie:FIRST"}, {"pose_strength": 0},
])
def test_instantid_generates_through_the_api(client, session, fields):
    c = client
    sid, accepted = session
    fields = {k: (v.replace("FIRST", str(accepted[0])) if isinstance(v, str) else v) for k, v in fields.items()}
    r = c.post("/generate", json={"prompt": "a portrait", "session_id": sid, "seed": 3, **fields})
    assert r.status_code == 202, r.json
    job = wait_until(lambda: (lambda j: j if j["status"] in ("succeeded", "failed") else None)(
        c.get(f"/status/{r.json['id']}").json), 120)
    assert job["status"] == "succeeded", job


@pytest.mark.parametrize("fields, needle", [
    ({"pose": "selfie:99"}, "pose='selfie:99'"),
    ({"pose": "sideways"}, "pose='sideways'"),
    ({"pose": 5}, "pose=5"),
    ({"pose_strength": 2}, "pose_strength=2"),
])
def test_bad_pose_is_a_400_naming_the_value(client, session, fields, needle):
    r = client.post("/generate", json={"prompt": "p", "session_id": session[0], **fields})
    assert r.status_code == 400 and needle in r.json["error"]["message"], r.json


def test_pose_is_published(iid_app):
    c = iid_app.test_client()
    opts = c.get("/system-status").json["options"]
    assert opts["pose_control"] is True and "three_quarter_left" in opts["poses"]
    assert opts["request_fields"]["pose_strength"]["maximum"] == 1.5
    spec = c.get("/openapi.json").json
    body = json.dumps(spec)
    assert '"pose"' in body and '"pose_strength"' in body


def test_arcface_variant_with_dlib_fails_at_start_up_naming_what_to_install(tiny_models, tmp_path):
    from app import create_app
    s = Settings(data_dir=tmp_path, tiny_model_dir=tiny_models, model_profile="tiny", ip_adapter_variant="instantid",
                 face_backend="dlib", generator_process=False, warmup=False)
    app = create_app(s)
    rt = app.extensions["twin"]
    assert not rt.wait_ready(60)
    assert rt.state == "setup_failed"
    for needle in ("TWIN_IP_ADAPTER_VARIANT=instantid", "dlib", "insightface", "onnxruntime", "antelopev2"):
        assert needle in rt.setup_error
    rt.shutdown()


def test_cli_generates_with_instantid_and_a_pose(tiny_models, tmp_path, monkeypatch):
    from generate_twin import main
    for k, v in {"TWIN_MODEL_PROFILE": "tiny", "TWIN_TINY_MODEL_DIR": str(tiny_models), "TWIN_DATA_DIR": str(tmp_path),
                 "TWIN_IP_ADAPTER_VARIANT": "instantid", "TWIN_WARMUP": "0", "TWIN_MAX_STEPS": "2",
                 "TWIN_MIN_FACE_PX": "20", "TWIN_MODEL_DIR": str(tmp_path / "none")}.items():
        monkeypatch.setenv(k, v)
    selfies = tmp_path / "selfies"
    selfies.mkdir()
    for n, b in photos.selfie_set(2):
        (selfies / n).write_bytes(b)
    rc = main(["--selfies", str(selfies), "--prompt", "a portrait", "--out", str(tmp_path / "out"),
               "--pose", "look_down", "--seed", "1"])
    assert rc == 0
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["result"]["variant"] == "instantid" and meta["result"]["pose"] == "look_down"
