"""The IP-Adapter weight files as diffusers' ``load_ip_adapter`` reads them: per variant, every key of the
original repos' layout (``image_proj.*`` / ``ip_adapter.*``) and its shape.

A shape comes from one of three places: the UNet the adapter plugs into (cross-attention width, the
attention processors and their widths), the image encoder's config (its hidden and projection widths), or
the file itself, for the few sizes the loader reads from the file rather than from a config
(``file_sizes``: the Resampler's query count and width, the FaceID projection's multiplier, the LoRA rank)."""
from __future__ import annotations

from dataclasses import dataclass

ARCFACE_DIM = 512                        # InsightFace ArcFace embedding (faceid, faceid-plusv2, instantid)
VIT_H_HIDDEN, VIT_H_PROJ = 1280, 1024    # the published CLIP ViT-H image encoder
# The published files' Resampler (plus-face; InstantID's ip-adapter.bin: 16 queries of width 1280 = 20 heads
# x 64 over the 512-d ArcFace vector) and FaceID's projection (4 tokens, hidden width 2 x 512).
PLUS_TOKENS, PLUS_DIM = 16, 1280
INSTANTID_TOKENS, INSTANTID_DIM = PLUS_TOKENS, PLUS_DIM
FACEID_TOKENS, FACEID_MULT = 4, 2
HEAD_DIM = 64                            # the Resampler's attention head width (fixed in diffusers)


@dataclass(frozen=True)
class AdapterSizes:
    """The sizes an adapter file's shapes depend on besides the UNet."""
    img_hidden: int = VIT_H_HIDDEN   # image encoder hidden width (plus-face, faceid-plusv2 Resampler input)
    img_proj: int = VIT_H_PROJ       # image encoder projection width (plain)
    tokens: int = PLUS_TOKENS        # Resampler queries (plus-face, instantid)
    width: int = PLUS_DIM            # Resampler width (plus-face, instantid)
    faceid_mult: int = FACEID_MULT   # FaceID projection hidden width / 512 (faceid; Plus v2's is always 2)
    lora_rank: int = 128             # FaceID's LoRA rank (faceid, faceid-plusv2): the file's choice


def cross_attn_hidden_sizes(unet) -> list[tuple[int, str, int]]:
    """(index in attn_processors, name, hidden size) per processor, as diffusers' IP-Adapter loader walks them."""
    out = []
    cfg = unet.config
    for idx, name in enumerate(unet.attn_processors.keys()):
        if name.startswith("mid_block"):
            hidden = cfg.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(cfg.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = cfg.block_out_channels[int(name[len("down_blocks.")])]
        out.append((idx, name, hidden))
    return out


def adapter_shapes(unet, variant: str, sizes: AdapterSizes) -> dict[str, tuple[int, ...]]:
    """{key: shape} of ``variant``'s adapter file for ``unet``, in the order the original code writes them."""
    C = unet.config.cross_attention_dim
    if variant == "plain":
        t = {"image_proj.proj.weight": (4 * C, sizes.img_proj), "image_proj.proj.bias": (4 * C,),
             "image_proj.norm.weight": (C,), "image_proj.norm.bias": (C,)}
    elif variant in ("plus-face", "instantid"):
        # The Resampler's head width is fixed at 64, so heads = width // 64 and the inner width is the width.
        n_in = ARCFACE_DIM if variant == "instantid" else sizes.img_hidden
        t = _resampler("image_proj.", sizes.width, n_in, C, sizes.width, sizes.tokens)
    elif variant == "faceid":
        t = _faceid_projection(C, sizes.faceid_mult)
    elif variant == "faceid-plusv2":
        # diffusers builds Plus v2's projection with a fixed multiplier of 2; its FacePerceiverResampler has
        # width C and C // 64 heads of 64 over the CLIP hidden states.
        t = _faceid_projection(C, FACEID_MULT)
        t.update(_resampler("image_proj.perceiver_resampler.", C, sizes.img_hidden, C, HEAD_DIM * max(1, C // HEAD_DIM),
                            None))
    else:
        raise ValueError(f"unknown adapter variant {variant!r}")
    t.update(_attention(unet, C, sizes.lora_rank if variant in ("faceid", "faceid-plusv2") else None))
    return t


def _resampler(prefix: str, D: int, n_in: int, n_out: int, inner: int, latents: int | None) -> dict[str, tuple]:
    """IP-Adapter's Resampler / FacePerceiverResampler: 4 layers of (PerceiverAttention, FeedForward)."""
    t: dict[str, tuple] = {}
    if latents:
        t[f"{prefix}latents"] = (1, latents, D)
    t.update({f"{prefix}proj_in.weight": (D, n_in), f"{prefix}proj_in.bias": (D,),
              f"{prefix}proj_out.weight": (n_out, D), f"{prefix}proj_out.bias": (n_out,),
              f"{prefix}norm_out.weight": (n_out,), f"{prefix}norm_out.bias": (n_out,)})
    for i in range(4):
        p = f"{prefix}layers.{i}"
        for n in ("0.norm1", "0.norm2", "1.0"):
            t[f"{p}.{n}.weight"] = (D,)
            t[f"{p}.{n}.bias"] = (D,)
        t[f"{p}.0.to_q.weight"] = (inner, D)
        t[f"{p}.0.to_kv.weight"] = (2 * inner, D)
        t[f"{p}.0.to_out.weight"] = (D, inner)
        t[f"{p}.1.1.weight"] = (4 * D, D)
        t[f"{p}.1.3.weight"] = (D, 4 * D)
    return t


def _faceid_projection(C: int, mult: int) -> dict[str, tuple]:
    return {"image_proj.proj.0.weight": (mult * ARCFACE_DIM, ARCFACE_DIM), "image_proj.proj.0.bias": (mult * ARCFACE_DIM,),
            "image_proj.proj.2.weight": (FACEID_TOKENS * C, mult * ARCFACE_DIM), "image_proj.proj.2.bias": (FACEID_TOKENS * C,),
            "image_proj.norm.weight": (C,), "image_proj.norm.bias": (C,)}


def _attention(unet, C: int, lora_rank: int | None) -> dict[str, tuple]:
    """The per-processor weights: to_k_ip / to_v_ip on every cross-attention (numbered 1, 3, 5, ... as in the
    original code), and with FaceID a LoRA on every attention processor (diffusers makes it a peft adapter)."""
    t: dict[str, tuple] = {}
    key_id = 1
    for idx, name, hidden in cross_attn_hidden_sizes(unet):
        cross = not name.endswith("attn1.processor")
        if cross:
            t[f"ip_adapter.{key_id}.to_k_ip.weight"] = (hidden, C)
            t[f"ip_adapter.{key_id}.to_v_ip.weight"] = (hidden, C)
            key_id += 2
        if lora_rank is not None:
            kin, r = (C if cross else hidden), lora_rank
            for proj, d_in in (("to_q", hidden), ("to_k", kin), ("to_v", kin), ("to_out", hidden)):
                t[f"ip_adapter.{idx}.{proj}_lora.down.weight"] = (r, d_in)
                t[f"ip_adapter.{idx}.{proj}_lora.up.weight"] = (hidden, r)
    return t


def lora_rank_dims(shapes: dict[str, tuple]) -> set[tuple[str, int]]:
    """(key, dim) pairs whose size is the LoRA rank: the file's choice (FaceID ships 128)."""
    return {(k, 0 if ".down." in k else 1) for k in shapes if "_lora." in k}


def file_sizes(variant: str, shapes: dict[str, tuple], *, img_hidden: int | None = None,
               img_proj: int | None = None) -> AdapterSizes:
    """The sizes diffusers' loader takes from the adapter file itself (``_convert_ip_adapter_image_proj_to_
    diffusers``): the Resampler's queries and width from ``latents``, FaceID's multiplier from ``proj.0``. The
    image encoder's widths come from its config when given; without one (the encoder's own line then says
    what is wrong) they are read from the file too. A key that is absent or of another rank keeps the
    published size, so the comparison names that key."""
    def dim(key: str, i: int, default: int) -> int:
        shape = shapes.get(key)
        return shape[i] if shape is not None and len(shape) > i and shape[i] else default

    proj0 = "image_proj.proj.0.weight"
    resampler_in = "image_proj.perceiver_resampler.proj_in.weight" if variant == "faceid-plusv2" \
        else "image_proj.proj_in.weight"
    return AdapterSizes(
        img_hidden=img_hidden or dim(resampler_in, 1, VIT_H_HIDDEN),
        img_proj=img_proj or dim("image_proj.proj.weight", 1, VIT_H_PROJ),
        tokens=dim("image_proj.latents", 1, PLUS_TOKENS), width=dim("image_proj.latents", 2, PLUS_DIM),
        faceid_mult=max(1, dim(proj0, 0, FACEID_MULT * ARCFACE_DIM) // dim(proj0, 1, ARCFACE_DIM)))
