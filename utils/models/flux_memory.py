"""How FLUX is held on the GPU (TWIN_FLUX_MEMORY): the decision, from facts about the GPU, the model's size and
the installed quantization backends, kept apart from the loading so it can be tested with any facts.

    full       every component in bf16 on the GPU (published: FLUX.1-dev 1024², batch 1 on an H100: model
               31.4 GB, peak 33.9 GB; figures in GiB).
    quantized  weight-only quantization of the transformer and T5 (the two big parts) through diffusers'
               quantization configs: torchao fp8 on GPUs with fp8 units (compute capability 8.9+: Ada,
               Hopper), torchao int8 on older ones, else bitsandbytes nf4; CLIP and the VAE stay bf16.
    offload    diffusers' model CPU offload: each component moves to the GPU while it runs (the transformer
               stays for the denoising loop), so the GPU needs the largest component plus activations.

auto: full when the weights plus the activations of one image at the native size (with a 10 % margin) fit
the GPU's total memory; else quantized when a backend is installed and its estimate fits; else offload. The
CPU always runs full (bf16 / fp32 as TWIN_DTYPE says); quantized and offload are GPU modes.
"""
from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path

from utils.errors import ConfigError

GIB = 1024 ** 3
# Activations of one 1024² image (published: peak 33.9 minus model 31.4 GiB), scaled by pixels.
ACTIVATION_GIB_1024 = 2.5
MARGIN = 1.10
# Bytes per parameter of each backend's weights (bf16 = 2), for the big components it quantizes.
BACKEND_BYTES = {"torchao-fp8": 1.0, "torchao-int8": 1.0, "bnb-nf4": 0.56}   # nf4: 4 bits + block scales
QUANTIZED_PARTS = ("transformer", "text_encoder_2")
MODES = ("auto", "full", "quantized", "offload")


@dataclass(frozen=True)
class GpuFacts:
    name: str
    total_gib: float
    capability: tuple[int, int]


@dataclass(frozen=True)
class MemoryPlan:
    mode: str                 # full | quantized | offload
    backend: str | None       # torchao-fp8 | torchao-int8 | bnb-nf4 when quantized
    reason: str

    def to_json(self) -> dict:
        return asdict(self)


def installed_backends() -> list[str]:
    """Quantization backends importable here (torchao: requirements-gpu.txt; bitsandbytes if installed)."""
    out = []
    if importlib.util.find_spec("torchao") is not None:
        out += ["torchao-fp8", "torchao-int8"]
    if importlib.util.find_spec("bitsandbytes") is not None:
        out.append("bnb-nf4")
    return out


def backend_order(gpu: GpuFacts, backends: list[str]) -> list[str]:
    """The installed backends, best first: fp8 where the GPU has fp8 units (sm 8.9+), int8, then nf4."""
    order = (["torchao-fp8"] if gpu.capability >= (8, 9) else []) + ["torchao-int8", "bnb-nf4"]
    return [b for b in order if b in backends]


def component_gib(base: Path) -> dict[str, float]:
    """GiB on disk of each component's weights (the index's total_size for a sharded one): what it takes in
    the dtype it ships in (bf16 for FLUX.1)."""
    import json
    out = {}
    for sub in ("transformer", "text_encoder_2", "text_encoder", "vae"):
        folder = Path(base) / sub
        total = 0
        for index in folder.glob("*.safetensors.index.json"):
            total = int(json.loads(index.read_text()).get("metadata", {}).get("total_size", 0))
        if not total:
            total = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        out[sub] = total / GIB
    return out


def decide(requested: str, gpu: GpuFacts | None, parts_gib: dict[str, float], backends: list[str],
           side: int = 1024) -> MemoryPlan:
    """The memory mode for ``requested`` (TWIN_FLUX_MEMORY) on ``gpu`` (None: the CPU) for a model whose
    components take ``parts_gib`` in bf16, with ``backends`` installed; ``side``: the native image side."""
    if requested not in MODES:
        raise ConfigError(f"TWIN_FLUX_MEMORY={requested!r} is not one of {', '.join(MODES)}")
    if gpu is None:
        if requested in ("quantized", "offload"):
            raise ConfigError(f"TWIN_FLUX_MEMORY={requested} needs a CUDA GPU; this process runs on the CPU "
                              "(use auto or full)")
        return MemoryPlan("full", None, "CPU: no GPU memory to plan; every component in host memory")
    act = ACTIVATION_GIB_1024 * (side / 1024) ** 2
    weights = sum(parts_gib.values())
    full_need = (weights + act) * MARGIN
    order = backend_order(gpu, backends)
    if requested == "full":
        return MemoryPlan("full", None, f"TWIN_FLUX_MEMORY=full (needs ~{full_need:.1f} GiB; {gpu.name} has "
                                        f"{gpu.total_gib:.1f} GiB)")
    if requested == "quantized":
        if not order:
            raise ConfigError("TWIN_FLUX_MEMORY=quantized but no quantization backend is installed: "
                              "pip install -r requirements-gpu.txt (torchao), or bitsandbytes")
        return MemoryPlan("quantized", order[0], f"TWIN_FLUX_MEMORY=quantized ({order[0]})")
    if requested == "offload":
        return MemoryPlan("offload", None, "TWIN_FLUX_MEMORY=offload")
    if full_need <= gpu.total_gib:
        return MemoryPlan("full", None, f"auto: bf16 needs ~{full_need:.1f} GiB and {gpu.name} has "
                                        f"{gpu.total_gib:.1f} GiB")
    over = f"auto: bf16 needs ~{full_need:.1f} GiB, more than the {gpu.total_gib:.1f} GiB of {gpu.name}"
    tried = []
    for backend in order:
        q = sum(g * (BACKEND_BYTES[backend] / 2 if k in QUANTIZED_PARTS else 1) for k, g in parts_gib.items())
        q_need = (q + act) * MARGIN
        if q_need <= gpu.total_gib:
            return MemoryPlan("quantized", backend, f"{over}; {backend} weights need ~{q_need:.1f} GiB"
                                                    + "".join(f" ({t})" for t in tried))
        tried.append(f"{backend} would need ~{q_need:.1f} GiB")
    why = ", ".join(tried) if tried else "no quantization backend is installed (pip install -r requirements-gpu.txt)"
    return MemoryPlan("offload", None, f"{over}, and {why}: model CPU offload")


def gpu_facts(device: str) -> GpuFacts | None:
    """The GPU ``device`` names (None for the CPU)."""
    if not str(device).startswith("cuda"):
        return None
    import torch
    idx = torch.device(device).index or 0
    p = torch.cuda.get_device_properties(idx)
    return GpuFacts(name=p.name, total_gib=p.total_memory / GIB, capability=(p.major, p.minor))


def quantization_config(backend: str, dtype):
    """The pipeline's quantization (``FluxPipeline.from_pretrained(quantization_config=...)``) of the
    transformer (through diffusers' config class) and T5 (through transformers' own), both for ``backend``."""
    import diffusers
    import transformers
    from diffusers import PipelineQuantizationConfig
    if backend.startswith("torchao"):
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

        def make(lib):
            return lib.TorchAoConfig(Float8WeightOnlyConfig() if backend == "torchao-fp8" else Int8WeightOnlyConfig())
    else:
        def make(lib):
            return lib.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    libs = {"transformer": diffusers, "text_encoder_2": transformers}
    return PipelineQuantizationConfig(quant_mapping={p: make(libs[p]) for p in QUANTIZED_PARTS})
