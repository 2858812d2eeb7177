"""Checking and loading InfiniteYou's files (utils/models/infiniteyou.py says what they are): one FileCheck per
file (InfuseNet's config and its weights, sharded or not, against the model its config builds on the meta
device; the projection against the Resampler its own sizes give, output = the transformer's
joint_attention_dim; IR-SE50 against the network its widths give), and the loader that refuses the first
broken file with that line."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from utils.errors import ModelWeightsMissing
from utils.models.filecheck import FileCheck, corrupt, read_header
from utils.models.flux_verify import verify_shards
from utils.models.infiniteyou import (ID_DIM, InfiniteYouFiles, build_projection, infusenet_class, projection_sizes,
                                      projection_state)


# --- checks --------------------------------------------------------------------------------------------
def check_files(files: InfiniteYouFiles, transformer_config: dict[str, Any] | None = None) -> list[FileCheck]:
    """One line per file: InfuseNet's config and weights (against the config), the projection (against the
    Resampler its own sizes give, output = the transformer's joint_attention_dim) and IR-SE50."""
    return [*_check_infusenet(files, transformer_config), _check_projection(files, transformer_config),
            _check_arcface(files)]


def _missing(files: InfiniteYouFiles, p: Path) -> FileCheck:
    return FileCheck(files.rel(p), "missing", f"run: python model_loader.py download --infiniteyou --stage {files.stage}")


def _check_infusenet(files: InfiniteYouFiles, tcfg: dict[str, Any] | None) -> list[FileCheck]:
    cfg_path, weights = files.infusenet_dir / "config.json", files.infusenet_dir / "diffusion_pytorch_model.safetensors"
    index = weights.with_name(weights.name + ".index.json")
    if not cfg_path.is_file():
        return [_missing(files, cfg_path)]
    try:
        cls = infusenet_class()
        config = cls.load_config(str(files.infusenet_dir))
        with _meta():
            model = cls.from_config(config)
    except Exception as e:
        return [corrupt(files.rel(cfg_path), e)]
    out = [FileCheck(files.rel(cfg_path), "ok", f"{config.get('num_layers')} double + "
                     f"{config.get('num_single_layers')} single blocks")]
    if tcfg and config.get("joint_attention_dim") != tcfg.get("joint_attention_dim"):
        out[0] = FileCheck(files.rel(cfg_path), "wrong_shape", f"joint_attention_dim {config.get('joint_attention_dim')}"
                           f" != the transformer's {tcfg.get('joint_attention_dim')}")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if index.is_file():      # the published InfuseNet is two shards and an index
        return out + [dataclasses.replace(c, path=files.rel(files.infusenet_dir / c.path.split("/", 1)[1]))
                      for c in verify_shards(files.infusenet_dir, index, expected, set())]
    if not weights.is_file():
        return out + [_missing(files, index)]
    out.append(_compare(files.rel(weights), weights, expected))
    return out


def _check_projection(files: InfiniteYouFiles, tcfg: dict[str, Any] | None) -> FileCheck:
    rel = files.rel(files.projection)
    if not files.projection.is_file():
        return _missing(files, files.projection)
    try:
        shapes = {k: v for k, v in read_header(files.projection).items()}
        sizes = projection_sizes(shapes)
    except Exception as e:
        return corrupt(rel, e)
    out_dim = (tcfg or {}).get("joint_attention_dim", sizes["out_dim"])
    want = {"image_proj." + k: v for k, v in _resampler_shapes(sizes["width"], out_dim, sizes["tokens"],
                                                                sizes["depth"]).items()}
    return _compare(rel, files.projection, want, shapes)


def _resampler_shapes(width: int, out_dim: int, tokens: int, depth: int) -> dict[str, tuple]:
    t = {"latents": (1, tokens, width), "proj_in.weight": (width, ID_DIM), "proj_in.bias": (width,),
         "proj_out.weight": (out_dim, width), "proj_out.bias": (out_dim,), "norm_out.weight": (out_dim,),
         "norm_out.bias": (out_dim,)}
    for i in range(depth):
        p = f"layers.{i}."
        t.update({p + "0.norm1.weight": (width,), p + "0.norm1.bias": (width,), p + "0.norm2.weight": (width,),
                  p + "0.norm2.bias": (width,), p + "0.to_q.weight": (width, width),
                  p + "0.to_kv.weight": (2 * width, width), p + "0.to_out.weight": (width, width),
                  p + "1.0.weight": (width,), p + "1.0.bias": (width,), p + "1.1.weight": (4 * width, width),
                  p + "1.3.weight": (width, 4 * width)})
    return t


def _check_arcface(files: InfiniteYouFiles) -> FileCheck:
    rel = str(files.arcface)
    if not files.arcface.is_file():
        return FileCheck(rel, "missing", "IR-SE50 ArcFace: run: python model_loader.py download --infiniteyou")
    try:
        from utils.faces.irse50 import build, shape_from_state
        shapes = read_header(files.arcface)
        state = {k: _Shape(v[0]) for k, v in shapes.items()}
        widths, units = shape_from_state(state)
        want = {k: tuple(v.shape) for k, v in build(widths, units).state_dict().items()}
    except Exception as e:
        return corrupt(rel, e)
    return _compare(rel, files.arcface, want, shapes)


class _Shape:
    def __init__(self, shape) -> None:
        self.shape = tuple(shape)


def _compare(rel: str, path: Path, want: dict[str, tuple], shapes: dict[str, Any] | None = None) -> FileCheck:
    try:
        got = shapes if shapes is not None else read_header(path)
    except Exception as e:
        return corrupt(rel, e)
    got_shapes = {k: tuple(v[0]) for k, v in got.items()}
    for k, shape in want.items():
        if k not in got_shapes:
            return FileCheck(rel, "missing_key", k)
        if got_shapes[k] != tuple(shape):
            return FileCheck(rel, "wrong_shape", f"{k}: {list(got_shapes[k])} (expected {list(shape)})")
    extra = sorted(set(got_shapes) - set(want))
    if extra:
        return FileCheck(rel, "unexpected_key", extra[0])
    return FileCheck(rel, "ok", f"{len(want)} tensors")


def _meta():
    from accelerate import init_empty_weights
    return init_empty_weights()


# --- loading -------------------------------------------------------------------------------------------
def load_infiniteyou(files: InfiniteYouFiles, transformer_config: dict[str, Any], device: str, dtype):
    """(InfuseNet, projection, IR-SE50) of ``files`` on ``device``; ModelWeightsMissing naming the first file
    whose check fails."""
    import torch
    bad = [c for c in check_files(files, transformer_config) if not c.ok]
    if bad:
        raise ModelWeightsMissing(f"InfiniteYou ({files.stage}): {bad[0].line().strip()}",
                                  details={"file": bad[0].path})
    net = infusenet_class().from_pretrained(str(files.infusenet_dir), torch_dtype=dtype, local_files_only=True,
                                            use_safetensors=True).to(device)
    state = torch.load(str(files.projection), map_location="cpu", weights_only=True)["image_proj"]
    sizes = projection_sizes({"image_proj." + k: (tuple(v.shape),) for k, v in state.items()})
    proj = build_projection(**sizes)
    proj.load_state_dict(projection_state(state), strict=True)
    from utils.faces.irse50 import load as load_irse
    return net, proj.to(device=device, dtype=dtype).eval(), load_irse(files.arcface, device)
