"""InfiniteYou end to end on tiny-flux through the API (issue 23): real FaceAnalysis on the tiny stand-in
antelopev2 pack, IR-SE50 on the stored crops, the tiny FLUX engine in-process; pose fields, best-of-N, SSE,
cancel, download, and the start-up refusals."""
from __future__ import annotations

import threading
import time

import pytest

from tests import photos
from tests.helpers.http import upload
from tests.helpers.sse import parse_sse
from tests.helpers.wait import wait_until
from utils.config import Settings


def settings_for(tiny_models, data, **kw):
    base = dict(data_dir=data, model_dir=data / "no-models", tiny_model_dir=tiny_models, model_profile="tiny-flux",
                ip_adapter_variant="infiniteyou", generator_process=False, warmup=False, max_steps=2,
                retention_hours=0, min_face_px=20, rate_limit_upload="100000/minute",
                rate_limit_generate="100000/minute")
    return Settings(**{**base, **kw})


@pytest.fixture(scope="module")
def iy_app(tiny_models, tmp_path_factory):
    from app import create_app
    app = create_app(settings_for(tiny_models, tmp_path_factory.mktemp("iy-data")))
    assert app.extensions["twin"].wait_ready(120), app.extensions["twin"].setup_error
    yield app
    app.extensions["twin"].shutdown()


@pytest.fixture(scope="module")
def client(iy_app):
    return iy_app.test_client()


@pytest.fixture(scope="module")
def session(client):
    r = upload(client, photos.selfie_set(3))
    assert r.status_code in (200, 201), r.json
    accepted = [f["index"] for f in r.json["report"]["files"] if f["status"] == "accepted"]
    assert r.json["report"]["backend"] == "insightface" and len(accepted) >= 2
    return r.json["session_id"], accepted


def generate(c, sid, **fields):
    r = c.post("/generate", json={"prompt": "a portrait", "session_id": sid, "seed": 3, "width": 64, "height": 64,
                                  **fields})
    assert r.status_code == 202, r.json
    return wait_until(lambda: (lambda j: j if j["status"] in ("succeeded", "failed", "canceled") else None)(
        c.get(f"/status/{r.json['id']}").json), 120)


@pytest.mark.parametrize("fields,control", [
    ({}, "black"), ({"pose": "three_quarter_left"}, "keypoints"), ({"pose": "selfie:FIRST", "pose_strength": 0.5},
                                                                   "keypoints"),
    ({"pose": "auto", "pose_strength": 0}, "black"), ({"identity_strength": 0.5, "candidates": 2}, "black"),
])
def test_infiniteyou_generates_through_the_api(client, session, fields, control):
    sid, accepted = session
    fields = {k: (v.replace("FIRST", str(accepted[0])) if isinstance(v, str) else v) for k, v in fields.items()}
    job = generate(client, sid, **fields)
    assert job["status"] == "succeeded", job
    m = job["metadata"]
    assert (m["family"], m["variant"], m["identity"]["variant"]) == ("flux", "infiniteyou", "infiniteyou")
    assert m["identity"]["num_selfies"] == len(accepted) and m["control_image"] == control
    assert m["infiniteyou_stage"] == "aes_stage2"
    for out in job["outputs"]:
        assert client.get(out["url"]).status_code == 200
    events, _ = parse_sse(client.get(f"/events/{job['id']}").get_data(as_text=True))
    assert events[-1]["event"] == "done"


@pytest.mark.parametrize("fields, needle", [
    ({"pose": "selfie:99"}, "pose='selfie:99'"), ({"pose": "sideways"}, "pose='sideways'"),
    ({"pose_strength": 2}, "pose_strength=2"),
])
def test_bad_pose_is_a_400_naming_the_value(client, session, fields, needle):
    r = client.post("/generate", json={"prompt": "p", "session_id": session[0], **fields})
    assert r.status_code == 400 and needle in r.json["error"]["message"], r.json


def test_pose_and_method_are_published(iy_app):
    c = iy_app.test_client()
    opts = c.get("/system-status").json["options"]
    assert opts["family"] == "flux" and opts["pose_control"] is True and opts["variant"] == "infiniteyou"
    assert not {"pose", "pose_strength", "identity_strength"} & set(opts["inapplicable_fields"])
    assert opts["default_identity_strength"] == 1.0


def test_an_infiniteyou_job_is_canceled_within_a_step(iy_app, client, session):
    gen = iy_app.extensions["twin"].engines[0]
    started, orig = threading.Event(), gen.generate

    def slow(req, on_progress=None, should_cancel=None):
        def progress(step, total, *p):
            started.set()
            time.sleep(0.2)
            on_progress(step, total, *p)
        return orig(req, progress, should_cancel)
    gen.generate = slow
    try:
        r = client.post("/generate", json={"prompt": "p", "session_id": session[0], "width": 64, "height": 64,
                                           "quality_mode": "high_fidelity", "pose": "frontal"})
        assert started.wait(60)
        canceled = client.post(f"/cancel/{r.json['id']}").json
        assert canceled["status"] == "canceled"
    finally:
        del gen.generate


def test_dlib_backend_refuses_infiniteyou_at_start_up(tiny_models, tmp_path):
    from app import create_app
    app = create_app(settings_for(tiny_models, tmp_path, face_backend="dlib"))
    rt = app.extensions["twin"]
    assert not rt.wait_ready(60) and rt.state == "setup_failed"
    assert "\n" not in rt.setup_error
    for needle in ("TWIN_IP_ADAPTER_VARIANT=infiniteyou", "dlib", "pip install", "insightface", "antelopev2"):
        assert needle in rt.setup_error, rt.setup_error
    rt.shutdown()


def test_an_sdxl_profile_refuses_infiniteyou_when_the_app_is_made(tiny_models, tmp_path):
    from app import create_app
    from utils.errors import ConfigError
    with pytest.raises(ConfigError) as e:
        create_app(settings_for(tiny_models, tmp_path, model_profile="tiny"))
    for needle in ("TWIN_IP_ADAPTER_VARIANT=infiniteyou", "flux family", "tiny-flux"):
        assert needle in e.value.message


def test_cli_generates_with_infiniteyou_and_evaluates(tiny_models, tmp_path, monkeypatch):
    import json

    from generate_twin import main
    for k, v in {"TWIN_MODEL_PROFILE": "tiny-flux", "TWIN_TINY_MODEL_DIR": str(tiny_models),
                 "TWIN_DATA_DIR": str(tmp_path), "TWIN_IP_ADAPTER_VARIANT": "infiniteyou", "TWIN_WARMUP": "0",
                 "TWIN_MAX_STEPS": "2", "TWIN_MIN_FACE_PX": "20", "TWIN_MODEL_DIR": str(tmp_path / "none")}.items():
        monkeypatch.setenv(k, v)
    selfies = tmp_path / "selfies"
    selfies.mkdir()
    for n, b in photos.selfie_set(2):
        (selfies / n).write_bytes(b)
    out = tmp_path / "out"
    assert main(["--selfies", str(selfies), "--prompt", "a portrait", "--out", str(out), "--pose", "look_down",
                 "--seed", "1"]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["result"]["variant"] == "infiniteyou" and meta["result"]["pose"] == "look_down"
    assert meta["result"]["identity"]["num_selfies"] == 2 and meta["result"]["control_image"] == "keypoints"
    assert main(["evaluate", "--selfies", str(selfies), "--images", str(out), "--json", str(tmp_path / "r.json")]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    pngs = sorted(f.name for f in out.glob("*.png"))
    assert sorted(r["image"] for r in rep["images"]) == pngs and rep["selfies"]["accepted"] == 2
