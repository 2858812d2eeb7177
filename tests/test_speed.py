"""The speed plan (utils/engine/speed) on the tiny profile: settings refuse bad values naming them, the
quantization choice by device, each mode runs and gives the eager image within the tolerance measured here
(bench/bench_speed.py prints the figures), the compile cache folder, and the "warming" state."""
from __future__ import annotations

import importlib.util
import logging
from types import SimpleNamespace

import numpy as np
import pytest

from tests.fixtures.models import make_crops
from utils.config import Settings
from utils.engine.generator import DigitalTwinGenerator
from utils.engine.request import GenerationRequest
from utils.engine.speed import Device, resolve_quantize, speed_plan
from utils.errors import ConfigError

CPU = Device("cpu")
H100 = Device("cuda", "NVIDIA H100 80GB HBM3", (9, 0))
A100 = Device("cuda", "NVIDIA A100-SXM4-80GB", (8, 0))
A10G = Device("cuda", "NVIDIA A10G", (8, 6))
T4 = Device("cuda", "Tesla T4", (7, 5))
# Largest pixel difference (0-255) from the eager image, tiny model, 3 steps, seed 7, with an identity.
# Measured (these conditions, torch 2.13 CPU, torchao 0.18): regional 1, step cache k=2 3, k=3 4, int8 9;
# the bounds leave room for another CPU's rounding.
TOLERANCE = {"regional": 3, "step_cache_2": 8, "step_cache_3": 10, "int8": 16}


@pytest.mark.parametrize("env, named", [
    ({"TWIN_COMPILE": "fast"}, "TWIN_COMPILE='fast'"),
    ({"TWIN_QUANTIZE": "int4"}, "TWIN_QUANTIZE='int4'"),
    ({"TWIN_STEP_CACHE": "11"}, "TWIN_STEP_CACHE=11"),
    ({"TWIN_STEP_CACHE": "two"}, "TWIN_STEP_CACHE='two'"),
    ({"TWIN_COMPILE_MAX_RECOMPILES": "-1"}, "TWIN_COMPILE_MAX_RECOMPILES=-1"),
    ({"TWIN_COMPILE_WARMUP": "1024x1023x1"}, "'1024x1023x1'"),
    ({"TWIN_COMPILE_WARMUP": "1024x1024x1,big"}, "'big'"),
    ({"TWIN_COMPILE_WARMUP": "64x64x5"}, "'64x64x5'"),
    ({"TWIN_COMPILE": "full", "TWIN_STEP_CACHE": "2"}, "TWIN_STEP_CACHE=2"),
    ({"TWIN_VAE_FP16_FIX": "maybe"}, "TWIN_VAE_FP16_FIX='maybe'"),
])
def test_bad_speed_settings_are_refused_naming_them(env, named):
    with pytest.raises(ConfigError) as e:
        Settings.from_env(env)
    assert named in e.value.message


@pytest.mark.parametrize("env, mode, shapes", [
    ({}, "off", []),
    ({"TWIN_TORCH_COMPILE": "1"}, "full", []),               # the deprecated alias still works
    ({"TWIN_TORCH_COMPILE": "1", "TWIN_COMPILE": "regional"}, "regional", []),
    ({"TWIN_COMPILE": "regional", "TWIN_COMPILE_WARMUP": "1024x1024x1, 832x1216x4"}, "regional",
     [(1024, 1024, 1), (832, 1216, 4)]),
])
def test_compile_mode_and_warmup_shapes(env, mode, shapes):
    s = Settings.from_env(env)
    assert (s.compile_mode, s.compile_warmup_shapes) == (mode, shapes)
    notes = speed_plan(s, CPU).notes
    assert any("TWIN_TORCH_COMPILE is deprecated" in n for n in notes) == (env == {"TWIN_TORCH_COMPILE": "1"})


@pytest.mark.parametrize("setting, device, want", [
    ("auto", CPU, "none"), ("auto", H100, "fp8"), ("auto", A100, "int8"), ("auto", A10G, "int8"),
    ("auto", T4, "none"), ("int8", CPU, "int8"), ("fp8", H100, "fp8"), ("none", H100, "none"),
])
def test_quantization_by_device(setting, device, want):
    assert resolve_quantize(setting, device)[0] == want


@pytest.mark.parametrize("device, named", [(CPU, "the CPU"), (A10G, "NVIDIA A10G (compute capability 8.6)"),
                                           (T4, "Tesla T4")])
def test_fp8_is_refused_where_there_are_no_fp8_units(device, named):
    with pytest.raises(ConfigError) as e:
        resolve_quantize("fp8", device)
    assert "TWIN_QUANTIZE=fp8" in e.value.message and named in e.value.message


def test_auto_quantization_on_the_cpu_says_why():
    quantize, why = resolve_quantize("auto", CPU)
    assert quantize == "none" and "none on the CPU" in why


@pytest.mark.parametrize("family, applied", [("sdxl", True), ("flux", False)])
def test_plan_names_switches_another_family_runs_without(family, applied):
    plan = speed_plan(Settings(quantize="int8", step_cache=2), CPU, family)
    assert (plan.quantize == "int8", plan.step_cache == 2) == (applied, applied)
    assert any("SDXL only" in n for n in plan.notes) != applied


# --- on the tiny model -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def identity(tiny_generator):
    return tiny_generator.build_identity(make_crops(3), None, face_model=None)


def pixels(gen, identity, **kw):
    req = GenerationRequest.from_dict({"prompt": "a portrait of a person", "seed": 7, "style": "none", **kw},
                                      gen.settings).with_identity(identity)
    return np.stack([np.asarray(im, dtype=np.int16) for im in gen.generate(req).images])


@pytest.fixture(scope="module")
def eager(tiny_generator, identity):
    return pixels(tiny_generator, identity), pixels(tiny_generator, None)


def build(tiny_settings, **changes):
    return DigitalTwinGenerator(tiny_settings.replace(**changes)).setup()


@pytest.mark.parametrize("every", [2, 3])
def test_step_cache_matches_eager_within_tolerance(tiny_settings, identity, eager, every):
    gen = build(tiny_settings, step_cache=every)
    got = pixels(gen, identity)
    assert np.abs(got - eager[0]).max() <= TOLERANCE[f"step_cache_{every}"]
    assert np.array_equal(got, pixels(gen, identity))      # nothing is carried from one call to the next
    cache = gen.info()["optimizations"]["step_cache"]
    # 3 steps per call: k=2 runs steps 0 and 2 in full, k=3 step 0 only
    assert cache == {"every": every, "full_steps": 2 * (2 if every == 2 else 1),
                     "reused_steps": 2 * (1 if every == 2 else 2)}


def test_step_cache_starts_over_for_another_batch(tiny_settings, identity):
    gen = build(tiny_settings, step_cache=2)
    one = pixels(gen, identity)
    two = pixels(gen, identity, num_images=2)      # another latent shape: a full first step, no stale features
    assert np.abs(two[:1] - one).max() <= 2          # batched matmuls round differently in the last bit


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                    reason="torchao (requirements-gpu.txt) is not installed in this environment")
def test_int8_matches_eager_and_keeps_the_identity_effect(tiny_settings, identity, eager):
    gen = build(tiny_settings, quantize="int8")
    assert gen.info()["optimizations"]["quantized_layers"] > 0
    with_id, without = pixels(gen, identity), pixels(gen, None)
    assert np.abs(with_id - eager[0]).max() <= TOLERANCE["int8"]
    # The identity still moves the image as much as unquantized (its adapter layers are not quantized).
    effect, effect_eager = np.abs(with_id - without).mean(), np.abs(eager[0] - eager[1]).mean()
    assert effect > 0 and abs(effect - effect_eager) <= 0.2 * effect_eager


def test_regional_compile_warms_up_caches_and_matches_eager(tiny_settings, identity, eager, tmp_path, caplog):
    cache = tmp_path / "compile-cache"
    (cache / "torch-0.1-other-gpu").mkdir(parents=True)          # another torch's kernels: ignored, named
    gen = DigitalTwinGenerator(tiny_settings.replace(compile="regional", compile_cache_dir=cache))
    states = []
    gen.on_state = states.append
    with caplog.at_level(logging.INFO, logger="twin.speed"):
        gen.setup()
    assert states == ["warming"] and gen.state == "ready"
    assert any("ignoring caches of another torch" in r.getMessage() for r in caplog.records)
    opt = gen.info()["optimizations"]
    assert opt["compiled"] == "unet transformer blocks" and opt["warmup_seconds"] > 0
    assert opt["recompile_limit"] >= tiny_settings.compile_max_recompiles
    used = next(p for p in cache.iterdir() if p.name.startswith("torch-2"))
    assert opt["compile_cache_dir"] == str(used) and (used / "stamp.json").is_file()
    assert len(list(used.rglob("*"))) > 1                        # inductor wrote its kernels there
    from torch._dynamo.utils import counters
    graphs = counters["stats"]["unique_graphs"]
    assert np.abs(pixels(gen, identity) - eager[0]).max() <= TOLERANCE["regional"]
    pixels(gen, identity, identity_strength=1.3)
    assert counters["stats"]["unique_graphs"] == graphs       # the warm-up compiled what requests meet
    pixels(gen, identity, num_images=2)                        # a batch the warm-up did not run: once
    pixels(gen, identity, num_images=3)
    assert graphs < counters["stats"]["unique_graphs"] <= graphs + 1


def test_a_loaded_sdxl_model_is_optimizable(tiny_generator):
    from utils import contracts
    assert isinstance(tiny_generator.model, contracts.Optimizable)
    assert not isinstance(object(), contracts.Optimizable)
    assert tiny_generator.model.warmup_shapes() == []            # nothing compiled: one plain warm-up call


def test_unreadable_cache_stamp_is_emptied_not_a_crash(tmp_path, caplog):
    from utils.engine.speed.compile import cache_key, prepare_cache
    folder = tmp_path / cache_key(CPU)
    folder.mkdir()
    (folder / "stamp.json").write_text("{not json")
    (folder / "junk.bin").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="twin.speed"):
        assert prepare_cache(tmp_path, CPU) == folder
    assert not (folder / "junk.bin").exists() and (folder / "stamp.json").is_file()
    assert any("stale or unreadable" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("runtime_state, engine_state, shown", [
    ("starting", "starting", "starting"), ("starting", "warming", "warming"), ("ready", "ready", "ready"),
    ("ready", "warming", "warming"),    # a restarted generator process warming up again
])
def test_health_says_warming(runtime_state, engine_state, shown):
    from utils.service.status import health
    engine = SimpleNamespace(state=engine_state, error=None, model_error=None)
    storage = SimpleNamespace(backend="local", ping=lambda: None)
    rt = SimpleNamespace(state=runtime_state, started_at=0.0, settings=Settings(), setup_error=None,
                         draining=False, holds_models=True, engines=[engine], store=object(), storage=storage,
                         model_info=lambda: {})
    assert health(rt)["state"] == shown


def test_system_status_lists_the_optimizations_in_force(tiny_settings, tmp_path):
    from app import create_app
    settings = tiny_settings.replace(data_dir=tmp_path / "data", step_cache=2, vae_slicing=True, quantize="auto")
    app = create_app(settings)
    runtime = app.extensions["twin"]
    try:
        assert runtime.wait_ready(120), runtime.setup_error
        opt = app.test_client().get("/system-status").get_json()["optimizations"]
    finally:
        runtime.shutdown()
    assert (opt["compile"], opt["quantize"], opt["vae"], opt["vae_slicing"]) == ("off", "none", "stock", True)
    assert opt["step_cache"]["every"] == 2
    assert any("none on the CPU" in n for n in opt["notes"])


class SlowWarmingEngine(DigitalTwinGenerator):
    """The engine with a warm-up long enough to be seen from the parent of a generator process."""

    def _warm_up(self, shapes) -> None:
        super()._warm_up(shapes)
        import time
        time.sleep(2.0)


def test_a_generator_process_reports_warming_then_ready(tiny_settings, tmp_path):
    import threading
    from tests.helpers.wait import wait_until
    from utils.jobs.local.generator_process import GeneratorProcess
    gp = GeneratorProcess(tiny_settings.replace(data_dir=tmp_path, warmup=True), engine_class=SlowWarmingEngine)
    seen = []
    t = threading.Thread(target=gp.setup)
    t.start()
    try:
        assert wait_until(lambda: seen.append(gp.state) or gp.state == "warming", 120, 0.02)
        t.join(120)
        assert gp.state == "ready" and seen[0] == "starting"
    finally:
        gp.close()


def test_fp8_on_the_cpu_fails_set_up_with_the_reason(tiny_settings):
    gen = DigitalTwinGenerator(tiny_settings.replace(quantize="fp8"))
    with pytest.raises(ConfigError):
        gen.setup()
    assert gen.state == "setup_failed"
    assert "TWIN_QUANTIZE=fp8 needs a GPU with fp8 units" in gen.error.message and "the CPU" in gen.error.message
