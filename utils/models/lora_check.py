"""The preflight of a LoRA file (style LoRAs, the few-step Lightning LoRA) as ``pipe.load_lora_weights``
reads it: diffusers' own key conversion on a header-only state dict, then every lora_A / lora_B pair against
the module of the meta-device UNet / text encoder it targets."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from utils.models.filecheck import FileCheck, corrupt

_PARTS = ("unet", "text_encoder", "text_encoder_2")
_PAIR = re.compile(r"^(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.(weight|bias)$")


_FAMILY_PARTS = {"sdxl": _PARTS, "flux": ("transformer", "text_encoder")}


def verify_lora(path: Path, rel: str, meta: dict[str, Any], family: str = "sdxl") -> FileCheck:
    """A LoRA file as ``pipe.load_lora_weights`` reads it: diffusers' own key conversion (SDXL: kohya, old
    diffusers and peft layouts, SGM block names remapped with the UNet's config; FLUX: XLabs, kohya,
    diffusers) on a header-only state dict, then every lora_A / lora_B pair must name a Linear / Conv2d of
    the meta UNet / transformer or text encoder and fit its shape. Keys the loader would drop without a word
    (no known prefix, no such module) are errors: such a LoRA loads and silently changes nothing."""
    from diffusers import FluxPipeline, StableDiffusionXLPipeline
    parts = _FAMILY_PARTS[family]
    if not path.is_file():
        return FileCheck(rel, "missing")
    try:
        raw = _header_with_alphas(path)
    except Exception as e:  # truncated / not a safetensors file
        return corrupt(rel, e)
    bad = sorted(k for k, v in raw.items() if not v.is_floating_point())
    if bad:
        return FileCheck(rel, "wrong_dtype", f"key {bad[0]!r} has dtype {raw[bad[0]].dtype}, expected a float type")
    try:
        if family == "flux":
            sd = FluxPipeline.lora_state_dict(dict(raw))
        else:
            sd, _ = StableDiffusionXLPipeline.lora_state_dict(dict(raw), unet_config=meta["unet"].config)
    except Exception as e:  # diffusers cannot place the keys at all: load_lora_weights raises the same
        return FileCheck(rel, "unexpected_key", f"diffusers cannot convert the keys: {type(e).__name__}: {str(e)[:160]}")
    if not sd:
        return FileCheck(rel, "unexpected_key", "no LoRA weights in the file")
    stray = sorted(k for k in sd if k.split(".", 1)[0] not in parts)
    if stray:
        return FileCheck(rel, "unexpected_key", f"key {stray[0]!r} is for no part of the {family.upper()} pipeline "
                                                f"({len(stray)} such keys; the loader ignores them)")
    counts: dict[str, int] = {}
    ranks: set[int] = set()
    for part in parts:
        sub = {k[len(part) + 1:]: v for k, v in sd.items() if k.startswith(part + ".")}
        if not sub:
            continue
        result = _check_part(rel, part, sub, meta.get(part), ranks)
        if isinstance(result, FileCheck):
            return result
        counts[part] = result
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in raw.values() if v.device.type == "meta"})
    return FileCheck(rel, "ok", ", ".join(f"{n} {p} modules" for p, n in counts.items())
                     + f", rank {'/'.join(map(str, sorted(ranks)))}, {'/'.join(dtypes)}")


def _check_part(rel: str, part: str, sub: dict[str, Any], model, ranks: set[int]) -> FileCheck | int:
    """One component's LoRA weights: the problem, or how many modules they adapt (their ranks added to ``ranks``)."""
    if model is None:
        return FileCheck(rel, "unexpected_key", f"weights for {part}, which was not built (see its line)")
    try:
        sub = _to_peft(part, sub, model)
    except Exception as e:  # load_lora_weights raises the same error on this file
        return FileCheck(rel, "unexpected_key", f"diffusers cannot convert the {part} keys: {type(e).__name__}: "
                                                f"{str(e)[:160]}")
    modules = dict(model.named_modules())
    pairs: dict[str, dict[str, Any]] = {}
    for k, v in sub.items():
        m = _PAIR.match(k)
        if m is None:
            if k.endswith(".lora_magnitude_vector.weight") or k.endswith(".lora_magnitude_vector"):
                continue   # DoRA magnitudes ride along with their lora_A / lora_B pair
            return FileCheck(rel, "unexpected_key", f"key {part}.{k!r} is not a LoRA weight")
        if m.group(3) == "weight":
            pairs.setdefault(m.group(1), {})[m.group(2)] = v
        else:
            pairs.setdefault(m.group(1), {})
    for name in sorted(pairs):
        if name not in modules:
            return FileCheck(rel, "unexpected_key", f"{part}.{name} is not a module of the {part} "
                                                    f"({sum(n not in modules for n in pairs)} of {len(pairs)} "
                                                    f"targets missing): the LoRA would not apply there")
        a, b = pairs[name].get("lora_A"), pairs[name].get("lora_B")
        if a is None or b is None:
            return FileCheck(rel, "missing_key", f"{part}.{name} has no {'lora_A' if a is None else 'lora_B'} weight")
        why = _lora_problem(f"{part}.{name}", modules[name], a, b)
        if why:
            return FileCheck(rel, "wrong_shape", why)
        ranks.add(a.shape[0])
    return len(pairs)


def _to_peft(part: str, sub: dict[str, Any], model) -> dict[str, Any]:
    """The same conversions the loader applies (lora_base / peft.load_lora_adapter) before peft injects layers."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    if part in ("unet", "transformer"):
        return sub if any("lora_A" in k for k in sub) else convert_unet_state_dict_to_peft(sub)
    sub = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sub))
    if not hasattr(model, "text_model"):
        sub = {k.removeprefix("text_model."): v for k, v in sub.items()}
    return sub


def _header_with_alphas(path: Path) -> dict[str, Any]:
    """A LoRA file as {key: tensor}: meta tensors of the header's shapes and dtypes, except the scalar
    `.alpha` entries (kohya format), read for real because the key conversion reads their values."""
    import torch
    from safetensors import safe_open
    dtypes = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            sl = f.get_slice(k)
            shape = tuple(sl.get_shape())
            if k.endswith(".alpha") and len(shape) <= 1:
                out[k] = f.get_tensor(k)
            else:
                out[k] = torch.empty(shape, dtype=dtypes.get(sl.get_dtype(), torch.float32), device="meta")
    return out


def _lora_problem(key: str, module, a, b) -> str | None:
    """Why peft's LoRA layer for ``module`` cannot take lora_A ``a`` / lora_B ``b`` (shapes), or None."""
    import torch
    w = getattr(module, "weight", None)
    if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or w is None:
        return f"{key!r} targets {type(module).__name__}, which LoRA cannot adapt"
    out_f, in_f = w.shape[0], w.shape[1]
    if a is None or b is None:
        return None
    if a.shape[0] != b.shape[1]:
        return f"{key!r}: lora_A rank {a.shape[0]} but lora_B rank {b.shape[1]}"
    if a.ndim != w.ndim or b.ndim != w.ndim:
        return f"{key!r}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit the layer's weight {list(w.shape)}"
    if a.shape[1] != in_f or b.shape[0] != out_f or (w.ndim == 4 and tuple(b.shape[2:]) != (1, 1)):
        return (f"{key!r}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit the layer's weight "
                f"{list(w.shape)} ({in_f} in, {out_f} out)")
    return None
