"""The preflight of a FLUX.1 folder (``verify`` for a ``FluxLayout``): every weight file by its header against
what the code builds from the folder's own config.json (the transformer, T5, CLIP-L and the VAE on the meta
device), sharded components shard by shard through their index JSON (a shard the index names but the folder
lacks, a key in the wrong shard, a tensor of the wrong shape or dtype), both tokenizers (loadable, and no
more tokens than their encoder has embedding rows), the 8-step LoRA and the FLUX style LoRAs (through
diffusers' own XLabs / kohya conversion), and single-file FLUX transformers (original BFL key names go
through diffusers' conversion, as ``from_single_file`` does)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from utils.models.filecheck import (FileCheck, compare, compare_header, corrupt, dtype_check, meta_model, open_header,
                                    rel_path)
from utils.models.kinds import checkpoint_family, flux_is_guidance_distilled, lora_family
from utils.models.layout import FluxLayout
from utils.models.load import quiet_libraries
from utils.models.lora_check import verify_lora
from utils.models.onnx_check import verify_restore_models

# (folder, weight stem, how to build it from the folder: "diffusers" config or a transformers config class)
COMPONENTS = (("transformer", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
              ("text_encoder", "model"), ("text_encoder_2", "model"))


def verify_flux_layout(layout: FluxLayout, meta: dict[str, Any] | None = None) -> list[FileCheck]:
    """``meta``: filled with the components built on the meta device (the identity method's checks read the
    transformer's config from it)."""
    meta = {} if meta is None else meta
    with quiet_libraries():
        checks = []
        for sub, stem in COMPONENTS:
            checks += verify_component(layout.base, sub, stem, meta)
        checks += verify_flux_tokenizers(layout.base, meta)
        if "transformer" in meta:
            checks += verify_flux_loras(layout, meta)
            checks += verify_flux_checkpoints(layout, meta["transformer"])
    checks += verify_restore_models(layout.restore_dir)
    return checks


def _build(base: Path, sub: str):
    """The component of ``sub`` on the meta device, from its config.json."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    folder = str(base / sub)
    if sub == "transformer":
        cfg = FluxTransformer2DModel.load_config(folder)
        return meta_model(lambda: FluxTransformer2DModel.from_config(cfg))
    if sub == "vae":
        cfg = AutoencoderKL.load_config(folder)
        return meta_model(lambda: AutoencoderKL.from_config(cfg))
    if sub == "text_encoder":
        cfg = CLIPTextConfig.from_pretrained(folder)
        return meta_model(lambda: CLIPTextModel(cfg))
    cfg = T5Config.from_pretrained(folder)
    return meta_model(lambda: T5EncoderModel(cfg))


def expected_shapes(model) -> dict[str, tuple]:
    """The state dict's names and shapes, without tied aliases (T5's encoder.embed_tokens is ``shared``)."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}


def verify_component(base: Path, sub: str, stem: str, meta: dict[str, Any]) -> list[FileCheck]:
    folder = base / sub
    if not (folder / "config.json").is_file():
        return [FileCheck(rel_path(folder / "config.json", base), "missing")]
    try:
        meta[sub] = _build(base, sub)
    except Exception as e:  # an unreadable or inconsistent config: from_pretrained fails the same way
        return [corrupt(rel_path(folder / "config.json", base), e)]
    expected = expected_shapes(meta[sub])
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        return verify_shards(base, index, expected, _aliases(meta[sub]))
    path = folder / f"{stem}.safetensors"
    return [compare(rel_path(path, base), path, expected)]


def _aliases(model) -> set[str]:
    return set(getattr(model, "all_tied_weights_keys", None) or {})


def verify_shards(base: Path, index: Path, expected: dict[str, tuple], aliases: set[str]) -> list[FileCheck]:
    """A sharded component: the index JSON, then each shard it names against the keys the index puts there."""
    rel_index = rel_path(index, base)
    try:
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    except Exception as e:  # not JSON, or no weight_map: from_pretrained cannot find the shards either
        return [corrupt(rel_index, e)]
    weight_map = {k: v for k, v in weight_map.items() if k not in aliases}
    absent = sorted(set(expected) - set(weight_map))
    extra = sorted(set(weight_map) - set(expected))
    if absent:
        checks = [FileCheck(rel_index, "missing_key", f"key {absent[0]!r} is in no shard ({len(absent)} such keys)")]
    elif extra:
        checks = [FileCheck(rel_index, "unexpected_key", f"key {extra[0]!r} is not built by the code "
                                                         f"({len(extra)} such keys)")]
    else:
        checks = [FileCheck(rel_index, "ok", f"{len(weight_map)} keys in {len(set(weight_map.values()))} shards")]
    for shard in sorted(set(weight_map.values())):
        path = index.parent / shard
        rel = rel_path(path, base)
        got = open_header(rel, path)
        if isinstance(got, FileCheck):
            if got.status == "missing":
                got = dataclasses.replace(got, detail=f"a shard {index.name} names")
            checks.append(got)
            continue
        got = {k: v for k, v in got.items() if k not in aliases}
        want = {k: expected[k] for k, s in weight_map.items() if s == shard and k in expected}
        checks.append(compare_header(rel, got, want))
    return checks


def verify_flux_tokenizers(base: Path, meta: dict[str, Any]) -> list[FileCheck]:
    from utils.models.verify import verify_tokenizer
    checks = [verify_tokenizer(base / "tokenizer", rel_path(base / "tokenizer", base), meta.get("text_encoder"))]
    checks.append(verify_t5_tokenizer(base / "tokenizer_2", rel_path(base / "tokenizer_2", base),
                                      meta.get("text_encoder_2")))
    return checks


def verify_t5_tokenizer(folder: Path, rel: str, encoder) -> FileCheck:
    """T5's tokenizer: tokenizer.json or spiece.model (the hub ships both), loadable, with no more tokens than
    T5's embedding has rows (T5 v1.1 pads its embedding to 32128 rows for 32100 tokens: fewer is right)."""
    if not any((folder / f).is_file() for f in ("tokenizer.json", "spiece.model")):
        return FileCheck(rel, "missing", "neither tokenizer.json nor spiece.model")
    from transformers import T5TokenizerFast
    try:
        tok = T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)
        size = len(tok)
        tok("a portrait photo")
    except Exception as e:  # broken JSON, wrong model type: the pipeline's from_pretrained fails the same way
        return corrupt(rel, e)
    if encoder is None:
        return FileCheck(rel, "ok", f"{size} tokens (text encoder not checked)")
    rows = encoder.get_input_embeddings().weight.shape[0]
    if size > rows:
        return FileCheck(rel, "wrong_shape", f"vocab size {size}, more than the {rows} rows of T5's embedding")
    return FileCheck(rel, "ok", f"{size} tokens <= {rows} embedding rows")


def verify_flux_loras(layout: FluxLayout, meta: dict[str, Any]) -> list[FileCheck]:
    """The 8-step LoRA (optional; FLUX.1-dev) and the FLUX LoRAs of the LoRA folder (the other family's are
    named, not checked: they are checked with that family's folder)."""
    parts = {"transformer": meta["transformer"], "text_encoder": meta.get("text_encoder")}
    fast = layout.fast_lora_file
    if fast.is_file():
        checks = [verify_lora(fast, rel_path(fast, fast.parent), parts, family="flux")]
    else:
        checks = [FileCheck(rel_path(fast, fast.parent), "absent", "optional: quality_mode fast falls back to fewer "
                            "steps (python model_loader.py download --flux-dev fetches it)")]
    lora_dir = layout.lora_dir
    files = sorted(lora_dir.glob("*.safetensors")) if lora_dir.is_dir() else []
    for f in files:
        family = lora_family(f)
        if family == "sdxl":
            checks.append(FileCheck(rel_path(f, lora_dir), "skipped", "an sdxl LoRA (checked with an sdxl profile)"))
        else:
            checks.append(verify_lora(f, rel_path(f, lora_dir), parts, family="flux"))
    if all(c.status == "skipped" for c in checks[1:]):
        checks.append(FileCheck(str(lora_dir), "absent", "optional: no style LoRAs of the flux family "
                                                         "(<name>.safetensors; TWIN_LORA_DIR)"))
    return checks


def verify_flux_checkpoints(layout: FluxLayout, transformer) -> list[FileCheck]:
    """Single-file FLUX transformers of the checkpoints folder that load against this folder (same guidance
    embedding); a warning only (``blocking=False``): only POST /models/load reads one."""
    folder = layout.checkpoints
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    checks = []
    dev = bool(transformer.config.guidance_embeds)
    for f in files:
        rel = rel_path(f, folder)
        if checkpoint_family(f) != "flux":
            continue
        if flux_is_guidance_distilled(f) != dev:
            checks.append(FileCheck(rel, "skipped", f"a {'dev' if not dev else 'schnell'}-type transformer: checked "
                                                    "with that folder"))
            continue
        checks.append(dataclasses.replace(verify_flux_checkpoint(f, rel, transformer), blocking=False))
    return checks or [FileCheck(str(folder), "absent", "optional: no single-file FLUX checkpoints")]


def verify_flux_checkpoint(path: Path, rel: str, transformer) -> FileCheck:
    """One transformer file: diffusers key names compared directly; original (BFL) names through diffusers'
    own conversion on the header (as from_single_file converts them)."""
    got = open_header(rel, path)
    if isinstance(got, FileCheck):
        return got
    expected = expected_shapes(transformer)
    if any(k.startswith("transformer_blocks.") for k in got):
        return compare_header(rel, got, expected)
    import torch
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    names = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F8_E4M3": torch.float8_e4m3fn}
    fake = {k: torch.empty(shape, dtype=names.get(dt, torch.float32), device="meta") for k, (shape, dt) in got.items()}
    try:
        converted = convert_flux_transformer_checkpoint_to_diffusers(dict(fake))
    except Exception as e:  # a key the conversion needs is missing, or a shape it cannot split
        return FileCheck(rel, "unexpected_key", f"diffusers cannot convert the file: {type(e).__name__}: {str(e)[:160]}")
    check = compare_header(rel, {k: (tuple(v.shape), got_dtype(v)) for k, v in converted.items()}, expected)
    return check if not check.ok else dtype_check(rel, got, " (original BFL key names)")


def got_dtype(t) -> str:
    return str(t.dtype)
