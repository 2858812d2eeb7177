"""DigitalTwinGenerator on the tiny profile: determinism, identity strength, batching, progress, cancel,
request validation, fast mode, sizes, errors."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from generate_twin import (ASPECT_RATIOS, FAST_FALLBACK, QUALITY_MODES, DigitalTwinGenerator, GenerationRequest,
                           preset_size)
from model_loader import LIGHTNING_DIR, dpmpp_karras
from tests.fixtures.models import make_crops
from utils.errors import InvalidRequest, JobCanceled, OutOfMemory, ServiceNotReady


def px(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


@pytest.fixture(scope="module")
def identity(tiny_generator):
    return tiny_generator.build_identity(make_crops(3), None, face_model=None)


def request(settings, identity=None, **kw):
    payload = {"prompt": "a portrait of a person", "seed": 7, "style": "none", **kw}
    return GenerationRequest.from_dict(payload, settings).with_identity(identity)


def test_same_seed_gives_identical_images(tiny_generator, tiny_settings, identity):
    a = tiny_generator.generate(request(tiny_settings, identity, num_images=2))
    b = tiny_generator.generate(request(tiny_settings, identity, num_images=2))
    assert a.seeds == b.seeds == [7, 8]
    assert np.array_equal(px(a.images), px(b.images))
    c = tiny_generator.generate(request(tiny_settings, identity, num_images=2, seed=8))
    assert not np.array_equal(px(a.images), px(c.images))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_num_images_in_one_call(tiny_generator, tiny_settings, identity, n):
    calls = []
    r = tiny_generator.generate(request(tiny_settings, identity, num_images=n), on_progress=lambda s, t: calls.append(s))
    assert len(r.images) == len(r.seeds) == n
    assert r.seeds == [7 + i for i in range(n)]
    assert all(im.size == (128, 128) for im in r.images)
    assert len(calls) == r.metadata["steps"]  # one denoising loop for the whole batch
    if n > 1:
        assert not np.array_equal(px(r.images[:1]), px(r.images[1:2]))  # per-image seeds


def test_random_seed_when_absent_and_reported(tiny_generator, tiny_settings):
    a = tiny_generator.generate(request(tiny_settings, seed=None, num_images=2))
    b = tiny_generator.generate(request(tiny_settings, seed=None))
    assert len(a.seeds) == 2 and a.seeds[1] == a.seeds[0] + 1
    assert a.seeds[0] != b.seeds[0]
    assert a.metadata["seeds"] == a.seeds


def test_strength_zero_reproduces_the_no_adapter_image(tiny_generator, tiny_settings, tiny_models, identity):
    from diffusers import StableDiffusionXLPipeline
    req = request(tiny_settings, identity, identity_strength=0.0, num_images=2)
    with_adapter = tiny_generator.generate(req)
    plan = tiny_generator.model.plan(req)
    # A pipeline that never had an IP-Adapter loaded, same call otherwise.
    bare = StableDiffusionXLPipeline.from_pretrained(str(tiny_models / "stable-diffusion-xl-base-1.0"))
    bare.scheduler = dpmpp_karras(bare.scheduler.config)
    bare.set_progress_bar_config(disable=True)
    plain = bare(**tiny_generator.model.call_kwargs(req, plan, with_adapter.seeds)).images
    assert np.abs(px(plain) - px(with_adapter.images)).max() <= 1
    strong = tiny_generator.generate(request(tiny_settings, identity, identity_strength=1.0, num_images=2))
    assert np.abs(px(strong.images) - px(plain)).mean() > 1.0


def test_no_identity_equals_strength_zero(tiny_generator, tiny_settings, identity):
    a = tiny_generator.generate(request(tiny_settings, None))
    b = tiny_generator.generate(request(tiny_settings, identity, identity_strength=0.0))
    assert np.array_equal(px(a.images), px(b.images))
    assert a.metadata["identity"] is None and a.metadata["identity_strength"] == 0.0


def test_average_and_stack_identities_give_different_images(tiny_generator, tiny_settings):
    crops = make_crops(3, seed=5)
    avg = tiny_generator.build_identity(crops, None, face_model=None, combine="average")
    stack = tiny_generator.build_identity(crops, None, face_model=None, combine="stack")
    a = tiny_generator.generate(request(tiny_settings, avg, identity_strength=1.0))
    b = tiny_generator.generate(request(tiny_settings, stack, identity_strength=1.0))
    assert not np.array_equal(px(a.images), px(b.images))
    assert b.metadata["identity"] == {"variant": "plus-face", "combine": "stack", "num_selfies": 3}


def test_progress_fires_once_per_step(tiny_generator, tiny_settings, identity):
    calls = []
    r = tiny_generator.generate(request(tiny_settings, identity), on_progress=lambda s, t: calls.append((s, t)))
    steps = r.metadata["steps"]
    assert calls == [(i, steps) for i in range(1, steps + 1)]


@pytest.mark.parametrize("cancel_after", [0, 1, 2])
def test_cancel_stops_within_one_step(tiny_generator, tiny_settings, identity, cancel_after):
    calls = []
    with pytest.raises(JobCanceled):
        tiny_generator.generate(request(tiny_settings, identity), on_progress=lambda s, t: calls.append(s),
                                should_cancel=lambda: len(calls) >= cancel_after)
    assert len(calls) == cancel_after
    # the generator is usable afterwards
    assert len(tiny_generator.generate(request(tiny_settings, identity)).images) == 1


@pytest.mark.parametrize("payload, needle", [
    ({"prompt": ""}, "prompt=''"),
    ({"prompt": "   "}, "prompt='   '"),
    ({"prompt": 5}, "prompt=5"),
    ({"num_images": 0}, "num_images=0"),
    ({"num_images": 5}, "num_images=5"),
    ({"num_images": 2.5}, "num_images=2.5"),
    ({"num_images": True}, "num_images=True"),
    ({"width": 100, "height": 128}, "width=100"),
    ({"width": 128, "height": 8}, "height=8"),
    ({"width": 4096, "height": 128}, "width=4096"),
    ({"width": 128}, "height=None"),
    ({"width": 128, "height": 128, "aspect_ratio": "1:1"}, "aspect_ratio='1:1'"),
    ({"aspect_ratio": "7:3"}, "aspect_ratio='7:3'"),
    ({"identity_strength": float("nan")}, "identity_strength=nan"),
    ({"identity_strength": 3}, "identity_strength=3"),
    ({"identity_strength": "high"}, "identity_strength='high'"),
    ({"lora_scale": float("inf")}, "lora_scale=inf"),
    ({"seed": -1}, "seed=-1"),
    ({"seed": "42"}, "seed='42'"),
    ({"quality_mode": "ultra"}, "quality_mode='ultra'"),
    ({"style": "claymation"}, "style='claymation'"),
    ({"lora": ""}, "lora=''"),
    ({"colour": "red", "steps": 3}, "colour, steps"),
    ({"prompt": "x" * 3000}, "3000 characters"),
])
def test_invalid_requests_name_the_value(tiny_settings, payload, needle):
    full = {"prompt": "a portrait", **payload}
    with pytest.raises(InvalidRequest) as e:
        GenerationRequest.from_dict(full, tiny_settings)
    assert needle in e.value.message


def test_non_object_payload_is_refused(tiny_settings):
    with pytest.raises(InvalidRequest, match="JSON object"):
        GenerationRequest.from_dict(["prompt"], tiny_settings)


def test_unknown_lora_is_refused_naming_it(tiny_generator, tiny_settings):
    with pytest.raises(InvalidRequest, match="lora='van-gogh'.*tiny_style"):
        tiny_generator.generate(request(tiny_settings, lora="van-gogh"))


def test_style_lora_changes_the_image_and_is_reported(tiny_generator, tiny_settings, identity):
    a = tiny_generator.generate(request(tiny_settings, identity))
    b = tiny_generator.generate(request(tiny_settings, identity, lora="tiny_style", lora_scale=1.0))
    assert not np.array_equal(px(a.images), px(b.images))
    assert b.metadata["lora"] == "tiny_style" and b.metadata["lora_scale"] == 1.0
    c = tiny_generator.generate(request(tiny_settings, identity))  # LoRA switched off again afterwards
    assert np.array_equal(px(a.images), px(c.images))


def test_request_roundtrip_and_defaults(tiny_settings):
    req = GenerationRequest.from_dict({"prompt": " hi ", "num_images": 2, "quality_mode": "fast"}, tiny_settings)
    d = req.to_dict()
    assert d["prompt"] == "hi" and d["identity_strength"] == tiny_settings.default_identity_strength
    assert d.pop("has_identity") is False
    assert GenerationRequest.from_dict(d, tiny_settings) == req
    json.dumps(d)


@pytest.mark.parametrize("quality_mode", ["balanced", "high_fidelity"])
def test_quality_table_drives_steps_and_guidance(tiny_generator, tiny_settings, quality_mode):
    from utils.engine.families.sdxl import SdxlModel
    uncapped = SdxlModel(tiny_settings.replace(max_steps=0), tiny_generator.models, tiny_generator.adapter)
    plan = uncapped.plan(request(tiny_settings, quality_mode=quality_mode))
    assert plan["steps"] == QUALITY_MODES[quality_mode]["steps"]
    assert plan["guidance_scale"] == QUALITY_MODES[quality_mode]["guidance_scale"]
    assert plan["scheduler"] == "dpmpp_2m_karras"


def test_fast_mode_uses_the_few_step_lora_without_cfg(tiny_generator, tiny_settings, identity):
    r = tiny_generator.generate(request(tiny_settings, identity, quality_mode="fast", num_images=2))
    m = r.metadata
    assert (m["scheduler"], m["guidance_scale"], m["fast_mode_fallback"]) == ("euler_trailing", 0.0, False)
    plan = tiny_generator.model.plan(request(tiny_settings, identity, quality_mode="fast"))
    assert ("lightning", 1.0) in plan["adapters"]
    assert len(r.images) == 2


def test_fast_mode_falls_back_without_the_few_step_lora(tiny_models, tiny_settings, tmp_path):
    folder = tmp_path / "tiny-no-lightning"
    shutil.copytree(tiny_models, folder, ignore=shutil.ignore_patterns(LIGHTNING_DIR))
    gen = DigitalTwinGenerator(tiny_settings.replace(tiny_model_dir=folder, max_steps=0)).setup()
    assert gen.info()["fast_mode"] == "fallback"
    plan = gen.model.plan(request(tiny_settings, quality_mode="fast"))
    assert plan["fast_mode_fallback"] is True
    assert (plan["steps"], plan["scheduler"]) == (FAST_FALLBACK["steps"], FAST_FALLBACK["scheduler"])
    r = gen.generate(request(tiny_settings, quality_mode="fast"))
    assert r.metadata["fast_mode_fallback"] is True and "few-step LoRA not installed" in r.metadata["note"]


@pytest.mark.parametrize("ar", sorted(ASPECT_RATIOS))
def test_aspect_ratio_presets_scale_from_the_native_resolution(tiny_settings, ar):
    w, h = preset_size(ar, 128, tiny_settings)
    W, H = ASPECT_RATIOS[ar]
    assert w % 8 == 0 and h % 8 == 0
    assert tiny_settings.min_image_side <= min(w, h) and max(w, h) <= tiny_settings.max_image_side
    assert math.isclose(w / h, W / H, rel_tol=0.1)
    assert preset_size(ar, 1024, tiny_settings) == (W, H)


@pytest.mark.parametrize("extra, size", [
    ({"aspect_ratio": "16:9"}, (168, 96)),
    ({"aspect_ratio": "9:16"}, (96, 168)),
    ({"width": 64, "height": 96}, (64, 96)),
    ({}, (128, 128)),
])
def test_output_size(tiny_generator, tiny_settings, extra, size):
    r = tiny_generator.generate(request(tiny_settings, **extra))
    assert r.images[0].size == size
    assert (r.metadata["width"], r.metadata["height"]) == size


def test_metadata_is_json_safe_and_complete(tiny_generator, tiny_settings, identity):
    m = tiny_generator.generate(request(tiny_settings, identity)).metadata
    json.dumps(m)
    for key in ("steps", "guidance_scale", "scheduler", "timings", "profile", "fast_mode_fallback", "seeds",
                "model_name", "variant"):
        assert key in m
    assert m["profile"] == "tiny" and m["is_demo"] is True
    assert m["timings"]["total_s"] > 0


class _OOMPipe:
    def __init__(self, pipe):
        object.__setattr__(self, "_pipe", pipe)

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __setattr__(self, name, value):
        setattr(self._pipe, name, value)

    def __call__(self, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_memory_becomes_a_clear_error(tiny_generator, tiny_settings, monkeypatch):
    monkeypatch.setattr(tiny_generator.models, "pipe", _OOMPipe(tiny_generator.models.pipe))
    with pytest.raises(OutOfMemory, match="num_images=3 at 128x128"):
        tiny_generator.generate(request(tiny_settings, num_images=3))


def test_generate_before_setup_is_not_ready(tiny_settings):
    gen = DigitalTwinGenerator(tiny_settings)
    assert gen.state == "starting"
    with pytest.raises(ServiceNotReady):
        gen.generate(request(tiny_settings))
    with pytest.raises(ServiceNotReady):
        gen.build_identity(make_crops(1), None)


def test_setup_is_idempotent_and_info_complete(tiny_generator):
    models = tiny_generator.models
    tiny_generator.setup()
    assert tiny_generator.models is models
    info = tiny_generator.info()
    assert {k: info[k] for k in ("profile", "is_demo", "variant", "device", "dtype", "state")} == \
        {"profile": "tiny", "is_demo": True, "variant": "plus-face", "device": "cpu", "dtype": "float32", "state": "ready"}


def test_warmup_runs_in_setup(tiny_settings):
    gen = DigitalTwinGenerator(tiny_settings.replace(warmup=True)).setup()
    assert gen.state == "ready"


def test_full_size_benchmark_configs_match_sdxl(monkeypatch):
    """The benchmark's inline configs build the real architecture (checked on the meta device: no memory)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    _, counts = bench.build_full_size(torch.float16, "cpu", meta_only=True)
    assert round(counts["unet"] / 1e9, 3) == 2.567
    assert round(counts["image_encoder"] / 1e9, 2) == 0.63   # ViT-H/14
    assert round(counts["text_encoder_2"] / 1e9, 2) == 0.69  # OpenCLIP bigG
    assert bench.tflop(1024, 1024, 1, 30, True) == pytest.approx(30 * 13.52 + 10.5)


@pytest.mark.parametrize("payload, error", [
    ({"lora": "nope"}, InvalidRequest),
    ({}, None),
    ({"quality_mode": "fast", "aspect_ratio": "16:9"}, None),
])
def test_validate_at_submit_time(tiny_generator, tiny_settings, payload, error):
    req = request(tiny_settings, **payload)
    if error:
        with pytest.raises(error, match="nope"):
            tiny_generator.validate(req)
    else:
        plan = tiny_generator.validate(req)
        assert plan["width"] % 8 == 0 and plan["steps"] >= 1
        json.dumps(plan)
