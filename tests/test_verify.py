"""`python model_loader.py verify`: one line per weight file, non-zero exit on any problem; checked on the
tiny files and on deliberately broken copies. Also the download file selection for the new variants."""
from __future__ import annotations

import fnmatch
import os
import shutil
from pathlib import Path

import pytest
import torch

import model_loader as ml
from tests.helpers.files import clone, own, truncate
from utils.config import Settings


def rename_key_bin(p: Path):
    sd = torch.load(own(p), weights_only=True)
    sd["image_proj"]["latents_renamed"] = sd["image_proj"].pop("latents")
    torch.save(sd, p)


def wrong_shape_safetensors(p: Path, key_part: str):
    from safetensors.torch import load_file, save_file
    sd = load_file(own(p))
    k = next(k for k in sd if key_part in k)
    sd[k] = torch.zeros(sd[k].shape[0] + 1, *sd[k].shape[1:])
    save_file(sd, str(p))


def int_dtype_bin(p: Path):
    sd = torch.load(own(p), weights_only=True)
    sd["image_proj"]["norm.weight"] = sd["image_proj"]["norm.weight"].to(torch.int32)
    torch.save(sd, p)


def fewer_queries(p: Path, n: int = 8):
    """A Resampler with ``n`` queries: the loader reads the count from the file (latents), as the published
    plus / InstantID files differ in it."""
    from safetensors.torch import load_file, save_file
    sd = load_file(own(p))
    sd["image_proj.latents"] = sd["image_proj.latents"][:, :n].contiguous()
    save_file(sd, str(p))


def faceid_multiplier(p: Path, mult: int = 2):
    """The FaceID projection with hidden width mult x 512 (the published file's 2; the tiny one's is 1)."""
    from safetensors.torch import load_file, save_file
    sd = load_file(own(p))
    tokens_c = sd["image_proj.proj.2.weight"].shape[0]
    sd["image_proj.proj.0.weight"] = torch.zeros(mult * 512, 512)
    sd["image_proj.proj.0.bias"] = torch.zeros(mult * 512)
    sd["image_proj.proj.2.weight"] = torch.zeros(tokens_c, mult * 512)
    save_file(sd, str(p))


def nest_pack(root: Path):
    pack = root / ml.ANTELOPE_DIR
    inner = pack / pack.name
    inner.mkdir()
    for f in pack.glob("*.onnx"):
        f.rename(inner / f.name)


def cross_dim(p: Path):
    import json
    cfg = json.loads(own(p).read_text())
    cfg["cross_attention_dim"] += 8
    p.write_text(json.dumps(cfg))


IID = f"{ml.INSTANTID_DIR}/ip-adapter.bin"
NET = f"{ml.INSTANTID_DIR}/{ml.CONTROLNET_SUB}/diffusion_pytorch_model.safetensors"
PLUSV2 = f"{ml.FACEID_DIR}/ip-adapter-faceid-plusv2_sdxl.bin"
UNET = f"{ml.BASE_DIR}/unet/diffusion_pytorch_model.safetensors"
PLUS = f"{ml.IPA_DIR}/sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors"
FACEID = f"{ml.FACEID_DIR}/{ml.TINY_FACEID_WEIGHT}"


@pytest.mark.parametrize("variant, breaker, status, needle", [
    ("instantid", None, "ok", ""),
    ("faceid-plusv2", None, "ok", ""),
    ("plus-face", None, "ok", ""),
    # sizes the loader takes from the file itself (not from a config): the file's choice, so fine
    ("plus-face", lambda r: fewer_queries(r / PLUS), "ok", ""),
    ("faceid", lambda r: faceid_multiplier(r / FACEID), "ok", ""),
    # ...but the rest of the file must agree with them
    ("plus-face", lambda r: wrong_shape_safetensors(r / PLUS, "image_proj.proj_in.weight"), "wrong_shape",
     "'image_proj.proj_in.weight'"),
    ("instantid", lambda r: rename_key_bin(r / IID), "missing_key", "'image_proj.latents'"),
    ("instantid", lambda r: wrong_shape_safetensors(r / NET, "controlnet_down_blocks.0.weight"), "wrong_shape",
     "'controlnet_down_blocks.0.weight'"),
    ("instantid", lambda r: truncate(r / IID), "corrupt", ""),
    ("instantid", lambda r: truncate(r / NET), "corrupt", ""),
    ("instantid", lambda r: cross_dim(r / f"{ml.INSTANTID_DIR}/{ml.CONTROLNET_SUB}/config.json"), "wrong_shape",
     "cross_attention_dim"),
    ("instantid", lambda r: (r / IID).unlink(), "missing", ""),
    ("instantid", lambda r: (r / ml.ANTELOPE_DIR / "glintr100.onnx").unlink(), "missing", "recognition"),
    ("instantid", lambda r: truncate(r / ml.ANTELOPE_DIR / "glintr100.onnx"), "corrupt", ""),
    ("faceid-plusv2", lambda r: int_dtype_bin(r / PLUSV2), "wrong_dtype", "'image_proj.norm.weight'"),
    ("faceid-plusv2", lambda r: wrong_shape_safetensors(r / UNET, "conv_in.weight"), "wrong_shape", "'conv_in.weight'"),
    ("plus-face", lambda r: truncate(r / UNET), "corrupt", ""),
])
def test_verify_table(tiny_models, tmp_path, variant, breaker, status, needle):
    root = clone(tiny_models, tmp_path / "tiny")
    if breaker:
        breaker(root)
    s = Settings(data_dir=tmp_path / "d", tiny_model_dir=root, model_profile="tiny", ip_adapter_variant=variant,
                 model_dir=tmp_path / "none")
    checks = ml.verify(s)
    bad = [c for c in checks if not c.ok]
    if status == "ok":
        assert not bad, [c.line() for c in bad]
        assert len(checks) >= 6
    else:
        assert [c.status for c in bad] == [status], [c.line() for c in bad]
        assert needle in bad[0].detail
        assert bad[0].line().startswith(status.upper())


def test_nested_antelopev2_folder_is_accepted_and_said(tiny_models, tmp_path):
    root = clone(tiny_models, tmp_path / "tiny")
    nest_pack(root)
    s = Settings(data_dir=tmp_path / "d", tiny_model_dir=root, model_profile="tiny", ip_adapter_variant="instantid",
                 model_dir=tmp_path / "none")
    # (the face pack lines; restoration models are .onnx files too)
    pack_lines = [c for c in ml.verify(s) if c.path.endswith(".onnx") and "antelopev2" in c.path]
    assert [c.status for c in pack_lines] == ["ok", "ok"]
    assert all("nested antelopev2/antelopev2/" in c.detail and "mv " in c.detail for c in pack_lines)
    # ...and the face backend loads it through the real FaceAnalysis path.
    from utils.faces.backends import InsightFaceBackend
    b = InsightFaceBackend(root / ml.ANTELOPE_DIR, det_size=160)
    b.load()
    assert b.model_dir.name == "antelopev2" and b.model_dir.parent.name == "antelopev2"


@pytest.mark.parametrize("broken, rc", [(False, 0), (True, 1)])
def test_verify_cli_prints_one_line_per_file_and_exits_non_zero_on_a_problem(tiny_models, tmp_path, monkeypatch,
                                                                           capsys, broken, rc):
    root = clone(tiny_models, tmp_path / "tiny")
    if broken:
        truncate(root / IID)
    for k, v in {"TWIN_MODEL_PROFILE": "tiny", "TWIN_TINY_MODEL_DIR": str(root), "TWIN_DATA_DIR": str(tmp_path / "d"),
                 "TWIN_IP_ADAPTER_VARIANT": "instantid", "TWIN_MODEL_DIR": str(tmp_path / "none")}.items():
        monkeypatch.setenv(k, v)
    assert ml.main(["verify"]) == rc
    out = capsys.readouterr().out.splitlines()
    # unet, vae, 2 text encoders, 2 tokenizers, adapter, IdentityNet, 2 face pack models, Lightning, a style
    # LoRA, a checkpoint, 3 restoration models, the safety classifier's 3 files (config, weights, preprocessor)
    assert sum(line.startswith(("OK ", "CORRUPT ")) for line in out) == 19
    assert sum("nsfw_image_detection" in line and line.startswith("OK ") for line in out) == 3
    assert out[-1].startswith("verify: ") and ("1 problem" in out[-1]) == broken


# --- LoRAs, Lightning, tokenizers, single-file checkpoints, restoration models (issue 16) -------------
LORA = f"{ml.LORA_DIR}/tiny_style.safetensors"
LIGHT = f"{ml.LIGHTNING_DIR}/{ml.LIGHTNING_WEIGHT_TINY}"
CKPT = f"{ml.CHECKPOINT_DIR}/{ml.TINY_ALT_CHECKPOINT}"
TOK = f"{ml.BASE_DIR}/tokenizer"


def edit_safetensors(p: Path, change):
    """Rewrite a safetensors file through ``change(state_dict) -> state_dict`` (a real copy, not the link)."""
    from safetensors.torch import load_file, save_file
    save_file(change(load_file(own(p))), str(p))


def retarget(p: Path, old: str, new: str):
    # The tiny UNet has down_blocks 0 and 1 only: keys renamed into block 3 name modules that do not exist.
    edit_safetensors(p, lambda sd: {k.replace(old, new): v for k, v in sd.items()})


def drop_key(p: Path, part: str):
    """Drop the first key (in sorted order) that contains ``part``."""
    def change(sd):
        sd.pop(min(k for k in sd if part in k))
        return sd
    edit_safetensors(p, change)


def add_key(p: Path, key: str):
    edit_safetensors(p, lambda sd: {**sd, key: torch.zeros(3)})


def kohya_copy(root: Path):
    """The tiny style LoRA written again in the kohya layout most published LoRAs (and SDXL-Lightning's)
    use: lora_unet_<module path with _>.lora_down / lora_up / alpha."""
    from safetensors.torch import load_file, save_file
    out = {}
    for k, v in load_file(root / LORA).items():
        module, kind = k.removeprefix("unet.").rsplit(".lora_", 1)
        stem = "lora_unet_" + module.replace(".", "_")
        out[f"{stem}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = v
        out[f"{stem}.alpha"] = torch.tensor(4.0)
    save_file(out, str(root / ml.LORA_DIR / "kohya_style.safetensors"))


def text_encoder_lora(root: Path, layer: int = 0, projections=("q_proj", "k_proj", "v_proj", "out_proj")):
    """A kohya LoRA on the first text encoder's attention of ``layer`` (the tiny encoders have layers 0 and 1)."""
    from safetensors.torch import save_file
    sd = {}
    for proj in projections:
        stem = f"lora_te1_text_model_encoder_layers_{layer}_self_attn_{proj}"
        sd.update({f"{stem}.lora_down.weight": torch.zeros(2, ml.TINY_TE1),
                   f"{stem}.lora_up.weight": torch.zeros(ml.TINY_TE1, 2), f"{stem}.alpha": torch.tensor(2.0)})
    save_file(sd, str(root / ml.LORA_DIR / "te_style.safetensors"))


def grow_vocab(root: Path):
    import json
    p = own(root / TOK / "vocab.json")
    vocab = json.loads(p.read_text(encoding="utf-8"))
    vocab["extra</w>"] = len(vocab)
    p.write_text(json.dumps(vocab), encoding="utf-8")


def tokenizer_json_only(root: Path):
    from transformers import CLIPTokenizer
    folder = root / TOK
    tok = CLIPTokenizer.from_pretrained(str(folder))
    for f in list(folder.iterdir()):
        f.unlink()
    tok.save_pretrained(str(folder))
    for f in ("vocab.json", "merges.txt"):   # the fast tokenizer saves these too: keep tokenizer.json alone
        (folder / f).unlink(missing_ok=True)


@pytest.mark.parametrize("breaker, status, path, needle", [
    # intact extras, and other layouts of the same content
    (kohya_copy, "ok", "loras/kohya_style.safetensors", "64 unet modules, rank 4"),
    (tokenizer_json_only, "ok", "tokenizer", "534 tokens"),
    (text_encoder_lora, "ok", "loras/te_style.safetensors", "4 text_encoder modules, rank 2"),
    # without out_proj diffusers cannot tell the layout: load_lora_weights raises the same ValueError
    (lambda r: text_encoder_lora(r, projections=("q_proj",)), "unexpected_key", "loras/te_style.safetensors",
     "Could not automatically infer state dict type"),
    (lambda r: text_encoder_lora(r, layer=5), "unexpected_key", "loras/te_style.safetensors",
     "encoder.layers.5.self_attn.k_proj is not a module of the text_encoder (4 of 4 targets missing)"),
    (lambda r: add_key(r / CKPT, "model_ema.decay"), "ok", CKPT, "1 keys diffusers does not read"),
    # optional files that are absent: said, not a failure
    (lambda r: (r / LIGHT).unlink(), "absent", LIGHT, "quality_mode fast"),
    (lambda r: (r / LORA).unlink(), "absent", "loras", "no style LoRAs"),
    (lambda r: shutil.rmtree(r / ml.CHECKPOINT_DIR), "absent", ml.CHECKPOINT_DIR, "no single-file checkpoints"),
    (lambda r: (r / "face_restore/gpen_bfr_512.onnx").unlink(), "absent", "gpen_bfr_512.onnx", "--restore gpen"),
    # style LoRA
    (lambda r: retarget(r / LORA, "down_blocks.1.", "down_blocks.3."), "unexpected_key", LORA, "is not a module of the unet"),
    # keys of a FLUX LoRA ("transformer."): not the sdxl model's (a flux profile checks it: test_flux_models)
    (lambda r: retarget(r / LORA, "unet.", "transformer."), "skipped", LORA, "a flux LoRA"),
    (lambda r: retarget(r / LORA, "unet.", "vae."), "unexpected_key", LORA, "for no part of the SDXL pipeline"),
    (lambda r: wrong_shape_safetensors(r / LORA, "attn2.to_k.lora_B"), "wrong_shape", LORA, "do not fit the layer"),
    (lambda r: wrong_shape_safetensors(r / LORA, "attn1.to_q.lora_A"), "wrong_shape", LORA, "lora_A rank 5 but lora_B rank 4"),
    (lambda r: drop_key(r / LORA, "lora_B"), "missing_key", LORA, "has no lora_B weight"),
    (lambda r: truncate(r / LORA), "corrupt", LORA, ""),
    # Lightning LoRA
    (lambda r: truncate(r / LIGHT), "corrupt", LIGHT, ""),
    (lambda r: retarget(r / LIGHT, "attn1.to_k", "attn1.to_kk"), "unexpected_key", LIGHT, "to_kk is not a module"),
    # tokenizers
    (grow_vocab, "wrong_shape", TOK, "vocab size 535, the text encoder's embedding has 534 rows"),
    (lambda r: (r / TOK / "vocab.json").unlink(), "missing", TOK, "vocab.json"),
    (lambda r: truncate(r / TOK / "vocab.json"), "corrupt", TOK, ""),
    # single-file checkpoint
    (lambda r: truncate(r / CKPT), "corrupt", CKPT, ""),
    (lambda r: wrong_shape_safetensors(r / CKPT, "model.diffusion_model.input_blocks.0.0.weight"), "wrong_shape", CKPT,
     "'model.diffusion_model.input_blocks.0.0.weight'"),
    (lambda r: drop_key(r / CKPT, "first_stage_model.decoder"), "missing_key", CKPT, "'first_stage_model.decoder"),
    (lambda r: add_key(r / CKPT, "model.diffusion_model.input_blocks.9.0.weight"), "unexpected_key", CKPT,
     "input_blocks.9.0.weight"),
    # face restoration models
    (lambda r: truncate(r / "face_restore/codeformer.onnx"), "corrupt", "face_restore/codeformer.onnx", ""),
    (lambda r: shutil.copy(r / "face_restore/gfpgan_1.4.onnx", own(r / "face_restore/codeformer.onnx")), "wrong_shape",
     "face_restore/codeformer.onnx", "takes a fidelity input"),
])
def test_verify_extras_table(tiny_models, tmp_path, breaker, status, path, needle):
    root = clone(tiny_models, tmp_path / "tiny")
    breaker(root)
    s = Settings(data_dir=tmp_path / "d", tiny_model_dir=root, model_profile="tiny", ip_adapter_variant="plus-face",
                 model_dir=tmp_path / "none")
    checks = ml.verify(s)
    bad = [c for c in checks if not c.ok]
    if status in ("ok", "absent", "skipped"):
        assert not bad, [c.line() for c in bad]
        line = next(c for c in checks if c.path.endswith(path))
        assert line.status == status and needle in line.detail, line.line()
    else:
        assert [c.status for c in bad] == [status], [c.line() for c in bad]
        assert bad[0].path.endswith(path) and needle in bad[0].detail, bad[0].line()
        assert bad[0].line().startswith(status.upper())


def test_verify_cli_absent_optional_files_exit_zero(tiny_models, tmp_path, monkeypatch, capsys):
    root = clone(tiny_models, tmp_path / "tiny")
    (root / LIGHT).unlink()
    shutil.rmtree(root / "face_restore")
    for k, v in {"TWIN_MODEL_PROFILE": "tiny", "TWIN_TINY_MODEL_DIR": str(root), "TWIN_DATA_DIR": str(tmp_path / "d"),
                 "TWIN_MODEL_DIR": str(tmp_path / "none")}.items():
        monkeypatch.setenv(k, v)
    assert ml.main(["verify"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("ABSENT ") for line in out) == 4
    assert "4 optional absent, 0 warning(s), 0 problem(s)" in out[-1]


@pytest.mark.parametrize("broken, code, warnings, problems", [
    # A checkpoint is read only by POST /models/load (which refuses it and keeps the old model): warn, start.
    (CKPT, 0, 1, 0),
    # The base folder's UNet is loaded at start-up: the preflight fails.
    (f"{ml.BASE_DIR}/unet/diffusion_pytorch_model.safetensors", 1, 0, 1),
])
def test_verify_cli_checkpoint_problems_warn_without_failing(tiny_models, tmp_path, monkeypatch, capsys,
                                                             broken, code, warnings, problems):
    root = clone(tiny_models, tmp_path / "tiny")
    truncate(root / broken)
    for k, v in {"TWIN_MODEL_PROFILE": "tiny", "TWIN_TINY_MODEL_DIR": str(root), "TWIN_DATA_DIR": str(tmp_path / "d"),
                 "TWIN_MODEL_DIR": str(tmp_path / "none")}.items():
        monkeypatch.setenv(k, v)
    assert ml.main(["verify"]) == code
    out = capsys.readouterr().out.splitlines()
    line = next(x for x in out if broken in x)
    assert line.startswith("CORRUPT"), line
    assert ("warning only" in line) == (warnings == 1), line
    assert f"{warnings} warning(s), {problems} problem(s)" in out[-1], out[-1]


@pytest.fixture
def sdxl_layout(tmp_path, monkeypatch):
    """bench/bench_verify.py's sparse layout (real header, no data) of the small SDXL topology: the sdxl
    profile's branch of verify (fp16 file names, TWIN_LORA_DIR, <model_dir>/checkpoints, kohya Lightning)."""
    import importlib.util
    import sys
    bench = Path(__file__).resolve().parents[1] / "bench"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location("bench_verify", bench / "bench_verify.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    mod.write_layout(tmp_path / "m", size="small", restore_mb=1)
    return tmp_path / "m"


@pytest.mark.parametrize("breaker, status, needle", [
    (None, "ok", ""),
    # kohya names for a block SDXL does not have: diffusers maps them to nothing and would say only a warning
    (lambda m: retarget(m / ml.LIGHTNING_DIR / "sdxl_lightning_4step_lora.safetensors", "lora_unet_up_blocks_0_",
                        "lora_unet_up_blocks_7_"), "unexpected_key", "up_blocks.7"),
    (lambda m: truncate(m / ml.CHECKPOINT_DIR / "sdxl-random-alt.safetensors"), "corrupt", ""),
])
def test_verify_sdxl_profile_on_the_bench_layout(sdxl_layout, tmp_path, breaker, status, needle):
    if breaker:
        breaker(sdxl_layout)
    s = Settings(data_dir=tmp_path / "d", model_dir=sdxl_layout, model_profile="sdxl", ip_adapter_variant="plus-face")
    checks = ml.verify(s)
    assert {c.path for c in checks} >= {"SDXL-Lightning/sdxl_lightning_4step_lora.safetensors", "loras/style.safetensors",
                                        "checkpoints/sdxl-random-alt.safetensors", "face_restore/gfpgan_1.4.onnx",
                                        "stable-diffusion-xl-base-1.0/tokenizer_2"}
    bad = [c for c in checks if not c.ok]
    if status == "ok":
        assert not bad, [c.line() for c in bad]
        assert [c.path for c in checks if c.status == "absent"] == ["face_restore/codeformer.onnx",
                                                                    "face_restore/gpen_bfr_512.onnx"]
    else:
        assert [c.status for c in bad] == [status] and needle in bad[0].detail, [c.line() for c in bad]


# --- download selection (no network) -----------------------------------------------------------------
@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path


@pytest.mark.parametrize("flags, repos, files", [
    ({"instantid": True}, ["stabilityai/stable-diffusion-xl-base-1.0", "InstantX/InstantID"],
     {"InstantX/InstantID": ["ControlNetModel/config.json", "ControlNetModel/diffusion_pytorch_model.safetensors",
                             "ip-adapter.bin"]}),
    ({"faceid_plusv2": True}, ["stabilityai/stable-diffusion-xl-base-1.0", "h94/IP-Adapter", "h94/IP-Adapter-FaceID"],
     {"h94/IP-Adapter": ["models/image_encoder/config.json", "models/image_encoder/model.safetensors"],
      "h94/IP-Adapter-FaceID": ["ip-adapter-faceid-plusv2_sdxl.bin"]}),
    ({"instantid": True, "faceid_plusv2": True},
     ["stabilityai/stable-diffusion-xl-base-1.0", "h94/IP-Adapter", "h94/IP-Adapter-FaceID", "InstantX/InstantID"], {}),
])
def test_download_fetches_only_the_variant_files(tmp_path, flags, repos, files):
    calls = []
    ml.download(Settings(data_dir=tmp_path, model_dir=tmp_path / "m"), lightning=False,
                snapshot_download=lambda **kw: calls.append(kw), **flags)
    assert [c["repo_id"] for c in calls] == repos
    by_repo = {c["repo_id"]: c["allow_patterns"] for c in calls}
    for repo, want in files.items():
        assert sorted(by_repo[repo]) == sorted(want)
    # Never the repos' other big files (InstantID's pipeline code, FaceID's other variants, SD1.5 files).
    listing = ["pipeline_stable_diffusion_xl_instantid.py", "ip-adapter-faceid_sdxl.bin", "ip-adapter-faceid-plus_sd15.bin",
               "ip-adapter-faceid-portrait_sdxl.bin", "sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors"]
    for c in calls[1:]:
        assert not [f for f in listing if any(fnmatch.fnmatch(f, p) for p in c["allow_patterns"])]


@pytest.mark.parametrize("variant, needle", [("instantid", "--instantid"), ("faceid-plusv2", "--faceid-plusv2")])
def test_missing_variant_weights_name_the_download_flag(tmp_path, empty_hf_cache, variant, needle):
    from utils.errors import ModelWeightsMissing
    s = Settings(data_dir=tmp_path, model_dir=tmp_path / "m", model_profile="sdxl", ip_adapter_variant=variant)
    with pytest.raises(ModelWeightsMissing) as e:
        ml.resolve_sdxl(s)
    assert needle in e.value.message


def test_sdxl_layout_with_instantid_resolves_from_model_dir(tmp_path, empty_hf_cache):
    s = Settings(data_dir=tmp_path, model_dir=tmp_path / "m", model_profile="auto", ip_adapter_variant="instantid")
    for spec in ml.repo_specs(s):
        for rel in spec.required:
            p = tmp_path / "m" / spec.local_name / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"x")
    w = ml.resolve_sdxl(s)
    assert w.adapter_repo == tmp_path / "m" / ml.INSTANTID_DIR
    assert not (tmp_path / "m" / ml.IPA_DIR).exists()   # InstantID needs no IP-Adapter repo
    shutil.rmtree(tmp_path / "m")


def test_start_app_runs_the_preflight_and_stops_on_a_broken_file(tiny_models, tmp_path):
    import subprocess
    import sys
    repo = Path(__file__).resolve().parents[1]
    root = clone(tiny_models, tmp_path / "tiny")
    truncate(root / NET)
    venv = Path(sys.executable).parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWIN_")}
    env.update({"VENV": str(venv), "SKIP_VENV_SETUP": "1", "TWIN_MODEL_PROFILE": "tiny", "TWIN_TINY_MODEL_DIR": str(root),
                "TWIN_DATA_DIR": str(tmp_path / "d"), "TWIN_IP_ADAPTER_VARIANT": "instantid",
                "TWIN_MODEL_DIR": str(tmp_path / "none"), "TWIN_PORT": "1"})
    proc = subprocess.run([str(repo / "start_app.sh")], cwd=repo, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"CORRUPT         InstantID/{ml.CONTROLNET_SUB}/diffusion_pytorch_model.safetensors" in proc.stdout
    assert "weights preflight failed" in proc.stderr


@pytest.mark.parametrize("mode, status", [("block", "missing"), ("off", "absent")])
def test_verify_says_when_the_safety_classifier_is_not_there(tmp_path, mode, status):
    from utils.models.cli import classifier_checks
    s = Settings(data_dir=tmp_path / "d", model_dir=tmp_path / "none", safety_mode=mode)
    checks = classifier_checks(s, "sdxl")
    assert [c.status for c in checks] == [status]
    assert "download --safety" in checks[0].detail and checks[0].ok == (mode == "off")
