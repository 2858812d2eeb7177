"""FLUX model files: the tiny-flux folder in the real hub layout, the flux profile's resolution and download
plan, telling the families' files apart, `verify` on every broken FLUX file (table), and the full-size
parameter counts from the real configs (utils/models/flux_configs) on the meta device."""
from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import pytest
import torch

import model_loader as ml
from tests.helpers.files import clone, own, truncate, write_sparse_safetensors
from utils.config import Settings
from utils.errors import ModelWeightsMissing
from utils.models import kinds
from utils.models.layout import FLUX_PATTERNS, FLUX_REQUIRED, flux_layout, list_base_models, model_layout

FLUX = "FLUX.1-dev"
CONFIGS = Path(__file__).resolve().parents[1] / "utils" / "models" / "flux_configs"


@pytest.mark.parametrize("rel", [
    f"{FLUX}/model_index.json", f"{FLUX}/scheduler/scheduler_config.json",
    f"{FLUX}/transformer/config.json", f"{FLUX}/transformer/diffusion_pytorch_model.safetensors.index.json",
    f"{FLUX}/text_encoder/model.safetensors", f"{FLUX}/text_encoder_2/model.safetensors.index.json",
    f"{FLUX}/text_encoder_2/model-00001-of-00002.safetensors", f"{FLUX}/tokenizer/vocab.json",
    f"{FLUX}/tokenizer/merges.txt", f"{FLUX}/tokenizer_2/tokenizer.json", f"{FLUX}/vae/diffusion_pytorch_model.safetensors",
    "loras/tiny_flux_realism.safetensors", "loras/tiny_flux_kohya.safetensors", "loras/tiny_flux_style.safetensors",
    "Hyper-SD/tiny_hyper_flux_8steps_lora.safetensors", "checkpoints/tiny-flux-alt.safetensors",
])
def test_tiny_flux_has_the_real_folder_layout(tiny_models, rel):
    assert (tiny_models / rel).is_file()


def test_tiny_flux_mirrors_the_hub_configs(tiny_models):
    """The same classes and keys as FLUX.1-dev's own files (sizes aside): ≥ 1 double and ≥ 1 single block,
    guidance embedding, 16 latent channels, no quant convs, dynamic shifting; sharded transformer and T5."""
    real, tiny = CONFIGS / FLUX, tiny_models / FLUX
    assert json.loads((tiny / "model_index.json").read_text()) == {
        k: v for k, v in json.loads((real / "model_index.json").read_text()).items() if k != "_diffusers_version"}
    t = json.loads((tiny / "transformer/config.json").read_text())
    assert t["num_layers"] >= 1 and t["num_single_layers"] >= 1 and t["guidance_embeds"] is True
    assert t["in_channels"] == 64 and sum(t["axes_dims_rope"]) == t["attention_head_dim"]
    v = json.loads((tiny / "vae/config.json").read_text())
    assert (v["latent_channels"], v["use_quant_conv"], v["shift_factor"], len(v["block_out_channels"])) == (16, False, 0.1159, 4)
    s = json.loads((tiny / "scheduler/scheduler_config.json").read_text())
    assert s["_class_name"] == "FlowMatchEulerDiscreteScheduler" and s["use_dynamic_shifting"] is True
    for sub in ("transformer", "text_encoder_2"):
        index = next((tiny / sub).glob("*.index.json"))
        assert len(set(json.loads(index.read_text())["weight_map"].values())) >= 2


def test_tiny_flux_build_is_deterministic(tiny_models, tmp_path):
    from safetensors.torch import load_file
    again = ml.make_tiny(tmp_path / "again")
    for rel in (f"{FLUX}/vae/diffusion_pytorch_model.safetensors", "loras/tiny_flux_realism.safetensors",
                "checkpoints/tiny-flux-alt.safetensors"):
        a, b = load_file(tiny_models / rel), load_file(again / rel)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel


@pytest.mark.parametrize("rel, family", [
    ("checkpoints/tiny-alt.safetensors", "sdxl"), ("checkpoints/tiny-flux-alt.safetensors", "flux"),
    ("face_restore/gfpgan_1.4.onnx", None),
])
def test_checkpoint_family_by_key_names(tiny_models, rel, family):
    assert kinds.checkpoint_family(tiny_models / rel) == family


@pytest.mark.parametrize("rel, family", [
    ("loras/tiny_style.safetensors", "sdxl"), ("SDXL-Lightning/tiny_lightning_4step_lora.safetensors", "sdxl"),
    ("loras/tiny_flux_realism.safetensors", "flux"), ("loras/tiny_flux_kohya.safetensors", "flux"),
    ("loras/tiny_flux_style.safetensors", "flux"), ("Hyper-SD/tiny_hyper_flux_8steps_lora.safetensors", "flux"),
])
def test_lora_family_by_key_names(tiny_models, rel, family):
    assert kinds.lora_family(tiny_models / rel) == family


def test_the_tiny_profile_lists_both_families(tiny_settings, tiny_flux_settings):
    for s, first in ((tiny_settings, "tiny-sdxl"), (tiny_flux_settings, "tiny-flux")):
        found = list_base_models(s)
        assert next(iter(found)) == first
        assert {n: m.family for n, m in found.items()} == {"tiny-sdxl": "sdxl", "tiny-flux": "flux",
                                                            "tiny-alt": "sdxl", "tiny-flux-alt": "flux"}
        assert found["tiny-flux-alt"].layout.base.name == FLUX and found["tiny-alt"].file.name == "tiny-alt.safetensors"


def _fake_flux_repo(model_dir: Path, name: str) -> None:
    for rel in FLUX_REQUIRED:
        (model_dir / name / rel).parent.mkdir(parents=True, exist_ok=True)
        (model_dir / name / rel).write_text("{}")


@pytest.mark.parametrize("present, profile, want_profile, want_name", [
    (["FLUX.1-dev"], "flux", "flux", "black-forest-labs/FLUX.1-dev"),
    (["FLUX.1-dev"], "auto", "flux", "black-forest-labs/FLUX.1-dev"),      # no SDXL weights: flux before tiny
    ([], "auto", "tiny", "tiny-sdxl"),
])
def test_the_flux_profile_resolves_the_hub_layout(tmp_path, present, profile, want_profile, want_name):
    for name in present:
        _fake_flux_repo(tmp_path / "models", name)
    s = Settings(data_dir=tmp_path / "d", model_dir=tmp_path / "models", model_profile=profile)
    layout = model_layout(s)
    assert (layout.profile, layout.model_name) == (want_profile, want_name)
    if want_profile == "flux":
        assert layout.base == tmp_path / "models" / "FLUX.1-dev" and not layout.missing
        assert layout.missing_optional == ("ByteDance/Hyper-SD",)


@pytest.mark.parametrize("which, flag", [("dev", "--flux-dev"), ("schnell", "--flux-schnell")])
def test_missing_flux_weights_name_the_download_command(tmp_path, which, flag):
    s = Settings(data_dir=tmp_path / "d", model_dir=tmp_path / "models", model_profile="flux", flux_model=which)
    with pytest.raises(ModelWeightsMissing) as e:
        flux_layout(s).require()
    assert f"download {flag}" in e.value.message and f"FLUX.1-{which}" in e.value.message


# The files of the real repos (as listed on the hub): the download must take the diffusers folders only.
HUB_FILES = ["flux1-dev.safetensors", "ae.safetensors", "dev_grid.jpg", "LICENSE.md", "README.md", "model_index.json",
             "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
             "text_encoder_2/config.json", "text_encoder_2/model-00001-of-00002.safetensors",
             "text_encoder_2/model-00002-of-00002.safetensors", "text_encoder_2/model.safetensors.index.json",
             "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
             "tokenizer/vocab.json", "tokenizer_2/special_tokens_map.json", "tokenizer_2/spiece.model",
             "tokenizer_2/tokenizer.json", "tokenizer_2/tokenizer_config.json", "transformer/config.json",
             "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
             "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
             "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
             "transformer/diffusion_pytorch_model.safetensors.index.json", "vae/config.json",
             "vae/diffusion_pytorch_model.safetensors"]


@pytest.mark.parametrize("argv, repos", [
    (["--flux-dev"], ["black-forest-labs/FLUX.1-dev", "ByteDance/Hyper-SD"]),
    (["--flux-dev", "--no-lightning"], ["black-forest-labs/FLUX.1-dev"]),
    (["--flux-schnell"], ["black-forest-labs/FLUX.1-schnell"]),
])
def test_download_fetches_only_the_needed_flux_files(tmp_path, monkeypatch, argv, repos):
    import huggingface_hub
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: calls.append(kw))
    monkeypatch.setenv("TWIN_MODEL_DIR", str(tmp_path))
    assert ml.main(["download", *argv]) == 0
    # the output safety check's classifier comes with every download (TWIN_SAFETY_MODE is not off)
    assert [c["repo_id"] for c in calls] == ["Falconsai/nsfw_image_detection", *repos]
    flux = calls[1]
    taken = [f for f in HUB_FILES if any(fnmatch.fnmatch(f, p) for p in flux["allow_patterns"])]
    assert "flux1-dev.safetensors" not in taken and "ae.safetensors" not in taken and "dev_grid.jpg" not in taken
    assert set(taken) >= set(FLUX_REQUIRED) and flux["allow_patterns"] == FLUX_PATTERNS
    if "ByteDance/Hyper-SD" in repos:
        assert calls[2]["allow_patterns"] == ["Hyper-FLUX.1-dev-8steps-lora.safetensors"]


# --- verify on a FLUX layout: each broken file named -------------------------------------------------------
def _shard(root: Path, sub: str, n: int = 1) -> Path:
    return sorted((root / FLUX / sub).glob("*-0000*.safetensors"))[n - 1]


def _rewrite(path: Path, change) -> None:
    from safetensors.torch import load_file, save_file
    sd = load_file(own(path))
    change(sd)
    save_file(sd, str(path))


def _reshape_first(sd):
    k = sorted(sd)[0]
    sd[k] = torch.zeros(sd[k].shape[0] + 1, *sd[k].shape[1:])


def _int_first(sd):
    k = sorted(sd)[0]
    sd[k] = sd[k].to(torch.int32)


def _rename_first(sd):
    k = sorted(sd)[0]
    sd[k + "_renamed"] = sd.pop(k)


def _bad_tokenizer(root: Path):
    p = own(root / FLUX / "tokenizer_2" / "tokenizer.json")
    p.write_text('{"model": {"type": "Unigram", "vocab": [[')


def _big_vocab(root: Path):
    p = own(root / FLUX / "tokenizer_2" / "tokenizer.json")
    tok = json.loads(p.read_text())
    tok["model"]["vocab"] += [[f"\u2581extra{i}", -9.0] for i in range(50)]
    p.write_text(json.dumps(tok))


def _sdxl_as_flux(root: Path):
    def change(sd):
        for k in list(sd):
            sd[k.replace("unet.", "transformer.", 1)] = sd.pop(k)
    _rewrite(root / "loras" / "tiny_style.safetensors", change)


def _xlabs_wrong_rank(root: Path):
    def change(sd):
        k = "double_blocks.0.processor.qkv_lora1.up.weight"
        sd[k] = torch.zeros(sd[k].shape[0], sd[k].shape[1] + 1)
    _rewrite(root / "loras" / "tiny_flux_realism.safetensors", change)


@pytest.mark.parametrize("breaker, status, path, needle", [
    (lambda r: _shard(r, "transformer", 2).unlink(), "missing", "transformer/diffusion_pytorch_model-00002-of-00004",
     "a shard diffusion_pytorch_model.safetensors.index.json names"),
    (lambda r: _shard(r, "text_encoder_2", 1).unlink(), "missing", "text_encoder_2/model-00001-of-00002", "names"),
    (lambda r: _rewrite(_shard(r, "transformer", 1), _reshape_first), "wrong_shape",
     "transformer/diffusion_pytorch_model-00001-of-00004", "expected"),
    (lambda r: _rewrite(_shard(r, "text_encoder_2", 2), _int_first), "wrong_dtype", "text_encoder_2/model-00002", "I32"),
    (lambda r: _rewrite(r / FLUX / "vae" / "diffusion_pytorch_model.safetensors", _rename_first), "missing_key",
     "vae/diffusion_pytorch_model.safetensors", "not in file"),
    (lambda r: truncate(_shard(r, "transformer", 3)), "corrupt", "transformer/diffusion_pytorch_model-00003", ""),
    (lambda r: truncate(r / FLUX / "text_encoder" / "model.safetensors"), "corrupt", "text_encoder/model.safetensors", ""),
    (lambda r: own(r / FLUX / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text("{"),
     "corrupt", "transformer/diffusion_pytorch_model.safetensors.index.json", "JSONDecodeError"),
    (_bad_tokenizer, "corrupt", f"{FLUX}/tokenizer_2", ""),
    (_big_vocab, "wrong_shape", f"{FLUX}/tokenizer_2", "more than the"),
    (lambda r: (r / FLUX / "tokenizer" / "vocab.json").unlink(), "missing", f"{FLUX}/tokenizer", "vocab.json"),
    (_xlabs_wrong_rank, "wrong_shape", "loras/tiny_flux_realism.safetensors", "lora_A rank 4 but lora_B rank 5"),
    # an SDXL LoRA's keys under FLUX's prefix: a FLUX LoRA by its keys, for modules the transformer lacks
    (_sdxl_as_flux, "unexpected_key", "loras/tiny_style.safetensors", "is not a module of the transformer"),
])
def test_verify_names_each_broken_flux_file(tiny_models, tmp_path, breaker, status, path, needle):
    root = clone(tiny_models, tmp_path / "tiny")
    breaker(root)
    s = Settings(data_dir=tmp_path / "d", tiny_model_dir=root, model_profile="tiny-flux", model_dir=tmp_path / "none")
    bad = [c for c in ml.verify(s) if not c.ok]
    assert [c.status for c in bad] == [status], [c.line() for c in bad]
    assert path in bad[0].path and needle in bad[0].detail, bad[0].line()


def test_verify_cli_passes_on_tiny_flux_and_skips_the_other_family(tiny_models, tmp_path, monkeypatch, capsys):
    for k, v in {"TWIN_MODEL_PROFILE": "tiny-flux", "TWIN_TINY_MODEL_DIR": str(tiny_models),
                 "TWIN_DATA_DIR": str(tmp_path / "d"), "TWIN_MODEL_DIR": str(tmp_path / "none")}.items():
        monkeypatch.setenv(k, v)
    assert ml.main(["verify"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(x.startswith("SKIPPED") and "tiny_style" in x for x in out)
    assert any(x.startswith("OK") and "tiny-flux-alt" in x for x in out)
    assert "1 of the other family, 0 optional absent, 0 warning(s), 0 problem(s)" in out[-1] and "family flux" in out[-1]


def test_a_broken_flux_checkpoint_is_a_warning(tiny_models, tmp_path):
    root = clone(tiny_models, tmp_path / "tiny")
    _rewrite(root / "checkpoints" / "tiny-flux-alt.safetensors", _reshape_first)
    s = Settings(data_dir=tmp_path / "d", tiny_model_dir=root, model_profile="tiny-flux", model_dir=tmp_path / "none")
    (bad,) = [c for c in ml.verify(s) if not c.ok]
    assert bad.status == "wrong_shape" and not bad.blocking and "tiny-flux-alt" in bad.path


def test_a_full_size_bfl_checkpoint_goes_through_diffusers_conversion(tmp_path):
    """verify reads an original-layout (BFL) FLUX.1 transformer the way from_single_file does: its keys,
    converted by diffusers on the header alone, must give the folder's transformer (full size, meta device;
    the file is sparse: a 24 GB header with no data)."""
    from diffusers import FluxTransformer2DModel
    from utils.models.flux_verify import verify_flux_checkpoint
    cfg = FluxTransformer2DModel.load_config(str(CONFIGS / FLUX / "transformer"))
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(cfg)
    header = _bfl_names(model.config)
    f = tmp_path / "flux1-dev-finetune.safetensors"
    write_sparse_safetensors(f, header)
    assert kinds.checkpoint_family(f) == "flux" and kinds.flux_is_guidance_distilled(f)
    check = verify_flux_checkpoint(f, f.name, model)
    assert check.status == "ok" and "BFL" in check.detail, check.line()
    del header["single_blocks.3.linear2.weight"]
    write_sparse_safetensors(f, header)
    assert verify_flux_checkpoint(f, f.name, model).status == "unexpected_key"


def _bfl_names(cfg) -> dict[str, tuple]:
    """The original FLUX.1 key names and shapes for a transformer config (as flux1-dev.safetensors has them)."""
    d, mlp = cfg.num_attention_heads * cfg.attention_head_dim, 4 * cfg.num_attention_heads * cfg.attention_head_dim
    h, out = cfg.attention_head_dim, {}

    def lin(name, i, o):
        out[f"{name}.weight"], out[f"{name}.bias"] = (o, i), (o,)
    lin("img_in", cfg.in_channels, d)
    lin("txt_in", cfg.joint_attention_dim, d)
    for p, i in (("time_in", 256), ("vector_in", cfg.pooled_projection_dim), ("guidance_in", 256)):
        lin(f"{p}.in_layer", i, d)
        lin(f"{p}.out_layer", d, d)
    for b in range(cfg.num_layers):
        for s in ("img", "txt"):
            lin(f"double_blocks.{b}.{s}_mod.lin", d, 6 * d)
            lin(f"double_blocks.{b}.{s}_attn.qkv", d, 3 * d)
            lin(f"double_blocks.{b}.{s}_attn.proj", d, d)
            out[f"double_blocks.{b}.{s}_attn.norm.query_norm.scale"] = (h,)
            out[f"double_blocks.{b}.{s}_attn.norm.key_norm.scale"] = (h,)
            lin(f"double_blocks.{b}.{s}_mlp.0", d, mlp)
            lin(f"double_blocks.{b}.{s}_mlp.2", mlp, d)
    for b in range(cfg.num_single_layers):
        lin(f"single_blocks.{b}.modulation.lin", d, 3 * d)
        lin(f"single_blocks.{b}.linear1", d, 3 * d + mlp)
        lin(f"single_blocks.{b}.linear2", d + mlp, d)
        out[f"single_blocks.{b}.norm.query_norm.scale"] = (h,)
        out[f"single_blocks.{b}.norm.key_norm.scale"] = (h,)
    lin("final_layer.adaLN_modulation.1", d, 2 * d)
    lin("final_layer.linear", d, cfg.in_channels)
    return out


@pytest.mark.parametrize("variant, component, params", [
    ("FLUX.1-dev", "transformer", 11_901_408_320),
    ("FLUX.1-schnell", "transformer", 11_891_178_560),        # no guidance embedder
    ("FLUX.1-dev", "text_encoder_2", 4_762_310_656),            # T5-v1.1-XXL encoder
    ("FLUX.1-dev", "text_encoder", 123_060_480),                # CLIP-L text
    ("FLUX.1-dev", "vae", 83_819_683),
])
def test_full_size_parameter_counts_from_the_real_configs(variant, component, params):
    from utils.models.flux_verify import _build
    model = _build(CONFIGS / variant, component)
    assert sum(p.numel() for p in model.parameters()) == params
