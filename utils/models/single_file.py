"""Single-file SDXL checkpoints (the layout of RealVisXL / Juggernaut XL ``.safetensors`` files): the original
(LDM / SGM) key name of every diffusers weight, derived from the components' own configs.

``to_single_file`` is the inverse of diffusers' single-file conversion (``from_single_file`` loads what it
writes); run on meta-device models built from a base folder's configs it gives the names and shapes a
checkpoint for that base must have (``single_file_shapes``)."""
from __future__ import annotations

from typing import Any

# The four components' key prefixes in a single file, and keys of the original code's buffers that
# diffusers' conversion does not read (present or not, they are fine).
SINGLE_FILE_PARTS = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.",
                     "conditioner.embedders.1.")
SINGLE_FILE_IGNORED = ("position_ids", "logit_scale")


def _ldm_unet_names(unet) -> dict[str, str]:
    """diffusers UNet key -> original (LDM) key, from the UNet's own geometry.

    The inverse of diffusers' ``convert_ldm_unet_checkpoint`` for any block layout (the tiny UNet has two
    levels, SDXL three), so the tiny checkpoint has the real key layout and ``from_single_file`` converts it
    with the same code path as a downloaded fine-tune."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
    cfg = unet.config
    fixed = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    fixed.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
              ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
    prefixes: list[tuple[str, str, bool]] = []     # (diffusers prefix, ldm prefix, is a resnet)
    lpb = cfg.layers_per_block
    k = 1
    for i, kind in enumerate(cfg.down_block_types):
        for j in range(lpb):
            prefixes.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", True))
            if "CrossAttn" in kind:
                prefixes.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.", False))
            k += 1
        if i < len(cfg.down_block_types) - 1:
            prefixes.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{k}.0.op.", False))
            k += 1
    prefixes += [("mid_block.resnets.0.", "middle_block.0.", True), ("mid_block.attentions.0.", "middle_block.1.", False),
                 ("mid_block.resnets.1.", "middle_block.2.", True)]
    k = 0
    for i, kind in enumerate(cfg.up_block_types):
        attn = "CrossAttn" in kind
        for j in range(lpb + 1):
            prefixes.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.", True))
            if attn:
                prefixes.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1.", False))
            if j == lpb and i < len(cfg.up_block_types) - 1:
                prefixes.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{k}.{2 if attn else 1}.", False))
            k += 1
    names = {}
    for key in unet.state_dict():
        if key in fixed:
            names[key] = fixed[key]
            continue
        for hf, ldm, is_res in prefixes:
            if key.startswith(hf):
                rest = key[len(hf):]
                if is_res:
                    for a, b in resnet:
                        if rest.startswith(a + "."):
                            rest = b + rest[len(a):]
                            break
                names[key] = ldm + rest
                break
        else:
            raise ValueError(f"no original-layout name for UNet key {key}")
    return names


def _ldm_vae_names(vae) -> dict[str, str]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n_up = len(vae.config.up_block_types)
    attn = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
    names = {}
    for key in vae.state_dict():
        if key in fixed:
            names[key] = fixed[key]
            continue
        side, rest = key.split(".", 1)
        parts = rest.split(".")
        if parts[0] == "down_blocks":
            i, sub, tail = parts[1], parts[2], ".".join(parts[4:])
            new = f"down.{i}.block.{parts[3]}.{tail}" if sub == "resnets" else f"down.{i}.downsample.{tail}"
        elif parts[0] == "up_blocks":
            i, sub, tail = n_up - 1 - int(parts[1]), parts[2], ".".join(parts[4:])
            new = f"up.{i}.block.{parts[3]}.{tail}" if sub == "resnets" else f"up.{i}.upsample.{tail}"
        elif parts[0] == "mid_block" and parts[1] == "resnets":
            new = f"mid.block_{int(parts[2]) + 1}." + ".".join(parts[3:])
        elif parts[0] == "mid_block" and parts[1] == "attentions":
            tail = ".".join(parts[3:])
            for a, b in attn.items():
                if tail.startswith(a):
                    tail = b + tail[len(a):]
                    break
            new = "mid.attn_1." + tail
        else:
            raise ValueError(f"no original-layout name for VAE key {key}")
        names[key] = f"{side}." + new.replace("conv_shortcut", "nin_shortcut")
    return names


def to_single_file(pipe) -> dict[str, Any]:
    """An SDXL pipeline's weights as one state dict in the original (LDM / SGM) single-file layout."""
    import torch
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
    out: dict[str, Any] = {}
    sd = pipe.unet.state_dict()
    for k, v in _ldm_unet_names(pipe.unet).items():
        out["model.diffusion_model." + v] = sd[k]
    sd = pipe.vae.state_dict()
    for k, v in _ldm_vae_names(pipe.vae).items():
        # The original VAE attention projections are 1x1 convolutions.
        out["first_stage_model." + v] = sd[k][..., None, None] if ".attn_1." in v and sd[k].ndim == 2 else sd[k]
    for k, v in pipe.text_encoder.state_dict().items():
        # transformers >= 5.6 flattened CLIPTextModel (no `text_model.`); the original files keep the prefix.
        out["conditioner.embedders.0.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = v
    # The second encoder is OpenCLIP's layout: fused q/k/v in_proj, transposed text projection.
    oc = DIFFUSERS_TO_LDM_MAPPING["openclip"]
    pre = "conditioner.embedders.1.model."
    sd = pipe.text_encoder_2.state_dict()
    qkv: dict[str, dict[str, Any]] = {}
    for k, v in sd.items():
        if k in oc["layers"]:
            out[pre + oc["layers"][k]] = v.T.contiguous() if k == "text_projection.weight" else v
            continue
        if k.endswith("position_ids"):
            continue
        if not k.startswith("text_model.encoder.layers."):
            raise ValueError(f"no original-layout name for text encoder 2 key {k}")
        name = k
        for new, old in oc["transformer"].items():
            name = name.replace(new, old)
        for proj in ("q_proj", "k_proj", "v_proj"):
            if f".{proj}." in name:
                base, kind = name.split(f".{proj}.")
                qkv.setdefault(f"{base}.in_proj_{kind}", {})[proj] = v
                break
        else:
            out[pre + "transformer." + name] = v
    for name, parts in qkv.items():
        out[pre + "transformer." + name] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return {k: v.contiguous() for k, v in out.items()}


def single_file_shapes(meta: dict[str, Any]) -> dict[str, tuple]:
    """{original key: shape} of a single-file SDXL for these component configs: ``to_single_file`` (the
    inverse of diffusers' single-file conversion, checked by loading the tiny checkpoint with
    from_single_file) run on the meta-device models."""
    from types import SimpleNamespace
    sd = to_single_file(SimpleNamespace(**{k: meta[k] for k in ("unet", "vae", "text_encoder", "text_encoder_2")}))
    return {k: tuple(v.shape) for k, v in sd.items()}
