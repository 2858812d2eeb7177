"""The fp16-fix SDXL VAE (madebyollin/sdxl-vae-fp16-fix, TWIN_VAE_FP16_FIX): SDXL's VAE fine-tuned so its
activations stay inside fp16's range. The stock VAE overflows in fp16 (NaN, black images), so diffusers
upcasts it to fp32 for every decode (``force_upcast``); the fixed one decodes in fp16 as it is.

Its repo is a diffusers folder: config.json + diffusion_pytorch_model.safetensors (same architecture and keys
as the base's vae/). The tiny profile's stand-in is the tiny VAE itself, written beside the tiny base in the
same layout the first time it is asked for."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from utils.errors import ModelWeightsMissing

VAE_FIX_DIR = "sdxl-vae-fp16-fix"
VAE_FIX_FILES = ["config.json", "diffusion_pytorch_model.safetensors"]


def ensure_tiny_standin(tiny_root: Path, base_vae: Path) -> Path:
    """The tiny stand-in (a copy of the tiny VAE with force_upcast off), written atomically once."""
    folder = Path(tiny_root) / VAE_FIX_DIR
    if all((folder / f).is_file() for f in VAE_FIX_FILES):
        return folder
    tmp = folder.parent / f".{folder.name}.building-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    shutil.copy2(base_vae / "diffusion_pytorch_model.safetensors", tmp / "diffusion_pytorch_model.safetensors")
    cfg = json.loads((base_vae / "config.json").read_text())
    (tmp / "config.json").write_text(json.dumps({**cfg, "force_upcast": False}, indent=1))
    try:
        os.replace(tmp, folder)
    except OSError:   # another process wrote it first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def verify_vae_fix(folder: Path, base_vae: Path):
    """FileChecks of the fixed VAE: its weights against the architecture its config builds, and that config
    against the base's VAE (a VAE of another latent space would decode garbage, not fail)."""
    from utils.models.filecheck import FileCheck, compare, meta_model, rel_path
    from diffusers import AutoencoderKL
    if not all((folder / f).is_file() for f in VAE_FIX_FILES):
        missing = next(f for f in VAE_FIX_FILES if not (folder / f).is_file())
        return [FileCheck(f"{VAE_FIX_DIR}/{missing}", "missing", "python model_loader.py download --vae-fp16-fix")]
    cfg, base = AutoencoderKL.load_config(str(folder)), AutoencoderKL.load_config(str(base_vae))
    rel = f"{VAE_FIX_DIR}/{rel_path(folder / VAE_FIX_FILES[1], folder)}"
    for key in ("latent_channels", "block_out_channels", "scaling_factor"):
        if cfg.get(key) != base.get(key):
            return [FileCheck(rel, "wrong_shape", f"config {key}={cfg.get(key)!r} but the base VAE has {base.get(key)!r}")]
    model = meta_model(lambda: AutoencoderKL.from_config(cfg))
    return [compare(rel, folder / VAE_FIX_FILES[1], {k: tuple(v.shape) for k, v in model.state_dict().items()})]


def load_vae_fix(folder: Path, dtype, device: str):
    """The fixed VAE, read from safetensors straight onto ``device`` (no CPU copy first on a GPU)."""
    from diffusers import AutoencoderKL
    if not all((folder / f).is_file() for f in VAE_FIX_FILES):
        raise ModelWeightsMissing(f"TWIN_VAE_FP16_FIX=1 but the fp16-fix VAE is not in {folder}; run: python "
                                  "model_loader.py download --vae-fp16-fix")
    vae = AutoencoderKL.from_pretrained(str(folder), dtype=dtype, local_files_only=True, use_safetensors=True,
                                        device_map={"": device})
    # The fix's own config says so; a stand-in or a hand-made folder might not: never upcast this one.
    vae.register_to_config(force_upcast=False)
    return vae
