"""Model profiles: where the SDXL + IP-Adapter weights come from and how they are loaded.

Profiles (``settings.model_profile``):

* ``sdxl``  real SDXL base 1.0 + IP-Adapter weights from ``settings.model_dir`` or the Hugging Face cache.
* ``tiny``  a deterministic, randomly initialised miniature of the same model family, written to a folder
  with the same layout as the real repos and loaded through the very same ``from_pretrained`` /
  ``load_ip_adapter`` / ``load_lora_weights`` calls. Outputs are noise-like pictures, not portraits.
* ``auto``  ``sdxl`` when its weights are present, else ``tiny`` with a loud warning.

Commands::

    python model_loader.py download [--dir models] [--faceid] [--no-lightning]  # on a connected machine
    python model_loader.py download --instantid | --faceid-plusv2              # only that variant's files
    python model_loader.py download --restore gfpgan [--restore codeformer]    # face restoration ONNX only
    python model_loader.py make-tiny DIR                                       # offline, ~2 s, ~20 MB
    python model_loader.py check                                               # which profile would load
    python model_loader.py verify                                              # preflight of every weight file
"""
from __future__ import annotations

import sys

# The code lives in utils/models/ (one module per concern); these names stay importable from here for the
# engine modules, tests and benchmarks that use them.
from utils.models.adapters import ARCFACE_DIM, INSTANTID_DIM, INSTANTID_TOKENS, VIT_H_HIDDEN, VIT_H_PROJ
from utils.models.cli import main
from utils.models.download import download, download_restore
from utils.models.filecheck import FileCheck
from utils.models.layout import (ADAPTER_FILES, ANTELOPE_DIR, ARCFACE_VARIANTS, BASE_DIR, BASE_FILES_FP16,
                                 CHECKPOINT_DIR, CONTROLNET_SUB, ENCODER_SUB, FACEID_DIR, INSTANTID_DIR,
                                 INSTANTID_FILES, IPA_DIR, LIGHTNING_DIR, LIGHTNING_WEIGHT_TINY, LORA_DIR,
                                 RESTORE_DIR, TINY_FACEID_WEIGHT, TINY_RESOLUTION, ModelLayout, RepoSpec,
                                 base_model_name, checkpoint_dir, choose_profile, download_flag, list_checkpoints,
                                 model_layout, repo_specs, resolve_sdxl, sdxl_weights_present, tiny_adapter_weight,
                                 wanted_variants)
from utils.models.load import (LoadedModels, apply_cuda_optimisations, choose_device_dtype, dpmpp_karras,
                               few_step_scheduler, quiet_libraries)
from utils.models.lora_check import verify_lora
from utils.models.onnx_check import verify_face_pack, verify_restore_models
from utils.models.single_file import single_file_shapes, to_single_file
from utils.models.startup import load_models, ready_layout, verify
from utils.models.tiny import (TINY_ALT_CHECKPOINT, TINY_PLUS_DIM, TINY_PLUS_TOKENS, TINY_PROJ, TINY_SEED, TINY_TE1,
                               TINY_TE2, TINY_VERSION, adapter_tensors, make_tiny, save_nested_bin, tiny_identitynet,
                               tiny_is_current, write_classic_tokenizers)
from utils.models.verify import verify_checkpoint, verify_tokenizer

__all__ = [
    "ADAPTER_FILES", "ANTELOPE_DIR", "ARCFACE_DIM", "ARCFACE_VARIANTS", "BASE_DIR", "BASE_FILES_FP16", "CHECKPOINT_DIR",
    "CONTROLNET_SUB", "ENCODER_SUB", "FACEID_DIR", "INSTANTID_DIM", "INSTANTID_DIR", "INSTANTID_FILES",
    "INSTANTID_TOKENS", "IPA_DIR", "LIGHTNING_DIR", "LIGHTNING_WEIGHT_TINY", "LORA_DIR", "RESTORE_DIR",
    "TINY_ALT_CHECKPOINT", "TINY_FACEID_WEIGHT", "TINY_PLUS_DIM", "TINY_PLUS_TOKENS", "TINY_PROJ", "TINY_RESOLUTION",
    "TINY_SEED", "TINY_TE1", "TINY_TE2", "TINY_VERSION", "VIT_H_HIDDEN", "VIT_H_PROJ",
    "FileCheck", "LoadedModels", "ModelLayout", "RepoSpec",
    "adapter_tensors", "apply_cuda_optimisations", "base_model_name", "checkpoint_dir", "choose_device_dtype",
    "choose_profile", "download", "download_flag", "download_restore", "dpmpp_karras", "few_step_scheduler",
    "list_checkpoints", "load_models", "main", "make_tiny", "model_layout", "quiet_libraries", "ready_layout",
    "repo_specs", "resolve_sdxl", "save_nested_bin", "sdxl_weights_present", "single_file_shapes",
    "tiny_adapter_weight", "tiny_identitynet", "tiny_is_current", "to_single_file", "verify", "verify_checkpoint",
    "verify_face_pack", "verify_lora", "verify_restore_models", "verify_tokenizer", "wanted_variants",
    "write_classic_tokenizers",
]

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
