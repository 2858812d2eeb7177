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
from utils.config import Settings


def clone(src: Path, dst: Path) -> Path:
    """A copy of the tiny folder made of symlinks, so one case can break one file cheaply."""
    for f in src.rglob("*"):
        if f.is_file():
            t = dst / f.relative_to(src)
            t.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(f, t)
    return dst


def own(path: Path) -> Path:
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)
    return path


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


def truncate(p: Path):
    data = own(p).read_bytes()
    p.write_bytes(data[: len(data) // 2])


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


@pytest.mark.parametrize("variant, breaker, status, needle", [
    ("instantid", None, "ok", ""),
    ("faceid-plusv2", None, "ok", ""),
    ("plus-face", None, "ok", ""),
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
    pack_lines = [c for c in ml.verify(s) if c.path.endswith(".onnx")]
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
    assert sum(line.startswith(("OK ", "CORRUPT ")) for line in out) == 8
    assert out[-1].startswith("verify: ") and ("1 problem" in out[-1]) == broken


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
