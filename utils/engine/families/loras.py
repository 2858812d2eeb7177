"""The style-LoRA checks every family shares: a ``lora`` must be a LoRA of the active model's family that the
model loaded; the catalogue GET /loras shows (every LoRA file of the folder, its family, whether it is
loaded by the active model)."""
from __future__ import annotations

from typing import Any

from utils.errors import InvalidRequest


def _folder_loras(models) -> dict[str, str | None]:
    from utils.models.kinds import list_loras
    layout = getattr(models, "layout", None)
    return list_loras(getattr(layout, "lora_dir", None))


def check_lora(name: str | None, models, family: str) -> None:
    """400 for a LoRA that is not installed, or is another family's (naming both families)."""
    if name is None or name in models.loras:
        return
    other = _folder_loras(models).get(name, "missing")
    if other not in ("missing", None, family):
        raise InvalidRequest(f"lora={name!r} is a LoRA of the {other} family, but the active base model "
                             f"{models.model_name!r} is of the {family} family; use one of its LoRAs "
                             f"({', '.join(sorted(models.loras)) or 'none installed'}) or load a {other} model first", code="lora_wrong_family")
    raise InvalidRequest(f"lora={name!r} is not installed; available: {', '.join(sorted(models.loras)) or 'none'}")


def lora_catalogue(models) -> list[dict[str, Any]]:
    """[{name, family, loaded}] for every LoRA file in the model's LoRA folder."""
    return [{"name": n, "family": fam, "loaded": n in models.loras} for n, fam in _folder_loras(models).items()]


def set_adapters(pipe, denoiser, adapters: list[tuple[str, float]]) -> None:
    """Exactly these LoRA adapters at these weights for the next call (none: LoRAs off). A denoiser (SDXL's
    UNet, FLUX's transformer) that holds no LoRA is left as it is."""
    if not getattr(denoiser, "peft_config", None):
        return
    if adapters:
        pipe.enable_lora()
        pipe.set_adapters([n for n, _ in adapters], adapter_weights=[w for _, w in adapters])
    else:
        pipe.disable_lora()
