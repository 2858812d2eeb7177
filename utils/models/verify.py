"""The preflight (``python model_loader.py verify``): every weight file the layout's profile and variant load,
opened header-only and compared with what the code will build, one ``FileCheck`` per file.

What a file must hold comes from the folder being checked and from the loading code, never from the tiny
builder: each SDXL component is built on the meta device from its own config.json, the adapter's keys and
shapes from ``adapters`` (the loader's view of each variant's file) for that UNet and image encoder, LoRAs
through diffusers' own key conversion, single-file checkpoints through ``single_file``'s key names."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from utils.models.adapters import adapter_shapes, file_sizes, lora_rank_dims
from utils.models.filecheck import (FileCheck, compare, compare_header, corrupt, dtype_check, meta_model, meta_state,
                                    open_header, rel_path, weight_file)
from utils.choices import ARCFACE_VARIANTS
from utils.models.layout import CONTROLNET_SUB, ENCODER_SUB, ENCODER_VARIANTS, ModelLayout
from utils.models.load import quiet_libraries
from utils.models.kinds import checkpoint_family, lora_family
from utils.models.lora_check import verify_lora
from utils.models.onnx_check import verify_face_pack, verify_restore_models
from utils.models.single_file import SINGLE_FILE_IGNORED, SINGLE_FILE_PARTS, single_file_shapes

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def verify_layout(layout: ModelLayout) -> list[FileCheck]:
    """One FileCheck per weight file the layout's profile and variant load (the folder must exist: see
    ``startup.verify``, which builds the tiny one first)."""
    meta: dict[str, Any] = {}      # component -> the model built on the meta device from its config.json
    with quiet_libraries():
        checks = verify_base(layout, meta) + verify_tokenizers(layout, meta)
        if "unet" not in meta:
            return checks          # nothing else can be checked without the UNet's config
        encoder, widths = verify_encoder(layout)
        checks += encoder
        checks.append(verify_adapter(layout, meta["unet"], **widths))
        if layout.variant == "instantid":
            checks.append(verify_identitynet(layout, meta["unet"]))
        if layout.vae_fix is not None:
            from utils.models.vae_fix import ensure_tiny_standin, verify_vae_fix
            if layout.profile == "tiny":
                ensure_tiny_standin(layout.vae_fix.parent, layout.base / "vae")
            checks += verify_vae_fix(layout.vae_fix, layout.base / "vae")
        checks += verify_loras(layout, meta)
        checks += verify_checkpoints(layout, meta)
    checks += verify_restore_models(layout.restore_dir)
    if layout.variant in ARCFACE_VARIANTS:
        checks += verify_face_pack(layout.face_pack)
    return checks


def verify_base(layout: ModelLayout, meta: dict[str, Any]) -> list[FileCheck]:
    """The SDXL components, each built from its config.json on the meta device (kept in ``meta``) and
    compared key by key with its weight file."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    components = [("unet", "diffusion_pytorch_model", UNet2DConditionModel.from_config, UNet2DConditionModel),
                  ("vae", "diffusion_pytorch_model", AutoencoderKL.from_config, AutoencoderKL),
                  ("text_encoder", "model", CLIPTextModel, CLIPTextConfig),
                  ("text_encoder_2", "model", CLIPTextModelWithProjection, CLIPTextConfig)]
    checks = []
    for sub, stem, build, cfg_cls in components:
        folder = layout.base / sub
        path = weight_file(folder, stem, layout.fp16)
        if not (folder / "config.json").is_file():
            checks.append(FileCheck(rel_path(folder / "config.json", layout.base), "missing"))
            continue
        cfg = cfg_cls.load_config(str(folder)) if cfg_cls in (UNet2DConditionModel, AutoencoderKL) \
            else cfg_cls.from_pretrained(str(folder))
        meta[sub] = meta_model(lambda: build(cfg))
        checks.append(compare(rel_path(path, layout.base), path,
                              {k: tuple(v.shape) for k, v in meta[sub].state_dict().items()}))
    return checks


def verify_tokenizers(layout: ModelLayout, meta: dict[str, Any]) -> list[FileCheck]:
    """The tokenizers: loadable, and exactly as many tokens as their text encoder has embedding rows."""
    return [verify_tokenizer(layout.base / sub, rel_path(layout.base / sub, layout.base), meta.get(encoder))
            for sub, encoder in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))]


def verify_tokenizer(folder: Path, rel: str, encoder) -> FileCheck:
    """A tokenizer folder: vocab.json + merges.txt (what the real repo ships) or tokenizer.json, loadable by
    CLIPTokenizer, with as many tokens as the text encoder has embedding rows (a larger vocabulary gives ids
    the embedding cannot look up; a smaller one is another model's tokenizer)."""
    classic = all((folder / f).is_file() for f in ("vocab.json", "merges.txt"))
    if not classic and not (folder / "tokenizer.json").is_file():
        return FileCheck(rel, "missing", "neither vocab.json + merges.txt nor tokenizer.json")
    from transformers import CLIPTokenizer
    try:
        tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        size = len(tok)
    except Exception as e:  # unreadable JSON, broken merges: the pipeline's from_pretrained fails the same way
        return corrupt(rel, e)
    if encoder is None:
        return FileCheck(rel, "ok", f"{size} tokens (text encoder not checked)")
    rows = encoder.get_input_embeddings().weight.shape[0]
    if size != rows:
        return FileCheck(rel, "wrong_shape", f"vocab size {size}, the text encoder's embedding has {rows} rows")
    return FileCheck(rel, "ok", f"{size} tokens = embedding rows")


def verify_encoder(layout: ModelLayout) -> tuple[list[FileCheck], dict[str, int]]:
    """The ViT-H image encoder (plus-face, plain, faceid-plusv2) against its config.json, and the widths the
    adapter file must fit (none when the variant has no encoder or its config is missing)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    if layout.variant not in ENCODER_VARIANTS:
        return [], {}
    top = layout.encoder_repo
    enc = top / ENCODER_SUB
    if not (enc / "config.json").is_file():
        return [FileCheck(rel_path(enc / "config.json", top), "missing")], {}
    vcfg = CLIPVisionConfig.from_pretrained(str(enc))
    path = enc / "model.safetensors"
    check = compare(rel_path(path, top), path, meta_state(lambda: CLIPVisionModelWithProjection(vcfg)))
    return [check], {"img_hidden": vcfg.hidden_size, "img_proj": vcfg.projection_dim}


def verify_adapter(layout: ModelLayout, unet, img_hidden: int | None = None, img_proj: int | None = None) -> FileCheck:
    """The adapter file: the keys and shapes the loader reads for this UNet and image encoder; the sizes it
    takes from the file itself (Resampler queries and width, FaceID multiplier, LoRA rank) are the file's."""
    path = layout.adapter_file
    rel = rel_path(path, layout.adapter_repo)
    got = open_header(rel, path)
    if isinstance(got, FileCheck):
        return got
    sizes = file_sizes(layout.variant, {k: shape for k, (shape, _) in got.items()}, img_hidden=img_hidden,
                       img_proj=img_proj)
    expected = adapter_shapes(unet, layout.variant, sizes)
    return compare_header(rel, got, expected, lora_rank_dims(expected))


def verify_identitynet(layout: ModelLayout, unet) -> FileCheck:
    """InstantID's IdentityNet: a ControlNet built from its config; it must fit this UNet."""
    from diffusers import ControlNetModel
    top = layout.adapter_repo
    folder = top / CONTROLNET_SUB
    if not (folder / "config.json").is_file():
        return FileCheck(rel_path(folder / "config.json", top), "missing")
    ccfg = ControlNetModel.load_config(str(folder))
    if ccfg.get("cross_attention_dim") != unet.config.cross_attention_dim:
        return FileCheck(rel_path(folder / "config.json", top), "wrong_shape",
                         f"cross_attention_dim {ccfg.get('cross_attention_dim')}, the UNet's is "
                         f"{unet.config.cross_attention_dim}")
    path = weight_file(folder, "diffusion_pytorch_model", False)
    return compare(rel_path(path, top), path, meta_state(lambda: ControlNetModel.from_config(ccfg)))


def verify_loras(layout: ModelLayout, meta: dict[str, Any]) -> list[FileCheck]:
    """The few-step Lightning LoRA (quality_mode fast) and the style LoRAs: optional, loaded by
    load_lora_weights, so checked with the same key conversion against the modules they target."""
    lightning = layout.lightning_file
    if lightning.is_file():
        checks = [verify_lora(lightning, rel_path(lightning, lightning.parent), meta)]
    else:
        checks = [FileCheck(rel_path(lightning, lightning.parent), "absent", "optional: quality_mode fast falls back "
                            "to full steps (python model_loader.py download fetches it)")]
    lora_dir = layout.lora_dir
    loras = sorted(lora_dir.glob("*.safetensors")) if lora_dir.is_dir() else []
    # One folder holds both families' LoRAs: a FLUX one is checked when a flux layout is verified.
    checks += [FileCheck(rel_path(f, lora_dir), "skipped", "a flux LoRA (checked with a flux profile)")
               if lora_family(f) == "flux" else verify_lora(f, rel_path(f, lora_dir), meta) for f in loras]
    if all(c.status == "skipped" for c in checks[1:]):
        checks.append(FileCheck(str(lora_dir), "absent", "optional: no style LoRAs of the sdxl family "
                                                         "(<name>.safetensors; TWIN_LORA_DIR)"))
    return checks


def verify_checkpoints(layout: ModelLayout, meta: dict[str, Any]) -> list[FileCheck]:
    """Single-file checkpoints (base-model switch): their keys in the original layout, for these configs.
    Only POST /models/load reads one, so a problem is a warning (``blocking=False``)."""
    folder = layout.checkpoints
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    flux = [f for f in files if checkpoint_family(f) == "flux"]   # checked when a flux layout is verified
    files = [f for f in files if f not in flux]
    skipped = [FileCheck(rel_path(f, folder), "skipped", "a FLUX transformer (checked with a flux profile)") for f in flux]
    if not files:
        return skipped or [FileCheck(str(folder), "absent", "optional: no single-file checkpoints")]
    if not all(c in meta for c in COMPONENTS):
        return []                  # a component's own line already says what is wrong
    expected = single_file_shapes(meta)
    return skipped + [dataclasses.replace(verify_checkpoint(f, rel_path(f, folder), expected), blocking=False)
                      for f in files]


def verify_checkpoint(path: Path, rel: str, expected: dict[str, tuple]) -> FileCheck:
    """A single-file checkpoint (checkpoints/*.safetensors) against the base folder's configs, header only.
    Keys outside the four components (EMA copies, sampler buffers) are not read by diffusers and are only
    counted; inside them every key must be one the conversion maps, with the shape the config builds. The
    VAE's attention projections may be 1x1 convolutions or matrices (both are published; diffusers
    converts either)."""
    got = open_header(rel, path)
    if isinstance(got, FileCheck):
        return got
    ours = {k: v for k, v in got.items() if k.startswith(SINGLE_FILE_PARTS) and not k.endswith(SINGLE_FILE_IGNORED)}
    ignored = len(got) - len(ours)
    for key in sorted(expected):
        if key not in ours:
            return FileCheck(rel, "missing_key", f"key {key!r} not in file (not an SDXL base checkpoint of "
                                                 f"this layout, or a component left out)")
        shape, want = ours[key][0], expected[key]
        if ".attn_1." in key and key.startswith("first_stage_model."):
            shape, want = tuple(d for d in shape if d != 1), tuple(d for d in want if d != 1)
        if tuple(shape) != tuple(want):
            return FileCheck(rel, "wrong_shape", f"key {key!r} has shape {list(ours[key][0])}, expected {list(expected[key])}")
    extra = sorted(set(ours) - set(expected))
    if extra:
        return FileCheck(rel, "unexpected_key", f"key {extra[0]!r} is not in an SDXL of this layout ({len(extra)} such keys)")
    return dtype_check(rel, ours, f" ({ignored} keys diffusers does not read)" if ignored else "")
