"""Which family a weight file belongs to, from its key names alone (the safetensors header; no tensor is read).

A single-file base checkpoint and a LoRA file each say in their key names what they were trained on:

* FLUX: the original (BFL) names ``double_blocks.N.`` / ``single_blocks.N.`` (also under
  ``model.diffusion_model.``), diffusers' ``transformer_blocks.N.`` + ``single_transformer_blocks.N.``,
  XLabs LoRAs (``double_blocks.N.processor.qkv_lora1``), kohya LoRAs (``lora_unet_double_blocks_N_...``),
  diffusers / peft LoRAs (``transformer.``).
* SDXL: the LDM / SGM names (``model.diffusion_model.input_blocks.``, ``conditioner.embedders.``), kohya LoRAs
  (``lora_unet_down_blocks_``, ``lora_unet_input_blocks_``, ``lora_te1_`` / ``lora_te2_``), diffusers LoRAs
  (``unet.``, ``text_encoder_2.``).

A FLUX transformer is guidance-distilled (FLUX.1-dev and its fine-tunes) when it has the guidance embedder.
Results are cached per (path, size, mtime): GET /models and GET /loras ask on every call.
"""
from __future__ import annotations

import functools
from pathlib import Path

FAMILIES = ("sdxl", "flux")

_FLUX_BASE = ("double_blocks.", "single_blocks.", "model.diffusion_model.double_blocks.",
              "transformer_blocks.", "single_transformer_blocks.")
_SDXL_BASE = ("model.diffusion_model.input_blocks.", "conditioner.embedders.", "first_stage_model.")
_FLUX_LORA = ("double_blocks.", "single_blocks.", "diffusion_model.double_blocks.", "diffusion_model.single_blocks.",
              "lora_unet_double_blocks_", "lora_unet_single_blocks_", "transformer.", "lora_transformer_")
_SDXL_LORA = ("unet.", "lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_",
              "lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_", "lora_te1_",
              "lora_te2_", "text_encoder_2.")
_GUIDANCE = ("guidance_in.", "model.diffusion_model.guidance_in.", "time_text_embed.guidance_embedder.")


def header_keys(path: Path) -> tuple[str, ...]:
    """The tensor names of a safetensors file (cached while the file is unchanged); () when unreadable."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return ()
    return _keys(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _keys(path: str, size: int, mtime_ns: int) -> tuple[str, ...]:
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            return tuple(f.keys())
    except Exception:  # noqa: BLE001 - truncated / not safetensors: no family (verify names the problem)
        return ()


def checkpoint_family(path: Path) -> str | None:
    """sdxl | flux for a single-file base checkpoint, None when the keys are neither."""
    keys = header_keys(path)
    if any(k.startswith(_SDXL_BASE) for k in keys):
        return "sdxl"
    flux_bfl = any(k.startswith(_FLUX_BASE[:3]) for k in keys)
    flux_diffusers = any(k.startswith("transformer_blocks.") for k in keys) and \
        any(k.startswith("single_transformer_blocks.") for k in keys)
    return "flux" if flux_bfl or flux_diffusers else None


def flux_is_guidance_distilled(path: Path) -> bool:
    """True for a FLUX.1-dev-type transformer (it embeds the guidance scale), False for a schnell-type one."""
    return any(k.startswith(_GUIDANCE) for k in header_keys(path))


def lora_family(path: Path) -> str | None:
    """sdxl | flux for a LoRA file, None when its keys name neither (a text-encoder-only LoRA, say)."""
    keys = header_keys(path)
    flux = any(k.startswith(_FLUX_LORA) for k in keys)
    sdxl = any(k.startswith(_SDXL_LORA) for k in keys)
    if flux == sdxl:
        return None
    return "flux" if flux else "sdxl"


def list_loras(folder: Path | None) -> dict[str, str | None]:
    """The LoRA files of ``folder`` (``<name>.safetensors``): name -> family (None: neither)."""
    if folder is None or not Path(folder).is_dir():
        return {}
    return {f.stem: lora_family(f) for f in sorted(Path(folder).glob("*.safetensors"))}
