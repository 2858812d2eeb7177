"""The speed plan of a loaded SDXL model: compile (regional / full, with an on-disk cache and a recompile cap),
dynamic quantization (torchao int8 / fp8), DeepCache-style step caching and the VAE switches, applied once
after the model and its identity adapter are loaded. ``SpeedState`` is what /system-status shows.

    state = apply_speed(settings, models)      # models: utils.models.load.LoadedModels
    ... warm-up calls (the engine runs them; /health says "warming") ...
    state.warmed(seconds)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from utils.config import Settings
from utils.engine.speed.plan import Device, SpeedPlan, resolve_quantize, speed_plan, warmup_shapes

log = logging.getLogger("twin.speed")

__all__ = ["Device", "SpeedPlan", "SpeedState", "apply_speed", "device_facts", "resolve_quantize", "speed_plan",
           "warmup_shapes"]


@dataclass
class SpeedState:
    plan: SpeedPlan
    compiled: str | None = None              # what torch.compile wraps
    cache_dir: str | None = None
    quantized_layers: int = 0
    step_cache: Any = None                   # StepCache while step caching is on
    vae: str = "stock"
    warmup_seconds: float | None = None
    recompile_limit: int | None = None
    notes: list[str] = field(default_factory=list)

    def warmed(self, seconds: float, settings: Settings) -> None:
        self.warmup_seconds = round(seconds, 3)
        if self.compiled:
            from utils.engine.speed.compile import cap_recompiles
            self.recompile_limit = cap_recompiles(settings.compile_max_recompiles)

    def to_json(self) -> dict[str, Any]:
        p = self.plan
        sc = self.step_cache
        return {"compile": p.compile, "compiled": self.compiled, "compile_cache_dir": self.cache_dir,
                "recompile_limit": self.recompile_limit, "quantize": p.quantize,
                "quantized_layers": self.quantized_layers,
                "step_cache": {"every": p.step_cache, "full_steps": sc.full_steps, "reused_steps": sc.reused_steps}
                if sc is not None else None,
                "vae": self.vae, "vae_slicing": p.vae_slicing, "vae_tiling": p.vae_tiling,
                "warmup_seconds": self.warmup_seconds, "notes": p.notes + self.notes}


def device_facts(device: str) -> Device:
    if not str(device).startswith("cuda"):
        return Device("cpu")
    from utils.models.flux_memory import gpu_facts
    g = gpu_facts(device)
    return Device("cuda", g.name, g.capability)


def apply_speed(settings: Settings, models) -> SpeedState:
    """Apply the plan to ``models.pipe`` in place: quantize before compiling (the compiled graph then holds
    the quantized kernels), hooks of the step cache before compiling (regional compile leaves them outside
    the compiled blocks)."""
    device = device_facts(models.device)
    plan = speed_plan(settings, device, models.family)
    state = SpeedState(plan, vae="fp16-fix" if plan.vae_fp16_fix else "stock")
    pipe = models.pipe
    if models.family != "sdxl":
        return state
    if plan.vae_slicing:
        pipe.vae.enable_slicing()
    if plan.vae_tiling:
        pipe.vae.enable_tiling()
    if plan.quantize != "none":
        from utils.engine.speed.quantize import quantize_unet
        state.quantized_layers = quantize_unet(pipe.unet, plan.quantize)
    if plan.step_cache:
        from utils.engine.speed.step_cache import StepCache
        state.step_cache = StepCache(pipe.unet, plan.step_cache)
    if plan.compile != "off":
        from utils.engine.speed.compile import compile_unet, prepare_cache
        state.cache_dir = str(prepare_cache(settings.resolved_compile_cache_dir, device))
        state.compiled = compile_unet(pipe, plan.compile, device)
    log.info("speed plan applied", extra={"optimizations": state.to_json()})
    return state
