"""The tiny folder's FLUX (tiny-flux): a deterministic, randomly initialised FLUX.1-dev miniature in the real
hub layout, and the FLUX files around it (``write_tiny_flux``):

* ``FLUX.1-dev/``: model_index.json as the hub's; FluxTransformer2DModel (2 double + 2 single blocks,
  guidance embedding) and T5 sharded with an index JSON, as the real repo; CLIP-L with the classic
  vocab.json + merges.txt; T5's tokenizer built offline (tiny_tokenizers); a 16-channel AutoencoderKL with the
  real x8 factor and no quant convs; FlowMatchEulerDiscreteScheduler with dynamic shifting (the dev config).
* ``loras/``: one FLUX LoRA per published format: XLabs (``double_blocks.N.processor.qkv_lora1``: the Realism
  LoRA's layout), kohya (``lora_unet_double_blocks_N_img_attn_qkv.lora_down``), diffusers / peft.
* ``Hyper-SD/``: a stand-in for the 8-step LoRA (diffusers format).
* ``checkpoints/tiny-flux-alt.safetensors``: a second FLUX transformer as one file (other random weights, bf16).
  In diffusers key names: diffusers' conversion of the original (BFL) names splits the single blocks at the
  real width (3072) whatever the config says, so a tiny file in BFL names cannot load; real-size BFL files
  go through that conversion (``verify`` checks them with it).

Written by ``tiny.make_tiny``; the folder names come from ``layout`` (the readers' names).
"""
from __future__ import annotations

import json
from pathlib import Path

from utils.models.layout import CHECKPOINT_DIR, FLUX_DEV_DIR, FLUX_FAST_DIR, LORA_DIR, TINY_FLUX_FAST_WEIGHT, TINY_RESOLUTION
from utils.models.tiny_tokenizers import tiny_t5_tokenizer, tiny_tokenizer, write_classic_tokenizers

TINY_FLUX_SEED = 20261207
TINY_FLUX_ALT = "tiny-flux-alt.safetensors"
TINY_FLUX_LORAS = {"tiny_flux_realism": "xlabs", "tiny_flux_kohya": "kohya", "tiny_flux_style": "diffusers"}
T5_DIM = CLIP_DIM = 32
TRANSFORMER = {"patch_size": 1, "in_channels": 64, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
               "num_attention_heads": 2, "joint_attention_dim": T5_DIM, "pooled_projection_dim": CLIP_DIM,
               "guidance_embeds": True, "axes_dims_rope": [4, 6, 6]}
MODEL_INDEX = {"_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
               "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
               "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}


def write_tiny_flux(root: Path) -> None:
    import torch
    torch.manual_seed(TINY_FLUX_SEED)
    transformer = _write_base(Path(root) / FLUX_DEV_DIR)
    gen = torch.Generator().manual_seed(TINY_FLUX_SEED + 1)
    inner = TRANSFORMER["num_attention_heads"] * TRANSFORMER["attention_head_dim"]
    lora_dir = Path(root) / LORA_DIR
    lora_dir.mkdir(parents=True, exist_ok=True)
    _save(xlabs_lora(TRANSFORMER["num_layers"], inner, gen), lora_dir / "tiny_flux_realism.safetensors")
    _save(kohya_lora(TRANSFORMER["num_layers"], TRANSFORMER["num_single_layers"], inner, gen),
          lora_dir / "tiny_flux_kohya.safetensors")
    _save(peft_lora(transformer, gen, 0.3), lora_dir / "tiny_flux_style.safetensors")
    _save(peft_lora(transformer, gen, 0.2), Path(root) / FLUX_FAST_DIR / TINY_FLUX_FAST_WEIGHT)
    _write_alt(transformer, gen, Path(root) / CHECKPOINT_DIR / TINY_FLUX_ALT)


def _write_base(base: Path):
    """The FLUX.1-dev folder; returns its transformer."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    clip_tok, clip_vocab = tiny_tokenizer()
    t5_tok = tiny_t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=clip_vocab, hidden_size=CLIP_DIM, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=CLIP_DIM, bos_token_id=clip_vocab - 2, eos_token_id=clip_vocab - 1,
        pad_token_id=clip_vocab - 1))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=T5_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
                        layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=TINY_RESOLUTION,
                        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
    transformer = FluxTransformer2DModel(**TRANSFORMER)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    # Component by component: the real repo shards the transformer and T5 (an index JSON names each
    # tensor's shard) and keeps the others in one file each.
    for sub, module, shards in (("transformer", transformer, 3), ("text_encoder_2", t5, 2), ("text_encoder", clip, 1),
                                ("vae", vae, 1)):
        size = sum(p.numel() * p.element_size() for p in module.state_dict().values())
        kw = {"max_shard_size": max(size // shards + 1, 1)} if shards > 1 else {"max_shard_size": 10 * size}
        module.save_pretrained(str(base / sub), safe_serialization=True, **kw)
    scheduler.save_pretrained(str(base / "scheduler"))
    clip_tok.save_pretrained(str(base / "tokenizer"))
    write_classic_tokenizers(base, subs=("tokenizer",))
    t5_tok.save_pretrained(str(base / "tokenizer_2"))
    (base / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    return transformer


def xlabs_lora(num_double: int, inner: int, gen, rank: int = 4, spread: float = 0.3) -> dict:
    """XLabs' FLUX LoRA layout (their Realism LoRA): per double block, image (1) and text (2) streams, a
    LoRA over the fused qkv projection and one over the output projection; no alpha."""
    import torch
    out = {}
    for i in range(num_double):
        for s in ("1", "2"):
            p = f"double_blocks.{i}.processor."
            out[p + f"qkv_lora{s}.down.weight"] = torch.randn(rank, inner, generator=gen) * spread
            out[p + f"qkv_lora{s}.up.weight"] = torch.randn(3 * inner, rank, generator=gen) * spread
            out[p + f"proj_lora{s}.down.weight"] = torch.randn(rank, inner, generator=gen) * spread
            out[p + f"proj_lora{s}.up.weight"] = torch.randn(inner, rank, generator=gen) * spread
    return out


def kohya_lora(num_double: int, num_single: int, inner: int, gen, rank: int = 4, spread: float = 0.3) -> dict:
    """kohya's (sd-scripts) FLUX LoRA layout: ``lora_unet_<original module path>`` with lora_down / lora_up /
    alpha. The single blocks' fused linear1 is left out: diffusers splits it at the real width (3072)."""
    import torch
    out = {}

    def pair(name: str, fan_in: int, fan_out: int) -> None:
        out[f"{name}.lora_down.weight"] = torch.randn(rank, fan_in, generator=gen) * spread
        out[f"{name}.lora_up.weight"] = torch.randn(fan_out, rank, generator=gen) * spread
        out[f"{name}.alpha"] = torch.tensor(float(rank))
    for i in range(num_double):
        for stream in ("img", "txt"):
            pair(f"lora_unet_double_blocks_{i}_{stream}_attn_qkv", inner, 3 * inner)
            pair(f"lora_unet_double_blocks_{i}_{stream}_attn_proj", inner, inner)
    for i in range(num_single):
        pair(f"lora_unet_single_blocks_{i}_linear2", 5 * inner, inner)   # attention (inner) + MLP (4 x inner) in
    return out


def peft_lora(transformer, gen, spread: float, rank: int = 4) -> dict:
    """A LoRA over the attention projections of ``transformer``'s config, in diffusers' own FLUX format
    (``transformer.<module>.lora_A.weight``)."""
    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    model = FluxTransformer2DModel.from_config(transformer.config)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                 init_lora_weights=False))
    sd = get_peft_model_state_dict(model)
    return {f"transformer.{k}": torch.randn(v.shape, generator=gen) * spread for k, v in sd.items()}


def _write_alt(transformer, gen, path: Path) -> None:
    """A second FLUX transformer as one file: the tiny one's shapes, other weights, bf16 as fine-tunes ship."""
    import torch
    out = {}
    for k, v in transformer.state_dict().items():
        noise = torch.randn(v.shape, generator=gen) * 0.05 * (v.std() if v.numel() > 1 else 1.0)
        out[k] = (v + noise).to(torch.bfloat16).contiguous()
    _save(out, path)


def _save(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
