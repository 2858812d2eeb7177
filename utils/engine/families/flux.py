"""The FLUX.1 family: one loaded FLUX base model (FluxPipeline; FluxImg2ImgPipeline over the same modules), and
what a generation call is for FLUX: the flow-matching scheduler of the model's folder, steps and embedded
guidance per quality mode and distillation (dev / schnell, ``tuning.FLUX_QUALITY``), the 8-step LoRA, the
two text encoders (T5 reads the prompt, 512 tokens on dev and 256 on schnell; CLIP-L gives only the pooled
vector, 77 tokens: the persona prompt is fitted to each with its own tokenizer), true CFG for a negative
prompt (``true_cfg``), and the packed 16-channel latents for previews.

An identity method plugs in as ``FluxModel(identity_method=...)`` (``FluxIdentityMethod`` in
utils/contracts.py): InfiniteYou (utils/engine/identity/infiniteyou.py) with TWIN_IP_ADAPTER_VARIANT=infiniteyou.
Without one, a job with a session generates without identity conditioning, its metadata says ``identity: null``
with the note ``NO_IDENTITY_NOTE``, and the fields only an identity method reads (identity_strength, pose,
pose_strength) are refused (``request.APPLICABILITY``).
"""
from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable

from utils.config import Settings
from utils.engine.families.loras import check_lora, set_adapters
from utils.engine.previews import FLUX_LATENT_RGB
from utils.engine.request import GenerationRequest, check_applicable
from utils.engine.tuning import (BASE_NEGATIVE, FLUX_FAST_FALLBACK, FLUX_FAST_LORA_SCALE, flux_quality_row,
                                 request_size, style_library)
from utils.errors import Conflict, InvalidRequest, OutOfMemory
from utils.init_image import fit_image, parse_init_image
from utils.prompts import build_prompt
from utils.styles import Style, apply_style

FAMILY = "flux"
NO_IDENTITY_NOTE = "no identity method: set TWIN_IP_ADAPTER_VARIANT=infiniteyou for likeness on FLUX"
CLIP_WINDOW = 77


class FluxModel:
    """A loaded FLUX base model (+ its identity method, when one is plugged in). ``run`` makes one pipeline
    call at a time (LoRA state is shared by every call)."""

    family = FAMILY
    latent_rgb = FLUX_LATENT_RGB

    def __init__(self, settings: Settings, models, identity_method=None) -> None:
        self.settings = settings
        self.models = models
        self.adapter = identity_method     # the FamilyModel contract's name for the identity method
        self.lock = threading.Lock()
        self._img2img = None

    @classmethod
    def load(cls, settings: Settings, entry=None) -> "FluxModel":
        """A FLUX base model (``entry`` from the catalogue; None: the configured one) with InfiniteYou when
        TWIN_IP_ADAPTER_VARIANT=infiniteyou, else without an identity method."""
        from utils.models.startup import load_base_model
        models = load_base_model(settings, entry)
        method = None
        if settings.ip_adapter_variant == "infiniteyou":
            from utils.engine.identity.infiniteyou import InfiniteYou
            method = InfiniteYou.load(settings, models)
            models.adapter_variant = method.variant
        return cls(settings, models, method)

    # --- what it is ------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.models.model_name

    @property
    def variant(self) -> str:
        return getattr(self.adapter, "variant", "") or ""

    @property
    def method_fields(self) -> frozenset:
        return frozenset(getattr(self.adapter, "fields", frozenset()))

    @property
    def guidance_distilled(self) -> bool:
        """FLUX.1-dev and its fine-tunes embed the guidance scale; schnell has no guidance input."""
        return bool(self.models.pipe.transformer.config.guidance_embeds)

    def info(self) -> dict[str, Any]:
        m = self.models
        return {"profile": m.profile, "is_demo": m.profile == "tiny", "family": self.family,
                "model_name": m.model_name, "device": m.device, "dtype": str(m.dtype).replace("torch.", ""),
                "native_resolution": m.native_resolution, "loras": sorted(m.loras),
                "fast_mode": ("schnell" if not self.guidance_distilled else
                              "few-step-lora" if m.lightning_adapter else "fallback"),
                "notes": list(m.notes), "variant": self.variant, "identity_model": m.identity_model or m.model_name,
                "flux_variant": "dev" if self.guidance_distilled else "schnell", "memory": m.memory,
                "identity_method": self.variant or None,
                **(getattr(self.adapter, "info", dict)() if self.adapter is not None else
                   {"identity_note": NO_IDENTITY_NOTE})}

    # --- identity --------------------------------------------------------------------------------------
    def build_identity(self, crops, face_embeddings, **inputs):
        """The identity method's identity, or None: without one there is nothing to build (the session keeps
        its face features; a switch back to SDXL uses its cached SDXL identity)."""
        if self.adapter is None:
            return None
        return self.adapter.build_identity(crops, face_embeddings, **inputs)

    def check_identity(self, identity) -> None:
        if self.adapter is None:
            raise Conflict(f"{NO_IDENTITY_NOTE}: the identity file (built for {getattr(identity, 'variant', '?')!r}) "
                           "is not used on this model", code="identity_mismatch")
        self.adapter.check_identity(identity)

    def check_request(self, req: GenerationRequest, plan: dict[str, Any]) -> None:
        """The fields the request gives must apply to FLUX and to this identity method (400 naming them)."""
        check_applicable(req, self.family, self.method_fields, self.variant)

    # --- plan ------------------------------------------------------------------------------------------
    def resolve_size(self, req: GenerationRequest) -> tuple[int, int]:
        return request_size(req, self.family, self.models.native_resolution, self.settings)

    def plan(self, req: GenerationRequest) -> dict[str, Any]:
        """Steps, embedded guidance, T5 window, LoRAs and size; raises for a LoRA that is not this family's."""
        m = self.models
        check_lora(req.lora, m, self.family)
        mode = flux_quality_row(req.quality_mode, self.guidance_distilled)
        fallback = False
        if mode.pop("few_step_lora", False) and not m.lightning_adapter:
            mode, fallback = dict(FLUX_FAST_FALLBACK), True
        # A style's prompt text and aspect ratio apply; its guidance and steps are SDXL CFG numbers, not FLUX's.
        style = style_library(self.settings)[req.style]
        style_defaults: dict[str, Any] = {}
        if style.aspect_ratio is not None and req.width is None and req.aspect_ratio is None:
            style_defaults["aspect_ratio"] = style.aspect_ratio
        if self.settings.max_steps:
            mode["steps"] = min(mode["steps"], self.settings.max_steps)
        adapters: list[tuple[str, float]] = []
        if req.lora is not None:
            adapters.append((m.loras[req.lora], req.lora_scale))
        if req.quality_mode == "fast" and self.guidance_distilled and not fallback:
            adapters.append((m.lightning_adapter, FLUX_FAST_LORA_SCALE))
        width, height = self.resolve_size(req)
        true_cfg = req.true_cfg if req.true_cfg is not None and req.true_cfg > 1.0 else None
        return {**mode, "fast_mode_fallback": fallback, "adapters": adapters, "width": width, "height": height,
                "style_defaults": style_defaults, "true_cfg": true_cfg}

    def call_kwargs(self, req: GenerationRequest, plan: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
        """Arguments for the FluxPipeline call: ``prompt`` (CLIP, pooled) and ``prompt_2`` (T5) each fitted to
        its encoder's window; the negative only with true CFG."""
        import torch
        style = style_library(self.settings)[req.style]
        t5_built, clip_built = self.build_prompts(req, style, plan["max_sequence_length"])
        t5_text = apply_style(style, t5_built.text, None)[0]
        clip_text = apply_style(style, clip_built.text, None)[0]
        if req.persona or req.attributes:
            plan["prompt_builder"] = {**t5_built.to_json(), "clip": clip_built.to_json()}
        negative = None
        if plan["true_cfg"] is not None:
            negative = ", ".join(x for x in (req.negative_prompt, style.negative, t5_built.negative, BASE_NEGATIVE) if x)
        plan["prompt"], plan["prompt_clip"], plan["negative_prompt"] = t5_text, clip_text, negative
        plan["prompt_weighting"] = None
        kwargs = dict(prompt=clip_text, prompt_2=t5_text, num_images_per_prompt=req.num_images, width=plan["width"],
                      height=plan["height"], num_inference_steps=plan["steps"], guidance_scale=plan["guidance_scale"],
                      max_sequence_length=plan["max_sequence_length"],
                      generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="pil")
        if negative is not None:
            kwargs.update(negative_prompt=negative, true_cfg_scale=plan["true_cfg"])
        if req.init_image is not None:
            # As for SDXL: the start picture fitted to the request's size; int(steps * strength) steps run.
            kwargs.update(image=fit_image(self._init_pixels(req), plan["width"], plan["height"]),
                          strength=req.strength, num_inference_steps=max(plan["steps"], math.ceil(1 / req.strength)))
        return kwargs

    def build_prompts(self, req: GenerationRequest, style: Style, window: int):
        """The persona / attribute prompt twice: inside T5's window (what FLUX reads) and inside CLIP's 77 (the
        pooled vector), each beside the style's text and counted with that encoder's own tokenizer."""
        pipe = self.models.pipe
        style_text = (style.prefix + " " + style.suffix).strip(" ,")
        out = []
        for tok, room in ((pipe.tokenizer_2, window - 1), (pipe.tokenizer, CLIP_WINDOW - 2)):   # </s>; <s> </s>
            def count(text: str, tok=tok) -> int:
                return len(tok(text, add_special_tokens=False).input_ids)
            out.append(build_prompt(req.prompt, req.persona, req.attributes, count_tokens=count,
                                    max_tokens=max(room - count(style_text), 1)))
        return out[0], out[1]

    def _init_pixels(self, req: GenerationRequest):
        if req.init_pixels is not None:
            return req.init_pixels
        ref = parse_init_image(req.init_image, int(self.settings.max_file_mb * 1024 * 1024))
        if ref.kind != "upload":
            raise InvalidRequest(f"init_image={req.init_image!r} must be resolved by the service before generate()")
        from utils.images import decode_image
        return decode_image(ref.data, "init_image", max_pixels=self.settings.max_pixels)

    def img2img_pipe(self):
        """FluxImg2ImgPipeline over the loaded pipeline's own modules (built directly: from_pipe re-casts every
        module and says so)."""
        if self._img2img is None:
            from diffusers import FluxImg2ImgPipeline
            self._img2img = FluxImg2ImgPipeline(**self.models.pipe.components)
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img

    # --- one call --------------------------------------------------------------------------------------
    def run(self, req: GenerationRequest, plan: dict[str, Any], kwargs: dict[str, Any],
            on_step_end: Callable, marks: dict[str, float]) -> tuple[list, Any]:
        """One pipeline call under the lock (LoRAs set first; the identity method's per-call state when the
        request has an identity). Returns (PIL images, the pipeline that ran)."""
        import torch
        pipe = self.img2img_pipe() if "image" in kwargs else self.models.pipe
        with self.lock:
            marks["locked"] = time.perf_counter()
            self._set_adapters(plan["adapters"])
            conditioned = self.adapter is not None and req.identity is not None
            if conditioned:
                pipe = self.adapter.prepare(pipe, req, plan, kwargs)
            try:
                with torch.inference_mode():
                    return pipe(callback_on_step_end=on_step_end, **kwargs).images, pipe
            except torch.OutOfMemoryError:
                del kwargs
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise OutOfMemory(f"out of GPU memory generating num_images={req.num_images} at "
                                  f"{plan['width']}x{plan['height']} on FLUX; try fewer images, a smaller size, or "
                                  "TWIN_FLUX_MEMORY=quantized / offload") from None
            finally:
                if conditioned:
                    self.adapter.finish(pipe)

    def preview_latents(self, latents, plan: dict[str, Any]):
        """The step callback's packed latents [B, (h/2)(w/2), 64] as [B, 16, h, w] for a preview."""
        from diffusers import FluxPipeline
        scale = self.models.pipe.vae_scale_factor
        return FluxPipeline._unpack_latents(latents, plan["height"], plan["width"], scale)

    def call_metadata(self, req: GenerationRequest, plan: dict[str, Any]) -> dict[str, Any]:
        """What FLUX adds to a result's metadata: the distillation, the embedded guidance, the T5 window, the
        T5 and CLIP texts, true CFG (and its cost), the memory mode, and why there is no identity."""
        out = {"flux_variant": "dev" if self.guidance_distilled else "schnell",
               "guidance": "embedded" if self.guidance_distilled else "none",
               "max_sequence_length": plan["max_sequence_length"], "prompt_clip": plan.get("prompt_clip"),
               "true_cfg": plan["true_cfg"], "cost_factor": 2 if plan["true_cfg"] is not None else 1,
               "memory_mode": (self.models.memory or {}).get("mode"), "pose": None, "pose_strength": None}
        if self.adapter is not None and req.identity is not None and hasattr(self.adapter, "call_metadata"):
            out.update(self.adapter.call_metadata(req))     # optional: what the method adds (pose, stage)
        if plan["true_cfg"] is not None:
            out["true_cfg_note"] = "true CFG: a second transformer pass per step for the negative prompt (twice the cost)"
        if self.adapter is None:
            out["identity_note"] = NO_IDENTITY_NOTE
        return out

    def _set_adapters(self, adapters: list[tuple[str, float]]) -> None:
        set_adapters(self.models.pipe, self.models.pipe.transformer, adapters)
