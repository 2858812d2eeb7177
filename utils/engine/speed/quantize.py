"""Dynamic quantization of the SDXL UNet's linear layers through torchao (int8 weights and activations, or
row-wise fp8), leaving the identity adapters' layers (attention processors: IP-Adapter to_k_ip/to_v_ip,
FaceID LoRA) and peft LoRA layers in the model's dtype, so every identity method works unchanged.

torchao is imported here only (requirements-gpu.txt): diffusers imports it in every process when it is
installed, so it is not a CPU requirement."""
from __future__ import annotations

import importlib.util
import logging

from utils.errors import ConfigError

log = logging.getLogger("twin.speed")
MIN_FEATURES = 16      # smaller linears (time embedding of the tiny model) gain nothing and lose precision
SKIP = ("processor", "lora_", "to_k_ip", "to_v_ip")


def _quiet_torchao() -> None:
    # torchao logs each optional kernel library it cannot load (CUDA-only .so files) at import.
    for name in ("torchao", "torchao.kernel", "torchao.quantization", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def available() -> bool:
    return importlib.util.find_spec("torchao") is not None


def linear_filter(module, fqn: str) -> bool:
    import torch
    return (isinstance(module, torch.nn.Linear) and not any(s in fqn for s in SKIP)
            and min(module.in_features, module.out_features) >= MIN_FEATURES)


def quantize_unet(unet, kind: str) -> int:
    """Quantize ``unet`` in place (``kind``: int8 | fp8); returns how many linear layers were quantized."""
    if not available():
        raise ConfigError(f"TWIN_QUANTIZE={kind} needs torchao: pip install -r requirements-gpu.txt")
    _quiet_torchao()
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig,
                                      Int8DynamicActivationInt8WeightConfig, PerRow, quantize_)
    config = (Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()) if kind == "fp8"
              else Int8DynamicActivationInt8WeightConfig())
    count = sum(1 for name, m in unet.named_modules() if linear_filter(m, name))
    quantize_(unet, config, filter_fn=linear_filter)
    log.info("UNet quantized", extra={"kind": kind, "linear_layers": count})
    return count
