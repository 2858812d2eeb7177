"""Both families through the service (tiny, offline, real engines, dlib faces): a session crosses SDXL -> FLUX
-> SDXL (no identity on FLUX, said in the metadata; the cached SDXL identity reused after), switching under
load loses no job, fields that do not apply and LoRAs of the other family are 400s at submit (in-process and
through a generator process), the family table in /system-status and /openapi.json, the service's extras on
FLUX (best-of-N, restoration, thumbnails, previews, SSE, webhooks, cancel), pinned jobs checked against the
cluster registry's family, and the CLI on tiny-flux."""
from __future__ import annotations

import io
import json
import threading
import time

import pytest

from tests.fixtures.service import wait_until
from utils.engine.families.flux import NO_IDENTITY_NOTE
from tests.helpers.sse import parse_sse
from tests.helpers.webhooks import Receiver

ADMIN = "admin-key-1"
SDXL, FLUX = "tiny-sdxl", "tiny-flux"
TERMINAL = ("succeeded", "failed", "canceled")
BODY = {"prompt": "a portrait", "style": "none", "width": 64, "height": 64, "seed": 3}


@pytest.fixture(scope="module")
def switch_generator(tiny_settings):
    """An engine of its own (tests switch its base model; each test loads the one it starts from)."""
    from generate_twin import DigitalTwinGenerator
    return DigitalTwinGenerator(tiny_settings).setup()


@pytest.fixture
def flux_app(make_app, service_settings, switch_generator, face_service):
    def _make(model: str = FLUX, **kw):
        switch_generator.load_model(model)
        return make_app(service_settings.replace(max_image_side=128, admin_keys=ADMIN, **kw),
                        generator=switch_generator, faces=face_service)
    return _make


def upload(c, n: int = 1) -> dict:
    from tests.photos import selfie_set
    files = [(io.BytesIO(data), name) for name, data in selfie_set(n)]
    body = c.post("/upload", data={"files": files}, content_type="multipart/form-data").get_json()
    return {"X-Client-Token": body["client_token"], "session_id": body["session_id"]}


def headers(tok: dict) -> dict:
    return {"X-Client-Token": tok["X-Client-Token"]}


def run(c, tok, **body) -> dict:
    r = c.post("/generate", json={**BODY, "session_id": tok["session_id"], **body}, headers=headers(tok))
    assert r.status_code == 202, r.get_json()
    return wait(c, tok, r.get_json()["id"])


def wait(c, tok, job_id: str, timeout: float = 120) -> dict:
    return wait_until(lambda: (lambda j: j if j["status"] in TERMINAL else None)(
        c.get(f"/status/{job_id}", headers=headers(tok)).get_json()), timeout, 0.05)


def load(c, model: str) -> dict:
    r = c.post("/models/load", json={"model": model}, headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def identity_files(app, session_id: str) -> dict[str, int]:
    storage = app.extensions["twin"].storage
    return {p.name: p.stat().st_mtime_ns for p in storage.identity_paths(session_id)}


def test_a_session_crosses_sdxl_flux_sdxl(flux_app):
    app = flux_app(SDXL)
    c = app.test_client()
    tok = upload(c)
    sid = tok["session_id"]
    first = identity_files(app, sid)
    assert list(first) == ["identity.safetensors"]                         # built at upload, for SDXL
    job = run(c, tok)
    assert (job["status"], job["metadata"]["family"], job["metadata"]["identity"]["variant"]) == \
        ("succeeded", "sdxl", "plus-face")
    assert load(c, FLUX)["family"] == "flux"
    job = run(c, tok)
    m = job["metadata"]
    assert (job["status"], m["family"], m["model"], m["identity"]) == ("succeeded", "flux", FLUX, None), job
    assert m["identity_note"] == NO_IDENTITY_NOTE and "infiniteyou" in m["identity_note"]
    assert identity_files(app, sid) == first                               # nothing built or changed for FLUX
    assert load(c, SDXL)["previous_family"] == "flux"
    job = run(c, tok)
    assert job["metadata"]["identity"]["variant"] == "plus-face" and identity_files(app, sid) == first   # reused


def test_a_session_made_under_flux_gets_its_identity_when_sdxl_comes_back(flux_app):
    app = flux_app(FLUX)
    c = app.test_client()
    tok = upload(c)
    assert identity_files(app, tok["session_id"]) == {}                     # FLUX: nothing to build at upload
    assert run(c, tok)["metadata"]["identity"] is None
    load(c, SDXL)
    job = run(c, tok)
    assert job["status"] == "succeeded" and job["metadata"]["identity"]["num_selfies"] == 1
    (name,) = identity_files(app, tok["session_id"])                       # built from the stored face features
    assert name.startswith("identity-")


def test_switching_sdxl_flux_sdxl_under_load_loses_no_job(flux_app):
    app = flux_app(SDXL)
    c = app.test_client()
    tok = upload(c)
    answers = []

    def switch():
        for model in (FLUX, SDXL):
            time.sleep(0.15)
            r = app.test_client().post("/models/load", json={"model": model}, headers={"Authorization": f"Bearer {ADMIN}"})
            answers.append((r.status_code, r.get_json()))

    t = threading.Thread(target=switch)
    t.start()
    ids = []
    for _ in range(8):
        r = c.post("/generate", json={**BODY, "session_id": tok["session_id"]}, headers=headers(tok))
        assert r.status_code == 202, r.get_json()
        ids.append(r.get_json()["id"])
        time.sleep(0.04)
    t.join(120)
    ids.append(c.post("/generate", json={**BODY, "session_id": tok["session_id"]}, headers=headers(tok)).get_json()["id"])
    done = [wait(c, tok, i) for i in ids]
    assert [a[0] for a in answers] == [200, 200], answers
    assert [j["status"] for j in done] == ["succeeded"] * len(done), [j.get("error") for j in done]
    ran = [(j["metadata"]["model"], j["metadata"]["family"]) for j in done]
    assert set(ran) <= {(SDXL, "sdxl"), (FLUX, "flux")} and ran[-1] == (SDXL, "sdxl")
    # each job names the model it ran on, and the identity matches that family
    assert all((j["metadata"]["identity"] is None) == (j["metadata"]["family"] == "flux") for j in done)
    order = [m for m, _ in ran]
    switches = sum(a != b for a, b in zip(order, order[1:]))
    assert switches <= 2 and (switches == 0 or order[0] == SDXL)          # SDXL..., FLUX..., SDXL...


@pytest.mark.parametrize("model, body, code, needle", [
    (FLUX, {"negative_prompt": "blurry"}, "field_not_applicable", "negative_prompt='blurry'"),
    (FLUX, {"style": "photoreal", "style_strength": 0.4}, "field_not_applicable", "style_strength=0.4"),
    (FLUX, {"identity_strength": 0.9}, "field_not_applicable", "identity_strength=0.9"),
    (FLUX, {"pose": "auto"}, "field_not_applicable", "pose='auto'"),
    (FLUX, {"width": 72, "height": 64}, "field_not_applicable", "width=72"),
    (FLUX, {"lora": "tiny_style"}, "lora_wrong_family", "sdxl family"),
    (SDXL, {"true_cfg": 2.5}, "field_not_applicable", "true_cfg=2.5"),
    (SDXL, {"lora": "tiny_flux_kohya"}, "lora_wrong_family", "flux family"),
])
def test_a_field_or_lora_of_the_wrong_family_is_a_400_at_submit(flux_app, model, body, code, needle):
    c = flux_app(model).test_client()
    tok = upload(c)
    r = c.post("/generate", json={**BODY, "session_id": tok["session_id"], **body}, headers=headers(tok))
    assert r.status_code == 400, r.get_json()
    err = r.get_json()["error"]
    family = "flux" if model == FLUX else "sdxl"
    assert err["code"] == code and needle in err["message"] and family in err["message"], err


def test_a_generator_process_checks_the_family_at_submit_too(tiny_flux_settings):
    """The same submit check through the child (GeneratorProcess.validate), after a switch across families."""
    from generate_twin import DigitalTwinGenerator, GenerationRequest
    from utils.errors import InvalidRequest
    from utils.jobs.local.generator_process import GeneratorProcess
    gen = GeneratorProcess(tiny_flux_settings, engine_class=DigitalTwinGenerator).setup()
    try:
        assert gen.info()["family"] == "flux"
        with pytest.raises(InvalidRequest) as e:
            gen.validate(GenerationRequest.from_dict({"prompt": "p", "negative_prompt": "x"}, tiny_flux_settings))
        assert e.value.code == "field_not_applicable" and "flux" in e.value.message
        assert gen.load_model(SDXL)["family"] == "sdxl"
        info = gen.info()
        assert (info["family"], info["model_name"], info["variant"]) == ("sdxl", SDXL, "plus-face")   # refreshed
        assert gen.published_options()["family"] == "sdxl"
        gen.validate(GenerationRequest.from_dict({"prompt": "p", "negative_prompt": "x"}, tiny_flux_settings))
    finally:
        gen.close()


def test_system_status_and_openapi_show_the_family_table(flux_app):
    c = flux_app(FLUX).test_client()
    st = c.get("/system-status").get_json()
    model, opts = st["model"], st["options"]
    assert (model["family"], model["memory"]["mode"], model["variant"]) == ("flux", "full", "")
    assert "CPU" in model["memory"]["reason"] and model["identity_note"]
    assert opts["family"] == "flux" and opts["side_multiple"] == 16
    assert set(opts["inapplicable_fields"]) == {"identity_strength", "pose", "pose_strength"}
    assert opts["field_applicability"]["negative_prompt"]["flux"].startswith("only with true_cfg > 1")
    assert opts["quality_table"]["flux-dev"]["balanced"]["steps"] == 28
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in opts["aspect_ratios"].values())
    models = c.get("/models").get_json()["models"]
    assert {m["name"]: m["family"] for m in models}[FLUX] == "flux"
    props = c.get("/openapi.json").get_json()["components"]["schemas"]["GenerateRequest"]["properties"]
    assert props["true_cfg"]["x-applies-to"] == {"flux": opts["field_applicability"]["true_cfg"]["flux"]}
    assert set(props["style_strength"]["x-applies-to"]) == {"sdxl", "flux"}
    load(c, SDXL)
    opts = c.get("/system-status").get_json()["options"]
    assert opts["family"] == "sdxl" and set(opts["inapplicable_fields"]) == {"true_cfg", "pose", "pose_strength"}


def test_the_service_extras_work_on_flux(flux_app):
    """best-of-N (ranked against the session's faces), restoration (tiny stand-ins), thumbnails, previews,
    the SSE stream and signed webhooks, all on a FLUX job."""
    import base64
    secret = "whsec_" + base64.b64encode(b"a test secret of 32 bytes length!").decode()
    receiver = Receiver()
    try:
        app = flux_app(FLUX, webhook_secret=secret, webhook_allow_private=True)
        c = app.test_client()
        tok = upload(c)
        job = run(c, tok, candidates=2, restore_faces=True, preview=True, webhook=receiver.url,
                  webhook_events=["start", "output", "completed"])
        assert job["status"] == "succeeded" and job["metadata"]["family"] == "flux", job
        (out,) = job["outputs"]
        # restoration ran: the tiny FLUX draws no face, so the output says so and is kept as generated
        assert out["restored"] is False and "no face was found" in out["note"]
        for url in (out["url"], out["thumbnail_url"]):
            assert c.get(url, headers=headers(tok)).status_code == 200
        cands = job["metadata"]["candidates"]
        assert len(cands) == 2 and sum(x["kept"] for x in cands) == 1     # ranked against the session's faces
        events, _ = parse_sse(c.get(f"/events/{job['id']}", headers=headers(tok)).get_data(as_text=True))
        kinds = [e["event"] for e in events]
        assert kinds[-1] == "done" and "progress" in kinds
        previews = [e["data"]["image"] for e in events if e["event"] == "preview"]
        assert previews and all(p.startswith("data:image/jpeg;base64,") for p in previews)   # unpacked latents
        wait_until(lambda: "job.completed" in receiver.events(), 10)
        assert receiver.events() == ["job.start", "job.output", "job.completed"]
    finally:
        receiver.close()


def test_a_flux_job_is_canceled_within_a_step(flux_app, tiny_settings):
    app = flux_app(FLUX)
    c = app.test_client()
    tok = upload(c)
    gen = app.extensions["twin"].engines[0]
    started = threading.Event()
    orig = gen.generate

    def slow(req, on_progress=None, should_cancel=None):   # each step takes 0.2 s: a cancel lands mid-job
        def progress(step, total, *p):
            started.set()
            time.sleep(0.2)
            on_progress(step, total, *p)
        return orig(req, progress, should_cancel)
    gen.generate = slow
    try:
        r = c.post("/generate", json={**BODY, "session_id": tok["session_id"], "quality_mode": "high_fidelity"},
                   headers=headers(tok))
        job_id = r.get_json()["id"]
        assert started.wait(60)
        canceled = c.post(f"/cancel/{job_id}", headers=headers(tok)).get_json()
        assert canceled["status"] == "canceled" and canceled["progress"]["step"] < 3
    finally:
        del gen.generate


def test_a_pinned_job_is_checked_against_the_family_its_worker_holds(redis_server, tmp_path, tiny_flux_settings):
    """Cluster mode: the API node holds no model; a job pinned to a model is checked against the family and
    identity method a live GPU worker publishes for it; an unpinned one waits for its worker's check."""
    from app import create_app
    from generate_twin import DigitalTwinGenerator
    from tests.fakes import FakeFaceService
    from utils.jobs.cluster.registry import WORKER_INFO, WORKER_NAMES
    settings = tiny_flux_settings.replace(data_dir=tmp_path / "data", queue_url=redis_server.url, retention_hours=0,
                                          rate_limit_generate="100000/minute", rate_limit_upload="100000/minute")
    conn = redis_server.client()
    catalogue = [{"name": FLUX, "family": "flux", "kind": "diffusers-folder", "file": None},
                 {"name": SDXL, "family": "sdxl", "kind": "diffusers-folder", "file": None}]
    conn.hset(WORKER_INFO + "w0", mapping={"model": FLUX, "family": "flux", "variant": "", "method_fields": "[]",
                                           "catalogue": json.dumps(catalogue), "loras": "[]", "state": "idle",
                                           "seen": repr(time.time())})
    conn.sadd(WORKER_NAMES, "w0")
    app = create_app(settings, generator=DigitalTwinGenerator(settings), faces=FakeFaceService())
    try:
        assert app.extensions["twin"].wait_ready(30)
        c = app.test_client()
        from tests.fakes import image_bytes
        r = c.post("/upload", data={"files": [(io.BytesIO(image_bytes((90, 40, 40))), "s.png")]},
                   content_type="multipart/form-data")
        tok = {"X-Client-Token": r.get_json()["client_token"]}
        conn.hset(WORKER_INFO + "w0", "seen", repr(time.time()))
        pinned = c.post("/generate", json={"prompt": "p", "model": FLUX, "negative_prompt": "x"}, headers=tok)
        assert pinned.status_code == 400 and pinned.get_json()["error"]["code"] == "field_not_applicable"
        assert "flux" in pinned.get_json()["error"]["message"]
        ok = c.post("/generate", json={"prompt": "p", "model": FLUX, "true_cfg": 2.0, "negative_prompt": "x"}, headers=tok)
        assert ok.status_code == 202, ok.get_json()
        unpinned = c.post("/generate", json={"prompt": "p", "negative_prompt": "x"}, headers=tok)
        assert unpinned.status_code == 202          # its family is the worker's: checked when it runs
    finally:
        app.extensions["twin"].shutdown()


@pytest.mark.parametrize("profile, family", [("tiny", "sdxl"), ("tiny-flux", "flux")])
def test_the_cli_generates_on_both_families(tiny_models, tmp_path, monkeypatch, profile, family):
    import generate_twin
    from tests.photos import selfie_set
    selfies = tmp_path / "selfies"
    selfies.mkdir()
    for name, data in selfie_set(1):
        (selfies / name).write_bytes(data)
    for k, v in {"TWIN_TINY_MODEL_DIR": str(tiny_models), "TWIN_DATA_DIR": str(tmp_path / "d"),
                 "TWIN_MODEL_DIR": str(tmp_path / "none"), "TWIN_FACE_BACKEND": "dlib", "TWIN_WARMUP": "0",
                 "TWIN_MAX_STEPS": "2"}.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    assert generate_twin.main(["--selfies", str(selfies), "--prompt", "a portrait", "--out", str(out), "--profile",
                               profile, "--width", "64", "--height", "64", "--seed", "1"]) == 0
    meta = json.loads((out / "metadata.json").read_text())["result"]
    assert meta["family"] == family and (out / "avatar_001.png").is_file()
    assert (meta["identity"] is None) == (family == "flux") and (out / "identity.safetensors").is_file() == (family == "sdxl")
