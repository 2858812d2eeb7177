"""InfiniteYou's files (``ByteDance/InfiniteYou``, ``infu_flux_v1.0/<stage>/``) and IR-SE50 ArcFace, found, checked
and loaded for the FLUX family (docs/infiniteyou.md holds the facts read from the public code):

* ``InfuseNetModel/``: a diffusers ``FluxControlNetModel`` folder (config.json + safetensors). Loaded as
  ``InfuseNet`` (``infusenet_class``): the same model, but it reads the 8 identity tokens, not the text, as its
  text stream, with zero text ids for them and the embedded guidance at 1.0, as the reference pipeline calls it.
* ``image_proj_model.bin``: ``{"image_proj": state}`` of a Resampler (1280 wide, 4 layers, 20 heads x 64, 8
  queries, 512 in, 4096 out = T5's width). Built as diffusers' ``IPAdapterPlusImageProjection`` (the same
  network) with the keys renamed (``projection_state``).
* IR-SE50 ArcFace (facexlib's ``recognition_arcface_ir_se50.pth``, utils/faces/irse50.py): the embedding the
  projection was trained on. antelopev2 (the face service's pack) only detects and gives the key points.

Each file's check names it and ``load_infiniteyou`` refuses a broken one with the same line (both in
utils/models/infiniteyou_load.py).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.config import Settings

INFU_VERSION_DIR = "infu_flux_v1.0"
STAGES = ("sim_stage1", "aes_stage2")
INFUSENET_SUB = "InfuseNetModel"
PROJ_FILE = "image_proj_model.bin"
INFU_DIR = "InfiniteYou"                 # inside model_dir (and the tiny folder), as the hub repo's name
ARCFACE_DIR = "facexlib"                 # IR-SE50 ArcFace weight file's folder inside model_dir
ARCFACE_URL = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/recognition_arcface_ir_se50.pth"
# The reference pipeline's Resampler (pipeline_infu_flux.py).
PROJ_TOKENS, PROJ_WIDTH, PROJ_DEPTH, PROJ_HEADS, PROJ_HEAD_DIM, ID_DIM = 8, 1280, 4, 20, 64, 512
INFUSENET_GUIDANCE = 1.0                 # the reference passes controlnet_guidance_scale=1.0 to InfuseNet


@dataclass(frozen=True)
class InfiniteYouFiles:
    """Where one stage's files are: ``root`` holds ``infu_flux_v1.0/<stage>/``; ``arcface`` the IR-SE50 file."""
    root: Path
    stage: str
    arcface: Path

    @property
    def stage_dir(self) -> Path:
        return self.root / INFU_VERSION_DIR / self.stage

    @property
    def infusenet_dir(self) -> Path:
        return self.stage_dir / INFUSENET_SUB

    @property
    def projection(self) -> Path:
        return self.stage_dir / PROJ_FILE

    def rel(self, p: Path) -> str:
        try:
            return f"{self.root.name}/{p.relative_to(self.root).as_posix()}"
        except ValueError:
            return str(p)


def infiniteyou_files(settings: Settings, tiny_root: Path | None = None) -> InfiniteYouFiles:
    """The configured stage's files: in the tiny folder (tiny-flux), else ``model_dir`` (or TWIN_ARCFACE_FILE)."""
    if tiny_root is not None:
        return InfiniteYouFiles(tiny_root / INFU_DIR, settings.infiniteyou_model, tiny_root / ARCFACE_DIR /
                                Path(ARCFACE_URL).name)
    arc = settings.arcface_file or Path(settings.model_dir) / ARCFACE_DIR / Path(ARCFACE_URL).name
    return InfiniteYouFiles(Path(settings.model_dir) / INFU_DIR, settings.infiniteyou_model, Path(arc))


def projection_state(state: dict[str, Any]) -> dict[str, Any]:
    """The reference Resampler's keys -> diffusers' IPAdapterPlusImageProjection's (to_kv split in two)."""
    import torch
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if parts[0] != "layers":
            out[k] = v
            continue
        i, sub, rest = parts[1], parts[2], ".".join(parts[3:])
        p = f"layers.{i}."
        if sub == "0":
            if rest.startswith("to_kv."):
                kk, vv = torch.chunk(v, 2, dim=0)
                out[p + "attn.to_k." + rest[6:]], out[p + "attn.to_v." + rest[6:]] = kk, vv
            else:
                name = {"norm1": "ln0", "norm2": "ln1", "to_q": "attn.to_q", "to_out": "attn.to_out.0"}[rest.split(".")[0]]
                out[p + name + "." + rest.split(".", 1)[1]] = v
        else:
            idx, tail = rest.split(".", 1)
            out[p + {"0": "ff.0", "1": "ff.1.net.0.proj", "3": "ff.1.net.2"}[idx] + "." + tail] = v
    return out


def build_projection(width: int = PROJ_WIDTH, out_dim: int = 4096, tokens: int = PROJ_TOKENS, depth: int = PROJ_DEPTH):
    from diffusers.models.embeddings import IPAdapterPlusImageProjection
    return IPAdapterPlusImageProjection(embed_dims=ID_DIM, output_dims=out_dim, hidden_dims=width, depth=depth,
                                        dim_head=PROJ_HEAD_DIM, heads=max(1, width // PROJ_HEAD_DIM),
                                        num_queries=tokens, ffn_ratio=4)


def projection_sizes(shapes: dict[str, tuple]) -> dict[str, int]:
    """Width, tokens, depth and output of a projection file from its own shapes (``image_proj.`` keys)."""
    lat = shapes["image_proj.latents"][0]
    depth = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("image_proj.layers."))
    return {"width": lat[2], "tokens": lat[1], "depth": depth, "out_dim": shapes["image_proj.proj_out.weight"][0][0]}


@functools.cache
def infusenet_class():
    """``InfuseNet``, built on first use (importing this module must not import diffusers)."""
    import torch
    from diffusers import FluxControlNetModel

    class InfuseNet(FluxControlNetModel):
        """InfiniteYou's InfuseNet: a FLUX ControlNet whose text stream is the identity tokens.

        Set ``identity_tokens`` ([batch, 8, 4096]) before a pipeline call and clear it after; a call without
        them is an error rather than a silent fall-back to the text."""

        identity_tokens = None

        def forward(self, hidden_states, controlnet_cond, *args, **kwargs):
            tokens = self.identity_tokens
            if tokens is None:
                raise RuntimeError("InfuseNet called without identity tokens")
            if tokens.shape[0] != hidden_states.shape[0]:
                raise RuntimeError(f"InfuseNet: {tokens.shape[0]} identity token rows for a batch of "
                                   f"{hidden_states.shape[0]}")
            kwargs["encoder_hidden_states"] = tokens.to(hidden_states.dtype)
            kwargs["txt_ids"] = torch.zeros(tokens.shape[1], 3, device=tokens.device, dtype=hidden_states.dtype)
            if self.config.guidance_embeds and kwargs.get("guidance") is not None:
                kwargs["guidance"] = torch.full_like(kwargs["guidance"], INFUSENET_GUIDANCE)
            return super().forward(hidden_states, controlnet_cond, *args, **kwargs)

    InfuseNet.__name__ = InfuseNet.__qualname__ = "InfuseNet"
    return InfuseNet
