"""Loading: the SDXL pipeline for a ``ModelLayout`` (diffusers folder or single-file checkpoint, InstantID's
ControlNet pipeline, the few-step and style LoRAs, the scheduler), on the chosen device and dtype.

Everything here reads a layout; nothing builds one (the tiny folder is built by ``tiny`` before, see
``startup``)."""
from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.config import Settings
from utils.errors import ModelWeightsMissing
from utils.models.layout import CONTROLNET_SUB, ModelLayout

log = logging.getLogger("twin.models")


@dataclass
class LoadedModels:
    pipe: Any
    profile: str
    model_name: str
    native_resolution: int
    device: str
    dtype: Any
    adapter_repo: Path | None            # folder holding ADAPTER_FILES layout for the selected variant
    adapter_variant: str
    lightning_adapter: str | None        # peft adapter name of the few-step LoRA, when loaded
    loras: dict[str, str]                # style LoRA name -> peft adapter name
    base_scheduler_config: dict
    notes: list[str] = field(default_factory=list)
    encoder_repo: Path | None = None     # IPA_DIR, for the ViT-H encoder of faceid-plusv2
    # What a session identity is bound to: the base model family. A single-file fine-tune of the same base
    # (same shapes, same image encoder and adapter files) takes the same identities, so a base-model switch
    # does not invalidate every uploaded session.
    identity_model: str = ""
    layout: Any = None                   # the folders these were loaded from (ModelLayout / FluxLayout)
    family: str = "sdxl"                 # sdxl | flux
    memory: dict | None = None           # FLUX: how it is held on the GPU (flux_memory.MemoryPlan.to_json())


def choose_device_dtype(settings: Settings):
    import torch
    if settings.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = settings.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelWeightsMissing(f"TWIN_DEVICE={settings.device!r} but no CUDA device is available")
    if settings.dtype != "auto":
        dtype = getattr(torch, settings.dtype)
    elif device.startswith("cuda"):
        dtype = torch.float16
    else:
        dtype = torch.float32  # fp16 matmuls on CPU are slow or unsupported
    if device == "cpu" and dtype == torch.float16:
        raise ModelWeightsMissing("TWIN_DTYPE=float16 is not supported on the CPU; use float32 or bfloat16")
    return device, dtype


def dpmpp_karras(config):
    from diffusers import DPMSolverMultistepScheduler
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                   use_karras_sigmas=True)


def few_step_scheduler(config):
    # SDXL-Lightning was distilled with Euler and "trailing" timestep spacing; other schedulers drift.
    from diffusers import EulerDiscreteScheduler
    return EulerDiscreteScheduler.from_config(config, timestep_spacing="trailing")


@contextlib.contextmanager
def quiet_libraries():
    """diffusers/transformers print progress bars and benign LoRA-prefix warnings on every load."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog
    old = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # peft warns on every second LoRA loaded into the same UNet; several adapters is the design here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated")
            # A FLUX LoRA without CLIP weights (most of them) says so on every load.
            warnings.filterwarnings("ignore", message="No LoRA keys associated")
            yield
    finally:
        dlog.set_verbosity(old[0])
        tlog.set_verbosity(old[1])
        dlog.enable_progress_bar()
        tlog.enable_progress_bar()


def load_pipeline(layout: ModelLayout, settings: Settings, checkpoint: Path | None = None) -> LoadedModels:
    """Load the pipeline of ``layout`` with its LoRAs and scheduler (the IP-Adapter variant is loaded by
    ipadapter_manager). ``checkpoint``: a single-file SDXL ``.safetensors`` (see ``layout.list_checkpoints``)
    in place of the base folder's weights; the folder still gives the configs and tokenizers (offline, no hub)."""
    with quiet_libraries():
        return _load_pipeline(layout, settings, checkpoint)


def _load_pipeline(layout: ModelLayout, settings: Settings, checkpoint: Path | None) -> LoadedModels:
    import torch
    device, dtype = choose_device_dtype(settings)
    notes: list[str] = []
    if layout.profile == "tiny":
        if device == "cpu":
            # The tiny model's matmuls are too small to gain from threads; one thread is faster and
            # leaves the other cores to the web server.
            torch.set_num_threads(1)
        log.warning("TINY DEMO MODEL loaded from %s: outputs are NOT portraits", layout.base.parent)
    else:
        layout.require()
        if layout.missing_optional:
            notes.append("optional weights not present: " + ", ".join(layout.missing_optional))
    pipe = _sdxl_pipeline(layout, settings, dtype, checkpoint)
    base_config = dict(pipe.scheduler.config)
    pipe.scheduler = dpmpp_karras(base_config)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    lightning_adapter = None
    if layout.lightning_file.is_file():
        pipe.load_lora_weights(str(layout.lightning), weight_name=layout.lightning_weight, adapter_name="lightning")
        lightning_adapter = "lightning"
    loras = load_loras(pipe, layout.lora_dir, "sdxl")
    models = LoadedModels(pipe=pipe, profile=layout.profile,
                          model_name=Path(checkpoint).stem if checkpoint is not None else layout.model_name,
                          native_resolution=layout.native_resolution, device=device, dtype=dtype,
                          adapter_repo=layout.adapter_repo, adapter_variant=layout.variant,
                          lightning_adapter=lightning_adapter, loras=loras, base_scheduler_config=base_config,
                          notes=notes, encoder_repo=layout.encoder_repo, identity_model=layout.model_name,
                          layout=layout)
    if device.startswith("cuda"):
        # Must run before the IP-Adapter is loaded (see fuse_qkv below).
        notes += apply_cuda_optimisations(pipe, settings, has_lora=bool(loras or lightning_adapter))
    return models


def _sdxl_pipeline(layout: ModelLayout, settings: Settings, dtype, checkpoint: Path | None):
    """The SDXL pipeline from the base folder, or from a single-file checkpoint with the folder as its config;
    for InstantID the ControlNet pipeline with the IdentityNet as its controlnet."""
    from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline
    base = str(layout.base)
    extra = {}
    if layout.vae_fix is not None:
        from utils.models.vae_fix import ensure_tiny_standin, load_vae_fix
        if layout.profile == "tiny":
            ensure_tiny_standin(layout.vae_fix.parent, layout.base / "vae")
        extra["vae"] = load_vae_fix(layout.vae_fix, dtype, choose_device_dtype(settings)[0])
    if layout.variant == "instantid":
        # InstantID: the same SDXL components in the ControlNet pipeline, with the IdentityNet (a ControlNet
        # that reads the identity tokens instead of the text, see identitynet.py) as its controlnet.
        controlnet = _identitynet(layout, settings, dtype)
        if checkpoint is not None:
            return StableDiffusionXLControlNetPipeline.from_single_file(
                str(checkpoint), config=base, controlnet=controlnet, torch_dtype=dtype, local_files_only=True, **extra)
        return StableDiffusionXLControlNetPipeline.from_pretrained(
            base, controlnet=controlnet, dtype=dtype, variant=layout.weights_variant, local_files_only=True,
            use_safetensors=True, **extra)
    if checkpoint is not None:
        # A fine-tune shipped as one file (RealVisXL, Juggernaut XL): the local base folder is the config,
        # so nothing is fetched from the hub.
        return StableDiffusionXLPipeline.from_single_file(str(checkpoint), config=base, torch_dtype=dtype,
                                                          local_files_only=True, **extra)
    return StableDiffusionXLPipeline.from_pretrained(base, dtype=dtype, variant=layout.weights_variant,
                                                     local_files_only=True, use_safetensors=True, **extra)


def _identitynet(layout: ModelLayout, settings: Settings, dtype):
    from utils.models.identitynet import identity_net_class
    net_dir = layout.adapter_repo / CONTROLNET_SUB
    if not (net_dir / "config.json").is_file():
        raise ModelWeightsMissing(f"InstantID IdentityNet not found in {net_dir}; run: python model_loader.py "
                                  f"download --instantid --dir {settings.model_dir}")
    return identity_net_class().from_pretrained(str(net_dir), dtype=dtype, local_files_only=True,
                                                use_safetensors=True)


def load_loras(pipe, lora_dir: Path | None, family: str) -> dict[str, str]:
    """The style LoRAs of ``family`` in ``lora_dir`` (one folder holds both families' LoRAs; each file's keys
    say which it is), loaded as peft adapters ``style_<name>``: name -> adapter name."""
    from utils.models.kinds import lora_family
    loras = {}
    if lora_dir is None or not lora_dir.is_dir():
        return loras
    for f in sorted(lora_dir.glob("*.safetensors")):
        if lora_family(f) != family:
            continue
        name = f.stem
        pipe.load_lora_weights(str(lora_dir), weight_name=f.name, adapter_name=f"style_{name}")
        loras[name] = f"style_{name}"
    return loras


def apply_cuda_optimisations(pipe, settings: Settings, *, has_lora: bool = False) -> list[str]:
    """Opt-in speed switches; SDPA attention is diffusers' default with torch 2 and needs nothing.
    Returns notes for info() about switches that were asked for but not applied."""
    import torch
    notes = []
    if settings.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if settings.fuse_qkv:
        # fuse_qkv_projections() installs FusedAttnProcessor2_0 everywhere: done after load_ip_adapter it would
        # drop the IP-Adapter processors (so it runs before), and its fused to_qkv bypasses peft LoRA layers
        # on to_q/to_k/to_v (so it is skipped when any LoRA, including FaceID's, is in use).
        if has_lora or settings.ip_adapter_variant in ("faceid", "faceid-plusv2"):
            notes.append("fuse_qkv skipped: LoRA adapters are loaded and fused projections would bypass them")
            log.warning(notes[-1])
        else:
            pipe.fuse_qkv_projections()
    # torch.compile, quantization and step caching: the speed plan (utils/engine/speed), after the adapter.
    return notes
