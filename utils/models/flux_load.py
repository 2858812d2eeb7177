"""Loading a FLUX.1 base model for a ``FluxLayout``: the diffusers folder (or a single-file transformer against
the folder's configs, offline), held on the GPU as TWIN_FLUX_MEMORY decides (``flux_memory``), with the
8-step LoRA (FLUX.1-dev only) and the FLUX style LoRAs of the LoRA folder."""
from __future__ import annotations

import logging
from pathlib import Path

from utils.config import Settings
from utils.models.flux_memory import component_gib, decide, gpu_facts, installed_backends, quantization_config
from utils.models.layout import FluxLayout
from utils.models.load import LoadedModels, choose_device_dtype, load_loras, quiet_libraries

log = logging.getLogger("twin.models")
FAST_ADAPTER = "flux_fast"


def load_flux(layout: FluxLayout, settings: Settings, checkpoint: Path | None = None) -> LoadedModels:
    """The FLUX pipeline of ``layout`` (``checkpoint``: a single-file transformer in place of the folder's)."""
    with quiet_libraries():
        return _load(layout, settings, checkpoint)


def flux_device_dtype(settings: Settings):
    """As for SDXL, except that CUDA defaults to bf16: FLUX.1 ships in bf16 and its T5 overflows in fp16."""
    import torch
    device, dtype = choose_device_dtype(settings)
    if settings.dtype == "auto" and device.startswith("cuda"):
        dtype = torch.bfloat16
    return device, dtype


def _load(layout: FluxLayout, settings: Settings, checkpoint: Path | None) -> LoadedModels:
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    device, dtype = flux_device_dtype(settings)
    notes: list[str] = []
    if layout.profile == "tiny":
        if device == "cpu":
            torch.set_num_threads(1)   # as for tiny SDXL: tiny matmuls gain nothing from threads
        log.warning("TINY DEMO FLUX loaded from %s: outputs are NOT portraits", layout.base)
    else:
        layout.require()
        if layout.missing_optional:
            notes.append("optional weights not present: " + ", ".join(layout.missing_optional))
    plan = decide(settings.flux_memory, gpu_facts(device), component_gib(layout.base), installed_backends(),
                  layout.native_resolution)
    kwargs, single = {}, {}
    if plan.mode == "quantized":
        quant = quantization_config(plan.backend, dtype)
        if checkpoint is not None:   # the transformer comes from the file: quantized as it is read
            single["quantization_config"] = quant.quant_mapping.pop("transformer")
        kwargs["quantization_config"] = quant
    if checkpoint is not None:
        # A fine-tune shipped as one transformer file: the local folder gives its config (no hub).
        kwargs["transformer"] = FluxTransformer2DModel.from_single_file(
            str(checkpoint), config=str(layout.base), subfolder="transformer", torch_dtype=dtype,
            local_files_only=True, **single)
    pipe = FluxPipeline.from_pretrained(str(layout.base), torch_dtype=dtype, local_files_only=True,
                                        use_safetensors=True, **kwargs)
    base_config = dict(pipe.scheduler.config)
    if plan.mode == "offload":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    fast = None
    if pipe.transformer.config.guidance_embeds and layout.fast_lora_file.is_file():
        pipe.load_lora_weights(str(layout.fast_lora), weight_name=layout.fast_lora_weight, adapter_name=FAST_ADAPTER)
        fast = FAST_ADAPTER
    loras = load_loras(pipe, layout.lora_dir, "flux")
    if device.startswith("cuda") and settings.compile_mode != "off":  # TWIN_COMPILE (or TWIN_TORCH_COMPILE)
        pipe.transformer = torch.compile(pipe.transformer, mode="max-autotune-no-cudagraphs", fullgraph=False)
    log.info("FLUX memory mode %s%s: %s", plan.mode, f" ({plan.backend})" if plan.backend else "", plan.reason)
    return LoadedModels(pipe=pipe, profile=layout.profile,
                        model_name=Path(checkpoint).stem if checkpoint is not None else layout.model_name,
                        native_resolution=layout.native_resolution, device=device, dtype=dtype, adapter_repo=None,
                        adapter_variant=layout.variant, lightning_adapter=fast, loras=loras,
                        base_scheduler_config=base_config, notes=notes, identity_model=layout.identity_model,
                        layout=layout, family="flux", memory=plan.to_json())
