"""The engine's tuning tables: steps, guidance and scheduler per quality mode, per model family and identity
variant, the aspect-ratio presets, and the style library. The one place these numbers are defined."""
from __future__ import annotations

from typing import Any

from utils.config import Settings
from utils.errors import ConfigError
from utils.styles import Style, load_styles

# Steps, guidance and scheduler per quality mode.
QUALITY_MODES: dict[str, dict[str, Any]] = {
    # With the few-step LoRA (SDXL-Lightning): Euler, trailing timesteps, no CFG (as distilled).
    "fast": {"steps": 4, "guidance_scale": 0.0, "scheduler": "euler_trailing", "few_step_lora": True},
    "balanced": {"steps": 25, "guidance_scale": 6.0, "scheduler": "dpmpp_2m_karras"},
    "high_fidelity": {"steps": 40, "guidance_scale": 7.0, "scheduler": "dpmpp_2m_karras"},
}
# fast mode when no few-step LoRA is present: fewer steps of the normal scheduler.
FAST_FALLBACK = {"steps": 12, "guidance_scale": 5.0, "scheduler": "dpmpp_2m_karras"}
# Per adapter variant, on top of the rows above (same keys; "fast_fallback" overrides FAST_FALLBACK), plus
# the default scales when a request names none. ArcFace adapters burn (over-saturated, over-sharpened faces)
# at SDXL's usual CFG 7: InstantID's reference settings are 30 steps, CFG 5, adapter and ControlNet scale
# 0.8; FaceID Plus v2 gets the same lower CFG. The few-step LoRA row (CFG 0) is unchanged.
VARIANT_TUNING: dict[str, dict[str, Any]] = {
    "instantid": {"balanced": {"steps": 30, "guidance_scale": 5.0},
                  "high_fidelity": {"steps": 40, "guidance_scale": 5.0},
                  "fast_fallback": {"guidance_scale": 4.0},
                  "identity_strength": 0.8, "pose_strength": 0.8},
    "faceid-plusv2": {"balanced": {"guidance_scale": 5.0}, "high_fidelity": {"guidance_scale": 5.5},
                      "fast_fallback": {"guidance_scale": 4.0}, "identity_strength": 0.8},
    # FLUX (its steps and guidance come from FLUX_QUALITY): the reference call's InfuseNet conditioning scale
    # 1.0; the keypoint image at full share when a pose is asked for.
    "infiniteyou": {"identity_strength": 1.0, "pose_strength": 1.0},
}
# FLUX.1, per distillation (``flux_tuning_key``). dev is guidance-distilled: the guidance scale (3.5, the
# model card's) is an input embedding, one transformer pass per step; 28 steps is the reference call, 50
# the card's high-quality one; fast is dev with an 8-step LoRA (Hyper-FLUX: 8 steps, guidance 3.5, LoRA
# scale 0.125 per its card) when present, else half the balanced steps. schnell is timestep-distilled for
# 1-4 steps without guidance: every mode runs its 4 steps (more do not help it), T5 window 256.
FLUX_QUALITY: dict[str, dict[str, dict[str, Any]]] = {
    "flux-dev": {
        "fast": {"steps": 8, "guidance_scale": 3.5, "scheduler": "flow_match_euler", "few_step_lora": True,
                 "max_sequence_length": 512},
        "balanced": {"steps": 28, "guidance_scale": 3.5, "scheduler": "flow_match_euler", "max_sequence_length": 512},
        "high_fidelity": {"steps": 50, "guidance_scale": 3.5, "scheduler": "flow_match_euler",
                          "max_sequence_length": 512},
    },
    "flux-schnell": {mode: {"steps": 4, "guidance_scale": 0.0, "scheduler": "flow_match_euler",
                            "max_sequence_length": 256} for mode in QUALITY_MODES},
}
FLUX_FAST_FALLBACK = {"steps": 14, "guidance_scale": 3.5, "scheduler": "flow_match_euler", "max_sequence_length": 512}
FLUX_FAST_LORA_SCALE = 0.125
# Output sides: SDXL's VAE is x8; FLUX packs 2x2 latents into one token, so its sides are multiples of 16.
SIDE_MULTIPLE = {"sdxl": 8, "flux": 16}
DEFAULT_POSE_STRENGTH = 0.8
# Identity variants that take a pose (a keypoint control image).
POSE_VARIANTS = ("instantid", "infiniteyou")

DEFAULT_STYLE = "photoreal"
BASE_NEGATIVE = "worst quality, low quality, watermark, text"

# Aspect-ratio presets as SDXL's 1024-native training buckets; scaled to the profile's native side.
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024), "4:5": (896, 1120), "3:4": (896, 1152), "2:3": (832, 1216), "9:16": (768, 1344),
    "5:4": (1120, 896), "4:3": (1152, 896), "3:2": (1216, 832), "16:9": (1344, 768),
}
MAX_IMAGES = 4          # images one generate() call makes
MAX_CANDIDATES = 8      # best-of-N: most images generated (in batches of at most MAX_IMAGES) to keep num_images
MAX_SEED = 2**32 - 1


def quality_row(quality_mode: str, variant: str) -> dict[str, Any]:
    """Steps / guidance / scheduler of a quality mode for an adapter variant (QUALITY_MODES + VARIANT_TUNING)."""
    row = dict(QUALITY_MODES[quality_mode])
    row.update(VARIANT_TUNING.get(variant, {}).get(quality_mode, {}))
    return row


def fast_fallback_row(variant: str) -> dict[str, Any]:
    return {**FAST_FALLBACK, **VARIANT_TUNING.get(variant, {}).get("fast_fallback", {})}


def default_identity_strength(settings: Settings) -> float:
    return float(VARIANT_TUNING.get(settings.ip_adapter_variant, {}).get("identity_strength",
                                                                         settings.default_identity_strength))


def default_pose_strength(settings: Settings) -> float:
    return float(VARIANT_TUNING.get(settings.ip_adapter_variant, {}).get("pose_strength", DEFAULT_POSE_STRENGTH))


def style_library(settings: Settings) -> dict[str, Style]:
    """The style presets (styles/styles.json or TWIN_STYLES_FILE), read once per process."""
    styles = load_styles(settings.resolved_styles_file, tuple(ASPECT_RATIOS))
    missing = [n for n in (DEFAULT_STYLE, "none") if n not in styles]
    if missing:  # the request default and the warm-up use them
        raise ConfigError(f"style library {settings.resolved_styles_file}: style(s) {', '.join(missing)} "
                          "must be defined")
    return styles


def flux_tuning_key(guidance_distilled: bool) -> str:
    return "flux-dev" if guidance_distilled else "flux-schnell"


def flux_quality_row(quality_mode: str, guidance_distilled: bool) -> dict[str, Any]:
    return dict(FLUX_QUALITY[flux_tuning_key(guidance_distilled)][quality_mode])


def quality_tables() -> dict[str, dict[str, dict[str, Any]]]:
    """Every family's quality rows (for /system-status): sdxl, flux-dev, flux-schnell."""
    return {"sdxl": {k: dict(v) for k, v in QUALITY_MODES.items()},
            **{k: {m: dict(r) for m, r in rows.items()} for k, rows in FLUX_QUALITY.items()}}


def request_size(req, family: str, native: int, settings: Settings) -> tuple[int, int]:
    """The output size of a request: its explicit width x height, else the aspect-ratio preset (the request's,
    else its style's, else 1:1) at the model's native size in the family's side multiple."""
    if req.width is not None:
        return req.width, req.height
    aspect = req.aspect_ratio or style_library(settings)[req.style].aspect_ratio or "1:1"
    return preset_size(aspect, native, settings, SIDE_MULTIPLE[family])


def preset_size(aspect_ratio: str, native: int, settings: Settings, multiple: int = 8) -> tuple[int, int]:
    """An aspect-ratio preset at the model's native size, in multiples of ``multiple`` (SIDE_MULTIPLE)."""
    w, h = ASPECT_RATIOS[aspect_ratio]
    f = native / 1024
    top = settings.max_image_side // multiple * multiple
    bottom = -(-settings.min_image_side // multiple) * multiple

    def side(x: float) -> int:
        return int(min(top, max(bottom, round(x * f / multiple) * multiple)))
    return side(w), side(h)
