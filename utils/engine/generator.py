"""DigitalTwinGenerator: SDXL + IP-Adapter portraits of one person per session.

    gen = DigitalTwinGenerator(settings); gen.setup()
    identity = gen.build_identity(crops, embeddings, face_model=...)     # once per upload
    result = gen.generate(GenerationRequest.from_dict(payload, settings).with_identity(identity))

CLI (whole path: faces -> identity -> images; and a likeness report)::

    python generate_twin.py --selfies DIR --prompt "a portrait in a forest" --out DIR [--num-images 2] [--seed 1]
    python generate_twin.py evaluate --selfies DIR --images DIR [--json report.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import secrets
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from utils.config import Settings
from utils.errors import ConfigError, InvalidRequest, JobCanceled, OutOfMemory, ServiceNotReady, TwinError
from utils.request_fields import Field, published_fields, validate_payload
from instantid import POSE_CHOICES, POSE_PRESETS, POSE_STRENGTH_RANGE, parse_pose
from utils.init_image import check_init_image, fit_image, max_chars as max_init_chars, parse_init_image
from utils.prompts import ENUM_ATTRIBUTES, attributes_schema, build_prompt, check_attributes, check_persona, persona_schema
from utils.styles import Style, apply_style, load_styles

log = logging.getLogger("twin.generate")

# Steps, guidance and scheduler per quality mode: the one place they are defined.
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
}
DEFAULT_POSE_STRENGTH = 0.8


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

DEFAULT_STYLE = "photoreal"
BASE_NEGATIVE = "worst quality, low quality, watermark, text"

# Aspect-ratio presets as SDXL's 1024-native training buckets; scaled to the profile's native side.
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024), "4:5": (896, 1120), "3:4": (896, 1152), "2:3": (832, 1216), "9:16": (768, 1344),
    "5:4": (1120, 896), "4:3": (1152, 896), "3:2": (1216, 832), "16:9": (1344, 768),
}
MAX_IMAGES = 4
MAX_CANDIDATES = 8      # best-of-N: most images generated (in batches of at most MAX_IMAGES) to keep num_images
MAX_SEED = 2**32 - 1
RESTORE_MODEL_NAMES = ("gfpgan", "codeformer", "gpen")   # utils.faces.restore.RESTORE_MODELS

# The request, declared once: GenerationRequest.from_dict validates against it, /openapi.json and the
# /system-status options are rendered from it. A new request field is a row here plus its dataclass field.
REQUEST_FIELDS: tuple[Field, ...] = (
    Field("prompt", "string", "What to portray; the identity comes from the session's selfies.", required=True,
          strip=True, min_length=1, max_length=lambda s: s.max_prompt_chars),
    Field("negative_prompt", "string", "What to avoid; added to the style's negative.",
          max_length=lambda s: s.max_prompt_chars),
    Field("num_images", "integer", "Portraits to make.", default=1, minimum=1, maximum=MAX_IMAGES,
          message="{name}={value!r} is not between {minimum} and {maximum}"),
    Field("seed", "integer", "Random seed of the first image (image i uses seed + i); random when absent.",
          minimum=0, maximum=MAX_SEED),
    Field("width", "integer", "Output width; with height, instead of aspect_ratio.", multiple_of=8,
          minimum=lambda s: s.min_image_side, maximum=lambda s: s.max_image_side,
          message="{name}={value!r} must be a multiple of 8 between {minimum} and {maximum}"),
    Field("height", "integer", "Output height; with width.", multiple_of=8,
          minimum=lambda s: s.min_image_side, maximum=lambda s: s.max_image_side,
          message="{name}={value!r} must be a multiple of 8 between {minimum} and {maximum}"),
    Field("aspect_ratio", "string", "A preset size (SDXL training buckets scaled to the model).",
          enum=tuple(ASPECT_RATIOS)),
    Field("quality_mode", "string", "Steps / guidance / scheduler preset.", default="balanced",
          enum=tuple(QUALITY_MODES)),
    Field("identity_strength", "number", "Identity adapter scale (default per adapter variant: instantid and "
          "faceid-plusv2 0.8, else TWIN_DEFAULT_IDENTITY_STRENGTH).",
          default=default_identity_strength, minimum=0.0, maximum=2.0),
    Field("style", "string", "A preset of the style library (GET /styles): prompt template, negative, defaults.",
          default=DEFAULT_STYLE, enum=lambda s: tuple(style_library(s))),
    Field("style_strength", "number", "How much of the style's text is applied (prompt weighting; 1 = as written).",
          default=1.0, minimum=0.0, maximum=1.0),
    Field("persona", "object", "Who is portrayed: {name, age (18-100), traits[]}; built into the prompt, identity first.",
          check=check_persona, schema_extra=persona_schema()),
    Field("attributes", "object", "Visual attributes: gender, age_group, ethnicity, hair, eyes, skin_tone, outfit, "
          "expression, background; built into the prompt, identity first.",
          check=check_attributes, schema_extra=attributes_schema()),
    Field("init_image", "string", "img2img start picture: \"selfie:N\" (accepted selfie N of the session), "
          "\"<job_id>/<filename>\" (one of your outputs) or base64 image data (data:image/...;base64,...).",
          min_length=1, max_length=max_init_chars, check=check_init_image),
    Field("strength", "number", "img2img: how far from init_image the picture may move (1 = ignore it).",
          default=0.6, minimum=0.05, maximum=1.0),
    Field("lora", "string", "Name of a style LoRA in the model folder.", min_length=1, max_length=100,
          message="{name}={value!r} must be a LoRA name"),
    Field("lora_scale", "number", "Strength of the LoRA.", default=0.8, minimum=0.0, maximum=2.0),
    Field("preview", "boolean", "Send a small preview of the forming image every few steps "
          "(GET /preview/<job_id>, preview events).", default=False),
    # Likeness (done by the service after generation, with the face backend; see utils/services.py).
    Field("candidates", "integer", "Best-of-N: generate this many (num_images to 8), score each against the "
          "session's faces and keep the num_images most alike, best first; default num_images.",
          minimum=1, maximum=MAX_CANDIDATES),
    Field("restore_faces", "boolean", "Restore every face (GFPGAN / CodeFormer / GPEN); the unrestored image "
          "is kept as avatar_NNN_raw.png.", default=lambda s: s.restore_default),
    Field("restore_model", "string", "Face restoration model.", default=lambda s: s.restore_model,
          enum=RESTORE_MODEL_NAMES),
    Field("restore_fidelity", "number", "CodeFormer's fidelity weight: 0 restores most, 1 stays closest to the "
          "generated face (other models ignore it).", default=0.5, minimum=0.0, maximum=1.0),
    Field("pose", "string", "Head pose of the portrait (instantid variant): auto (frontal, with the person's "
          "own proportions from the selfies), a preset (" + ", ".join(POSE_PRESETS) + "), or selfie:N (the "
          "pose of accepted selfie N, N = its index in the upload report).", default="auto",
          check=lambda v, s: parse_pose(v),
          schema_extra={"pattern": "^(" + "|".join(c for c in POSE_CHOICES if c != "selfie:N")
                        + r"|selfie:[0-9]{1,6})$"}),
    Field("pose_strength", "number", "How strongly the pose keypoints steer the image (instantid's "
          "IdentityNet ControlNet scale; 0 = no pose control).", default=default_pose_strength,
          minimum=POSE_STRENGTH_RANGE[0], maximum=POSE_STRENGTH_RANGE[1]),
    Field("model", "string", "The base model (GET /models) this job is meant for: when another one is active "
          "when the job runs, it fails with model_not_loaded (409) naming both. Absent: the active model.",
          min_length=1, max_length=200, message="{name}={value!r} must be a base model name"),
)
REQUEST_KEYS = tuple(f.name for f in REQUEST_FIELDS)


# SDXL latent channels -> RGB, a linear fit of the VAE's decode (the factors ComfyUI and A1111 use for
# their cheap previews): a few multiply-adds per latent pixel instead of a VAE decode.
LATENT_RGB_FACTORS = ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068),
                      (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188))
LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)
PREVIEWS_PER_JOB = 8  # previews are sent on about this many evenly spaced steps (and the last one)


def latent_preview_jpeg(latents, side: int = 128) -> bytes:
    """A small JPEG of the first image's latents (channels, h, w), through the linear projection."""
    import io

    import numpy as np
    from PIL import Image
    lat = latents[0].detach().float().cpu().numpy()[:4]
    rgb = np.einsum("chw,cr->hwr", lat, np.asarray(LATENT_RGB_FACTORS, dtype=np.float32)) + np.asarray(LATENT_RGB_BIAS)
    img = Image.fromarray(np.clip((rgb + 1.0) * 127.5, 0, 255).astype(np.uint8))
    if max(img.size) < side:  # latents are 1/8 of the image: show them at a viewable size
        f = side / max(img.size)
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=70)
    return buf.getvalue()


def preview_steps(total: int) -> set[int]:
    """1-based steps that send a preview: evenly spaced, always the last."""
    every = max(1, math.ceil(total / PREVIEWS_PER_JOB))
    return {s for s in range(1, total + 1) if s % every == 0} | {total}
def style_library(settings: Settings) -> dict[str, Style]:
    """The style presets (styles/styles.json or TWIN_STYLES_FILE), read once per process."""
    styles = load_styles(settings.resolved_styles_file, tuple(ASPECT_RATIOS))
    missing = [n for n in (DEFAULT_STYLE, "none") if n not in styles]
    if missing:  # the request default and the warm-up use them
        raise ConfigError(f"style library {settings.resolved_styles_file}: style(s) {', '.join(missing)} "
                          "must be defined")
    return styles


def __getattr__(name: str) -> Any:
    # STYLES was a dict in this module; the presets now live in a data file (the default one here).
    if name == "STYLES":
        return style_library(Settings())
    raise AttributeError(name)


def preset_size(aspect_ratio: str, native: int, settings: Settings) -> tuple[int, int]:
    w, h = ASPECT_RATIOS[aspect_ratio]
    f = native / 1024

    def side(x: float) -> int:
        return int(min(settings.max_image_side, max(settings.min_image_side, round(x * f / 8) * 8)))
    return side(w), side(h)


def published_options(native_resolution: int, settings: Settings) -> dict[str, Any]:
    """The request choices of the loaded model, for clients (the /test page reads them from /system-status)."""
    return {
        "quality_modes": list(QUALITY_MODES),
        "default_quality_mode": "balanced",
        "aspect_ratios": {ar: list(preset_size(ar, native_resolution, settings)) for ar in ASPECT_RATIOS},
        "styles": list(style_library(settings)),
        "default_style": DEFAULT_STYLE,
        "default_identity_strength": default_identity_strength(settings),
        "attribute_choices": {k: list(v) for k, v in ENUM_ATTRIBUTES.items()},
        "max_images": MAX_IMAGES,
        "variant": settings.ip_adapter_variant,
        # Pose control needs the IdentityNet (instantid); clients show the pose choice only then.
        "pose_control": settings.ip_adapter_variant == "instantid",
        "poses": list(POSE_CHOICES),
        "request_fields": published_fields(REQUEST_FIELDS, settings),
    }


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str | None = None
    num_images: int = 1
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    aspect_ratio: str | None = None
    quality_mode: str = "balanced"
    identity_strength: float = 0.7
    style: str = DEFAULT_STYLE
    style_strength: float = 1.0
    persona: dict | None = None
    attributes: dict | None = None
    init_image: str | None = None
    strength: float = 0.6
    lora: str | None = None
    lora_scale: float = 0.8
    preview: bool = False
    candidates: int | None = None
    restore_faces: bool = False
    restore_model: str = "gfpgan"
    restore_fidelity: float = 0.5
    pose: str = "auto"
    pose_strength: float = DEFAULT_POSE_STRENGTH
    model: str | None = None
    identity: Any = field(default=None, compare=False, repr=False)
    init_pixels: Any = field(default=None, compare=False, repr=False)   # the resolved init_image (PIL)

    @classmethod
    def from_dict(cls, payload: Any, settings: Settings) -> "GenerationRequest":
        v = validate_payload(REQUEST_FIELDS, payload, settings)
        # Rules between fields; each value alone is already valid.
        if (v["width"] is None) != (v["height"] is None):
            raise InvalidRequest(f"width={v['width']!r} and height={v['height']!r} must be given together")
        if v["width"] is not None and v["aspect_ratio"] is not None:
            raise InvalidRequest(f"give either aspect_ratio={v['aspect_ratio']!r} or width/height, not both")
        if v["candidates"] is not None and v["candidates"] < v["num_images"]:
            raise InvalidRequest(f"candidates={v['candidates']!r} is fewer than num_images={v['num_images']!r}; "
                                 f"give between {v['num_images']} and {MAX_CANDIDATES}")
        if v["init_image"] is None and payload.get("strength") is not None:
            raise InvalidRequest(f"strength={payload['strength']!r} applies to img2img only: give init_image too")
        return cls(**v)

    @property
    def total_candidates(self) -> int:
        return self.candidates or self.num_images

    def with_identity(self, identity: Any) -> "GenerationRequest":
        if identity is not None and self.pose.startswith("selfie:"):
            # selfie:N must name an accepted selfie of this session: checked here, when the request meets
            # the session (the service does this at submit time, so it is a 400, not a failed job).
            from instantid import resolve_pose
            ex = getattr(identity, "extras", None) or {}
            kps, idx = ex.get("keypoints"), ex.get("keypoint_index")
            resolve_pose(self.pose, None if kps is None else kps.numpy(), None if idx is None else idx.tolist())
        return dataclasses.replace(self, identity=identity)

    def with_init_image(self, image: Any) -> "GenerationRequest":
        return dataclasses.replace(self, init_pixels=image)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in REQUEST_KEYS}
        if self.init_image is not None:  # inline image data is not echoed into every job JSON
            d["init_image"] = parse_init_image(self.init_image, len(self.init_image)).describe()
        else:
            d["strength"] = None
        d["has_identity"] = self.identity is not None
        return d


@dataclass
class GenerationResult:
    images: list
    seeds: list[int]
    metadata: dict[str, Any]


class DigitalTwinGenerator:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.state = "starting"
        self.error: TwinError | None = None
        self.models = None
        self.adapter = None
        self._setup_lock = threading.Lock()
        self._gen_lock = threading.Lock()      # one pipeline call at a time (schedulers and adapters are shared)
        self._null_identity = None
        self._compel = None                    # built on the first weighted prompt (style_strength < 1)
        self._img2img = None                   # built on the first img2img request, sharing self.models.pipe
        # Held for a whole generate(), and by load_model() only to swap the model in: a switch happens
        # between jobs, never inside one (the new model is loaded beside the old without it).
        self._model_lock = threading.RLock()
        self._load_lock = threading.Lock()      # one load_model() at a time

    # --- set-up -----------------------------------------------------------------------------------
    def setup(self) -> "DigitalTwinGenerator":
        with self._setup_lock:
            if self.state == "ready":
                return self
            try:
                self._setup()
                self.state = "ready"
            except TwinError as e:
                self.state, self.error = "setup_failed", e
                raise
            except Exception as e:
                self.state = "setup_failed"
                self.error = TwinError(f"model set-up failed: {type(e).__name__}: {e}", code="setup_failed",
                                       http_status=503)
                raise
        return self

    def _setup(self) -> None:
        from ipadapter_manager import AdapterManager
        from model_loader import dpmpp_karras, few_step_scheduler, load_models
        t0 = time.perf_counter()
        style_library(self.settings)  # a broken style file fails set-up, naming the line
        self.models = load_models(self.settings)
        self.adapter = AdapterManager(self.models)
        self.adapter.load(self.settings.ip_adapter_variant)
        cfg = self.models.base_scheduler_config
        self._schedulers = {"dpmpp_2m_karras": dpmpp_karras(cfg), "euler_trailing": few_step_scheduler(cfg)}
        if self.settings.vae_tiling:
            self.models.pipe.vae.enable_tiling()
        self._null_identity = self.adapter.null_identity()
        self.load_seconds = time.perf_counter() - t0
        if self.settings.warmup:
            # The first call pays for lazy initialisation (and torch.compile); pay it here, not in a job.
            req = GenerationRequest(prompt="warm-up", style="none", quality_mode="fast")
            self._generate(req, None, None, warmup=True)
        log.info("generator ready: profile=%s variant=%s device=%s dtype=%s (%.1f s)", self.models.profile,
                 self.adapter.variant, self.models.device, str(self.models.dtype).replace("torch.", ""),
                 time.perf_counter() - t0)

    def info(self) -> dict[str, Any]:
        m = self.models
        out: dict[str, Any] = {"state": self.state, "profile": None, "is_demo": None,
                               "variant": self.settings.ip_adapter_variant, "model_name": None,
                               "device": None, "dtype": None}
        if self.error is not None:
            out["error"] = self.error.to_dict()
        if m is not None:
            out.update(profile=m.profile, is_demo=m.profile == "tiny", model_name=m.model_name, device=m.device,
                       dtype=str(m.dtype).replace("torch.", ""), native_resolution=m.native_resolution,
                       loras=sorted(m.loras), fast_mode="few-step-lora" if m.lightning_adapter else "fallback",
                       identity_combine=self.settings.identity_combine, notes=list(m.notes),
                       active_model=m.model_name)
            if self.adapter is not None and self.adapter.variant:
                out["variant"] = self.adapter.variant
        return out

    # --- base-model registry ----------------------------------------------------------------------
    def models_catalogue(self) -> dict[str, Any]:
        """The base checkpoints available locally, the active one and the loaded LoRAs (GET /models, /loras)."""
        from model_loader import list_checkpoints
        found = list_checkpoints(self.settings)
        active = self.models.model_name if self.models is not None else None
        return {"active": active,
                "models": [{"name": n, "kind": "diffusers-folder" if p is None else "single-file",
                            "file": None if p is None else p.name, "active": n == active} for n, p in found.items()],
                "loras": sorted(self.models.loras) if self.models is not None else []}

    def load_model(self, name: str) -> dict[str, Any]:
        """Load base model ``name`` beside the active one, switch to it between jobs, then free the old one.
        A file that does not load raises InvalidRequest naming it; the active model keeps serving."""
        import gc
        from ipadapter_manager import AdapterManager
        from model_loader import dpmpp_karras, few_step_scheduler, list_checkpoints, load_models
        self._require_ready()
        found = list_checkpoints(self.settings)
        if not isinstance(name, str) or name not in found:
            raise InvalidRequest(f"model={name!r} is not a local base model; available: {', '.join(found)}",
                                 code="unknown_model", http_status=404)
        with self._load_lock:
            old_name = self.models.model_name
            if name == old_name:
                return {"model": name, "previous": old_name, "switched": False, "load_s": 0.0, "swap_wait_s": 0.0}
            t0 = time.perf_counter()
            try:
                models = load_models(self.settings, checkpoint=found[name])
                adapter = AdapterManager(models)
                adapter.load(self.settings.ip_adapter_variant)
            except TwinError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure of a file is a failed load, not a dead service
                where = found[name] if found[name] is not None else "the diffusers base folder"
                raise InvalidRequest(f"model={name!r} failed to load from {where}: {type(e).__name__}: {e}; "
                                     f"{old_name!r} stays active", code="model_load_failed", http_status=422) from None
            cfg = models.base_scheduler_config
            schedulers = {"dpmpp_2m_karras": dpmpp_karras(cfg), "euler_trailing": few_step_scheduler(cfg)}
            if self.settings.vae_tiling:
                models.pipe.vae.enable_tiling()
            null_identity = adapter.null_identity()
            t1 = time.perf_counter()
            with self._model_lock:       # waits for a running job to finish
                t2 = time.perf_counter()
                old = self.models
                self.models, self.adapter, self._schedulers = models, adapter, schedulers
                self._null_identity, self._compel, self._img2img = null_identity, None, None
            del old, models, adapter
            gc.collect()
            try:
                import torch
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except ImportError:
                pass
            log.info("base model switched: %s -> %s (load %.2f s, waited %.2f s for the running job)",
                     old_name, name, t1 - t0, t2 - t1)
            return {"model": name, "previous": old_name, "switched": True, "load_s": round(t1 - t0, 3),
                    "swap_wait_s": round(t2 - t1, 3)}

    def _check_model(self, req: GenerationRequest) -> None:
        want = getattr(req, "model", None)
        if want is not None and self.models is not None and want != self.models.model_name:
            raise InvalidRequest(f"model={want!r} was requested but the active base model is "
                                 f"{self.models.model_name!r}; resubmit without model or load {want!r} first",
                                 code="model_not_loaded", http_status=409)

    def _require_ready(self) -> None:
        if self.state != "ready":
            raise ServiceNotReady(f"the generator is {self.state}, not ready")

    # --- identity ---------------------------------------------------------------------------------
    def build_identity(self, crops: Sequence[Any] | None, face_embeddings: Sequence[Any] | None = None, *,
                       face_model: str | None = None, combine: str | None = None, embedding_norms=None,
                       keypoints=None, keypoint_index=None):
        """Per-session identity from the accepted selfies. Safe to call while generate() runs.
        ``embedding_norms`` / ``keypoints`` / ``keypoint_index``: ``SelfieReport.identity_inputs()``."""
        self._require_ready()
        return self.adapter.build_identity(crops, face_embeddings, face_model=face_model,
                                           combine=combine or self.settings.identity_combine,
                                           embedding_norms=embedding_norms, keypoints=keypoints,
                                           keypoint_index=keypoint_index)

    # --- generation -------------------------------------------------------------------------------
    def resolve_size(self, req: GenerationRequest) -> tuple[int, int]:
        if req.width is not None:
            return req.width, req.height
        aspect = req.aspect_ratio or style_library(self.settings)[req.style].aspect_ratio or "1:1"
        return preset_size(aspect, self.models.native_resolution, self.settings)

    def validate(self, req: GenerationRequest) -> dict[str, Any]:
        """Checks that need the loaded model (LoRA name, identity variant/model), for the service to call at
        submit time so a job does not fail later; returns the plan (steps, size, scheduler...)."""
        self._require_ready()
        if req.identity is not None:
            self.adapter.check_identity(req.identity)
        plan = self.plan(req)
        self._check_model(req)
        if self.adapter.variant == "instantid":
            self._pose_image(req, plan)   # selfie:N must name an accepted selfie of this session: 400 now
        return {k: v for k, v in plan.items() if k != "adapters"}

    def _pose_image(self, req: GenerationRequest, plan: dict[str, Any]):
        from instantid import pose_image
        ex = req.identity.extras if req.identity is not None else {}
        kps, idx = ex.get("keypoints"), ex.get("keypoint_index")
        return pose_image(req.pose, plan["width"], plan["height"],
                          None if kps is None else kps.numpy(), None if idx is None else idx.tolist())

    def plan(self, req: GenerationRequest) -> dict[str, Any]:
        """Steps, guidance, scheduler and adapters for a request; raises for an unknown LoRA."""
        m = self.models
        if req.lora is not None and req.lora not in m.loras:
            raise InvalidRequest(f"lora={req.lora!r} is not installed; available: {', '.join(sorted(m.loras)) or 'none'}")
        variant = self.adapter.variant or ""
        mode = quality_row(req.quality_mode, variant)
        fallback = False
        if mode.pop("few_step_lora", False) and not m.lightning_adapter:
            mode, fallback = fast_fallback_row(variant), True
        # A style's own defaults: its guidance unless the few-step LoRA runs (distilled without CFG), its
        # steps in the balanced mode only (fast and high_fidelity are the caller's explicit trade-off).
        style = style_library(self.settings)[req.style]
        style_defaults: dict[str, Any] = {}
        if style.guidance_scale is not None and not (req.quality_mode == "fast" and not fallback):
            mode["guidance_scale"] = style_defaults["guidance_scale"] = style.guidance_scale
        if style.steps is not None and req.quality_mode == "balanced":
            mode["steps"] = style_defaults["steps"] = style.steps
        if style.aspect_ratio is not None and req.width is None and req.aspect_ratio is None:
            style_defaults["aspect_ratio"] = style.aspect_ratio
        if self.settings.max_steps:
            mode["steps"] = min(mode["steps"], self.settings.max_steps)
        adapters: list[tuple[str, float]] = []
        if req.identity is not None:
            adapters += [(n, 1.0) for n in self.adapter.faceid_adapters]
        if req.lora is not None:
            adapters.append((m.loras[req.lora], req.lora_scale))
        if req.quality_mode == "fast" and not fallback:
            adapters.append((m.lightning_adapter, 1.0))
        width, height = self.resolve_size(req)
        return {**mode, "fast_mode_fallback": fallback, "adapters": adapters, "width": width, "height": height,
                "style_defaults": style_defaults}

    def call_kwargs(self, req: GenerationRequest, plan: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
        """Arguments for the diffusers pipeline call (also used by tests to compare against a bare pipeline)."""
        import torch
        style = style_library(self.settings)[req.style]
        built = self.build_prompt(req, style)
        base_negative = ", ".join(x for x in (built.negative, BASE_NEGATIVE) if x)
        prompt, negative, weighted = apply_style(style, built.text, req.negative_prompt, base_negative,
                                                 req.style_strength)
        if req.persona or req.attributes:
            plan["prompt_builder"] = built.to_json()
        plan["prompt"], plan["negative_prompt"] = prompt, negative
        plan["prompt_weighting"] = "compel" if weighted else None
        # Weighted (compel-syntax) texts become embeddings in _generate, under the lock and after the LoRA
        # adapters are set: a style LoRA may patch the text encoders too.
        kwargs = dict(prompt=prompt, negative_prompt=negative, num_images_per_prompt=req.num_images,
                      width=plan["width"], height=plan["height"], num_inference_steps=plan["steps"],
                      guidance_scale=plan["guidance_scale"],
                      # CPU generators: the same seed gives the same image on any device.
                      generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="pil")
        if req.init_image is not None:
            # img2img takes its size from the image: fit the start picture to the request's size. The
            # pipeline denoises int(steps * strength) steps; at least one must remain.
            del kwargs["width"], kwargs["height"]
            kwargs.update(image=fit_image(self._init_pixels(req), plan["width"], plan["height"]),
                          strength=req.strength,
                          num_inference_steps=max(plan["steps"], math.ceil(1 / req.strength)))
        return kwargs

    def _init_pixels(self, req: GenerationRequest):
        if req.init_pixels is not None:
            return req.init_pixels
        ref = parse_init_image(req.init_image, int(self.settings.max_file_mb * 1024 * 1024))
        if ref.kind != "upload":  # selfies and outputs live in the service's storage
            raise InvalidRequest(f"init_image={req.init_image!r} must be resolved by the service before generate()")
        from utils.images import decode_image
        return decode_image(ref.data, "init_image", max_pixels=self.settings.max_pixels)

    def img2img_pipe(self):
        """StableDiffusionXLImg2ImgPipeline over the loaded pipeline's own modules (from_pipe: no second
        copy of the UNet, VAE, encoders or adapters; LoRA and IP-Adapter state is the UNet's, so shared)."""
        if self._img2img is None:
            from diffusers import StableDiffusionXLImg2ImgPipeline
            self._img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(self.models.pipe)
        return self._img2img

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` for the first CLIP tokenizer (its start/end tokens not counted)."""
        return len(self.models.pipe.tokenizer(text, add_special_tokens=False).input_ids)

    def build_prompt(self, req: GenerationRequest, style: Style):
        """The persona / attribute prompt, fitted into what the 77-token window leaves beside the style text."""
        window = (getattr(self.models.pipe.tokenizer, "model_max_length", 77) or 77) - 2  # start/end tokens
        style_tokens = self.count_tokens((style.prefix + " " + style.suffix).strip(" ,"))
        return build_prompt(req.prompt, req.persona, req.attributes, count_tokens=self.count_tokens,
                            max_tokens=max(window - style_tokens, 1))

    def weighted_embeds(self, prompt: str, negative: str) -> dict[str, Any]:
        """Pipeline embeddings for compel-syntax texts, from both SDXL text encoders (compel's SDXL recipe:
        penultimate hidden states, not normalised; the pooled output of the second encoder)."""
        import torch
        if self._compel is None:
            from compel import CompelForSDXL
            self._compel = CompelForSDXL(self.models.pipe)
        with torch.no_grad():
            c = self._compel(prompt, negative_prompt=negative)
        return dict(prompt_embeds=c.embeds, pooled_prompt_embeds=c.pooled_embeds,
                    negative_prompt_embeds=c.negative_embeds, negative_pooled_prompt_embeds=c.negative_pooled_embeds)

    def generate(self, req: GenerationRequest, on_progress: Callable[[int, int], Any] | None = None,
                 should_cancel: Callable[[], bool] | None = None) -> GenerationResult:
        self._require_ready()
        with self._model_lock:   # the model in use cannot be switched under a running job
            self._check_model(req)
            return self._generate(req, on_progress, should_cancel)

    def _generate(self, req, on_progress, should_cancel, warmup: bool = False) -> GenerationResult:
        import torch
        m, pipe = self.models, self.models.pipe
        plan = self.plan(req)
        identity = req.identity
        if identity is not None:
            self.adapter.check_identity(identity)
        if req.seed is None:
            base_seed = secrets.randbelow(MAX_SEED - MAX_IMAGES)
        else:
            base_seed = req.seed
        seeds = [(base_seed + i) % (MAX_SEED + 1) for i in range(req.num_images)]
        kwargs = self.call_kwargs(req, plan, seeds)
        if "image" in kwargs:
            pipe = self.img2img_pipe()
        if warmup:
            kwargs["num_inference_steps"] = min(2, kwargs["num_inference_steps"])
        do_cfg = plan["guidance_scale"] > 1.0  # the pipeline's own rule for classifier-free guidance
        ident = identity or self._null_identity
        kwargs["ip_adapter_image_embeds"] = self.adapter.pipeline_embeds(ident, do_cfg)
        instantid = self.adapter.variant == "instantid"
        if instantid:
            from instantid import identity_tokens
            kwargs["image"] = self._pose_image(req, plan)
            kwargs["controlnet_conditioning_scale"] = req.pose_strength
            tokens = identity_tokens(pipe.unet, ident.embeds, req.num_images, do_cfg)
        total = kwargs["num_inference_steps"]
        wanted_previews = preview_steps(total) if req.preview else set()
        marks: dict[str, float] = {}

        def on_step_end(p, step, timestep, cb_kwargs):
            now = time.perf_counter()
            marks.setdefault("first_step", now)
            marks["last_step"] = now
            if on_progress is not None:
                n = getattr(p, "num_timesteps", total) or total
                if req.preview and step + 1 in wanted_previews and "latents" in cb_kwargs:
                    on_progress(step + 1, n, latent_preview_jpeg(cb_kwargs["latents"]))
                else:
                    on_progress(step + 1, n)
            if should_cancel is not None and should_cancel():
                # Raising leaves the denoising loop at once; the VAE decode is skipped too.
                raise JobCanceled(f"canceled after step {step + 1} of {total}")
            return cb_kwargs

        if should_cancel is not None and should_cancel():
            raise JobCanceled("canceled before the first step")
        with self._gen_lock:
            t_wait = time.perf_counter()
            pipe.scheduler = self._schedulers[plan["scheduler"]]
            pipe.set_ip_adapter_scale(req.identity_strength if identity is not None else 0.0)
            self._set_adapters(plan["adapters"])
            self.adapter.prepare_call(ident, req.num_images, do_cfg)
            if instantid:
                # The IdentityNet reads these in place of the text (instantid.IdentityNet).
                pipe.controlnet.identity_tokens = tokens
            t0 = time.perf_counter()
            try:
                if plan["prompt_weighting"]:
                    kwargs.update(self.weighted_embeds(kwargs.pop("prompt"), kwargs.pop("negative_prompt")))
                with torch.inference_mode():
                    out = pipe(callback_on_step_end=on_step_end, **kwargs)
            except torch.OutOfMemoryError:
                del kwargs
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise OutOfMemory(f"out of GPU memory generating num_images={req.num_images} at "
                                  f"{plan['width']}x{plan['height']}; try fewer images or a smaller size") from None
            finally:
                if instantid:
                    pipe.controlnet.identity_tokens = None
            t1 = time.perf_counter()
        images = out.images
        first, last = marks.get("first_step", t0), marks.get("last_step", t1)
        steps_per_s = (total - 1) / (last - first) if total > 1 and last > first else None
        meta = {
            "profile": m.profile, "is_demo": m.profile == "tiny", "model_name": m.model_name, "model": m.model_name,
            "variant": self.adapter.variant, "device": m.device, "dtype": str(m.dtype).replace("torch.", ""),
            "steps": total, "guidance_scale": plan["guidance_scale"], "scheduler": plan["scheduler"],
            "quality_mode": req.quality_mode, "fast_mode_fallback": plan["fast_mode_fallback"],
            "width": plan["width"], "height": plan["height"], "num_images": req.num_images, "seeds": seeds,
            "identity_strength": req.identity_strength if identity is not None else 0.0,
            "identity": None if identity is None else {"variant": identity.variant, "combine": identity.combine,
                                                       "num_selfies": identity.num_selfies},
            "style": req.style, "style_strength": req.style_strength, "style_defaults": plan["style_defaults"],
            "prompt": plan["prompt"], "negative_prompt": plan["negative_prompt"],
            "prompt_weighting": plan["prompt_weighting"], "prompt_builder": plan.get("prompt_builder"),
            "lora": req.lora, "lora_scale": req.lora_scale if req.lora else None,
            "pose": req.pose if instantid else None, "pose_strength": req.pose_strength if instantid else None,
            "img2img": None if req.init_image is None else {
                "init_image": req.to_dict()["init_image"], "strength": req.strength,
                "denoise_steps": getattr(pipe, "num_timesteps", None)},
            "timings": {"queue_lock_s": round(t0 - t_wait, 4), "total_s": round(t1 - t0, 4),
                        "denoise_s": round(last - t0, 4), "decode_s": round(t1 - last, 4),
                        "steps_per_s": round(steps_per_s, 2) if steps_per_s else None},
        }
        if plan["fast_mode_fallback"]:
            meta["note"] = "few-step LoRA not installed: fast mode used fewer steps of the normal scheduler"
        return GenerationResult(images=images, seeds=seeds, metadata=meta)

    def _set_adapters(self, adapters: list[tuple[str, float]]) -> None:
        pipe = self.models.pipe
        if not getattr(pipe.unet, "peft_config", None):
            return
        if adapters:
            pipe.enable_lora()
            pipe.set_adapters([n for n, _ in adapters], adapter_weights=[w for _, w in adapters])
        else:
            pipe.disable_lora()


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".bmp", ".tif", ".tiff"}


def _default_face_service(settings: Settings):
    from utils.faces import FaceService
    from utils.services import face_settings, prepare_face_models
    fs = face_settings(settings)       # ArcFace variants on the tiny profile: the tiny stand-in pack
    prepare_face_models(fs)
    return FaceService(fs)


def _image_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES] \
        if folder.is_dir() else []


def evaluate(selfies: Path, images: Path, settings: Settings, faces) -> dict[str, Any]:
    """Likeness report: each image's similarity to the selfies' template with the configured face backend,
    and the selfies' own agreement (median pairwise similarity: the best a portrait can expect)."""
    from utils.images import decode_image
    files = [(p.name, p.read_bytes()) for p in _image_files(selfies)]
    if not files:
        raise InvalidRequest(f"no images found in --selfies {str(selfies)!r}")
    targets = _image_files(images)
    if not targets:
        raise InvalidRequest(f"no images found in --images {str(images)!r}")
    report = faces.validate_selfies(files)
    if report.template is None:
        raise InvalidRequest(f"none of the {len(files)} selfies in {str(selfies)!r} was accepted: "
                             + "; ".join(r.message for r in report.rejected[:5]))
    rows = []
    for p in targets:
        row: dict[str, Any] = {"image": p.name, "face_found": False, "identity_similarity": None}
        try:
            image = decode_image(p.read_bytes(), p.name, max_pixels=settings.max_pixels)
            score = faces.identity_similarity(image, report.template)
        except TwinError as e:
            row["error"] = e.message
            score = None
        if score is not None:
            row.update(face_found=True, identity_similarity=round(float(score), 4))
        rows.append(row)
    found = [r["identity_similarity"] for r in rows if r["face_found"]]
    self_sim = faces.self_similarity([a.embedding for a in report.accepted])
    return {
        "face_backend": report.backend, "face_model": report.model_name,
        "selfies": {"received": len(files), "accepted": len(report.accepted),
                    "rejected": {r.filename: r.code for r in report.rejected},
                    "self_similarity": None if self_sim is None else round(self_sim, 4)},
        "images": rows,
        "overall": {"images": len(rows), "faces_found": len(found),
                    "mean_similarity": round(float(sum(found) / len(found)), 4) if found else None,
                    "median_similarity": round(float(statistics.median(found)), 4) if found else None,
                    "min_similarity": min(found) if found else None, "max_similarity": max(found) if found else None},
        "scale": "identity_similarity in [0, 1]; 0.5 = the backend's same-person distance limit",
    }


def evaluate_main(argv: list[str], face_service_factory: Callable[[Settings], Any] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="generate_twin.py evaluate",
                                 description="Likeness report: portraits in --images against the selfies in --selfies.")
    ap.add_argument("--selfies", type=Path, required=True, help="folder of the person's selfies")
    ap.add_argument("--images", type=Path, required=True, help="folder of portraits to score")
    ap.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    args = ap.parse_args(argv)
    settings = Settings.from_env()
    try:
        faces = (face_service_factory or _default_face_service)(settings)
        faces.setup()
        rep = evaluate(args.selfies, args.images, settings, faces)
    except TwinError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    sel = rep["selfies"]
    print(f"face backend: {rep['face_backend']} ({rep['face_model']}); scale: {rep['scale']}")
    print(f"selfies: {sel['accepted']} of {sel['received']} accepted; they agree at "
          + ("n/a (one selfie)" if sel["self_similarity"] is None else f"{sel['self_similarity']:.3f}"))
    for r in rep["images"]:
        print(f"  {r['image']}: " + (f"likeness {r['identity_similarity']:.3f}" if r["face_found"] else
                                     "no face found" + (f" ({r['error']})" if r.get("error") else "")))
    o = rep["overall"]
    print(f"overall: {o['faces_found']} of {o['images']} images with a face"
          + (f"; likeness mean {o['mean_similarity']:.3f}, median {o['median_similarity']:.3f}, "
             f"min {o['min_similarity']:.3f}, max {o['max_similarity']:.3f}" if o["faces_found"] else ""))
    if args.json:
        args.json.write_text(json.dumps(rep, indent=1))
    return 0


# CLI names that predate the field table and differ from the field name; every other field is --kebab-case.
CLI_FLAG_ALIASES = {"quality_mode": "--quality", "identity_strength": "--strength", "strength": "--img2img-strength"}
_CLI_TYPES = {"string": str, "integer": int, "number": float}


def cli_flag(name: str) -> str:
    return CLI_FLAG_ALIASES.get(name, "--" + name.replace("_", "-"))


def _json_arg(flag: str) -> Callable[[str], Any]:
    """object/array flags: JSON text, or @file.json (persona sheets are easier kept in a file)."""
    def parse(text: str) -> Any:
        src = text
        if text.startswith("@"):
            try:
                src = Path(text[1:]).read_text()
            except OSError as e:
                raise argparse.ArgumentTypeError(f"{flag} {text!r}: cannot read the file ({e.strerror})")
        try:
            return json.loads(src)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not JSON ({e.msg})")
    return parse


def add_request_flags(ap: argparse.ArgumentParser) -> None:
    """One flag per REQUEST_FIELDS row, so a new field reaches the CLI without anyone listing it here.
    Types and static enums come from the row; range/enum checks that need settings (limits, style names)
    are left to GenerationRequest.from_dict, exactly as the API applies them. Defaults stay None: an
    absent flag is an absent JSON key."""
    for f in REQUEST_FIELDS:
        flag = cli_flag(f.name)
        # argparse formats help with %: a literal one in a field doc must not break --help
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": (f.doc or "").replace("%", "%%") or None}
        if f.kind == "boolean":
            kw["action"] = argparse.BooleanOptionalAction
        elif f.kind in ("object", "array"):
            kw["type"], kw["metavar"] = _json_arg(flag), "JSON|@FILE"
        else:
            kw["type"] = _CLI_TYPES[f.kind]
            if f.enum is not None and not callable(f.enum):
                kw["choices"] = tuple(f.enum)
        if f.name == "init_image":
            kw["metavar"], kw["help"] = "PATH", "img2img: start from this picture (a file path here)"
        if f.required:
            kw["required"] = True
        ap.add_argument(flag, **kw)


def main(argv: list[str] | None = None, *, face_service_factory: Callable[[Settings], Any] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["evaluate"]:
        return evaluate_main(argv[1:], face_service_factory)
    ap = argparse.ArgumentParser(description="Selfies -> identity -> portraits, on the configured model profile.")
    ap.add_argument("--selfies", type=Path, required=True, help="folder of selfie photos")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    add_request_flags(ap)  # --prompt and every other request field
    ap.add_argument("--combine", choices=("average", "stack"), help="how selfies become one identity")
    ap.add_argument("--profile", choices=("auto", "sdxl", "tiny"), help="override TWIN_MODEL_PROFILE")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    overrides = {k: v for k, v in (("model_profile", args.profile), ("identity_combine", args.combine)) if v}
    settings = Settings.from_env(**overrides)
    # Only the flags given: absent fields take the same defaults the API applies.
    payload = {f.name: getattr(args, f.name) for f in REQUEST_FIELDS if getattr(args, f.name, None) is not None}
    if "init_image" in payload:  # a path here; the API's inline base64 form from it
        import base64
        init = Path(payload["init_image"])
        if not init.is_file():
            print(f"error: --init-image {str(init)!r} is not a file", file=sys.stderr)
            return 2
        payload["init_image"] = base64.b64encode(init.read_bytes()).decode()
    t0 = time.perf_counter()
    try:
        req = GenerationRequest.from_dict(payload, settings)
        files = [(p.name, p.read_bytes()) for p in sorted(args.selfies.iterdir())
                 if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES] if args.selfies.is_dir() else []
        if not files:
            raise InvalidRequest(f"no images found in --selfies {str(args.selfies)!r}")
        print(f"[1/4] loading face service and model ({len(files)} photos)", flush=True)
        faces = (face_service_factory or _default_face_service)(settings)
        faces.setup()
        from utils.services import check_face_backend
        check_face_backend(settings, faces)
        gen = DigitalTwinGenerator(settings).setup()
        if req.model is not None:
            # --model: the same switch POST /models/load makes; an unknown name is InvalidRequest listing them.
            gen.load_model(req.model)
        info = gen.info()
        print(f"      model: {info['profile']} ({info['model_name']}) on {info['device']}/{info['dtype']}, "
              f"adapter {info['variant']}" + ("  ** DEMO MODEL: outputs are not portraits **" if info["is_demo"] else ""),
              flush=True)
        print("[2/4] checking faces", flush=True)
        report = faces.validate_selfies(files)
        for r in report.rejected:
            print(f"      rejected {r.filename}: {r.message}")
        if not report.accepted:
            raise InvalidRequest("no selfie was accepted; nothing to build an identity from")
        print(f"      accepted {len(report.accepted)} of {len(files)}", flush=True)
        print("[3/4] building identity", flush=True)
        from utils.services import identity_inputs
        identity = gen.build_identity([a.crop for a in report.accepted], [a.embedding for a in report.accepted],
                                      face_model=report.model_name, **identity_inputs(report))
        args.out.mkdir(parents=True, exist_ok=True)
        identity.save(args.out / "identity.safetensors")
        keep = req.num_images
        total = req.candidates or keep
        # Best-of-N and restoration through the service's own functions (utils/services), not a copy.
        from utils import services
        template = report.template if hasattr(faces, "identity_similarity") else None
        if total > keep and template is None:
            raise InvalidRequest("best-of-N (--candidates) needs a face template, which this face service "
                                 "did not produce")
        restorer = None
        if req.restore_faces:
            restorer = services.build_restorer(settings, info.get("profile"))
            restorer.check(req.restore_model)    # a missing model: exit 2 naming the file and the download command
        self_sim = None
        if hasattr(faces, "self_similarity"):    # the reference the scores are read against (the API records it at upload)
            try:
                self_sim = faces.self_similarity([a.embedding for a in report.accepted])
            except Exception:  # noqa: BLE001 - a reference number, never a reason to fail
                self_sim = None
        print(f"[4/4] generating {total} image(s)" + (f", keeping the best {keep}" if total > keep else ""), flush=True)

        def progress(step: int, total: int) -> None:
            print(f"      step {step}/{total}", flush=True)
        images, seeds, result_meta = services.generate_candidates(gen, req.with_identity(identity), total, progress,
                                                                  lambda: False)
        candidates = None
        scores: list = [None] * len(images)
        if total > keep:
            order, candidates, scores = services.rank_candidates(faces, images, seeds, template, keep)
        else:
            order = list(range(len(images)))
        outputs = []
        for rank, ci in enumerate(order, start=1):
            image, name = images[ci], f"avatar_{rank:03d}.png"
            output: dict[str, Any] = {"filename": name, "seed": int(seeds[ci]), "width": image.width,
                                      "height": image.height}
            if candidates is not None:
                output["candidate"] = ci + 1
            if restorer is not None:
                image = services.restore_output(faces, restorer, req, image, output, args.out, rank, template, [])
            elif template is not None:
                output["identity_similarity"] = (scores[ci] if candidates is not None
                                                 else services.score_image(faces, image, template))
            if "identity_similarity" in output and self_sim is not None:
                output["self_similarity"] = round(float(self_sim), 4)
            image.save(args.out / name)
            output["path"] = str(args.out / name)
            outputs.append(output)
    except TwinError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    result = dict(result_meta or {})
    if candidates is not None:
        result["candidates"] = candidates
    meta = {"request": req.to_dict(), "result": result, "outputs": outputs,
            "self_similarity": None if self_sim is None else round(float(self_sim), 4),
            "wall_s": round(time.perf_counter() - t0, 2)}
    (args.out / "metadata.json").write_text(json.dumps(meta, indent=1, default=str))
    for o in outputs:
        print(f"wrote {o['path']} (seed {o['seed']})" + (f" + {o['raw_filename']}" if o.get("raw_filename") else ""))
    print(f"done in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
