"""DigitalTwinGenerator: the engine (``Engine`` in utils/contracts.py). Portraits of one person per session
from a base model of some family (utils/engine/families/) and its identity method.

    gen = DigitalTwinGenerator(settings); gen.setup()
    identity = gen.build_identity(crops, embeddings, face_model=...)     # once per session and model
    result = gen.generate(GenerationRequest.from_dict(payload, settings).with_identity(identity))

The engine is family-neutral: set-up, state, the base-model switch (load beside, swap between jobs),
seeds, progress and cancel per step, previews, timings and the result's metadata. What a call looks like
for a family (schedulers, prompts, adapters, pipelines) is the family model's.
"""
from __future__ import annotations

import gc
import logging
import secrets
import threading
import time
from typing import Any, Callable, Sequence

from utils.config import Settings
from utils.contracts import Optimizable
from utils.engine.families import load_family_model
from utils.engine.identity.adapters import SessionIdentity
from utils.engine.previews import latent_preview_jpeg, preview_steps
from utils.engine.request import GenerationRequest, GenerationResult, published_options
from utils.engine.tuning import MAX_IMAGES, MAX_SEED, style_library
from utils.errors import InvalidRequest, JobCanceled, ServiceNotReady, TwinError

log = logging.getLogger("twin.generate")


class DigitalTwinGenerator:
    request_type = GenerationRequest     # what the service parses a job's payload into
    identity_type = SessionIdentity      # what the service loads a session's identity file as
    max_images_per_call = MAX_IMAGES
    model_error = None                   # (a generator process sets it when a restart could not reload a model)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state = "starting"
        self.error: TwinError | None = None
        self.model = None                       # the active FamilyModel
        self._setup_lock = threading.Lock()
        # Held for a whole generate(), and by load_model() only to swap the model in: a switch happens
        # between jobs, never inside one (the new model is loaded beside the old without it).
        self._model_lock = threading.RLock()
        self._load_lock = threading.Lock()      # one load_model() at a time
        # Told each state change during set-up ("warming"): a generator process forwards it to its parent.
        self.on_state: Callable[[str], Any] | None = None

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
        t0 = time.perf_counter()
        style_library(self.settings)  # a broken style file fails set-up, naming the line
        self.model = load_family_model(self.settings)
        self.load_seconds = time.perf_counter() - t0
        shapes = self.model.warmup_shapes() if isinstance(self.model, Optimizable) else []
        if self.settings.warmup or shapes:
            self._warm_up(shapes)
        info = self.model.info()
        log.info("generator ready: profile=%s family=%s variant=%s device=%s dtype=%s (%.1f s)", info["profile"],
                 info["family"], info["variant"], info["device"], info["dtype"], time.perf_counter() - t0)

    def _warm_up(self, shapes: list) -> None:
        """The first call pays for lazy initialisation and torch.compile: pay it here, not in a job. With a
        compiled UNet every shape runs with and without CFG (other batch sizes), so no request compiles;
        /health says "warming" meanwhile."""
        self.state = "warming"
        if self.on_state is not None:
            self.on_state("warming")
        t0 = time.perf_counter()
        calls = [{"quality_mode": "fast"}] if not shapes else [
            {"width": w, "height": h, "num_images": n, "quality_mode": mode}
            for w, h, n in shapes for mode in ("fast", "balanced")]
        # The identity path: compiled blocks specialise on the adapter scale they first see (0 without an
        # identity) and recompile once, symbolically, at the first other one: make that happen here.
        ident = self.model.warmup_identity() if shapes else None
        for call in calls + ([dict(calls[-1], identity_strength=0.5)] if ident is not None else []):
            req = GenerationRequest(prompt="warm-up", style="none", **call)
            if "identity_strength" in call:
                req = req.with_identity(ident)
            self._generate(req, None, None, warmup=True)
        if isinstance(self.model, Optimizable) and self.model.speed is not None:
            self.model.speed.warmed(time.perf_counter() - t0, self.settings)

    @property
    def models(self):
        """The active model's loaded modules (LoadedModels: pipe, profile, device, dtype, loras ...)."""
        return None if self.model is None else self.model.models

    @property
    def adapter(self):
        return None if self.model is None else self.model.adapter

    def close(self) -> None:
        """Nothing to stop in-process (a generator process ends its child here)."""

    def published_options(self) -> dict[str, Any]:
        """The request choices for clients (/system-status options): the active model's family and identity
        method; known before set-up from the profile, so an API node that holds no model can answer too."""
        model = self.model
        if model is not None:
            return published_options(model.models.native_resolution, self.settings, model.family,
                                     model.method_fields, model.variant)
        from utils.models.layout import model_layout
        layout = model_layout(self.settings)
        return published_options(layout.native_resolution, self.settings, layout.family,
                                 variant=None if layout.family == "sdxl" else "")

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state, "profile": None, "is_demo": None,
                               "variant": self.settings.ip_adapter_variant, "model_name": None,
                               "device": None, "dtype": None}
        if self.error is not None:
            out["error"] = self.error.to_dict()
        if self.model is not None:
            info = self.model.info()
            out.update(info, identity_combine=self.settings.identity_combine, active_model=info["model_name"],
                       variant=info["variant"] if self.model.family != "sdxl" else info["variant"] or out["variant"],
                       method_fields=sorted(self.model.method_fields))
        return out

    def _require_ready(self) -> None:
        if self.state != "ready":
            raise ServiceNotReady(f"the generator is {self.state}, not ready")

    # --- base-model registry ----------------------------------------------------------------------
    def models_catalogue(self) -> dict[str, Any]:
        """The base models available locally (either family), the active one, and every LoRA of the LoRA
        folder with its family and whether the active model loaded it (GET /models, /loras)."""
        from utils.engine.families.loras import lora_catalogue
        from utils.models.startup import base_models
        found = base_models(self.settings)
        active = self.model.model_name if self.model is not None else None
        return {"active": active,
                "models": [{"name": n, "family": m.family, "kind": m.kind, "file": None if m.file is None else m.file.name,
                            "active": n == active} for n, m in found.items()],
                "loras": lora_catalogue(self.models) if self.model is not None else []}

    def load_model(self, name: str) -> dict[str, Any]:
        """Load base model ``name`` (either family) beside the active one, switch to it between jobs, then free
        the old one. A file that does not load raises InvalidRequest naming it; the active model keeps serving."""
        from utils.models.startup import base_models
        self._require_ready()
        found = base_models(self.settings)
        if not isinstance(name, str) or name not in found:
            raise InvalidRequest(f"model={name!r} is not a local base model; available: {', '.join(found)}",
                                 code="unknown_model", http_status=404)
        with self._load_lock:
            old_name, old_family = self.model.model_name, self.model.family
            if name == old_name:
                return {"model": name, "previous": old_name, "switched": False, "load_s": 0.0, "swap_wait_s": 0.0,
                        "family": old_family, "previous_family": old_family}
            t0 = time.perf_counter()
            model = self._load_beside(name, found[name], old_name)
            t1 = time.perf_counter()
            with self._model_lock:       # waits for a running job to finish
                t2 = time.perf_counter()
                old, self.model = self.model, model
            del old, model
            _free_memory()
            log.info("base model switched: %s (%s) -> %s (%s) (load %.2f s, waited %.2f s for the running job)",
                     old_name, old_family, name, found[name].family, t1 - t0, t2 - t1)
            return {"model": name, "previous": old_name, "switched": True, "load_s": round(t1 - t0, 3),
                    "swap_wait_s": round(t2 - t1, 3), "family": found[name].family, "previous_family": old_family}

    def _load_beside(self, name: str, entry, old_name: str):
        try:
            return load_family_model(self.settings, entry)
        except TwinError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of a file is a failed load, not a dead service
            where = entry.file if entry.file is not None else f"the diffusers folder {entry.layout.base}"
            raise InvalidRequest(f"model={name!r} failed to load from {where}: {type(e).__name__}: {e}; "
                                 f"{old_name!r} stays active", code="model_load_failed", http_status=422) from None

    def _check_model(self, req: GenerationRequest) -> None:
        want = req.model
        if want is not None and self.model is not None and want != self.model.model_name:
            raise InvalidRequest(f"model={want!r} was requested but the active base model is "
                                 f"{self.model.model_name!r}; resubmit without model or load {want!r} first",
                                 code="model_not_loaded", http_status=409)

    # --- identity ---------------------------------------------------------------------------------
    def build_identity(self, crops: Sequence[Any] | None, face_embeddings: Sequence[Any] | None = None, *,
                       face_model: str | None = None, combine: str | None = None, embedding_norms=None,
                       keypoints=None, keypoint_index=None, crop_keypoints=None) -> SessionIdentity | None:
        """Per-session identity from the accepted selfies, for the active model; None when the active model
        has no identity method (FLUX without infiniteyou). Safe to call while generate() runs.
        ``embedding_norms`` / ``keypoints`` / ``keypoint_index``: the face features
        (``SelfieReport.identity_inputs()``)."""
        self._require_ready()
        return self.model.build_identity(crops, face_embeddings, face_model=face_model,
                                         combine=combine or self.settings.identity_combine,
                                         embedding_norms=embedding_norms, keypoints=keypoints,
                                         keypoint_index=keypoint_index, crop_keypoints=crop_keypoints)

    def check_identity(self, identity: SessionIdentity) -> None:
        """Conflict(code="identity_mismatch") when ``identity`` was built for another variant or model."""
        self._require_ready()
        self.model.check_identity(identity)

    # --- generation -------------------------------------------------------------------------------
    def validate(self, req: GenerationRequest) -> dict[str, Any]:
        """Checks that need the loaded model (fields that apply to its family and identity method, LoRA name
        and family, identity variant/model, pose), for the service to call at submit time so a job does not
        fail later; returns the plan (steps, size, scheduler...). generate() makes the same checks again."""
        self._require_ready()
        if req.identity is not None:
            self.model.check_identity(req.identity)
        plan = self.model.plan(req)
        self._check_model(req)
        self.model.check_request(req, plan)
        return {k: v for k, v in plan.items() if k not in ("adapters", "twin")}

    def generate(self, req: GenerationRequest, on_progress: Callable[..., Any] | None = None,
                 should_cancel: Callable[[], bool] | None = None) -> GenerationResult:
        self._require_ready()
        with self._model_lock:   # the model in use cannot be switched under a running job
            self._check_model(req)
            return self._generate(req, on_progress, should_cancel)

    # --- training -----------------------------------------------------------------------------------
    def train(self, spec, on_progress: Callable[..., Any] | None = None,
              should_cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Train a session's LoRA (``utils.engine.training.TrainSpec``) on the active model's own modules, as
        one job between generations (the model cannot switch meanwhile). on_progress(step, total, None,
        {"loss"}) per optimiser step; errors.JobCanceled within one step. Returns the training record."""
        self._require_ready()
        with self._model_lock:
            if self.model.family != "sdxl":
                raise InvalidRequest(f"training a twin LoRA is not available for the {self.model.family} family "
                                     f"(active model {self.model.model_name!r}); load an SDXL model",
                                     code="training_not_supported", http_status=409)
            from utils.engine.training.sdxl import train
            return train(self.model, spec, on_progress, should_cancel)

    def _generate(self, req, on_progress, should_cancel, warmup: bool = False) -> GenerationResult:
        model = self.model
        plan = model.plan(req)
        if req.identity is not None:
            model.check_identity(req.identity)
        # Every mode checks here too: a cluster API node cannot know which family an unpinned job will meet.
        model.check_request(req, plan)
        base_seed = secrets.randbelow(MAX_SEED - MAX_IMAGES) if req.seed is None else req.seed
        seeds = [(base_seed + i) % (MAX_SEED + 1) for i in range(req.num_images)]
        kwargs = model.call_kwargs(req, plan, seeds)
        if warmup:
            kwargs["num_inference_steps"] = min(2, kwargs["num_inference_steps"])
        total = kwargs["num_inference_steps"]
        marks: dict[str, float] = {}
        preview = lambda latents: latent_preview_jpeg(model.preview_latents(latents, plan), fit=model.latent_rgb)
        on_step_end = _step_callback(req, total, marks, on_progress, should_cancel, preview)
        if should_cancel is not None and should_cancel():
            raise JobCanceled("canceled before the first step")
        marks["asked"] = time.perf_counter()
        images, pipe = model.run(req, plan, kwargs, on_step_end, marks)
        marks["done"] = time.perf_counter()
        meta = _metadata(model, req, plan, seeds, total, marks, pipe)
        return GenerationResult(images=images, seeds=seeds, metadata=meta)


def _step_callback(req, total: int, marks: dict[str, float], on_progress, should_cancel, preview):
    """diffusers' callback_on_step_end: progress (with a preview JPEG on the chosen steps) and cancel."""
    wanted_previews = preview_steps(total) if req.preview else set()

    def on_step_end(p, step, timestep, cb_kwargs):
        now = time.perf_counter()
        marks.setdefault("first_step", now)
        marks["last_step"] = now
        if on_progress is not None:
            n = getattr(p, "num_timesteps", total) or total
            if req.preview and step + 1 in wanted_previews and "latents" in cb_kwargs:
                on_progress(step + 1, n, preview(cb_kwargs["latents"]))
            else:
                on_progress(step + 1, n)
        if should_cancel is not None and should_cancel():
            # Raising leaves the denoising loop at once; the VAE decode is skipped too.
            raise JobCanceled(f"canceled after step {step + 1} of {total}")
        return cb_kwargs
    return on_step_end


def _metadata(model, req, plan: dict[str, Any], seeds: list[int], total: int, marks: dict[str, float], pipe) -> dict:
    m, identity = model.models, req.identity
    t0, t1 = marks.get("locked", marks["asked"]), marks["done"]
    first, last = marks.get("first_step", t0), marks.get("last_step", t1)
    steps_per_s = (total - 1) / (last - first) if total > 1 and last > first else None
    meta = {
        "profile": m.profile, "is_demo": m.profile == "tiny", "family": model.family,
        "model_name": m.model_name, "model": m.model_name,
        "variant": model.variant, "device": m.device, "dtype": str(m.dtype).replace("torch.", ""),
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
        # Which likeness ran: adapter | lora | both (auto resolved by the service), and the twin LoRA used.
        "identity_mode": req.identity_mode,
        "twin_lora": req.twin.metadata(req.twin_lora_scale) if plan.get("twin") else None,
        **model.call_metadata(req, plan),
        "img2img": None if req.init_image is None else {
            "init_image": req.to_dict()["init_image"], "strength": req.strength,
            "denoise_steps": getattr(pipe, "num_timesteps", None)},
        "timings": {"queue_lock_s": round(t0 - marks["asked"], 4), "total_s": round(t1 - t0, 4),
                    "denoise_s": round(last - t0, 4), "decode_s": round(t1 - last, 4),
                    "steps_per_s": round(steps_per_s, 2) if steps_per_s else None},
    }
    if plan["fast_mode_fallback"]:
        meta["note"] = "few-step LoRA not installed: fast mode used fewer steps of the normal scheduler"
    return meta


def _free_memory() -> None:
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
