"""The FLUX family on the tiny FLUX (tiny-flux, offline): generation and its metadata, the fields that do
not apply to FLUX (and to SDXL), the three LoRA formats and the wrong family, true CFG, the persona builder
with both tokenizers, img2img, previews of the packed latents, cancel, the single-file fine-tune, schnell's
tuning, the identity-method seam, and the memory-mode decision table."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from generate_twin import GenerationRequest
from tests.fakes import FakeFluxIdentityMethod
from utils import errors
from utils.contracts import FamilyModel, FluxIdentityMethod
from utils.engine.families.flux import NO_IDENTITY_NOTE, FluxModel
from utils.engine.previews import FLUX_LATENT_RGB


def req(settings, **kw):
    return GenerationRequest.from_dict({"prompt": "a portrait photo", "style": "none", "seed": 11, **kw}, settings)


def pixels(result, i=0):
    return np.asarray(result.images[i], dtype=np.float32)


def test_a_flux_job_says_which_model_ran_and_that_it_had_no_identity(tiny_flux_generator, tiny_flux_settings):
    res = tiny_flux_generator.generate(req(tiny_flux_settings, num_images=2))
    m = res.metadata
    assert (m["family"], m["model"], m["flux_variant"], m["guidance"]) == ("flux", "tiny-flux", "dev", "embedded")
    assert m["identity"] is None and m["identity_note"] == NO_IDENTITY_NOTE and m["identity_strength"] == 0.0
    assert (m["steps"], m["guidance_scale"], m["max_sequence_length"], m["scheduler"]) == (3, 3.5, 512, "flow_match_euler")
    assert m["true_cfg"] is None and m["cost_factor"] == 1 and m["negative_prompt"] is None
    assert [im.size for im in res.images] == [(128, 128)] * 2 and m["seeds"] == [11, 12]
    again = tiny_flux_generator.generate(req(tiny_flux_settings, num_images=2))
    assert np.array_equal(pixels(res), pixels(again))       # same seed, same picture
    assert not np.array_equal(pixels(res, 0), pixels(res, 1))


def test_the_loaded_flux_model_satisfies_the_family_contract(tiny_flux_generator):
    from tests.helpers.contracts import protocol_incompatibilities
    model = tiny_flux_generator.model
    assert isinstance(model, FluxModel) and isinstance(model, FamilyModel)
    assert protocol_incompatibilities(FamilyModel, model) == {}
    info = tiny_flux_generator.info()
    assert (info["family"], info["variant"], info["method_fields"], info["memory"]["mode"]) == ("flux", "", [], "full")


@pytest.mark.parametrize("payload, field", [
    ({"negative_prompt": "blurry"}, "negative_prompt"),                      # no negative branch without true CFG
    ({"negative_prompt": "blurry", "true_cfg": 1.0}, "negative_prompt"),
    ({"style": "photoreal", "style_strength": 0.5}, "style_strength"),     # compel has no T5 support
    ({"identity_strength": 0.9}, "identity_strength"),                     # no identity method for FLUX yet
    ({"pose": "auto"}, "pose"),
    ({"pose_strength": 0.5}, "pose_strength"),
    ({"width": 136, "height": 128}, "width"),                              # 2x2 packing: multiples of 16
])
def test_a_field_that_does_not_apply_to_flux_is_refused_naming_field_and_family(tiny_flux_generator,
                                                                              tiny_flux_settings, payload, field):
    r = req(tiny_flux_settings, **payload)
    for call in (tiny_flux_generator.validate, tiny_flux_generator.generate):   # at submit and at run time
        with pytest.raises(errors.InvalidRequest) as e:
            call(r)
        assert e.value.code == "field_not_applicable" and e.value.http_status == 400
        assert e.value.message.startswith(f"{field}=") and "flux" in e.value.message


@pytest.mark.parametrize("payload, field", [
    ({"true_cfg": 2.0}, "true_cfg"),
    ({"pose": "three_quarter_left"}, "pose"),          # plus-face has no pose control
])
def test_a_flux_only_field_is_refused_on_sdxl(tiny_generator, tiny_settings, payload, field):
    with pytest.raises(errors.InvalidRequest) as e:
        tiny_generator.validate(req(tiny_settings, **payload))
    assert e.value.code == "field_not_applicable" and e.value.message.startswith(f"{field}=") and "sdxl" in e.value.message


def test_defaults_and_fields_that_apply_pass(tiny_flux_generator, tiny_flux_settings):
    plan = tiny_flux_generator.validate(req(tiny_flux_settings, style="photoreal", style_strength=1.0,
                                            negative_prompt="blurry", true_cfg=3.0, width=144, height=112))
    assert (plan["width"], plan["height"], plan["true_cfg"]) == (144, 112, 3.0)
    assert tiny_flux_generator.validate(req(tiny_flux_settings, aspect_ratio="3:4"))["width"] % 16 == 0


def test_true_cfg_runs_the_negative_prompt_at_twice_the_cost(tiny_flux_generator, tiny_flux_settings):
    plain = tiny_flux_generator.generate(req(tiny_flux_settings))
    cfg = tiny_flux_generator.generate(req(tiny_flux_settings, negative_prompt="blurry", true_cfg=4.0))
    m = cfg.metadata
    assert m["true_cfg"] == 4.0 and m["cost_factor"] == 2 and "twice the cost" in m["true_cfg_note"]
    assert m["negative_prompt"].startswith("blurry")
    assert np.abs(pixels(cfg) - pixels(plain)).mean() > 0.5


@pytest.mark.parametrize("lora, fmt", [
    ("tiny_flux_realism", "XLabs (double_blocks.N.processor.*)"),
    ("tiny_flux_kohya", "kohya (lora_unet_*)"),
    ("tiny_flux_style", "diffusers (transformer.*)"),
])
def test_each_flux_lora_format_loads_and_changes_the_picture(tiny_flux_generator, tiny_flux_settings, lora, fmt):
    assert lora in tiny_flux_generator.models.loras, fmt
    base = tiny_flux_generator.generate(req(tiny_flux_settings))
    styled = tiny_flux_generator.generate(req(tiny_flux_settings, lora=lora, lora_scale=1.0))
    assert styled.metadata["lora"] == lora
    assert np.abs(pixels(styled) - pixels(base)).mean() > 0.2, fmt
    off = tiny_flux_generator.generate(req(tiny_flux_settings, lora=lora, lora_scale=0.0))
    assert np.abs(pixels(off) - pixels(base)).max() <= 1.0     # scale 0: the LoRA adds nothing


@pytest.mark.parametrize("family, lora, other", [("flux", "tiny_style", "sdxl"), ("sdxl", "tiny_flux_realism", "flux")])
def test_a_lora_of_the_other_family_is_refused_naming_both(tiny_flux_generator, tiny_generator, family, lora, other):
    gen = tiny_flux_generator if family == "flux" else tiny_generator
    with pytest.raises(errors.InvalidRequest) as e:
        gen.validate(req(gen.settings, lora=lora))
    msg = e.value.message
    assert e.value.code == "lora_wrong_family" and f"lora={lora!r}" in msg and f"{other} family" in msg \
        and f"{family} family" in msg


def test_fast_mode_runs_the_8_step_lora_at_its_cards_scale(tiny_flux_generator, tiny_flux_settings):
    model = tiny_flux_generator.model
    plan = model.plan(req(tiny_flux_settings, quality_mode="fast"))
    assert ("flux_fast", 0.125) in plan["adapters"] and plan["fast_mode_fallback"] is False
    assert model.plan(req(tiny_flux_settings, quality_mode="high_fidelity"))["adapters"] == []
    res = tiny_flux_generator.generate(req(tiny_flux_settings, quality_mode="fast"))
    assert res.metadata["fast_mode_fallback"] is False


def test_persona_is_fitted_to_t5_and_to_clip_with_their_own_tokenizers(tiny_flux_generator, tiny_flux_settings):
    persona = {"name": "Ana", "age": 34, "traits": ["confident", "warm", "curious", "calm", "kind"]}
    attributes = {"gender": "female", "hair": "long wavy auburn", "eyes": "green", "outfit": "a navy wool coat",
                  "background": "a rainy street at night", "expression": "smiling", "skin_tone": "olive"}
    res = tiny_flux_generator.generate(req(tiny_flux_settings, persona=persona, attributes=attributes))
    built = res.metadata["prompt_builder"]
    pipe = tiny_flux_generator.models.pipe
    t5 = len(pipe.tokenizer_2(res.metadata["prompt"], add_special_tokens=False).input_ids)
    clip = len(pipe.tokenizer(res.metadata["prompt_clip"], add_special_tokens=False).input_ids)
    assert t5 <= 511 and clip <= 75                       # each inside its window (less its special tokens)
    assert built["dropped"] == [] and "named Ana" in res.metadata["prompt"]   # T5's 512 hold everything
    assert built["clip"]["dropped"] and built["clip"]["text"].startswith("a 34-year-old woman, olive skin")  # who first


def test_img2img_on_flux_starts_from_the_picture(tiny_flux_generator, tiny_flux_settings):
    from PIL import Image
    start = Image.new("RGB", (96, 160), (200, 40, 40))
    r = dataclasses.replace(req(tiny_flux_settings, init_image="data:image/png;base64,AAAA", strength=0.7),
                            init_pixels=start)
    res = tiny_flux_generator.generate(r)
    assert res.images[0].size == (128, 128) and res.metadata["img2img"]["strength"] == 0.7
    # FluxImg2ImgPipeline skips int(steps - steps x strength) steps: 3 - 2.1 -> 0 here, all 3 run
    assert res.metadata["img2img"]["denoise_steps"] == 3
    plain = tiny_flux_generator.generate(req(tiny_flux_settings))
    assert np.abs(pixels(res) - pixels(plain)).mean() > 0.5            # it started from the picture


def test_previews_unpack_the_16_channel_latents(tiny_flux_generator, tiny_flux_settings):
    from PIL import Image
    import io
    seen = []
    tiny_flux_generator.generate(req(tiny_flux_settings, preview=True, width=160, height=96),
                                 on_progress=lambda step, total, *p: seen.append((step, p)))
    jpegs = [p[0] for _, p in seen if p]
    assert jpegs and len(FLUX_LATENT_RGB.factors) == 16
    img = Image.open(io.BytesIO(jpegs[-1]))
    assert img.size[0] > img.size[1]                      # the latents' own aspect (160 x 96), unpacked
    model = tiny_flux_generator.model
    import torch
    packed = torch.zeros(1, (160 // 16) * (96 // 16), 64)
    assert tuple(model.preview_latents(packed, {"width": 160, "height": 96}).shape) == (1, 16, 12, 20)


def test_cancel_stops_a_flux_job_within_a_step(tiny_flux_generator, tiny_flux_settings):
    steps = []
    with pytest.raises(errors.JobCanceled):
        tiny_flux_generator.generate(req(tiny_flux_settings), on_progress=lambda s, t, *p: steps.append(s),
                                     should_cancel=lambda: bool(steps))
    assert steps == [1]


def test_flux_quality_rows_per_distillation():
    from utils.engine.tuning import flux_quality_row
    dev = {m: flux_quality_row(m, True) for m in ("fast", "balanced", "high_fidelity")}
    assert [(r["steps"], r["guidance_scale"], r["max_sequence_length"]) for r in dev.values()] == \
        [(8, 3.5, 512), (28, 3.5, 512), (50, 3.5, 512)] and dev["fast"]["few_step_lora"]
    schnell = {m: flux_quality_row(m, False) for m in ("fast", "balanced", "high_fidelity")}
    assert {(r["steps"], r["guidance_scale"], r["max_sequence_length"]) for r in schnell.values()} == {(4, 0.0, 256)}


@pytest.fixture(scope="module")
def schnell_generator(tiny_models, tiny_flux_settings, tmp_path_factory):
    """tiny-flux made schnell-shaped: its transformer without the guidance embedding (another random one)."""
    import torch
    from diffusers import FluxTransformer2DModel
    from generate_twin import DigitalTwinGenerator
    root = tmp_path_factory.mktemp("schnell") / "tiny-model"
    shutil.copytree(tiny_models, root)
    folder = root / "FLUX.1-dev" / "transformer"
    cfg = dict(FluxTransformer2DModel.load_config(str(folder)), guidance_embeds=False)
    torch.manual_seed(3)
    shutil.rmtree(folder)
    FluxTransformer2DModel.from_config(cfg).save_pretrained(str(folder), safe_serialization=True)
    return DigitalTwinGenerator(tiny_flux_settings.replace(tiny_model_dir=root, max_steps=0)).setup()


def test_schnell_runs_4_steps_without_guidance_in_every_mode(schnell_generator):
    info = schnell_generator.info()
    assert (info["flux_variant"], info["fast_mode"]) == ("schnell", "schnell")
    for mode in ("fast", "balanced"):
        res = schnell_generator.generate(req(schnell_generator.settings, quality_mode=mode))
        m = res.metadata
        assert (m["steps"], m["guidance"], m["max_sequence_length"], m["fast_mode_fallback"]) == (4, "none", 256, False)


def test_the_single_file_fine_tune_loads_against_the_folders_configs(tiny_flux_settings, tiny_models):
    from generate_twin import DigitalTwinGenerator
    gen = DigitalTwinGenerator(tiny_flux_settings).setup()
    base = gen.generate(req(tiny_flux_settings))
    out = gen.load_model("tiny-flux-alt")
    assert (out["family"], out["previous_family"], out["switched"]) == ("flux", "flux", True)
    alt = gen.generate(req(tiny_flux_settings))
    assert alt.metadata["model"] == "tiny-flux-alt" and np.abs(pixels(alt) - pixels(base)).mean() > 0.5


def test_an_identity_method_plugs_into_flux(tiny_flux_generator, tiny_flux_settings):
    method = FakeFluxIdentityMethod()
    assert isinstance(method, FluxIdentityMethod)
    model = FluxModel(tiny_flux_settings, tiny_flux_generator.models, identity_method=method)
    ident = model.build_identity(["crop"], None)
    model.check_identity(ident)
    r = req(tiny_flux_settings, identity_strength=0.9)
    model.check_request(r, {})                       # identity_strength applies once a method reads it
    r = r.with_identity(ident)
    plan = model.plan(r)
    kwargs = model.call_kwargs(r, plan, [1])
    images, _ = model.run(r, plan, kwargs, lambda p, i, t, kw: kw, {})
    assert images and method.calls == ["build", ("prepare", 0.9), "finish"] and kwargs["guidance_scale"] == 4.4
    assert "identity_note" not in model.call_metadata(r, plan) and model.info()["identity_method"] == "recording"
    with pytest.raises(errors.Conflict):
        FluxModel(tiny_flux_settings, tiny_flux_generator.models).check_identity(ident)   # none: 409, never used


# --- memory modes (TWIN_FLUX_MEMORY): the decision with injected GPU facts ----------------------------------
H100 = ("NVIDIA H100 80GB HBM3", 79.1, (9, 0))
A100_40 = ("NVIDIA A100-SXM4-40GB", 39.4, (8, 0))
L4 = ("NVIDIA L4", 22.0, (8, 9))
A10G = ("NVIDIA A10G", 22.0, (8, 6))
T4 = ("Tesla T4", 14.6, (7, 5))
RTX_12 = ("NVIDIA RTX A2000 12GB", 11.8, (8, 6))
TORCHAO, BNB = ["torchao-fp8", "torchao-int8"], ["bnb-nf4"]


@pytest.mark.parametrize("requested, gpu, backends, mode, backend, why", [
    ("auto", H100, TORCHAO, "full", None, "bf16 needs ~37.3 GiB"),
    ("auto", A100_40, TORCHAO, "full", None, "has 39.4 GiB"),
    ("auto", L4, TORCHAO, "quantized", "torchao-fp8", "torchao-fp8 weights need"),   # sm 8.9 has fp8 units
    ("auto", A10G, TORCHAO, "quantized", "torchao-int8", "torchao-int8 weights need ~20"),
    ("auto", A10G, [], "offload", None, "no quantization backend is installed"),
    ("auto", T4, TORCHAO + BNB, "quantized", "bnb-nf4", "torchao-int8 would need ~20"),   # the first that fits
    ("auto", T4, BNB, "quantized", "bnb-nf4", "bnb-nf4 weights need ~12"),
    ("auto", RTX_12, TORCHAO, "offload", None, "torchao-int8 would need ~20"),
    ("full", A10G, TORCHAO, "full", None, "TWIN_FLUX_MEMORY=full"),
    ("offload", H100, [], "offload", None, "TWIN_FLUX_MEMORY=offload"),
    ("quantized", H100, TORCHAO, "quantized", "torchao-fp8", "TWIN_FLUX_MEMORY=quantized"),
    ("auto", None, [], "full", None, "CPU"),
    ("full", None, [], "full", None, "CPU"),
])
def test_memory_mode_decision_table(requested, gpu, backends, mode, backend, why):
    from utils.models.flux_memory import GpuFacts, decide
    parts = real_flux_gib()
    plan = decide(requested, None if gpu is None else GpuFacts(*gpu), parts, backends)
    assert (plan.mode, plan.backend) == (mode, backend) and why in plan.reason, plan


@pytest.mark.parametrize("requested, gpu, backends, needle", [
    ("quantized", None, TORCHAO, "needs a CUDA GPU"),
    ("offload", None, [], "needs a CUDA GPU"),
    ("quantized", A10G, [], "requirements-gpu.txt"),
])
def test_memory_modes_that_cannot_run_stop_start_up(requested, gpu, backends, needle):
    from utils.models.flux_memory import GpuFacts, decide
    with pytest.raises(errors.ConfigError, match=needle):
        decide(requested, None if gpu is None else GpuFacts(*gpu), real_flux_gib(), backends)


def real_flux_gib() -> dict[str, float]:
    """FLUX.1-dev's components in bf16, from their parameter counts (test_flux_models measures them)."""
    counts = {"transformer": 11_901_408_320, "text_encoder_2": 4_762_310_656, "text_encoder": 123_060_480,
              "vae": 83_819_683}
    return {k: 2 * n / 1024 ** 3 for k, n in counts.items()}
