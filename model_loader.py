"""Model profiles: where the SDXL + IP-Adapter and FLUX.1 weights come from and how they are loaded.

Profiles (``settings.model_profile``):

* ``sdxl``  real SDXL base 1.0 + IP-Adapter weights from ``settings.model_dir`` or the Hugging Face cache.
* ``flux``  real FLUX.1-dev (or -schnell, TWIN_FLUX_MODEL) in the hub's diffusers layout, same places.
* ``tiny`` / ``tiny-flux``  deterministic, randomly initialised miniatures of both families (one folder),
  written with the same layout as the real repos and loaded through the very same ``from_pretrained`` /
  ``load_ip_adapter`` / ``load_lora_weights`` calls. Outputs are noise-like pictures, not portraits.
* ``auto``  ``sdxl`` when its weights are present, else ``flux`` when present, else ``tiny`` (said loudly).

Commands::

    python model_loader.py download [--dir models] [--faceid] [--no-lightning]  # on a connected machine
    python model_loader.py download --instantid | --faceid-plusv2              # only that variant's files
    python model_loader.py download --flux-dev | --flux-schnell                # FLUX.1's diffusers folders
    python model_loader.py download --restore gfpgan [--restore codeformer]    # face restoration ONNX only
    python model_loader.py download --safety                                   # the NSFW classifier only
    python model_loader.py make-tiny DIR                                       # offline, ~2 s, ~20 MB
    python model_loader.py check                                               # which profile would load
    python model_loader.py verify                                              # preflight of every weight file
"""
from __future__ import annotations

import sys

# The code lives in utils/models/ (see its __init__ for the map); the names the engine modules, tests and
# benchmarks import from here stay importable. New code imports from utils.models.* directly.
from utils.models.cli import main
from utils.models.download import download, download_restore
from utils.models.layout import (ADAPTER_FILES, ANTELOPE_DIR, BASE_DIR, CHECKPOINT_DIR, CONTROLNET_SUB, ENCODER_SUB,
                                 FACEID_DIR, INSTANTID_DIR, INSTANTID_FILES, IPA_DIR, LIGHTNING_DIR,
                                 LIGHTNING_WEIGHT_TINY, LORA_DIR, RESTORE_DIR, TINY_FACEID_WEIGHT, TINY_RESOLUTION,
                                 base_model_name, choose_profile, download_flag, list_checkpoints, repo_specs,
                                 resolve_sdxl, tiny_adapter_weight)
from utils.models.load import (LoadedModels, apply_cuda_optimisations, choose_device_dtype, dpmpp_karras,
                               few_step_scheduler, quiet_libraries)
from utils.models.single_file import to_single_file
from utils.models.startup import load_models, verify
from utils.models.tiny import TINY_ALT_CHECKPOINT, TINY_TE1, adapter_tensors, make_tiny, write_classic_tokenizers

__all__ = [
    "ADAPTER_FILES", "ANTELOPE_DIR", "BASE_DIR", "CHECKPOINT_DIR", "CONTROLNET_SUB", "ENCODER_SUB", "FACEID_DIR",
    "INSTANTID_DIR", "INSTANTID_FILES", "IPA_DIR", "LIGHTNING_DIR", "LIGHTNING_WEIGHT_TINY", "LORA_DIR", "RESTORE_DIR",
    "TINY_ALT_CHECKPOINT", "TINY_FACEID_WEIGHT", "TINY_RESOLUTION", "TINY_TE1", "LoadedModels",
    "adapter_tensors", "apply_cuda_optimisations", "base_model_name", "choose_device_dtype", "choose_profile",
    "download", "download_flag", "download_restore", "dpmpp_karras", "few_step_scheduler", "list_checkpoints",
    "load_models", "main", "make_tiny", "quiet_libraries", "repo_specs", "resolve_sdxl", "tiny_adapter_weight",
    "to_single_file", "verify", "write_classic_tokenizers",
]

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
