"""What the speed settings mean on this device: the compile mode, the quantization (``auto`` resolved by GPU
class, fp8 refused where the GPU has no fp8 units), step caching and the VAE switches, with the reason for
each choice. Pure: no torch import, so settings problems surface before any model loads."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from utils.config import Settings
from utils.errors import ConfigError

FP8_CAPABILITY = (8, 9)     # Ada / Hopper: fp8 tensor cores (torchao's row-wise fp8 needs them)
INT8_CAPABILITY = (8, 0)    # Ampere: int8 tensor cores


@dataclass(frozen=True)
class Device:
    """The facts the plan needs: 'cpu' or a GPU's name and compute capability."""
    kind: str                                  # cpu | cuda
    name: str = "cpu"
    capability: tuple[int, int] = (0, 0)

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.name.lower()).strip("-") or self.kind


@dataclass
class SpeedPlan:
    compile: str                     # off | regional | full
    quantize: str                    # none | int8 | fp8 (auto resolved)
    step_cache: int                  # 0 = off, else full UNet every k-th step
    vae_fp16_fix: bool
    vae_slicing: bool
    vae_tiling: bool
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def resolve_quantize(setting: str, device: Device) -> tuple[str, str | None]:
    """(quantization, why) for TWIN_QUANTIZE on ``device``; fp8 on a device without fp8 units is a
    ConfigError naming the device (a silent fallback would hide a misconfigured fleet)."""
    if setting == "fp8" and (device.kind != "cuda" or device.capability < FP8_CAPABILITY):
        where = "the CPU" if device.kind != "cuda" else f"{device.name} (compute capability {device.capability[0]}.{device.capability[1]})"
        raise ConfigError(f"TWIN_QUANTIZE=fp8 needs a GPU with fp8 units (compute capability 8.9+: Ada, Hopper); "
                          f"this is {where}: use int8 or auto")
    if setting != "auto":
        return setting, None
    if device.kind != "cuda":
        return "none", "TWIN_QUANTIZE=auto: none on the CPU (fp8 needs a GPU with fp8 units; int8 is opt-in here)"
    if device.capability >= FP8_CAPABILITY:
        return "fp8", f"TWIN_QUANTIZE=auto: fp8 on {device.name}"
    if device.capability >= INT8_CAPABILITY:
        return "int8", f"TWIN_QUANTIZE=auto: int8 on {device.name} (no fp8 units)"
    return "none", f"TWIN_QUANTIZE=auto: none on {device.name} (compute capability below 8.0)"


def speed_plan(settings: Settings, device: Device, family: str = "sdxl") -> SpeedPlan:
    """The plan for one loaded model; FLUX keeps its own memory plan (TWIN_FLUX_MEMORY), so the SDXL switches
    are listed there as not applied."""
    notes: list[str] = []
    if settings.torch_compile and settings.compile == "off":
        notes.append("TWIN_TORCH_COMPILE is deprecated: read as TWIN_COMPILE=full")
    quantize, why = resolve_quantize(settings.quantize, device)
    if why:
        notes.append(why)
    plan = SpeedPlan(compile=settings.compile_mode, quantize=quantize,
                     step_cache=settings.step_cache if settings.step_cache > 1 else 0,
                     vae_fp16_fix=settings.vae_fp16_fix, vae_slicing=settings.vae_slicing,
                     vae_tiling=settings.vae_tiling, notes=notes)
    if family != "sdxl":
        off = [n for n, on in (("TWIN_COMPILE", plan.compile != "off"), ("TWIN_QUANTIZE", quantize != "none"),
                               ("TWIN_STEP_CACHE", plan.step_cache), ("TWIN_VAE_FP16_FIX", plan.vae_fp16_fix)) if on]
        if off:
            notes.append(f"{', '.join(off)}: SDXL only for now; {family} runs without")
        plan.compile, plan.quantize, plan.step_cache, plan.vae_fp16_fix = "off", "none", 0, False
    return plan


def warmup_shapes(settings: Settings, native: int) -> list[tuple[int, int, int]]:
    """(width, height, batch) to run in set-up: TWIN_COMPILE_WARMUP, or the native square at batch 1."""
    return settings.compile_warmup_shapes or [(native, native, 1)]
