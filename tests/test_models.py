"""Base-model registry and hot swap: the tiny single-file checkpoint, GET /models and /loras, the admin-only
POST /models/load (table), a real switch on the tiny profile, a broken file, and a switch under load."""
from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest

from utils.service import status

from generate_twin import DigitalTwinGenerator, GenerationRequest
from tests.helpers.http import upload_token
from tests.photos import selfie_set
from utils.errors import InvalidRequest

ADMIN, USER = "admin-key-1", "user-key-1"
BASE, ALT = "tiny-sdxl", "tiny-alt"


@pytest.fixture(scope="module")
def model_folder(tiny_models, tmp_path_factory):
    """A private copy of the tiny folder (switching and broken files must not touch the shared one)."""
    root = tmp_path_factory.mktemp("models") / "tiny-model"
    shutil.copytree(tiny_models, root)
    (root / "checkpoints" / "broken.safetensors").write_bytes(b"not a safetensors file at all")
    return root


@pytest.fixture(scope="module")
def swap_settings(tiny_settings, model_folder):
    return tiny_settings.replace(tiny_model_dir=model_folder)


@pytest.fixture(scope="module")
def swap_generator(swap_settings):
    from generate_twin import DigitalTwinGenerator
    return DigitalTwinGenerator(swap_settings).setup()


def test_the_tiny_checkpoint_has_the_original_single_file_layout(model_folder):
    from safetensors import safe_open
    with safe_open(str(model_folder / "checkpoints" / "tiny-alt.safetensors"), "pt") as f:
        keys = set(f.keys())
    for key in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight",
                "first_stage_model.decoder.up.0.block.0.conv1.weight", "first_stage_model.encoder.mid.attn_1.q.weight",
                "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
                "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
                "conditioner.embedders.1.model.text_projection"):
        assert key in keys, key
    assert not any(k.startswith(("unet.", "down_blocks.")) for k in keys)


def test_the_converter_round_trips_through_from_single_file(model_folder, tmp_path):
    """diffusers' own from_single_file reads back exactly the weights written (offline, local config)."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file
    from model_loader import BASE_DIR, to_single_file
    base = StableDiffusionXLPipeline.from_pretrained(str(model_folder / BASE_DIR), local_files_only=True)
    save_file(to_single_file(base), str(tmp_path / "rt.safetensors"))
    back = StableDiffusionXLPipeline.from_single_file(str(tmp_path / "rt.safetensors"),
                                                      config=str(model_folder / BASE_DIR), local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(base, name).state_dict(), getattr(back, name).state_dict()
        assert set(a) == set(b), name
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_catalogue_lists_the_folder_and_the_checkpoints(swap_generator):
    cat = swap_generator.models_catalogue()
    assert cat["active"] == BASE
    # Both families of the tiny folder (issue 22): each model and LoRA says which it is; a file whose keys name
    # no family ("broken") is taken for the configured one, so its load fails naming it.
    assert {m["name"]: (m["kind"], m["family"]) for m in cat["models"]} == {
        BASE: ("diffusers-folder", "sdxl"), ALT: ("single-file", "sdxl"), "broken": ("single-file", "sdxl"),
        "tiny-flux": ("diffusers-folder", "flux"), "tiny-flux-alt": ("single-file", "flux")}
    assert {x["name"]: (x["family"], x["loaded"]) for x in cat["loras"]} == {
        "tiny_style": ("sdxl", True), "tiny_flux_realism": ("flux", False), "tiny_flux_kohya": ("flux", False),
        "tiny_flux_style": ("flux", False)}


def _image(gen, seed=7):
    req = GenerationRequest.from_dict({"prompt": "a portrait", "style": "none", "seed": seed, "width": 64,
                                       "height": 64}, gen.settings)
    res = gen.generate(req)
    return np.asarray(res.images[0], dtype=np.float32), res.metadata


def test_a_real_switch_changes_the_image_for_the_same_seed_and_back(swap_generator):
    before, meta = _image(swap_generator)
    assert meta["model"] == BASE
    out = swap_generator.load_model(ALT)
    assert out["switched"] and out["previous"] == BASE and out["model"] == ALT
    after, meta = _image(swap_generator)
    assert meta["model"] == ALT and swap_generator.info()["model_name"] == ALT
    assert np.abs(after - before).mean() > 1.0                     # other weights, other picture
    assert swap_generator.load_model(BASE)["switched"]
    again, meta = _image(swap_generator)
    assert meta["model"] == BASE and np.array_equal(again, before)  # the base is back, bit for bit


@pytest.mark.parametrize("name, code, needle", [
    ("broken", "model_load_failed", "broken.safetensors"),
    ("nope", "unknown_model", "'nope'"),
    ("../tiny-alt", "unknown_model", "../tiny-alt"),
])
def test_a_bad_load_names_it_and_the_old_model_keeps_serving(swap_generator, name, code, needle):
    with pytest.raises(InvalidRequest) as e:
        swap_generator.load_model(name)
    assert e.value.code == code and needle in e.value.message
    assert swap_generator.models_catalogue()["active"] == BASE
    _, meta = _image(swap_generator)
    assert meta["model"] == BASE


def test_a_job_for_another_model_fails_naming_both(swap_generator):
    req = GenerationRequest.from_dict({"prompt": "p", "style": "none", "width": 64, "height": 64,
                                       "model": ALT}, swap_generator.settings)
    with pytest.raises(InvalidRequest) as e:
        swap_generator.generate(req)
    assert e.value.code == "model_not_loaded" and ALT in e.value.message and BASE in e.value.message
    ok = GenerationRequest.from_dict({"prompt": "p", "style": "none", "width": 64, "height": 64,
                                      "model": BASE}, swap_generator.settings)
    assert swap_generator.generate(ok).metadata["model"] == BASE


# --- through the API ---------------------------------------------------------------------------------
@pytest.fixture
def models_app(make_app, service_settings, swap_generator):
    def _make(**kw):
        return make_app(service_settings.replace(max_image_side=128, **kw), generator=swap_generator)
    return _make


def _bearer(key):
    return {"Authorization": f"Bearer {key}"} if key else {}


@pytest.mark.parametrize("settings, key, status, code", [
    ({"api_keys": USER, "admin_keys": ADMIN}, ADMIN, 200, None),
    ({"api_keys": USER, "admin_keys": ADMIN}, USER, 403, "forbidden"),
    ({"api_keys": USER, "admin_keys": ADMIN}, None, 401, "unauthorized"),
    ({"api_keys": USER, "admin_keys": ADMIN}, "wrong", 401, "unauthorized"),
    ({"api_keys": USER}, USER, 403, "forbidden"),                     # no admin keys: switching is off
    ({"admin_keys": ADMIN}, None, 403, "forbidden"),                   # no API keys: still admin only
    ({"admin_keys": ADMIN}, ADMIN, 200, None),
])
def test_load_is_admin_only(models_app, settings, key, status, code):
    c = models_app(**settings).test_client()
    r = c.post("/models/load", json={"model": BASE}, headers=_bearer(key))
    assert r.status_code == status, r.get_json()
    if code:
        assert r.get_json()["error"]["code"] == code
    if status == 403 and "admin_keys" not in settings:
        assert "TWIN_ADMIN_KEYS" in r.get_json()["error"]["message"]


@pytest.mark.parametrize("body, status, code, needle", [
    ({"model": "nope"}, 404, "unknown_model", "'nope'"),
    ({"model": "broken"}, 422, "model_load_failed", "broken.safetensors"),
    ({"model": 5}, 400, "invalid_request", "model=5"),
    ({"name": BASE}, 400, "invalid_request", "model"),
    ([BASE], 400, "invalid_request", "model"),
])
def test_load_bad_bodies(models_app, body, status, code, needle):
    c = models_app(admin_keys=ADMIN).test_client()
    r = c.post("/models/load", json=body, headers=_bearer(ADMIN))
    assert r.status_code == status, r.get_json()
    assert r.get_json()["error"]["code"] == code and needle in r.get_json()["error"]["message"]
    assert c.get("/models").get_json()["active"] == BASE


def test_models_and_loras_endpoints_and_openapi(models_app):
    c = models_app().test_client()
    body = c.get("/models").get_json()
    assert body["active"] == BASE and [m["name"] for m in body["models"]] == [BASE, "tiny-flux", "broken", ALT,
                                                                              "tiny-flux-alt"]
    loras = c.get("/loras").get_json()["loras"]
    assert {"name": "tiny_style", "family": "sdxl", "loaded": True} in loras
    assert {x["family"] for x in loras} == {"sdxl", "flux"}
    spec = c.get("/openapi.json").get_json()
    assert {"/models", "/loras", "/models/load"} <= set(spec["paths"])
    assert "model" in spec["components"]["schemas"]["GenerateRequest"]["properties"]


def test_hot_swap_under_load(make_app, service_settings, swap_generator, face_service):
    """Jobs submitted before, during and after a switch: none fails, each reports the model it ran on, and
    the two models' pictures differ for the same seed."""
    app = make_app(service_settings.replace(max_image_side=128, admin_keys=ADMIN), generator=swap_generator,
                   faces=face_service)
    c = app.test_client()
    token = upload_token(c, selfie_set(1))
    body = {"prompt": "a portrait", "style": "none", "width": 64, "height": 64, "seed": 3}
    jobs, switch = [], {}

    def swap():
        time.sleep(0.05)
        r = app.test_client().post("/models/load", json={"model": ALT}, headers=_bearer(ADMIN))
        switch["answer"] = (r.status_code, r.get_json())

    t = threading.Thread(target=swap)
    t.start()
    for _ in range(6):   # submitted while the new model loads beside the old one and the switch happens
        r = c.post("/generate", json=body, headers=token)
        assert r.status_code == 202, r.get_json()
        jobs.append(r.get_json()["id"])
        time.sleep(0.03)
    t.join(60)
    assert switch["answer"][0] == 200, switch
    jobs.append(c.post("/generate", json=body, headers=token).get_json()["id"])   # surely after it
    done = []
    deadline = time.time() + 120
    for jid in jobs:
        while True:
            job = c.get(f"/status/{jid}", headers=token).get_json()
            if job["status"] in ("succeeded", "failed", "canceled"):
                break
            assert time.time() < deadline
            time.sleep(0.05)
        done.append(job)
    assert [j["status"] for j in done] == ["succeeded"] * len(done), [j.get("error") for j in done]
    used = [j["metadata"]["model"] for j in done]
    print("models used in order:", used)
    assert set(used) <= {BASE, ALT} and used[-1] == ALT
    assert used == sorted(used, key=lambda m: m == ALT)   # once switched, never back: BASE..., ALT...
    # The answer says which queued jobs the switch moved to the new model: each of them did run on it.
    queued = switch["answer"][1]["queued"]
    assert queued["pinned_elsewhere"] == []
    assert set(queued["run_on_new_model"]) <= set(jobs)
    by_id = dict(zip(jobs, used))
    assert all(by_id[jid] == ALT for jid in queued["run_on_new_model"]), (queued, by_id)
    swap_generator.load_model(BASE)   # leave the module generator as the other tests expect


def test_the_generator_process_forwards_the_registry_calls(swap_settings):
    """The same contract through the child: load beside, switch, errors come back with their code."""
    from utils.jobs.local.generator_process import GeneratorProcess
    gen = GeneratorProcess(swap_settings, engine_class=DigitalTwinGenerator).setup()
    try:
        assert gen.models_catalogue()["active"] == BASE
        with pytest.raises(InvalidRequest) as e:
            gen.load_model("broken")
        assert e.value.code == "model_load_failed" and "broken.safetensors" in e.value.message
        assert gen.load_model(ALT)["switched"] and gen.info()["model_name"] == ALT
        req = GenerationRequest.from_dict({"prompt": "p", "style": "none", "width": 64, "height": 64, "seed": 1},
                                          swap_settings)
        assert gen.generate(req).metadata["model"] == ALT
    finally:
        gen.close()


@pytest.mark.parametrize("model, status, code", [
    (BASE, 202, None),
    (ALT, 409, "model_not_loaded"),          # known, not active: said at submit, naming both
    ("nope", 400, "unknown_model"),
    ("", 400, "invalid_request"),
    (7, 400, "invalid_request"),
])
def test_generate_with_model_field(make_app, service_settings, swap_generator, face_service, model, status, code):
    app = make_app(service_settings.replace(max_image_side=128), generator=swap_generator, faces=face_service)
    c = app.test_client()
    token = upload_token(c, selfie_set(1))
    r = c.post("/generate", json={"prompt": "p", "style": "none", "width": 64, "height": 64, "model": model},
               headers=token)
    assert r.status_code == status, r.get_json()
    if code:
        err = r.get_json()["error"]
        assert err["code"] == code and repr(model) in err["message"]
        if code == "model_not_loaded":
            assert repr(BASE) in err["message"]


def test_a_restarted_generator_process_comes_back_on_the_active_model(swap_settings, tmp_path):
    """The child is killed after a switch: it comes back on the model that was active, not the default.
    When that file no longer loads, it serves the default model and says so (log, info, /health)."""
    import os
    import signal
    from tests.fakes import FakeFaceService, fake_safety
    from tests.helpers.wait import wait_until
    from utils.jobs.local.generator_process import GeneratorProcess
    from utils.service.wiring import build_runtime
    folder = tmp_path / "tiny-model"
    shutil.copytree(swap_settings.resolved_tiny_model_dir, folder)
    settings = swap_settings.replace(tiny_model_dir=folder, data_dir=tmp_path / "data")
    gen = GeneratorProcess(settings, engine_class=DigitalTwinGenerator).setup()
    runtime = build_runtime(settings, engines=[gen], faces=FakeFaceService(), safety=fake_safety(settings))
    runtime.state = "ready"   # as after set-up; /health follows the generator process
    req = GenerationRequest.from_dict({"prompt": "p", "style": "none", "width": 64, "height": 64, "seed": 1}, settings)
    try:
        assert gen.load_model(ALT)["switched"]
        for kill, corrupt, want_model in [(1, False, ALT), (2, True, BASE)]:
            if corrupt:
                (folder / "checkpoints" / f"{ALT}.safetensors").write_bytes(b"truncated")
            pid = gen.pid
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: gen.pid != pid and gen.state == "ready", 120, 0.05)
            assert gen.restarts == kill
            assert gen.generate(req).metadata["model"] == want_model
            assert gen.info()["model_name"] == want_model
            if corrupt:
                assert f"{ALT}.safetensors" in gen.info()["model_error"]
                assert repr(ALT) in status.health(runtime)["model_error"]
            else:
                assert "model_error" not in gen.info() and "model_error" not in status.health(runtime)
    finally:
        gen.close()
        runtime.store.close()
