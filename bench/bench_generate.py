"""Generation latency, measured in one run.

    python bench/bench_generate.py                      # tiny profile latency table (+ full-size when CUDA is present)
    python bench/bench_generate.py --full-size          # real-size SDXL (random weights) at 1024², 30 steps, CFG
    python bench/bench_generate.py --full-size --smoke  # same models, 128², 2 steps: checks it runs (CPU ok)
    python bench/bench_generate.py --full-size --meta   # build the full-size configs on the meta device only
    python bench/bench_generate.py --full-size --variant instantid   # + SDXL-sized IdentityNet ControlNet
    python bench/bench_generate.py --variants           # per variant: tiny CPU s/image + full-size parameters

Full-size mode builds the SDXL UNet, VAE, both text encoders, the ViT-H image encoder and an IP-Adapter Plus
from configs written below (no download), with random weights, and runs them through the same diffusers
pipeline call as the product. FLOP model (from DESIGN.md): 6.76 TFLOP per image per UNet step at 1024²
(doubled with CFG), VAE decode 10.5 TFLOP per image, both scaled linearly by pixel count.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

UNET_TFLOP_1024 = 6.76
VAE_TFLOP_1024 = 10.5

SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1,
    norm_eps=1e-5, norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=2816,
    sample_size=128, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True)
SDXL_VAE = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=1024,
    scaling_factor=0.13025, force_upcast=True, up_block_types=["UpDecoderBlock2D"] * 4)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
             patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu")

# Model sizes the full-size code path can build. "small" is SDXL's topology (three UNet levels, text-time
# embedding, two text encoders, a ViT image encoder, the same adapters) at narrow widths (head dim still
# 64): it runs the very same build / pipeline / layout-writing code in seconds on a CPU, which is what
# `gpu_suite.py --dry-run` uses to prove the GPU run works before device time is spent on it.
SIZES = {
    "full": dict(unet=SDXL_UNET, vae=SDXL_VAE, te1=CLIP_L, te2=CLIP_BIGG, vit=VIT_H, plus_dim=1280),
    "small": dict(
        unet={**SDXL_UNET, "attention_head_dim": [1, 2, 4], "block_out_channels": [64, 128, 256],
              "cross_attention_dim": 64 + 128, "projection_class_embeddings_input_dim": 6 * 256 + 128,
              "transformer_layers_per_block": [1, 1, 2]},
        vae={**SDXL_VAE, "block_out_channels": [32, 64, 64, 64], "layers_per_block": 1},
        te1={**CLIP_L, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 2, "projection_dim": 64},
        te2={**CLIP_BIGG, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 2, "projection_dim": 128},
        vit={**VIT_H, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
             "projection_dim": 64},
        plus_dim=128),
}


def tflop(width: int, height: int, images: int, steps: int, cfg: bool) -> float:
    scale = width * height / 1024**2
    return scale * images * (UNET_TFLOP_1024 * steps * (2 if cfg else 1) + VAE_TFLOP_1024)


def peak_mem_gb(device: str) -> float:
    import torch
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB -> GB (process peak RSS)


# ---------------------------------------------------------------------------------------------------
def bench_tiny(args) -> None:
    import torch
    torch.set_num_threads(args.threads)
    from generate_twin import DigitalTwinGenerator, GenerationRequest
    from tests.fixtures.models import arcface_vectors, make_crops
    from utils.config import Settings

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        from model_loader import make_tiny
        root = make_tiny(Path(tmp) / "tiny")
        t_build = time.perf_counter() - t0
        print(f"tiny model build: {t_build:.2f} s, torch threads {torch.get_num_threads()}")
        configs = [  # (variant, quality_mode, num_images, combine)
            ("plus-face", "fast", 1, "average"), ("plus-face", "fast", 4, "average"),
            ("plus-face", "balanced", 1, "average"), ("plus-face", "balanced", 4, "average"),
            ("plus-face", "balanced", 1, "stack"), ("plus-face", "high_fidelity", 1, "average"),
            ("plain", "balanced", 1, "average"), ("faceid", "balanced", 1, "average"),
            ("faceid-plusv2", "balanced", 1, "average"), ("instantid", "balanced", 1, "average"),
            ("instantid", "fast", 1, "average"),
        ]
        gens = {}
        print(f"{'variant':10} {'mode':14} {'n':>2} {'combine':8} {'steps':>5} {'median s':>9} {'min s':>7} "
              f"{'it/s':>6} {'identity s':>10}")
        for variant, mode, n, combine in configs:
            if variant not in gens:
                s = Settings(data_dir=Path(tmp), model_dir=Path(tmp) / "none", tiny_model_dir=root,
                             model_profile="tiny", ip_adapter_variant=variant, warmup=True)
                t0 = time.perf_counter()
                gens[variant] = DigitalTwinGenerator(s).setup()
                print(f"  setup {variant}: {time.perf_counter() - t0:.2f} s (incl. warm-up)")
            g = gens[variant]
            t0 = time.perf_counter()
            ident = g.build_identity(make_crops(5), arcface_vectors(5), face_model="bench", combine=combine,
                                     embedding_norms=[20.0] * 5)
            t_ident = time.perf_counter() - t0
            req = GenerationRequest.from_dict({"prompt": "a portrait photo of a person", "num_images": n, "seed": 1,
                                               "quality_mode": mode}, g.settings).with_identity(ident)
            times, meta = [], None
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                meta = g.generate(req).metadata
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            print(f"{variant:10} {mode:14} {n:>2} {combine:8} {meta['steps']:>5} {med:>9.3f} {min(times):>7.3f} "
                  f"{meta['steps'] / med:>6.1f} {t_ident:>10.3f}")
        print(f"peak RSS {peak_mem_gb('cpu'):.2f} GB")


# ---------------------------------------------------------------------------------------------------
def _init_random(module, dtype, device, seed: int) -> None:
    """Materialise a meta-built module with random weights (norm scales 1, biases 0)."""
    import torch
    # Cast before drawing: an fp32 copy of SDXL would double the peak memory of the build (14 GB for the UNet
    # and text encoders) for nothing.
    module.to_empty(device=device)
    module.to(dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        for name, b in module.named_buffers():
            if "position_ids" in name:
                b.copy_(torch.arange(b.shape[-1], device=device).expand_as(b))


# What each identity variant adds at full size (InstantID: 16 tokens of width 1280 over the 512-d ArcFace
# vector, and an IdentityNet ControlNet shaped like SDXL's UNet encoder).
VARIANT_ADAPTER = {"plus-face": dict(plus_tokens=16, plus_dim=1280), "plain": {}, "faceid": {},
                   "faceid-plusv2": {}, "instantid": dict(plus_tokens=16, plus_dim=1280)}
VARIANT_ENCODER = {"plus-face": True, "plain": True, "faceid": False, "faceid-plusv2": True, "instantid": False}
FACEID_LORA_RANK = 128   # h94's FaceID SDXL LoRAs


def variant_param_counts(variant: str) -> dict[str, int]:
    """Full-size parameter counts for one variant, built on the meta device (no memory, no download)."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from model_loader import adapter_tensors
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        counts = {"unet": sum(p.numel() for p in unet.parameters())}
        if VARIANT_ENCODER[variant]:
            enc = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H))
            counts["image_encoder"] = sum(p.numel() for p in enc.parameters())
        if variant == "instantid":
            net = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
            counts["identitynet"] = sum(p.numel() for p in net.parameters())
    sd = adapter_tensors(unet, variant, None, img_hidden=VIT_H["hidden_size"], img_proj=VIT_H["projection_dim"],
                         meta=True, **VARIANT_ADAPTER[variant])
    n = 0
    for k, v in sd.items():
        # The file's LoRA rank (128) instead of the builder's 4.
        n += v.numel() // 4 * FACEID_LORA_RANK if "_lora." in k else v.numel()
    counts["adapter"] = n
    return counts


def bench_variants(args) -> None:
    """Side by side per identity variant: tiny CPU seconds per image (balanced) and full-size size."""
    import torch
    torch.set_num_threads(args.threads)
    from generate_twin import DigitalTwinGenerator, GenerationRequest
    from model_loader import make_tiny
    from tests.fixtures.models import arcface_vectors, make_crops
    from utils.config import Settings
    fixed = {}
    with torch.device("meta"):
        from diffusers import AutoencoderKL
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
        for k, m in (("vae", AutoencoderKL(**SDXL_VAE)), ("te1", CLIPTextModel(CLIPTextConfig(**CLIP_L))),
                     ("te2", CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)))):
            fixed[k] = sum(p.numel() for p in m.parameters())
    base_rest = sum(fixed.values())
    print(f"{'variant':14} {'tiny s/img':>10} {'steps':>5} {'cfg':>4} {'adapter M':>9} {'encoder M':>9} "
          f"{'ControlNet M':>12} {'total B':>7} {'fp16 weights GB':>15} {'UNet-side B/step':>16}")
    with tempfile.TemporaryDirectory() as tmp:
        root = make_tiny(Path(tmp) / "tiny")
        for variant in ("plus-face", "faceid", "faceid-plusv2", "instantid"):
            s = Settings(data_dir=Path(tmp), model_dir=Path(tmp) / "none", tiny_model_dir=root, model_profile="tiny",
                         ip_adapter_variant=variant, warmup=True)
            g = DigitalTwinGenerator(s).setup()
            ident = g.build_identity(make_crops(3), arcface_vectors(3), face_model="bench", embedding_norms=[20.0] * 3)
            req = GenerationRequest.from_dict({"prompt": "a portrait photo of a person", "seed": 1}, s).with_identity(ident)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                meta = g.generate(req).metadata
                times.append(time.perf_counter() - t0)
            c = variant_param_counts(variant)
            total = sum(c.values()) + base_rest
            # Parameters run per denoising step (per CFG half): the UNet plus the IdentityNet for InstantID.
            per_step = c["unet"] + c.get("identitynet", 0)
            print(f"{variant:14} {statistics.median(times):>10.3f} {meta['steps']:>5} {meta['guidance_scale']:>4} "
                  f"{c['adapter'] / 1e6:>9.1f} {c.get('image_encoder', 0) / 1e6:>9.1f} "
                  f"{c.get('identitynet', 0) / 1e6:>12.1f} {total / 1e9:>7.3f} {total * 2 / 1e9:>15.2f} "
                  f"{per_step / 1e9:>16.3f}")
    print("fp16 weights GB = parameters x 2 bytes (activations come on top: measure with --full-size on a GPU)")


def build_random_parts(dtype, device: str, variant: str = "plus-face", size: str = "full", meta_only: bool = False,
                       seed: int = 0):
    """The SDXL modules of ``size`` with random weights, materialised directly on ``device`` (no 3.5 B
    parameters on the CPU first): unet, vae, text_encoder(_2), image_encoder (variants that use it) and the
    InstantID IdentityNet. Returns (parts, parameter counts)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig, \
        CLIPVisionModelWithProjection
    cfg = SIZES[size]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg["unet"])
        parts = {"unet": unet, "vae": AutoencoderKL(**cfg["vae"]),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["te1"])),
                 "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**cfg["te2"]))}
        if VARIANT_ENCODER[variant]:
            parts["image_encoder"] = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg["vit"]))
        if variant == "instantid":
            from instantid import IdentityNet
            parts["identitynet"] = IdentityNet.from_unet(unet, load_weights_from_unet=False)
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    if not meta_only:
        for i, m in enumerate(parts.values()):
            _init_random(m, dtype, device, seed=seed + i)
    return parts, counts


def random_adapter(unet, variant: str, dtype, size: str = "full", seed: int = 0) -> dict:
    """IP-Adapter weights for ``variant`` in the original repos' flat key layout (image_proj.* / ip_adapter.*)."""
    import torch
    from model_loader import adapter_tensors
    cfg = SIZES[size]
    kw = dict(VARIANT_ADAPTER[variant])
    if "plus_dim" in kw:
        kw["plus_dim"] = cfg["plus_dim"]
    return adapter_tensors(unet, variant, torch.Generator().manual_seed(seed), img_hidden=cfg["vit"]["hidden_size"],
                           img_proj=cfg["vit"]["projection_dim"], dtype=dtype, **kw)


def bench_tokenizers():
    """Byte-level tokenizers: ids stay inside the real vocab, and prompt length (77 tokens) is what counts."""
    from utils.models.tiny import tiny_tokenizer
    tok, _ = tiny_tokenizer()
    tok2, _ = tiny_tokenizer(pad_token="!")
    return tok, tok2


def bench_scheduler():
    from diffusers import EulerDiscreteScheduler
    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                  timestep_spacing="leading")


def build_full_size(dtype, device: str, meta_only: bool = False, fuse_qkv: bool = False, variant: str = "plus-face",
                    size: str = "full"):
    import torch
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPImageProcessor

    parts, counts = build_random_parts(dtype, device, variant, size, meta_only=meta_only)
    if meta_only:
        return None, counts
    tok, tok2 = bench_tokenizers()
    common = dict(vae=parts["vae"], text_encoder=parts["text_encoder"], text_encoder_2=parts["text_encoder_2"],
                  tokenizer=tok, tokenizer_2=tok2, unet=parts["unet"], scheduler=bench_scheduler(),
                  image_encoder=parts.get("image_encoder"), feature_extractor=CLIPImageProcessor(size=224, crop_size=224))
    if variant == "instantid":
        from diffusers import StableDiffusionXLControlNetPipeline
        pipe = StableDiffusionXLControlNetPipeline(controlnet=parts["identitynet"], **common)
    else:
        pipe = StableDiffusionXLPipeline(**common)
    sd = random_adapter(parts["unet"], variant, dtype, size)
    ipa = {"image_proj": {}, "ip_adapter": {}}
    for k, v in sd.items():
        top, rest = k.split(".", 1)
        ipa[top][rest] = v
    if fuse_qkv:
        # Before load_ip_adapter: fusing installs FusedAttnProcessor2_0 everywhere and would drop IP-Adapter's.
        pipe.fuse_qkv_projections()
    pipe.load_ip_adapter(ipa, subfolder="", weight_name="",
                         image_encoder_folder="image_encoder" if VARIANT_ENCODER[variant] else None)
    counts["ip_adapter"] = sum(v.numel() for v in sd.values())
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, counts


def gpu_name(device: str) -> str:
    import torch
    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"


def write_row(path, row: dict) -> None:
    """One JSON line per measured result, written (and flushed) the moment it exists: a run killed later
    still leaves everything measured before."""
    if path:
        import json
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


def bench_full(args) -> None:
    import torch
    from PIL import Image
    from model_loader import dpmpp_karras, few_step_scheduler
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("float16" if device.startswith("cuda") else "bfloat16"))
    if device == "cpu":
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pipe, counts = build_full_size(dtype, device, meta_only=args.meta, fuse_qkv=args.fuse_qkv, variant=args.variant,
                                   size=args.size)
    for k, n in counts.items():
        print(f"{k:15} {n / 1e9:.3f} B parameters")
    if args.meta:
        return
    t_build = time.perf_counter() - t0
    print(f"built {args.size} models on {device}/{str(dtype).replace('torch.', '')} in {t_build:.1f} s")
    if device.startswith("cuda"):
        weights_gb = torch.cuda.memory_allocated() / 1e9
        print(f"GPU memory after build: {weights_gb:.2f} GB allocated")
    if args.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if args.vae_tiling:
        pipe.vae.enable_tiling()
    if args.compile:
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune-no-cudagraphs")
    res = 128 if args.smoke else args.resolution
    modes = ["few-step"] if args.few_step else args.modes
    embeds_cfg = None
    if args.variant in ("plus-face", "plain"):
        with torch.inference_mode():
            embeds_cfg = pipe.prepare_ip_adapter_image_embeds([[Image.new("RGB", (256, 256), (120, 90, 80))]], None,
                                                              device, 1, True)
    else:   # ArcFace variants: [zeros; a 512-d vector]
        v = torch.randn(1, 1, 1, 512, generator=torch.Generator().manual_seed(1)) * 20
        e = torch.cat([torch.zeros_like(v), v]).to(device=device, dtype=dtype)
        embeds_cfg = [e if args.variant != "faceid" else e[:, :, 0]]
    if args.variant == "faceid-plusv2":
        with torch.inference_mode():
            clip = pipe.prepare_ip_adapter_image_embeds([[Image.new("RGB", (256, 256), (120, 90, 80))]], None,
                                                        device, 1, True)[0]
        proj = pipe.unet.encoder_hid_proj.image_projection_layers[0]
        proj.shortcut, proj.shortcut_scale = True, 1.0
    pipe.set_ip_adapter_scale(0.7)
    base_config = dict(pipe.scheduler.config)   # each mode's scheduler from the base one (no Karras carry-over)
    print(f"{'mode':8} {'batch':>5} {'res':>9} {'steps':>5} {'cfg':>3} {'seconds':>8} {'it/s':>6} {'TFLOP/s':>8} "
          f"{'% peak':>6} {'peak mem GB':>11}")
    for mode in modes:
        cfg = mode != "few-step"
        steps = 2 if args.smoke else (args.steps if cfg else 4)
        pipe.scheduler = (dpmpp_karras if cfg else few_step_scheduler)(base_config)
        embeds = [e if cfg else e[1:] for e in embeds_cfg]
        for batch in args.batch:
            extra = {}
            if args.variant == "instantid":
                from instantid import identity_tokens, pose_image
                pipe.controlnet.identity_tokens = identity_tokens(pipe.unet, embeds[0] if cfg else torch.cat(
                    [torch.zeros_like(embeds[0]), embeds[0]]), batch, cfg)
                extra = {"image": pose_image("frontal", res, res), "controlnet_conditioning_scale": 0.8}
            if args.variant == "faceid-plusv2":
                neg, pos = clip[:1].repeat(batch, 1, 1, 1), clip[1:2].repeat(batch, 1, 1, 1)
                proj.clip_embeds = torch.cat([neg, pos]) if cfg else pos

            def run():
                with torch.inference_mode():
                    return pipe(prompt="a portrait photo of a person", negative_prompt="lowres", width=res,
                                height=res, num_inference_steps=steps, guidance_scale=6.0 if cfg else 0.0,
                                num_images_per_prompt=batch, ip_adapter_image_embeds=embeds, output_type="pil",
                                generator=torch.Generator("cpu").manual_seed(0), **extra)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t_warm = time.perf_counter()
            for _ in range(args.warmup):
                run()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t_warm = time.perf_counter() - t_warm
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = run()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            assert len(out.images) == batch and out.images[0].size == (res, res), (len(out.images), out.images[0].size)
            sec = statistics.median(times)
            # The FLOP model is SDXL's: at the small size the rate would be meaningless (0 = not reported).
            tf = tflop(res, res, batch, steps, cfg) / sec if args.size == "full" else 0.0
            pct = f"{100 * tf / args.peak_tflops:6.1f}" if args.peak_tflops and tf else "     -"
            peak = peak_mem_gb(device)
            print(f"{mode:8} {batch:>5} {f'{res}x{res}':>9} {steps:>5} {'yes' if cfg else 'no':>3} {sec:>8.2f} "
                  f"{steps / sec:>6.2f} {tf:>8.3g} {pct} {peak:>11.2f}")
            write_row(args.jsonl, {
                "part": "A", "variant": args.variant, "size": args.size, "mode": mode, "batch": batch,
                "resolution": res, "steps": steps, "cfg": cfg, "seconds": round(sec, 4),
                "s_per_image": round(sec / batch, 4), "times": [round(t, 4) for t in times],
                "warmup_s": round(t_warm, 3), "it_s": round(steps / sec, 3),
                "tflop": round(tflop(res, res, batch, steps, cfg), 3) if tf else None, "tflops": round(tf, 2) if tf else None,
                "pct_peak": round(100 * tf / args.peak_tflops, 1) if args.peak_tflops and tf else None,
                "peak_mem_gb": round(peak, 3),
                "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 3) if device.startswith("cuda") else None,
                "build_s": round(t_build, 2), "device": device, "gpu": gpu_name(device),
                "dtype": str(dtype).replace("torch.", ""), "params_b": round(sum(counts.values()) / 1e9, 3)})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full-size", action="store_true", help="real-size SDXL with random weights")
    ap.add_argument("--tiny-only", action="store_true", help="skip the full-size run even when CUDA is present")
    ap.add_argument("--smoke", action="store_true", help="full-size models, 128², 2 steps, batch 1")
    ap.add_argument("--meta", action="store_true", help="only build the full-size configs on the meta device")
    ap.add_argument("--device", help="cuda | cpu (default: cuda when present)")
    ap.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), help="default fp16 on CUDA, bf16 on CPU")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="device peak (e.g. 989 for H100 SXM dense fp16)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--fuse-qkv", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet (warm-up absorbs compile time)")
    ap.add_argument("--vae-tiling", action="store_true")
    ap.add_argument("--few-step", action="store_true", help="4 steps, Euler trailing, no CFG (Lightning-style)")
    ap.add_argument("--variant", default="plus-face", choices=tuple(VARIANT_ADAPTER),
                    help="identity variant of the full-size run (instantid adds the SDXL-sized IdentityNet)")
    ap.add_argument("--modes", nargs="+", default=["cfg"], choices=("cfg", "few-step"),
                    help="rows per batch: cfg (--steps, CFG, DPM++ 2M Karras) and/or few-step (4 steps, no CFG)")
    ap.add_argument("--size", default="full", choices=tuple(SIZES),
                    help="full = real SDXL sizes; small = the same topology, narrow (CPU dry run of this code path)")
    ap.add_argument("--jsonl", help="append one JSON line per measured row to this file (flushed at once)")
    ap.add_argument("--variants", action="store_true",
                    help="per variant: tiny CPU s/image and full-size parameter counts / fp16 weight memory")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from model_loader import quiet_libraries
    with quiet_libraries():
        if args.variants:
            bench_variants(args)
        elif args.full_size or args.smoke or args.meta:
            if args.smoke:
                args.batch, args.repeats, args.warmup = [1], 1, 0
            bench_full(args)
        else:
            bench_tiny(args)
            import torch
            if torch.cuda.is_available() and not args.tiny_only:
                print("\nCUDA present: full-size SDXL (random weights)")
                bench_full(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
