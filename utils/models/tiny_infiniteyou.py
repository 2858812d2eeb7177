"""The tiny folder's InfiniteYou (for tiny-flux with TWIN_IP_ADAPTER_VARIANT=infiniteyou): both stages in the real
layout (``InfiniteYou/infu_flux_v1.0/<stage>/InfuseNetModel/`` + ``image_proj_model.bin`` as
``{"image_proj": ...}`` with the reference Resampler's key names), and a small IR-SE ArcFace under facexlib's file
name with its key names. Shape relations kept: InfuseNet is the tiny FLUX transformer's ControlNet (same widths,
joint_attention_dim = T5's width, fewer blocks, guidance embedding); the projection maps 512 -> T5's width with
8 queries; IR-SE keeps 112 px in, 512-d out. Written by ``tiny.make_tiny``; the names come from the readers."""
from __future__ import annotations

import json
from pathlib import Path

from utils.models.infiniteyou import (ARCFACE_DIR, ARCFACE_URL, INFU_DIR, INFU_VERSION_DIR, INFUSENET_SUB, PROJ_FILE,
                                      PROJ_TOKENS, STAGES, projection_state)
from utils.models.tiny_flux import TRANSFORMER

TINY_INFU_SEED = 20261206
TINY_PROJ_WIDTH = 64            # 1 head of 64 (the Resampler's head width is fixed)
TINY_IRSE_WIDTHS, TINY_IRSE_UNITS = (4, 6, 8, 10), (1, 1, 1, 1)   # widths grow: stages are told apart by width
INFUSENET = {**TRANSFORMER, "num_layers": 1, "num_single_layers": 2}   # fewer blocks than the transformer, as published (4 + 10 of 19 + 38)


def write_tiny_infiniteyou(root: Path) -> None:
    import torch
    from diffusers import FluxControlNetModel
    from utils.faces.irse50 import build
    from utils.models.infiniteyou import build_projection
    for i, stage in enumerate(STAGES):
        torch.manual_seed(TINY_INFU_SEED + i)
        d = Path(root) / INFU_DIR / INFU_VERSION_DIR / stage
        net = FluxControlNetModel(**INFUSENET)
        # ControlNets start with zero output convs; random ones so the residuals reach the image in tests.
        with torch.no_grad():
            for p in net.parameters():
                if not p.any():
                    p.normal_(0, 0.2)
        # Two shards and an index, as published (diffusion_pytorch_model-0000N-of-00002.safetensors).
        size = sum(p.numel() * p.element_size() for p in net.state_dict().values())
        net.save_pretrained(str(d / INFUSENET_SUB), safe_serialization=True, max_shard_size=size // 2 + 1)
        cfg = d / INFUSENET_SUB / "config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "_infu_flux_version": "1.0"}, indent=2) + "\n")
        proj = build_projection(width=TINY_PROJ_WIDTH, out_dim=TRANSFORMER["joint_attention_dim"], tokens=PROJ_TOKENS)
        torch.save({"image_proj": reference_state(proj.state_dict())}, str(d / PROJ_FILE))
    torch.manual_seed(TINY_INFU_SEED + 10)
    net = build(TINY_IRSE_WIDTHS, TINY_IRSE_UNITS)
    with torch.no_grad():     # BatchNorm statistics that are not the identity, so loading them matters
        for name, b in net.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    out = Path(root) / ARCFACE_DIR / Path(ARCFACE_URL).name
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), str(out))


def reference_state(state: dict) -> dict:
    """diffusers' IPAdapterPlusImageProjection keys -> the reference Resampler's (to_k/to_v fused as to_kv): the
    inverse of ``projection_state``, so the tiny file is in the published layout."""
    import torch
    out = {}
    names = {"ln0": "0.norm1", "ln1": "0.norm2", "attn.to_q": "0.to_q", "attn.to_out.0": "0.to_out", "ff.0": "1.0",
             "ff.1.net.0.proj": "1.1", "ff.1.net.2": "1.3"}
    for k, v in state.items():
        if not k.startswith("layers."):
            out[k] = v.clone()
            continue
        _, i, rest = k.split(".", 2)
        if rest.startswith("attn.to_v."):
            continue
        if rest.startswith("attn.to_k."):
            out[f"layers.{i}.0.to_kv.weight"] = torch.cat([v, state[f"layers.{i}.attn.to_v.weight"]]).clone()
            continue
        mod, leaf = rest.rsplit(".", 1)
        out[f"layers.{i}.{names[mod]}.{leaf}"] = v.clone()
    assert set(projection_state(out)) == set(state), "reference_state must invert projection_state"
    return out
