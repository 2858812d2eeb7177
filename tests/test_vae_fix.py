"""The fp16-fix SDXL VAE (TWIN_VAE_FP16_FIX, utils/models/vae_fix.py): download, preflight and load through
the model package, with the tiny profile's stand-in in the real layout; VAE slicing / tiling switches."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import model_loader as ml
from utils.engine.generator import DigitalTwinGenerator
from utils.engine.request import GenerationRequest
from utils.errors import ModelWeightsMissing
from utils.models.layout import model_layout
from utils.models.vae_fix import VAE_FIX_DIR, load_vae_fix, verify_vae_fix


def image(gen):
    req = GenerationRequest.from_dict({"prompt": "a portrait", "seed": 3, "style": "none"}, gen.settings)
    return np.asarray(gen.generate(req).images[0], dtype=np.int16)


@pytest.fixture(scope="module")
def fixed(tiny_settings):
    return DigitalTwinGenerator(tiny_settings.replace(vae_fp16_fix=True, vae_slicing=True)).setup()


def test_tiny_loads_the_standin_in_the_real_layout_and_never_upcasts(fixed, tiny_settings, tiny_models):
    folder = tiny_models / VAE_FIX_DIR
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    vae = fixed.models.pipe.vae
    assert vae.config.force_upcast is False and vae.use_slicing
    opt = fixed.info()["optimizations"]
    assert (opt["vae"], opt["vae_slicing"]) == ("fp16-fix", True)
    assert model_layout(tiny_settings.replace(vae_fp16_fix=True)).vae_fix == folder


def test_same_image_as_the_stock_vae_in_fp32(fixed, tiny_generator):
    # The stand-in holds the tiny VAE's weights and fp32 never upcasts: only the loading path differs.
    assert np.array_equal(image(fixed), image(tiny_generator))


@pytest.mark.parametrize("on, repos", [(False, []), (True, ["madebyollin/sdxl-vae-fp16-fix"])])
def test_download_fetches_it_when_asked(tiny_settings, tmp_path, on, repos):
    calls = []
    ml.download(tiny_settings.replace(model_dir=tmp_path), lightning=False, vae_fix=on,
                snapshot_download=lambda **kw: calls.append(kw))
    got = [c for c in calls if c["repo_id"] == "madebyollin/sdxl-vae-fp16-fix"]
    assert [c["repo_id"] for c in got] == repos
    for c in got:
        assert c["allow_patterns"] == ["config.json", "diffusion_pytorch_model.safetensors"]
        assert c["local_dir"] == str(tmp_path / VAE_FIX_DIR)


@pytest.mark.parametrize("breakage, status, named", [
    (None, "ok", ""),
    ("no-weights", "missing", "diffusion_pytorch_model.safetensors"),
    ("latent_channels", "wrong_shape", "latent_channels=16"),
    ("truncated", "corrupt", ""),
])
def test_preflight_checks_the_fixed_vae(fixed, tiny_models, tmp_path, breakage, status, named):
    folder = tmp_path / VAE_FIX_DIR
    shutil.copytree(tiny_models / VAE_FIX_DIR, folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    if breakage == "no-weights":
        weights.unlink()
    elif breakage == "latent_channels":
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "latent_channels": 16}))
    elif breakage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    (check,) = verify_vae_fix(folder, tiny_models / "stable-diffusion-xl-base-1.0" / "vae")
    assert check.status == status and named in check.path + check.detail


def test_missing_folder_names_the_download_command(tmp_path):
    import torch
    with pytest.raises(ModelWeightsMissing) as e:
        load_vae_fix(tmp_path / VAE_FIX_DIR, torch.float32, "cpu")
    assert "download --vae-fp16-fix" in e.value.message


def test_sdxl_profile_lists_it_as_missing_when_on(tmp_path):
    from utils.config import Settings
    s = Settings(data_dir=tmp_path, model_dir=tmp_path / "models", model_profile="sdxl", vae_fp16_fix=True)
    missing = model_layout(s).missing
    assert any(m.startswith("madebyollin/sdxl-vae-fp16-fix") for m in missing)
