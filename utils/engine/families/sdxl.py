"""The SDXL family: one loaded SDXL base model with its identity adapter, and everything about a generation
call that is SDXL's own (schedulers per quality mode, the few-step LoRA, compel weighting over both CLIP
encoders, img2img through ``from_pipe``, InstantID's IdentityNet, FaceID Plus v2's per-call CLIP branch).

The engine (``utils.engine.generator``) is family-neutral: it asks a ``FamilyModel`` (utils/contracts.py)
for a plan, call arguments and one pipeline call, and does seeds, progress, cancel, timings and metadata.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable

from utils.config import Settings
from utils.engine.identity.adapters import AdapterManager, SessionIdentity
from utils.engine.identity.pose import pose_image
from utils.engine.previews import SDXL_LATENT_RGB
from utils.engine.families.loras import check_lora, set_adapters
from utils.engine.training.loras import TwinLoras
from utils.engine.request import GenerationRequest, check_applicable
from utils.engine.tuning import (BASE_NEGATIVE, POSE_VARIANTS, fast_fallback_row, quality_row, request_size,
                                 style_library)
from utils.errors import InvalidRequest, OutOfMemory
from utils.init_image import fit_image, parse_init_image
from utils.prompts import build_prompt
from utils.styles import Style, apply_style

FAMILY = "sdxl"


class SdxlModel:
    """A loaded SDXL base model + identity adapter. ``run`` makes one pipeline call at a time (schedulers,
    adapters and LoRA state are shared by every call)."""

    family = FAMILY
    latent_rgb = SDXL_LATENT_RGB

    def __init__(self, settings: Settings, models, adapter: AdapterManager) -> None:
        from utils.models.load import dpmpp_karras, few_step_scheduler
        self.settings = settings
        self.models = models
        self.adapter = adapter
        cfg = models.base_scheduler_config
        self.schedulers = {"dpmpp_2m_karras": dpmpp_karras(cfg), "euler_trailing": few_step_scheduler(cfg)}
        self.speed = None              # the SpeedState once load() applied the speed plan
        self.null_identity = adapter.null_identity()
        self.lock = threading.Lock()   # one pipeline call at a time
        self._compel = None            # built on the first weighted prompt (style_strength < 1)
        self._img2img = None           # built on the first img2img request, sharing models.pipe's modules
        self.twins = TwinLoras(models.pipe, settings.twin_lora_cache)   # trained twin LoRAs, LRU

    @classmethod
    def load(cls, settings: Settings, entry=None) -> "SdxlModel":
        """An SDXL base model (``entry`` from the catalogue, a diffusers folder or a single-file checkpoint;
        None: the configured one) with the configured adapter."""
        from utils.models.startup import load_base_model
        models = load_base_model(settings, entry)
        adapter = AdapterManager(models)
        adapter.load(settings.ip_adapter_variant)
        model = cls(settings, models, adapter)
        # After the adapter: quantization must leave its layers alone, and compiled blocks must trace its
        # attention processors.
        from utils.engine.speed import apply_speed
        model.speed = apply_speed(settings, models)
        return model

    # --- what it is ------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.models.model_name

    @property
    def variant(self) -> str:
        return self.adapter.variant or ""

    def info(self) -> dict[str, Any]:
        m = self.models
        return {"profile": m.profile, "is_demo": m.profile == "tiny", "family": self.family,
                "model_name": m.model_name, "device": m.device, "dtype": str(m.dtype).replace("torch.", ""),
                "native_resolution": m.native_resolution, "loras": sorted(m.loras),
                "fast_mode": "few-step-lora" if m.lightning_adapter else "fallback",
                "notes": list(m.notes), "variant": self.variant,
                # what a session's identity is tied to (the base family it was encoded for)
                "identity_model": m.identity_model or m.model_name,
                "optimizations": self.speed.to_json() if self.speed is not None else None}

    def warmup_shapes(self) -> list[tuple[int, int, int]]:
        """Optimizable: the shapes to compile in set-up (TWIN_COMPILE_WARMUP); none when nothing is compiled."""
        if self.speed is None or not self.speed.compiled:
            return []
        from utils.engine.speed import warmup_shapes
        return warmup_shapes(self.settings, self.models.native_resolution)

    def warmup_identity(self) -> SessionIdentity:
        return self.null_identity

    # --- identity --------------------------------------------------------------------------------------
    def build_identity(self, crops, face_embeddings, **inputs) -> SessionIdentity:
        return self.adapter.build_identity(crops, face_embeddings, **inputs)

    def check_identity(self, identity: SessionIdentity) -> None:
        self.adapter.check_identity(identity)

    @property
    def method_fields(self) -> frozenset:
        """The request fields the identity adapter reads (pose control only with InstantID's IdentityNet)."""
        return frozenset({"identity_strength"} | ({"pose", "pose_strength"} if self.variant in POSE_VARIANTS else set()))

    def check_request(self, req: GenerationRequest, plan: dict[str, Any]) -> None:
        """Checks that need this model, beyond plan(): every field given applies to SDXL and this adapter;
        with the identity, a pose's selfie must exist (at submit the service checks it against the session)."""
        check_applicable(req, self.family, self.method_fields, self.variant)
        if self.variant in POSE_VARIANTS and req.identity is not None:
            self.pose_image(req, plan)

    def pose_image(self, req: GenerationRequest, plan: dict[str, Any]):
        ex = req.identity.extras if req.identity is not None else {}
        kps, idx = ex.get("keypoints"), ex.get("keypoint_index")
        return pose_image(req.pose, plan["width"], plan["height"],
                          None if kps is None else kps.numpy(), None if idx is None else idx.tolist())

    # --- plan ------------------------------------------------------------------------------------------
    def resolve_size(self, req: GenerationRequest) -> tuple[int, int]:
        return request_size(req, self.family, self.models.native_resolution, self.settings)

    def plan(self, req: GenerationRequest) -> dict[str, Any]:
        """Steps, guidance, scheduler and adapters for a request; raises for an unknown LoRA."""
        m = self.models
        check_lora(req.lora, m, self.family)
        mode = quality_row(req.quality_mode, self.variant)
        fallback = False
        if mode.pop("few_step_lora", False) and not m.lightning_adapter:
            mode, fallback = fast_fallback_row(self.variant), True
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
        # The twin LoRA is loaded (or found in the LRU) under the call lock, in run().
        twin = (req.twin, req.twin_lora_scale) if uses_twin(req) else None
        return {**mode, "fast_mode_fallback": fallback, "adapters": adapters, "width": width, "height": height,
                "style_defaults": style_defaults, "twin": twin}

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
        # Weighted (compel-syntax) texts become embeddings in run(), under the lock and after the LoRA
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
                            max_tokens=max(window - style_tokens, 1),
                            twin_caption=req.twin.caption if uses_twin(req) else None)

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

    # --- one call --------------------------------------------------------------------------------------
    def run(self, req: GenerationRequest, plan: dict[str, Any], kwargs: dict[str, Any],
            on_step_end: Callable, marks: dict[str, float]) -> tuple[list, Any]:
        """One pipeline call under the lock: scheduler, adapter scale, LoRAs and per-call identity state set
        first. Returns (PIL images, the pipeline that ran); ``marks["locked"]`` is when the lock was taken.
        ``kwargs`` from call_kwargs."""
        import torch
        pipe = self.img2img_pipe() if "image" in kwargs else self.models.pipe
        identity = req.identity or self.null_identity
        do_cfg = plan["guidance_scale"] > 1.0  # the pipeline's own rule for classifier-free guidance
        kwargs["ip_adapter_image_embeds"] = self.adapter.pipeline_embeds(identity, do_cfg)
        instantid = self.variant == "instantid"
        if instantid:
            from utils.engine.identity.instantid import identity_tokens
            kwargs["image"] = self.pose_image(req, plan)
            kwargs["controlnet_conditioning_scale"] = req.pose_strength
            tokens = identity_tokens(pipe.unet, identity.embeds, req.num_images, do_cfg)
        with self.lock:
            marks["locked"] = time.perf_counter()
            pipe.scheduler = self.schedulers[plan["scheduler"]]
            pipe.set_ip_adapter_scale(req.identity_strength if req.identity is not None else 0.0)
            twin = plan.get("twin")
            self._set_adapters(plan["adapters"] + ([(self.twins.activate(twin[0]), twin[1])] if twin else []))
            self.adapter.prepare_call(identity, req.num_images, do_cfg)
            if instantid:
                pipe.controlnet.identity_tokens = tokens   # the IdentityNet reads these in place of the text
            try:
                if plan["prompt_weighting"]:
                    kwargs.update(self.weighted_embeds(kwargs.pop("prompt"), kwargs.pop("negative_prompt")))
                with torch.inference_mode():
                    return pipe(callback_on_step_end=on_step_end, **kwargs).images, pipe
            except torch.OutOfMemoryError:
                del kwargs
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise OutOfMemory(f"out of GPU memory generating num_images={req.num_images} at "
                                  f"{plan['width']}x{plan['height']}; try fewer images or a smaller size") from None
            finally:
                if instantid:
                    pipe.controlnet.identity_tokens = None

    def preview_latents(self, latents, plan: dict[str, Any]):
        """The step callback's latents as [B, C, h, w] for a preview (SDXL's already are)."""
        return latents

    def call_metadata(self, req: GenerationRequest, plan: dict[str, Any]) -> dict[str, Any]:
        """What this family adds to a result's metadata."""
        posed = self.variant in POSE_VARIANTS
        return {"pose": req.pose if posed else None, "pose_strength": req.pose_strength if posed else None}

    def _set_adapters(self, adapters: list[tuple[str, float]]) -> None:
        set_adapters(self.models.pipe, self.models.pipe.unet, adapters)


def uses_twin(req: GenerationRequest) -> bool:
    """The request runs with its session's twin LoRA (the service resolved identity_mode to lora or both)."""
    return req.twin is not None and req.identity_mode in ("lora", "both")
