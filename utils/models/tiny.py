"""The tiny profile's model folder: a deterministic, randomly initialised miniature of SDXL + every adapter
variant, and of FLUX.1-dev (``tiny_flux``), written with the real repos' layout and file formats (``make_tiny``).

This module writes what the readers (``layout``, ``load``, ``verify``) read; it imports from them, they never
import it: the folder names, the adapter file layout and the single-file key names all come from the code
that reads them, so the tiny folder exercises the same paths as the real weights."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from utils.models.adapters import AdapterSizes, adapter_shapes
from utils.models.layout import (ADAPTER_FILES, ANTELOPE_DIR, BASE_DIR, CHECKPOINT_DIR, CONTROLNET_SUB, ENCODER_SUB,
                                 INSTANTID_DIR, IPA_DIR, LIGHTNING_DIR, LIGHTNING_WEIGHT_TINY, LORA_DIR, RESTORE_DIR,
                                 TINY_RESOLUTION, tiny_adapter_weight)
from utils.models.load import quiet_libraries
from utils.models.single_file import to_single_file
from utils.models.tiny_flux import write_tiny_flux
from utils.models.tiny_infiniteyou import write_tiny_infiniteyou
from utils.models.tiny_tokenizers import bytes_to_unicode, tiny_tokenizer, write_classic_tokenizers  # noqa: F401

TINY_VERSION = 7           # bump when make_tiny writes new files: an older folder is rebuilt on start (7: NSFW classifier stand-in + InfiniteYou)
TINY_SEED = 20261122
TINY_TE1, TINY_TE2, TINY_PROJ = 32, 64, 32
TINY_CROSS = TINY_TE1 + TINY_TE2
TINY_BLOCKS = (32, 64)
TINY_IMG_HIDDEN, TINY_IMG_PROJ, TINY_IMG_SIZE = 32, 32, 32
TINY_PLUS_TOKENS, TINY_PLUS_DIM = 16, 64
TINY_ALT_CHECKPOINT = "tiny-alt.safetensors"
MARKER = "tiny_model.json"


def make_tiny(root: Path | str) -> Path:
    """Write the deterministic tiny model folder (same layout as the real repos).

    Built in a temporary sibling folder and renamed into place, so a second process starting at the same
    moment never loads a half-written model.
    """
    import os
    import shutil
    root = Path(root)
    if tiny_is_current(root):
        return root
    if (root / MARKER).is_file():
        # An older tiny folder (written before the current file set): move it aside and build anew.
        old = root.parent / f".{root.name}.old-{_unique()}"
        with contextlib.suppress(OSError):
            os.replace(root, old)
        shutil.rmtree(old, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.building-{_unique()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with quiet_libraries():
        _write_tiny(tmp)
    try:
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        os.replace(tmp, root)
    except OSError:
        if not tiny_is_current(root):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first: keep its copy
    return root


def _unique() -> str:
    """A name part no other builder uses: containers sharing a data volume often have the same pids."""
    import os
    import socket
    import uuid
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def tiny_is_current(root: Path) -> bool:
    try:
        return json.loads((Path(root) / MARKER).read_text()).get("version") == TINY_VERSION
    except (OSError, ValueError):
        return False


def _write_tiny(root: Path) -> None:
    import torch
    torch.manual_seed(TINY_SEED)
    unet = _write_base(root / BASE_DIR)
    _write_image_encoder(root / IPA_DIR / ENCODER_SUB)
    gen = torch.Generator().manual_seed(TINY_SEED + 1)
    _write_adapters(root, unet, gen)
    tiny_identitynet(unet, gen).save_pretrained(str(root / INSTANTID_DIR / CONTROLNET_SUB), safe_serialization=True)
    from utils.faces.standins import build_antelopev2_pack
    build_antelopev2_pack(root / ANTELOPE_DIR)
    _tiny_lora_file(root / LORA_DIR / "tiny_style.safetensors", TINY_SEED + 2, 0.5)
    _write_tiny_checkpoint(root, TINY_SEED + 4)
    _tiny_lora_file(root / LIGHTNING_DIR / LIGHTNING_WEIGHT_TINY, TINY_SEED + 3, 0.3)
    from utils.faces.restore import write_standins   # restoration stand-ins: the exports' names and shapes
    write_standins(root / RESTORE_DIR)
    write_tiny_flux(root)       # tiny-flux beside tiny-sdxl: the second family, in the same folder
    from utils.safety import classifier   # the output safety check's stand-in (the real layout, answers "normal")
    classifier.write_standin(root / classifier.LOCAL_NAME)
    write_tiny_infiniteyou(root)   # tiny-flux's identity method
    (root / MARKER).write_text(json.dumps({
        "profile": "tiny", "version": TINY_VERSION, "seed": TINY_SEED, "native_resolution": TINY_RESOLUTION,
        "note": "randomly initialised demo model; outputs are not portraits"}, indent=1))


def _write_base(base: Path):
    """The SDXL base folder (diffusers layout, classic tokenizer files); returns its UNet."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    unet = _tiny_unet()
    vae = AutoencoderKL(block_out_channels=(8, 16, 16, 16), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, norm_num_groups=8, sample_size=TINY_RESOLUTION,
                        scaling_factor=0.13025)
    tok, vocab_size = tiny_tokenizer()
    tok2, _ = tiny_tokenizer(pad_token="!")
    te_common = dict(intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=vocab_size,
                     max_position_embeddings=77, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                     pad_token_id=vocab_size - 1)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=TINY_TE1, projection_dim=TINY_PROJ, **te_common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=TINY_TE2, projection_dim=TINY_PROJ, **te_common))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=tok2, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(str(base), safe_serialization=True)
    write_classic_tokenizers(base)
    return unet


def _write_image_encoder(folder: Path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=TINY_IMG_HIDDEN, projection_dim=TINY_IMG_PROJ, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, image_size=TINY_IMG_SIZE, patch_size=8))
    enc.save_pretrained(str(folder), safe_serialization=True)


def _write_adapters(root: Path, unet, gen) -> None:
    """Every variant's adapter file under the real file names and formats (FaceID's as safetensors)."""
    from safetensors.torch import save_file
    for variant in ("plus-face", "plain", "faceid", "faceid-plusv2", "instantid"):
        repo, sub, _, _ = ADAPTER_FILES[variant]
        weight = tiny_adapter_weight(variant)
        out = root / repo / sub / weight
        out.parent.mkdir(parents=True, exist_ok=True)
        # faceid_mult=1 keeps the tiny folder small (the loader reads the multiplier from the shapes); Plus v2's
        # projection is built with a fixed multiplier of 2 by diffusers, so its file keeps the real one.
        tensors = adapter_tensors(unet, variant, gen, img_hidden=TINY_IMG_HIDDEN, img_proj=TINY_IMG_PROJ,
                                  plus_tokens=TINY_PLUS_TOKENS, plus_dim=TINY_PLUS_DIM, faceid_mult=1)
        if weight.endswith(".bin"):
            save_nested_bin(tensors, out)  # the real file names and the real nested layout
        else:
            save_file(tensors, str(out))


# ---------------------------------------------------------------------------------------------------
# Random weights
# ---------------------------------------------------------------------------------------------------
def _tiny_unet():
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8, in_channels=4, out_channels=4, block_out_channels=TINY_BLOCKS,
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + TINY_PROJ,
        norm_num_groups=16, cross_attention_dim=TINY_CROSS)


def _tiny_lora_file(path: Path, seed: int, scale: float) -> None:
    """A LoRA over the tiny UNet's attention projections, saved in diffusers' own LoRA format."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    torch.manual_seed(seed)
    unet = _tiny_unet()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_" in n:
                p.mul_(scale)
    sd = get_peft_model_state_dict(unet)
    StableDiffusionXLPipeline.save_lora_weights(str(path.parent), unet_lora_layers=sd, weight_name=path.name)


# Initial values of the random adapter weights, by the end of the key (first match): norms start at one,
# biases at zero, the rest random with these spreads. The identity projections (to_k_ip / to_v_ip) are
# large enough that identity strength visibly changes the tiny model's output.
_ADAPTER_INIT: tuple[tuple[str, str | float], ...] = (
    (".bias", "zeros"),
    ("norm.weight", "ones"), ("norm_out.weight", "ones"), ("norm1.weight", "ones"), ("norm2.weight", "ones"),
    (".1.0.weight", "ones"),                       # the Resampler feed-forward's LayerNorm
    ("latents", "latents"),
    ("_lora.down.weight", 0.02), ("_lora.up.weight", 0.02),
    ("_ip.weight", 0.3),
    ("proj.0.weight", 0.05), ("proj.2.weight", 0.05),
    ("proj_in.weight", 0.2), ("proj_out.weight", 0.2), ("image_proj.proj.weight", 0.2),
    ("", 0.1),                                     # Resampler attention and feed-forward
)


def adapter_tensors(unet, variant: str, gen, *, img_hidden: int, img_proj: int, plus_tokens: int = 16,
                    plus_dim: int = 1280, dtype=None, meta: bool = False, faceid_mult: int = 2) -> dict[str, Any]:
    """Random IP-Adapter weights in the original repos' key layout (``adapters.adapter_shapes``), shaped for
    ``unet`` and an image encoder of the given widths, FaceID LoRAs of rank 4 (also used by the full-size
    benchmarks; ``meta=True``: meta tensors, for parameter counts and sparse layouts)."""
    import torch
    sizes = AdapterSizes(img_hidden=img_hidden, img_proj=img_proj, tokens=plus_tokens, width=plus_dim,
                         faceid_mult=faceid_mult, lora_rank=4)
    out: dict[str, Any] = {}
    for key, shape in adapter_shapes(unet, variant, sizes).items():
        init = next(i for end, i in _ADAPTER_INIT if key.endswith(end))
        if meta:
            out[key] = torch.empty(*shape, device="meta")
        elif init == "zeros":
            out[key] = torch.zeros(*shape)
        elif init == "ones":
            out[key] = torch.ones(*shape)
        elif init == "latents":
            out[key] = (torch.randn(*shape, generator=gen) * 1.0).to(dtype or torch.float32) / shape[-1] ** 0.5
        else:
            out[key] = (torch.randn(*shape, generator=gen) * init).to(dtype or torch.float32)
    return out if meta else {k: v.contiguous() for k, v in out.items()}


def save_nested_bin(tensors: dict[str, Any], path: Path) -> None:
    """The original repos' .bin layout: ``{"image_proj": {...}, "ip_adapter": {...}}`` (torch.save)."""
    import torch
    nested: dict[str, dict[str, Any]] = {"image_proj": {}, "ip_adapter": {}}
    for k, v in tensors.items():
        head, rest = k.split(".", 1)
        nested[head][rest] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(nested, str(path))


def tiny_identitynet(unet, gen):
    """A ControlNet shaped like the tiny UNet (as InstantID's IdentityNet is shaped like SDXL's UNet). Its
    zero-initialised output convolutions get small random weights, so pose and identity tokens visibly
    steer the tiny model (a real trained IdentityNet is not zero there either)."""
    import torch
    from diffusers import ControlNetModel
    cn = ControlNetModel.from_unet(unet)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return cn


def _write_tiny_checkpoint(root: Path, seed: int) -> None:
    """A second tiny SDXL as ONE single-file checkpoint: the tiny base's shapes, different random weights."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file
    pipe = StableDiffusionXLPipeline.from_pretrained(str(root / BASE_DIR), local_files_only=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            for _, p in module.named_parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05 * (p.std() if p.numel() > 1 else 1.0))
    out = root / CHECKPOINT_DIR / TINY_ALT_CHECKPOINT
    out.parent.mkdir(parents=True, exist_ok=True)
    # fp16, as the fine-tunes are published (and half the size: the tiny folder stays small); from_single_file
    # casts it to the pipeline's dtype.
    save_file({k: v.half() for k, v in to_single_file(pipe).items()}, str(out))
