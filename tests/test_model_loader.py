"""Model profiles: tiny model build/reload, adapter variants, real-weight resolution and download plan."""
from __future__ import annotations

import fnmatch
import logging

import pytest
import torch
from safetensors.torch import load_file

import model_loader as ml
from generate_twin import DigitalTwinGenerator
from utils.errors import ModelWeightsMissing


@pytest.mark.parametrize("relpath", [
    "stable-diffusion-xl-base-1.0/model_index.json",
    "stable-diffusion-xl-base-1.0/unet/diffusion_pytorch_model.safetensors",
    "stable-diffusion-xl-base-1.0/tokenizer_2/vocab.json",
    "IP-Adapter/sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors",
    "IP-Adapter/sdxl_models/ip-adapter_sdxl_vit-h.safetensors",
    "IP-Adapter/models/image_encoder/config.json",
    "IP-Adapter-FaceID/ip-adapter-faceid_sdxl.safetensors",
    "SDXL-Lightning/tiny_lightning_4step_lora.safetensors",
    "loras/tiny_style.safetensors",
    "face_restore/gfpgan_1.4.onnx",          # restoration stand-ins, named as the public exports
    "face_restore/codeformer.onnx",
    "face_restore/gpen_bfr_512.onnx",
])
def test_tiny_folder_mirrors_real_repo_layout(tiny_models, relpath):
    assert (tiny_models / relpath).is_file()


def test_tiny_model_is_small(tiny_models):
    # The second base model (checkpoints/tiny-alt.safetensors, fp16 single file) has its own bound, and so has
    # tiny-flux (its folder, LoRAs, 8-step LoRA and single file), so the rest keeps the bound it had before.
    alt = tiny_models / ml.CHECKPOINT_DIR / ml.TINY_ALT_CHECKPOINT
    flux = [f for f in tiny_models.rglob("*") if f.is_file() and ("FLUX.1-dev" in f.parts or "Hyper-SD" in f.parts
                                                                  or "flux" in f.name)]
    # InfiniteYou's stand-ins (both stages + IR-SE) have their own bound too.
    infu = [f for f in tiny_models.rglob("*") if f.is_file() and ({"InfiniteYou", "facexlib"} & set(f.parts))]
    size = sum(f.stat().st_size for f in tiny_models.rglob("*")
               if f.is_file() and f != alt and f not in flux and f not in infu)
    assert size < 25e6
    assert alt.stat().st_size < 4e6
    assert 0 < sum(f.stat().st_size for f in flux) < 4e6
    assert 0 < sum(f.stat().st_size for f in infu) < 4e6


def test_tiny_build_is_deterministic(tiny_models, tmp_path):
    again = ml.make_tiny(tmp_path / "again")
    for rel in ("stable-diffusion-xl-base-1.0/unet/diffusion_pytorch_model.safetensors",
                "IP-Adapter/sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors",
                "loras/tiny_style.safetensors"):
        a, b = load_file(tiny_models / rel), load_file(again / rel)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), rel


@pytest.mark.parametrize("names, files", [
    (["gfpgan"], ["gfpgan_1.4.onnx"]),
    (["codeformer", "gpen"], ["codeformer.onnx", "gpen_bfr_512.onnx"]),
])
def test_download_restore_fetches_the_named_onnx_exports(tiny_settings, tmp_path, names, files):
    calls = []

    def fake_hf_hub_download(*, repo_id, filename, local_dir):
        calls.append((repo_id, filename, local_dir))
        return f"{local_dir}/{filename}"
    settings = tiny_settings.replace(model_dir=tmp_path)
    ml.download_restore(settings, names, hf_hub_download=fake_hf_hub_download)
    assert calls == [("facefusion/models-3.0.0", f, str(tmp_path / "face_restore")) for f in files]


@pytest.mark.parametrize("variant, projection, faceid_lora", [
    ("plus-face", "IPAdapterPlusImageProjection", False),
    ("plain", "ImageProjection", False),
    ("faceid", "IPAdapterFaceIDImageProjection", True),
])
def test_each_adapter_variant_loads_through_the_real_loader(variant_generator, variant, projection, faceid_lora):
    gen = variant_generator(variant)   # set up by DigitalTwinGenerator.setup(), once per session
    unet = gen.models.pipe.unet
    layers = unet.encoder_hid_proj.image_projection_layers
    assert [type(x).__name__ for x in layers] == [projection]
    assert bool(gen.adapter.faceid_adapters) == faceid_lora
    assert (gen.models.pipe.image_encoder is None) == (variant == "faceid")
    assert gen.info()["variant"] == variant and gen.state == "ready"


def test_tiny_profile_builds_its_folder_on_first_setup(tmp_path, caplog):
    from utils.config import Settings
    s = Settings(data_dir=tmp_path, model_dir=tmp_path / "none", model_profile="tiny", warmup=False)
    with caplog.at_level(logging.WARNING, logger="twin.models"):
        gen = DigitalTwinGenerator(s).setup()
    assert (tmp_path / "tiny-model" / "tiny_model.json").is_file()
    assert gen.info()["is_demo"] is True
    assert "NOT portraits" in caplog.text


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path


def test_missing_real_weights_raise_one_clear_error(tiny_settings, empty_hf_cache):
    s = tiny_settings.replace(model_profile="sdxl", model_dir=empty_hf_cache / "models")
    gen = DigitalTwinGenerator(s)
    with pytest.raises(ModelWeightsMissing) as e:
        gen.setup()
    msg = e.value.message
    for needle in ("stabilityai/stable-diffusion-xl-base-1.0", "h94/IP-Adapter", str(empty_hf_cache / "models"),
                   "Hugging Face cache", "python model_loader.py download",
                   "ip-adapter-plus-face_sdxl_vit-h.safetensors"):
        assert needle in msg
    assert gen.state == "setup_failed"
    assert gen.info()["error"]["code"] == "model_weights_missing"


def test_auto_profile_falls_back_to_tiny_with_warning(tiny_settings, empty_hf_cache, caplog):
    s = tiny_settings.replace(model_profile="auto", model_dir=empty_hf_cache / "models")
    with caplog.at_level(logging.WARNING, logger="twin.models"):
        assert ml.choose_profile(s) == "tiny"
    assert "NOT portraits" in caplog.text


def test_auto_profile_picks_sdxl_when_weights_are_on_disk(tiny_settings, tmp_path, empty_hf_cache):
    s = tiny_settings.replace(model_profile="auto", model_dir=tmp_path / "models")
    for spec in ml.repo_specs(s):
        for rel in spec.required:
            p = tmp_path / "models" / spec.local_name / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"x")
    assert ml.choose_profile(s) == "sdxl"
    w = ml.resolve_sdxl(s)
    assert w.base == tmp_path / "models" / ml.BASE_DIR


@pytest.mark.parametrize("faceid, lightning, repos", [
    (False, False, ["stabilityai/stable-diffusion-xl-base-1.0", "h94/IP-Adapter"]),
    (False, True, ["stabilityai/stable-diffusion-xl-base-1.0", "h94/IP-Adapter", "ByteDance/SDXL-Lightning"]),
    (True, True, ["stabilityai/stable-diffusion-xl-base-1.0", "h94/IP-Adapter", "h94/IP-Adapter-FaceID",
                  "ByteDance/SDXL-Lightning"]),
])
def test_download_fetches_exactly_the_needed_files(tiny_settings, tmp_path, faceid, lightning, repos):
    calls = []
    ml.download(tiny_settings.replace(model_dir=tmp_path), faceid=faceid, lightning=lightning,
                snapshot_download=lambda **kw: calls.append(kw))
    assert [c["repo_id"] for c in calls] == repos
    base = calls[0]["allow_patterns"]
    # SDXL weights: fp16 safetensors only, one per component (no fp32 copies, no .bin, no ONNX/flax).
    repo_files = [  # a sample of the real repo's file list
        "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin", "unet/openvino_model.bin", "text_encoder/model.onnx",
        "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
        "vae_decoder/model.onnx", "sd_xl_base_1.0.safetensors", "sd_xl_offset_example-lora_1.0.safetensors",
        "text_encoder_2/model.fp16.safetensors", "tokenizer/vocab.json", "model_index.json",
    ]
    chosen = sorted(f for f in repo_files if any(fnmatch.fnmatch(f, p) for p in base))
    assert chosen == ["model_index.json", "text_encoder/model.fp16.safetensors", "text_encoder_2/model.fp16.safetensors",
                      "tokenizer/vocab.json", "unet/diffusion_pytorch_model.fp16.safetensors",
                      "vae/diffusion_pytorch_model.fp16.safetensors"]
    ipa = calls[1]["allow_patterns"]
    assert "sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors" in ipa
    assert "models/image_encoder/model.safetensors" in ipa
    assert not any("*" in p for p in ipa)
    assert all(c["local_dir"].startswith(str(tmp_path)) for c in calls)


@pytest.mark.parametrize("device, dtype, expected", [
    ("auto", "auto", ("cpu", torch.float32)),
    ("cpu", "bfloat16", ("cpu", torch.bfloat16)),
    ("cpu", "float32", ("cpu", torch.float32)),
])
def test_device_and_dtype(tiny_settings, device, dtype, expected):
    assert ml.choose_device_dtype(tiny_settings.replace(device=device, dtype=dtype)) == expected


@pytest.mark.parametrize("device, dtype, needle", [
    ("cpu", "float16", "float16"),
    ("cuda", "auto", "cuda"),
])
def test_unusable_device_or_dtype_is_a_clear_error(tiny_settings, device, dtype, needle):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelWeightsMissing, match=needle):
        ml.choose_device_dtype(tiny_settings.replace(device=device, dtype=dtype))


def test_scheduler_is_dpmpp_karras(tiny_generator):
    sched = tiny_generator.model.schedulers["dpmpp_2m_karras"]
    assert type(sched).__name__ == "DPMSolverMultistepScheduler"
    assert sched.config.use_karras_sigmas and sched.config.algorithm_type == "dpmsolver++"
    fast = tiny_generator.model.schedulers["euler_trailing"]
    assert fast.config.timestep_spacing == "trailing"


@pytest.fixture(scope="module")
def fake_real_model_dir(tiny_models, tmp_path_factory):
    """The tiny weights under the real repos' file names (fp16 variant names, real adapter/LoRA names), so
    the sdxl profile's own resolution and loading code runs offline."""
    import shutil
    from diffusers import StableDiffusionXLPipeline
    d = tmp_path_factory.mktemp("fake-real") / "models"
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_models / ml.BASE_DIR))
    pipe.save_pretrained(str(d / ml.BASE_DIR), variant="fp16")
    for sub in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(d / ml.BASE_DIR / sub)
        shutil.copytree(tiny_models / ml.BASE_DIR / sub, d / ml.BASE_DIR / sub)
    shutil.copytree(tiny_models / ml.IPA_DIR, d / ml.IPA_DIR)
    (d / ml.LIGHTNING_DIR).mkdir()
    shutil.copy(tiny_models / ml.LIGHTNING_DIR / ml.LIGHTNING_WEIGHT_TINY,
                d / ml.LIGHTNING_DIR / "sdxl_lightning_4step_lora.safetensors")
    shutil.copytree(tiny_models / ml.LORA_DIR, d / ml.LORA_DIR)
    return d


def test_sdxl_profile_loads_real_file_layout_from_model_dir(tiny_settings, fake_real_model_dir, empty_hf_cache):
    s = tiny_settings.replace(model_profile="auto", model_dir=fake_real_model_dir, max_steps=2)
    assert ml.choose_profile(s) == "sdxl"
    gen = DigitalTwinGenerator(s).setup()
    info = gen.info()
    assert (info["profile"], info["is_demo"], info["model_name"], info["native_resolution"]) == \
        ("sdxl", False, "stabilityai/stable-diffusion-xl-base-1.0", 1024)
    assert info["fast_mode"] == "few-step-lora" and info["loras"] == ["tiny_style"]
    assert "h94/IP-Adapter-FaceID" not in " ".join(info["notes"])  # faceid is not asked for
    from generate_twin import GenerationRequest
    from tests.fixtures.models import make_crops
    ident = gen.build_identity(make_crops(2), None, face_model=None)
    req = GenerationRequest.from_dict({"prompt": "p", "width": 64, "height": 64, "seed": 1}, s).with_identity(ident)
    r = gen.generate(req)
    assert r.images[0].size == (64, 64) and r.metadata["profile"] == "sdxl"


@pytest.mark.parametrize("has_lora, variant, fused", [
    (False, "plus-face", True),
    (True, "plus-face", False),
    (False, "faceid", False),
])
def test_fuse_qkv_keeps_ip_adapter_and_never_bypasses_loras(tiny_models, tiny_settings, has_lora, variant, fused):
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_models / ml.BASE_DIR))
    notes = ml.apply_cuda_optimisations(pipe, tiny_settings.replace(fuse_qkv=True, ip_adapter_variant=variant),
                                        has_lora=has_lora)
    assert bool(notes) == (not fused)
    repo, sub, _, enc = ml.ADAPTER_FILES["plus-face"]
    pipe.load_ip_adapter(str(tiny_models / repo), subfolder=sub, weight_name=ml.tiny_adapter_weight("plus-face"),
                         image_encoder_folder=enc)
    procs = {k: type(v).__name__ for k, v in pipe.unet.attn_processors.items()}
    assert all(v == "IPAdapterAttnProcessor2_0" for k, v in procs.items() if k.endswith("attn2.processor"))
    self_attn = {v for k, v in procs.items() if k.endswith("attn1.processor")}
    assert self_attn == ({"FusedAttnProcessor2_0"} if fused else {"AttnProcessor2_0"})


# --- the one profile -> folders answer (utils/models/layout.py) ----------------------------------
@pytest.mark.parametrize("profile, variant, adapter_file, lightning_file", [
    ("tiny", "plus-face", "IP-Adapter/sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors",
     "SDXL-Lightning/tiny_lightning_4step_lora.safetensors"),
    ("tiny", "faceid", "IP-Adapter-FaceID/ip-adapter-faceid_sdxl.safetensors",          # tiny: safetensors
     "SDXL-Lightning/tiny_lightning_4step_lora.safetensors"),
    ("sdxl", "faceid", "IP-Adapter-FaceID/ip-adapter-faceid_sdxl.bin", "SDXL-Lightning/sdxl_lightning_4step_lora.safetensors"),
    ("sdxl", "instantid", "InstantID/ip-adapter.bin", "SDXL-Lightning/sdxl_lightning_4step_lora.safetensors"),
])
def test_model_layout_names_every_folder_of_the_profile(tmp_path, empty_hf_cache, profile, variant, adapter_file,
                                                       lightning_file):
    from utils.config import Settings
    from utils.models.layout import model_layout
    s = Settings(data_dir=tmp_path / "d", model_dir=tmp_path / "m", model_profile=profile, ip_adapter_variant=variant)
    layout = model_layout(s)
    top = s.resolved_tiny_model_dir if profile == "tiny" else tmp_path / "m"
    assert layout.profile == profile and layout.variant == variant
    assert (layout.adapter_file, layout.lightning_file) == (top / adapter_file, top / lightning_file)
    assert (layout.base, layout.checkpoints, layout.restore_dir) == (top / ml.BASE_DIR, top / "checkpoints",
                                                                   top / "face_restore")
    assert layout.fp16 == (profile == "sdxl") and layout.model_name == ("tiny-sdxl" if profile == "tiny"
                                                                        else s.sdxl_model_id)
    # Nothing is on disk: the sdxl layout says what is missing (and refuses to load), the tiny one is built later.
    assert bool(layout.missing) == (profile == "sdxl")
    if profile == "sdxl":
        with pytest.raises(ModelWeightsMissing, match=ml.download_flag(variant) or "download --dir"):
            layout.require()


@pytest.mark.parametrize("safety_dir", [None, "nsfw"])
def test_download_fetches_the_safety_classifier(tiny_settings, tmp_path, safety_dir):
    from utils.models.download import download_classifier
    calls = []
    s = tiny_settings.replace(model_dir=tmp_path / "models",
                              safety_model_dir=None if safety_dir is None else tmp_path / safety_dir)
    target = download_classifier(s, snapshot_download=lambda **kw: calls.append(kw))
    assert calls == [{"repo_id": "Falconsai/nsfw_image_detection", "local_dir": str(target),
                      "allow_patterns": ["config.json", "model.safetensors", "preprocessor_config.json"]}]
    assert target == (tmp_path / "models" / "nsfw_image_detection" if safety_dir is None else tmp_path / safety_dir)
